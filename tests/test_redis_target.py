"""Reading where Redis is and how to log in (wksd.store.redis_target)."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from wksd.config import ConfigError, load_config
from wksd.store.redis_target import RedisTarget


def target(env: dict[str, str], environ: dict[str, str] | None = None) -> RedisTarget:
    return RedisTarget.from_config(load_config([], env), environ or {})


def test_host_port_db_variables() -> None:
    """Without a URL, REDIS_HOST/PORT/DB say where Redis is."""
    found = target({"REDIS_HOST": "cache.local", "REDIS_PORT": "6380", "REDIS_DB": "2"})
    assert (found.host, found.port, found.db, found.path) == ("cache.local", 6380, 2, None)


def test_redis_url_overrides_the_variables() -> None:
    """REDIS_URL wins over host/port/db, and carries user and password."""
    found = target({"REDIS_URL": "redis://app:p%40ss@10.1.2.3:7000/4", "REDIS_HOST": "other"})
    assert (found.host, found.port, found.db) == ("10.1.2.3", 7000, 4)
    assert (found.username, found.password) == ("app", "p@ss")
    assert found.tls is None


def test_unix_url() -> None:
    """unix:// names a socket path and may pick a db."""
    found = target({"REDIS_URL": "unix:///run/redis/redis.sock?db=3"})
    assert (found.path, found.db) == ("/run/redis/redis.sock", 3)


def test_rediss_url_makes_a_tls_context() -> None:
    """rediss:// connects with TLS; ssl_cert_reqs=none turns verification off."""
    strict = target({"REDIS_URL": "rediss://redis.example:6380/0"})
    assert isinstance(strict.tls, ssl.SSLContext) and strict.tls.verify_mode == ssl.CERT_REQUIRED
    loose = target({"REDIS_URL": "rediss://redis.example:6380/0?ssl_cert_reqs=none"})
    assert loose.tls is not None and loose.tls.verify_mode == ssl.CERT_NONE


def test_sentinel_url() -> None:
    """redis+sentinel://h:p,h:p/master/db names the Sentinels, the master and the db."""
    found = target({"REDIS_URL": "redis+sentinel://:pw@s1:26379,s2:26380/orders/5"})
    assert found.sentinels == (("s1", 26379), ("s2", 26380))
    assert (found.master, found.db, found.password) == ("orders", 5, "pw")


def test_sentinel_variables() -> None:
    """REDIS_SENTINELS and REDIS_SENTINEL_MASTER do the same without a URL."""
    found = target({"REDIS_SENTINELS": "a:1,b:2", "REDIS_SENTINEL_MASTER": "main"})
    assert found.sentinels == (("a", 1), ("b", 2)) and found.master == "main"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("REDIS_URL", "bogus://host"),
        ("REDIS_URL", "redis+sentinel://s1:26379"),
        ("REDIS_URL", "redis+sentinel://s1/master"),
        ("REDIS_SENTINELS", "nohost"),
    ],
)
def test_unusable_urls_are_config_errors(variable: str, value: str) -> None:
    """A URL or node list that cannot be used names its variable."""
    with pytest.raises(ConfigError) as caught:
        target({variable: value})
    assert caught.value.variable in (variable, "REDIS_URL")


def test_password_sources_in_order(tmp_path: Path) -> None:
    """The URL's password, else REDIS_PASSWORD, else the file, else the credential."""
    secret_file = tmp_path / "pw"
    secret_file.write_text("from-file\n")
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "redis-password").write_text("from-credential")
    creds = {"CREDENTIALS_DIRECTORY": str(credentials)}
    assert target({}, creds).password == "from-credential"
    assert target({"REDIS_PASSWORD_FILE": str(secret_file)}, creds).password == "from-file"
    assert (
        target(
            {"REDIS_PASSWORD": "from-env", "REDIS_PASSWORD_FILE": str(secret_file)}, creds
        ).password
        == "from-env"
    )
    assert (
        target(
            {"REDIS_URL": "redis://:from-url@h:1/0", "REDIS_PASSWORD": "from-env"}, creds
        ).password
        == "from-url"
    )
    assert target({}).password is None


def test_an_empty_password_file_means_no_password(tmp_path: Path) -> None:
    """An empty credential (as LoadCredential needs for a Redis without one) sends no AUTH."""
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "redis-password").write_text("")
    assert target({}, {"CREDENTIALS_DIRECTORY": str(credentials)}).password is None


def test_unreadable_password_file_is_a_config_error(tmp_path: Path) -> None:
    """A password file that exists but cannot be read names REDIS_PASSWORD_FILE."""
    directory = tmp_path / "dir-not-file"
    directory.mkdir()
    with pytest.raises(ConfigError, match="REDIS_PASSWORD_FILE"):
        target({"REDIS_PASSWORD_FILE": str(directory)})


def test_describe_never_shows_the_password() -> None:
    """The target as logged has no password in it."""
    for env in (
        {"REDIS_URL": "redis://:hunter2@h:1/0"},
        {"REDIS_URL": "redis+sentinel://:hunter2@s:1/m"},
        {"REDIS_PASSWORD": "hunter2"},
    ):
        found = target(env)
        assert "hunter2" not in found.describe() and "hunter2" not in repr(found)


def test_bad_redis_url_stops_the_daemon_with_78() -> None:
    """`wksd` with an unusable REDIS_URL exits 78 with one line naming it."""
    done = subprocess.run(
        [sys.executable, "-m", "wksd"],
        env={**os.environ, "REDIS_ENABLED": "1", "REDIS_URL": "bogus://x"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 78
    assert "REDIS_URL" in done.stderr and done.stderr.count("\n") == 1
