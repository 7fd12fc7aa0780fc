"""One local Ray cluster per test session, on 127.0.0.1, in its own temp dir.

Environment that must be set before Ray or W&B start is set at import time, here. Tests that need
Ray take the `ray_cluster` fixture; the cluster is shut down (ours only: never `ray stop`) when
the session ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.pop("RAY_ADDRESS", None)
os.environ["RAY_AUTH_MODE"] = "disabled"  # the one auth test sets its own
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Fast autoscaling metrics so the Serve autoscaling test sees replicas change in seconds.
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
# Ray Data progress bars flood pytest's captured output.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Object storage: an S3-compatible server (moto) on loopback, started by the `s3_server` fixture.
# Its endpoint and test credentials go into the environment now, before Ray starts, so that Ray's
# workers (which read the environment of the cluster, not the driver's) reach it as the driver does.
S3_PORT = free_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="testing",
                  AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the session; yields a function that makes a bucket and returns its s3:// URI."""
    import subprocess
    import sys
    import time
    import urllib.request

    import pyarrow.fs as pafs

    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL"], timeout=1)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the moto S3 server did not start") from None
            time.sleep(0.2)
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{S3_PORT}", scheme="http", allow_bucket_creation=True)

    def bucket(name: str) -> str:
        fs.create_dir(name)
        return f"s3://{name}"

    try:
        yield bucket
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by the whole session.

    4 logical CPUs on 2 cores: Ray Train's 2 workers take one each and Ray Data's read and map
    tasks still get room, so no pipeline starves.
    """
    import ray

    from raylm.core.ray_cluster import local_cluster_options

    temp_dir = tempfile.mkdtemp(prefix="raylm-ray-", dir="/tmp")  # short: Ray's unix sockets
    # As raylm starts one (with the dashboard, whose state API Ray Train's actors query, and its
    # address in their environment), so a test sees the console a user sees.
    ray.init(**local_cluster_options(num_cpus=4, _temp_dir=temp_dir, log_to_driver=True, configure_logging=False))
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory):
    """A directory shared by the session's tests (e.g. one dataset dir built once)."""
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A tiny ChatML BPE tokenizer dir (see tests/tiny_artifacts.py)."""
    from tiny_artifacts import make_tokenizer_dir

    return make_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def debug_model_dir(tmp_path_factory, tokenizer_dir):
    """A randomly initialised debug model dir in HF Llama format, with the tiny tokenizer."""
    from tiny_artifacts import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("models") / "debug", tokenizer_dir)
