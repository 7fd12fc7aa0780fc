"""The quality rules (data/quality.py) on planted documents, and `raylm prepare` applying them:
bad documents are dropped and counted by rule, good ones reach the shards unchanged."""

from __future__ import annotations

import json

import pytest

from raylm.core.errors import UserError
from raylm.data.quality import QualityConfig, quality_problem, source_kind

PROSE = (
    "The standard library ships with Python and covers files, networking and text processing. "
    "Each module is documented with examples, and most of them are written in Python itself, so "
    "that a reader can open the source and follow how a function works. When a module is slow, it "
    "is often backed by a C extension that has the same interface as the pure Python version.\n"
    "This makes the library a good corpus to learn from: it is varied, carefully reviewed and free "
    "of the boilerplate that fills pages on the web."
)
CODE = '''import os


def walk_sizes(root):
    """Yield (path, size) for every file under root."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            yield path, os.path.getsize(path)
'''
BAD_PROSE = {
    "quality_prose_words": "Click here to subscribe.",
    "quality_prose_mean_word_length": " ".join(["a b c d e f g h"] * 10) + " the and of",
    "quality_prose_symbols": " ".join(["#tag #news #today the and of"] * 12),
    "quality_prose_alphabetic_words": " ".join(["1234 5678 9012 3456 7890 1122 3344"] * 10) + " the of and",
    "quality_prose_stop_words": " ".join(["Cheap flights hotels rentals deals discounts bookings"] * 10),
    "quality_prose_repeated_lines": "\n".join(["Buy one get one free with the code below and save."] * 12),
    "quality_prose_bullets": "\n".join(f"- Chapter {i}: reading configuration files with the standard parser" for i in range(30)),
}
BAD_CODE = {
    "quality_code_lines": "from _contextvars import *\n",
    "quality_code_long_lines": "var a=" + ",".join(str(i) for i in range(2000)) + ";\nvar b=1;\nvar c=2;\n",
    "quality_code_alphanumeric": "x = 1\n" + "\n".join(["+-*/=<>{}[]();:,.!@$%^&|~" * 3] * 20) + "\n",
    "quality_code_repeated_lines": "\n".join(["    assert compute_value(1, 2) == 3  # the same check"] * 40) + "\n",
}


def test_the_kind_comes_from_the_extension():
    assert source_kind("pkg/mod.py") == "code" and source_kind("a/b.JS") == "code"
    assert source_kind("notes.md") == "prose" and source_kind("data.jsonl::12") == "prose" and source_kind(None) == "prose"


def test_good_documents_pass_and_each_bad_one_names_its_rule():
    cfg = QualityConfig()
    assert quality_problem(PROSE, "guide.txt", cfg) is None
    assert quality_problem(CODE, "walk.py", cfg) is None
    for reason, text in BAD_PROSE.items():
        assert quality_problem(text, "page.txt", cfg) == reason, reason
    for reason, text in BAD_CODE.items():
        assert quality_problem(text, "file.py", cfg) == reason, reason
    # Tables repeat their rules by design: not a repeated line or n-gram (these two once failed both).
    import pydoc_data.topics

    for topic in ("operator-summary", "typesseq-mutable"):
        assert quality_problem(pydoc_data.topics.topics[topic], f"pydoc_data.topics[{topic!r}]", cfg) is None, topic
    # Code is not held to prose's rules: few stop words and many symbols are normal there.
    assert quality_problem(CODE, "walk.txt", cfg) is not None


def test_thresholds_come_from_the_config():
    assert quality_problem("Click here to subscribe.", "a.txt", QualityConfig(min_words=3, min_stop_words=1)) is None
    with pytest.raises(UserError, match="quality.max_symbol_ratio is a share"):
        QualityConfig(max_symbol_ratio=2).validate()


def test_prepare_drops_and_counts_what_fails_and_keeps_the_rest(tmp_path, tokenizer_dir, ray_cluster):
    from raylm.data.dataset_dir import read_dataset_manifest
    from raylm.data.prepare import main as prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    import pydoc_data.topics

    # Real prose that passes (the interpreter's own docs), distinct enough not to be near-duplicates.
    topics = ["assert", "assignment", "atom-identifiers", "booleans", "break"]
    good = {"guide.txt": PROSE, "walk.py": CODE} | {f"{name}.txt": pydoc_data.topics.topics[name] for name in topics}
    bad = {f"bad-{i}.txt": text for i, text in enumerate(BAD_PROSE.values())} | {
        f"bad-{i}.py": text for i, text in enumerate(BAD_CODE.values())}
    for name, text in (good | bad).items():
        (corpus / name).write_text(text)
    out = tmp_path / "out"
    assert prepare(["--source", str(corpus), "--out", str(out), "--tokenizer", str(tokenizer_dir), "--seq-len", "8",
                    "--val-fraction", "0"]) == 0
    documents = read_dataset_manifest(out)["documents"]
    dropped = {reason: n for reason, n in documents["skipped"].items() if reason.startswith("quality_")}
    assert dropped == {reason: 1 for reason in (*BAD_PROSE, *BAD_CODE)}, documents["skipped"]
    assert documents["kept"] == len(good)
    # A threshold set on the command line reaches the rules; --no-quality-filter keeps everything.
    loose = tmp_path / "loose"
    assert prepare(["--source", str(corpus), "--out", str(loose), "--tokenizer", str(tokenizer_dir), "--seq-len", "8",
                    "--val-fraction", "0", "quality.min_words=3", "quality.min_stop_words=1"]) == 0
    assert "quality_prose_words" not in read_dataset_manifest(loose)["documents"]["skipped"]
    off = tmp_path / "off"
    assert prepare(["--source", str(corpus), "--out", str(off), "--tokenizer", str(tokenizer_dir), "--seq-len", "8",
                    "--val-fraction", "0", "--no-quality-filter"]) == 0
    manifest = read_dataset_manifest(off)
    assert manifest["documents"]["kept"] == len(good) + len(bad) and manifest["settings"]["quality_filter"] is False
    assert json.dumps(manifest["settings"]["quality"])  # the thresholds used are recorded
