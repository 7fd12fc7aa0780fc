"""`raylm prepare` end to end on a real local Ray cluster: every source kind, the dataset dir
contract, packing accounting, train/val disjointness, determinism, atomicity and bad inputs."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from raylm.core.errors import UserError
from raylm.core.redact import PLACEHOLDERS, redact_text
from raylm.data.dataset_dir import read_dataset_manifest, shard_paths, tokenizer_dir
from raylm.data.prepare import PrepareConfig, run_prepare
from raylm.data.sources import hash_order, resolve_source, stdlib_files

STDLIB_SETTINGS = dict(max_docs=150, vocab_size=512, seq_len=64, val_fraction=0.2, shard_tokens=200_000, tokenizer_sample_bytes=1_000_000)


@pytest.fixture(scope="session")
def stdlib_dataset(ray_cluster, session_tmp):
    """One small stdlib dataset dir shared by the data tests (and reused as a tokenizer)."""
    out = session_tmp / "data-stdlib"
    run_prepare(PrepareConfig(source="stdlib", out=str(out), **STDLIB_SETTINGS))
    return out


def prepare(out: Path, source, tokenizer_from: Path, **settings) -> dict:
    """A quick run that reuses the shared dataset's tokenizer (no tokenizer training). The planted
    corpora here are a few short lines each, which the quality rules would drop as fragments
    (tests/test_quality.py tests those): they are off unless a test turns them on."""
    settings = {"seq_len": 16, "val_fraction": 0.0, "quality_filter": False, **settings}
    return run_prepare(PrepareConfig(source=str(source), out=str(out), tokenizer=tokenizer_dir(tokenizer_from), **settings))


def split_rows(dataset: Path, split: str) -> np.ndarray:
    tables = [pq.read_table(path) for path in shard_paths(dataset, split)]
    return np.concatenate([np.stack(t.column("input_ids").to_numpy(zero_copy_only=False)) for t in tables])


def documents_in(rows: np.ndarray, separator: int, tokenizer: Tokenizer) -> list[str]:
    """Texts of the complete documents in one partition's rows of a split (the last piece is cut by
    the tail; with several partitions, decode each alone: see partition_rows)."""
    stream = rows.reshape(-1).tolist()
    pieces, start = [], 0
    for i, token in enumerate(stream):
        if token == separator:
            pieces.append(tokenizer.decode(stream[start:i], skip_special_tokens=False))
            start = i + 1
    return pieces


def stdlib_texts() -> set[str]:
    import pydoc_data.topics

    root, files = stdlib_files()
    texts = set(pydoc_data.topics.topics.values())
    for path in files:
        try:
            texts.add(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            pass
    return texts


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


# ---- the stdlib dataset ---------------------------------------------------------------------------


def test_stdlib_dataset_fulfils_the_contract(stdlib_dataset):
    from transformers import AutoTokenizer

    manifest = read_dataset_manifest(stdlib_dataset, verify_checksums=True)
    assert manifest["kind"] == "raylm.dataset" and manifest["format_version"] == 1
    assert manifest["source"] == "stdlib" and manifest["seq_len"] == 64 and manifest["dtype"] == "uint16"
    assert manifest["vocab_size"] == 512 and manifest["created_by"].startswith("raylm prepare ")
    assert manifest["documents"]["read"] == 150
    assert manifest["documents"]["kept"] + sum(manifest["documents"]["skipped"].values()) == 150
    tokens = manifest["tokens"]
    assert tokens["written"] + tokens["tail_dropped"] == tokens["produced"]
    assert tokens["separators"] == manifest["documents"]["kept"]
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert len(train["shards"]) > 1 and val["sequences"] > 0
    assert train["tokens"] + val["tokens"] == tokens["written"]

    rows = split_rows(stdlib_dataset, "train")
    assert rows.shape == (train["sequences"], 65) and rows.dtype == np.uint16
    assert rows.max() < manifest["vocab_size"]

    tok_dir = tokenizer_dir(stdlib_dataset)
    fast = Tokenizer.from_file(f"{tok_dir}/tokenizer.json")
    hf = AutoTokenizer.from_pretrained(tok_dir)
    sample = "import json\nprint(json.dumps({'ß': [1, 2]}))  # ✓ 🤖"
    assert hf(sample)["input_ids"] == fast.encode(sample).ids
    assert manifest["special_tokens"] == {"endoftext": 0, "pad": 1, "im_start": 2, "im_end": 3}
    assert hf.eos_token_id == manifest["special_tokens"]["endoftext"] and hf.pad_token_id == manifest["special_tokens"]["pad"]


def test_training_can_read_the_shards_with_ray_data(stdlib_dataset):
    import ray.data

    batch = ray.data.read_parquet(shard_paths(stdlib_dataset, "val")).take_batch(8, batch_format="numpy")
    assert np.stack(batch["input_ids"]).shape == (8, 65)


def test_rows_hold_whole_source_documents_and_splits_are_disjoint(stdlib_dataset):
    manifest = read_dataset_manifest(stdlib_dataset)
    tokenizer = Tokenizer.from_file(f"{tokenizer_dir(stdlib_dataset)}/tokenizer.json")
    separator = manifest["special_tokens"]["endoftext"]
    corpus = stdlib_texts()
    by_start, by_end = {}, {}  # a redacted document keeps its first or its last characters
    for text in corpus:
        by_start.setdefault(text[:20], []).append(text)
        by_end.setdefault(text[-20:], []).append(text)

    def in_corpus(doc: str) -> bool:
        if doc in corpus:
            return True
        candidates = by_start.get(doc[:20], []) + by_end.get(doc[-20:], [])
        return any(redact_text(text).text == doc for text in candidates)

    docs = {}
    for split in ("train", "val"):
        docs[split] = documents_in(split_rows(stdlib_dataset, split), separator, tokenizer)
        entry = manifest["splits"][split]
        # Every complete piece between separators is a document of the corpus (redacted), decoded exactly.
        assert docs[split] and all(in_corpus(doc) for doc in docs[split])
        assert entry["documents"] - entry["tail_tokens_dropped"] <= len(docs[split]) <= entry["documents"]
    assert not set(docs["train"]) & set(docs["val"])


def test_same_inputs_give_byte_identical_shards(stdlib_dataset, tmp_path):
    again = run_prepare(PrepareConfig(source="stdlib", out=str(tmp_path / "again"), **STDLIB_SETTINGS))
    first = read_dataset_manifest(stdlib_dataset)
    assert again["tokenizer_sha256"] == first["tokenizer_sha256"]
    assert again["splits"] == first["splits"]
    for split in ("train", "val"):
        for a, b in zip(shard_paths(stdlib_dataset, split), shard_paths(tmp_path / "again", split)):
            assert Path(a).read_bytes() == Path(b).read_bytes()


def test_existing_dataset_is_kept_unless_overwrite(stdlib_dataset, tmp_path, capsys):
    out = tmp_path / "ds"
    shutil.copytree(stdlib_dataset, out)
    kept = run_prepare(PrepareConfig(source="stdlib", out=str(out), **STDLIB_SETTINGS))
    assert kept == read_dataset_manifest(stdlib_dataset)
    assert "kept the existing dataset" in capsys.readouterr().out
    rebuilt = prepare(out, "stdlib", stdlib_dataset, max_docs=20, overwrite=True)
    assert rebuilt["seq_len"] == 16 and read_dataset_manifest(out)["documents"]["read"] == 20
    assert no_leftovers(tmp_path)

    stranger = tmp_path / "not-a-dataset"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a complete dataset dir.*--overwrite"):
        prepare(stranger, "stdlib", stdlib_dataset, max_docs=5)
    assert (stranger / "notes.txt").read_text() == "mine"


def corrupt_copy(dataset: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(dataset, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest, copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m, d: m.update(kind="something.else"), r"field 'kind' is 'something.else'; expected 'raylm.dataset'"),
        (lambda m, d: m.update(format_version=7), r"field 'format_version' is 7; this raylm reads version 1"),
        (lambda m, d: m.pop("seq_len"), r"field 'seq_len' is missing"),
        (lambda m, d: m.update(dtype="float32"), r"field 'dtype' must be 'uint16' or 'uint32'"),
        (lambda m, d: m["special_tokens"].pop("pad"), r"field 'special_tokens.pad' must be a token id"),
        (lambda m, d: (d / m["splits"]["train"]["shards"][1]["path"]).unlink(), r"field 'splits.train.shards\[1\].path' names .* which does not exist"),
        (lambda m, d: m["splits"]["val"].update(sequences=1), r"field 'splits.val.sequences' is 1 but the shards hold"),
        (lambda m, d: m["splits"]["train"]["shards"][0].update(sha256="0" * 64), r"field 'splits.train.shards\[0\].sha256' does not match"),
    ],
)
def test_manifest_validation_names_the_file_and_field(stdlib_dataset, tmp_path, edit, message):
    broken = corrupt_copy(stdlib_dataset, tmp_path, edit)
    with pytest.raises(UserError, match=rf"manifest.json: {message}"):
        read_dataset_manifest(broken, verify_checksums=True)


def test_manifest_reader_refuses_incomplete_dirs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_dataset_manifest(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="manifest.json is missing"):
        shard_paths(tmp_path / "half", "train")
    (tmp_path / "half" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        read_dataset_manifest(tmp_path / "half")


# ---- source kinds ---------------------------------------------------------------------------------


@pytest.fixture
def corpus_dir(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("The first plain text document.\n")
    (root / "b.md").write_text("# A markdown document\n\nWith two paragraphs.\n")
    (root / "c.jsonl").write_text("".join(json.dumps({"body": f"jsonl record {i}", "id": i}) + "\n" for i in range(3)))
    (root / "d.json").write_text(json.dumps([{"body": "json array record 0"}, {"body": "json array record 1"}]))
    pq.write_table(pa.table({"body": ["parquet row 0", "parquet row 1"]}), root / "e.parquet")
    (root / "sub" / "f.txt").write_text("A document in a subdirectory, ünïcödé 🤖.\n")
    (root / "g.txt").write_bytes("caf\xe9 in Latin-1".encode("latin-1"))  # skipped: invalid_utf8
    (root / "h.txt").write_text("   \n")  # skipped: empty
    (root / "i.txt").write_text("The first plain text document.\n")  # skipped: duplicate of a.txt
    (root / "ignored.bin").write_bytes(b"\x00\x01")  # not a corpus extension: not read
    return root


def test_local_directory_of_every_file_kind(stdlib_dataset, corpus_dir, tmp_path):
    manifest = prepare(tmp_path / "out", corpus_dir, stdlib_dataset, text_field="body", seq_len=8)
    assert manifest["documents"] == {"read": 13, "kept": 10, "skipped": {"duplicate": 1, "empty": 1, "invalid_utf8": 1},
                                     "redacted": dict.fromkeys(PLACEHOLDERS, 0)}
    tokenizer = Tokenizer.from_file(f"{tokenizer_dir(tmp_path / 'out')}/tokenizer.json")
    docs = documents_in(split_rows(tmp_path / "out", "train"), 0, tokenizer)
    assert {"jsonl record 1", "json array record 1", "parquet row 0", "A document in a subdirectory, ünïcödé 🤖.\n"} <= set(docs)
    assert manifest["cleaning"]["exact_dedup"] == {"dropped": 1, "examples": [
        {"source": str(corpus_dir / "i.txt"), "snippet": "The first plain text document.", "copy_of": str(corpus_dir / "a.txt")}]}
    assert manifest["cleaning"]["reading"]["invalid_utf8"] == {"dropped": 1, "examples": [{"source": str(corpus_dir / "g.txt")}]}

    # An exact copy is also a near duplicate (Jaccard 1): keeping copies takes both switches.
    no_dedup = prepare(tmp_path / "no-dedup", corpus_dir, stdlib_dataset, text_field="body", seq_len=8, dedup=False)
    assert no_dedup["documents"]["kept"] == 10 and no_dedup["documents"]["skipped"]["near_duplicate"] == 1
    no_dedup = prepare(tmp_path / "none", corpus_dir, stdlib_dataset, text_field="body", seq_len=8, dedup=False, near_dedup=False)
    assert no_dedup["documents"]["kept"] == 11


PLANTED = {  # what must not reach the shards -> the placeholder that takes its place
    "jane.doe@acme-corp.com": "<EMAIL>", "+44 20 7946 0958": "<PHONE>", "93.184.216.34": "<IP_ADDRESS>",
    "2a00:1450:4001:81b::200e": "<IP_ADDRESS>", "4539 1488 0343 6467": "<CREDIT_CARD>", "AKIAIOSFODNN7EXAMPLE": "<SECRET>",
    "ghp_abcdefghijklmnopqrstuvwxyz0123456789": "<SECRET>", "AIzaSyA1234567890abcdefghijklmnopqrstuv": "<SECRET>",
    "xoxb-123456789012-abcdefghij": "<SECRET>", "Xk9#mQ2$vL8pZ": "<SECRET>",
}
CLEAN = ["Write to user@example.com; the server listens on 127.0.0.1 and 192.0.2.10.",  # documentation's examples
         "Order 1234567890123456 shipped in version 3.11.7 at 12:30:45; a[::2] takes every other item."]


def test_personal_data_and_secrets_are_gone_from_the_shards(stdlib_dataset, tmp_path):
    key_file = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAx8\nq9Zk3\n-----END RSA PRIVATE KEY-----\n"
    planted = [f"Note {i}: the value {value} was found in a log line." for i, value in enumerate(PLANTED) if value != "Xk9#mQ2$vL8pZ"]
    planted.append('settings.py holds password = "Xk9#mQ2$vL8pZ" in plain text, which it should not.')
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*planted, key_file, *CLEAN, "the last one"]))

    manifest = prepare(tmp_path / "out", source, stdlib_dataset, seq_len=8)
    counts = manifest["documents"]
    assert counts["skipped"] == {"mostly_secrets": 1} and counts["kept"] == len(planted) + len(CLEAN) + 1
    assert counts["redacted"] == {"<SECRET>": 6, "<EMAIL>": 1, "<IP_ADDRESS>": 2, "<CREDIT_CARD>": 1, "<PHONE>": 1}
    tokenizer = Tokenizer.from_file(f"{tokenizer_dir(tmp_path / 'out')}/tokenizer.json")
    text = "\n".join(documents_in(split_rows(tmp_path / "out", "train"), 0, tokenizer))
    for value, placeholder in PLANTED.items():
        assert value not in text
    assert all(placeholder in text for placeholder in set(PLANTED.values()))
    assert "PRIVATE KEY" not in text and "MIIEowIBAAKCAQEAx8" not in text
    assert all(clean in text for clean in CLEAN)  # documents with nothing to hide arrive unchanged
    # The cleaning report shows each kind replaced, around its first replacement, the value masked.
    report = manifest["cleaning"]["redaction"]
    assert report["<EMAIL>"] == {"replaced": 1, "documents_changed": 1, "examples": [{
        "source": f"{source}:1", "before": "Note 0: the value ja****** was found in a log line.",
        "after": "Note 0: the value <EMAIL> was found in a log line."}]}
    assert report["<SECRET>"]["documents_changed"] == 6 and len(report["<SECRET>"]["examples"]) == 3  # the key file, dropped, too
    assert report["mostly_secrets"]["dropped"] == 1 and "PRIVATE" not in json.dumps(report["mostly_secrets"])
    shown = json.dumps(manifest["cleaning"])
    assert not [value for value in PLANTED if value in shown] and "MIIEowIBAAKCAQEAx8" not in shown

    kept = prepare(tmp_path / "as-is", source, stdlib_dataset, seq_len=8, redact=False)
    assert "redacted" not in kept["documents"] and kept["documents"]["kept"] == len(planted) + len(CLEAN) + 2


def test_glob_and_file_uri_sources(stdlib_dataset, corpus_dir, tmp_path):
    by_glob = prepare(tmp_path / "glob", f"{corpus_dir}/**/*.txt", stdlib_dataset, seq_len=4)
    assert by_glob["documents"]["read"] == 5 and by_glob["documents"]["kept"] == 2
    # file:// goes through pyarrow's filesystem and Ray Data's reader, like s3:// and gs://.
    by_path = prepare(tmp_path / "path", corpus_dir, stdlib_dataset, text_field="body", seq_len=8)
    by_uri = prepare(tmp_path / "uri", f"file://{corpus_dir}", stdlib_dataset, text_field="body", seq_len=8)
    assert by_uri["source"] == f"file://{corpus_dir}"
    assert by_uri["splits"] == by_path["splits"]  # same order, same bytes


def test_hf_sources_saved_to_disk_and_loaded_from_a_local_dir(stdlib_dataset, tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": [f"saved document number {i}" for i in range(12)], "n": list(range(12))}).save_to_disk(str(saved))
    manifest = prepare(tmp_path / "out-saved", f"hf:{saved}", stdlib_dataset, text_field="body", seq_len=8)
    assert manifest["documents"]["kept"] == 12 and manifest["source"] == f"hf:{saved}"

    local = tmp_path / "hub-like"
    (local / "data").mkdir(parents=True)
    (local / "data" / "train.jsonl").write_text("".join(json.dumps({"text": f"train doc {i}"}) + "\n" for i in range(5)))
    (local / "data" / "validation.jsonl").write_text("".join(json.dumps({"text": f"validation doc {i}"}) + "\n" for i in range(7)))
    manifest = prepare(tmp_path / "out-hub", f"hf:{local}@validation", stdlib_dataset, seq_len=4)
    assert manifest["documents"]["kept"] == 7

    with pytest.raises(UserError, match="no column 'text'"):
        prepare(tmp_path / "x", f"hf:{saved}", stdlib_dataset)
    with pytest.raises(UserError, match="datasets could not load it"):
        prepare(tmp_path / "x", f"hf:{local}@nope", stdlib_dataset)


def test_object_store_uri_fails_clearly_without_the_bucket():
    with pytest.raises(UserError, match="s3://raylm-no-such-bucket-7f3a/corpus/"):
        resolve_source("s3://raylm-no-such-bucket-7f3a/corpus/", "text")


# ---- bad input and atomicity ----------------------------------------------------------------------


def last_in_corpus_order(root: Path, candidates: list[str]) -> str:
    """The candidate name that the corpus order (hash of the relative path) puts last."""
    existing = [p.name for p in root.iterdir()]
    return next(name for name in candidates if hash_order(existing + [name], key=lambda n: n)[-1] == name)


def test_failure_mid_write_leaves_no_complete_looking_dir(stdlib_dataset, tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(30):
        (root / f"doc-{i:02d}.txt").write_text(f"document {i} " * 50)
    bad = last_in_corpus_order(root, [f"late-{i}.jsonl" for i in range(100)])
    (root / bad).write_text('{"text": "fine"}\n{"text": oops}\n')
    out = tmp_path / "out"
    # Tiny shards: many are written before the malformed line is reached.
    with pytest.raises(UserError, match=rf"{bad}:2: malformed JSON line"):
        prepare(out, root, stdlib_dataset, shard_tokens=64)
    assert not out.exists() and no_leftovers(tmp_path)
    with pytest.raises(UserError, match="manifest.json is missing"):
        read_dataset_manifest(root)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("data.jsonl", b'{"txt": "wrong field"}\n', r"data.jsonl:1: no field 'text' \(fields: txt\); choose the field with --text-field"),
        ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00", r"image.txt looks binary"),
        ("huge.txt", b"word " * 2_100_000, r"huge.txt is a single document of 10.5 MB, over the 4.0 MB limit"),
        ("blank.txt", b"\n\n", r"no document left after cleaning"),
    ],
)
def test_bad_input_is_a_clear_error(stdlib_dataset, tmp_path, name, content, message):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        prepare(tmp_path / "out", root, stdlib_dataset)
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_bad_source_specs_are_refused_before_any_work(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_source(str(tmp_path / "missing"), "text")
    with pytest.raises(UserError, match="unknown scheme 'ftp://'"):
        resolve_source("ftp://example.com/corpus", "text")
    with pytest.raises(UserError, match="the glob matches no file"):
        resolve_source(str(tmp_path / "*.txt"), "text")
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(UserError, match="holds no corpus file"):
        resolve_source(str(tmp_path / "empty-dir"), "text")
    with pytest.raises(UserError, match="val-fraction"):
        PrepareConfig.validate(PrepareConfig(source="stdlib", out="x", val_fraction=1.5))


def test_cli_prints_a_user_error_as_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "prepare", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"raylm prepare: error: --source {str(tmp_path / 'nope')!r} does not exist; expected stdlib, a file, a directory, a glob, hf:NAME or a URI"]


# ---- partitions: dedup, split and packing on the workers ------------------------------------------


@pytest.fixture
def duplicated_corpus(tmp_path):
    """Six .jsonl files of distinct documents, with copies of earlier ones planted in later files."""
    root = tmp_path / "dup-corpus"
    root.mkdir()
    texts = [f"Document {i} tells of item {i * 7 % 13} and then of item {i * 5 % 11}. " * (1 + i % 4) for i in range(60)]
    for f in range(6):
        lines = texts[f * 10 : (f + 1) * 10] + [texts[(f * 17 + 3) % 60], texts[(f * 29 + 5) % 60]]
        (root / f"part-{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return root


def expected_streams(root: Path, tokenizer: Tokenizer, partitions: int, val_fraction: float) -> tuple[dict, int]:
    """What each (partition, split) must hold, computed here from the files: documents in corpus order,
    the first copy of each text kept, each + <|endoftext|>, concatenated. Also the duplicates dropped."""
    import hashlib

    from raylm.data.partition_pack import is_val, partition_of

    streams: dict[tuple[int, str], list[int]] = {}
    seen, duplicates = set(), 0
    for file_index, path in enumerate(hash_order(sorted(root.iterdir()), key=lambda p: p.name)):
        for position, line in enumerate(path.read_text().splitlines()):
            text = json.loads(line)["text"]
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            key = (partition_of(digest, file_index << 32 | position, partitions), "val" if is_val(digest, val_fraction) else "train")
            streams.setdefault(key, []).extend(tokenizer.encode(text, add_special_tokens=False).ids + [0])
    return streams, duplicates


def partition_rows(dataset: Path, manifest: dict, partition: int, split: str) -> np.ndarray:
    shards = [s for s in manifest["splits"][split]["shards"] if s["partition"] == partition]
    tables = [pq.read_table(dataset / s["path"]).column("input_ids").to_numpy(zero_copy_only=False) for s in shards]
    return np.concatenate([np.stack(t) for t in tables]).reshape(-1) if tables else np.zeros(0, dtype=np.uint16)


def test_partitions_dedup_keep_the_first_copy_and_pack_in_corpus_order(stdlib_dataset, duplicated_corpus, tmp_path):
    corpus_bytes = sum(p.stat().st_size for p in duplicated_corpus.iterdir())
    settings = dict(seq_len=16, val_fraction=0.25, shard_tokens=300, partition_bytes=corpus_bytes // 4 + 1, near_dedup=False)
    out = tmp_path / "out"
    manifest = prepare(out, duplicated_corpus, stdlib_dataset, **settings)
    tokenizer = Tokenizer.from_file(f"{tokenizer_dir(out)}/tokenizer.json")
    streams, duplicates = expected_streams(duplicated_corpus, tokenizer, 4, 0.25)

    assert manifest["packing"]["partitions"] == 4 and duplicates == 12
    assert manifest["documents"]["skipped"] == {"duplicate": duplicates} and manifest["documents"]["kept"] == 60
    assert {s["partition"] for s in manifest["splits"]["train"]["shards"]} == {0, 1, 2, 3}
    tails = {p["partition"]: p["tail_tokens_dropped"] for p in manifest["packing"]["by_partition"]}
    for (partition, split), stream in streams.items():
        rows = partition_rows(out, manifest, partition, split)
        assert rows.tolist() == stream[: len(rows)], (partition, split)  # the first copy's place, corpus order
        assert len(stream) - len(rows) == tails[partition][split] < 17  # each partition drops only its own tail
    tokens = manifest["tokens"]
    assert tokens["produced"] == sum(map(len, streams.values())) == tokens["written"] + tokens["tail_dropped"]
    assert tokens["tail_dropped"] == sum(t for p in tails.values() for t in p.values())
    assert all(p["written_by"]["pid"] > 0 and p["written_by"]["node_id"] for p in manifest["packing"]["by_partition"])


def test_shards_do_not_depend_on_how_the_reads_are_cut_into_tasks(stdlib_dataset, duplicated_corpus, tmp_path, monkeypatch):
    import raylm.data.sources

    corpus_bytes = sum(p.stat().st_size for p in duplicated_corpus.iterdir())
    settings = dict(seq_len=16, val_fraction=0.25, shard_tokens=300, partition_bytes=corpus_bytes // 3 + 1)
    first = prepare(tmp_path / "a", duplicated_corpus, stdlib_dataset, **settings)
    monkeypatch.setattr(raylm.data.sources, "READ_BLOCK_BYTES", 1)  # one file per read task instead of one task
    again = prepare(tmp_path / "b", duplicated_corpus, stdlib_dataset, **settings)
    assert again["splits"] == first["splits"] and first["packing"]["partitions"] == 3
    for split in ("train", "val"):
        paths = [(Path(a), Path(b)) for a, b in zip(shard_paths(tmp_path / "a", split), shard_paths(tmp_path / "b", split))]
        assert paths and all(a.name == b.name and a.read_bytes() == b.read_bytes() for a, b in paths)


# ---- near duplicates ------------------------------------------------------------------------------


@pytest.fixture
def near_duplicate_corpus(tmp_path):
    """Distinct documents, copies with a word or two changed (near: Jaccard ~0.8-0.9 over 5-word
    shingles), copies with a third of the words changed (far), spread over three files."""
    rng = random.Random(7)
    vocabulary = [f"w{i}" for i in range(400)]
    bases = [" ".join(rng.choice(vocabulary) for _ in range(80)) for _ in range(24)]

    def edited(text: str, changes: int) -> str:
        words = text.split()
        for index in rng.sample(range(len(words)), changes):
            words[index] = rng.choice(vocabulary) + "x"
        return " ".join(words)

    texts = bases + [edited(bases[i], 1 + i % 2) for i in range(0, 24, 2)] + [edited(bases[i], 27) for i in range(1, 24, 4)]
    rng.shuffle(texts)
    root = tmp_path / "near-corpus"
    root.mkdir()
    for f in range(3):
        (root / f"part-{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[f::3]))
    return root


def datasketch_kept(root: Path) -> tuple[list[str], int]:
    """The texts to keep by datasketch's MinHashLSH (threshold 0.8, 128 permutations) over our shingles:
    a document goes when a document earlier in corpus order is its candidate. Also how many go."""
    from datasketch import MinHash, MinHashLSH

    from raylm.data.near_dedup import shingle_hashes

    texts = [json.loads(line)["text"] for path in hash_order(sorted(root.iterdir()), key=lambda p: p.name) for line in path.read_text().splitlines()]
    lsh, sketches = MinHashLSH(threshold=0.8, num_perm=128), []
    for index, text in enumerate(texts):
        sketch = MinHash(num_perm=128, seed=1, hashfunc=lambda value: value)
        sketch.update_batch(shingle_hashes(text, 5).tolist())
        lsh.insert(index, sketch)
        sketches.append(sketch)
    kept = [text for index, text in enumerate(texts) if not any(other < index for other in lsh.query(sketches[index]))]
    return kept, len(texts) - len(kept)


def test_near_duplicates_are_dropped_as_datasketch_finds_them(stdlib_dataset, near_duplicate_corpus, tmp_path):
    corpus_bytes = sum(p.stat().st_size for p in near_duplicate_corpus.iterdir())
    settings = dict(seq_len=8, partition_bytes=corpus_bytes // 3 + 1)
    manifest = prepare(tmp_path / "out", near_duplicate_corpus, stdlib_dataset, **settings)
    expected, dropped = datasketch_kept(near_duplicate_corpus)
    assert 6 <= dropped <= 12  # the copies with one word changed (J ~0.88), some with two (J ~0.77), no far ones
    assert manifest["documents"]["skipped"] == {"near_duplicate": dropped} and manifest["documents"]["kept"] == len(expected)
    assert manifest["near_dedup"] == {"shingle_words": 5, "permutations": 128, "bands": 9, "rows": 13, "threshold": 0.8}
    tokenizer = Tokenizer.from_file(f"{tokenizer_dir(tmp_path / 'out')}/tokenizer.json")
    written = {doc for partition in range(3) for doc in documents_in(partition_rows(tmp_path / "out", manifest, partition, "train"), 0, tokenizer)}
    assert written <= set(expected) and len(set(expected) - written) <= manifest["packing"]["partitions"]  # but tails

    everything = prepare(tmp_path / "all", near_duplicate_corpus, stdlib_dataset, near_dedup=False, **settings)
    assert everything["documents"]["kept"] == len(expected) + dropped and "near_dedup" not in everything


# ---- decontamination and the cleaning report -------------------------------------------------------


def words_text(rng: random.Random, count: int) -> str:
    return " ".join(f"{rng.choice('bcdfgklmnprst')}{rng.choice('aeiou')}{rng.randrange(10_000)}" for _ in range(count))


def train_chosen(make, val_fraction: float) -> str:
    """The first text `make(attempt)` gives that the split sends to train."""
    from raylm.data.content_hash import content_hash, is_val

    return next(text for text in map(make, range(100)) if not is_val(content_hash(text), val_fraction))


@pytest.fixture
def contaminated_corpus(tmp_path):
    """A corpus whose train documents share 13 or 12 consecutive words with a val document or an
    evaluation set's document, and an evaluation set (JSONL) of one document."""
    from raylm.data.content_hash import content_hash, is_val

    rng = random.Random(15)
    filler = [words_text(rng, 40) for _ in range(30)]
    val_doc = next(text for text in filler if is_val(content_hash(text), 0.5))
    eval_doc = words_text(rng, 40)

    def planted(source: str, start: int, length: int, name: str):
        shared = " ".join(source.split()[start : start + length])
        return train_chosen(lambda attempt: f"{name} {attempt} {words_text(rng, 10)} {shared} {words_text(rng, 10)}", 0.5)

    plants = {"val13": planted(val_doc, 5, 13, "val13"), "val12": planted(val_doc, 20, 12, "val12"),
              "eval13": planted(eval_doc, 3, 13, "eval13"), "eval12": planted(eval_doc, 20, 12, "eval12")}
    root = tmp_path / "contaminated"
    root.mkdir()
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [*plants.values(), *filler]))  # the tail cuts a filler
    evals = tmp_path / "evals.jsonl"
    evals.write_text(json.dumps({"question": eval_doc}) + "\n")
    return root, evals, plants


def test_train_documents_sharing_13_words_with_val_or_an_eval_set_are_dropped(stdlib_dataset, contaminated_corpus, tmp_path):
    root, evals, plants = contaminated_corpus
    settings = dict(seq_len=8, val_fraction=0.5, decontaminate_against=[str(evals)], decontaminate_text_field="question")
    manifest = prepare(tmp_path / "out", root, stdlib_dataset, **settings)
    assert manifest["documents"]["skipped"] == {"contaminated": 2}
    step = manifest["cleaning"]["decontamination"]
    assert step["dropped"] == 2 and step["ngram_words"] == 13 and step["against"]["val"] >= 1 and step["against"][str(evals)] == 1
    shown = {example["snippet"] for example in step["examples"]}
    assert shown == {" ".join(plants[name].split()[12:25]) for name in ("val13", "eval13")}  # the shared 13 words
    tokenizer = Tokenizer.from_file(f"{tokenizer_dir(tmp_path / 'out')}/tokenizer.json")
    train = "\n".join(documents_in(partition_rows(tmp_path / "out", manifest, 0, "train"), 0, tokenizer))
    assert plants["val13"] not in train and plants["eval13"] not in train
    assert plants["val12"] in train and plants["eval12"] in train  # 12 shared words are not contamination

    kept = prepare(tmp_path / "kept", root, stdlib_dataset, seq_len=8, val_fraction=0.5, decontaminate=False)
    assert "contaminated" not in kept["documents"]["skipped"] and "decontamination" not in kept["cleaning"]


def test_a_bad_evaluation_set_is_an_error_naming_the_key(stdlib_dataset, contaminated_corpus, tmp_path):
    root, evals, _ = contaminated_corpus
    with pytest.raises(UserError, match=r"decontaminate_against\[0\]: --source .*missing.jsonl' does not exist.*evaluation set"):
        prepare(tmp_path / "out", root, stdlib_dataset, decontaminate_against=[str(tmp_path / "missing.jsonl")])
    with pytest.raises(UserError, match=r"decontaminate_against .*evals.jsonl': .*no field 'text'"):
        prepare(tmp_path / "out", root, stdlib_dataset, decontaminate_against=[str(evals)])
    with pytest.raises(UserError, match="config key 'decontaminate_against': expected a list"):
        from raylm.data.prepare import parse_args

        parse_args(["--source", "stdlib", "--out", "x", f"decontaminate_against={evals}"])
