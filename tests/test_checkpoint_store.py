"""Completion records, without Ray: checkpoints written as two ranks write them, then damaged on disk.

The end-to-end cases (a worker killed with `kill -9` after a checkpoint, a re-run over a truncated
shard, a missing rank's file and a half-written folder) are in tests/test_pretrain.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raylm.training.checkpoint_store import (
    checkpoint_name,
    choose_resume_folder,
    prune,
    publish_part,
    remove_leftovers,
    verify,
)

BIG = 5 << 20  # over the whole-file hash limit: checked by size and its first and last MiB


def write_part(root: Path, rank: int, step: int) -> Path:
    """What one rank's local folder holds for a ZeRO-2 checkpoint (file names as DeepSpeed's)."""
    part = root / f"part-{step}-{rank}"
    (part / "ds").mkdir(parents=True)
    (part / "ds" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(2000) + bytes(BIG if rank else 10))
    (part / "rng").mkdir()
    (part / "rng" / f"rank_{rank}.json").write_text(json.dumps({"rank": rank, "step": step}))
    if rank == 0:
        (part / "ds" / "mp_rank_00_model_states.pt").write_bytes(os.urandom(5000))
        (part / "latest").write_text("ds")
        (part / "raylm_state.json").write_text(json.dumps({"step": step, "world_size": 2}))
    return part


def checkpoint(run_dir: Path, tmp: Path, step: int, ranks=(0, 1)) -> Path:
    folder = run_dir / checkpoint_name(step)
    for rank in ranks:
        publish_part(write_part(tmp, rank, step), folder, rank, 2, step)
    return folder


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    return run


def test_complete_only_when_every_rank_has_recorded_its_part(run_dir, tmp_path):
    half = checkpoint(run_dir, tmp_path, 4, ranks=(0,))
    verdict = verify(half, 4)
    assert verdict.partial and verdict.reason == "rank 1 never finished writing it (no complete/rank_1.json)"
    publish_part(write_part(tmp_path / "late", 1, 4), half, 1, 2, 4)
    assert verify(half, 4) is None
    record = json.loads((half / "complete" / "rank_1.json").read_text())
    assert set(record["files"]) == {"ds/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng/rank_1.json"}
    assert "sha256_ends" in record["files"]["ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert "sha256" in record["files"]["rng/rank_1.json"]


@pytest.mark.parametrize("damage, named", [
    (lambda f: (f / "ds/mp_rank_00_model_states.pt").write_bytes(b"x" * 100),
     "ds/mp_rank_00_model_states.pt has 100 bytes, 5,000 when written (rank 0's part)"),
    (lambda f: (f / "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink(),
     "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt is missing (rank 1's part)"),
    (lambda f: (f / "raylm_state.json").unlink(), "raylm_state.json is missing (rank 0's part)"),
    (lambda f: (f / "latest").write_text("xx"), "latest does not match the checksum it was written with (rank 0's part)"),
    (lambda f: (f / "complete/rank_1.json").write_text("{"), "complete/rank_1.json is not a completion record"),
    (lambda f: (f / "complete/rank_0.json").write_text('{"rank": 0, "files": {}}'), "complete/rank_0.json is not a completion record"),
], ids=["truncated", "missing-rank-file", "missing-state", "same-size-changed", "bad-record", "record-without-fields"])
def test_a_damaged_checkpoint_is_broken_and_names_the_file(run_dir, tmp_path, damage, named):
    folder = checkpoint(run_dir, tmp_path, 8)
    damage(folder)
    verdict = verify(folder, 8)
    assert not verdict.partial and verdict.reason == named


def test_a_large_file_zeroed_at_its_size_is_caught_by_its_ends(run_dir, tmp_path):
    folder = checkpoint(run_dir, tmp_path, 8)
    shard = folder / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(bytes(shard.stat().st_size))
    assert "does not match the checksum" in verify(folder, 8).reason


def test_resume_takes_the_newest_sound_checkpoint_and_tidies_what_is_newer(run_dir, tmp_path):
    for step in (4, 8, 12):
        checkpoint(run_dir, tmp_path, step)
    (run_dir / checkpoint_name(12) / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"")
    # A disk that filled mid-write: the state file and DeepSpeed's pointer, empty weights, no records.
    partial = run_dir / checkpoint_name(16)
    (partial / "ds").mkdir(parents=True)
    (partial / "complete").mkdir()  # made first by every rank (publish_part)
    (partial / "latest").write_text("ds")
    (partial / "raylm_state.json").write_text(json.dumps({"step": 16}))
    (partial / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"")
    lines: list[str] = []
    assert choose_resume_folder(run_dir, lines.append) == run_dir / checkpoint_name(8)
    assert lines == [
        "checkpoint_step00000016 is partial, removed: no rank finished writing it",
        ("checkpoint_step00000012 is broken, moved aside to checkpoint_step00000012.broken: "
         "ds/mp_rank_00_model_states.pt has 0 bytes, 5,000 when written (rank 0's part)"),
    ]
    assert sorted(p.name for p in run_dir.iterdir()) == [checkpoint_name(4), checkpoint_name(8), "checkpoint_step00000012.broken"]
    # The run then writes step 12 again; the broken one stays aside and is never chosen.
    checkpoint(run_dir, tmp_path / "again", 12)
    lines.clear()
    assert choose_resume_folder(run_dir, lines.append) == run_dir / checkpoint_name(12) and lines == []


def test_nothing_sound_means_a_fresh_start(run_dir, tmp_path):
    checkpoint(run_dir, tmp_path, 4, ranks=(1,))
    lines: list[str] = []
    assert choose_resume_folder(run_dir, lines.append) is None
    assert lines == ["checkpoint_step00000004 is partial, removed: rank 0 never finished writing it (no complete/rank_0.json)"]
    assert choose_resume_folder(tmp_path / "no-such-run", lines.append) is None


def test_prune_keeps_the_newest_complete_and_what_may_still_be_written(run_dir, tmp_path):
    for step in (4, 8, 12, 16):
        checkpoint(run_dir, tmp_path, step)
    checkpoint(run_dir, tmp_path / "old", 6, ranks=(0,))  # left by an earlier attempt
    checkpoint(run_dir, tmp_path / "new", 20, ranks=(0,))  # rank 1 still copying
    assert prune(run_dir, keep=2) == [checkpoint_name(8), checkpoint_name(6), checkpoint_name(4)]
    assert sorted(p.name for p in run_dir.iterdir()) == [checkpoint_name(12), checkpoint_name(16), checkpoint_name(20)]


def test_leftovers_of_interrupted_writes_are_removed(run_dir):
    (run_dir / ".metrics.jsonl.partial-ab12").write_text("{}\n")
    (run_dir / ".model.partial-x9").mkdir()
    (run_dir / "metrics.jsonl").write_text("{}\n")
    assert remove_leftovers(run_dir) == [".metrics.jsonl.partial-ab12", ".model.partial-x9"]
    assert [p.name for p in run_dir.iterdir()] == ["metrics.jsonl"]


def test_a_checkpoint_from_before_completion_records_is_moved_aside_not_removed(run_dir, tmp_path):
    checkpoint(run_dir, tmp_path, 4)
    old = run_dir / checkpoint_name(8)  # what raylm wrote before it kept records: no complete/ at all
    (old / "ds").mkdir(parents=True)
    (old / "raylm_state.json").write_text(json.dumps({"step": 8}))
    lines: list[str] = []
    assert choose_resume_folder(run_dir, lines.append) == run_dir / checkpoint_name(4)
    assert lines == ["checkpoint_step00000008 cannot be checked, moved aside to checkpoint_step00000008.unrecorded: "
                     "it has no completion records (written before raylm kept them)"]
    assert (run_dir / "checkpoint_step00000008.unrecorded" / "raylm_state.json").is_file()


def test_checkpoints_on_object_storage_are_recorded_checked_chosen_and_pruned_there(s3_server, tmp_path):
    """The same rules against an S3-compatible server (moto on 127.0.0.1), where nothing renames:
    a part without its record is partial, a shard rewritten shorter is broken and named, the broken
    one is moved aside (copied, then removed), and pruning removes whole folders."""
    from raylm.core import storage

    home = s3_server("checkpoints") + "/run"

    def remote_checkpoint(step: int, ranks=(0, 1)) -> str:
        folder = storage.join(home, checkpoint_name(step))
        for rank in ranks:
            publish_part(write_part(tmp_path, rank, step), folder, rank, 2, step)
        return folder

    for step in (4, 8, 12):
        remote_checkpoint(step)
    half = remote_checkpoint(16, ranks=(0,))
    assert verify(half, 16).partial
    shard = f"{home}/{checkpoint_name(12)}/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    storage.write_bytes(shard, storage.read_bytes(shard)[:1000])
    assert verify(f"{home}/{checkpoint_name(12)}", 12).reason.startswith("ds/zero_pp_rank_1_mp_rank_00_optim_states.pt has 1,000 bytes")
    lines: list[str] = []
    assert choose_resume_folder(home, lines.append) == f"{home}/{checkpoint_name(8)}"
    assert lines[0].startswith(f"{checkpoint_name(16)} is partial, removed") and "moved aside to checkpoint_step00000012.broken" in lines[1]
    names = {name for name, _ in storage.list_dir(home)}
    assert names == {checkpoint_name(4), checkpoint_name(8), checkpoint_name(12) + ".broken"}
    assert prune(home, keep=1) == [checkpoint_name(4)]
    assert {name for name, _ in storage.list_dir(home)} == {checkpoint_name(8), checkpoint_name(12) + ".broken"}
    assert verify(f"{home}/{checkpoint_name(8)}", 8) is None
    # A resume copies what its rank loads: not the other rank's ZeRO shards and RNG states.
    from raylm.training.run_home import fetch_checkpoint

    local = fetch_checkpoint(f"{home}/{checkpoint_name(8)}", rank=1)
    mine = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and p.parent.name != "complete")
    assert mine == ["ds/mp_rank_00_model_states.pt", "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt", "latest", "raylm_state.json",
                    "rng/rank_1.json"]
    everything = fetch_checkpoint(f"{home}/{checkpoint_name(8)}")  # for a universal conversion: every rank's
    assert (everything / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
