"""Pretraining across two nodes with no disk shared with the driver: `ray.cluster_utils.Cluster`
puts a head and two worker nodes on this machine; the dataset dir and the run dir live on the
session's S3-compatible server (moto on 127.0.0.1), and the driver keeps its working copies in a
cache dir of its own, apart from the nodes'. `raylm prepare` runs its tasks on the worker nodes and
writes the dataset to the server; `raylm pretrain` with 2 workers runs one worker on each node.
Rank 1 dies at step 3 (after the checkpoint of step 2) on its first attempt; Ray Train restarts
the worker group, which resumes from the checkpoint on the server and finishes.

Each worker node offers one `train_slot` and each Train worker asks for one
(`scaling.resources_per_worker`), so the two workers can only run on different nodes; the GCS
actor table then shows where they ran. The cluster lives in a subprocess (this file run as a
script): one process cannot `ray.init` two clusters, and the session's cluster may be up. (The
two worker nodes do share one cache dir: they are processes of one machine, and Ray starts a
node's workers with the node's environment.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: tests/ holds two_nodes

from two_nodes import print_result, run_as_script, two_node_cluster  # noqa: E402


def run_two_node_pretrain(workdir: Path, bucket: str) -> dict:
    """Start head + 2 worker nodes, prepare a tiny dataset onto the server, pretrain 2 workers through a dead worker there."""
    os.environ["RAYLM_CACHE_DIR"] = str(workdir / "nodes-cache")  # the nodes start with this one
    with two_node_cluster(head_cpus=1, worker_cpus=2, worker_resources={"train_slot": 1}) as workers:
        import ray

        from raylm.core import storage
        from raylm.data.prepare import main as prepare
        from raylm.training.pretrain import main as pretrain

        os.environ["RAYLM_CACHE_DIR"] = str(workdir / "driver-cache")  # the driver's own, from here on
        dataset, run = f"{bucket}/ds", f"{bucket}/run"
        assert prepare(["--source", "stdlib", "--max-docs", "80", "--val-fraction", "0.2", "--vocab-size", "512",
                        "--seq-len", "32", "--out", dataset]) == 0  # fmt: skip
        assert pretrain(["--config", "debug", "--data", dataset, "--out", run, "--max-steps", "4",
                         "--num-workers", "2", "scaling.resources_per_worker={train_slot: 1}", "checkpoint.every=2",
                         "faults.kill_rank=1", "faults.kill_at_step=3", "scaling.max_failures=1", "logging.every=1"]) == 0  # fmt: skip
        train_workers = [
            actor for actor in ray._private.state.actors().values() if "RayTrainWorker" in actor["ActorClassName"]
        ]
        return {
            "worker_node_ids": sorted(node.node_id for node in workers),
            "train_worker_node_ids": sorted(actor["Address"]["NodeID"] for actor in train_workers),  # both attempts
            "files": sorted(storage.files_under(run)),
            "shards": sorted(name for name in storage.files_under(dataset) if name.endswith(".parquet")),
            "steps": [json.loads(line)["step"] for line in storage.read_text(f"{run}/metrics.jsonl").splitlines()],
            "log": storage.read_text(f"{run}/raylm.log"),
            "local_dirs": sorted(p.name for p in workdir.iterdir()),
        }


def test_pretrain_with_two_workers_on_two_nodes_and_every_dir_on_object_storage(tmp_path, s3_server):
    result = run_as_script(__file__, tmp_path, s3_server("two-nodes"))
    assert result["shards"] and {"model/config.json", "model/model.safetensors", "report.md"} <= set(result["files"])
    assert len(result["train_worker_node_ids"]) == 4  # 2 workers, then 2 again after rank 1 died
    assert result["train_worker_node_ids"] == sorted(result["worker_node_ids"] * 2)  # one on each worker node, each time
    assert "worker rank 1 died" in result["log"], result["log"]  # rank 1 died at step 3; the group restarted
    assert result["steps"][-1] == 4 and result["steps"].count(3) == 1, result["steps"]  # step 3 redone once, logged once
    assert result["local_dirs"] == ["driver-cache", "nodes-cache"]  # no dataset or run dir here: only the caches


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print_result(run_two_node_pretrain(Path(sys.argv[1]), sys.argv[2]))
