"""`raylm submit` and `raylm jobs` against a real head: `ray start --head` on 127.0.0.1.

One head (token auth off) serves the module; the auth test starts its own head with token auth on,
first, so the two never run together. Heads run in their own process group and are stopped by
signalling it (never `ray stop`, which would take every Ray cluster on the machine with it). The
stages run as they would on a cluster: `python -m <stage>` in a job whose working_dir is the repo.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from raylm.cli import main as raylm

VENV_BIN = Path(sys.executable).parent
HEAD_START_TIMEOUT_S = 120
STOP_GRACE_S = 5
RIGHT_TOKEN = "raylm-test-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Head:
    """A running head: its job server URL, its process (group leader) and scratch dir."""

    url: str
    process: subprocess.Popen
    temp_dir: str
    log_path: Path

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """SIGTERM the head's process group, give it a few seconds, then SIGKILL what is left.

        `ray start --block` waits up to a minute for a straggling child after SIGTERM; the
        cluster is a throwaway in its own temp dir, so a short grace is enough.
        """
        for sig, grace_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and group_alive(self.process.pid):
                time.sleep(0.25)
                self.process.poll()  # reap the leader so an exited group reads as gone
        self.process.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def start_head(log_dir: Path, auth_env: dict[str, str]) -> Head:
    """`ray start --head --block` on free ports; returns once its job server answers."""
    temp_dir = tempfile.mkdtemp(prefix="rlh", dir="/tmp")  # short: Ray's unix socket paths
    dashboard_port = free_port()
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", "127.0.0.1",
        "--port", str(free_port()),
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard_port),
        "--include-dashboard", "true",
        "--ray-client-server-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        # Logical CPUs: Train workers take one each and Ray Data still gets room.
        "--num-cpus", "4",
        "--temp-dir", temp_dir,
    ]  # fmt: skip
    env = {**os.environ, **auth_env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # the jobs' `python` is this venv's
    log_path = log_dir / f"head-{dashboard_port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(f"http://127.0.0.1:{dashboard_port}", process, temp_dir, log_path)
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            head.stop()
            raise RuntimeError(f"ray start --head exited with {process.returncode}:\n{head.log_tail()}")
        try:
            if requests.get(f"{head.url}/api/version", timeout=2).status_code in (200, 401, 403):
                return head
        except requests.ConnectionError:
            pass
        time.sleep(1)
    head.stop()
    raise RuntimeError(f"ray start --head did not answer in {HEAD_START_TIMEOUT_S} s:\n{head.log_tail()}")


def raylm_subprocess(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`raylm ...` in its own process: Ray caches the auth token per process."""
    return subprocess.run(
        [sys.executable, "-m", "raylm.cli", *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_token_auth_right_token_works_wrong_token_is_refused_plainly(tmp_path):
    head = start_head(tmp_path, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RIGHT_TOKEN})
    try:
        client_env = {**os.environ, "HOME": str(tmp_path)}  # no ~/.ray/auth_token to fall back on
        client_env.pop("RAY_ADDRESS", None)
        right = raylm_subprocess(
            ["submit", "--address", head.url, "--", "prepare", "--help"],
            {**client_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RIGHT_TOKEN},
        )
        assert right.returncode == 0, right.stdout + right.stderr
        assert "SUCCEEDED" in right.stdout

        for wrong_env in (
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"},
            {"RAY_AUTH_MODE": "disabled"},
        ):
            wrong = raylm_subprocess(["jobs", "--address", head.url, "list"], {**client_env, **wrong_env})
            assert wrong.returncode == 2, wrong.stdout + wrong.stderr
            assert "refused this client's authentication token" in wrong.stderr
            assert "Traceback" not in wrong.stderr
    finally:
        head.stop()


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    head = start_head(tmp_path_factory.mktemp("head"), {"RAY_AUTH_MODE": "disabled"})
    try:
        yield head
    finally:
        head.stop()


def test_failing_job_exits_nonzero_with_the_jobs_error_shown(head, tmp_path, capsys):
    missing = tmp_path / "no-such-corpus"
    code = raylm(["submit", "--address", head.url, "--", "prepare", "--source", str(missing), "--out", str(tmp_path / "ds")])
    out, err = capsys.readouterr()
    assert code == 1
    assert "FAILED" in err
    assert str(missing) in out  # the stage's own error line, from the job's log
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_no_wait_then_status_logs_and_stop(head, tmp_path, capsys):
    job_id = f"raylm-test-stop-{os.getpid()}"
    code = raylm([
        "submit", "--address", head.url, "--no-wait", "--job-id", job_id, "--env", "RAYLM_TEST_MARK=1",
        "--", "prepare", "--source", "stdlib", "--out", str(tmp_path / "ds"),
    ])  # fmt: skip
    assert code == 0
    assert job_id in capsys.readouterr().out
    from ray.job_submission import JobSubmissionClient

    env_vars = JobSubmissionClient(head.url).get_job_info(job_id).runtime_env["env_vars"]
    assert env_vars["RAYLM_TEST_MARK"] == "1"  # --env
    assert env_vars["WANDB_MODE"] == os.environ["WANDB_MODE"]  # passed through from this shell

    assert raylm(["jobs", "--address", head.url, "stop", job_id]) == 0
    assert "STOPPED" in capsys.readouterr().out
    assert raylm(["jobs", "--address", head.url, "status", job_id]) == 1  # stopped counts as failed
    assert "STOPPED" in capsys.readouterr().out
    assert raylm(["jobs", "--address", head.url, "list"]) == 0
    assert job_id in capsys.readouterr().out
    assert raylm(["jobs", "--address", head.url, "status", "raylm-no-such-job"]) == 2
    assert "no job 'raylm-no-such-job'" in capsys.readouterr().err


def test_prepare_then_pretrain_as_jobs_both_succeed_and_a_stopped_training_job_checkpoints(head, tmp_path, capsys):
    dataset, run = tmp_path / "ds", tmp_path / "run"
    submit = ["submit", "--address", head.url, "--"]
    prepare = ["prepare", "--source", "stdlib", "--max-docs", "80", "--val-fraction", "0.2", "--vocab-size", "512", "--seq-len", "32", "--out", str(dataset)]
    assert raylm(submit + prepare) == 0, capsys.readouterr()
    assert "SUCCEEDED" in capsys.readouterr().out
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["seq_len"] == 32

    pretrain = ["pretrain", "--config", "debug", "--data", str(dataset), "--out", str(run), "--max-steps", "3", "--num-workers", "2"]
    assert raylm(submit + pretrain) == 0, capsys.readouterr()
    assert "SUCCEEDED" in capsys.readouterr().out
    assert (run / "model" / "config.json").is_file()
    assert (run / "model" / "model.safetensors").is_file()

    # `raylm jobs stop` on a training job: SIGTERM, and the time to write a checkpoint at the next step.
    long_run, job_id = tmp_path / "long", f"raylm-test-train-stop-{os.getpid()}"
    long = ["pretrain", "--config", "debug", "--data", str(dataset), "--out", str(long_run), "--max-steps", "100000",
            "--num-workers", "2", "checkpoint.every=1000", "eval.every=0"]
    assert raylm(["submit", "--address", head.url, "--no-wait", "--job-id", job_id, "--", *long]) == 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (long_run / "metrics.jsonl").is_file():
        time.sleep(0.5)
    assert raylm(["jobs", "--address", head.url, "stop", job_id]) == 0
    capsys.readouterr()
    assert raylm(["jobs", "--address", head.url, "logs", job_id]) == 0
    logs = capsys.readouterr().out
    stopped = re.search(r"stopped by SIGTERM at step (\d+) with (checkpoint_step\d+); rerun the same command to resume", logs)
    assert stopped, logs[-3000:]
    from raylm.training.checkpoint_store import verify

    assert verify(long_run / stopped.group(2)) is None


def test_serve_job_detaches_once_serving_and_stop_takes_the_endpoint_down(head, debug_model_dir, capsys):
    port = free_port()
    job_id = f"raylm-test-serve-{os.getpid()}"
    code = raylm([
        "submit", "--address", head.url, "--job-id", job_id, "--",
        "serve", "--model", str(debug_model_dir), "--port", str(port),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "is serving" in out
    models = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=30)
    assert models.status_code == 200 and models.json()["data"]

    assert raylm(["jobs", "--address", head.url, "stop", job_id]) == 0
    assert "STOPPED" in capsys.readouterr().out
    with pytest.raises(requests.ConnectionError):  # Serve was shut down, not left running
        requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
