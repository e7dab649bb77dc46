"""The compose file and .env, checked without a Docker engine (contract 4)."""

from __future__ import annotations

import configparser
import re
from pathlib import Path
from typing import Any, Dict

import yaml

from lbsvc.backends import servers as servers_config

ROOT = Path(__file__).resolve().parent.parent


def env_file() -> Dict[str, str]:
    values = {}
    for line in (ROOT / ".env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


def compose() -> Dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def expand(value: str, env: Dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], value)


def test_every_variable_is_defined_in_env() -> None:
    env = env_file()
    used = set(re.findall(r"\$\{(\w+)\}", (ROOT / "docker-compose.yml").read_text()))
    assert used and used <= set(env), used - set(env)
    launcher = (ROOT / "scripts" / "run").read_text()
    for name in re.findall(r"\$\{?((?:GRADESVC|LBSVC|RABBITMQ)_\w+)", launcher):
        if name not in ("GRADESVC_AMQP_URL", "GRADESVC_REPLICA_ID", "GRADESVC_PEERS",
                        "GRADESVC_GET_ENDPOINT", "GRADESVC_SET_ENDPOINT"):
            assert name in env, name


def test_services_ports_health_and_order() -> None:
    env = env_file()
    services = compose()["services"]
    default = {name for name, service in services.items() if "profiles" not in service}
    assert default == {"rabbitmq", "gradesvc-a", "gradesvc-b", "gradesvc-c", "lbsvc"}  # one command
    host_ports = []
    for name, service in services.items():
        assert "healthcheck" in service and service["healthcheck"]["test"], name
        for mapping in service.get("ports", []):
            host_ports.append(expand(mapping, env).rsplit(":", 1)[0].split(":")[-1])
        for dependency in service.get("depends_on", {}).values():
            assert dependency == {"condition": "service_healthy"}, name
    assert len(host_ports) == len(set(host_ports)), host_ports
    a = services["gradesvc-a"]
    assert [expand(p, env) for p in a["ports"]] == ["8070:8070", "8071:8071"]
    assert expand(services["lbsvc"]["ports"][0], env) == "8080:8080"
    assert set(services["lbsvc"]["depends_on"]) == {"gradesvc-a", "gradesvc-b", "gradesvc-c"}


def test_the_broker_offers_the_stream_protocol_and_the_replicas_use_it_when_offered() -> None:
    services = compose()["services"]
    assert "rabbitmq-plugins enable --offline rabbitmq_stream" in " ".join(services["rabbitmq"]["command"])
    assert "exec docker-entrypoint.sh rabbitmq-server" in services["rabbitmq"]["command"][-1]
    for name in ("gradesvc-a", "gradesvc-b", "gradesvc-c"):
        assert expand(services[name]["environment"]["GRADESVC_STREAM_PROTOCOL"], env_file()) == "auto", name


def test_images_are_pinned() -> None:
    env = env_file()
    for name, service in compose()["services"].items():
        image = expand(service["image"], env)
        assert re.search(r":\d+\.\d+", image), (name, image)  # PostgreSQL's releases are major.minor
    assert re.search(r":\d+\.\d+\.\d+", env["PYTHON_IMAGE"])


def test_replicas_agree_on_stream_and_peers() -> None:
    services = compose()["services"]
    replicas = {n: s for n, s in services.items() if n.startswith("gradesvc-")}
    streams = {s["environment"]["GRADESVC_STREAM"] for s in replicas.values()}
    urls = {s["environment"]["GRADESVC_AMQP_URL"] for s in replicas.values()}
    assert streams == {"${GRADESVC_STREAM}"} and len(urls) == 1
    ids = [s["environment"]["GRADESVC_REPLICA_ID"] for s in replicas.values()]
    assert len(set(ids)) == 3
    for name, service in replicas.items():
        peers = set(service["environment"]["GRADESVC_PEERS"].split(","))
        assert peers == {f"http://{other}:8070" for other in replicas if other != name}
        assert service["command"] == ["gradesvc"]
        assert "8070/ready" in " ".join(service["healthcheck"]["test"])


def test_lbsvc_servers_point_at_replica_read_ports() -> None:
    parsed = servers_config.load(str(ROOT / "docker" / "servers.yaml"))
    assert parsed.health_check.path == "/ready"
    assert {s.url for s in parsed.servers} == {f"http://gradesvc-{x}:8070" for x in "abc"}
    local = servers_config.load(str(ROOT / "servers.yaml"))
    assert len(local.servers) == 3
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "docker/servers.yaml /app/servers.yaml" in dockerfile
    assert compose()["services"]["lbsvc"]["environment"]["LBSVC_SERVERS"] == "/app/servers.yaml"


def test_each_replica_keeps_its_checkpoint_on_a_volume_of_its_own() -> None:
    stack = compose()
    volumes = {}
    for name in ("gradesvc-a", "gradesvc-b", "gradesvc-c"):
        service = stack["services"][name]
        assert service["environment"]["GRADESVC_DATA_DIR"] == "/data"
        mounts = [v for v in service.get("volumes", []) if v.endswith(":/data")]
        assert len(mounts) == 1, name
        volumes[name] = mounts[0].split(":")[0]
        assert volumes[name] in stack["volumes"]
    assert len(set(volumes.values())) == 3
    run = (ROOT / "scripts" / "run").read_text()
    assert 'GRADESVC_DATA_DIR="$RUN_DIR/gradesvc-$id"' in run


def test_cluster_profile_shares_users_and_buckets() -> None:
    env = env_file()
    services = compose()["services"]
    cluster = {name for name, service in services.items() if service.get("profiles") == ["cluster"]}
    assert cluster == {"postgres", "redis", "lbsvc-1", "lbsvc-2"}
    gateways = [services["lbsvc-1"], services["lbsvc-2"]]
    for gateway in gateways:
        environment = {k: expand(v, env) for k, v in gateway["environment"].items()}
        assert environment["LBSVC_DATABASE"].startswith("postgresql://") and "@postgres:5432/" in environment["LBSVC_DATABASE"]
        assert environment["LBSVC_BUCKETS"] == "redis://redis:6379/0"
        assert int(environment["LBSVC_WORKERS"]) >= 1
        assert environment["LBSVC_BUCKET_STORE_FALLBACK"] in ("local", "deny")
        assert {"postgres", "redis"} <= set(gateway["depends_on"])
    assert gateways[0]["environment"] == gateways[1]["environment"]  # one user table, one budget
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert "postgres-data" in compose()["volumes"]


def test_the_commented_tls_example_names_real_services_and_real_file_variables() -> None:
    from gradesvc.config import OPTIONS as GRADESVC
    from lbsvc.settings import OPTIONS as LBSVC

    text = (ROOT / "docker-compose.yml").read_text()
    block = text[text.index("# TLS-BEGIN\n") + len("# TLS-BEGIN\n"):text.index("# TLS-END")]
    example = yaml.safe_load("\n".join(line[2:] for line in block.splitlines()))
    services = compose()["services"]
    assert set(example["services"]) <= set(services)
    secret_files = {f"{o.variable}_FILE" for o in (*GRADESVC, *LBSVC) if o.secret}
    known = {o.variable for o in (*GRADESVC, *LBSVC)} | secret_files
    for name, service in example["services"].items():
        for variable, value in service.get("environment", {}).items():
            assert variable in known, (name, variable)
            if variable in secret_files:
                assert value.startswith("/run/secrets/") and value.rsplit("/", 1)[1] in example["secrets"]
        for volume in service.get("volumes", []):
            assert (ROOT / volume.split(":")[0]).exists() or volume.startswith("./tls:"), volume


def test_the_image_holds_every_package_and_pypy_gets_its_nursery() -> None:
    """Every package ``setup.cfg`` installs is copied into the image (txrabbitstream once was not: the build
    failed); the runtimes' fast path is the default wherever lbsvc is started."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    packages = {line.strip().split(".")[0] for line in setup["options"]["packages"].splitlines() if line.strip()}
    assert packages >= {"svckit", "txrabbitstream", "gradesvc", "lbsvc", "twisted"}, packages
    packages = (packages - {"twisted"}) | {"twistd_plugins"}  # twisted.plugins is installed from twistd_plugins
    for package in packages:
        assert f"COPY {package} ./{package}" in dockerfile, package
    assert "ENV PYPY_GC_NURSERY=16M" in dockerfile
    assert compose()["services"]["lbsvc"]["environment"]["PYPY_GC_NURSERY"] == "16M"
    assert "PYPY_GC_NURSERY=${PYPY_GC_NURSERY:-16M}" in (ROOT / "scripts" / "run").read_text()
