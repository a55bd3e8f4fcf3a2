"""Who may talk to the daemon: SO_PEERCRED checked against allow-lists.

The socket's file mode is the first gate (only its owner and group can
connect to a 0660 socket); this is the second, and the only one that knows
about admin methods. A peer is allowed when its uid is listed, or its primary
group or any supplementary group is (SO_PEERGROUPS, Linux 4.13+; else read
from /proc). An allowed peer that is not an admin gets ``FORBIDDEN`` for the
admin-only methods. A peer that is not allowed gets ``FORBIDDEN`` for the
requests of its first read, so it learns why instead of seeing a closed
socket, and then the server closes the connection (``wksd.server``,
``Server._refuse``): a refused peer holds no fd for longer than that.

Admins (WKSD_ADMIN_UIDS: the daemon's uid and root by default) are also the
peers that may open ``ADMIN_RESERVE`` connections beyond the connection caps,
so an operator can always ask for ``health``.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from typing import Final, Protocol

from .config import Config

__all__ = ["AccessPolicy", "Peer", "peer_credentials"]

#: From <asm-generic/socket.h>; Python's socket module does not name it.
SO_PEERGROUPS: Final = 59
#: Linux's NGROUPS_MAX is 65536; asking for 256 covers real accounts, and a
#: peer with more falls back to /proc.
_PEERGROUPS_ASK: Final = 256


class _HasSockopt(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


def peer_credentials(sock: _HasSockopt) -> Peer:
    """The connecting process's pid, uid, gid and supplementary groups."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid, _peer_groups(sock, pid))


def _peer_groups(sock: _HasSockopt, pid: int) -> frozenset[int]:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * _PEERGROUPS_ASK)
        return frozenset(struct.unpack(f"{len(raw) // 4}I", raw))
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(gid) for gid in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    allowed_uids: frozenset[int]
    allowed_gids: frozenset[int]
    admin_uids: frozenset[int]

    def allows(self, peer: Peer) -> bool:
        return (
            peer.uid in self.allowed_uids
            or peer.gid in self.allowed_gids
            or not self.allowed_gids.isdisjoint(peer.groups)
        )

    def is_admin(self, peer: Peer) -> bool:
        return peer.uid in self.admin_uids

    @classmethod
    def from_config(cls, config: Config, socket_gid: int | None) -> AccessPolicy:
        """The configured lists, with DESIGN section 6's defaults for unset ones:
        the daemon's uid and root; the socket's group."""
        mine = frozenset({os.getuid(), 0})
        gids = frozenset() if socket_gid is None else frozenset({socket_gid})
        return cls(
            allowed_uids=mine if config.allowed_uids is None else config.allowed_uids,
            allowed_gids=gids if config.allowed_gids is None else config.allowed_gids,
            admin_uids=mine if config.admin_uids is None else config.admin_uids,
        )
