"""Balancers, health thresholds and servers.yaml validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from lbsvc.backends import servers as config
from lbsvc.backends.backend import Backend
from lbsvc.backends.balancer import IBalancer, LeastConnections, RoundRobin
from lbsvc.backends.healthcheck import HealthChecker
from lbsvc.backends.pool import BackendPool

GOOD = {
    "algorithm": "round_robin",
    "health_check": {"path": "/ready", "interval": 1.0, "timeout": 0.5, "fall": 2, "rise": 2},
    "servers": [{"name": "a", "url": "http://127.0.0.1:1"}, {"name": "b", "url": "http://127.0.0.1:2/"}],
}


TEST_CA = (
    b"-----BEGIN CERTIFICATE-----\n"
    b"MIIBkTCCATegAwIBAgIUIroL/XV9ZAWHUgztvmNUQTx6eEYwCgYIKoZIzj0EAwIw\n"
    b"HTEbMBkGA1UEAwwSbGJzdmMgdW5pdCB0ZXN0IENBMCAXDTI2MTIwNDE1NTYyNVoY\n"
    b"DzIxMjYxMTEwMTU1NjI1WjAdMRswGQYDVQQDDBJsYnN2YyB1bml0IHRlc3QgQ0Ew\n"
    b"WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAS7iNyMNTUFP7/z1yhMSIPsrOvgqilO\n"
    b"Ltm8ux9eH7p3tMi7uaZIq0DEHACsbTHNGBLV3hTzc1T388AZoYYXrP7Eo1MwUTAd\n"
    b"BgNVHQ4EFgQUp6zKmn2GYNXjoQCHj+DAA2MOWgcwHwYDVR0jBBgwFoAUp6zKmn2G\n"
    b"YNXjoQCHj+DAA2MOWgcwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBF\n"
    b"AiAI46l3sexaNtfQ5kuhOuT0xqoHRtgFqkMAFW5ir8awqAIhAImX9xbdmrcg+WmM\n"
    b"e/2qyeA41l9QcLiWxXe91TaE9vvl\n"
    b"-----END CERTIFICATE-----\n"
)
"""A self-signed certificate (its key thrown away): something that loads as a CA file."""


def test_balancers_provide_the_interface() -> None:
    for balancer in (RoundRobin(), LeastConnections()):
        assert verifyObject(IBalancer, balancer)


def test_round_robin_skips_unavailable_and_excluded() -> None:
    a, b, c = Backend("a", "u"), Backend("b", "u"), Backend("c", "u")
    rr = RoundRobin()
    assert [rr.choose([a, b, c], ()).name for _ in range(4)] == ["a", "b", "c", "a"]
    b.available = False
    assert [rr.choose([a, b, c], ()).name for _ in range(3)] == ["c", "a", "c"]
    assert rr.choose([a, b, c], [a, c]) is None


def test_least_connections() -> None:
    a, b = Backend("a", "u", in_flight=3), Backend("b", "u", in_flight=1)
    lc = LeastConnections()
    assert lc.choose([a, b], ()).name == "b"
    b.available = False
    assert lc.choose([a, b], ()).name == "a"


def test_config_parses_and_strips_slash() -> None:
    parsed = config.parse(GOOD)
    assert parsed.servers[1].url == "http://127.0.0.1:2"
    assert parsed.health_check.rise == 2


@pytest.mark.parametrize(
    "change, message",
    [
        ({"algorithm": "random"}, "unknown algorithm"),
        ({"servers": []}, "non-empty list"),
        ({"servers": [{"name": "a", "url": "ftp://x"}]}, "http:// or https:// URL"),
        ({"servers": [{"name": "a", "url": "http://x", "ca_file": "ca.pem"}]}, "for https:// backends only"),
        ({"servers": [{"name": "a", "url": "https://x", "ca_file": 3}]}, "must be a file path"),
        ({"servers": [{"name": "a", "url": "https://x", "ca_file": "/nonexistent/ca.pem"}]}, "cannot read"),
        ({"servers": [{"name": "a", "url": "http://x/prefix"}]}, "must be http(s)://host"),
        ({"pool_size": -1}, "pool_size"),
        ({"pool_size": True}, "pool_size"),
        ({"servers": [{"name": "a", "url": "http://x:99999"}]}, "bad port"),
        ({"servers": [{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}]}, "duplicate server name"),
        ({"health_check": {"interval": 0}}, "interval"),
        ({"health_check": {"path": "ready"}}, "start with /"),
        ({"surprise": 1}, "unknown key"),
        ({"panic_threshold": 1.5}, "panic_threshold"),
        ({"panic_threshold": True}, "panic_threshold"),
        ({"ejection": {"base": 30, "max": 10}}, "must not be below"),
        ({"ejection": {"base": -1}}, "base"),
        ({"ejection": {"forever": 1}}, "unknown ejection key"),
    ],
)
def test_config_errors(change: dict, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.parse({**GOOD, **change})


def test_load_reports_file_problems(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("servers: [")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(str(bad))


def test_health_thresholds_and_reload_keeps_state() -> None:
    pool = BackendPool(config.parse(GOOD), Clock())
    answers = {"http://127.0.0.1:1/ready": 503, "http://127.0.0.1:2/ready": 200}
    clock = Clock()
    checker = HealthChecker(pool, lambda url, timeout: defer.succeed(answers[url]), clock)
    checker.start()  # first round now
    a, b = pool.backends
    assert a.healthy  # one failure < fall=2
    clock.advance(1.0)
    assert not a.healthy and b.healthy
    answers["http://127.0.0.1:1/ready"] = 200
    clock.advance(1.0)
    assert not a.healthy  # one success < rise=2
    clock.advance(1.0)
    assert a.healthy
    pool.connect_failed(a)
    assert not a.healthy and pool.choose().name == "b"
    pool.apply(config.parse({**GOOD, "servers": GOOD["servers"] + [{"name": "c", "url": "http://127.0.0.1:3"}]}))
    assert pool.backends[0] is a and not a.healthy and [x.name for x in pool.backends] == ["a", "b", "c"]
    checker.stop()


def test_timeouts_are_configured_finite_and_upstream_timeout_still_reads() -> None:
    parsed = config.parse({**GOOD, "timeouts": {"connect": 1.5, "response": 7, "body": 3}})
    assert parsed.timeouts == config.Timeouts(connect=1.5, response=7.0, body=3.0)
    assert config.parse({**GOOD, "upstream_timeout": 12}).timeouts.response == 12.0
    assert config.parse(GOOD).timeouts == config.Timeouts()
    for bad in ({"connect": float("inf")}, {"response": float("nan")}, {"body": 0}, {"idle": 1}, {"response": "1"}):
        with pytest.raises(config.ConfigError):
            config.parse({**GOOD, "timeouts": bad})


THREE = {**GOOD, "servers": [{"name": n, "url": f"http://127.0.0.1:{i}"} for i, n in enumerate("abc", 1)],
         "ejection": {"base": 10, "max": 25}}


def test_a_passive_failure_ejects_for_a_growing_time_whatever_the_checks_say() -> None:
    clock = Clock()
    pool = BackendPool(config.parse(THREE), clock)
    check = pool.config.health_check
    a = pool.backends[0]
    pool.connect_failed(a)
    assert a.ejected_until == 10 and not a.available
    for _ in range(5):  # /health keeps passing, as a backend that answers nothing else does
        clock.advance(1)
        pool.record_check(a, True, check)
    assert not a.healthy
    clock.advance(5)
    pool.record_check(a, True, check)
    assert a.healthy and a.available  # its time is served
    pool.connect_failed(a)  # again soon after: twice as long
    assert a.ejected_until == clock.seconds() + 20
    clock.advance(20)
    pool.record_check(a, True, check)
    pool.connect_failed(a)  # a third time: capped at max
    assert a.ejected_until == clock.seconds() + 25 and a.ejections == 3
    clock.advance(25 + 26)
    pool.record_check(a, True, check)
    pool.connect_failed(a)  # long in service since: a first offence again
    assert a.ejections == 1 and a.ejected_until == clock.seconds() + 10


def test_under_the_panic_threshold_every_backend_is_in_rotation() -> None:
    clock = Clock()
    pool = BackendPool(config.parse(THREE), clock)
    a, b, c = pool.backends
    pool.connect_failed(a)  # two of three healthy: no panic
    assert not pool.panicking and {pool.choose().name for _ in range(4)} == {"b", "c"}
    pool.connect_failed(b)  # one of three healthy (33% < 50%): panic
    assert pool.panicking and {pool.choose().name for _ in range(6)} == {"a", "b", "c"}
    assert pool.choose([a, b, c]) is None  # a request still tries each at most once
    clock.advance(10)
    pool.record_check(a, True, pool.config.health_check)
    pool.record_check(a, True, pool.config.health_check)
    assert a.healthy and not pool.panicking and {pool.choose().name for _ in range(4)} == {"a", "c"}


def test_a_lone_backend_marked_down_still_gets_requests_and_zero_disables_panic() -> None:
    lone = {**GOOD, "servers": [{"name": "only", "url": "http://127.0.0.1:1"}]}
    pool = BackendPool(config.parse(lone), Clock())
    pool.connect_failed(pool.backends[0])
    assert pool.panicking and pool.choose() is pool.backends[0]
    strict = BackendPool(config.parse({**lone, "panic_threshold": 0}), Clock())
    strict.connect_failed(strict.backends[0])
    assert not strict.panicking and strict.choose() is None


def test_https_backends_and_their_ca_file_relative_to_servers_yaml(tmp_path: Path) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_text("not a certificate")
    (tmp_path / "servers.yaml").write_text(
        "servers:\n  - {name: a, url: 'https://a.internal', ca_file: ca.pem}\n  - {name: b, url: 'https://b:8443'}\n")
    with pytest.raises(config.ConfigError, match="holds no PEM certificate"):
        config.load(str(tmp_path / "servers.yaml"))
    pem.write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    with pytest.raises(config.ConfigError, match="does not load"):
        config.load(str(tmp_path / "servers.yaml"))
    pem.write_bytes(TEST_CA)
    parsed = config.load(str(tmp_path / "servers.yaml"))
    assert parsed.servers[0].ca_file == str(pem) and parsed.servers[1].ca_file is None
    pool = BackendPool(parsed, Clock())
    a, b = pool.backends
    assert (a.scheme, a.host, a.port, b.port) == (b"https", b"a.internal", 443, 8443)
    assert pool.ca_file_of(b"a.internal", 443) == str(pem) and pool.ca_file_of(b"b", 8443) is None
