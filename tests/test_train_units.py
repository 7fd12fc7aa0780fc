"""Pieces of the train loop that need no worker group: the LR schedule, the data order, batch
arithmetic, the DeepSpeed config and metrics truncation on resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raylm.core.errors import UserError
from raylm.training.config import global_batch, grad_accum, load_train_config
from raylm.training.deepspeed_config import build_ds_config
from raylm.training.loop import global_batches, learning_rate
from raylm.training.tracking import truncate_metrics


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    cfg = load_train_config("debug", ["max_steps=100", "schedule.warmup_steps=10", "optimizer.lr=1.0", "schedule.min_lr_ratio=0.1"])
    lrs = [learning_rate(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_wsd_schedule_is_flat_then_decays_linearly():
    cfg = load_train_config("debug", ["max_steps=100", "schedule.kind=wsd", "schedule.warmup_steps=10",
                                      "schedule.decay_fraction=0.2", "optimizer.lr=1.0", "schedule.min_lr_ratio=0.0"])
    assert learning_rate(50, cfg) == 1.0 and learning_rate(79, cfg) == 1.0
    assert learning_rate(90, cfg) == pytest.approx(0.5) and learning_rate(100, cfg) == 0.0


def test_global_batch_sets_grad_accum_per_worker_count():
    cfg = load_train_config("debug", ["data.micro_batch=4", "data.global_batch=16"])
    assert (grad_accum(cfg, 1), grad_accum(cfg, 2), grad_accum(cfg, 4)) == (4, 2, 1)
    assert global_batch(cfg, 2) == 16
    with pytest.raises(UserError, match="data.global_batch"):
        grad_accum(cfg, 3)


def test_data_order_is_independent_of_the_batch_size_and_resumable(ray_cluster):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds = ray.data.from_items([{"input_ids": [i, i + 1, i + 2]} for i in range(100)]).materialize()

    def stream(size, skip=0, epoch=0):
        batches = list(global_batches(ds.iterator(), window=32, seed=7, epoch=epoch, size=size, skip_rows=skip))
        return np.concatenate([b["input_ids"][:, 0] for b in batches]).tolist()

    by4, by8 = stream(4), stream(8)
    assert len(by4) == 100 and len(by8) == 96 and by8 == by4[:96]  # the tail shorter than a batch is dropped
    assert sorted(by4) == list(range(100)) and by4 != list(range(100))  # every row once, shuffled
    assert stream(4, skip=40) == by4[40:]  # a resume skips exactly the consumed rows
    assert stream(4, epoch=1) != by4 and stream(4) == by4  # a new order per epoch, the same order per (seed, epoch)


def test_deepspeed_config_follows_the_train_config(tmp_path):
    cfg = load_train_config("debug", ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true"])
    ds = build_ds_config(cfg, world_size=2, use_gpu=False)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert "torch_adam" not in ds["optimizer"]["params"]  # offload -> DeepSpeedCPUAdam
    assert ds["train_batch_size"] == 8 and ds["bf16"]["enabled"] is False
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 0.5}))
    cfg = load_train_config("debug", [f"deepspeed.ds_config_json={user}", "deepspeed.precision=auto"])
    ds = build_ds_config(cfg, world_size=2, use_gpu=True)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                       "reduce_scatter": True, "reduce_bucket_size": 1000}
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True and ds["optimizer"]["params"]["torch_adam"]


def test_resume_truncates_metrics_past_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4, 5, 6)))
    truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.parametrize("recipe", ["debug", "tiny", "gpt2-124m", "350m", "1b", "7b"])
def test_recipes_load(recipe):
    cfg = load_train_config(recipe)
    assert cfg.data.seq_len <= cfg.model.max_seq_len
