"""Near-duplicate documents: MinHash signatures over word shingles, LSH bands grouped across workers.

A document's shingles are its runs of `shingle_words` consecutive words (words as whitespace
separates them, compared byte for byte), each hashed to 32 bits. Its MinHash signature takes, for
each of `permutations` random affine permutations of those hashes, the smallest value; two
documents agree on one signature value with probability equal to the Jaccard similarity of their
shingle sets. LSH cuts the signature into `bands` bands of `rows` values, chosen for the Jaccard
`threshold` as datasketch's MinHashLSH chooses them (the least false positives plus false
negatives): documents that agree on a whole band are candidates, and a document is dropped as a
near duplicate when a document earlier in corpus order is its candidate.

The signature follows datasketch's default ("affine32") scheme, seed 1: the shingle hash is mixed
with MurmurHash3's 32-bit finalizer, then each permutation is `a * h + b mod 2^32` with `a` odd
(tests check our signatures and candidates against datasketch's).

On the cluster: the first pass (data/first_pass.py, on the workers that read the documents) gives
each document one 64-bit key per band (`document_band_keys`); `band_rows` explodes them into
(band key, order, partition) rows; `bucket_band_rows` tasks cut each block of them by key bucket,
one task per bucket (`bucket_marks`) gathers its pieces from every block, and
`mark_later_documents` marks every document that shares a band key with an earlier one. Plain Ray
tasks, not Ray Data's hash shuffle: the rows are few (9 per document), and the shuffle's actors
cost seconds to start whatever the data, which neither shrank with more workers nor was small
against the rest of near-dedup on the embedded corpus. The marks travel to the document's own pack
partition (data/partition_pack.py), which drops it.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

SEED = 1  # datasketch's default seed: the same permutations
FMIX32 = (16, 0x85EBCA6B, 13, 0xC2B2AE35, 16)  # MurmurHash3's 32-bit finalizer
WHITESPACE = np.zeros(256, dtype=bool)
WHITESPACE[[9, 10, 11, 12, 13, 32]] = True
BYTE_BASE = np.uint64(0x100000001B3)  # odd multipliers of the polynomial hashes (FNV's prime, and another)
WORD_BASE = np.uint64(0x9E3779B97F4A7C15)
CHUNK_SHINGLES = 8192  # shingles per (shingles x permutations) block, to bound memory on long documents


# ---- parameters -----------------------------------------------------------------------------------


def integral(f, low: float, high: float, points: int = 2001) -> float:
    xs = np.linspace(low, high, points)
    ys = f(xs)
    return float(np.sum((ys[1:] + ys[:-1]) * np.diff(xs)) / 2)


@functools.lru_cache(maxsize=None)
def lsh_params(threshold: float, permutations: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= permutations that minimise the false-positive plus the
    false-negative probability mass around `threshold` (datasketch's MinHashLSH, equal weights)."""
    best, best_error = (1, 1), float("inf")
    for bands in range(1, permutations + 1):
        for rows in range(1, permutations // bands + 1):
            false_positive = integral(lambda s: 1 - (1 - s**rows) ** bands, 0.0, threshold)
            false_negative = integral(lambda s: (1 - s**rows) ** bands, threshold, 1.0)
            error = 0.5 * false_positive + 0.5 * false_negative
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


@functools.lru_cache(maxsize=None)
def permutation_params(permutations: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the affine permutations, as datasketch draws them for the same seed."""
    gen = np.random.RandomState(SEED)
    a = gen.randint(0, 1 << 31, permutations, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, permutations, dtype=np.uint32)
    return a, b


@functools.lru_cache(maxsize=4)
def powers(base: int, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) modulo 2**64."""
    factors = np.full(n, base, dtype=np.uint64)
    factors[0] = 1
    return np.cumprod(factors, dtype=np.uint64)  # wraps around: arithmetic modulo 2**64


def power_table(base: np.uint64, n: int) -> np.ndarray:
    size = 1 << max(10, (n - 1).bit_length())  # cached by powers of two, so a few tables serve all documents
    return powers(int(base), size)[:n]


# ---- signatures -----------------------------------------------------------------------------------


def word_hashes(text: str) -> np.ndarray:
    """A 64-bit polynomial hash of each whitespace-separated word of `text`'s UTF-8 bytes."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    inside = ~WHITESPACE[data]
    if not inside.any():
        return np.zeros(0, dtype=np.uint64)
    starts = inside & ~np.concatenate([[False], inside[:-1]])
    word_of_byte = np.cumsum(starts)[inside] - 1
    first_byte = np.flatnonzero(starts)  # in text positions
    start_in_kept = np.searchsorted(np.flatnonzero(inside), first_byte)
    position = np.arange(len(word_of_byte)) - start_in_kept[word_of_byte]
    terms = (data[inside].astype(np.uint64) + np.uint64(1)) * power_table(BYTE_BASE, int(position.max()) + 1)[position]
    return np.add.reduceat(terms, start_in_kept)


def shingle_hashes(text: str, shingle_words: int) -> np.ndarray:
    """32-bit hashes of the runs of `shingle_words` consecutive words (the whole text if shorter)."""
    words = word_hashes(text)
    if len(words) == 0:
        return np.zeros(0, dtype=np.uint32)
    width = min(shingle_words, len(words))
    count = len(words) - width + 1
    mixed = np.zeros(count, dtype=np.uint64)
    for offset, factor in enumerate(power_table(WORD_BASE, width)):
        mixed += words[offset : offset + count] * factor
    return (mixed >> np.uint64(32)).astype(np.uint32) ^ mixed.astype(np.uint32)


def fmix32(values: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2, s3 = (np.uint32(c) for c in FMIX32)
    values = values ^ (values >> s1)
    values = values * m1
    values = values ^ (values >> s2)
    values = values * m2
    return values ^ (values >> s3)


def minhash_signature(shingles: np.ndarray, permutations: int) -> np.ndarray:
    """The MinHash signature (uint32, one value per permutation) of a set of shingle hashes."""
    a, b = permutation_params(permutations)
    signature = np.full(permutations, np.uint32(0xFFFFFFFF), dtype=np.uint32)
    mixed = fmix32(shingles.astype(np.uint32))
    for start in range(0, len(mixed), CHUNK_SHINGLES):
        block = mixed[start : start + CHUNK_SHINGLES, None] * a[None, :] + b[None, :]
        signature = np.minimum(signature, block.min(axis=0))
    return signature


def band_keys(signature: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per band: equal keys <=> equal band values (up to 64-bit collisions)."""
    values = signature[: bands * rows].reshape(bands, rows).astype(np.uint64)
    keys = (values * power_table(WORD_BASE, rows)[None, :]).sum(axis=1, dtype=np.uint64)
    keys ^= np.arange(bands, dtype=np.uint64) << np.uint64(56)  # band i's keys never meet band j's
    keys ^= keys >> np.uint64(33)
    return keys * np.uint64(0xFF51AFD7ED558CCD)


def document_band_keys(text: str, shingle_words: int, permutations: int, bands: int, rows: int) -> np.ndarray:
    return band_keys(minhash_signature(shingle_hashes(text, shingle_words), permutations), bands, rows)


# ---- Ray Data UDFs --------------------------------------------------------------------------------


def band_rows(batch: pa.Table, buckets: int) -> pa.Table:
    """Ray Data UDF: survey rows (data/first_pass.py) -> one row per (band key, document), with the key's bucket."""
    batch = batch.filter(batch.column("bands").is_valid())
    bands = batch.column("bands").combine_chunks()
    lengths = bands.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    keys = bands.flatten().to_numpy(zero_copy_only=False).astype(np.uint64)
    repeat = functools.partial(np.repeat, repeats=lengths)
    return pa.table(
        {
            "bucket": (keys % np.uint64(buckets)).astype(np.int32),
            "key": keys,
            "order": repeat(batch.column("order").to_numpy()),
            "partition": repeat(batch.column("partition").to_numpy()),
        }
    )


def bucket_band_rows(block: pa.Table, buckets: int) -> pa.Table | tuple[pa.Table, ...]:
    """Ray task (num_returns=buckets): survey rows -> their band rows, cut into one table per key bucket."""
    rows = band_rows(block, buckets)
    bucket = rows.column("bucket").to_numpy()
    pieces = tuple(rows.filter(pa.array(bucket == b)) for b in range(buckets))
    return pieces if buckets > 1 else pieces[0]


def bucket_marks(as_rows, *pieces: pa.Table) -> pa.Table:
    """Ray task: one bucket's band rows from every block -> its marks (mark_later_documents), made
    rows of the packing's input by `as_rows` (a bucket without marks too: a table without columns
    would not join the packing's input)."""
    return as_rows(mark_later_documents(pa.concat_tables(pieces)))


def mark_later_documents(group: pa.Table) -> pa.Table:
    """The band rows of one bucket -> the documents that share a band key with a document earlier in
    corpus order, each once, with their pack partition."""
    keys = group.column("key").to_numpy()
    orders = group.column("order").to_numpy()
    partitions = group.column("partition").to_numpy()
    index = np.lexsort((orders, keys))  # by key, then corpus order
    later = np.zeros(len(index), dtype=bool)
    later[1:] = keys[index][1:] == keys[index][:-1]
    marked, first = np.unique(orders[index][later], return_index=True)
    return pa.table({"order": marked, "partition": partitions[index][later][first].astype(np.int32)})
