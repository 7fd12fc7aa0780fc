"""SFT rows from real chat records: the trained positions decode to exactly the assistant turns
(data/chat_rows.py, no Ray); and `raylm prepare-chat`'s chat dataset dir, built on Ray Data,
holds those very rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from raylm.core.errors import UserError
from raylm.data.chat_dataset import in_val, read_chat_dataset
from raylm.data.chat_dataset import main as prepare_chat
from raylm.data.chat_rows import encode_rows
from raylm.data.chat_rows import load_base_tokenizer as load_tokenizer

MULTI_TURN = [
    {"role": "system", "content": "You answer questions about Python's standard library."},
    {"role": "user", "content": "What does `len` do?"},
    {"role": "assistant", "content": "Return the number of items in a container."},
    {"role": "user", "content": "And `abs`?"},
    {"role": "assistant", "content": "Return the absolute value of the argument."},
]


@pytest.fixture(scope="module")
def stdlib_chat(tmp_path_factory):
    """The embedded chat set, as `raylm prepare-chat --source stdlib` writes it (a small slice)."""
    path = tmp_path_factory.mktemp("chat") / "stdlib-chat.jsonl"
    assert prepare_chat(["--source", "stdlib", "--out", str(path), "--max-records", "200"]) == 0
    return path


def trained_spans(row: dict[str, np.ndarray]) -> list[list[int]]:
    """The runs of consecutive trained token ids in a row."""
    spans, current = [], []
    for token, trained in zip(row["input_ids"].tolist(), row["loss_mask"].tolist()):
        if trained:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def assert_mask_is_assistant_turns(tokenizer: Tokenizer, messages: list[dict], row: dict[str, np.ndarray]) -> None:
    decoded = [tokenizer.decode(span, skip_special_tokens=False) for span in trained_spans(row)]
    expected = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    # The newline after <|im_end|> may or may not be trained (the data contract allows both).
    assert [d.removesuffix("\n") for d in decoded] == expected


def test_trained_positions_decode_to_the_assistant_turns_of_real_records(stdlib_chat, tokenizer_dir):
    from raylm.data.chat import read_chat_jsonl

    records, _ = read_chat_jsonl(str(stdlib_chat))
    records = records[:60] + [MULTI_TURN]
    tokenizer, pad_id = load_tokenizer(tokenizer_dir)
    rows = encode_rows(records, tokenizer, seq_len=2048, pad_id=pad_id, overlong="drop", pack=False)
    assert rows.counts["rows"] == len(records) and rows.counts["dropped_overlong"] == 0
    for messages, row in zip(records, rows.rows):
        assert row["input_ids"].shape == row["loss_mask"].shape == (2049,)
        assert_mask_is_assistant_turns(tokenizer, messages, row)
        n = int(np.flatnonzero(row["input_ids"] != pad_id).max()) + 1  # the conversation's length
        assert (row["input_ids"][n:] == pad_id).all() and not row["loss_mask"][n:].any()
    roles = {m["role"] for r in records for m in r}
    assert roles == {"system", "user", "assistant"}


def test_overlong_conversations_are_truncated_or_dropped_and_counted(tokenizer_dir):
    tokenizer, pad_id = load_tokenizer(tokenizer_dir)
    long_answer = [{"role": "user", "content": "Explain."}, {"role": "assistant", "content": "word " * 200}]
    long_question = [{"role": "user", "content": "why " * 200}, {"role": "assistant", "content": "Because."}]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    records = [long_answer, long_question, short]

    cut = encode_rows(records, tokenizer, seq_len=32, pad_id=pad_id, overlong="truncate", pack=False)
    assert (cut.counts["truncated"], cut.counts["dropped_no_target"], cut.counts["rows"]) == (2, 1, 2)
    kept = cut.rows[0]  # the long answer's beginning: trained from the answer's first token to the cut
    assert kept["loss_mask"][-1] and (kept["input_ids"] != pad_id).all()
    assert tokenizer.decode(trained_spans(kept)[0]).startswith("word wor")

    dropped = encode_rows(records, tokenizer, seq_len=32, pad_id=pad_id, overlong="drop", pack=False)
    assert (dropped.counts["dropped_overlong"], dropped.counts["rows"]) == (2, 1)
    assert_mask_is_assistant_turns(tokenizer, short, dropped.rows[0])


def segments_of(row: dict[str, np.ndarray]) -> list[tuple[list[int], list[bool]]]:
    """A packed row's conversations: (ids, mask) per segment, in order."""
    out = []
    for segment in range(1, int(row["segment_ids"].max()) + 1):
        where = row["segment_ids"] == segment
        out.append((row["input_ids"][where].tolist(), row["loss_mask"][where].tolist()))
    return out


def test_packed_rows_hold_each_conversation_once_with_its_mask_and_little_padding(stdlib_chat, tokenizer_dir):
    from raylm.data.chat import read_chat_jsonl

    records, _ = read_chat_jsonl(str(stdlib_chat))
    tokenizer, pad_id = load_tokenizer(tokenizer_dir)
    # The test tokenizer is tiny (conversations run to ~100 tokens), so rows are longer than
    # sft-tiny's 128 to leave room for packing; bench/train.py measures the real tokenizer's share.
    seq_len = 512
    alone = encode_rows(records, tokenizer, seq_len=seq_len, pad_id=pad_id, pack=False)
    packed = encode_rows(records, tokenizer, seq_len=seq_len, pad_id=pad_id)
    real = packed.counts["tokens"]
    assert real == alone.counts["tokens"] and packed.counts["target_tokens"] == alone.counts["target_tokens"]
    share = real / (packed.counts["rows"] * (seq_len + 1))
    assert share >= 0.9, f"real tokens are {share:.1%} of the packed rows"
    assert alone.counts["rows"] > packed.counts["rows"]

    def unpadded(row):
        n = int(np.flatnonzero(row["segment_ids"]).max()) + 1
        return row["input_ids"][:n].tolist(), [False] + row["loss_mask"][1:n].tolist()

    expected = sorted(unpadded(row) for row in alone.rows)
    found = []
    for row in packed.rows:
        assert row["input_ids"].shape == row["loss_mask"].shape == row["segment_ids"].shape == (seq_len + 1,)
        pad = row["segment_ids"] == 0
        assert (row["input_ids"][pad] == pad_id).all() and not row["loss_mask"][pad].any()
        assert (np.diff(row["segment_ids"][~pad]) >= 0).all() and not pad[: int((~pad).sum())].any()  # segments first, then padding
        found += [(ids, [False] + mask[1:]) for ids, mask in segments_of(row)]
    assert sorted(found) == expected  # every conversation once, with its own mask; no target crosses examples


def test_the_val_split_is_a_per_record_hash():
    records = [[{"role": "user", "content": str(i)}] for i in range(2000)]
    val = [in_val(r, 3, 0.1) for r in records]
    assert 150 < sum(val) < 250  # about the fraction asked
    assert val == [in_val(r, 3, 0.1) for r in records] and val != [in_val(r, 4, 0.1) for r in records]
    assert not any(in_val(r, 3, 0.0) for r in records)


def read_rows(data_dir, manifest, split) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for shard in manifest["splits"][split]["shards"]:
        table = pq.read_table(data_dir / shard["path"])
        rows += [{name: np.asarray(table.column(name)[i].as_py()) for name in table.column_names} for i in range(len(table))]
    return rows


def test_prepare_chat_writes_the_rows_of_the_rules_and_counts_bad_lines(tmp_path, tokenizer_dir, ray_cluster, capsys):
    from raylm.data.chat import read_chat_jsonl
    from raylm.training.row_source import ParquetRows

    lines = [json.dumps({"prompt": f"What is {i}?", "response": f"It is {i}." * (1 + i % 7)}) for i in range(300)]
    lines.insert(5, "not json")
    lines.insert(9, json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(lines) + "\n")
    out = tmp_path / "chat-data"
    args = ["--source", str(chat), "--tokenizer", str(tokenizer_dir), "--out", str(out), "--seq-len", "128",
            "--val-fraction", "0.2", "--records-per-shard", "100"]
    assert prepare_chat(args) == 0
    assert "302 records (skipped: no_assistant_turn 1, not_json 1)" in capsys.readouterr().out
    manifest = read_chat_dataset(out)
    assert manifest["records"] == 302 and manifest["skipped_lines"] == {"no_assistant_turn": 1, "not_json": 1}
    assert manifest["skipped_examples"]["not_json"] == [f"{chat}:6"] and manifest["skipped_examples"]["no_assistant_turn"] == [f"{chat}:10"]
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["conversations"] + val["conversations"] == 300 and 30 < val["conversations"] < 90
    assert len(train["shards"]) == 4  # one per batch of 100 lines: the workers write them
    # The rows are the rules' rows: each split's records, encoded and packed batch by batch.
    records, _ = read_chat_jsonl(str(chat))
    tokenizer, pad_id = load_tokenizer(tokenizer_dir)
    for split in ("train", "val"):
        mine = [r for r in records if in_val(r, 0, 0.2) == (split == "val")]
        expected = encode_rows(mine, tokenizer, seq_len=128, pad_id=pad_id)
        written = read_rows(out, manifest, split)
        assert manifest["splits"][split]["target_tokens"] == expected.counts["target_tokens"]
        conversations = sorted(c for r in written for c in segments_of(r))
        assert conversations == sorted(c for r in expected.rows for c in segments_of(r))  # packed per batch, the same conversations
        assert all(r["input_ids"].shape == r["loss_mask"].shape == r["segment_ids"].shape == (129,) for r in written)
    # Training reads it as it reads a pretraining dataset: by row group, with every column.
    source = ParquetRows([str(out / s["path"]) for s in train["shards"]])
    assert source.num_rows == train["rows"] and set(source.read(0)) == {"input_ids", "loss_mask", "segment_ids"}
    # The same command keeps the dir; other settings are refused unless --overwrite.
    assert prepare_chat(args) == 0 and "kept the chat dataset" in capsys.readouterr().out
    with pytest.raises(UserError, match="another source, tokenizer or settings"):
        prepare_chat([*args[:-2], "--records-per-shard", "100", "--split-seed", "1"])


def test_finetune_refuses_a_chat_dataset_of_another_tokenizer_or_row_length(tmp_path, tokenizer_dir, ray_cluster):
    import shutil

    from raylm.training.sft_data import check_chat_dataset

    out = tmp_path / "chat-data"
    assert prepare_chat(["--source", "stdlib", "--max-records", "50", "--tokenizer", str(tokenizer_dir), "--out", str(out), "--seq-len", "96"]) == 0
    manifest = read_chat_dataset(out)
    check_chat_dataset(str(out), manifest, str(tokenizer_dir), 96)  # its own tokenizer and length: fine
    with pytest.raises(UserError, match="rows of seq_len 96 but the run trains data.seq_len=64"):
        check_chat_dataset(str(out), manifest, str(tokenizer_dir), 64)
    other = tmp_path / "other-base"
    shutil.copytree(tokenizer_dir, other)
    (other / "tokenizer.json").write_text(json.dumps(json.loads((other / "tokenizer.json").read_text()), indent=1))
    with pytest.raises(UserError, match="was encoded with the tokenizer of"):
        check_chat_dataset(str(out), manifest, str(other), 96)


def test_a_chat_file_with_no_usable_record_is_refused(tmp_path, tokenizer_dir, ray_cluster):
    chat = tmp_path / "bad.jsonl"
    chat.write_text("not json\n[1, 2]\n")
    with pytest.raises(UserError, match="has no usable record"):
        prepare_chat(["--source", str(chat), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "out")])
    with pytest.raises(UserError, match="--tokenizer is required"):
        prepare_chat(["--source", str(chat), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # nothing half-written looks like a dataset


def test_a_tokenizer_without_chatml_tokens_is_refused(tmp_path, tokenizer_dir):
    from tokenizers import models

    bare = tmp_path / "bare"
    bare.mkdir()
    Tokenizer(models.BPE()).save(str(bare / "tokenizer.json"))
    with pytest.raises(UserError, match="<\\|im_start\\|>"):
        load_tokenizer(bare)


def test_a_base_whose_chat_template_is_not_chatml_is_refused(tmp_path, tokenizer_dir):
    import shutil

    base = tmp_path / "llama2-style"
    shutil.copytree(tokenizer_dir, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="ChatML"):
        load_tokenizer(base)
    del config["chat_template"]
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no chat_template"):
        load_tokenizer(base)
