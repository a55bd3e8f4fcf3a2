"""The daemon's side of systemd: an inherited socket, and sd_notify.

Socket activation: systemd passes listening sockets as fds 3, 4, ... and says
so in ``LISTEN_PID`` (which must be us), ``LISTEN_FDS`` (how many) and
``LISTEN_FDNAMES`` (their names). wksd takes the one Unix stream socket
(named ``wksd.socket`` by default when there are several), and clears the
variables so that no child inherits them.

Notification: ``Notifier`` sends datagrams to ``$NOTIFY_SOCKET`` (a path, or
``@name`` in the abstract namespace): READY=1 once serving, STATUS= lines,
STOPPING=1, and WATCHDOG=1 from a task in the event loop at half of
``$WATCHDOG_USEC``, so a loop that stalls stops the pings and systemd restarts
the daemon. Without ``$NOTIFY_SOCKET`` every call is a no-op. Sending never
blocks and never raises: a notification that cannot be delivered must not
take the daemon down.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Mapping, MutableMapping
from typing import Final

import structlog
import trio

__all__ = ["Notifier", "inherited_socket"]

log = structlog.get_logger("wksd.systemd")

#: The first fd systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START: Final = 3


def inherited_socket(
    environ: MutableMapping[str, str] | None = None, name: str = "wksd.socket"
) -> socket.socket | None:
    """The listening Unix socket systemd passed us, or None when not activated."""
    environ = os.environ if environ is None else environ
    try:
        if int(environ.get("LISTEN_PID", "0")) != os.getpid():
            return None
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(variable, None)
    candidates = []
    for index in range(count):
        fd = LISTEN_FDS_START + index
        os.set_inheritable(fd, False)
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            candidates.append((names[index] if index < len(names) else "", fd))
    chosen = [fd for fd_name, fd in candidates if fd_name == name] or [fd for _, fd in candidates]
    for fd in chosen:
        sock = socket.socket(fileno=fd)
        if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
            return sock
        sock.detach()  # not ours to close
    return None


class Notifier:
    """sd_notify(3) without libsystemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        #: Seconds between WATCHDOG=1 pings (half the timeout), or None when off.
        self.watchdog_interval = int(usec) / 2e6 if enabled else None

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, *assignments: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(assignments).encode(), self._address)
        except OSError as exc:
            log.warning("sd_notify failed", error=str(exc))

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=draining in-flight requests")

    async def watchdog_forever(self) -> None:
        """Ping the watchdog from the event loop; returns at once when it is off."""
        if self.watchdog_interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
