"""The dataset dir contract, read side: what other stages call to check and find a dataset.

    DIR/manifest.json             what made it, counts, checksums (written last: its presence
                                  means the dir is complete)
    DIR/tokenizer/                tokenizer.json + tokenizer_config.json (Hugging Face form)
    DIR/train/*.parquet           one column `input_ids`: rows of exactly seq_len + 1 ids
    DIR/val/*.parquet

`read_dataset_manifest(dir)` validates the manifest and that every listed file exists, and
raises a UserError naming the file and the field otherwise; `shard_paths(dir, split)` lists a
split's shards in order. DIR may be a local path or an object-store URI (s3://, gs://, file://;
raylm/core/storage.py): shards are then read where they are, and `tokenizer_dir` gives a local
copy of the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raylm.core import storage
from raylm.core.errors import UserError

KIND = "raylm.dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")

# field -> the type(s) it must have
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "kind": str,
    "format_version": int,
    "source": str,
    "seq_len": int,
    "vocab_size": int,
    "dtype": str,
    "tokenizer_sha256": str,
    "special_tokens": dict,
    "documents": dict,
    "tokens": dict,
    "splits": dict,
    "created_by": str,
}
SPECIAL_TOKEN_NAMES = ("endoftext", "pad", "im_start", "im_end")


def manifest_path(dataset_dir: str | Path) -> str:
    return storage.join(dataset_dir, MANIFEST)


def load_manifest_json(dataset_dir: str | Path) -> dict[str, Any]:
    path = manifest_path(dataset_dir)
    if not storage.is_file(path):
        if not storage.is_dir(dataset_dir):
            raise UserError(f"dataset dir {str(dataset_dir)!r} does not exist (make one with `raylm prepare --out DIR`)")
        raise UserError(f"{path} is missing: {str(dataset_dir)!r} is not a complete dataset dir (an interrupted `raylm prepare`?)")
    try:
        manifest = json.loads(storage.read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} must hold a JSON object")
    return manifest


def require(condition: bool, path: str, field: str, expected: str) -> None:
    if not condition:
        raise UserError(f"{path}: field {field!r} {expected}")


def check_split(manifest: dict, split: str, dataset_dir: str | Path, path: str, present: dict[str, int], verify_checksums: bool) -> None:
    entry = manifest["splits"].get(split)
    require(isinstance(entry, dict), path, f"splits.{split}", "is missing; expected {sequences, tokens, shards}")
    for key in ("sequences", "tokens"):
        require(isinstance(entry.get(key), int), path, f"splits.{split}.{key}", "must be an integer")
    shards = entry.get("shards")
    require(isinstance(shards, list), path, f"splits.{split}.shards", "must be a list")
    for i, shard in enumerate(shards):
        field = f"splits.{split}.shards[{i}]"
        require(isinstance(shard, dict), path, field, "must be an object {path, rows, sha256}")
        require(isinstance(shard.get("path"), str), path, f"{field}.path", "must be a relative file path")
        require(isinstance(shard.get("rows"), int), path, f"{field}.rows", "must be an integer")
        require(isinstance(shard.get("sha256"), str), path, f"{field}.sha256", "must be a hex digest")
        file = storage.join(dataset_dir, shard["path"])
        require(shard["path"] in present, path, f"{field}.path", f"names {file!r}, which does not exist")
        if verify_checksums:
            require(storage.sha256_of(file) == shard["sha256"], path, f"{field}.sha256", f"does not match {file!r} (a changed or corrupt shard)")
    rows = sum(shard["rows"] for shard in shards)
    require(rows == entry["sequences"], path, f"splits.{split}.sequences", f"is {entry['sequences']} but the shards hold {rows} rows")


def read_dataset_manifest(dataset_dir: str | Path, verify_checksums: bool = False) -> dict[str, Any]:
    """Validate `dataset_dir/manifest.json` and the files it lists; return the manifest.

    `verify_checksums` also re-hashes every shard (slower; for a dataset copied from elsewhere).
    """
    manifest = load_manifest_json(dataset_dir)
    path = manifest_path(dataset_dir)
    require(manifest.get("kind") == KIND, path, "kind", f"is {manifest.get('kind')!r}; expected {KIND!r}")
    require(
        manifest.get("format_version") == FORMAT_VERSION,
        path,
        "format_version",
        f"is {manifest.get('format_version')!r}; this raylm reads version {FORMAT_VERSION}",
    )
    for field, expected_type in REQUIRED_FIELDS.items():
        require(field in manifest, path, field, "is missing")
        require(isinstance(manifest[field], expected_type), path, field, f"must be of type {getattr(expected_type, '__name__', expected_type)}")
    require(manifest["seq_len"] > 0, path, "seq_len", "must be positive")
    require(manifest["dtype"] in ("uint16", "uint32"), path, "dtype", "must be 'uint16' or 'uint32'")
    for name in SPECIAL_TOKEN_NAMES:
        require(isinstance(manifest["special_tokens"].get(name), int), path, f"special_tokens.{name}", "must be a token id")
    present = storage.files_under(dataset_dir)  # one listing: on object storage, not a request per shard
    for split in SPLITS:
        check_split(manifest, split, dataset_dir, path, present, verify_checksums)
    require("tokenizer/tokenizer.json" in present, path, "tokenizer_sha256",
            f"describes {storage.join(dataset_dir, 'tokenizer', 'tokenizer.json')!r}, which does not exist")
    return manifest


def shard_paths(dataset_dir: str | Path, split: str) -> list[str]:
    """Absolute paths (or URIs) of `split`'s shards, in order (the manifest is validated first)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    manifest = read_dataset_manifest(dataset_dir)
    return [storage.join(dataset_dir, shard["path"]) for shard in manifest["splits"][split]["shards"]]


def tokenizer_dir(dataset_dir: str | Path) -> str:
    """The dataset's tokenizer dir (what AutoTokenizer.from_pretrained and model dirs take): a URI
    for a dataset on object storage (storage.local_dir copies it where it is read)."""
    return storage.join(dataset_dir, "tokenizer")
