"""Decontamination: a training document that shares a long word n-gram with the val split or with an
evaluation set is dropped, so that neither measures text the model was trained on.

An n-gram is a run of `ngram` consecutive words (split on ASCII whitespace and compared byte for
byte, as near-dedup's shingles; data/near_dedup.py), hashed to 64 bits. Words, not the BPE's
tokens: the check then does not depend on the tokenizer (an evaluation set is compared as text),
and 13 words is GPT-3's choice (Brown et al. 2020, appendix C), whereas 13 BPE tokens of code are
a few words, the size of the boilerplate every file shares. A document of fewer than `ngram`
words has no n-gram: it neither contaminates nor is dropped.

Two passes, both on the Ray workers:
1. The reference set: the first pass (data/first_pass.py) hashes the n-grams of the documents the
   val split chooses (by content hash, as data/partition_pack.py splits them; those the quality
   rules drop are left out, since they never reach val), `reference_ngrams` those of every document
   of each evaluation set, and one task (`merge_reference`) merges them into one sorted array in the
   object store. The driver holds its reference, not its contents.
2. The check: each encode task (data/encode.py) takes that array from the object store (zero-copy,
   once per process) and drops every train document with an n-gram in it (`first_shared_ngram`,
   a binary search per n-gram), as `contaminated`.

Why a broadcast set and not a hash-partitioned join of n-grams: the join would shuffle one row per
word of the whole corpus, while the set holds only the val split's and the evaluation sets' n-grams,
8 bytes per word of them: 0.9 MB for the embedded corpus's val split, 80 MB for 10 M words of val and
evaluation text. Past a few hundred MB (a val split of billions of words), the join is the way.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

from raylm.data.content_hash import is_val
from raylm.data.near_dedup import WORD_BASE, power_table, word_hashes

WORD = re.compile(r"[^\t\n\x0b\x0c\r ]+")  # a word as word_hashes splits them (ASCII whitespace only)
REFERENCE_SCHEMA = pa.schema([("set", pa.string()), ("ngrams", pa.large_list(pa.uint64())), ("error_order", pa.int64()),
                              ("error", pa.string())])

# The reference array of the last set this worker process used: (object ref id, array).
_REFERENCE: tuple[str, np.ndarray] | None = None


def ngram_hashes(text: str, ngram: int) -> np.ndarray:
    """64-bit hashes of the runs of `ngram` consecutive words of `text` (none when it is shorter)."""
    words = word_hashes(text)
    count = len(words) - ngram + 1
    if count < 1:
        return np.zeros(0, dtype=np.uint64)
    mixed = np.zeros(count, dtype=np.uint64)
    for offset, factor in enumerate(power_table(WORD_BASE, ngram)):
        mixed += words[offset : offset + count] * factor
    mixed ^= mixed >> np.uint64(29)  # the low bits of a polynomial hash mix poorly: fold the high ones in
    return mixed * np.uint64(0xBF58476D1CE4E5B9)


def reference_ngrams(batch: pa.Table, set_name: str, ngram: int) -> pa.Table:
    """Ray Data UDF: an evaluation set's document rows -> reference rows: the n-gram hashes of each
    document, and the documents' errors (order, message)."""
    rows = [{"set": set_name, "ngrams": None if text is None else ngram_hashes(text, ngram), "error_order": order if error else None,
             "error": error}
            for text, order, error in zip(*(batch.column(name).to_pylist() for name in ("text", "order", "error")))
            if text is not None or error is not None]
    return pa.Table.from_pylist(rows, schema=REFERENCE_SCHEMA)


def merge_reference(*blocks: pa.Table) -> tuple[np.ndarray, dict]:
    """Ray task over reference rows, one per document: the first pass's survey blocks (the val split's
    n-grams in column `ngrams`, data/first_pass.py) and reference_ngrams' (an evaluation set's, named in
    `set`). Returns (the sorted unique n-gram hashes, a small record: documents per set, the n-grams
    in all, and the first error of an evaluation set)."""
    values, documents, errors = [], {}, []
    for block in blocks:
        ngrams = block.column("ngrams").combine_chunks()
        values.append(ngrams.flatten().to_numpy(zero_copy_only=False))
        names = block.column("set").to_pylist() if "set" in block.column_names else ["val"] * block.num_rows
        for name, counted in zip(names, ngrams.is_valid().to_pylist()):
            documents[name] = documents.get(name, 0) + counted
        if "error" in block.column_names:
            errors += [(order, name, error) for name, order, error in
                       zip(names, block.column("error_order").to_pylist(), block.column("error").to_pylist()) if error]
    reference = np.unique(np.concatenate(values).astype(np.uint64)) if values else np.zeros(0, dtype=np.uint64)
    first = min(errors) if errors else None
    return reference, {"documents": documents, "ngrams": int(len(reference)), "error": first and [first[1], first[2]]}


def reference_array(reference) -> np.ndarray:
    """The reference set behind an object ref, fetched once per worker process."""
    global _REFERENCE
    import ray

    key = reference.hex()
    if _REFERENCE is None or _REFERENCE[0] != key:
        _REFERENCE = (key, ray.get(reference))
    return _REFERENCE[1]


def first_shared_ngram(text: str, ngram: int, reference: np.ndarray) -> int | None:
    """The word position of `text`'s first n-gram that is in `reference` (sorted), or None."""
    hashes = ngram_hashes(text, ngram)
    if not len(hashes) or not len(reference):
        return None
    index = np.minimum(np.searchsorted(reference, hashes), len(reference) - 1)
    hits = np.flatnonzero(reference[index] == hashes)
    return int(hits[0]) if len(hits) else None


def shared_words(text: str, position: int, ngram: int) -> str:
    """The words `position` to `position + ngram` of `text`, as first_shared_ngram counts them."""
    words = [match.group(0) for _, match in zip(range(position + ngram), WORD.finditer(text))]
    return " ".join(words[position:])


def drop_contaminated(texts: list[str | None], skips: list[str | None], digests: list[bytes | None], ngram: int, reference,
                      val_fraction: float) -> list[int | None]:
    """Drop, in place, the train documents (by content hash) that share an n-gram with the reference
    set (an object ref); `skips` gets `contaminated`. Returns the shared n-gram's word position per document."""
    array = reference_array(reference)
    positions: list[int | None] = [None] * len(texts)
    for i, text in enumerate(texts):
        if text is None or is_val(digests[i], val_fraction):
            continue
        positions[i] = first_shared_ngram(text, ngram, array)
        if positions[i] is not None:
            texts[i], skips[i] = None, "contaminated"
    return positions

