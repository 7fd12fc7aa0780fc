"""`--source` -> a Ray Dataset of document rows, in a fixed order.

Sources:
- `stdlib`: the running interpreter's standard-library `.py` files (test packages included: the
  corpus is then the ~30 MB of real code the demo wants; site-packages excluded: it is not the
  stdlib and differs per machine) and the prose of `pydoc_data.topics` (one document per topic;
  `pydoc_data/topics.py` itself is left out so that prose is not there twice).
- local files, directories (recursive; files with a corpus extension) and globs;
- `hf:NAME[:CONFIG][@SPLIT]`: `datasets.load_dataset` (or `load_from_disk` for a directory that
  `Dataset.save_to_disk` wrote); split defaults to `train`;
- `s3://`, `gs://`, `file://` URIs: listed with pyarrow's filesystems (on the driver) and read
  through them by the Ray Data tasks, like local files.

Order: files are ordered by the sha256 of their path relative to the source's root, a fixed
shuffle that mixes the corpus (so shards and `--max-docs` samples are not one package after
another) and does not depend on where the corpus lies or on task scheduling.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pyarrow as pa

from raylm.core.errors import UserError
from raylm.data.documents import CORPUS_EXTENSIONS, parse_files, parse_records

if TYPE_CHECKING:
    import ray.data

URI_SCHEMES = ("s3://", "gs://", "file://")
HF_PREFIX = "hf:"
BLOCK_BYTES = 4 << 20  # target text per Ray Data block for in-memory sources
# Input per read task for file sources: large enough that the driver's cost per task (Ray Data's
# executor runs in the driver) stays small against the task's work, small enough to spread a
# corpus of tens of MB over a few workers.
READ_BLOCK_BYTES = 2 << 20


@dataclass
class Corpus:
    """A resolved `--source`: what it is and how to read it as document rows."""

    description: str  # what the manifest records as `source`
    approx_bytes: int  # total input size, to plan the work
    files: int  # files (or Hugging Face rows) it reads, to estimate the size of a --max-docs sample
    documents: Callable[[int], "ray.data.Dataset"]  # max_doc_bytes -> document rows, in corpus order


def hash_order(items: list, key: Callable) -> list:
    return sorted(items, key=lambda item: hashlib.sha256(key(item).encode()).digest())


def resolve_source(spec: str, text_field: str) -> Corpus:
    if spec == "stdlib":
        return stdlib_corpus()
    if spec.startswith(HF_PREFIX):
        return hf_corpus(spec, text_field)
    if spec.startswith(URI_SCHEMES):
        return uri_corpus(spec, text_field)
    if "://" in spec:
        scheme = spec.split("://", 1)[0]
        raise UserError(
            f"--source {spec!r}: unknown scheme {scheme + '://'!r}; expected stdlib, a local path or glob, "
            f"hf:NAME[:CONFIG][@SPLIT], or a URI starting with {', '.join(URI_SCHEMES)}"
        )
    return local_corpus(spec, text_field)


# ---- stdlib ---------------------------------------------------------------------------------------


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        path
        for path in root.rglob("*.py")
        if "site-packages" not in path.relative_to(root).parts and path.relative_to(root).as_posix() != "pydoc_data/topics.py"
    ]
    return root, files


def stdlib_corpus() -> Corpus:
    import pydoc_data.topics

    import pyarrow.fs as pafs

    root, files = stdlib_files()
    items = [{"path": str(path), "bytes": None, "key": path.relative_to(root).as_posix()} for path in files]
    items += [
        {"path": f"pydoc_data.topics[{name!r}]", "bytes": text.encode("utf-8"), "key": f"pydoc/{name}"}
        for name, text in pydoc_data.topics.topics.items()
    ]
    items = hash_order(items, key=lambda item: item["key"])
    approx = sum(os.path.getsize(item["path"]) if item["bytes"] is None else len(item["bytes"]) for item in items)
    rows = [{"path": item["path"], "bytes": item["bytes"], "file_index": index} for index, item in enumerate(items)]
    return Corpus(description="stdlib", approx_bytes=approx, files=len(rows),
                  documents=file_rows_reader(rows, approx, pafs.LocalFileSystem(), "text", path_prefix=""))


def file_rows_reader(rows: list[dict], approx_bytes: int, filesystem, text_field: str, path_prefix: str) -> Callable[[int], "ray.data.Dataset"]:
    """max_doc_bytes -> the documents of `rows` ({path, bytes or None, file_index}), read on the workers."""
    blocks = min(len(rows), max(1, math.ceil(approx_bytes / READ_BLOCK_BYTES)))

    def build(max_doc_bytes: int):
        import ray.data

        kwargs = {"filesystem": filesystem, "text_field": text_field, "max_doc_bytes": max_doc_bytes, "path_prefix": path_prefix}
        return ray.data.from_items(rows, override_num_blocks=blocks).map_batches(read_then_parse, batch_format="pyarrow", fn_kwargs=kwargs)

    return build


def read_then_parse(batch: pa.Table, filesystem, text_field: str, max_doc_bytes: int, path_prefix: str) -> pa.Table:
    """Ray Data UDF: fill in the bytes of rows that name a file of `filesystem`, then parse."""
    paths = batch.column("path").to_pylist()
    data = [
        content if content is not None else read_file(filesystem, path)
        for path, content in zip(paths, batch.column("bytes").to_pylist())
    ]
    files = pa.table({"path": paths, "bytes": pa.array(data, type=pa.binary()), "file_index": batch.column("file_index")})
    return parse_files(files, text_field=text_field, max_doc_bytes=max_doc_bytes, path_prefix=path_prefix)


def read_file(filesystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


# ---- files ----------------------------------------------------------------------------------------


def files_corpus(description: str, paths: list[str], filesystem, text_field: str, path_prefix: str, approx: int) -> Corpus:
    rows = [{"path": path, "bytes": None, "file_index": index} for index, path in enumerate(paths)]
    return Corpus(description=description, approx_bytes=approx, files=len(rows),
                  documents=file_rows_reader(rows, approx, filesystem, text_field, path_prefix))


def has_corpus_extension(path: str) -> bool:
    return path.lower().endswith(CORPUS_EXTENSIONS)


def local_files(spec: str) -> tuple[Path, list[Path]]:
    """(root the order is relative to, files) for a file, a directory or a glob."""
    if glob.has_magic(spec):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not matches:
            raise UserError(f"--source {spec!r}: the glob matches no file")
        root = Path(spec.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]).parent
        return root, matches
    path = Path(spec)
    if not path.exists():
        raise UserError(f"--source {spec!r} does not exist; expected stdlib, a file, a directory, a glob, hf:NAME or a URI")
    if path.is_file():
        return path.parent, [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and has_corpus_extension(p.name))
    if not files:
        raise UserError(f"--source {spec!r}: the directory holds no corpus file (expected {', '.join(CORPUS_EXTENSIONS)})")
    return path, files


def local_corpus(spec: str, text_field: str) -> Corpus:
    import pyarrow.fs as pafs

    root, files = local_files(spec)
    files = hash_order(files, key=lambda p: p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix())
    approx = sum(p.stat().st_size for p in files)
    paths = [str(p.resolve()) for p in files]
    return files_corpus(spec, paths, pafs.LocalFileSystem(), text_field, path_prefix="", approx=approx)


# ---- object storage -------------------------------------------------------------------------------


def uri_filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a URI, failing fast rather than retrying for minutes."""
    import pyarrow.fs as pafs

    try:
        if uri.startswith("gs://"):
            # GCS retries a missing host for 15 minutes by default.
            return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=10)), uri[len("gs://") :]
        return pafs.FileSystem.from_uri(uri)
    except (OSError, pa.ArrowInvalid) as err:
        raise UserError(f"--source {uri!r}: cannot open its filesystem ({err})") from None


def uri_corpus(uri: str, text_field: str) -> Corpus:
    import pyarrow.fs as pafs

    filesystem, root = uri_filesystem(uri)
    scheme = uri.split("://", 1)[0] + "://"
    try:
        info = filesystem.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"--source {uri!r} does not exist")
        if info.type == pafs.FileType.File:
            infos = [info]
        else:
            selector = pafs.FileSelector(root.rstrip("/"), recursive=True)
            infos = [i for i in filesystem.get_file_info(selector) if i.type == pafs.FileType.File and has_corpus_extension(i.path)]
    except OSError as err:
        raise UserError(f"--source {uri!r}: cannot list it ({err})") from None
    if not infos:
        raise UserError(f"--source {uri!r}: holds no corpus file (expected {', '.join(CORPUS_EXTENSIONS)})")
    base = root.rstrip("/")
    infos = hash_order(infos, key=lambda i: i.path[len(base) :].lstrip("/") if i.path.startswith(base) else i.path)
    # file:// paths are already absolute local paths; object stores print with their scheme.
    prefix = "" if scheme == "file://" else scheme
    approx = sum(i.size or 0 for i in infos)
    return files_corpus(uri, [i.path for i in infos], filesystem, text_field, path_prefix=prefix, approx=approx)


# ---- Hugging Face datasets ------------------------------------------------------------------------


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """'hf:NAME[:CONFIG][@SPLIT]' -> (name, config, split)."""
    rest = spec[len(HF_PREFIX) :]
    rest, _, split = rest.partition("@") if "@" in rest else (rest, "", "train")
    name, _, config = rest.partition(":")
    if not name:
        raise UserError(f"--source {spec!r}: expected hf:NAME[:CONFIG][@SPLIT], e.g. hf:wikitext:wikitext-2-raw-v1@train")
    return name, config or None, split or "train"


def load_hf_dataset(spec: str):
    import datasets

    name, config, split = parse_hf_spec(spec)
    try:
        if (Path(name) / "dataset_info.json").is_file() or (Path(name) / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(name)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise UserError(f"--source {spec!r}: no split {split!r} (splits: {', '.join(loaded)})")
                loaded = loaded[split]
            return loaded
        return datasets.load_dataset(name, config, split=split)
    except UserError:
        raise
    except Exception as err:  # datasets raises many types for a bad name, config or split
        raise UserError(f"--source {spec!r}: datasets could not load it ({type(err).__name__}: {err})") from None


def hf_corpus(spec: str, text_field: str) -> Corpus:
    hf_dataset = load_hf_dataset(spec)
    if text_field not in hf_dataset.column_names:
        raise UserError(f"--source {spec!r}: no column {text_field!r} (columns: {', '.join(hf_dataset.column_names)}); choose it with --text-field")
    hf_dataset = hf_dataset.select_columns([text_field])
    if getattr(hf_dataset, "_indices", None) is not None:  # a select/shuffle view: materialize its order
        hf_dataset = hf_dataset.flatten_indices()
    table = hf_dataset.data.table
    table = table.append_column("row", pa.array(range(table.num_rows), type=pa.int64()))
    blocks = max(1, math.ceil(table.nbytes / BLOCK_BYTES))
    rows_per_block = max(1, math.ceil(table.num_rows / blocks))
    slices = [table.slice(start, rows_per_block) for start in range(0, table.num_rows, rows_per_block)] or [table]

    def build(max_doc_bytes: int):
        import ray.data

        return ray.data.from_arrow(slices).map_batches(
            parse_records,
            batch_format="pyarrow",
            fn_kwargs={"text_field": text_field, "max_doc_bytes": max_doc_bytes, "source_prefix": spec},
        )

    return Corpus(description=spec, approx_bytes=table.nbytes, files=table.num_rows, documents=build)
