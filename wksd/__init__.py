"""wksd: the local state sidecar daemon (see README.md and docs/design.md)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
