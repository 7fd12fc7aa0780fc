"""A run dir on object storage (`--out s3://bucket/runs/tiny`): what is written where.

A run dir (`--out`) is a local path, or an `s3://`, `gs://` or `file://` URI (raylm/core/storage.py).
Its *home* is what the user named; every process also has a *work dir* on its own machine: the
home itself when it is a local path, else `~/.cache/raylm/runs/<hash of the URI>/<name>/`
(`RAYLM_CACHE_DIR` moves the root; the copy keeps the run's name, which reports show).

- Checkpoints go straight to the home, each rank its own part with its completion record
  (training/checkpoint_store.py); a resume copies the chosen checkpoint into a temporary local
  folder first (`fetch_checkpoint`), as DeepSpeed loads from a local path.
- The exported model dir is written by rank 0 into its work dir, then copied to `HOME/model/`,
  `config.json` last: a model dir without it is not one (`send_model`).
- The run's small files (metrics.jsonl, raylm.log, run_settings.json, run.json, report.md, plots/,
  worker-failures.log, error.log, finetune.json) are written into the work dir as on a local run.
  The driver fetches the home's copies before it starts (so a rerun on any machine goes on from
  them) and sends them back when it ends, finished, stopped or failed; rank 0 sends metrics.jsonl
  with every checkpoint, so a resume on another machine continues its metrics.
- The stop request (training/stop_request.py) travels through the home: the driver and rank 0
  may be on different machines with no disk in common.

A local home is its own work dir, and nothing here copies anything for it.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path

from raylm.core import storage
from raylm.core.files import atomic_dir

MODEL_SUBDIR = "model"
# What the driver fetches and sends: the run's own small files. Not the checkpoints (written to the
# home directly), nor the model dir (send_model), nor W&B's files (W&B syncs those itself, or `wandb
# sync` does from the machine that ran rank 0), nor the per-machine bookkeeping (`.workers/`, `.faults/`).
RUN_FILES = ("metrics.jsonl", "raylm.log", "run_settings.json", "run.json", "report.md", "worker-failures.log",
             "error.log", "finetune.json")
RUN_DIRS = ("plots",)


def work_dir(home: str | Path) -> Path:
    """This machine's working copy of the run dir `home` (the home itself when it is local)."""
    if not storage.is_uri(home):
        return Path(home).expanduser().resolve()
    digest = hashlib.sha256(str(home).rstrip("/").encode()).hexdigest()[:12]
    return storage.cache_root().parent / "runs" / digest / storage.name_of(home)


def is_remote(home: str | Path) -> bool:
    return storage.is_uri(home)


def run_file_names(home: str | Path) -> list[str]:
    """The run files (relative paths) present under the home: its top level listed, and the run
    dirs among it, not the checkpoints'."""
    names = []
    for name, is_dir in storage.list_dir(home):
        if is_dir and name in RUN_DIRS:
            names += [f"{name}/{rel}" for rel in storage.files_under(storage.join(home, name))]
        elif not is_dir and name in RUN_FILES:
            names.append(name)
    return sorted(names)


def fetch_run_files(home: str | Path) -> Path:
    """The driver, before a run: the home's run files into this machine's work dir (replacing what
    an earlier run on this machine left there); returns the work dir."""
    work = work_dir(home)
    work.mkdir(parents=True, exist_ok=True)
    if not is_remote(home):
        return work
    for name in [*RUN_FILES, *RUN_DIRS]:
        storage.remove(work / name)
    storage.download_dir(home, work, only=set(run_file_names(home)))
    return work


def send_run_files(home: str | Path) -> None:
    """The driver, after a run (finished, stopped or failed): the work dir's run files to the home."""
    if not is_remote(home):
        return
    work = work_dir(home)
    for name in RUN_FILES:
        if (work / name).is_file():
            storage.upload_file(work / name, storage.join(home, name))
    for name in RUN_DIRS:
        if (work / name).is_dir():
            storage.upload_dir(work / name, storage.join(home, name))


def send_metrics(home: str | Path) -> None:
    """Rank 0, with each checkpoint: metrics.jsonl to the home, where a resume elsewhere finds it."""
    work = work_dir(home)
    if is_remote(home) and (work / "metrics.jsonl").is_file():
        storage.upload_file(work / "metrics.jsonl", storage.join(home, "metrics.jsonl"))


def fetch_metrics(home: str | Path) -> None:
    """Rank 0 before it appends, the driver after the run: the home's metrics.jsonl into this
    machine's work dir (none there: none here either, whatever an earlier run on this machine left)."""
    if not is_remote(home):
        return
    work = work_dir(home)
    work.mkdir(parents=True, exist_ok=True)
    (work / "metrics.jsonl").unlink(missing_ok=True)
    if storage.is_file(storage.join(home, "metrics.jsonl")):
        storage.download_dir(home, work, only={"metrics.jsonl"})


def send_model(local_model: Path, home: str | Path) -> None:
    """Rank 0, after the export: the model dir to HOME/model, the old one removed first, config.json last."""
    if not is_remote(home):
        return
    target = storage.join(home, MODEL_SUBDIR)
    storage.remove(target)
    storage.upload_dir(local_model, target, last=("config.json",))


def fetch_model(home: str | Path) -> Path:
    """The driver, after a run: HOME/model in its work dir, copied unless rank 0 wrote the same one
    here (the model dir's manifest.json holds the weights' checksum: equal manifests, equal models)."""
    local = work_dir(home) / MODEL_SUBDIR
    if not is_remote(home):
        return local
    remote = storage.join(home, MODEL_SUBDIR)
    if not storage.is_file(storage.join(remote, "manifest.json")):
        return local  # no model dir (a run stopped on request exports none)
    same = (local / "manifest.json").is_file() and (local / "manifest.json").read_bytes() == storage.read_bytes(storage.join(remote, "manifest.json"))
    if not same:
        with atomic_dir(local) as building:
            storage.download_dir(remote, building)
    return local


OTHER_RANKS_FILE = re.compile(r"(?:^|/)(?:zero_pp_rank_|rank_)(\d+)[_.]")  # DeepSpeed's per-rank shards, our RNG states


def fetch_checkpoint(folder: str, rank: int | None = None) -> Path:
    """A checkpoint folder on object storage, copied into a fresh local temp dir of the same name
    (the caller removes it once loaded). With `rank`, only what that rank loads: not the other
    ranks' ZeRO shards and RNG states, nor an exported model dir (at N ranks, N copies of every
    shard would be N² of traffic); without, all of it (a universal conversion reads every shard)."""
    local = Path(tempfile.mkdtemp(prefix="raylm-resume-")) / storage.name_of(folder)
    local.mkdir()
    wanted = None
    if rank is not None:
        wanted = {rel for rel in storage.files_under(folder)
                  if not rel.startswith(f"{MODEL_SUBDIR}/")
                  and all(int(m.group(1)) == rank for m in OTHER_RANKS_FILE.finditer(rel) if not rel.startswith("complete/"))}
    storage.download_dir(folder, local, only=wanted)
    return local
