"""The data order: which rows each optimizer step trains on, and which rank reads them.

Every row is read by one rank per epoch, and the order is a pure function of (data.shuffle_seed,
epoch, global batch G, shuffle window) and of the split's chunks (training/row_source.py):
never of the worker count or the micro-batch size. For epoch e:

1. The chunks (Parquet row groups of 64 rows) are permuted by (seed, e), the whole split at once,
   and laid end to end: one sequence of N rows.
2. That sequence is cut into G streams of L = N // G consecutive rows (the last N - G * L rows
   wait for another epoch's permutation). An epoch has L steps.
3. Each stream is shuffled in windows of w = shuffle_window // G rows, each window by
   (seed, e, stream, window index).
4. Step s's global batch is row s of every stream, stream 0 first. Rank r of W takes streams
   r * G/W ... (r+1) * G/W - 1: a contiguous slice of the global batch, and a contiguous range of
   the sequence, so it reads only the chunks of that range (those at its two ends are shared with
   its neighbours: at most W - 1 chunks are read twice per epoch).

Resuming at step s of an epoch starts every stream at its row s. A run resumed exactly at an
epoch's end goes on with the next epoch. A rank holds at most G/W windows of w rows (the
shuffle window over its share) and the few chunks that straddle two of its windows.

Micro-batches are whole rows as tensors; turning a row into inputs and targets is the loss's
business (training/losses.py).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator

import numpy as np
import torch

from raylm.training.row_source import Rows


class EpochPlan:
    """Epoch `epoch`'s order over a source's chunks: the permuted sequence and its streams."""

    def __init__(self, chunk_rows: list[int], streams: int, window: int, seed: int, epoch: int):
        self.seed, self.epoch, self.streams = seed, epoch, streams
        self.order = np.random.default_rng([seed, epoch]).permutation(len(chunk_rows))
        sizes = np.asarray(chunk_rows, dtype=np.int64)[self.order]
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # sequence position of each permuted chunk
        self.steps = int(self.starts[-1]) // streams  # L: rows per stream, steps per epoch
        self.window = max(1, min(window // streams, self.steps or 1))

    def windows(self, first_step: int) -> Iterator[tuple[int, int, int]]:
        """(window index, first step, end step) of the epoch's windows from `first_step` on."""
        for index in range(first_step // self.window, -(-self.steps // self.window)):
            yield index, index * self.window, min((index + 1) * self.window, self.steps)

    def pieces(self, stream: int, begin: int, end: int) -> list[tuple[int, int, int]]:
        """Steps begin..end of `stream` as (chunk, first row, end row) pieces of the chunks, in order."""
        lo, hi = stream * self.steps + begin, stream * self.steps + end
        out = []
        position = int(np.searchsorted(self.starts, lo, side="right")) - 1
        while lo < hi:
            chunk_start, chunk_end = int(self.starts[position]), int(self.starts[position + 1])
            take_end = min(hi, chunk_end)
            out.append((int(self.order[position]), lo - chunk_start, take_end - chunk_start))
            lo, position = take_end, position + 1
        return out

    def permutation(self, stream: int, window: int, size: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch, stream, window]).permutation(size)


class RankReader:
    """One rank's rows of one epoch, read chunk by chunk; a chunk two windows share is read once."""

    def __init__(self, source, plan: EpochPlan, streams: range, first_step: int):
        self.source, self.plan, self.streams = source, plan, streams
        self.uses: Counter[int] = Counter()  # chunk -> window pieces still to read it
        for _, begin, end in plan.windows(first_step):
            for stream in streams:
                self.uses.update(chunk for chunk, _, _ in plan.pieces(stream, begin, end))
        self.cached: dict[int, Rows] = {}
        self.rows_read = 0

    def chunk(self, index: int) -> Rows:
        rows = self.cached.get(index)
        if rows is None:
            rows = self.source.read(index)
            self.rows_read += len(rows["input_ids"])
        self.uses[index] -= 1
        if self.uses[index] > 0:
            self.cached[index] = rows
        else:  # its last use: forget it, so a finished epoch's reader holds only its count
            self.cached.pop(index, None)
            del self.uses[index]
        return rows

    def window(self, index: int, begin: int, end: int) -> Rows:
        """Rows [streams, end - begin, ...] of this window: each stream's rows, in its own permutation."""
        per_stream = []
        for stream in self.streams:
            parts = [(self.chunk(c), lo, hi) for c, lo, hi in self.plan.pieces(stream, begin, end)]
            rows = {name: np.concatenate([p[name][lo:hi] for p, lo, hi in parts]) for name in parts[0][0]}
            order = self.plan.permutation(stream, index, end - begin)
            per_stream.append({name: array[order] for name, array in rows.items()})
        return {name: np.stack([rows[name] for rows in per_stream]) for name in per_stream[0]}


def rank_streams(global_batch: int, rank: int, world: int) -> range:
    per_rank = global_batch // world
    return range(rank * per_rank, (rank + 1) * per_rank)


def epoch_rows(source, plan: EpochPlan, streams: range, first_step: int, reader_out: list | None = None) -> Iterator[Rows]:
    """This rank's rows of each step of the epoch from `first_step` on: [len(streams), seq_len + 1] per column."""
    reader = RankReader(source, plan, streams, first_step)
    if reader_out is not None:
        reader_out.append(reader)
    for index, begin, end in plan.windows(first_step):
        rows = reader.window(index, begin, end)
        for step in range(max(begin, first_step), end):
            yield {name: array[:, step - begin] for name, array in rows.items()}


def epoch_batches(source, window: int, seed: int, global_batch: int, epoch: int, skip_rows: int,
                  rank: int = 0, world: int = 1, reads: list | None = None) -> Iterator[tuple[int, Rows]]:
    """(epoch, this rank's rows of a step) from where a run stands on, epoch after epoch, without end.

    `skip_rows` are the rows of `epoch` already trained (a multiple of the global batch). An epoch
    with nothing left (a resume at its very end) passes to the next. `reads`, when given, collects
    each epoch's RankReader, whose `rows_read` counts what this rank read.
    """
    streams = rank_streams(global_batch, rank, world)
    first_step = skip_rows // global_batch
    while True:
        plan = EpochPlan(source.chunk_rows, global_batch, window, seed, epoch)
        if plan.steps == 0:
            raise RuntimeError(f"the train split has {plan.starts[-1]} rows, fewer than one global batch ({global_batch} rows)")
        if first_step < plan.steps:
            for rows in epoch_rows(source, plan, streams, first_step, reads):
                yield epoch, rows
        epoch, first_step = epoch + 1, 0


def micro_batches(rows: Rows, size: int, accum: int, device) -> list[dict[str, torch.Tensor]]:
    """This rank's rows of a step cut into `accum` micro-batches of `size` rows, as int64/bool tensors."""
    def tensor(array: np.ndarray) -> torch.Tensor:  # a copy: rows may be read-only Arrow buffers
        return torch.from_numpy(array.astype(bool if array.dtype == bool else np.int64)).to(device)

    return [{name: tensor(array[i * size : (i + 1) * size]) for name, array in rows.items()} for i in range(accum)]


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
    mine = {name: array[rank * per_rank : (rank + 1) * per_rank] for name, array in columns.items()}
    return [micro_batches({n: a[start : start + size] for n, a in mine.items()}, size, 1, device)[0]
            for start in range(0, per_rank, size)]
