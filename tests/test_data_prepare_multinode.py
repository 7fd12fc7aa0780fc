"""`raylm prepare` across two nodes: `ray.cluster_utils.Cluster` puts a head and two worker nodes on
this machine, and the partitions' shards are written by tasks on both worker nodes.

The head offers no CPU, so every Ray Data task (read, encode, the hash shuffle, pack + write) runs
on a worker node; the manifest's `packing.by_partition[].written_by` says which node and process
wrote each partition's shards. The cluster lives in a subprocess (this file run as a script): one
process cannot `ray.init` two clusters, and the session's cluster may be up.

Each worker node has 2 CPUs: the hash shuffle's aggregator actors reserve fractions of a CPU, and
on 1-CPU nodes they could fill one node whole, leaving the packing tasks (1 CPU each) only the
other (seen once in CI: every partition written by one node).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: tests/ holds two_nodes

from two_nodes import print_result, run_as_script, two_node_cluster  # noqa: E402


def run_two_node_prepare(workdir: Path) -> dict:
    """Start a CPU-less head + 2 worker nodes, prepare a stdlib sample in 16+ partitions; who wrote what."""
    with two_node_cluster(head_cpus=0, worker_cpus=2) as workers:
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


def test_prepare_writes_shards_from_both_nodes(tmp_path):
    result = run_as_script(__file__, tmp_path)
    assert result["partitions"] >= 16
    writers = {part["partition"]: part["written_by"] for part in result["by_partition"]}
    assert {writer["node_id"] for writer in writers.values()} == set(result["worker_node_ids"])  # both nodes wrote
    assert len({(writer["host"], writer["pid"]) for writer in writers.values()}) >= 2
    shards_by_node = {writers[shard["partition"]]["node_id"] for shard in result["train_shards"]}
    assert shards_by_node == set(result["worker_node_ids"])  # and the train split has shards from each


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print_result(run_two_node_prepare(Path(sys.argv[1])))
