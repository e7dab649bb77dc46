"""scripts/run, without a terminal, driven with the contract appendix's curl lines."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Dict, Iterator

import pytest

from harness.broker import delete_stream, unique_stream
from harness.net import free_port, wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Dict[str, str]]:
    ports = {name: str(free_port()) for name in (
        "GRADESVC_A_GET_PORT", "GRADESVC_A_SET_PORT", "GRADESVC_B_GET_PORT", "GRADESVC_B_SET_PORT",
        "GRADESVC_C_GET_PORT", "GRADESVC_C_SET_PORT", "LBSVC_PORT", "LBSVC_ADMIN_PORT")}
    env = {**os.environ, **ports, "GRADESVC_STREAM": unique_stream(), "RUN_DIR": str(tmp_path)}
    output = open(tmp_path / "launcher.out", "wb")
    process = subprocess.Popen([str(ROOT / "scripts" / "run")], env=env, stdin=subprocess.DEVNULL,
                               stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    text = lambda: (tmp_path / "launcher.out").read_text()  # noqa: E731
    try:
        wait_until(lambda: process.poll() is None and "All up" in text() or (process.poll() is not None and pytest.fail(text())),
                   180, "the launcher to start everything")
        yield {**ports, "out": str(tmp_path / "launcher.out"), "dir": str(tmp_path)}
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(30)  # the launcher's own grace is 15 s by the clock, then it kills
        except subprocess.TimeoutExpired:
            logs = {p.name: p.read_text(errors="replace")[-1500:] for p in Path(tmp_path).glob("*.log")}
            pytest.fail(f"scripts/run still running 30 s after SIGINT:\n{text()}\n{logs}")
        assert code == 0, text()  # a clean stop, not "a process exited"
        assert "stopped" in text() and "a process exited" not in text() and "did not stop" not in text()
        pids = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
        assert pids == [], "daemons left running"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        output.close()
        delete_stream(env["GRADESVC_STREAM"])


def curl(command: str, ports: Dict[str, str], cwd: str) -> str:
    """Run one appendix line with the test's ports in place of the defaults."""
    for default, name in (("8070", "GRADESVC_A_GET_PORT"), ("8071", "GRADESVC_A_SET_PORT"), ("8080", "LBSVC_PORT")):
        command = command.replace(f"localhost:{default}", f"localhost:{ports[name]}")
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True, cwd=cwd).stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is needed to run the README's lines")
def test_appendix_examples_through_the_launcher(stack: Dict[str, str]) -> None:
    cwd = stack["dir"]
    printed = Path(stack["out"]).read_text()
    assert f"localhost:{stack['LBSVC_PORT']}/user/create" in printed
    out = curl("""curl -X POST localhost:8071/set --user admin:admin -H "Content-Type: application/json" \\
  -d '{ "user_id": "1", "postpaid_limit": 254, "spp": 2321, "shipping_fee": 20, "return_fee": 29 }'""", stack, cwd)
    assert json.loads(out) == {"Result": "OK"}
    out = curl('curl -X GET "localhost:8070/get?user_id=1"', stack, cwd)
    grade = {"user_id": "1", "postpaid_limit": 254, "spp": 2321, "shipping_fee": 20, "return_fee": 29}
    assert json.loads(out) == {"Result": grade}
    curl("curl -o backup.csv.gz localhost:8070/backup", stack, cwd)
    first = gzip.decompress((Path(cwd) / "backup.csv.gz").read_bytes()).decode().split("\n")[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first)
    created = json.loads(curl("""curl -X POST localhost:8080/user/create -d '{"name": "user1"}'""", stack, cwd))
    key = created.pop("api_key")
    assert created == {"name": "user1", "capacity": 5, "rate_per_sec": 1}
    profile = json.loads(curl(f'curl localhost:8080/user/tokens/profile -H "Authorization: {key}"', stack, cwd))
    assert profile == {"name": "user1", "capacity": 5, "rate_per_sec": 1, "current_capacity": 5}
    changed = json.loads(curl(f"""curl -X POST localhost:8080/user/tokens/change -H "Authorization: {key}" \\
  -d '{{"capacity": 10, "rate_per_sec": 2}}'""", stack, cwd))
    assert changed == {"name": "user1", "capacity": 10, "rate_per_sec": 2, "current_capacity": 5}
    answers = {curl(f'curl localhost:8080/ -H "Authorization: {key}"', stack, cwd) for _ in range(3)}
    assert answers == {"Server a answer", "Server b answer", "Server c answer"}
    # The two URLs the launcher prints to see everything at a glance: all three replicas, all three backends.
    assert f"http://127.0.0.1:{stack['GRADESVC_A_GET_PORT']}/status" in printed
    assert f"http://127.0.0.1:{stack['LBSVC_ADMIN_PORT']}/status" in printed
    replicas = json.loads(curl("curl localhost:8070/status.json", stack, cwd))["replicas"]
    assert len(replicas) == 3 and all(r["ready"] for r in replicas)
    gateway = json.loads(curl(f"curl localhost:{stack['LBSVC_ADMIN_PORT']}/status.json", stack, cwd))
    assert [b["name"] for b in gateway["backends"]] == ["replica-a", "replica-b", "replica-c"]
