"""Coordination beyond the seed (docs/protocol-extensions.md).

The services here hold state per connection and talk to the store and its
pub/sub: ``holds`` (waiting for a lock, keeping one alive, hearing it lost),
``feeds`` (workflow events, live and replayed) and ``singleflight`` (one
computing caller per cache key). They see a connection only as a
``wksd.session.Session``.
"""
