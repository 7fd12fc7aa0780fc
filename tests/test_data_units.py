"""The data stage's pure parts, without Ray: chunked encoding, the tokenizer on arbitrary Unicode
and through transformers, document parsing and cleaning, packing arithmetic."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from raylm.core.errors import UserError
from raylm.data.documents import file_documents
from raylm.data.encode import chunk_text, encode_texts
from raylm.data.pack import ShardWriter
from raylm.data.sources import parse_hf_spec, stdlib_files
from raylm.data.tokenizer import (
    SPECIAL_TOKENS,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root, files = stdlib_files()
    texts = [p.read_text() for p in sorted(files) if p.parent == root][:30]
    texts.append("Ünïcödé — 日本語のテキスト, emoji 🤖🚀, Ελληνικά, العربية.")
    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(texts, 600), directory, seq_len=128)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


def random_unicode(rng: random.Random, length: int) -> str:
    """Text from all over Unicode (no surrogates, which have no UTF-8 form), with whitespace runs."""
    pieces = []
    for _ in range(length):
        kind = rng.random()
        if kind < 0.15:
            pieces.append(rng.choice([" ", "  ", "\n", "\n\n", "\t", "\r\n", "    "]))
        elif kind < 0.5:
            pieces.append(chr(rng.randrange(0x20, 0x7F)))
        else:
            code = rng.randrange(0x80, 0x110000)
            if 0xD800 <= code <= 0xDFFF:
                code = 0x1F916
            pieces.append(chr(code))
    return "".join(pieces)


def test_round_trip_on_arbitrary_unicode(tokenizer):
    rng = random.Random(0)
    for _ in range(200):
        text = random_unicode(rng, rng.randrange(1, 300))
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_transformers_loads_the_tokenizer_and_encodes_identically(tokenizer, tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert hf.model_max_length == 128
    rng = random.Random(1)
    texts = [random_unicode(rng, 120) for _ in range(50)] + ["def f(x):\n    return x  # <|endoftext|> <|im_start|>"]
    for text in texts:
        assert hf(text)["input_ids"] == tokenizer.encode(text).ids  # no BOS/EOS added by either
        assert hf.decode(hf(text)["input_ids"]) == text


def test_chunked_encoding_equals_whole_document_encoding(tokenizer):
    root, files = stdlib_files()
    rng = random.Random(2)
    texts = [p.read_text() for p in sorted(files)[:8]]
    texts += [random_unicode(rng, 3000) for _ in range(5)]
    texts += ["x" * 5000, "word " * 2000, "  \n\n\t  indented\n" * 300, "a\n" + " " * 4000 + "b"]
    for chunk_chars in (16, 64, 4096):
        chunked = encode_texts(tokenizer, texts, chunk_chars=chunk_chars)
        assert chunked == [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    for text in texts:
        assert "".join(chunk_text(text, 64)) == text


def test_reused_tokenizer_gains_missing_special_tokens(tmp_path, tokenizer):
    from raylm.data.tokenizer import new_bpe_tokenizer

    plain = new_bpe_tokenizer()
    plain.add_tokens(["a", "b"])
    plain.save(str(tmp_path / "tokenizer.json"))
    reused = load_tokenizer(tmp_path)  # a directory holding tokenizer.json
    assert all(reused.token_to_id(token) is not None for token in SPECIAL_TOKENS)
    with pytest.raises(UserError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(UserError, match="not a valid tokenizers JSON"):
        load_tokenizer(tmp_path / "broken.json")
    with pytest.raises(UserError, match="vocab-size"):
        train_tokenizer(["abc"], 100)


def docs_of(path: str, data: bytes, text_field: str = "text", max_doc_bytes: int = 1000) -> list[dict]:
    return list(file_documents(path, data, text_field, max_doc_bytes))


def test_document_parsing_and_cleaning_rules():
    assert docs_of("a.txt", "héllo".encode())[0]["text"] == "héllo"
    assert docs_of("a.txt", b"  \n ")[0]["skip"] == "empty"
    assert docs_of("a.py", "caf\xe9".encode("latin-1"))[0]["skip"] == "invalid_utf8"
    assert "looks binary" in docs_of("a.txt", b"\x89PNG\x00\x00")[0]["error"]
    assert "over the" in docs_of("a.txt", b"x" * 1001)[0]["error"]
    lines = b'{"text": "one"}\n\n{"text": ""}\n{"text": null}\n{"body": "x"}\n'
    docs = docs_of("c.jsonl", lines)
    assert [d["text"] for d in docs[:1]] == ["one"] and [d["skip"] for d in docs[1:3]] == ["empty", "empty"]
    assert docs[3]["source"] == "c.jsonl:5" and "no field 'text' (fields: body)" in docs[3]["error"]
    bad = docs_of("c.jsonl", b'{"text": "ok"}\n{"text": broken\n')
    assert bad[-1]["source"] == "c.jsonl:2" and "malformed JSON line" in bad[-1]["error"]
    assert "is int; expected a string" in docs_of("c.jsonl", b'{"text": 3}\n')[0]["error"]
    assert docs_of("c.jsonl", b'{"text": "\\ud800 lone surrogate"}\n')[0]["skip"] == "invalid_utf8"
    assert [d["text"] for d in docs_of("d.json", json.dumps([{"text": "a"}, {"text": "b"}]).encode())] == ["a", "b"]
    assert [d["text"] for d in docs_of("d.json", b'{"text": "a"}\n{"text": "b"}\n')] == ["a", "b"]  # JSON Lines


def test_parquet_documents(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"body": ["x", None, "y"], "n": [1, 2, 3]}), path)
    docs = docs_of(str(path), path.read_bytes(), text_field="body")
    assert [(d["text"], d["skip"]) for d in docs] == [("x", None), (None, "empty"), ("y", None)]
    assert "no column 'text' (columns: body, n)" in docs_of(str(path), path.read_bytes())[0]["error"]
    assert "expected a string column" in docs_of(str(path), path.read_bytes(), text_field="n")[0]["error"]


def test_hf_spec_parsing():
    assert parse_hf_spec("hf:wikitext:wikitext-2-raw-v1@validation") == ("wikitext", "wikitext-2-raw-v1", "validation")
    assert parse_hf_spec("hf:org/name") == ("org/name", None, "train")
    with pytest.raises(UserError, match="hf:NAME"):
        parse_hf_spec("hf:")


def test_packing_keeps_every_token_but_the_tail(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=rng.integers(1, 50)).astype(np.uint16) for _ in range(100)]
    writer = ShardWriter(tmp_path, "train", seq_len=15, dtype="uint16", rows_per_shard=7)
    for doc in docs:
        writer.add(doc)
    entry = writer.close()
    stream = np.concatenate(docs)
    rows = np.concatenate([np.stack(pq.read_table(tmp_path / s["path"]).column("input_ids").to_numpy(zero_copy_only=False)) for s in entry["shards"]])
    assert rows.shape == (entry["sequences"], 16) and rows.dtype == np.uint16
    assert entry["tokens"] + entry["tail_tokens_dropped"] == len(stream)
    assert entry["tail_tokens_dropped"] < 16
    assert np.array_equal(rows.reshape(-1), stream[: entry["tokens"]])
    assert all(s["rows"] == 7 for s in entry["shards"][:-1])


# ---- near duplicates: our MinHash + LSH against datasketch's ---------------------------------------


def test_lsh_bands_are_datasketchs_choice():
    from datasketch.lsh import _optimal_param

    from raylm.data.near_dedup import lsh_params

    for threshold, permutations in [(0.8, 128), (0.5, 64), (0.9, 256), (0.7, 100)]:
        assert lsh_params(threshold, permutations) == _optimal_param(threshold, permutations, 0.5, 0.5)


def test_minhash_signatures_equal_datasketchs():
    from datasketch import MinHash

    from raylm.data.near_dedup import minhash_signature, shingle_hashes

    rng = random.Random(3)
    for _ in range(20):
        text = " ".join(rng.choice(["def", "x", "return", "ünï", "🤖", "a.b(c)", "\n", "import"]) for _ in range(rng.randrange(1, 400)))
        shingles = shingle_hashes(text, 5)
        reference = MinHash(num_perm=128, seed=1, hashfunc=lambda value: value)
        reference.update_batch(shingles.tolist())
        assert np.array_equal(minhash_signature(shingles, 128), reference.hashvalues)


def test_shingles_are_runs_of_words_whatever_the_whitespace():
    from raylm.data.near_dedup import shingle_hashes

    assert np.array_equal(shingle_hashes("a  b\tc\n\nd e f", 5), shingle_hashes("a b c d e f", 5))
    assert len(shingle_hashes("a b c d e f", 5)) == 2 and len(shingle_hashes("a b", 5)) == 1
    assert len(set(shingle_hashes(" ".join(str(i) for i in range(100)), 3).tolist())) == 98  # distinct runs, distinct hashes
    assert not np.array_equal(shingle_hashes("ab c d e f", 5), shingle_hashes("a bc d e f", 5))


def test_a_shared_run_of_13_words_is_found_and_one_of_12_is_not():
    from raylm.data.decontaminate import first_shared_ngram, ngram_hashes, shared_words

    reference_text = " ".join(f"r{i}" for i in range(40))
    reference = np.unique(ngram_hashes(reference_text, 13))
    assert len(reference) == 28 and len(ngram_hashes("only twelve words " * 4, 13)) == 0
    thirteen = "some\tother words\n\n" + " ".join(f"r{i}" for i in range(10, 23)) + " and more"
    twelve = "some other words " + " ".join(f"r{i}" for i in range(10, 22)) + " and more"
    assert first_shared_ngram(thirteen, 13, reference) == 3
    assert shared_words(thirteen, 3, 13) == " ".join(f"r{i}" for i in range(10, 23))
    assert first_shared_ngram(twelve, 13, reference) is None
    assert first_shared_ngram(twelve, 12, np.unique(ngram_hashes(reference_text, 12))) == 3


def test_redaction_examples_mask_the_value_and_snippets_are_short():
    from raylm.core.redact import redact_text
    from raylm.data.cleaning_report import redaction_examples, snippet

    found = redact_text("Deploy with key AKIAIOSFODNN7EXAMPLE and write to jane.doe@acme-corp.com when done.")
    examples = redaction_examples(found)
    assert examples["<SECRET>"]["after"] == "Deploy with key <SECRET> and write to <EMAIL> when done."
    assert examples["<SECRET>"]["before"] == "Deploy with key AK****** and write to <EMAIL> when done."
    assert examples["<EMAIL>"]["before"].endswith("write to ja****** when done.")
    assert "AKIAIOSFODNN7EXAMPLE" not in json.dumps(examples) and "acme-corp" not in json.dumps(examples)
    assert snippet("a\n\n  b " + "x" * 300) == "a b " + "x" * 95 + "…"
