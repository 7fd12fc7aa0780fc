"""Pretraining across two nodes: `ray.cluster_utils.Cluster` puts a head and two worker nodes on
this machine, and `raylm pretrain` with 2 workers runs one worker on each. Rank 1 dies at step 3
(after the checkpoint of step 2) on its first attempt; Ray Train restarts the worker group and the
run resumes from that checkpoint and finishes.

Each worker node offers one `train_slot` and each Train worker asks for one
(`scaling.resources_per_worker`), so the two workers can only run on different nodes; the GCS
actor table then shows where they ran. The cluster lives in a subprocess (this file run as a
script): one process cannot `ray.init` two clusters, and the session's cluster may be up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RESULT_MARK = "RAYLM-MULTINODE-RESULT "


def run_two_node_pretrain(workdir: Path) -> dict:
    """Start head + 2 worker nodes, prepare a tiny dataset, pretrain 2 workers through a dead worker; where they ran."""
    import os
    import shutil
    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway cluster on loopback
    temp_dir = tempfile.mkdtemp(prefix="rlmn", dir="/tmp")  # short: Ray's unix socket paths
    # Cluster writes its address to $RAY_TMPDIR/ray/ray_current_cluster; keep that file inside our temp
    # dir so it neither needs /tmp/ray to exist nor repoints `ray.init()` of another cluster here.
    os.environ["RAY_TMPDIR"] = temp_dir
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    node = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node, "num_cpus": 1, "temp_dir": temp_dir, "include_dashboard": False},
    )
    try:
        workers = [cluster.add_node(**node, num_cpus=2, resources={"train_slot": 1}) for _ in range(2)]
        ray.init(address=cluster.address)
        from raylm.data.prepare import main as prepare
        from raylm.training.pretrain import main as pretrain

        dataset, run = workdir / "ds", workdir / "run"
        assert prepare(["--source", "stdlib", "--max-docs", "80", "--val-fraction", "0.2", "--vocab-size", "512",
                        "--seq-len", "32", "--out", str(dataset)]) == 0  # fmt: skip
        assert pretrain(["--config", "debug", "--data", str(dataset), "--out", str(run), "--max-steps", "4",
                         "--num-workers", "2", "scaling.resources_per_worker={train_slot: 1}", "checkpoint.every=2",
                         "faults.kill_rank=1", "faults.kill_at_step=3", "scaling.max_failures=1", "logging.every=1"]) == 0  # fmt: skip
        train_workers = [
            actor for actor in ray._private.state.actors().values() if "RayTrainWorker" in actor["ActorClassName"]
        ]
        return {
            "worker_node_ids": sorted(node.node_id for node in workers),
            "train_worker_node_ids": sorted(actor["Address"]["NodeID"] for actor in train_workers),  # both attempts
            "model_config": (run / "model" / "config.json").is_file(),
            "steps": [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()],
            "log": (run / "raylm.log").read_text(),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_pretrain_with_two_workers_on_two_nodes(tmp_path):
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    assert done.returncode == 0 and lines, (done.stdout + done.stderr)[-6000:]
    result = json.loads(lines[-1][len(RESULT_MARK) :])
    assert result["model_config"]
    assert len(result["train_worker_node_ids"]) == 4  # 2 workers, then 2 again after rank 1 died
    assert result["train_worker_node_ids"] == sorted(result["worker_node_ids"] * 2)  # one on each worker node, each time
    assert "resuming from step 2" in result["log"], result["log"]  # rank 1 died at step 3; the group restarted
    assert result["steps"][-1] == 4 and result["steps"].count(3) == 1, result["steps"]  # step 3 redone once, logged once


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(RESULT_MARK + json.dumps(run_two_node_pretrain(Path(sys.argv[1]))), flush=True)
