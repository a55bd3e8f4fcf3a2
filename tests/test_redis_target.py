"""Reading where Redis is and how to log in (wksd.store.redis_target)."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from wksd.config import ConfigError, load_config, redis_target
from wksd.store.redis_target import InvalidTarget, RedisTarget

#: A CA bundle that exists on every Debian host (ca-certificates), for the
#: options that load one.
CA_FILE = "/etc/ssl/certs/ca-certificates.crt"


def target(env: dict[str, str], environ: dict[str, str] | None = None) -> RedisTarget:
    """The target the daemon would connect to with ``env`` set."""
    return redis_target(load_config([], env), environ or {})


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


def test_rediss_url_honours_every_tls_option_of_parse_url(tmp_path: Path) -> None:
    """Hostname checks, CA path, minimum version, ciphers and verify flags reach the context."""
    found = target(
        {
            "REDIS_URL": "rediss://redis.example:6380/0?ssl_check_hostname=false"
            f"&ssl_ca_path={tmp_path}&ssl_ca_certs={CA_FILE}"
            f"&ssl_min_version={ssl.TLSVersion.TLSv1_3.value}"
            "&ssl_ciphers=ECDHE%2BAESGCM"  # %2B: in a query a + is a space
            "&ssl_include_verify_flags=VERIFY_X509_STRICT"
            "&ssl_exclude_verify_flags=VERIFY_X509_TRUSTED_FIRST"
        }
    )
    context = found.tls
    assert context is not None
    assert context.check_hostname is False and context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert context.verify_flags & ssl.VerifyFlags.VERIFY_X509_STRICT
    assert not context.verify_flags & ssl.VerifyFlags.VERIFY_X509_TRUSTED_FIRST  # on by default
    tls12 = [cipher["name"] for cipher in context.get_ciphers() if cipher["protocol"] == "TLSv1.2"]
    assert tls12 and all(name.startswith("ECDHE-") and "-GCM-" in name for name in tls12)
    assert context.cert_store_stats()["x509_ca"] > 0  # ssl_ca_certs loaded


def test_ssl_cert_reqs_optional() -> None:
    """ssl_cert_reqs=optional verifies a certificate when one is shown, without the hostname."""
    found = target({"REDIS_URL": "rediss://redis.example/0?ssl_cert_reqs=optional"})
    assert found.tls is not None and found.tls.verify_mode == ssl.CERT_OPTIONAL
    assert found.tls.check_hostname is False


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
        ("REDIS_URL", "redis://localhost:6379/abc"),
        ("REDIS_URL", "redis://localhost:6379/-1"),
        ("REDIS_URL", "redis://localhost:6379/0?db=zero"),
        ("REDIS_URL", "redis://localhost:port/0"),
        ("REDIS_URL", "rediss://localhost/0?ssl_cert_reqs=bogus"),
        ("REDIS_URL", "rediss://localhost/0?ssl_check_hostname=perhaps"),
        ("REDIS_URL", "rediss://localhost/0?ssl_min_version=12"),
        ("REDIS_URL", "rediss://localhost/0?ssl_include_verify_flags=VERIFY_NOTHING"),
        ("REDIS_URL", "rediss://localhost/0?ssl_ca_certs=/nonexistent/ca.pem"),
        ("REDIS_URL", "rediss://localhost/0?ssl_ciphers=NO-SUCH-CIPHER"),
        ("REDIS_URL", "rediss://localhost/0?ssl_validate_ocsp=true"),
        ("REDIS_URL", "rediss://localhost/0?ssl_cert_req=none"),
        ("REDIS_URL", "redis://localhost/0?ssl_cert_reqs=none"),
        ("REDIS_URL", "redis://localhost/0?socket_timeout=5"),
        ("REDIS_URL", "redis+sentinel://s1:26379/master/abc"),
    ],
)
def test_unusable_urls_are_config_errors(variable: str, value: str) -> None:
    """A URL or node list that cannot be used names its variable."""
    with pytest.raises(ConfigError) as caught:
        target({variable: value})
    assert caught.value.variable == variable


def test_the_store_side_raises_its_own_error() -> None:
    """RedisTarget.from_url refuses a bad URL with InvalidTarget, which knows no setting names."""
    with pytest.raises(InvalidTarget, match="database"):
        RedisTarget.from_url("redis://localhost:6379/abc")
    assert RedisTarget.from_url("redis://h:1/2").describe() == "redis://h:1/2"


def test_url_fields_it_lacks_keep_the_defaults() -> None:
    """A URL without a port or database keeps REDIS_PORT and REDIS_DB, as before."""
    found = target({"REDIS_URL": "redis://cache.local", "REDIS_PORT": "7001", "REDIS_DB": "3"})
    assert (found.host, found.port, found.db) == ("cache.local", 7001, 3)


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
