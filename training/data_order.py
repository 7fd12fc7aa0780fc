"""The data order: which rows each optimizer step trains on, and which of them each rank takes.

The order is a pure function of (data.shuffle_seed, epoch) and independent of the worker count:
every worker reads the whole split (Ray Data, not split across workers), in file order, permutes
it window by window with a seeded RNG, and the global batch of step s is the next `global_batch`
rows of that stream; worker r takes its contiguous slice of the global batch. Resuming skips the
rows already consumed. This trades reading the split once per worker for exactness: identical
batches on a restart, a re-run, or at another worker count with the same global batch, and equal
step counts on every rank by construction. (The driver materializes small splits in Ray's object
store, and each worker then reads such a split into its own memory once: `InMemoryShard`.)

Micro-batches are whole rows (`input_ids`, and `loss_mask` / `segment_ids` when the rows have
them) as tensors; turning a row into inputs and targets is the loss's business (training/losses.py).

An epoch ends when fewer rows than a global batch are left; the next epoch starts from its first
row under its own shuffle. A run resumed exactly at an epoch's end (every row consumed) goes on
with the next epoch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

Rows = dict[str, np.ndarray]  # column name -> [rows, seq_len + 1]


def as_columns(batch: dict) -> Rows:
    """A Ray Data numpy batch -> 2-D int arrays for input_ids and (when present) loss_mask."""
    columns = {"input_ids": np.stack(list(batch["input_ids"])).astype(np.int64)}
    if "loss_mask" in batch:
        columns["loss_mask"] = np.stack(list(batch["loss_mask"])).astype(bool)
    if "segment_ids" in batch:
        columns["segment_ids"] = np.stack(list(batch["segment_ids"])).astype(np.int64)
    return columns


class InMemoryShard:
    """A small train split read into this worker's memory once; every epoch walks it there.

    Why: iterating a Ray Dataset runs Ray Data's streaming executor beside the train step for the
    whole epoch; on a 2-core machine that cost a 1-worker run about 15% of its throughput against
    Hugging Face Trainer (bench/train.py, part 4). The rows and their order are the shard's own and
    `iter_batches` cuts the same windows, so the data order, and every resume, are unchanged.
    Used for splits under data.materialize_max_mb (the driver materializes those already).
    """

    def __init__(self, shard):
        batches = [as_columns(b) for b in shard.iter_batches(batch_size=4096, batch_format="numpy") if len(b["input_ids"])]
        self.rows: Rows = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]} if batches else {}

    def iter_batches(self, batch_size: int, batch_format: str = "numpy", drop_last: bool = False) -> Iterator[Rows]:
        count = len(self.rows["input_ids"]) if self.rows else 0
        for start in range(0, count, batch_size):
            if drop_last and start + batch_size > count:
                return
            yield {name: array[start : start + batch_size] for name, array in self.rows.items()}


def shuffled_rows(shard, window: int, seed: int, epoch: int) -> Iterator[Rows]:
    """The epoch's rows in windows of `window` rows, each permuted by (seed, epoch, window index)."""
    for index, batch in enumerate(shard.iter_batches(batch_size=window, batch_format="numpy", drop_last=False)):
        columns = as_columns(batch)
        order = np.random.default_rng([seed, epoch, index]).permutation(len(columns["input_ids"]))
        yield {name: array[order] for name, array in columns.items()}


def global_batches(shard, window: int, seed: int, epoch: int, size: int, skip_rows: int) -> Iterator[Rows]:
    """Consecutive `size`-row global batches of the epoch's stream, after skipping `skip_rows` rows.

    The tail shorter than a global batch is dropped, so every rank sees the same step count.
    """
    pending: Rows | None = None
    for chunk in shuffled_rows(shard, window, seed, epoch):
        if skip_rows:
            drop = min(skip_rows, len(chunk["input_ids"]))
            chunk = {name: array[drop:] for name, array in chunk.items()}
            skip_rows -= drop
        pending = chunk if pending is None else {n: np.concatenate([pending[n], chunk[n]]) for n in chunk}
        while len(pending["input_ids"]) >= size:
            yield {name: array[:size] for name, array in pending.items()}
            pending = {name: array[size:] for name, array in pending.items()}


def micro_batch(rows: Rows, start: int, size: int, device) -> dict[str, torch.Tensor]:
    """Rows start..start+size of every column, as tensors on `device`."""
    return {name: torch.from_numpy(array[start : start + size]).to(device) for name, array in rows.items()}


def rank_micro_batches(batch: Rows, rank: int, size: int, accum: int, device) -> list[dict[str, torch.Tensor]]:
    """This rank's contiguous slice of a global batch, cut into `accum` micro-batches of `size` rows."""
    first = rank * size * accum
    return [micro_batch(batch, first + i * size, size, device) for i in range(accum)]


def epoch_batches(shard, window: int, seed: int, size: int, epoch: int, skip_rows: int) -> Iterator[tuple[int, Rows]]:
    """(epoch, global batch) from where a run stands on, epoch after epoch, without end.

    An epoch that has nothing left to give (a resume at its very end) passes to the next one; an
    epoch that gives nothing from its start means the split holds fewer rows than one global batch.
    """
    while True:
        stepped = False
        for batch in global_batches(shard, window, seed, epoch, size, skip_rows):
            stepped = True
            yield epoch, batch
        if not stepped and skip_rows == 0:
            raise RuntimeError(f"the train split has fewer rows than one global batch ({size} rows)")
        epoch, skip_rows = epoch + 1, 0


def eval_micro_batches(eval_rows: Rows | None, size: int, rank: int, world: int, device) -> list[dict[str, torch.Tensor]]:
    """This rank's contiguous share of the fixed eval set, in micro-batches of up to `size` rows.

    Every row is scored once, whatever the world size: the set is cut into `world` shares of
    ceil(rows / world) rows, and the last shares are filled up with rows whose loss_mask is all
    False, so that every rank runs the same number of forwards (ZeRO-3 gathers weights
    collectively) while only real rows count. The loss is then summed over ranks and divided by
    the total count, not averaged per rank.
    """
    if not eval_rows:
        return []
    n = len(eval_rows["input_ids"])
    per_rank = -(-n // world)
    columns = dict(eval_rows)
    if "loss_mask" not in columns:
        columns["loss_mask"] = np.ones_like(columns["input_ids"], dtype=bool)
    missing = per_rank * world - n
    if missing:
        filler = {name: np.repeat(array[:1], missing, axis=0) for name, array in columns.items()}
        filler["loss_mask"][:] = False
        columns = {name: np.concatenate([array, filler[name]]) for name, array in columns.items()}
    # A copy: the rows may be read-only Arrow buffers, which torch.from_numpy warns about.
    mine = {name: array[rank * per_rank : (rank + 1) * per_rank].copy() for name, array in columns.items()}
    return [micro_batch(mine, start, size, device) for start in range(0, per_rank, size)]
