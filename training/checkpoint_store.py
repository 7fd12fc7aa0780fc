"""Where checkpoints live in the run dir, and when one counts as there: completion records.

    RUN_DIR/checkpoint_step<8 digits>/      one checkpoint (training/checkpoint.py says what it holds)
        complete/rank_<r>.json              rank r's completion record: written last, after its files

Every rank writes its part of a checkpoint into a local temp folder, copies the files into the
checkpoint's folder on storage, then writes its completion record: the files it wrote, each
with its size, and a sha256 of the small ones. A checkpoint is *complete* when the records of
ranks 0 .. world_size-1 are all there; it is *sound* when, besides, every file they list is there
with the listed size (and checksum). A folder short of a record is *partial* (its writer died, or
the disk filled); a complete folder whose files no longer match is *broken* (truncated or deleted
since). Resuming takes the newest sound checkpoint, removes the partial folders newer than it and
moves the broken ones aside (`checkpoint_step<N>.broken`), one line each. Every rank creates
`complete/` before it copies a file, so a folder without it was written by a raylm from before
completion records: it cannot be checked, and a resume moves it aside as `.unrecorded` rather than removing it.

Why sizes and not a full hash of every file: DeepSpeed's shards are gigabytes; hashing them would
add minutes to every save and every resume. The faults seen (an interrupted write, a full disk, a
truncated or missing shard) all show in the sizes. The small files (train state, RNG states,
DeepSpeed's `latest`, configs) are hashed whole; a large file's first and last MiB are hashed,
which catches a file rewritten or zero-filled at the same size, for two 1 MiB reads.

The checkpoints are raylm's, not Ray Train's: Ray's controller learns of a reported checkpoint
only when it next polls the workers, so after a `kill -9` or a Ctrl-C it can be a checkpoint or
two behind what is on storage; and Ray refuses to restore a run whose registered checkpoints have
been moved. So the loop reports metrics to Ray without a checkpoint, finds its checkpoint here,
and keeps the newest `checkpoint.keep` itself (`prune`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from raylm.core import storage
from raylm.core.files import file_sha256

Where = str | Path  # a run dir or checkpoint folder: a local path, or a URI on object storage (raylm/core/storage.py)

COMPLETE_DIR = "complete"
RECORD_FORMAT = 1
WHOLE_HASH_MAX_BYTES = 4 << 20  # files up to this size are hashed whole
ENDS_BYTES = 1 << 20  # larger files: a hash of their first and last MiB
NAME_RE = re.compile(r"^checkpoint_step(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint_step{step:08d}"


def checkpoint_folders(run_dir: Where) -> list[tuple[int, Where]]:
    """(step, folder) of every `checkpoint_step<N>` folder in the run dir, newest first (one listing)."""
    found = [(int(m.group(1)), storage.child(run_dir, name))
             for name, is_dir in storage.list_dir(run_dir) if is_dir and (m := NAME_RE.match(name))]
    return sorted(found, key=lambda pair: pair[0], reverse=True)


# ---- writing -------------------------------------------------------------------------------------


def ends_sha256(path: Path, size: int) -> str:
    """sha256 of a file's first and last ENDS_BYTES."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(ENDS_BYTES))
        f.seek(max(size - ENDS_BYTES, 0))
        digest.update(f.read(ENDS_BYTES))
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    size = path.stat().st_size
    if size <= WHOLE_HASH_MAX_BYTES:
        return {"bytes": size, "sha256": file_sha256(path)}
    return {"bytes": size, "sha256_ends": ends_sha256(path, size)}


def part_record(part: Path, rank: int, world_size: int, step: int) -> dict:
    """Rank `rank`'s completion record for the files under `part` (its local folder)."""
    files = {p.relative_to(part).as_posix(): file_entry(p) for p in sorted(part.rglob("*")) if p.is_file()}
    return {"format": RECORD_FORMAT, "rank": rank, "world_size": world_size, "step": step, "files": files}


def publish_part(part: Path, folder: Where, rank: int, world_size: int, step: int) -> None:
    """Copy this rank's part of a checkpoint into `folder` on storage, then write its completion record.

    File names must not collide across ranks (DeepSpeed's carry the rank; rank 0 alone writes the
    shared ones): each rank lists only what it wrote.
    """
    record = part_record(part, rank, world_size, step)
    storage.make_dir(storage.join(folder, COMPLETE_DIR))  # first: marks a folder of this format, records or not
    for rel in record["files"]:
        storage.upload_file(part / rel, storage.join(folder, rel))  # flushed before the record says it is there
    storage.write_bytes(storage.join(folder, COMPLETE_DIR, f"rank_{rank}.json"), json.dumps(record, indent=2) + "\n")


# ---- checking ------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """What is wrong with a checkpoint folder, in a phrase that names the file; `partial` when a record is missing."""

    partial: bool
    reason: str
    unrecorded: bool = False  # no complete/ dir at all: written by a raylm from before completion records


def read_records(folder: Where) -> tuple[dict[int, dict], Verdict | None]:
    records: dict[int, dict] = {}
    complete = storage.join(folder, COMPLETE_DIR)
    for name, _ in storage.list_dir(complete):
        if not re.fullmatch(r"rank_.*\.json", name):
            continue
        try:
            record = json.loads(storage.read_text(storage.join(complete, name)))
            rank, _, _ = int(record["rank"]), int(record["world_size"]), int(record["step"])
            if not all(isinstance(entry["bytes"], int) for entry in record["files"].values()):
                raise TypeError("a file's size is not a number")
            records[rank] = record
        except (ValueError, KeyError, TypeError, AttributeError):
            return {}, Verdict(False, f"{COMPLETE_DIR}/{name} is not a completion record")
    return records, None


def records_verdict(folder: Where, step: int | None = None) -> tuple[dict[int, dict], Verdict | None]:
    """The folder's completion records, or what keeps it from being complete (cheap: no file but the records is read)."""
    records, bad = read_records(folder)
    if bad:
        return records, bad
    if not records:
        if not storage.is_dir(storage.join(folder, COMPLETE_DIR)):
            return records, Verdict(False, "it has no completion records (written before raylm kept them)", unrecorded=True)
        return records, Verdict(True, "no rank finished writing it")
    world = records[min(records)]["world_size"]
    missing = [r for r in range(world) if r not in records]
    if missing:
        who = f"rank {missing[0]}" if len(missing) == 1 else f"ranks {', '.join(map(str, missing))}"
        return records, Verdict(True, f"{who} never finished writing it (no {COMPLETE_DIR}/rank_{missing[0]}.json)")
    for rank, record in records.items():
        if record["world_size"] != world or rank >= world or (step is not None and record["step"] != step):
            return records, Verdict(False, f"{COMPLETE_DIR}/rank_{rank}.json belongs to another checkpoint "
                                           f"(step {record['step']}, {record['world_size']} workers)")
    return records, None


def check_file(path: str, size: int | None, entry: dict) -> str | None:
    """What is wrong with one listed file (`size`: its size in the folder's listing, None when absent)."""
    if size is None:
        return "is missing"
    if size != entry["bytes"]:
        return f"has {size:,} bytes, {entry['bytes']:,} when written"
    if "sha256" in entry and storage.sha256_of(path) != entry["sha256"]:
        return "does not match the checksum it was written with"
    if "sha256_ends" in entry and storage.file_ends_sha256(path, size, ENDS_BYTES) != entry["sha256_ends"]:
        return "does not match the checksum it was written with"
    return None


def verify(folder: Where, step: int | None = None) -> Verdict | None:
    """None when the checkpoint is complete and every file its records list is there as written."""
    records, verdict = records_verdict(folder, step)
    if verdict:
        return verdict
    sizes = storage.files_under(folder)  # one listing, not a request per file
    for rank, record in sorted(records.items()):
        for rel, entry in record["files"].items():
            problem = check_file(storage.join(folder, rel), sizes.get(rel), entry)
            if problem:
                return Verdict(False, f"{rel} {problem} (rank {rank}'s part)")
    return None


# ---- choosing at resume, and pruning -------------------------------------------------------------


def aside_name(folder: Where, verdict: Verdict) -> Where:
    suffix = ".unrecorded" if verdict.unrecorded else ".broken"
    return folder.with_name(folder.name + suffix) if isinstance(folder, Path) else str(folder).rstrip("/") + suffix


def choose_resume_folder(run_dir: Where, say) -> Where | None:
    """The newest sound checkpoint in the run dir, or None; the partial folders newer than it are
    removed and the broken ones moved aside, each with one line through `say`. A folder with no
    completion records at all (written by an older raylm, which cannot be checked) is moved aside
    too, as `.unrecorded`, not removed.

    Run by one process (world rank 0) while no rank writes checkpoints.
    """
    for step, folder in checkpoint_folders(run_dir):
        verdict = verify(folder, step)
        if verdict is None:
            return folder
        name = storage.name_of(folder)
        if verdict.partial:
            storage.remove(folder)
            say(f"{name} is partial, removed: {verdict.reason}")
        else:
            aside = aside_name(folder, verdict)
            storage.remove(aside)
            storage.move_dir(folder, aside)
            what = "cannot be checked" if verdict.unrecorded else "is broken"
            say(f"{name} {what}, moved aside to {storage.name_of(aside)}: {verdict.reason}")
    return None


LEFTOVER_RE = re.compile(r"^\..+\.(partial|old)-")  # raylm.core.files' temporaries: `.NAME.partial-*`, `.NAME.old-*`


def remove_leftovers(run_dir: Where) -> list[str]:
    """Remove what interrupted atomic writes left in the run dir (a `.metrics.jsonl.partial-*`, a
    `.model.partial-*` dir); returns their names. Only while nothing else writes to the run dir."""
    found = [name for name, _ in storage.list_dir(run_dir) if LEFTOVER_RE.match(name)]
    for name in found:
        storage.remove(storage.child(run_dir, name))
    return found


def remove_checkpoint(folder: Where) -> None:
    """Records first, so a removal cut short leaves a partial folder, never a complete-looking one."""
    storage.remove(storage.join(folder, COMPLETE_DIR))
    storage.remove(folder)


def prune(run_dir: Where, keep: int) -> list[str]:
    """Keep the newest `keep` complete checkpoints; remove older ones and any partial folder older
    than the newest complete one (left by an earlier attempt). Returns the names removed.

    Run by world rank 0 once every rank has finished its part of the newest checkpoint.
    """
    kept, removed, newest_complete = 0, [], None
    for step, folder in checkpoint_folders(run_dir):
        _, verdict = records_verdict(folder, step)
        if verdict is None and kept < keep:
            kept += 1
            newest_complete = newest_complete or step
            continue
        if newest_complete is None:
            continue  # newer than every complete checkpoint: possibly being written
        remove_checkpoint(folder)
        removed.append(storage.name_of(folder))
    return removed
