"""Files -> documents, and the cleaning rules, as plain functions that Ray Data runs per batch.

A file becomes documents by its extension: `.jsonl` one per line, `.json` one per element of a
top-level list (or per line when the file is JSON Lines), `.parquet` one per row, anything else
one per file (text). Each document is a row

    {"source": "path[:line or #row]", "order": int, "text": str | None, "skip": reason | None, "error": msg | None}

`order` is the document's place in the corpus order (file index << 32 | position in the file, or
the row of a Hugging Face dataset): every later step that must choose among documents (the one
kept of duplicates) or lay them out (packing) sorts by it, so the output does not depend on how
Ray schedules the tasks or cuts the blocks.

Cleaning keeps bad *documents* countable and bad *input* loud:
- skipped and counted by reason: `empty` (nothing but whitespace), `invalid_utf8` (text that is
  not UTF-8, e.g. a Latin-1 source file);
- an error that stops the run, naming the file and record: a malformed JSON line, a record without
  the text field (or with a non-string one), a binary file (NUL bytes), a document larger than
  `max_doc_bytes`. These mean the source is not what the user thinks it is.
Errors travel as rows rather than exceptions so the driver reports the first one in the
corpus's order, whichever task found it.
"""

from __future__ import annotations

import io
import json
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

JSONL_EXTENSIONS = (".jsonl",)
JSON_EXTENSIONS = (".json",)
PARQUET_EXTENSIONS = (".parquet",)
TEXT_EXTENSIONS = (".txt", ".text", ".md", ".rst", ".py")
# What a directory contributes; other files in it are ignored (and counted by the lister).
CORPUS_EXTENSIONS = TEXT_EXTENSIONS + JSONL_EXTENSIONS + JSON_EXTENSIONS + PARQUET_EXTENSIONS

DOCUMENT_SCHEMA = pa.schema(
    [("source", pa.string()), ("order", pa.int64()), ("text", pa.large_string()), ("skip", pa.string()), ("error", pa.string())]
)
POSITION_BITS = 32  # order = file index << POSITION_BITS | the document's position in its file


def document(source: str, text: str | None = None, skip: str | None = None, error: str | None = None) -> dict:
    return {"source": source, "text": text, "skip": skip, "error": error}


def text_document(source: str, data: bytes, max_doc_bytes: int) -> dict:
    """One document from a whole file's bytes."""
    if b"\x00" in data[:65536]:
        return document(source, error=f"{source} looks binary (it holds NUL bytes); expected a UTF-8 text file")
    if len(data) > max_doc_bytes:
        return document(source, error=too_long_message(source, len(data), max_doc_bytes))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return document(source, skip="invalid_utf8")
    return document(source, text=text, skip=None if text.strip() else "empty")


def too_long_message(source: str, size: int, max_doc_bytes: int) -> str:
    return (
        f"{source} is a single document of {size / 1e6:.1f} MB, over the {max_doc_bytes / 1e6:.1f} MB "
        "limit; split it into documents (e.g. one per line of a .jsonl) or raise --max-doc-bytes"
    )


def record_document(source: str, record: Any, text_field: str, max_doc_bytes: int) -> dict:
    """One document from a JSON record or a Parquet row."""
    if not isinstance(record, dict):
        return document(source, error=f"{source}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}")
    if text_field not in record:
        keys = ", ".join(sorted(map(str, record))[:10]) or "none"
        return document(source, error=f"{source}: no field {text_field!r} (fields: {keys}); choose the field with --text-field")
    text = record[text_field]
    if text is None:
        return document(source, skip="empty")
    if not isinstance(text, str):
        return document(source, error=f"{source}: field {text_field!r} is {type(text).__name__}; expected a string")
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > max_doc_bytes:
        return document(source, error=too_long_message(source, size, max_doc_bytes))
    if not is_valid_unicode(text):
        return document(source, skip="invalid_utf8")
    return document(source, text=text, skip=None if text.strip() else "empty")


def is_valid_unicode(text: str) -> bool:
    """False for lone surrogates (JSON `\\ud800` escapes), which have no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def jsonl_documents(path: str, data: bytes, text_field: str, max_doc_bytes: int) -> Iterator[dict]:
    for line_no, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            yield document(source, error=f"{source}: malformed JSON line ({err}); expected one JSON object per line")
            return
        yield record_document(source, record, text_field, max_doc_bytes)


def json_documents(path: str, data: bytes, text_field: str, max_doc_bytes: int) -> Iterator[dict]:
    """A JSON array of records, a single record, or (as `datasets` writes `.json`) JSON Lines."""
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        yield from jsonl_documents(path, data, text_field, max_doc_bytes)
        return
    records = value if isinstance(value, list) else [value]
    for index, record in enumerate(records):
        yield record_document(f"{path}#{index}", record, text_field, max_doc_bytes)


def parquet_documents(path: str, data: bytes, text_field: str, max_doc_bytes: int) -> Iterator[dict]:
    try:
        parquet = pq.ParquetFile(io.BytesIO(data))
    except Exception as err:  # pyarrow raises ArrowInvalid and friends for a non-Parquet file
        yield document(path, error=f"{path} is not a readable Parquet file ({err})")
        return
    names = parquet.schema_arrow.names
    if text_field not in names:
        yield document(path, error=f"{path}: no column {text_field!r} (columns: {', '.join(names)}); choose it with --text-field")
        return
    column = parquet.read(columns=[text_field]).column(0)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        yield document(path, error=f"{path}: column {text_field!r} is {column.type}; expected a string column")
        return
    for index, text in enumerate(column.to_pylist()):
        yield record_document(f"{path}#{index}", {text_field: text}, text_field, max_doc_bytes)


def file_documents(path: str, data: bytes, text_field: str, max_doc_bytes: int) -> Iterator[dict]:
    lower = path.lower()
    if lower.endswith(JSONL_EXTENSIONS):
        yield from jsonl_documents(path, data, text_field, max_doc_bytes)
    elif lower.endswith(JSON_EXTENSIONS):
        yield from json_documents(path, data, text_field, max_doc_bytes)
    elif lower.endswith(PARQUET_EXTENSIONS):
        yield from parquet_documents(path, data, text_field, max_doc_bytes)
    else:
        yield text_document(path, data, max_doc_bytes)


def parse_files(batch: pa.Table, text_field: str, max_doc_bytes: int, path_prefix: str = "") -> pa.Table:
    """Ray Data UDF: rows {path, bytes, file_index} -> document rows.

    `path_prefix` turns a filesystem path back into what the user wrote (e.g. "s3://").
    """
    docs = []
    columns = (batch.column(name).to_pylist() for name in ("path", "bytes", "file_index"))
    for path, data, file_index in zip(*columns):
        for position, doc in enumerate(file_documents(path_prefix + path, data, text_field, max_doc_bytes)):
            docs.append(doc | {"order": file_index << POSITION_BITS | position})
    return documents_table(docs)


def parse_records(batch: pa.Table, text_field: str, max_doc_bytes: int, source_prefix: str) -> pa.Table:
    """Ray Data UDF: rows {row, <text_field>} (a Hugging Face dataset) -> document rows."""
    docs = [
        record_document(f"{source_prefix}#{row}", {text_field: text}, text_field, max_doc_bytes) | {"order": row}
        for row, text in zip(batch.column("row").to_pylist(), batch.column(text_field).to_pylist())
    ]
    return documents_table(docs)


def documents_table(docs: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(docs, schema=DOCUMENT_SCHEMA)
