"""`raylm serve` as a user runs it: a foreground process that starts its own Ray cluster, answers
on 127.0.0.1, and stops cleanly (exit 0, Ray shut down) on Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_raylm_serve_runs_in_the_foreground_and_stops_on_ctrl_c(debug_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "RAYLM_API_KEY": "cli-key"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "raylm.cli", "serve", "--model", str(debug_model_dir), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
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
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.seek(0)
    output = log.read()
    assert f"serving at http://127.0.0.1:{port}/v1" in output and "stopping" in output
    # A clean stop (issue 12): no traceback, and no Serve 2.60 shutdown notice (see serving.serve.stop_serving).
    assert "Traceback" not in output and "graceful_shutdown failed" not in output, output[-3000:]
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        raise AssertionError("the endpoint still answers after Ctrl-C")
    except httpx.HTTPError:
        pass


def test_raylm_serve_refuses_a_missing_model_dir(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "serve", "--model", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "does not exist" in result.stderr
