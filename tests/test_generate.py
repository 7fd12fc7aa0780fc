"""`raylm generate` and `generate_texts`: greedy equals transformers' greedy generate; bad flags are user errors."""

from __future__ import annotations

import pytest
import torch

from raylm.cli import main as raylm_main
from raylm.inference.generate import generate_texts


def transformers_greedy_text(model_dir, prompt: str, max_new_tokens: int, chat: bool = False) -> str:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_cli_greedy_equals_transformers(debug_model_dir, capsys):
    prompt = "def add(a, b):"
    assert raylm_main(["generate", "--model", str(debug_model_dir), "--prompt", prompt, "--max-tokens", "16"]) == 0
    printed = capsys.readouterr().out
    assert printed == prompt + transformers_greedy_text(debug_model_dir, prompt, 16) + "\n"


def test_generate_texts_plain_and_chat_equal_transformers(debug_model_dir):
    prompts = ["import os", "The json module encodes and decodes"]
    assert generate_texts(debug_model_dir, prompts, max_tokens=12) == [transformers_greedy_text(debug_model_dir, p, 12) for p in prompts]
    [chat] = generate_texts(debug_model_dir, ["hello"], max_tokens=12, chat=True)
    assert chat == transformers_greedy_text(debug_model_dir, "hello", 12, chat=True)


def test_seeded_sampling_is_repeatable_and_the_seed_matters(debug_model_dir):
    # The debug model is random: at temperature 1 its next-token distribution is nearly flat over
    # ~300 tokens, so two seeds agreeing on 24 sampled tokens is practically impossible.
    def sample(seed: int) -> str:
        [text] = generate_texts(debug_model_dir, ["x = 1"], max_tokens=24, temperature=1.0, seed=seed)
        return text

    a = sample(5)
    assert a and a == sample(5)
    assert len({a, sample(6), sample(7)}) == 3


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-tokens", "0"], "--max-tokens"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
        (["--max-tokens", "5000"], "context of 256 tokens"),
    ],
)
def test_bad_flags_are_one_line_user_errors(debug_model_dir, capsys, flags, message):
    assert raylm_main(["generate", "--model", str(debug_model_dir), "--prompt", "hi", *flags]) == 2
    assert message in capsys.readouterr().err


def test_missing_model_dir_is_a_user_error(tmp_path, capsys):
    assert raylm_main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
