"""Chat records: the JSONL skip rule, encode_chat against transformers' chat template, the loss
mask on real records, and the embedded chat set (`raylm prepare-chat`)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from raylm.core.errors import UserError
from raylm.data.chat import read_chat_jsonl
from raylm.data.chat_corpus import build_chat_records
from raylm.data.chat_dataset import main as prepare_chat_main
from raylm.data.sources import stdlib_files
from raylm.data.tokenizer import save_tokenizer, train_tokenizer
from raylm.model.chat import IM_END, encode_chat, render_chat, trained_spans


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root, files = stdlib_files()
    texts = [p.read_text() for p in sorted(files) if p.parent == root][:40]
    texts.append("Ünïcödé — 日本語のテキスト, emoji 🤖🚀, and more.")
    directory = tmp_path_factory.mktemp("chat-tokenizer")
    save_tokenizer(train_tokenizer(texts, 700), directory, seq_len=512)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def chat_records():
    return build_chat_records()


EDGE_CASES = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, of course."},
    ],
    [{"role": "user", "content": "Ünïcödé 🤖?"}, {"role": "assistant", "content": "\n\n  Indented 日本語\n\treply  "}],
    [{"role": "user", "content": "trailing user turn"}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "bye"}],
]


def template_ids(hf_tokenizer, messages) -> list[int]:
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def trained_segments(tokenizer, ids, mask) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    segments, run = [], []
    for token, trained in zip(ids + [None], mask + [False]):
        if trained:
            run.append(token)
        elif run:
            segments.append(tokenizer.decode(run, skip_special_tokens=False))
            run = []
    return segments


def test_render_matches_the_chat_template(hf_tokenizer, chat_records):
    for messages in EDGE_CASES + [r["messages"] for r in chat_records[:50]]:
        for prompt in (False, True):
            expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert render_chat(messages, add_generation_prompt=prompt) == expected


def test_encode_chat_ids_equal_the_templates(tokenizer, hf_tokenizer, chat_records):
    for messages in EDGE_CASES + [r["messages"] for r in chat_records[:200]]:
        ids, mask = encode_chat(tokenizer, messages)
        assert ids == template_ids(hf_tokenizer, messages)
        assert len(mask) == len(ids)


def test_mask_trains_exactly_the_assistant_turns_of_real_records(tokenizer, chat_records):
    multi_turn = 0
    for record in chat_records[:300] + [{"messages": m} for m in EDGE_CASES[:2]]:
        messages = record["messages"]
        ids, mask = encode_chat(tokenizer, messages)
        assistant = [m["content"] for m in messages if m["role"] == "assistant"]
        assert trained_segments(tokenizer, ids, mask) == [content + IM_END for content in assistant]
        untrained = tokenizer.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=False)
        for message in messages:
            if message["role"] != "assistant":
                assert message["content"] in untrained
        multi_turn += len(assistant) > 1
    assert multi_turn >= 2  # the embedded set has two-turn conversations, and every turn is trained


def test_a_token_straddling_header_and_content_is_not_trained(tokenizer):
    messages = EDGE_CASES[2]
    ids, mask = encode_chat(tokenizer, messages)
    (segment,) = trained_segments(tokenizer, ids, mask)
    # Whatever merges with the header's newline stays untrained; the rest of the content is trained.
    assert messages[1]["content"].endswith(segment[: -len(IM_END)]) and segment.endswith(IM_END)
    assert "Indented 日本語" in segment


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_chat_jsonl_skips_bad_records_by_reason_with_line_numbers(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = write_lines(
        tmp_path / "chat.jsonl",
        [
            json.dumps(good),  # 1
            "{not json",  # 2
            json.dumps(["a", "list"]),  # 3
            json.dumps({"text": "no messages"}),  # 4
            json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "a"}]}),  # 5
            json.dumps({"messages": [{"content": "x"}, {"role": "assistant", "content": "a"}]}),  # 6
            json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}),  # 7
            json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),  # 8
            "",  # 9: blank, ignored
            json.dumps({"prompt": "p", "response": "r", "system": "s"}),  # 10
            json.dumps({"messages": [{"role": "user", "content": "x <|im_start|>system"}, {"role": "assistant", "content": "a"}]}),  # 11
            json.dumps({"messages": ["not an object"]}),  # 12
        ],
    )
    records, skipped = read_chat_jsonl(path)
    assert records == [
        good["messages"],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}],
    ]
    assert skipped == {
        "not_json": [2],
        "not_an_object": [3],
        "no_messages": [4],
        "bad_role": [5, 6],
        "empty_content": [7],
        "no_assistant_turn": [8],
        "special_token_in_content": [11],
        "bad_message": [12],
    }


def test_read_chat_jsonl_refuses_a_file_with_nothing_usable(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["{oops", json.dumps({"prompt": "no response"})])
    with pytest.raises(UserError, match="no usable record"):
        read_chat_jsonl(path)
    with pytest.raises(UserError, match="does not exist"):
        read_chat_jsonl(tmp_path / "missing.jsonl")


def test_encode_chat_refuses_an_invalid_conversation(tokenizer):
    with pytest.raises(UserError, match="bad_role"):
        encode_chat(tokenizer, [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}])


def test_embedded_chat_set(chat_records):
    assert 2000 <= len(chat_records) <= 6000
    by_question = {r["messages"][-2]["content"]: r["messages"][-1]["content"] for r in chat_records}
    dumps = [q for q in by_question if "`json.dumps`" in q]
    assert dumps and by_question[dumps[0]].startswith("Serialize ``obj`` to a JSON formatted ``str``")
    assert any(q.startswith("Explain ") and q.endswith(" in Python.") for q in by_question)  # pydoc topics
    assert any(r["messages"][0]["role"] == "system" for r in chat_records)


def test_prepare_chat_cli_is_deterministic_and_readable(tmp_path, capsys, chat_records):
    out = tmp_path / "chat.jsonl"
    assert prepare_chat_main(["--source", "stdlib", "--out", str(out), "--max-records", "150"]) == 0
    # A second, independent build (the fixture's) gives the same records in the same order.
    expected = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chat_records[:150])
    assert out.read_text(encoding="utf-8") == expected
    records, skipped = read_chat_jsonl(out)
    assert len(records) == 150 and skipped == {}
    assert "wrote 150 chat records" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*partial*"))
    with pytest.raises(UserError, match="stdlib"):
        prepare_chat_main(["--source", "wikipedia", "--out", str(out)])


# ---- the loss mask against transformers' and TRL's assistant masks ---------------------------------

PARITY_CASES = EDGE_CASES[:2] + EDGE_CASES[3:] + [
    [
        {"role": "system", "content": "You are a terse Python tutor."},
        {"role": "user", "content": "What does `len` return?"},
        {"role": "assistant", "content": "The number of items in a container."},
        {"role": "user", "content": "And for a dict?"},
        {"role": "assistant", "content": "The number of keys."},
        {"role": "user", "content": "Show me."},
        {"role": "assistant", "content": "```python\nlen({'a': 1, 'b': 2})  # 2\n```"},
    ],
    [
        {"role": "system", "content": "Answer in French. Réponds brièvement."},
        {"role": "user", "content": "Bonjour ! 🤖"},
        {"role": "assistant", "content": "Bonjour, que puis-je faire ?"},
        {"role": "user", "content": "Rien, merci."},
        {"role": "assistant", "content": "D'accord — à bientôt."},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "def f(x):\n    return x * 2\nWhat is f(3)?"},
        {"role": "assistant", "content": "6"},
    ],
]
# Content that opens with blank lines: the header's newline and the content's first one merge into
# one token, which straddles the start of the trained span.
STRADDLING_CASE = EDGE_CASES[2]


def straddling_tokens(tokenizer, messages) -> set[int]:
    """Indices of tokens that cross the start of a trained span (part header, part content)."""
    offsets = tokenizer.encode(render_chat(messages), add_special_tokens=False).offsets
    starts = [start for start, _ in trained_spans(messages)]
    return {i for i, (lo, hi) in enumerate(offsets) if any(lo < start < hi for start in starts)}


def transformers_assistant_mask(hf_tokenizer, messages) -> tuple[list[int], list[bool]]:
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]


def test_loss_mask_equals_transformers_assistant_mask(tokenizer, hf_tokenizer, chat_records):
    # Same convention on both sides, no shift: mask[i] True means token i is a trained label
    # (transformers marks the tokens rendered inside {% generation %}: assistant content + <|im_end|>).
    cases = PARITY_CASES + [r["messages"] for r in chat_records[:300]]
    assert sum(m["role"] == "system" for c in cases for m in c) >= 4 and max(sum(m["role"] == "assistant" for m in c) for c in cases) == 3
    for messages in cases:
        ids, mask = encode_chat(tokenizer, messages)
        hf_ids, hf_mask = transformers_assistant_mask(hf_tokenizer, messages)
        assert hf_ids == ids
        assert straddling_tokens(tokenizer, messages) == set()
        assert hf_mask == mask, render_chat(messages)


def test_a_straddling_token_is_the_one_deliberate_difference_from_transformers(tokenizer, hf_tokenizer):
    # transformers marks every token that holds any character of the {% generation %} span, so a
    # token merging the header's newline with the content's first one is trained there. encode_chat
    # counts it as header: at inference the prompt ends with the header's own "\n" token, so the
    # model never has to emit that merged token. Everywhere else the masks are equal.
    ids, mask = encode_chat(tokenizer, STRADDLING_CASE)
    hf_ids, hf_mask = transformers_assistant_mask(hf_tokenizer, STRADDLING_CASE)
    assert hf_ids == ids
    straddling = straddling_tokens(tokenizer, STRADDLING_CASE)
    assert len(straddling) == 1 and tokenizer.decode([ids[min(straddling)]]) == "\n\n"
    assert [i for i, (ours, theirs) in enumerate(zip(mask, hf_mask)) if ours != theirs] == sorted(straddling)
    assert not any(mask[i] for i in straddling) and all(hf_mask[i] for i in straddling)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # TRL's own SFTConfig
def test_trl_sft_trainer_trains_exactly_our_masked_tokens(tokenizer, hf_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # everything TRL needs is local
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    conversations = [PARITY_CASES[1], PARITY_CASES[4]]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(hf_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512))
    args = SFTConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=True, max_steps=1, per_device_train_batch_size=2,
                     report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no", dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"messages": c} for c in conversations]),
                         processing_class=hf_tokenizer)
    assert trainer.chat_template is None  # TRL kept our template: it found its {% generation %} marks
    assert is_chat_template_stop_token_trained(hf_tokenizer)  # and it trains <|im_end|>, so the model learns to stop

    rows = [trainer.train_dataset[i] for i in range(len(conversations))]
    batch = trainer.data_collator(rows)
    for row, messages in enumerate(conversations):
        ids, mask = encode_chat(tokenizer, messages)
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids
        assert (batch["labels"][row, :n] != -100).tolist() == mask
        assert (batch["labels"][row, n:] == -100).all()  # padding is never trained
        assert batch["labels"][row, :n][torch.tensor(mask)].tolist() == [t for t, m in zip(ids, mask) if m]
    assert trainer.train().global_step == 1  # and it trains on it
