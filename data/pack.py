"""Packing: a stream of documents' ids -> Parquet shards of rows of exactly `seq_len + 1` ids.

Documents (each ending in `<|endoftext|>`) are concatenated in corpus order and cut into
consecutive, non-overlapping rows; a row may hold the end of one document and the start of the
next. What is left at the end (fewer than `seq_len + 1` ids) is the tail: it is dropped and
counted, so tokens written + tail == tokens produced. Shards are written whole, in order, with
fixed Parquet settings, so the same stream gives byte-identical files.

`raylm prepare` runs one writer per split in each hash partition of the corpus, on the Ray
workers (data/partition_pack.py); the partition's number is in its shards' names, so writers of
different partitions never collide.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from raylm.core import storage

# Training reads a split by row groups, each rank only its own (training/row_source.py): small
# groups let the data order shuffle finely and keep the rows read per row trained near 1.0.
ROW_GROUP_ROWS = 64


class ShardWriter:
    """Packs one split (train or val) into `<dir>/<split>/<split>-NNNNN.parquet`, or
    `<split>-PPPPP-NNNNN.parquet` for partition PPPPP."""

    def __init__(self, root: str | Path, split: str, seq_len: int, dtype: str, rows_per_shard: int, partition: int | None = None):
        self.root = root  # the dataset dir being built: a local path, or a URI (raylm/core/storage.py)
        self.split = split
        self.stem = split if partition is None else f"{split}-{partition:05d}"
        self.row_len = seq_len + 1
        self.dtype = np.dtype(dtype)
        self.rows_per_shard = max(1, rows_per_shard)
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []
        self.documents = 0
        self.tokens_in = 0

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.pending_tokens += len(ids)
        self.tokens_in += len(ids)
        self.documents += 1
        while self.pending_tokens >= self.rows_per_shard * self.row_len:
            self.flush(self.rows_per_shard)

    def flush(self, rows: int) -> None:
        """Write the next `rows` full rows as one shard; keep the rest pending."""
        stream = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        used = rows * self.row_len
        self.write_shard(stream[:used].reshape(rows, self.row_len))
        rest = stream[used:]
        self.pending = [rest] if len(rest) else []
        self.pending_tokens = len(rest)

    def write_shard(self, rows: np.ndarray) -> None:
        relative = f"{self.split}/{self.stem}-{len(self.shards):05d}.parquet"
        path = storage.join(self.root, relative)
        if not storage.is_uri(path):  # not parents: a worker must not re-create a dataset dir the driver has removed
            Path(path).parent.mkdir(exist_ok=True)
        sha256 = storage.write_parquet(rows_table(rows), path, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        self.shards.append({"path": relative, "rows": int(rows.shape[0]), "sha256": sha256})

    def close(self) -> dict:
        """Write the last full rows; drop the tail; return the split's manifest entry."""
        full_rows = self.pending_tokens // self.row_len
        if full_rows:
            self.flush(full_rows)
        sequences = sum(shard["rows"] for shard in self.shards)
        return {
            "documents": self.documents,
            "sequences": sequences,
            "tokens": sequences * self.row_len,
            "tail_tokens_dropped": self.pending_tokens,
            "shards": self.shards,
        }


def rows_table(rows: np.ndarray) -> pa.Table:
    """(n, seq_len + 1) ids -> a table with one list column `input_ids`."""
    n, width = rows.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    values = pa.array(rows.reshape(-1))
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, values)})
