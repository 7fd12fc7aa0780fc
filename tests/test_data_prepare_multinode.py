"""`raylm prepare` across two nodes: `ray.cluster_utils.Cluster` puts a head and two worker nodes on
this machine, and the partitions' shards are written by tasks on both worker nodes.

The head offers no CPU, so every Ray Data task (read, encode, the hash shuffle, pack + write) runs
on a worker node; the manifest's `packing.by_partition[].written_by` says which node and process
wrote each partition's shards. The cluster lives in a subprocess (this file run as a script): one
process cannot `ray.init` two clusters, and the session's cluster may be up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RESULT_MARK = "RAYLM-PREPARE-MULTINODE-RESULT "


def run_two_node_prepare(workdir: Path) -> dict:
    """Start a CPU-less head + 2 worker nodes, prepare a stdlib sample in 16+ partitions; who wrote what."""
    import os
    import shutil
    import tempfile

    # Before Ray is imported: it reads them then (run as a script, no conftest has set them).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway cluster on loopback
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.pop("RAY_ADDRESS", None)

    import ray
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="rlpn", dir="/tmp")  # short: Ray's unix socket paths
    # Cluster writes its address to $RAY_TMPDIR/ray/ray_current_cluster; keep it inside our temp dir.
    os.environ["RAY_TMPDIR"] = temp_dir
    os.makedirs(os.path.join(temp_dir, "ray"), exist_ok=True)
    node = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": 0, "temp_dir": temp_dir, "include_dashboard": False})
    try:
        workers = [cluster.add_node(**node, num_cpus=1) for _ in range(2)]
        ray.init(address=cluster.address)
        from raylm.data.dataset_dir import read_dataset_manifest
        from raylm.data.prepare import main as prepare

        dataset = workdir / "ds"
        assert prepare(["--source", "stdlib", "--max-docs", "300", "--val-fraction", "0.1", "--vocab-size", "512",
                        "--seq-len", "32", "--partition-bytes", "300000", "--out", str(dataset)]) == 0  # fmt: skip
        manifest = read_dataset_manifest(dataset, verify_checksums=True)
        return {
            "worker_node_ids": sorted(node.node_id for node in workers),
            "partitions": manifest["packing"]["partitions"],
            "by_partition": manifest["packing"]["by_partition"],
            "train_shards": manifest["splits"]["train"]["shards"],
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_prepare_writes_shards_from_both_nodes(tmp_path):
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    assert done.returncode == 0 and lines, (done.stdout + done.stderr)[-6000:]
    result = json.loads(lines[-1][len(RESULT_MARK) :])
    assert result["partitions"] >= 16
    writers = {part["partition"]: part["written_by"] for part in result["by_partition"]}
    assert {writer["node_id"] for writer in writers.values()} == set(result["worker_node_ids"])  # both nodes wrote
    assert len({(writer["host"], writer["pid"]) for writer in writers.values()}) >= 2
    shards_by_node = {writers[shard["partition"]]["node_id"] for shard in result["train_shards"]}
    assert shards_by_node == set(result["worker_node_ids"])  # and the train split has shards from each


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(RESULT_MARK + json.dumps(run_two_node_prepare(Path(sys.argv[1]))), flush=True)
