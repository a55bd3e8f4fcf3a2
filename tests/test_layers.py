"""Every import points one way: the layers of docs/design.md's source map, read
from the source files' own import statements (nothing is imported to check)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    """The dotted name of a source file under the repository root."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> Iterator[str]:
    """The absolute name of every module ``path`` imports, relative ones resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            yield stem
            # "from . import x" and "from wksd import store" name modules too.
            yield from (f"{stem}.{alias.name}" for alias in node.names)


def offences(package: str, forbidden: tuple[str, ...]) -> list[str]:
    """``file: module`` for each import under ``package`` of a forbidden module."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imports(path):
            if any(name == bad or name.startswith(bad + ".") for bad in forbidden):
                found.append(f"{path.relative_to(ROOT)}: {name}")
    return sorted(set(found))


STORE_IMPLEMENTATIONS = tuple(
    f"wksd.store.{path.stem}" for path in (ROOT / "wksd/store").glob("*.py") if path.stem != "base"
)

RULES = {
    # The client library is what workers install: msgpack and the standard
    # library (anyio for the async client), never the daemon or its I/O stack.
    "clientlib": ("wksd", "trio", "redis", "hiredis", "structlog", "prometheus_client"),
    # The seed's rules: the Store protocol, keys and clock, and nothing that
    # does I/O or knows a connection.
    "wksd/domain": (
        "trio",
        "redis",
        "wksd.server",
        "wksd.dispatch",
        "wksd.methods",
        "wksd.app",
        "wksd.coordination",
        "wksd.config",
        *STORE_IMPLEMENTATIONS,
    ),
    # Coordination knows a connection only as wksd.session.Session.
    "wksd/coordination": (
        "wksd.server",
        "wksd.dispatch",
        "wksd.methods",
        "wksd.app",
        "wksd.config",
        *STORE_IMPLEMENTATIONS,
    ),
    # The stores serve whatever is above them and know none of it.
    "wksd/store": (
        "wksd.domain",
        "wksd.coordination",
        "wksd.server",
        "wksd.dispatch",
        "wksd.methods",
        "wksd.app",
        "wksd.config",
    ),
}


@pytest.mark.parametrize("package", sorted(RULES))
def test_imports_point_one_way(package: str) -> None:
    """No module of the package imports a layer it must not know."""
    assert offences(package, RULES[package]) == []


def test_the_checker_sees_relative_imports() -> None:
    """A relative import is resolved to the absolute module it names."""
    assert "wksd.store.memory" in set(imports(ROOT / "wksd/app.py"))
    assert "wksd.session" in set(imports(ROOT / "wksd/coordination/holds.py"))
