"""`raylm finetune` end to end on the embedded chat set: held-out loss falls, the report tells the
story, and the fine-tuned model dir answers through `raylm generate`.

One real run (Ray Train, 2 workers, DeepSpeed ZeRO-2, the debug model) is shared by the tests.
"""

from __future__ import annotations

import json

import pytest

from raylm.cli import main as raylm

VOCAB = 1024


def train_tokenizer(records: list[list[dict]], path):
    """A small ChatML byte-level BPE fitted to the chat records, in the dataset-dir tokenizer form."""
    from tiny_artifacts import CHATML_TEMPLATE, SPECIAL_TOKENS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((m["content"] for r in records for m in r), trainer)
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
              "pad_token": "<|pad|>", "model_max_length": 256, "chat_template": CHATML_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def transformers_greedy_chat(model_dir, prompt: str, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, ray_cluster, s3_server):
    from tiny_artifacts import make_model_dir, upload_dir

    from raylm.data.chat import read_chat_jsonl

    root = tmp_path_factory.mktemp("sft")
    chat = root / "stdlib-chat.jsonl"
    assert raylm(["prepare-chat", "--source", "stdlib", "--out", str(chat), "--max-records", "400"]) == 0
    records, _ = read_chat_jsonl(str(chat))
    base = make_model_dir(root / "base", train_tokenizer(records, root / "tokenizer"), seed=0)
    out = root / "run"
    # The base model dir on an S3-compatible server, as on a cluster without a shared disk: the
    # driver and every worker copy it locally.
    remote_base = s3_server("models") + "/base"
    upload_dir(base, remote_base)
    rc = raylm(["finetune", "--config", "sft-debug", "--base", remote_base, "--data", str(chat), "--out", str(out),
                "--num-workers", "2", "--max-steps", "100"])
    assert rc == 0
    assert (out / "chat-data" / "manifest.json").is_file()  # the JSONL became a chat dataset dir first, on Ray Data
    return {"base": base, "out": out, "summary": json.loads((out / "finetune.json").read_text())}


def test_sft_lowers_the_heldout_loss(sft_run):
    before, after = sft_run["summary"]["before"]["val_loss"], sft_run["summary"]["after"]["val_loss"]
    assert after < before - 1.0, (before, after)  # at least one nat per assistant token
    stats = sft_run["summary"]["data_stats"]
    assert stats["val"]["rows"] >= 10 and stats["train"]["rows"] >= 300


def test_report_shows_losses_and_answers_before_and_after(sft_run):
    out = sft_run["out"]
    text = (out / "report.md").read_text()
    assert "held-out SFT loss, fine-tuned" in text and "## Chat data" in text
    assert text.count("**base**") == text.count("**fine-tuned**") == 2  # sft-debug's two eval prompts
    assert "What does `json.dumps` do?" in text
    assert (out / "plots" / "loss.png").is_file()
    answers = sft_run["summary"]["after"]["answers"]
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_finetuned_model_dir_answers_through_raylm_generate(sft_run, capsys):
    model = sft_run["out"] / "model"
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    prompt = "What does `json.dumps` do?"
    capsys.readouterr()
    assert raylm(["generate", "--model", str(model), "--prompt", prompt, "--chat", "--max-tokens", "16"]) == 0
    printed = capsys.readouterr().out
    # Exactly transformers' greedy answer to the same chat prompt, stopping at the same end tokens.
    expected = transformers_greedy_chat(model, prompt, 16)
    assert expected.strip() and printed == expected + "\n"
    # The tokenizer is the base's own.
    assert (model / "tokenizer.json").read_bytes() == (sft_run["base"] / "tokenizer.json").read_bytes()
