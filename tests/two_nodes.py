"""Two Ray worker nodes and a head on this machine (`ray.cluster_utils.Cluster`), for tests that
must run in a process of their own: one process cannot `ray.init` two clusters, and the test
session's cluster may be up. A test file runs itself as a script (`run_as_script`); the script
builds its cluster with `two_node_cluster` and prints its result as one marked JSON line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RESULT_MARK = "RAYLM-TWO-NODES-RESULT "
REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def two_node_cluster(head_cpus: int, worker_cpus: int, worker_resources: dict | None = None):
    """A head and two worker nodes on 127.0.0.1, joined by `ray.init`; yields the two worker nodes."""
    # Before Ray is imported: it reads them then (run as a script, no conftest has set them).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway cluster on loopback
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.pop("RAY_ADDRESS", None)

    import ray
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="rl2n", dir="/tmp")  # short: Ray's unix socket paths
    # Cluster writes its address to $RAY_TMPDIR/ray/ray_current_cluster; keep that file inside our temp
    # dir so it neither needs /tmp/ray to exist nor repoints `ray.init()` of another cluster here.
    os.environ["RAY_TMPDIR"] = temp_dir
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    node = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20}
    cluster = Cluster(initialize_head=True,
                      head_node_args={**node, "num_cpus": head_cpus, "temp_dir": temp_dir, "include_dashboard": False})
    try:
        workers = [cluster.add_node(**node, num_cpus=worker_cpus, resources=worker_resources or {}) for _ in range(2)]
        ray.init(address=cluster.address)
        yield workers
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_as_script(test_file: str, workdir: Path, *args: str, timeout: int = 600) -> dict:
    """Run `test_file` as a script with `workdir` and `args`; the JSON result it printed (the test fails with its output otherwise)."""
    done = subprocess.run([sys.executable, test_file, str(workdir), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    assert done.returncode == 0 and lines, (done.stdout + done.stderr)[-6000:]
    return json.loads(lines[-1][len(RESULT_MARK) :])


def print_result(result: dict) -> None:
    print(RESULT_MARK + json.dumps(result), flush=True)
