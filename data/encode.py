"""Documents -> token ids, as a Ray Data UDF.

Long documents are cut into ~4 KB chunks before `encode_batch` (on these machines 4 KB chunks
encode 2.5x faster than whole files). A cut falls only where whitespace follows a non-space
character: the byte-level pre-tokenizer always breaks a word there and its regex looks only
ahead, so the chunks' ids joined are exactly the whole document's ids (a test checks this).

Before encoding, on the workers: the quality rules drop documents (data/quality.py),
decontamination drops train documents that share a long n-gram with the val split or an
evaluation set (data/decontaminate.py), and with `redact` personal data and secrets are replaced
by typed placeholders (raylm.core.redact) and counted per document. Each row also carries what
the cleaning report may show of it (data/cleaning_report.py).

Each kept document's ids end with `<|endoftext|>`, the separator packing relies on; its
content hash (blake2b-128 of the UTF-8 text) drives exact dedup and the train/val split.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from raylm.core.redact import PLACEHOLDERS, redact_text
from raylm.data.cleaning_report import EXAMPLES, redaction_examples, snippet
from raylm.data.content_hash import content_hash
from raylm.data.decontaminate import drop_contaminated, shared_words
from raylm.data.quality import QualityConfig, quality_problem
from raylm.model.chat import ENDOFTEXT

DEFAULT_CHUNK_CHARS = 4096
MOSTLY_SECRETS = 0.5  # a document more than half secrets (a key file, a .env dump) is dropped, not redacted

# One tokenizer per worker process, keyed by its JSON, so each task does not parse it again.
_TOKENIZERS: dict[str, Tokenizer] = {}


def cached_tokenizer(tokenizer_json: str) -> Tokenizer:
    # Ray gives each encode task one CPU and runs as many tasks as there are CPUs; the Rust thread
    # pool of `encode_batch` would take every core in each of them. One thread per task (unless the
    # user says otherwise) is what makes 2 workers twice 1.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    key = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = Tokenizer.from_str(tokenizer_json)
    return _TOKENIZERS[key]


def is_cut_point(text: str, i: int) -> bool:
    return text[i] in " \n" and not text[i - 1].isspace()


def chunk_text(text: str, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> list[str]:
    """Cut `text` into pieces of about `chunk_chars` whose encodings concatenate to the whole's."""
    chunks = []
    start = 0
    while len(text) - start > chunk_chars:
        cut = start + chunk_chars
        # Search back from the target for a safe cut, then forward if the window has none.
        while cut > start and not is_cut_point(text, cut):
            cut -= 1
        if cut == start:
            cut = start + chunk_chars + 1
            while cut < len(text) and not is_cut_point(text, cut):
                cut += 1
            if cut >= len(text):
                break
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return chunks


def encode_texts(tokenizer: Tokenizer, texts: list[str], chunk_chars: int = DEFAULT_CHUNK_CHARS) -> list[list[int]]:
    """Token ids of each text (no separators), through chunked `encode_batch`."""
    chunks: list[str] = []
    owners: list[int] = []
    for index, text in enumerate(texts):
        pieces = chunk_text(text, chunk_chars)
        chunks.extend(pieces)
        owners.extend([index] * len(pieces))
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: no offsets
    encodings = encode(chunks, add_special_tokens=False)
    ids: list[list[int]] = [[] for _ in texts]
    for owner, encoding in zip(owners, encodings):
        ids[owner].extend(encoding.ids)
    return ids


def redact_documents(texts: list[str | None], skips: list[str | None]) -> tuple[dict[str, list[int]], list[dict]]:
    """Replace personal data and secrets in `texts` in place (raylm.core.redact); a document that
    is mostly secrets is skipped (`skips`). Returns the count per placeholder, one entry per document,
    and per document its redaction examples (cleaning_report.redaction_examples)."""
    counts = {placeholder: [0] * len(texts) for placeholder in PLACEHOLDERS}
    examples: list[dict] = [{} for _ in texts]
    for i, text in enumerate(texts):
        if text is None:
            continue
        found = redact_text(text)
        for placeholder, n in found.counts.items():
            counts[placeholder][i] = n
        if found.secret_share > MOSTLY_SECRETS:
            texts[i], skips[i] = None, "mostly_secrets"
        else:
            texts[i] = found.text
            examples[i] = redaction_examples(found)
    return counts, examples


def redaction_column(placeholder: str) -> str:
    """`<SECRET>` -> `redacted_secret`: the encoded table's count column for that placeholder."""
    return "redacted_" + placeholder.strip("<>").lower()


def filter_quality(texts: list[str | None], skips: list[str | None], sources: list[str | None], cfg: QualityConfig) -> None:
    """Drop, in place, the documents that fail a quality rule of their kind; `skips` gets the rule."""
    for i, text in enumerate(texts):
        if text is not None:
            problem = quality_problem(text, sources[i], cfg)
            if problem is not None:
                texts[i], skips[i] = None, problem


def example_column(batch: pa.Table, originals: list[str | None], texts: list[str | None], skips: list[str | None],
                   redactions: list[dict], shared: list[int | None], ngram: int, redact: bool) -> pa.Array:
    """Per row, what the cleaning report may show of it (JSON): for a kept document its start as
    written and its redaction examples (any of them may turn out a duplicate in its partition); for
    the first EXAMPLES documents per skip reason of the batch, in corpus order, a redacted snippet
    (of a contaminated one, the shared n-gram)."""
    examples: list[str | None] = [None] * len(texts)
    for i, text in enumerate(texts):
        if text is not None:
            examples[i] = json.dumps({"snippet": snippet(text)} | ({"redacted": redactions[i]} if redactions[i] else {}))
    orders = batch.column("order").to_pylist()
    offered: Counter[str] = Counter()
    for i in sorted((i for i, skip in enumerate(skips) if skip is not None and originals[i] is not None), key=orders.__getitem__):
        offered[skips[i]] += 1
        if offered[skips[i]] <= EXAMPLES and originals[i].strip():
            shown = originals[i] if shared[i] is None else shared_words(originals[i], shared[i], ngram)
            examples[i] = json.dumps({"snippet": snippet(redact_text(shown).text if redact else shown)})
    return pa.array(examples, type=pa.string())


def encode_documents(batch: pa.Table, tokenizer_json: str, id_dtype: str, chunk_chars: int = DEFAULT_CHUNK_CHARS,
                     redact: bool = False, quality: dict | None = None, decontaminate: dict | None = None) -> pa.Table:
    """Ray Data UDF: document rows -> {order, source, skip, error, hash, ids (+ separator),
    redacted_* counts, example (cleaning_report)} (encoded_schema).
    The hash is of the document as read, so the split does not move with redaction. In order:
    `quality` (QualityConfig's fields) drops documents by data/quality.py's rules; `decontaminate`
    (drop_contaminated's `ngram`, `reference`, `val_fraction`) drops train documents that share an
    n-gram with the val split or an evaluation set; `redact` replaces personal data and secrets."""
    tokenizer = cached_tokenizer(tokenizer_json)
    separator = tokenizer.token_to_id(ENDOFTEXT)
    originals = batch.column("text").to_pylist()
    texts, skips = list(originals), batch.column("skip").to_pylist()
    if quality is not None:
        filter_quality(texts, skips, batch.column("source").to_pylist(), QualityConfig(**quality))
    hashes = [None if text is None else content_hash(originals[i]) for i, text in enumerate(texts)]
    shared: list[int | None] = [None] * len(texts)
    if decontaminate is not None:
        shared = drop_contaminated(texts, skips, hashes, **decontaminate)
    if redact:
        counts, redactions = redact_documents(texts, skips)
    else:
        counts, redactions = {placeholder: [0] * len(texts) for placeholder in PLACEHOLDERS}, [{} for _ in texts]
    kept = [i for i, text in enumerate(texts) if text is not None]
    encoded = encode_texts(tokenizer, [texts[i] for i in kept], chunk_chars)
    ids: list[np.ndarray | None] = [None] * len(texts)
    for i, doc_ids in zip(kept, encoded):
        doc_ids.append(separator)
        ids[i] = np.asarray(doc_ids, dtype=id_dtype)
    hashes = [digest if text is not None else None for digest, text in zip(hashes, texts)]  # skipped rows carry none
    ngram = decontaminate["ngram"] if decontaminate is not None else 0
    value_type = pa.uint16() if id_dtype == "uint16" else pa.uint32()
    return pa.table(
        {
            "order": batch.column("order"),
            "source": batch.column("source"),
            "skip": pa.array(skips, type=pa.string()),
            "error": batch.column("error"),
            "hash": pa.array(hashes, type=pa.binary(16)),
            "ids": pa.array(ids, type=pa.large_list(value_type)),
            **{redaction_column(p): pa.array(n, type=pa.int32()) for p, n in counts.items()},
            "example": example_column(batch, originals, texts, skips, redactions, shared, ngram, redact),
        },
        schema=encoded_schema(id_dtype),
    )


def encoded_schema(id_dtype: str) -> pa.Schema:
    """encode_documents' output, fixed: the packing's input is joined from it and from near-dedup's marks."""
    return pa.schema([("order", pa.int64()), ("source", pa.string()), ("skip", pa.string()), ("error", pa.string()),
                      ("hash", pa.binary(16)), ("ids", pa.large_list(pa.uint16() if id_dtype == "uint16" else pa.uint32())),
                      *[(redaction_column(p), pa.int32()) for p in PLACEHOLDERS], ("example", pa.string())])
