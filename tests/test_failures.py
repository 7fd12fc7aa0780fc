"""The one line a worker group's failure gets, from Ray's own error objects (no Ray cluster needed).

A real `kill -9` of a worker, and the console around it, is in tests/test_pretrain.py.
"""

from __future__ import annotations

import json
import logging

import ray.exceptions

from raylm.training.failures import ControllerNoise, FailureReporter


def run_dir_with(tmp_path, step: int, checkpoints: dict[int, int]):
    run = tmp_path / "run"
    (run / ".workers").mkdir(parents=True)
    (run / ".workers" / "rank_1.json").write_text(json.dumps({"rank": 1, "pid": 4242}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, step + 1)))
    for ckpt, ranks in checkpoints.items():
        records = run / f"checkpoint_step{ckpt:08d}" / "complete"
        records.mkdir(parents=True)
        for r in range(ranks):
            (records / f"rank_{r}.json").write_text(json.dumps({"rank": r, "world_size": 2, "step": ckpt, "files": {}}))
    return run


def lines(run):
    return [line.split(" ", 1)[1] for line in (run / "raylm.log").read_text().splitlines()]


def test_a_dead_worker_is_one_line_naming_the_restart(tmp_path, capsys):
    run = run_dir_with(tmp_path, 26, {10: 2, 20: 2, 30: 1})  # 30: rank 1 never finished it
    reporter = FailureReporter(str(run), str(run), max_failures=2)
    reporter.after_exception(None, {1: ray.exceptions.ActorDiedError(), 0: RuntimeError("Connection closed by peer")})
    reporter.after_exception(None, {1: ray.exceptions.ActorDiedError()})
    reporter.after_exception(None, {0: ValueError("bad row 7\nin shard 3")})
    assert lines(run) == [
        f"worker rank 1 died (pid 4242, last logged step 26); restarting from checkpoint step 20 (restart 1 of 2); details in {run}/worker-failures.log",
        f"worker rank 1 died (pid 4242, last logged step 26); restarting from checkpoint step 20 (restart 2 of 2); details in {run}/worker-failures.log",
        f"worker rank 0 failed (last logged step 26): ValueError: in shard 3; no restarts left (scaling.max_failures=2): the run stops; details in {run}/worker-failures.log",
    ]
    assert capsys.readouterr().out.count("[raylm] worker rank") == 3
    details = (run / "worker-failures.log").read_text()
    assert "rank 0\nConnection closed by peer" in details and "bad row 7" in details


def test_the_controller_filter_drops_only_what_the_line_replaces():
    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("ray.train", logging.INFO, __file__, 1, message, None, None)

    noise = ControllerNoise()
    assert not noise.filter(record("[FailurePolicy] RETRY\n  Source: worker group"))
    assert not noise.filter(record("Graceful shutdown of backend failed. This is expected if one of the workers has crashed."))
    assert noise.filter(record("[FailurePolicy] RETRY\n  Source: controller"))  # FailureReporter does not see these
    assert noise.filter(record("Attempting to start training worker group of size 2"))
