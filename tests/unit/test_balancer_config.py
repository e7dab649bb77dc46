"""Balancers, health thresholds and servers.yaml validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from lbsvc import config
from lbsvc.backends import BackendPool
from lbsvc.balancer import Backend, IBalancer, LeastConnections, RoundRobin
from lbsvc.healthcheck import HealthChecker

GOOD = {
    "algorithm": "round_robin",
    "health_check": {"path": "/ready", "interval": 1.0, "timeout": 0.5, "fall": 2, "rise": 2},
    "servers": [{"name": "a", "url": "http://127.0.0.1:1"}, {"name": "b", "url": "http://127.0.0.1:2/"}],
}


def test_balancers_provide_the_interface() -> None:
    for balancer in (RoundRobin(), LeastConnections()):
        assert verifyObject(IBalancer, balancer)


def test_round_robin_skips_unhealthy_and_excluded() -> None:
    a, b, c = Backend("a", "u"), Backend("b", "u"), Backend("c", "u")
    rr = RoundRobin()
    assert [rr.choose([a, b, c], ()).name for _ in range(4)] == ["a", "b", "c", "a"]
    b.healthy = False
    assert [rr.choose([a, b, c], ()).name for _ in range(3)] == ["c", "a", "c"]
    assert rr.choose([a, b, c], [a, c]) is None


def test_least_connections() -> None:
    a, b = Backend("a", "u", in_flight=3), Backend("b", "u", in_flight=1)
    lc = LeastConnections()
    assert lc.choose([a, b], ()).name == "b"
    b.healthy = False
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
        ({"servers": [{"name": "a", "url": "ftp://x"}]}, "http:// URL"),
        ({"servers": [{"name": "a", "url": "https://x"}]}, "no TLS to backends"),
        ({"servers": [{"name": "a", "url": "http://x/prefix"}]}, "must be http://host"),
        ({"pool_size": -1}, "pool_size"),
        ({"pool_size": True}, "pool_size"),
        ({"servers": [{"name": "a", "url": "http://x:99999"}]}, "bad port"),
        ({"servers": [{"name": "a", "url": "http://x"}, {"name": "a", "url": "http://y"}]}, "duplicate server name"),
        ({"health_check": {"interval": 0}}, "interval"),
        ({"health_check": {"path": "ready"}}, "start with /"),
        ({"surprise": 1}, "unknown key"),
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
    pool = BackendPool(config.parse(GOOD))
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
