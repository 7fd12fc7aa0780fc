"""`raylm finetune` end to end on the embedded chat set: held-out loss falls, the report tells the
story, and the fine-tuned model dir answers through `raylm generate`. The base and the run dir are
on an S3-compatible server (moto on 127.0.0.1).

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

    from raylm.core import storage
    from raylm.data.chat import read_chat_jsonl
    from raylm.training.run_home import work_dir

    root = tmp_path_factory.mktemp("sft")
    chat = root / "stdlib-chat.jsonl"
    assert raylm(["prepare-chat", "--source", "stdlib", "--out", str(chat), "--max-records", "400"]) == 0
    records, _ = read_chat_jsonl(str(chat))
    base = make_model_dir(root / "base", train_tokenizer(records, root / "tokenizer"), seed=0)
    # The base model dir and the run dir on an S3-compatible server, as on a cluster without a
    # shared disk: the driver and every worker copy the base locally; checkpoints, the chat
    # dataset, the model dir and the report are written to the server.
    remote_base = s3_server("models") + "/base"
    upload_dir(base, remote_base)
    home = s3_server("sft-runs") + "/run"
    rc = raylm(["finetune", "--config", "sft-debug", "--base", remote_base, "--data", str(chat), "--out", home,
                "--num-workers", "2", "--max-steps", "100"])
    assert rc == 0
    on_server = storage.files_under(home)
    # The JSONL became a chat dataset dir first, its shards written by Ray Data's workers.
    assert "chat-data/manifest.json" in on_server and any(name.startswith("chat-data/train/") for name in on_server)
    assert {"model/config.json", "model/model.safetensors", "finetune.json", "report.md", "plots/loss.png", "metrics.jsonl"} <= set(on_server)
    local = work_dir(home)  # the driver's copy of the run's files, as sent
    assert storage.read_bytes(f"{home}/report.md") == (local / "report.md").read_bytes()
    return {"base": base, "out": local, "home": home, "summary": json.loads(storage.read_text(f"{home}/finetune.json"))}


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
    assert raylm(["generate", "--model", sft_run["home"] + "/model", "--prompt", prompt, "--chat", "--max-tokens", "16"]) == 0
    printed = capsys.readouterr().out
    # Exactly transformers' greedy answer to the same chat prompt, stopping at the same end tokens.
    expected = transformers_greedy_chat(model, prompt, 16)
    assert expected.strip() and printed == expected + "\n"
    # The tokenizer is the base's own.
    assert (model / "tokenizer.json").read_bytes() == (sft_run["base"] / "tokenizer.json").read_bytes()
