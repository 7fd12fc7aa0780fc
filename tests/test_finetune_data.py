"""SFT rows from real chat records: the trained positions decode to exactly the assistant turns.

No Ray here: the rows are checked before they become a Ray Dataset.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from raylm.core.errors import UserError
from raylm.training.sft_data import (
    SftDataConfig,
    build_sft_rows,
    encode_rows,
    split_records,
)
from raylm.training.sft_data import load_base_tokenizer as load_tokenizer

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
    from raylm.data.chat_corpus import main as prepare_chat

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


def test_split_is_deterministic_and_disjoint():
    records = [[{"role": "user", "content": str(i)}] for i in range(100)]
    train, val = split_records(records, 0.1, seed=3)
    assert (len(train), len(val)) == (90, 10)
    assert split_records(records, 0.1, seed=3) == (train, val)
    assert split_records(records, 0.1, seed=4)[1] != val
    assert sorted(train + val, key=lambda r: int(r[0]["content"])) == records
    assert len(split_records(records[:3], 0.05, seed=0)[1]) == 1  # a tiny file still gets a val record


def test_build_counts_bad_lines_and_limits_records(tmp_path, tokenizer_dir):
    lines = [json.dumps({"prompt": f"What is {i}?", "response": f"It is {i}."}) for i in range(30)]
    lines.insert(5, "not json")
    lines.insert(9, json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    built = build_sft_rows(path, tokenizer_dir, seq_len=64, cfg=SftDataConfig(val_fraction=0.2, max_records=20))
    stats = built["stats"]
    assert stats["records"] == 20 and sum(stats["skipped_lines"].values()) == 2
    assert sorted(n for lines in stats["skipped_line_numbers"].values() for n in lines) == [6, 10]
    assert (stats["train"]["conversations"], stats["val"]["conversations"]) == (16, 4)


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
