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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: tests/ holds two_nodes

from two_nodes import print_result, run_as_script, two_node_cluster  # noqa: E402


def run_two_node_pretrain(workdir: Path) -> dict:
    """Start head + 2 worker nodes, prepare a tiny dataset, pretrain 2 workers through a dead worker; where they ran."""
    with two_node_cluster(head_cpus=1, worker_cpus=2, worker_resources={"train_slot": 1}) as workers:
        import ray

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


def test_pretrain_with_two_workers_on_two_nodes(tmp_path):
    result = run_as_script(__file__, tmp_path)
    assert result["model_config"]
    assert len(result["train_worker_node_ids"]) == 4  # 2 workers, then 2 again after rank 1 died
    assert result["train_worker_node_ids"] == sorted(result["worker_node_ids"] * 2)  # one on each worker node, each time
    assert "resuming from step 2" in result["log"], result["log"]  # rank 1 died at step 3; the group restarted
    assert result["steps"][-1] == 4 and result["steps"].count(3) == 1, result["steps"]  # step 3 redone once, logged once


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print_result(run_two_node_pretrain(Path(sys.argv[1])))
