"""`raylm serve` as a user runs it: a foreground process that starts its own Ray cluster, answers
on 127.0.0.1, and stops cleanly on Ctrl-C or SIGTERM, sent to it or to its whole process group: exit
0, every process it started gone within seconds, and a console without a traceback or Ray's and
Serve's start/stop notices."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

# Lines a clean start and stop must not print (issues 12 and 14).
NOT_ON_A_CLEAN_CONSOLE = ["Traceback", "graceful_shutdown failed", "Connecting to existing Serve app", "New http_options", "SIGTERM received"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("signum, to_group", [(signal.SIGINT, True), (signal.SIGTERM, True), (signal.SIGTERM, False)], ids=["ctrl-c", "sigterm-to-group", "sigterm-to-pid"])
def test_raylm_serve_runs_in_the_foreground_and_stops_cleanly(debug_model_dir, tmp_path, signum, to_group):
    port = free_port()
    env = {**os.environ, "RAYLM_API_KEY": "cli-key"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "raylm.cli", "serve", "--model", str(debug_model_dir), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    started = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert proc.poll() is None, open(tmp_path / "serve.log").read()[-3000:]
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer cli-key"}, timeout=10)
        assert models.json()["data"][0]["id"] == debug_model_dir.name
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 401  # the key came from the env
        started = psutil.Process(proc.pid).children(recursive=True)  # Ray's processes, replicas included
        assert any("ServeReplica" in p.name() or "ServeReplica" in " ".join(p.cmdline()) for p in started)
        signalled = time.monotonic()
        if to_group:  # what a terminal (Ctrl-C) or a supervisor sends
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        assert proc.wait(timeout=120) == 0
        _, alive = psutil.wait_procs(started, timeout=max(1.0, signalled + 30 - time.monotonic()))
        assert alive == [], f"still running 30 s after the signal: {[p.name() for p in alive]}"
    finally:  # what a failed stop left behind (psutil checks that a pid still names the same process)
        if proc.poll() is None:
            proc.kill()
        for process in started:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()
    log.seek(0)
    output = log.read()
    assert f"serving at http://127.0.0.1:{port}/v1" in output and "stopping" in output
    assert [line for line in NOT_ON_A_CLEAN_CONSOLE if line in output] == [], output[-3000:]
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        raise AssertionError("the endpoint still answers after the stop")
    except httpx.HTTPError:
        pass


def test_raylm_serve_refuses_an_exposed_address_without_a_key(debug_model_dir):
    env = {key: value for key, value in os.environ.items() if key not in ("RAYLM_API_KEY", "RAY_ADDRESS")}
    result = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "serve", "--model", str(debug_model_dir), "--host", "192.0.2.1"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("raylm serve: error: refusing to serve on 192.0.2.1 without an API key")
    assert "--insecure-no-api-key" in result.stderr and "Started a local Ray instance" not in result.stderr


def test_raylm_serve_refuses_a_missing_model_dir(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "serve", "--model", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "does not exist" in result.stderr
