"""Where a split's rows come from, in chunks a rank can read on its own.

A row source is a list of chunks (file order) and a way to read one chunk's rows:
- `ParquetRows`: a dataset dir's split, one chunk per Parquet row group (`raylm prepare` writes
  groups of 64 rows). A rank opens the shards itself, through pyarrow's filesystems (a local path
  or an s3://, gs://, file:// URI), and reads only the groups the data order gives it; the driver
  reads only the files' footers, to learn the group sizes.
- `ArrayRows`: rows already in memory (a chat set the driver encoded), cut into fixed-size chunks
  and shipped to the workers with the loop's config.

Rows are numpy arrays per column (`input_ids`, and `loss_mask` / `segment_ids` when the split
has them), `[rows, seq_len + 1]`, in the dtype stored; the data order (training/data_order.py)
decides which chunks each rank reads and counts what it read.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from raylm.core import storage
from raylm.core.errors import UserError

Rows = dict[str, np.ndarray]  # column name -> [rows, seq_len + 1]
ROW_COLUMNS = ("input_ids", "loss_mask", "segment_ids")  # what a training row may carry
ARRAY_CHUNK_ROWS = 64  # chunk size of in-memory rows, as `raylm prepare`'s row groups
OPEN_FILES = 16  # Parquet files a rank keeps open at once


def open_input(uri: str):
    """A readable pyarrow file for a local path or a filesystem URI (s3://, gs://, file://)."""
    fs, path = storage.filesystem(uri)
    with storage.storage_errors(uri):
        return fs.open_input_file(path)


def group_sizes(uri: str) -> list[int]:
    import pyarrow.parquet as pq

    with open_input(uri) as file:
        metadata = pq.read_metadata(file)
    return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]


def list_column_rows(column, dtype=None) -> np.ndarray:
    """A list<int|bool> Arrow column of equal-length lists -> a [rows, length] array (no copy where it can)."""
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    rows = len(column)
    values = column.flatten().to_numpy(zero_copy_only=False)
    if rows and len(values) % rows:
        raise UserError("a training split's rows differ in length; a dataset dir holds rows of exactly seq_len + 1 ids")
    array = values.reshape(rows, -1) if rows else values.reshape(0, 0)
    return array.astype(dtype) if dtype is not None else array


class ParquetRows:
    """A split's Parquet shards, chunked by row group. Picklable: it carries paths and sizes only."""

    def __init__(self, paths: list[str], sizes: list[list[int]] | None = None):
        self.paths = list(paths)
        if sizes is None:
            with ThreadPoolExecutor(max_workers=16) as pool:  # footers only; many small reads on object storage
                sizes = list(pool.map(group_sizes, self.paths))
        self.chunks: list[tuple[int, int]] = [(f, g) for f, groups in enumerate(sizes) for g in range(len(groups))]
        self.chunk_rows: list[int] = [n for groups in sizes for n in groups]
        self.num_rows = sum(self.chunk_rows)
        self._files: OrderedDict | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_files"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _files=None)

    def _parquet_file(self, index: int):
        import pyarrow.parquet as pq

        if self._files is None:
            self._files = OrderedDict()
        if index not in self._files:
            if len(self._files) >= OPEN_FILES:
                _, oldest = self._files.popitem(last=False)
                oldest.close()
            self._files[index] = pq.ParquetFile(open_input(self.paths[index]))
        self._files.move_to_end(index)
        return self._files[index]

    def read(self, chunk: int) -> Rows:
        file_index, group = self.chunks[chunk]
        parquet = self._parquet_file(file_index)
        columns = [name for name in ROW_COLUMNS if name in parquet.schema_arrow.names]
        with storage.storage_errors(self.paths[file_index]):
            table = parquet.read_row_group(group, columns=columns)
        return {name: list_column_rows(table.column(name), bool if name == "loss_mask" else None) for name in columns}


class ArrayRows:
    """Rows in memory, chunked by ARRAY_CHUNK_ROWS."""

    def __init__(self, rows: Rows):
        self.rows = rows
        self.num_rows = len(rows["input_ids"])
        self.chunk_rows = [min(ARRAY_CHUNK_ROWS, self.num_rows - start) for start in range(0, self.num_rows, ARRAY_CHUNK_ROWS)]

    @classmethod
    def from_records(cls, records: list[dict]) -> ArrayRows:
        """[{input_ids, loss_mask?, segment_ids?}, ...] -> ArrayRows (one row per record)."""
        if not records:
            return cls({"input_ids": np.zeros((0, 0), dtype=np.int64)})
        return cls({name: np.stack([np.asarray(r[name]) for r in records]) for name in ROW_COLUMNS if name in records[0]})

    def read(self, chunk: int) -> Rows:
        start = chunk * ARRAY_CHUNK_ROWS
        return {name: array[start : start + ARRAY_CHUNK_ROWS] for name, array in self.rows.items()}


def first_rows(source, count: int) -> Rows | None:
    """The source's first `count` rows in file order (0 = all of them); None when it has none."""
    parts: list[Rows] = []
    taken = 0
    for chunk, size in enumerate(source.chunk_rows):
        if count and taken >= count:
            break
        rows = source.read(chunk)
        keep = size if not count else min(size, count - taken)
        parts.append({name: array[:keep] for name, array in rows.items()})
        taken += keep
    if not taken:
        return None
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
