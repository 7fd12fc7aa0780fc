"""Pieces of the train loop that need no worker group: the LR schedule, the data order, the loss,
the train state a checkpoint carries, batch arithmetic, the DeepSpeed config and metrics
truncation on resume."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raylm.core.config import to_dict
from raylm.core.errors import UserError
from raylm.model.transformer import ModelConfig, Transformer
from raylm.training.checkpoint import (
    needs_universal,
    rng_state,
    seed_everything,
    set_rng_state,
)
from raylm.training.config import global_batch, grad_accum, load_train_config
from raylm.training.data_order import epoch_batches, eval_micro_batches, micro_batches
from raylm.training.deepspeed_config import build_ds_config
from raylm.training.losses import loss_for, next_token_loss, target_count
from raylm.training.measure import Throughput
from raylm.training.row_source import ArrayRows, ParquetRows, first_rows
from raylm.training.run_settings import keep_run_settings, remember_run_settings
from raylm.training.schedule import learning_rate
from raylm.training.tracking import truncate_metrics
from raylm.training.trainer import TrainState, due


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


def test_schedule_total_steps_keeps_the_curve_when_max_steps_changes():
    curve = ["optimizer.lr=1.0", "schedule.warmup_steps=10", "schedule.min_lr_ratio=0.1"]
    full = load_train_config("debug", ["max_steps=100", *curve])
    cut = load_train_config("debug", ["max_steps=50", "schedule.total_steps=100", *curve])
    assert [learning_rate(s, cut) for s in range(50)] == [learning_rate(s, full) for s in range(50)]
    assert learning_rate(55, full) == pytest.approx(0.55)  # cosine halfway between the peak and min_lr
    assert learning_rate(49, load_train_config("debug", ["max_steps=50", *curve])) < learning_rate(49, cut)


def test_schedule_without_warmup_starts_at_the_peak():
    cfg = load_train_config("debug", ["max_steps=100", "schedule.warmup_steps=0", "optimizer.lr=1.0"])
    assert learning_rate(0, cfg) == 1.0


def test_global_batch_sets_grad_accum_per_worker_count():
    cfg = load_train_config("debug", ["data.micro_batch=4", "data.global_batch=16"])
    assert (grad_accum(cfg, 1), grad_accum(cfg, 2), grad_accum(cfg, 4)) == (4, 2, 1)
    assert global_batch(cfg, 2) == 16
    with pytest.raises(UserError, match="data.global_batch"):
        grad_accum(cfg, 3)


def started_run(tmp_path, *overrides: str, world: int = 2):
    """A run dir as the first command left it: its settings remembered, one checkpoint folder."""
    cfg = load_train_config("debug", ["max_steps=30", *overrides])
    remember_run_settings(tmp_path, to_dict(cfg), cfg, world)
    (tmp_path / "checkpoint_step00000010").mkdir()
    return tmp_path


def test_a_resumed_run_keeps_its_global_batch_and_schedule_and_names_each_change(tmp_path):
    run = started_run(tmp_path)  # 2 workers x micro-batch 4: global batch 8; the schedule spans 30 steps
    cfg = load_train_config("debug", ["max_steps=60", "scaling.num_workers=1"])
    lines = keep_run_settings(cfg, run, world=1)
    assert lines == [
        "changed on resume: max_steps 30 -> 60; scaling.num_workers 2 -> 1",
        "the global batch stays the run's 8 sequences: 2 micro-batches of 4 per step on 1 worker (set data.global_batch to change it)",
        "the learning-rate schedule keeps the run's length of 30 steps; steps after 30 train at its final rate "
        "(set schedule.total_steps to change it)",
    ]
    assert (global_batch(cfg, 1), grad_accum(cfg, 1), cfg.schedule.total_steps) == (8, 2, 30)
    assert learning_rate(45, cfg) == pytest.approx(cfg.optimizer.lr * cfg.schedule.min_lr_ratio)


def test_what_the_user_sets_on_resume_wins_and_is_remembered(tmp_path):
    run = started_run(tmp_path)
    asked = ["max_steps=60", "schedule.total_steps=60", "data.global_batch=4", "scaling.num_workers=1"]
    cfg = load_train_config("debug", asked)
    assert keep_run_settings(cfg, run, world=1) == [
        "changed on resume: data.global_batch 0 -> 4; max_steps 30 -> 60; scaling.num_workers 2 -> 1; schedule.total_steps 0 -> 60"]
    assert (global_batch(cfg, 1), cfg.schedule.total_steps) == (4, 60)
    remember_run_settings(run, to_dict(cfg), cfg, 1)
    same = load_train_config("debug", asked)  # the same command again: nothing changes, nothing is said
    assert keep_run_settings(same, run, world=1) == [] and global_batch(same, 1) == 4


def test_a_global_batch_the_new_workers_cannot_split_names_both_numbers(tmp_path):
    run = started_run(tmp_path)
    with pytest.raises(UserError, match=r"global batch of 8 sequences, which 3 workers with data.micro_batch=4 cannot split"):
        keep_run_settings(load_train_config("debug", ["max_steps=30", "scaling.num_workers=3"]), run, world=3)


def test_a_fresh_run_dir_takes_the_command_as_it_is(tmp_path):
    run = started_run(tmp_path)
    (run / "checkpoint_step00000010").rmdir()  # the first command died before its first checkpoint
    cfg = load_train_config("debug", ["max_steps=60", "scaling.num_workers=1"])
    assert keep_run_settings(cfg, run, world=1) == [] and global_batch(cfg, 1) == 4


def array_rows(count: int) -> ArrayRows:
    """Rows whose first id is their index in file order, with a mask that travels with them."""
    ids = np.arange(count)[:, None] + np.arange(3)
    return ArrayRows({"input_ids": ids, "loss_mask": ids % 2 == 0})


def global_order(source, size, world=1, window=64, seed=7, epoch=0, skip=0, steps=None):
    """[(epoch, [row index of each row of the step's global batch])], each rank's rows put side by
    side, and the rows each rank read."""
    readers = [[] for _ in range(world)]
    per_rank = [epoch_batches(source, window, seed, size, epoch, skip, rank, world, readers[rank]) for rank in range(world)]
    steps = steps if steps is not None else source.num_rows // size - skip // size
    out = []
    for _ in range(steps):
        parts = [next(batches) for batches in per_rank]
        assert len({e for e, _ in parts}) == 1  # every rank is in the same epoch
        for _, rows in parts:
            assert (rows["loss_mask"] == (rows["input_ids"] % 2 == 0)).all()  # a row's mask travels with it
        out.append((parts[0][0], [int(i) for _, rows in parts for i in rows["input_ids"][:, 0]]))
    return out, [sum(r.rows_read for r in rank) for rank in readers]


def test_each_row_is_read_once_and_the_order_does_not_depend_on_the_world_size():
    source = array_rows(1000)  # 16 chunks of 64 rows (the last 40)
    one, reads = global_order(source, size=8)
    assert len(one) == 125 and sorted(i for _, rows in one for i in rows) == list(range(1000))  # every row, once
    assert reads == [1000]  # one worker reads each chunk once, though windows cut through chunks
    readers: list = []
    for _ in epoch_batches(source, 64, 7, 8, 0, 0, 0, 1, readers):
        if len(readers) == 2:  # into the next epoch: the first reader is done and keeps no chunk or count
            assert not readers[0].cached and not readers[0].uses and readers[0].rows_read == 1000
            break
    for world in (2, 4, 8):
        many, reads = global_order(source, size=8, world=world)
        assert many == one, world  # the same global batches, whoever reads them
        assert 1000 <= sum(reads) <= 1000 + (world - 1) * 64, (world, reads)  # only the chunks at rank boundaries twice
        assert all(r < 1000 for r in reads)
    # The shuffle reaches across the whole split: one step's rows come from all over it.
    first = one[0][1]
    assert max(first) - min(first) > 500 and one[1][1] != [i + 1 for i in first]


def test_the_order_is_a_function_of_seed_and_epoch_and_resumes_at_any_step():
    source = array_rows(300)
    epoch0, _ = global_order(source, size=4)
    assert global_order(source, size=4)[0] == epoch0  # the same order per (seed, epoch)
    assert global_order(source, size=4, epoch=1)[0] != epoch0 and global_order(source, size=4, seed=8)[0] != epoch0
    for step in (1, 7, 15, 16, 17, 40, 74):  # inside, at and across the shuffle windows' edges (16 steps each)
        resumed, _ = global_order(source, size=4, skip=step * 4)
        assert resumed == epoch0[step:], step


def test_a_run_resumed_at_an_epochs_end_goes_on_with_the_next_epoch():
    source = array_rows(16)
    fresh, _ = global_order(source, size=4, steps=10)  # 4 steps per epoch
    assert [e for e, _ in fresh] == [0] * 4 + [1] * 4 + [2] * 2
    assert fresh[4][1] != fresh[0][1]  # the next epoch has its own shuffle
    assert global_order(source, size=4, skip=16, steps=6)[0] == fresh[4:]  # every row of epoch 0 consumed
    assert global_order(source, size=4, epoch=1, skip=8, steps=4)[0] == fresh[6:]  # and anywhere inside an epoch
    # 18 rows, batches of 4: 2 rows wait for another epoch, so a resume after 16 rows is at the epoch's end too.
    assert global_order(array_rows(18), size=4, skip=16, steps=1)[0][0][0] == 1
    with pytest.raises(RuntimeError, match="fewer than one global batch"):
        global_order(array_rows(3), size=4, steps=1)


def test_parquet_rows_read_a_split_by_row_group(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = []
    for shard, rows in enumerate((150, 70)):
        ids = (np.arange(rows)[:, None] + 1000 * shard + np.arange(5)).astype(np.uint16)
        column = pa.ListArray.from_arrays(pa.array(np.arange(0, (rows + 1) * 5, 5, dtype=np.int32)), pa.array(ids.reshape(-1)))
        paths.append(str(tmp_path / f"train-{shard}.parquet"))
        pq.write_table(pa.table({"input_ids": column}), paths[-1], row_group_size=64)
    source = ParquetRows(paths)
    assert source.chunk_rows == [64, 64, 22, 64, 6] and source.num_rows == 220
    assert source.read(4)["input_ids"][:, 0].tolist() == list(range(1064, 1070))
    assert source.read(1)["input_ids"].shape == (64, 5)
    import copy

    shipped = copy.deepcopy(source)  # through __getstate__, as Ray ships it to the workers: paths and sizes, no open files
    assert shipped._files is None
    assert np.array_equal(shipped.read(2)["input_ids"], source.read(2)["input_ids"])
    assert first_rows(source, 70)["input_ids"][:, 0].tolist() == list(range(70))


def test_a_rank_cuts_its_rows_into_micro_batches():
    ids = np.arange(8 * 5).reshape(8, 5).astype(np.uint16)
    ids.setflags(write=False)
    rows = {"input_ids": ids, "loss_mask": ids % 3 == 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read-only rows are copied, not shared with torch
        micros = micro_batches(rows, 2, 4, "cpu")
    assert len(micros) == 4 and all(m["input_ids"].shape == (2, 5) and m["input_ids"].dtype == torch.int64 for m in micros)
    for name in rows:
        assert torch.cat([m[name] for m in micros]).tolist() == rows[name].tolist()


def test_every_eval_row_is_scored_once_at_any_world_size():
    ids = np.arange(11 * 3).reshape(11, 3)
    ids.setflags(write=False)  # like Arrow buffers: torch.from_numpy warns unless the loop copies
    for world in (1, 2, 3, 4):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            shares = [eval_micro_batches({"input_ids": ids}, 2, rank, world, "cpu") for rank in range(world)]
        assert len({len(share) for share in shares}) == 1, world  # the same number of forwards on every rank
        micros = [m for share in shares for m in share]
        counted = torch.cat([m["input_ids"][m["loss_mask"].all(dim=1)] for m in micros])
        assert counted.tolist() == ids.tolist(), world  # each row once, fillers count nothing
        assert all(not m["loss_mask"][~m["loss_mask"].all(dim=1)].any() for m in micros)
    assert eval_micro_batches(None, 2, 0, 2, "cpu") == []


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=16))


def test_next_token_loss_sums_the_targets_its_row_mask_keeps():
    model = tiny_model()
    ids = torch.randint(32, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 3] = True  # keep row token 3 only: predicted from position 2
    with torch.no_grad():
        logits = model(ids[:, :-1])
        total, count = next_token_loss(model, {"input_ids": ids, "loss_mask": mask})
        assert int(count) == 2 == target_count({"input_ids": ids.numpy(), "loss_mask": mask.numpy()})
        assert float(total) == pytest.approx(float(F.cross_entropy(logits[:, 2], ids[:, 3], reduction="sum")), rel=1e-5)
        total, count = next_token_loss(model, {"input_ids": ids})
        assert int(count) == 10 == target_count({"input_ids": ids.numpy()})
        assert float(total) == pytest.approx(float(F.cross_entropy(logits.reshape(-1, 32), ids[:, 1:].reshape(-1), reduction="sum")), rel=1e-5)


def test_a_packed_row_gives_each_example_the_loss_it_has_alone():
    model = tiny_model()
    a, b = torch.randint(32, (1, 7)), torch.randint(32, (1, 5))
    packed = {"input_ids": torch.cat([a, b, torch.zeros(1, 4, dtype=torch.long)], dim=1),
              "segment_ids": torch.tensor([[1] * 7 + [2] * 5 + [0] * 4])}
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[0, 7] = False  # b's first token is not predicted from a's last
    mask[0, 12:] = False  # padding
    packed["loss_mask"] = mask
    with torch.no_grad():
        alone = [next_token_loss(model, {"input_ids": x}) for x in (a, b)]
        total, count = next_token_loss(model, packed)
        assert int(count) == 6 + 4
        assert float(total) == pytest.approx(sum(float(t) for t, _ in alone), rel=1e-5)
        # Without the segments the second example would see the first one: a different loss.
        assert float(next_token_loss(model, {k: v for k, v in packed.items() if k != "segment_ids"})[0]) != pytest.approx(float(total), rel=1e-5)


def test_loss_is_chosen_by_the_run_kind():
    assert loss_for("pretrain") is loss_for("finetune") is next_token_loss
    with pytest.raises(ValueError, match="'dpo'"):
        loss_for("dpo")


def test_train_state_round_trips_through_the_checkpoint_file():
    state = TrainState()
    for _ in range(3):
        state.advance(rows=8, tokens=8 * 32)
    state.next_epoch()
    state.advance(rows=8, tokens=8 * 32)
    state.wandb_id = "abc12345"
    assert (state.step, state.epoch, state.rows_in_epoch, state.tokens) == (4, 1, 8, 4 * 8 * 32)
    saved = json.loads(json.dumps(state.to_saved(12.5, world_size=2, zero_stage=3, global_batch=8)))
    assert TrainState.from_saved(saved) == dataclasses.replace(state, elapsed_before=12.5)
    assert not needs_universal(saved, 2, 3) and needs_universal(saved, 1, 3)  # the layout it was saved at


def test_periodic_actions_fall_due_every_n_steps_and_at_the_last():
    assert [s for s in range(1, 13) if due(s, 5, is_last=s == 12)] == [5, 10, 12]
    assert [s for s in range(1, 13) if due(s, 0, is_last=s == 12)] == [12]


def test_throughput_window_restarts_when_taken():
    window = Throughput()
    window.add(100, 0.5)
    window.add(300, 1.5)
    assert window.take() == 200.0
    window.add(50, 1.0)
    assert window.take() == 50.0


def test_the_entry_point_imports_no_deepspeed():
    # DeepSpeed picks its accelerator when first imported: the worker must set DS_ACCELERATOR before that.
    code = "import sys, raylm.training.loop; assert 'deepspeed' not in sys.modules, 'deepspeed imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


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


def draws(device: torch.device) -> list:
    import random as py_random

    return [py_random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, device=device))]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))])
def test_rng_states_round_trip_through_json_on_the_ranks_device(device):
    device = torch.device(device)
    seed_everything(3)
    saved = json.loads(json.dumps(rng_state(device)))
    assert ("cuda" in saved) == (device.type == "cuda")  # the CUDA generator drives dropout and sampling on GPUs
    expected = draws(device)
    seed_everything(99)
    set_rng_state(saved, device)
    assert draws(device) == expected
