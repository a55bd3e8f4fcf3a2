"""The operator's socat one-liners of DESIGN section 2.2, run for real."""

from __future__ import annotations

import json
import subprocess

import pytest

from clientlib import Client

from .polling import wait_until
from .processes import DaemonProcess, require_binary


@pytest.fixture(autouse=True)
def socat() -> str:
    return require_binary("socat")


def one_liner(shell: str) -> str:
    done = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_health_one_liner(daemon_process: DaemonProcess) -> None:
    """`echo health | socat - UNIX-CONNECT:...` prints the health document."""
    out = one_liner(f"echo health | socat - UNIX-CONNECT:{daemon_process.path}")
    health = json.loads(out)
    assert health["status"] == "healthy" and health["checks"]["redis"]["status"] == "disabled"
    assert out.count("\n") == 1


def test_workflow_get_one_liner(daemon_process: DaemonProcess) -> None:
    """`echo 'workflow.get exec-123' | socat ...` prints the state, or null."""
    path = daemon_process.path
    assert one_liner(f"echo 'workflow.get exec-123' | socat - UNIX-CONNECT:{path}") == "null\n"
    one_liner(f"echo 'workflow.start exec-123 wf-1 4' | socat - UNIX-CONNECT:{path}")
    state = json.loads(one_liner(f"echo 'workflow.get exec-123' | socat - UNIX-CONNECT:{path}"))
    assert state["executionId"] == "exec-123" and state["status"] == "running"


def test_session_printf_one_liner(daemon_process: DaemonProcess) -> None:
    """Two lines in, two lines out: the set's true and the session back."""
    out = one_liner(
        'printf \'session.set u1 {"role": "admin"} 60\\nsession.get u1\\n\' '
        f"| socat - UNIX-CONNECT:{daemon_process.path}"
    )
    assert out.splitlines() == ["true", '{"role":"admin"}']


def test_metrics_one_liner(daemon_process: DaemonProcess) -> None:
    """`echo metrics | socat ...` prints the Prometheus exposition."""
    out = one_liner(f"echo metrics | socat - UNIX-CONNECT:{daemon_process.path}")
    assert "# TYPE redis_commands_total counter" in out
    assert 'wksd_backend{backend="memory"} 1.0' in out


def test_error_one_liner(daemon_process: DaemonProcess) -> None:
    """A bad line gets a JSON error line, not a dropped connection."""
    out = one_liner(f"echo 'lock.acquire e1' | socat - UNIX-CONNECT:{daemon_process.path}")
    assert json.loads(out) == {
        "error": {"code": "BAD_REQUEST", "message": "lock.acquire: worker_id is required"}
    }


def test_a_wait_from_socat_is_never_granted_after_it_left(daemon_process: DaemonProcess) -> None:
    """`echo 'lock.acquire R B 30 false 5' | socat ...` leaves 0.5 s after its input ends;
    the lock released later goes to the next client at once, not to the gone socat."""
    path = daemon_process.path
    with Client(path) as holder, Client(path) as third:
        assert holder.lock_workflow_execution("R", "A")
        out = one_liner(f"echo 'lock.acquire R B 30 false 5' | socat - UNIX-CONNECT:{path}")
        assert out == ""  # it left before any answer: the wait was still on
        assert holder.unlock_workflow_execution("R", "A")
        wait_until(lambda: third.lock_workflow_execution("R", "C"), 5, "R to be free for C")
        assert third.is_workflow_locked("R").worker_id == "C"


def test_socat_t_waits_for_an_answer_that_waits(daemon_process: DaemonProcess) -> None:
    """`socat -t 3` stays for the answer of a lock that frees within its wait."""
    path = daemon_process.path
    with Client(path) as holder:
        assert holder.lock_workflow_execution("R", "A", ttl=1)
        out = one_liner(f"echo 'lock.acquire R B 30 false 5' | socat -t 3 - UNIX-CONNECT:{path}")
        assert json.loads(out)["acquired"] is True and json.loads(out)["workerId"] == "B"
