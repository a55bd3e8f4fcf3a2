"""What a dashboard and an alerting rule read: the process and build metrics,
redis_connection_status on the embedded default, the metrics port's status
lines, and docs/grafana/wksd.json and docs/prometheus/alerts.yml checked
against a live daemon's exposition (wksd.metrics, wksd.http)."""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

import wksd
from clientlib import Client
from wksd.app import Daemon
from wksd.config import Config
from wksd.http import bind_http, serve_http

from .processes import DaemonProcess, require_binary
from .redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana" / "wksd.json"
ALERTS = ROOT / "docs" / "prometheus" / "alerts.yml"

#: The panels the issue asks for, by a word each one's title carries.
DASHBOARD_PANELS = (
    "requests by method and code",
    "latency quantiles",
    "backend",
    "redis status",
    "memory keys",
    "workflows",
    "locks",
    "waiters",
)
#: The alerts the issue asks for.
ALERT_NAMES = ("WksdRedisDown", "WksdDegraded", "WksdMemoryNearBound", "WksdErrorRate")
#: The series a histogram family exposes besides its own name.
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
#: Metric names as the daemon spells them; label names such as redis_py are
#: removed with the groupings they sit in before this is applied.
METRIC_NAME = re.compile(r"\b(?:wksd|process|redis)_[a-z_]+\b")
#: What PromQL puts in parentheses after these is label names, not metrics.
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
LABEL_MATCHERS = re.compile(r"\{[^}]*\}")


@dataclass
class Served:
    """A live daemon on the embedded default, with its metrics port."""

    daemon: DaemonProcess
    port: int
    started_after: float  # wall-clock time just before the process was spawned

    @property
    def path(self) -> str:
        return self.daemon.path


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """One daemon for the module: starting a process per test would cost seconds each."""
    with tempfile.TemporaryDirectory(prefix="wksd-", dir="/tmp") as directory:
        port = free_port()
        started_after = time.time()
        daemon = DaemonProcess(
            os.path.join(directory, "wksd.sock"), {"WKSD_METRICS_ADDR": f"127.0.0.1:{port}"}
        ).start()
        try:
            yield Served(daemon, port, started_after)
        finally:
            daemon.close()


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` as is and read the whole answer, until the port closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def scrape(port: int) -> str:
    """The /metrics body, read over a raw socket."""
    answer = raw_exchange(port, b"GET /metrics HTTP/1.1\r\nHost: wksd\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    return body.decode()


def samples(exposition: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of the exposition, by series name, parsed by prometheus-client."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def value(exposition: str, name: str, **labels: str) -> float:
    """The one sample of ``name`` with exactly ``labels``."""
    matching = [v for found, v in samples(exposition).get(name, []) if found == labels]
    assert len(matching) == 1, (name, labels, samples(exposition).get(name))
    return matching[0]


def series_names(exposition: str) -> set[str]:
    """Every series name the exposition declares, sampled or not (``# TYPE`` lines)."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind in ("histogram", "summary"):
                names.update(name + suffix for suffix in HISTOGRAM_SUFFIXES)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads, parsed loosely."""
    bare = LABEL_MATCHERS.sub("", GROUPING.sub("", expr))
    return set(METRIC_NAME.findall(bare))


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def dashboard_panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


# -- the process and build metrics ------------------------------------------------
def test_process_metrics_describe_the_daemon_process(served: Served) -> None:
    """process_* figures are the daemon's own: started after the test spawned it, with
    memory, CPU and fds in their bounds."""
    text = scrape(served.port)
    start = value(text, "process_start_time_seconds")
    # /proc's boot time has whole seconds, so the start time is up to 1 s early.
    assert served.started_after - 1.5 <= start <= time.time()
    resident = value(text, "process_resident_memory_bytes")
    assert 0 < resident <= value(text, "process_virtual_memory_bytes")
    assert value(text, "process_cpu_seconds_total") > 0  # importing wksd alone takes CPU
    # at least stdio, the listening socket, the metrics port and the scrape itself
    assert 5 <= value(text, "process_open_fds") <= value(text, "process_max_fds")


def test_build_info_names_the_versions_in_both_expositions(served: Served) -> None:
    """wksd_build_info is 1 with wksd's, Python's and redis-py's versions, over HTTP and
    from the metrics method alike."""
    labels = {
        "version": wksd.__version__,
        "python": platform.python_version(),  # the daemon runs this same interpreter
        "redis_py": version("redis"),
    }
    with Client(served.path) as client:
        over_rpc = client.metrics()
    for text in (scrape(served.port), over_rpc):
        assert value(text, "wksd_build_info", **labels) == 1
        assert "process_start_time_seconds" in samples(text)


def test_redis_connection_status_is_0_on_the_embedded_default(served: Served) -> None:
    """Without Redis configured, redis_connection_status is 0, wksd_redis_enabled is 0,
    memory serves, and the HELP text says what the 0 means."""
    text = scrape(served.port)
    assert value(text, "redis_connection_status") == 0
    assert value(text, "wksd_redis_enabled") == 0
    assert value(text, "wksd_backend", backend="memory") == 1
    help_line = next(
        line for line in text.splitlines() if line.startswith("# HELP redis_connection_status ")
    )
    assert "embedded default" in help_line and "wksd_redis_enabled" in help_line


def test_redis_enabled_is_1_once_redis_is_configured() -> None:
    """A daemon built with a Redis target says so in wksd_redis_enabled before it connects."""
    config = Config(redis_enabled=True, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    text = Daemon(config).metrics.render()
    assert value(text, "wksd_redis_enabled") == 1
    assert value(text, "redis_connection_status") == 0


def test_the_readme_names_every_metric_family(served: Served) -> None:
    """Every wksd_ and redis_ family the daemon exposes is listed under "Logs and metrics"."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Logs and metrics", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`((?:wksd|redis)_[a-z_]+)", section))
    exposed = {
        name
        for name in series_names(scrape(served.port))
        if name.startswith(("wksd_", "redis_")) and not name.endswith(HISTOGRAM_SUFFIXES)
    }
    assert exposed - listed == set()
    assert "`process_*`" in section


# -- status lines of the metrics port -----------------------------------------------
class _Figures:
    """What serve_http asks of the daemon, with a health status a test sets."""

    def __init__(self) -> None:
        self.status = "healthy"

    async def health(self) -> dict[str, Any]:
        return {"status": self.status}

    async def metrics_text(self) -> str:
        return "# none\n"


async def _status_line(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        answer = b""
        while b"\r\n" not in answer and (chunk := await stream.receive_some()):
            answer += chunk
    return answer.split(b"\r\n", 1)[0]


@pytest.mark.parametrize(
    ("health", "request_bytes", "status_line"),
    [
        ("healthy", b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK"),
        ("degraded", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK"),
        (
            "unhealthy",
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
            b"HTTP/1.1 503 Service Unavailable",
        ),
        ("healthy", b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK"),
        ("healthy", b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 404 Not Found"),
        (
            "healthy",
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 405 Method Not Allowed",
        ),
        ("healthy", b"NOT HTTP AT ALL\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
    ],
)
async def test_every_answer_carries_its_reason_phrase(
    health: str, request_bytes: bytes, status_line: bytes
) -> None:
    """The metrics port's status lines read "200 OK", "404 Not Found", "503 Service
    Unavailable" and so on, not a bare code."""
    figures = _Figures()
    figures.status = health
    sock = bind_http(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_http, sock, figures)
        assert await _status_line(port, request_bytes) == status_line
        nursery.cancel_scope.cancel()


def test_the_live_daemon_answers_with_reason_phrases(served: Served) -> None:
    """Through the real daemon's port: 200 OK for /metrics and /health, 404 Not Found
    for anything else."""
    for target, line in (
        (b"/metrics", b"HTTP/1.1 200 OK"),
        (b"/health", b"HTTP/1.1 200 OK"),
        (b"/nope", b"HTTP/1.1 404 Not Found"),
    ):
        answer = raw_exchange(served.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.split(b"\r\n", 1)[0] == line


# -- the dashboard ------------------------------------------------------------------
def test_the_dashboard_is_importable() -> None:
    """wksd.json has what Grafana's import needs: uid, title, schemaVersion, a Prometheus
    data-source variable that every panel uses, unique panel ids and a place for each."""
    document = dashboard()
    assert document["uid"] == "wksd" and document["title"] == "wksd"
    assert isinstance(document["schemaVersion"], int) and document["schemaVersion"] >= 30
    variables = {variable["name"]: variable for variable in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids))
    for panel in document["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    for panel in dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"]


def test_the_dashboard_has_the_panels_an_operator_asks_for() -> None:
    """Requests by method and code, latency quantiles, backend, Redis status, memory keys,
    workflows, locks and waiters each have a panel, and latency is histogram_quantile."""
    titles = [panel["title"].lower() for panel in dashboard_panels()]
    for wanted in DASHBOARD_PANELS:
        assert any(wanted in title for title in titles), wanted
    latency = next(p for p in dashboard_panels() if p["title"] == "Latency quantiles")
    for target in latency["targets"]:
        assert "histogram_quantile(" in target["expr"]
        assert "wksd_request_duration_seconds_bucket" in target["expr"]


def test_the_loose_parse_finds_metrics_and_skips_labels() -> None:
    """metric_names keeps metric names and drops label names and label values."""
    expr = (
        'max by (instance, redis_py) (wksd_build_info{method=~"wksd_x"}) / on (job) '
        "rate(process_cpu_seconds_total[5m]) + redis_connection_status"
    )
    assert metric_names(expr) == {
        "wksd_build_info",
        "process_cpu_seconds_total",
        "redis_connection_status",
    }


def test_every_metric_the_documents_read_is_exposed(served: Served) -> None:
    """Each metric name in the dashboard's and the alerts' PromQL is in a live daemon's
    exposition, so no panel or rule is silently empty."""
    exposed = series_names(scrape(served.port))
    for expr in dashboard_exprs() + [rule["expr"] for rule in alert_rules()]:
        names = metric_names(expr)
        assert names or expr.startswith("up{"), expr
        assert names - exposed == set(), expr


# -- the alert rules ----------------------------------------------------------------
def test_the_alert_rules_are_well_formed() -> None:
    """alerts.yml has the four alerts, each with a for:, a severity and the summary and
    description an operator reads."""
    rules = alert_rules()
    assert set(ALERT_NAMES) <= {rule["alert"] for rule in rules}
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert "{{ $labels.instance }}" in rule["annotations"]["summary"]


def test_promtool_accepts_the_alert_rules() -> None:
    """promtool check rules passes alerts.yml."""
    promtool = require_binary("promtool")
    done = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each panel's PromQL, Grafana's variables filled in, parses as a recording rule."""
    promtool = require_binary("promtool")
    rules = [
        {
            "record": f"wksd:dashboard_query:{index}",
            "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*"),
        }
        for index, expr in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


#: The target labels every series of the alerts' unit tests carries.
JOB = {"instance": "host:9464", "job": "wksd"}


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    selector = ",".join(f'{key}="{value}"' for key, value in {**labels, **JOB}.items())
    return {"series": f"{name}{{{selector}}}", "values": values}


def _quiet(alertname: str, at: str) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alertname, "exp_alerts": []}


def _firing(alertname: str, at: str, summary: str, **labels: str) -> dict[str, Any]:
    """``alertname`` firing at ``at``: its labels, its summary as rendered, and its
    description with the instance filled in (the only template descriptions use)."""
    rule = next(rule for rule in alert_rules() if rule["alert"] == alertname)
    description = rule["annotations"]["description"].replace(
        "{{ $labels.instance }}", JOB["instance"]
    )
    expected = {
        "exp_labels": {**JOB, "severity": rule["labels"]["severity"], **labels},
        "exp_annotations": {"summary": summary, "description": description},
    }
    return {"eval_time": at, "alertname": alertname, "exp_alerts": [expected]}


def _unit_test(series: list[dict[str, str]], alerts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"interval": "1m", "input_series": series, "alert_rule_test": alerts}


def test_the_alerts_fire_when_they_should_and_not_on_the_default(tmp_path: Path) -> None:
    """promtool's unit tests: the embedded default stays quiet; Redis lost fires
    WksdRedisDown and WksdDegraded only after their for:; a nearly full memory and failing
    requests fire theirs, with summaries that give the figures."""
    promtool = require_binary("promtool")
    embedded = _unit_test(
        [
            _series("redis_connection_status", "0x20"),
            _series("wksd_redis_enabled", "0x20"),
            _series("wksd_backend", "1x20", backend="memory"),
            _series("wksd_memory_keys", "10x20"),
            _series("wksd_memory_max_keys", "1000x20"),
            _series("wksd_requests_total", "0+60x20", method="ping", code="OK"),
            _series("up", "1x20"),
        ],
        [_quiet(name, "20m") for name in ("WksdDown", *ALERT_NAMES)],
    )
    instance = JOB["instance"]
    redis_lost = _unit_test(
        [
            _series("redis_connection_status", "1 1 0x20"),
            _series("wksd_redis_enabled", "1x22"),
            _series("wksd_backend", "0 0 1x20", backend="memory"),
            _series("wksd_memory_keys", "10x22"),
            _series("wksd_memory_max_keys", "1000x22"),
        ],
        [
            _quiet("WksdRedisDown", "3m"),
            _firing("WksdRedisDown", "5m", f"wksd on {instance} has lost Redis"),
            _quiet("WksdDegraded", "5m"),
            _firing(
                "WksdDegraded",
                "8m",
                f"wksd on {instance} is degraded: serving from memory",
                backend="memory",
            ),
            _quiet("WksdMemoryNearBound", "20m"),
        ],
    )
    filling = _unit_test(
        [
            _series("wksd_backend", "1x30", backend="memory"),
            _series("wksd_memory_keys", "950x30"),
            _series("wksd_memory_max_keys", "1000x30"),
            _series("wksd_requests_total", "0+90x30", method="ping", code="OK"),
            _series("wksd_requests_total", "0+9x30", method="session.set", code="LOCK_HELD"),
            _series("wksd_requests_total", "0+10x30", method="session.set", code="FULL"),
        ],
        [
            _quiet("WksdMemoryNearBound", "5m"),
            _firing("WksdMemoryNearBound", "20m", f"wksd on {instance}: memory store 95% full"),
            # 10 of 109 answers a minute are FULL; LOCK_HELD is the callers' business.
            _firing("WksdErrorRate", "20m", f"wksd on {instance}: 9.174% of requests fail"),
        ],
    )
    tests = tmp_path / "alerts-test.yml"
    tests.write_text(
        json.dumps({"rule_files": [str(ALERTS)], "tests": [embedded, redis_lost, filling]})
    )
    done = subprocess.run(
        [promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
