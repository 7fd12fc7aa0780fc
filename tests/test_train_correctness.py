"""The train loop's arithmetic, end to end on real Ray Train + DeepSpeed (ZeRO-0, fp32, CPU):

- every target token of a global batch weighs the same, however the batch is cut: 1x8 and 8x1
  micro-batches on 1 worker, and 2x2 on 2 workers, end with the same weights;
- the val loss is the token-weighted loss over the whole val split, at any worker count;
- a run stopped exactly at an epoch's end and extended goes on with the next epoch, as if it had
  never stopped;
- a run extended to more steps keeps its learning-rate curve, and says so.

The rows are chat SFT rows (assistant-only masks, so micro-batches hold different numbers of
target tokens, where averaging micro-batch means would go wrong), fed through `run_training`, the
function `raylm finetune` calls, on the session's debug model. 24 train rows in global batches of
8 make 3 steps an epoch; 5 steps cross an epoch boundary.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

STEPS = 5
COMMON = ["deepspeed.zero_stage=0", "deepspeed.precision=fp32", "data.global_batch=8", f"max_steps={STEPS}",
          f"schedule.total_steps={STEPS}", "schedule.warmup_steps=0", "optimizer.lr=1e-2", "optimizer.weight_decay=0.1",
          "eval.every=0", "eval.at_start=true", "checkpoint.every=0", "checkpoint.keep=2", "logging.every=1",
          "data.seq_len=64"]


@pytest.fixture(scope="module")
def sft_rows(debug_model_dir):
    from raylm.data.chat_corpus import build_chat_records
    from raylm.data.chat_rows import encode_rows, load_base_tokenizer

    records = [r["messages"] for r in build_chat_records(60)]
    tokenizer, pad_id = load_base_tokenizer(debug_model_dir)
    train = encode_rows(records[:45], tokenizer, seq_len=64, pad_id=pad_id, pack=False).rows
    val = encode_rows(records[45:], tokenizer, seq_len=64, pad_id=pad_id, pack=False).rows
    assert len(train) >= 24 and len(val) >= 7
    targets = {int(row["loss_mask"][1:].sum()) for row in train[:24]}
    assert len(targets) > 4  # rows with different numbers of targets: where the weighting shows
    return train[:24], val[:7]  # 7 val rows: no worker count used here divides them


def train(rows, out: Path, model_dir, *overrides: str, workers: int = 1) -> Path:
    from raylm.training.config import load_train_config
    from raylm.training.pretrain import run_training
    from raylm.training.row_source import ArrayRows

    train_rows, val_rows = rows
    cfg = load_train_config("debug", [*COMMON, *overrides, f"scaling.num_workers={workers}"])
    run_training(cfg, train=ArrayRows.from_records(train_rows), val=ArrayRows.from_records(val_rows), tokenizer_dir=str(model_dir),
                 out=str(out), init_model_dir=str(model_dir), kind="finetune", write_run_report=False)
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.fixture(scope="module")
def reference(sft_rows, debug_model_dir, tmp_path_factory):
    """1 worker, one micro-batch of 8 rows per step."""
    return train(sft_rows, tmp_path_factory.mktemp("runs") / "m8", debug_model_dir, "data.micro_batch=8")


def test_the_run_moves_and_crosses_an_epoch(reference):
    rows = metrics(reference)
    assert [r["step"] for r in rows] == list(range(STEPS + 1))  # step 0: the eval of the initial weights
    assert [r["epoch"] for r in rows[1:]] == [0, 0, 0, 1, 1]
    base = weights(reference)  # the fine-tuned weights differ from the start by far more than the tolerances below
    assert rows[1]["loss"] != rows[-1]["loss"] and base


@pytest.mark.parametrize("micro, workers", [(1, 1), (2, 2)], ids=["8x1-micro", "2-workers"])
def test_the_split_of_a_global_batch_does_not_change_the_weights(sft_rows, debug_model_dir, reference, tmp_path, micro, workers):
    run = train(sft_rows, tmp_path / "run", debug_model_dir, f"data.micro_batch={micro}", workers=workers)
    assert max_diff(run, reference) < 1e-4
    ours, theirs = metrics(run), metrics(reference)
    assert [r["loss"] for r in ours[1:]] == pytest.approx([r["loss"] for r in theirs[1:]], rel=1e-5)
    # The val loss of the same weights on 1 or 2 workers: every val row scored once, tokens weighted alike.
    assert ours[0]["val_loss"] == pytest.approx(theirs[0]["val_loss"], rel=1e-6)


def test_a_run_extended_after_an_epochs_end_continues_exactly(sft_rows, debug_model_dir, reference, tmp_path):
    out = tmp_path / "extended"
    train(sft_rows, out, debug_model_dir, "data.micro_batch=8", "max_steps=3")  # 3 steps = every row of epoch 0
    assert json.loads((out / "checkpoint_step00000003" / "raylm_state.json").read_text())["rows_in_epoch"] == 24
    train(sft_rows, out, debug_model_dir, "data.micro_batch=8")  # the same command, up to step 5
    assert [r["loss"] for r in metrics(out)[1:]] == [r["loss"] for r in metrics(reference)[1:]]
    assert max_diff(out, reference) == 0.0


def test_a_run_extended_to_more_steps_keeps_its_schedule_and_says_so(sft_rows, debug_model_dir, tmp_path, capfd):
    from raylm.training.config import load_train_config
    from raylm.training.schedule import learning_rate

    out, curve = tmp_path / "longer", ["data.micro_batch=8", "schedule.total_steps=0"]  # the curve spans max_steps
    train(sft_rows, out, debug_model_dir, *curve, "max_steps=3")
    train(sft_rows, out, debug_model_dir, *curve)  # max_steps=5 (COMMON): two more steps
    first = load_train_config("debug", [*COMMON, *curve, "max_steps=3", "scaling.num_workers=1"])
    lrs = [r["lr"] for r in metrics(out)[1:]]
    # Re-stretched to 5 steps, step 4's rate would jump back up above step 3's.
    assert lrs == pytest.approx([learning_rate(s, first) for s in range(3)] + [1e-2 * first.schedule.min_lr_ratio] * 2)
    console = capfd.readouterr().out
    assert "[raylm] changed on resume: max_steps 3 -> 5\n" in console
    assert ("[raylm] the learning-rate schedule keeps the run's length of 3 steps; steps after 3 train at its final rate "
            "(set schedule.total_steps to change it)") in console
