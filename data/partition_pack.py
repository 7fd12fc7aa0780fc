"""Exact dedup, the train/val split, packing and shard writing, on the Ray workers.

Encoded documents are hash-partitioned by their content hash (`assign_partitions`, a Ray Data
UDF), so every copy of a text lands in the same partition whichever task encoded it. Ray Data's
`groupby("partition").map_groups(pack_partition)` then hands each partition, whole, to one
worker task, which:
- sorts the partition's rows by corpus order (`order`), so what follows does not depend on how
  the rows arrived;
- counts what was read, skipped and redacted, and keeps the first error in corpus order;
- keeps the first few examples of each cleaning step (data/cleaning_report.py);
- drops exact duplicates, keeping the first in corpus order, then the near duplicates that
  data/near_dedup.py marked (marks are rows of the same partition with `near_duplicate` set);
- sends each document to train or val by its content hash (the top 64 bits against
  `val_fraction`; the partition uses the next 64 bits, so the two choices are independent);
- packs each split into rows of `seq_len + 1` ids (pack.ShardWriter) and writes the partition's
  own Parquet shards, `<split>/<split>-PPPPP-NNNNN.parquet`, straight into the dataset dir;
- returns one small record (JSON): counts, shards (path, rows, sha256), tail tokens dropped per
  split, and which node and process wrote them.

The driver only plans, gathers these records and writes the manifest. A partition's shards depend
only on the documents in it, so reruns are byte-identical whatever the scheduling. Each partition
drops its own tail (fewer than `seq_len + 1` tokens per split), which the plan keeps small by
sizing partitions (`PrepareConfig.partition_bytes`).
"""

from __future__ import annotations

import functools
import json
import os
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from raylm.core.redact import PLACEHOLDERS
from raylm.data.cleaning_report import EXAMPLES
from raylm.data.content_hash import is_val
from raylm.data.encode import encoded_schema, redaction_column
from raylm.data.near_dedup import bucket_band_rows, bucket_marks
from raylm.data.pack import ShardWriter

SPLITS = ("train", "val")
NO_ERROR = (2**63 - 1, None)  # (order, message) of a partition without an error


def partition_of(digest: bytes | None, order: int, partitions: int) -> int:
    """A kept document's partition comes from its content hash (copies meet); a skipped one's from its order."""
    if digest is None:
        return order % partitions
    return int.from_bytes(digest[8:16], "big") % partitions


def assign_partitions(batch: pa.Table, partitions: int) -> pa.Table:
    """Ray Data UDF: encoded rows -> the same rows with a `partition` column."""
    orders = batch.column("order").to_pylist()
    digests = batch.column("hash").to_pylist()
    column = [partition_of(digest, order, partitions) for digest, order in zip(digests, orders)]
    return batch.append_column("partition", pa.array(column, type=pa.int32()))


def writer_identity() -> dict:
    """Where this task runs: the Ray node id, the host and the process."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}


def first_error(rows: pa.Table) -> tuple[int, str | None]:
    """(order, message) of the first error among `rows` (sorted by order), or NO_ERROR."""
    errors = rows.column("error")
    if errors.null_count == len(errors):
        return NO_ERROR
    index = next(i for i, error in enumerate(errors.to_pylist()) if error is not None)
    return rows.column("order")[index].as_py(), errors[index].as_py()


def pack_partition(group: pa.Table, root: str, seq_len: int, dtype: str, rows_per_shard: int, val_fraction: float,
                   dedup: bool) -> pa.Table:
    """Ray Data map_groups UDF: one whole partition -> its shards on disk and one record row."""
    group = group.sort_by("order")
    is_mark = group.column("near_duplicate").to_numpy(zero_copy_only=False)
    near_duplicates = set(group.filter(is_mark).column("order").to_pylist())
    rows = group.filter(~is_mark)
    partition = group.column("partition")[0].as_py()
    record = {"partition": partition, "read": rows.num_rows, "writer": writer_identity()}
    record["redacted"] = {p: int(np.asarray(rows.column(redaction_column(p))).sum()) for p in PLACEHOLDERS}
    record["redacted_documents"] = {p: int((np.asarray(rows.column(redaction_column(p))) > 0).sum()) for p in PLACEHOLDERS}
    record["error"] = first_error(rows)
    if record["error"] != NO_ERROR:  # the run fails: write nothing for this partition
        record |= {"skipped": {}, "splits": {}}
        return pa.table({"partition": [partition], "record": [json.dumps(record)]})

    writers = {split: ShardWriter(root, split, seq_len, dtype, rows_per_shard, partition=partition) for split in SPLITS}
    skipped: Counter[str] = Counter()
    examples: dict[str, list[dict]] = {}
    seen: dict[bytes, str] = {}  # content hash -> source of its first copy
    ids = rows.column("ids").combine_chunks()
    offsets = ids.offsets.to_numpy()
    values = ids.values.to_numpy(zero_copy_only=False)
    columns = (rows.column(name).to_pylist() for name in ("skip", "hash", "order", "source", "example"))
    for i, (skip, digest, order, source, example) in enumerate(zip(*columns)):
        shown = json.loads(example) if example is not None else {}
        offer_redactions(examples, order, source, shown)
        if skip is not None:
            skipped[skip] += 1
            offer(examples, skip, order, source, shown)
            continue
        if dedup:
            if digest in seen:
                skipped["duplicate"] += 1
                offer(examples, "duplicate", order, source, shown, copy_of=seen[digest])
                continue
            seen[digest] = source
        if order in near_duplicates:
            skipped["near_duplicate"] += 1
            offer(examples, "near_duplicate", order, source, shown)
            continue
        split = "val" if is_val(digest, val_fraction) else "train"
        writers[split].add(values[offsets[i] : offsets[i + 1]])
    record["skipped"] = dict(skipped)
    record["examples"] = examples
    record["splits"] = {split: writer.close() | {"tokens_in": writer.tokens_in} for split, writer in writers.items()}
    return pa.table({"partition": [partition], "record": [json.dumps(record)]})


def offer(examples: dict[str, list[dict]], key: str, order: int, source: str, shown: dict, **extra) -> None:
    """Keep this document as an example of `key` while the partition has fewer than EXAMPLES (rows come in corpus order)."""
    chosen = examples.setdefault(key, [])
    if len(chosen) < EXAMPLES:
        chosen.append({"order": order, "source": source} | ({"snippet": shown["snippet"]} if "snippet" in shown else {}) | extra)


def offer_redactions(examples: dict[str, list[dict]], order: int, source: str, shown: dict) -> None:
    for placeholder, before_after in shown.get("redacted", {}).items():
        offer(examples, placeholder, order, source, {}, **before_after)


def near_duplicate_marks(survey, partitions: int, schema: pa.Schema):
    """A Ray Dataset of mark rows (`schema`, `near_duplicate` set): the documents of `survey` (the
    first pass's rows, data/first_pass.py) with an earlier candidate, found by grouping the LSH band
    keys across workers in `partitions` buckets (data/near_dedup.py). The driver passes references."""
    import ray
    import ray.data

    cut = ray.remote(bucket_band_rows).options(num_returns=partitions)
    pieces = [cut.remote(block, partitions) for block in survey.to_arrow_refs()]
    pieces = [piece if partitions > 1 else [piece] for piece in pieces]
    as_rows = functools.partial(mark_table, schema=schema)
    marks = [ray.remote(bucket_marks).remote(as_rows, *[piece[bucket] for piece in pieces]) for bucket in range(partitions)]
    return ray.data.from_arrow_refs(marks)


def pack_schema(id_dtype: str) -> pa.Schema:
    """The pack input's schema: the encoded rows', their partition and `near_duplicate`."""
    return pa.schema([*encoded_schema(id_dtype), pa.field("partition", pa.int32()), pa.field("near_duplicate", pa.bool_())])


def mark_table(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """(order, partition) rows -> rows of the pack input's `schema`: nulls but for the order, the
    partition and `near_duplicate`."""
    given = {"order": batch.column("order"), "partition": batch.column("partition"),
             "near_duplicate": pa.array(np.ones(batch.num_rows, dtype=bool))}
    return pa.table({field.name: given.get(field.name, pa.nulls(batch.num_rows, field.type)) for field in schema}, schema=schema)


def not_marks(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: encoded rows -> the pack input (`near_duplicate` false)."""
    return batch.append_column("near_duplicate", pa.array(np.zeros(batch.num_rows, dtype=bool)))


def pack_on_workers(encoded, partitions: int, root: Path, seq_len: int, dtype: str, rows_per_shard: int,
                    val_fraction: float, dedup: bool, survey=None) -> list[dict]:
    """Run the partitioned dedup + pack + write over `encoded` (a Ray Dataset); the records, by partition.
    With a `survey` (near-dedup on), its near-duplicate marks join the encoded rows in their partitions;
    the encoded rows stream through, never held whole."""
    kwargs = {"root": str(root), "seq_len": seq_len, "dtype": dtype, "rows_per_shard": rows_per_shard,
              "val_fraction": val_fraction, "dedup": dedup}
    encoded = encoded.map_batches(assign_partitions, batch_format="pyarrow", fn_kwargs={"partitions": partitions})
    pack_input = encoded.map_batches(not_marks, batch_format="pyarrow")
    if survey is not None and survey.count():  # (a materialized survey counts its rows from metadata)
        pack_input = pack_input.union(near_duplicate_marks(survey, partitions, pack_schema(dtype)))
    packed = pack_input.groupby("partition", num_partitions=partitions).map_groups(pack_partition, batch_format="pyarrow", fn_kwargs=kwargs)
    records = [json.loads(row["record"]) for row in packed.take_all()]
    return sorted(records, key=lambda record: record["partition"])
