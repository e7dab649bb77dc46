"""The command lines of both daemons: environment variables, precedence, validation."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest
from twisted.python import usage

from gradesvc import tap as gradesvc_tap
from lbsvc import tap as lbsvc_tap
from lbsvc.users.database import StorageUnavailable
from lbsvc.users.sqlite import SQLiteDatabase

CREDENTIALS = {"GRADESVC_ADMIN_USER": "admin", "GRADESVC_ADMIN_PASSWORD": "pw"}


def grades(args: List[str], env: Dict[str, str]) -> gradesvc_tap.Options:
    options = gradesvc_tap.Options(environ=env)
    options.parseOptions(args)
    return options


def test_gradesvc_defaults_come_from_the_contract() -> None:
    config = grades([], CREDENTIALS).config
    assert (config.get_endpoint, config.set_endpoint) == ("tcp:8070", "tcp:8071")
    assert config.amqp_url == "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert (config.stream, config.peers, config.access_log) == ("user_grades", (), "-")
    assert config.access_log_format == "combined"
    assert config.replica_id and config.peer_idle_timeout == 30.0
    assert "pw" not in repr(config)


def test_gradesvc_environment_then_command_line() -> None:
    env = {**CREDENTIALS, "GRADESVC_GET_ENDPOINT": "9000", "GRADESVC_STREAM": "s1",
           "GRADESVC_PEERS": "http://a:1/, http://b:2", "GRADESVC_REPLICA_ID": "r9"}
    config = grades(["--stream", "s2"], env).config
    assert config.get_endpoint == "tcp:9000"
    assert config.stream == "s2"
    assert config.peers == ("http://a:1", "http://b:2")
    assert config.replica_id == "r9"
    assert grades([], {**CREDENTIALS, "GRADESVC_ACCESS_LOG_FORMAT": "JSON"}).config.access_log_format == "json"


@pytest.mark.parametrize("args, env, message", [
    ([], {}, "credentials"),
    ([], {"GRADESVC_ADMIN_USER": "admin"}, "credentials"),
    (["--amqp-url", "http://x"], CREDENTIALS, "amqp://"),
    (["--amqp-url", "amqps://h:5671/%2F?cacertfile=/nonexistent.pem"], CREDENTIALS, "cannot read /nonexistent.pem"),
    (["--amqp-url", "amqps://h:5671/%2F?verify=verify_none"], CREDENTIALS, "always verified"),
    (["--amqp-url", "amqp://h:5672/%2F?cacertfile=/ca.pem"], CREDENTIALS, "need amqps://"),
    (["--amqp-url", "amqps://h:1/%2F?certfile=/c.pem"], CREDENTIALS, "both its certificate file and its key file"),
    (["--amqp-url", "amqp://h:1/%2F,amqps://h:2/%2F"], CREDENTIALS, "mixes amqp:// and amqps://"),
    (["--stream-protocol", "stream", "--amqp-url", "amqps://h:5673/%2F"], CREDENTIALS, "name its stream port"),
    (["--amqp-url", "amqp://h:1/%2F?stream_port=x"], CREDENTIALS, "stream_port must be a port number"),
    (["--stream-protocol", "carrier-pigeon"], CREDENTIALS, "auto, stream, amqp"),
    (["--stream-protocol", "stream", "--amqp-url", "amqp://h:5673/%2F"], CREDENTIALS, "name its stream port"),
    (["--stream", ""], CREDENTIALS, "stream"),
    (["--peers", "ftp://x"], CREDENTIALS, "peer"),
    (["--peer-idle-timeout", "0"], CREDENTIALS, "greater than 0"),
    (["--peer-idle-timeout", "inf"], CREDENTIALS, "finite"),
    (["--peer-idle-timeout", "soon"], CREDENTIALS, "number"),
    (["--get-endpoint", " "], CREDENTIALS, "empty"),
    (["--access-log", ""], CREDENTIALS, "access-log"),
    (["--access-log-format", "xml"], CREDENTIALS, "combined or json"),
])
def test_gradesvc_refuses_bad_options(args: List[str], env: Dict[str, str], message: str) -> None:
    with pytest.raises(usage.UsageError, match=message):
        grades(args, env)


def servers_file(tmp_path: Path) -> str:
    path = tmp_path / "servers.yaml"
    path.write_text('servers:\n  - {name: a, url: "http://127.0.0.1:1"}\n')
    return str(path)


def gateway(args: List[str], env: Dict[str, str]) -> lbsvc_tap.Options:
    options = lbsvc_tap.Options(environ=env)
    options.parseOptions(args)
    return options


def test_lbsvc_options(tmp_path: Path) -> None:
    env = {"LBSVC_SERVERS": servers_file(tmp_path), "LBSVC_MAX_BODY": "1000", "LBSVC_ENDPOINT": "8081"}
    settings = gateway(["--database", "x.sqlite3"], env).settings
    assert (settings.endpoint, settings.max_body, settings.database) == ("tcp:8081", 1000, "x.sqlite3")
    assert settings.admin_endpoint == "tcp:8079:interface=127.0.0.1"
    assert [s.name for s in settings.servers.servers] == ["a"]
    assert settings.access_log_format == "combined"
    assert gateway(["--access-log-format", "json"], env).settings.access_log_format == "json"


@pytest.mark.parametrize("args, message", [
    (["--servers", "/nonexistent/servers.yaml"], "cannot read"),
    (["--max-body", "lots"], "max-body"),
    (["--max-body", "-1"], "max-body"),
    (["--database", ""], "database"),
    (["--access-log-format", "clf"], "combined or json"),
])
def test_lbsvc_refuses_bad_options(tmp_path: Path, args: List[str], message: str) -> None:
    with pytest.raises(usage.UsageError, match=message):
        gateway(args, {"LBSVC_SERVERS": servers_file(tmp_path)})


def test_a_database_that_cannot_be_opened_stops_lbsvc_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(StorageUnavailable, match="cannot open the user database"):
        SQLiteDatabase(str(tmp_path / "missing-dir" / "users.sqlite3")).check()
    options = gateway(["--database", str(tmp_path / "missing-dir" / "users.sqlite3")],
                      {"LBSVC_SERVERS": servers_file(tmp_path)})
    with pytest.raises(SystemExit) as exit:
        lbsvc_tap.makeService(options)
    message = str(exit.value.code)
    assert message.startswith("lbsvc: cannot open the user database") and "\n" not in message


def test_workers_with_memory_buckets_are_refused(tmp_path: Path) -> None:
    env = {"LBSVC_SERVERS": servers_file(tmp_path)}
    with pytest.raises(usage.UsageError, match="limits would multiply by 2"):
        gateway(["--workers", "2"], env)
    for bad in (["--buckets", "http://x"], ["--bucket-store-fallback", "maybe"], ["--redis-timeout", "0"],
                ["--workers", "0"], ["--workers", "two"]):
        with pytest.raises(usage.UsageError):
            gateway(bad, env)
    settings = gateway(["--workers", "2", "--buckets", "redis://127.0.0.1:6379/3"], env).settings
    assert (settings.workers, settings.buckets, settings.bucket_store_fallback, settings.redis_timeout) == \
        (2, "redis://127.0.0.1:6379/3", "local", 0.05)


# --- secrets from files ------------------------------------------------------------------------------------


def secret_file(tmp_path: Path, name: str, content: str) -> str:
    path = tmp_path / name
    path.write_text(content)
    return str(path)


def test_a_secret_comes_from_a_file_named_on_the_command_line_or_in_the_environment(tmp_path: Path) -> None:
    password = secret_file(tmp_path, "password", "s3cret\n")
    url = secret_file(tmp_path, "url", "amqp://app:p%40ss@broker:5672/%2F\r\n\n")
    typed = grades(["--admin-user", "admin", "--admin-password-file", password, "--amqp-url-file", url], {})
    assert typed.config.admin_password == "s3cret"  # the trailing newline dropped, nothing else
    assert typed.config.amqp_url == "amqp://app:p%40ss@broker:5672/%2F"
    from_env = grades([], {"GRADESVC_ADMIN_USER": "admin", "GRADESVC_ADMIN_PASSWORD_FILE": password}).config
    assert from_env.admin_password == "s3cret"
    database = secret_file(tmp_path, "db", "postgresql://u:pw@db:5432/users\n")
    settings = gateway([], {"LBSVC_SERVERS": servers_file(tmp_path), "LBSVC_DATABASE_FILE": database,
                            "LBSVC_BUCKETS_FILE": secret_file(tmp_path, "redis", "redis://:pw@r:6379/0")}).settings
    assert (settings.database, settings.buckets) == ("postgresql://u:pw@db:5432/users", "redis://:pw@r:6379/0")
    assert "GRADESVC_ADMIN_PASSWORD_FILE" in str(grades([], CREDENTIALS))  # --help names the variable


def test_the_command_line_beats_the_environment_and_one_level_may_not_give_both(tmp_path: Path) -> None:
    password = secret_file(tmp_path, "password", "from-file")
    env = {"GRADESVC_ADMIN_USER": "admin", "GRADESVC_ADMIN_PASSWORD_FILE": password}
    assert grades(["--admin-password", "typed"], env).config.admin_password == "typed"
    assert grades(["--admin-password-file", password], {**CREDENTIALS}).config.admin_password == "from-file"
    with pytest.raises(usage.UsageError, match="give --admin-password or --admin-password-file, not both"):
        grades(["--admin-password", "x", "--admin-password-file", password], CREDENTIALS)
    with pytest.raises(usage.UsageError, match="set GRADESVC_ADMIN_PASSWORD or GRADESVC_ADMIN_PASSWORD_FILE"):
        grades([], {**env, "GRADESVC_ADMIN_PASSWORD": "pw"})


@pytest.mark.parametrize("content", [None, b"\xff\xfe not text"])
def test_a_secret_file_that_cannot_be_read_stops_the_daemon_with_one_line(tmp_path: Path,
                                                                         content: bytes | None) -> None:
    path = tmp_path / "password"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(usage.UsageError) as refused:
        grades(["--admin-user", "a", "--admin-password-file", str(path)], {})
    message = str(refused.value)
    assert message.startswith(f"--admin-password-file {path}: cannot be read") and "\n" not in message


def test_a_refused_secret_is_not_echoed(tmp_path: Path) -> None:
    url = secret_file(tmp_path, "redis", "http://:hunter2@r:6379/0")
    with pytest.raises(usage.UsageError) as refused:
        gateway([], {"LBSVC_SERVERS": servers_file(tmp_path), "LBSVC_BUCKETS_FILE": url})
    assert "hunter2" not in str(refused.value) and "--buckets" in str(refused.value)


def test_worker_command_lines_repeat_only_what_was_typed_and_a_secret_file_as_a_file(tmp_path: Path) -> None:
    database = secret_file(tmp_path, "db", "postgresql://u:pw@db:5432/users")
    env = {"LBSVC_SERVERS": servers_file(tmp_path), "LBSVC_BUCKETS": "redis://:pw@r:6379/0", "LBSVC_WORKERS": "2"}
    options = gateway(["--database-file", database, "--max-body", "10"], env)
    assert options.argv() == [f"--database-file={database}", "--max-body=10"]
    assert "pw" not in " ".join(options.argv())


def test_lease_length_is_zero_or_half_a_second_to_a_minute(tmp_path: Path) -> None:
    env = {"LBSVC_SERVERS": servers_file(tmp_path)}
    assert gateway([], env).settings.lease_length == 2.0  # the default: leases on
    for good, seconds in (("0", 0.0), ("0.5", 0.5), ("60", 60.0)):
        assert gateway(["--lease-length", good], env).settings.lease_length == seconds
    for bad in ("0.4", "60.1", "-1", "nan", "inf", "two", ""):
        with pytest.raises(usage.UsageError):
            gateway(["--lease-length", bad], env)
