"""The operator's socat one-liners of DESIGN section 2.2, run for real."""

from __future__ import annotations

import json
import subprocess

import pytest

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
