"""The first pass over the corpus: what near-dedup and decontamination must know of every document
before any document is encoded.

`survey_documents` (a Ray Data UDF, on the workers) judges each document by the quality rules (one
they drop takes part in neither step) and gives each kept one
- its pack partition (from its content hash, as data/partition_pack.py assigns it) and its LSH band
  keys (data/near_dedup.py), when near-dedup is on;
- its word n-gram hashes when the val split chooses it (data/decontaminate.py), when
  decontamination is on.
The survey is small (9 keys per document, n-grams for the val split's only) and is materialized
once: the near-duplicate marks are grouped from it (data/partition_pack.py joins them to the
packing), and the reference set is merged from it and the evaluation sets. The encoded corpus itself
is then streamed straight into the packing, never held whole in the object store.

So near-dedup compares documents as read, after the quality rules and before decontamination and
redaction: a near copy of a document that is later dropped as contaminated is dropped too (it
shares most of its n-grams, so it is most likely contaminated itself).
"""

from __future__ import annotations

import pyarrow as pa

from raylm.data.content_hash import content_hash, is_val
from raylm.data.decontaminate import (
    merge_reference,
    ngram_hashes,
    reference_ngrams,
)
from raylm.data.near_dedup import document_band_keys
from raylm.data.partition_pack import partition_of
from raylm.data.quality import QualityConfig, quality_problem

SURVEY_SCHEMA = pa.schema([("order", pa.int64()), ("partition", pa.int32()), ("bands", pa.list_(pa.uint64())),
                           ("ngrams", pa.large_list(pa.uint64()))])


def survey_documents(batch: pa.Table, partitions: int, quality: dict | None, near_dedup: dict | None, ngram: int | None,
                     val_fraction: float) -> pa.Table:
    """Ray Data UDF: document rows -> one survey row per kept document that has band keys or val n-grams."""
    rules = QualityConfig(**quality) if quality is not None else None
    rows = []
    columns = (batch.column(name).to_pylist() for name in ("text", "skip", "source", "order"))
    for text, skip, source, order in zip(*columns):
        if text is None or skip is not None or not text.strip():
            continue
        if rules is not None and quality_problem(text, source, rules) is not None:
            continue
        digest = content_hash(text)
        bands = document_band_keys(text, **near_dedup) if near_dedup is not None else None
        ngrams = ngram_hashes(text, ngram) if ngram is not None and is_val(digest, val_fraction) else None
        if bands is not None or ngrams is not None:
            rows.append({"order": order, "partition": partition_of(digest, order, partitions), "bands": bands, "ngrams": ngrams})
    return pa.Table.from_pylist(rows, schema=SURVEY_SCHEMA)


def first_pass(documents, eval_sets: dict, partitions: int, quality: dict | None, near_dedup: dict | None, ngram: int | None,
               val_fraction: float):
    """Survey `documents` (a Ray Dataset of document rows) on the cluster. Returns (the materialized
    survey, or None when neither step is on; an object ref to the reference set, or None; the
    reference set's record from merge_reference). `eval_sets` is {name: Ray Dataset of document rows}."""
    import ray

    if near_dedup is None and ngram is None:
        return None, None, None
    survey = documents.map_batches(survey_documents, batch_format="pyarrow",
                                   fn_kwargs={"partitions": partitions, "quality": quality, "near_dedup": near_dedup,
                                              "ngram": ngram, "val_fraction": val_fraction}).materialize()
    if ngram is None:
        return survey, None, None
    blocks = survey.to_arrow_refs() if val_fraction > 0 else []
    sets = [dataset.map_batches(reference_ngrams, batch_format="pyarrow", fn_kwargs={"set_name": name, "ngram": ngram})
            for name, dataset in eval_sets.items()]
    if sets:
        blocks += (sets[0].union(*sets[1:]) if len(sets) > 1 else sets[0]).materialize().to_arrow_refs()
    if not blocks:
        return survey, None, {"documents": {}, "ngrams": 0, "error": None}
    reference, record = ray.remote(num_returns=2)(merge_reference).remote(*blocks)
    return survey, reference, ray.get(record)
