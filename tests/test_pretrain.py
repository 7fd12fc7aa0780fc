"""Pretraining end to end: real Ray Train V2, real DeepSpeed (CPU, gloo), the debug model.

One dataset dir made by the real `raylm prepare` (stdlib, a few documents, a small vocab) feeds
every run. Runs are module-scoped and shared between assertions, because each costs a Ray Train
worker group and a DeepSpeed engine:
    zero2        2 workers, ZeRO-2, W&B offline   loss falls, W&B read back, the reference run
    zero2_1w     1 worker, same global batch       step-for-step parity with zero2
    restart      zero2 + the test kill -9s rank 1 as soon as checkpoint 16 is on storage: Ray restarts
                 the group, which resumes from 16 (not the one Ray's controller knew of): zero2's result
    rerun        zero2 + rank 1 exits at step 18, no retries, a checkpoint every 4 steps: the command
                 fails; re-running it resumes from 16 and gives zero2's result
    resized      a copy of rerun's crashed dir re-run on 1 worker (universal checkpoint)
    broken       a copy of it with checkpoint 16 truncated, 12 missing rank 1's optimizer file and a
                 half-written 20: one line each, and the re-run resumes from 8 to zero2's result
A resumed run's W&B histories prove it resumed: one run id, the second attempt starting at the step
after its checkpoint (a restart from scratch would give the same losses, the data order being
deterministic).
    zero0/1/3, offload                             loss falls; zero3 (built partitioned) starts where zero2
                                                   does and feeds the HF export parity
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from pretrain_helpers import read_wandb_history

from raylm.core.errors import RunFailed, UserError

STEPS = 24
PREPARE_ARGS = ["--source", "stdlib", "--max-docs", "30", "--vocab-size", "400", "--seq-len", "32", "--val-fraction", "0.3",
                "--tokenizer-sample-bytes", "200000"]
BASE = [f"max_steps={STEPS}", "checkpoint.every=8", "eval.every=12", "logging.every=1", "schedule.total_steps=24"]
# Rank 1 exits at step 18, moments after checkpoint 16: before Ray's controller has polled the workers.
CRASH = ["faults.kill_rank=1", "faults.kill_at_step=18", "checkpoint.every=4", "checkpoint.keep=3",
         "scaling.max_failures=0", "logging.wandb_mode=offline"]


@pytest.fixture(scope="module")
def dataset_dir(ray_cluster, tmp_path_factory) -> Path:
    from raylm.data.prepare import main as prepare_main

    out = tmp_path_factory.mktemp("pretrain-data") / "stdlib"
    assert prepare_main([*PREPARE_ARGS, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pretrain-runs")


def pretrain(dataset_dir: Path, out: Path, *overrides: str, workers: int = 2) -> Path:
    from raylm.training.pretrain import main

    argv = ["--config", "debug", "--data", str(dataset_dir), "--out", str(out), "--num-workers", str(workers), *BASE, *overrides]
    assert main(argv) == 0
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in metrics(run_dir)]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def assert_learned(run_dir: Path) -> None:
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 1.0, f"train loss did not fall: {first:.3f} -> {last:.3f}"
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 2 and val[-1] < val[0]


@pytest.fixture(scope="module")
def zero2(dataset_dir, runs_root):
    return pretrain(dataset_dir, runs_root / "zero2", "deepspeed.zero_stage=2", "logging.wandb_mode=offline")


@pytest.fixture(scope="module")
def zero3(dataset_dir, runs_root):
    return pretrain(dataset_dir, runs_root / "zero3", "deepspeed.zero_stage=3")


@pytest.fixture(scope="module")
def crashed(dataset_dir, runs_root):
    """A zero2 run whose rank 1 dies at step 18 with retries off: the command fails after checkpoint 16."""
    from raylm.training.checkpoint_store import verify

    out = runs_root / "rerun"
    with pytest.raises(RunFailed, match=rf"^training failed: worker rank 1: .+; fix the cause, then rerun the same command to resume "
                                        rf"from the newest complete checkpoint; details in {re.escape(str(out))}/error.log$"):
        pretrain(dataset_dir, out, *CRASH)
    assert "Traceback (most recent call last)" in (out / "error.log").read_text()
    assert sorted(p.name for p in out.glob("checkpoint_step*")) == [f"checkpoint_step{s:08d}" for s in (8, 12, 16)]
    assert all(verify(p) is None for p in out.glob("checkpoint_step*")) and not (out / "model").exists()
    shutil.copytree(out, runs_root / "resized")
    shutil.copytree(out, runs_root / "broken")
    return out


def assert_resumed_at(run_dir: Path, step: int) -> None:
    """Two attempts, one W&B run id; the second attempt starts at `step` (not from scratch)."""
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))  # named offline-run-<time>-<id>
    assert len(attempts) == 2 and len({a.name.rsplit("-", 1)[-1] for a in attempts}) == 1
    # The first attempt's offline file may miss its last records: its process was killed mid-run.
    second = read_wandb_history(next(attempts[1].glob("run-*.wandb")))
    assert [r["_step"] for r in second] == list(range(step, STEPS + 1))


def run_log(run_dir: Path) -> list[str]:
    """RUN_DIR/raylm.log without its timestamps."""
    return [line.split(" ", 1)[1] for line in (run_dir / "raylm.log").read_text().splitlines()]


def kill_when_on_storage(run_dir: Path, step: int, rank: int, killed: dict, world: int = 2) -> None:
    """Watch the run dir; the moment every rank has recorded checkpoint `step` complete, kill -9 rank `rank`'s process."""
    records = run_dir / f"checkpoint_step{step:08d}" / "complete"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if all((records / f"rank_{r}.json").is_file() for r in range(world)):
            pid = json.loads((run_dir / ".workers" / f"rank_{rank}.json").read_text())["pid"]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert b"ray::" in cmdline, cmdline  # a Ray worker's process title, not some other process
            os.kill(pid, signal.SIGKILL)
            killed.update(pid=pid, at=time.monotonic())
            return
        time.sleep(0.02)


# ---- training under each ZeRO stage ------------------------------------------------------------


def test_zero2_learns_and_writes_the_run_dir(zero2):
    from raylm.training.checkpoint_store import verify

    assert_learned(zero2)
    info = json.loads((zero2 / "run.json").read_text())
    assert info["kind"] == "pretrain" and info["summary"]["steps"] == STEPS and info["global_batch"] == 8
    assert info["config"]["deepspeed"]["zero_stage"] == 2
    row = metrics(zero2)[-1]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_ppl", "elapsed_s"):
        assert row[key] is not None, key
    assert row["mfu"] is None  # a CPU has no known peak (logging.peak_tflops_per_worker unset)
    kept = sorted(p.name for p in zero2.glob("checkpoint_step*"))
    assert kept == ["checkpoint_step00000016", "checkpoint_step00000024"]  # checkpoint.keep=2
    ckpt = zero2 / "checkpoint_step00000024"
    assert {p.name for p in (ckpt / "ds").glob("zero_pp_rank_*_optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert json.loads((ckpt / "raylm_state.json").read_text())["step"] == STEPS
    assert {p.name for p in (ckpt / "complete").iterdir()} == {"rank_0.json", "rank_1.json"}  # written last, one per rank
    assert verify(ckpt, STEPS) is None
    assert (zero2 / "report.md").is_file()


@pytest.mark.parametrize("stage_overrides", [["deepspeed.zero_stage=0"], ["deepspeed.zero_stage=1"],
                                             ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"]],
                         ids=["zero0", "zero1", "zero2-offload"])
def test_loss_falls_under_other_stages(dataset_dir, runs_root, stage_overrides):
    name = stage_overrides[-1].split(".")[-1].replace("=", "")
    assert_learned(pretrain(dataset_dir, runs_root / name, *stage_overrides))


def test_zero3_learns(zero3):
    assert_learned(zero3)


def test_zero3_builds_the_model_partitioned_with_the_same_init(zero2, zero3):
    # ZeRO-3 builds under deepspeed.zero.Init and initialises module by module, gathered; the
    # first loss is computed with the initial weights on the same batch, so it must be zero2's
    # (a skipped or different init moves it by ~1e-2).
    assert losses(zero3)[0] == pytest.approx(losses(zero2)[0], abs=1e-6)


def test_two_workers_match_one_worker_with_the_same_global_batch(dataset_dir, runs_root, zero2):
    one = pretrain(dataset_dir, runs_root / "zero2_1w", "data.global_batch=8", workers=1)
    assert losses(one) == pytest.approx(losses(zero2), rel=1e-5, abs=1e-5)
    assert max_weight_diff(one, zero2) < 1e-5


# ---- exact resume ------------------------------------------------------------------------------


def test_a_worker_killed_right_after_a_checkpoint_resumes_from_it(dataset_dir, runs_root, zero2, capfd):
    run = runs_root / "restart"
    killed: dict = {}
    watcher = threading.Thread(target=kill_when_on_storage, args=(run, 16, 1, killed), daemon=True)
    watcher.start()
    pretrain(dataset_dir, run, "scaling.max_failures=1", "logging.wandb_mode=offline")
    watcher.join(timeout=5)
    assert killed, "rank 1 was not killed"
    died, resumed = run_log(run)
    assert re.fullmatch(rf"worker rank 1 died \(pid {killed['pid']}, last logged step 1[6-9]\); restarting from checkpoint "
                        rf"step 16 \(restart 1 of 1\); details in {re.escape(str(run))}/worker-failures.log", died), died
    assert resumed == "resuming from step 16 (checkpoint_step00000016)"
    # The console: that line, not Ray's pages (the failure decision with every error, the shutdown's traceback).
    console = capfd.readouterr()
    assert f"[raylm] {died}" in console.out
    assert "[FailurePolicy]" not in console.out + console.err and "Graceful shutdown" not in console.out + console.err
    # Honest times: the restart shows in this command's wall time, beside the training time.
    times = re.search(r"in (\d+)s of training, (\d+)s wall for this command", console.out)
    assert times, console.out[-2000:]
    assert int(times.group(2)) > int(times.group(1)) + 5  # a worker group's restart costs more than 5 s
    assert "The actor died unexpectedly" in (run / "worker-failures.log").read_text()
    assert_resumed_at(run, 17)
    assert losses(run) == losses(zero2)
    assert max_weight_diff(run, zero2) == 0.0


def test_rerunning_the_command_after_a_crash_resumes_exactly(dataset_dir, crashed, zero2):
    assert (crashed / ".faults" / "killed-rank1-step18").is_file()  # the worker really died
    run = pretrain(dataset_dir, crashed, *CRASH)
    died, resumed = run_log(run)
    assert re.fullmatch(r"worker rank 1 died \(pid \d+, last logged step 18\); no restarts left "
                        r"\(scaling.max_failures=0\): the run stops; details in .*/worker-failures.log", died), died
    assert resumed == "resuming from step 16 (checkpoint_step00000016)"
    assert_resumed_at(run, 17)
    assert losses(run) == losses(zero2)
    assert max_weight_diff(run, zero2) == 0.0


def test_resume_at_a_different_worker_count_keeps_the_global_batch(dataset_dir, runs_root, crashed, zero2, capfd):
    run = pretrain(dataset_dir, runs_root / "resized", *CRASH, workers=1)  # 2 workers x 4 rows per step before
    said = ["changed on resume: scaling.num_workers 2 -> 1",
            "the global batch stays the run's 8 sequences: 2 micro-batches of 4 per step on 1 worker (set data.global_batch to change it)",
            "resuming from step 16 (checkpoint_step00000016, universal: was 2 workers, ZeRO-2)"]
    assert run_log(run)[1:] == said  # after the line of crashed's death
    console = capfd.readouterr().out
    assert all(f"[raylm] {line}" in console for line in said), console[-3000:]
    assert_resumed_at(run, 17)
    assert losses(run)[:16] == losses(zero2)[:16]  # written by the 2-worker attempt
    assert losses(run) == pytest.approx(losses(zero2), rel=1e-5, abs=1e-5)
    assert max_weight_diff(run, zero2) < 1e-5


def test_broken_and_partial_checkpoints_are_named_and_the_run_resumes_from_a_sound_one(dataset_dir, runs_root, crashed, zero2, capfd):
    run = runs_root / "broken"  # crashed's dir: checkpoints 8, 12 and 16, complete
    model_states = run / "checkpoint_step00000016" / "ds" / "mp_rank_00_model_states.pt"
    size = model_states.stat().st_size
    with open(model_states, "r+b") as f:
        f.truncate(size // 2)
    (run / "checkpoint_step00000012" / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    # A disk that filled while checkpoint 20 was written: the state file and DeepSpeed's pointer
    # made it, the weights are empty, no rank recorded its part; and metrics.jsonl's temporary.
    half = run / "checkpoint_step00000020"
    shutil.copytree(run / "checkpoint_step00000016", half, ignore=shutil.ignore_patterns("rank_*.json", "*.pt"))
    (half / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (run / ".metrics.jsonl.partial-k3j2").write_text('{"step": 19')

    pretrain(dataset_dir, run, *CRASH)
    said = [
        "removed what interrupted writes left: .metrics.jsonl.partial-k3j2",
        "checkpoint_step00000020 is partial, removed: no rank finished writing it",
        ("checkpoint_step00000016 is broken, moved aside to checkpoint_step00000016.broken: "
         f"ds/mp_rank_00_model_states.pt has {size // 2:,} bytes, {size:,} when written (rank 0's part)"),
        ("checkpoint_step00000012 is broken, moved aside to checkpoint_step00000012.broken: "
         "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt is missing (rank 1's part)"),
        "resuming from step 8 (checkpoint_step00000008)",
    ]
    assert run_log(run)[1:] == said  # after the line of crashed's death
    console = capfd.readouterr().out
    assert all(f"[raylm] {line}" in console for line in said), console[-3000:]
    assert_resumed_at(run, 9)
    assert losses(run) == losses(zero2)
    assert max_weight_diff(run, zero2) == 0.0
    # Re-made as the run went on; the broken ones stay aside for a look, never chosen again.
    assert sorted(p.name for p in run.glob("checkpoint_step*")) == [
        "checkpoint_step00000012.broken", "checkpoint_step00000016", "checkpoint_step00000016.broken",
        "checkpoint_step00000020", "checkpoint_step00000024"]


# ---- stopped by a signal ------------------------------------------------------------------------


def signalled_pretrain(dataset_dir: Path, out: Path, signum: int, *overrides: str) -> tuple[int, str]:
    """`raylm pretrain` in its own process, joined to the session's cluster, sent `signum` once 3 steps are logged."""
    import subprocess
    import sys

    import ray

    argv = [sys.executable, "-m", "raylm.cli", "pretrain", "--config", "debug", "--data", str(dataset_dir), "--out", str(out),
            "--num-workers", "2", "--address", ray.get_runtime_context().gcs_address, "max_steps=100000",
            "checkpoint.every=1000", "eval.every=0", "logging.every=1", *overrides]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
                proc.send_signal(signum)
                break
            time.sleep(0.1)
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()  # ours, by pid
            proc.wait()
    return proc.returncode, text


def test_sigterm_writes_a_checkpoint_at_the_next_step_and_says_how_to_go_on(dataset_dir, runs_root):
    from raylm.training.checkpoint_store import verify

    run = runs_root / "sigterm"
    code, text = signalled_pretrain(dataset_dir, run, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert "[raylm] SIGTERM: stopping at the next step with a checkpoint (up to 25s; Ctrl-C again to stop at once)" in text
    said = re.search(r"raylm pretrain: stopped by SIGTERM at step (\d+) with (checkpoint_step\d+); rerun the same command to resume",
                     text)
    assert said, text[-3000:]
    step, folder = int(said.group(1)), run / said.group(2)
    assert step >= 3 and folder.name == f"checkpoint_step{step:08d}" and verify(folder) is None  # every.. was 1000
    assert not (run / "model").exists() and not (run / "run.json").exists()  # a stopped run is not a finished one
    # The console of a pretrain run: no traceback, no line twice (each step once, from rank 0).
    assert "Traceback" not in text
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    assert not {line for line in lines if lines.count(line) > 1}, text[-3000:]
    assert len(re.findall(r"\[raylm\] step 1/", text)) == 1
    pretrain(dataset_dir, run, f"max_steps={step + 2}", "checkpoint.every=1000", "eval.every=0")
    assert f"resuming from step {step} ({folder.name})" in run_log(run)


def test_ctrl_c_stops_at_once_after_the_grace_period_and_names_the_checkpoint(dataset_dir, runs_root):
    run = runs_root / "ctrl-c"
    code, text = signalled_pretrain(dataset_dir, run, signal.SIGINT, "checkpoint.every=2", "checkpoint.stop_grace_s=0.001")
    assert code == 128 + signal.SIGINT, text[-3000:]  # not Ray Train's own Ctrl-C handler, which aborts without a word
    assert re.search(r"raylm pretrain: stopped by SIGINT at step \d+ as no checkpoint came within checkpoint.stop_grace_s=0.001; "
                     r"the newest complete checkpoint is checkpoint_step\d+; rerun the same command to resume from it", text), text[-3000:]
    assert "Traceback" not in text


# ---- failures that end the run ------------------------------------------------------------------


def test_a_run_dir_that_cannot_be_written_is_refused_before_anything_starts(dataset_dir, capsys):
    from raylm.cli import main

    assert main(["pretrain", "--config", "debug", "--data", str(dataset_dir), "--out", "/sys/raylm-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"raylm pretrain: error: cannot write the run dir /sys/raylm-run: .+; choose a writable --out", err), err


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs: room for the run's first files, not for a checkpoint (the run dir on a disk that fills up)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a tmpfs (a real full disk)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_ends_the_run_in_one_error_line(dataset_dir, full_disk, capfd):
    from raylm.cli import main
    from raylm.training.checkpoint_store import verify

    run = full_disk / "run"
    argv = ["pretrain", "--config", "debug", "--data", str(dataset_dir), "--out", str(run), "--num-workers", "2",
            "max_steps=10", "checkpoint.every=5", "scaling.max_failures=0", "logging.wandb_mode=disabled"]
    assert main(argv) == 1
    console = capfd.readouterr()
    error = console.err.strip().splitlines()[-1]
    assert re.fullmatch(r"raylm pretrain: error: training failed: worker rank \d: OSError: \[Errno 28\] No space left on device; "
                        r"free space on that disk \(or point --out at another\), then rerun the same command to resume; "
                        r"details in (\S+)", error), error
    details = Path(error.rsplit(" ", 1)[1])  # a temporary file: the run dir has no room for it
    assert "No space left on device" in details.read_text()
    assert re.search(r"\[raylm\] worker rank \d failed \(last logged step 5\): OSError: \[Errno 28\] No space left on device; "
                     r"no restarts left", console.out)
    assert "Traceback" not in console.out + console.err
    half = run / "checkpoint_step00000005"
    assert verify(half) is not None  # the checkpoint the disk could not hold never looks complete


# ---- export ------------------------------------------------------------------------------------


def test_zero3_export_loads_in_transformers_with_equal_logits(zero3):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from raylm.model.model_dir import load_model_dir

    model_dir = zero3 / "model"
    ours, cfg = load_model_dir(model_dir)
    theirs = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tokenizer("def main():\n    return json.dumps(x)\n")["input_ids"]])
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4
    assert cfg.n_layers == 2 and cfg.vocab_size == len(tokenizer)  # the debug recipe's vocab follows the dataset's tokenizer


def test_greedy_generate_matches_transformers(zero3):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from raylm.inference.engine import Engine, EngineConfig
    from raylm.inference.generate import generate_texts
    from raylm.inference.sampling import SamplingParams

    model_dir = zero3 / "model"
    prompt, n = "import os\n", 24
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    ids = tokenizer(prompt)["input_ids"]
    # The same n token ids, end tokens or not: neither side may stop early.
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None)[0, len(ids):].tolist()
    engine = Engine(model_dir, EngineConfig(max_batch_size=1))
    assert engine.encode_prompt(prompt) == ids
    [(_, ours, reason)] = engine.generate([ids], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    assert len(theirs) == n and ours == theirs and reason == "length"
    # And the text, each side stopping at the model's end tokens.
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    assert generate_texts(model_dir, [prompt], max_tokens=n, temperature=0.0) == [expected]


# ---- W&B ---------------------------------------------------------------------------------------


def test_wandb_offline_run_holds_the_loss_history(zero2):
    (run_file,) = (zero2 / "wandb").glob("offline-run-*/run-*.wandb")
    history = read_wandb_history(run_file)
    logged = {row["_step"]: row["loss"] for row in history if "loss" in row}
    assert logged == {row["step"]: pytest.approx(row["loss"]) for row in metrics(zero2)}


# ---- config errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, named",
    [("deepspeed.zero_stag=2", "unknown config key 'deepspeed.zero_stag' (did you mean 'deepspeed.zero_stage'?)"),
     ("data.micro_batch=four", "config key 'data.micro_batch': expected int"),
     ("deepspeed.zero_stage=5", "deepspeed.zero_stage"), ("schedule.kind=linear", "schedule.kind"),
     ("deepspeed.offload_params=true", "deepspeed.offload_params")],
)
def test_config_errors_name_the_key(override, named):
    from raylm.training.config import load_train_config

    with pytest.raises(UserError, match=re.escape(named)):
        load_train_config("debug", [override])


def test_command_line_errors_name_the_nearest_flag_or_recipe(capsys):
    from raylm.training.pretrain import main

    with pytest.raises(SystemExit):
        main(["--config", "debug", "--data", "d", "--out", "o", "--zero-satge", "2"])
    assert "unknown option '--zero-satge' (did you mean '--zero-stage'?)" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"config 'tinyy': no such recipe or YAML file \(did you mean 'tiny'\?\); the recipes .* debug, .* tiny"):
        main(["--config", "tinyy", "--data", "d", "--out", "o"])


def test_a_dataset_that_does_not_fit_the_config_is_refused(dataset_dir):
    from raylm.training.pretrain import main

    vocab = json.loads((dataset_dir / "manifest.json").read_text())["vocab_size"]
    with pytest.raises(UserError, match=r"^data\.seq_len=16 asked for a dataset packed at 32 "):
        main(["--config", "debug", "--data", str(dataset_dir), "--out", "/tmp/never-written", "data.seq_len=16"])
    with pytest.raises(UserError, match=rf"^model\.vocab_size=256 asked for a dataset whose tokenizer has {vocab} tokens "):
        main(["--config", "debug", "--data", str(dataset_dir), "--out", "/tmp/never-written", "model.vocab_size=256"])


def test_fp16_is_refused_on_cpu():
    from raylm.training.deepspeed_config import resolve_precision

    with pytest.raises(UserError, match="fp16 needs GPUs"):
        resolve_precision("fp16", use_gpu=False)
    assert resolve_precision("auto", use_gpu=False) == "fp32" and resolve_precision("auto", use_gpu=True) == "bf16"


def test_prepare_and_a_run_on_object_storage_resume_after_a_dead_worker_and_export_there(dataset_dir, runs_root, zero2, s3_server,
                                                                                tmp_path, monkeypatch, capsys):
    """`raylm prepare` writes the dataset dir to an S3-compatible server (the same shards as on a
    local disk), and the run dir lives there too, with no disk shared between the driver and
    the workers: the driver keeps its copies in its own cache dir (RAYLM_CACHE_DIR here), the
    workers in theirs. Rank 1 dies at step 18, after checkpoint 16; Ray restarts the worker group,
    which resumes from the checkpoint on the server. The run ends with zero2's very weights, its
    metrics, logs and model dir on the server, and the model dir there generates as zero2's does."""
    from safetensors.torch import load_file

    from raylm.cli import main as raylm
    from raylm.core import storage
    from raylm.data.prepare import main as prepare_main
    from raylm.training.checkpoint_store import checkpoint_folders, verify
    from raylm.training.pretrain import main

    monkeypatch.setenv("RAYLM_CACHE_DIR", str(tmp_path / "driver-cache"))
    data = s3_server("datasets") + "/stdlib"
    assert prepare_main([*PREPARE_ARGS, "--out", data]) == 0  # the workers write the shards to the server, the driver the manifest
    shards = lambda manifest: [s["sha256"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]]  # noqa: E731
    assert shards(json.loads(storage.read_text(f"{data}/manifest.json"))) == shards(json.loads((dataset_dir / "manifest.json").read_text()))
    home = s3_server("runs") + "/tiny"
    argv = ["--config", "debug", "--data", data, "--out", home, "--num-workers", "2", *BASE, "logging.wandb_mode=disabled",
            "faults.kill_rank=1", "faults.kill_at_step=18", "scaling.max_failures=1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"worker rank 1 died\b.*restarting from checkpoint step 16 \(restart 1 of 1\)", out), out[-3000:]
    assert "resuming from step 16 (checkpoint_step00000016)" in out
    assert out.strip().splitlines()[-1].endswith(f"model dir {home}/model")

    files = storage.files_under(home)
    assert [step for step, _ in checkpoint_folders(home)] == [24, 16] and all(verify(f) is None for _, f in checkpoint_folders(home))
    assert {"metrics.jsonl", "raylm.log", "run.json", "run_settings.json", "report.md", "worker-failures.log",
            "model/config.json", "model/model.safetensors", "model/tokenizer.json"} <= set(files)
    rows = [json.loads(line) for line in storage.read_text(f"{home}/metrics.jsonl").splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == losses(zero2)  # the resumed rows continue the server's copy
    assert "worker rank 1 died" in storage.read_text(f"{home}/raylm.log")
    remote_weights = load_file(str(Path(storage.local_dir(f"{home}/model")) / "model.safetensors"))
    assert max(float((remote_weights[k] - w).abs().max()) for k, w in weights(zero2).items()) == 0.0
    assert json.loads(storage.read_text(f"{home}/run.json"))["source"]["dataset_dir"] == data

    generate = ["generate", "--prompt", "def add(a, b):", "--max-tokens", "8"]
    assert raylm([*generate, "--model", str(zero2 / "model")]) == 0
    local_text = capsys.readouterr().out
    assert raylm([*generate, "--model", f"{home}/model"]) == 0
    assert capsys.readouterr().out == local_text

    # Run again with more steps: it resumes from the server's checkpoint 24, on any machine.
    monkeypatch.setenv("RAYLM_CACHE_DIR", str(tmp_path / "another-driver"))
    assert main([*argv[:8], "--max-steps", "26", "schedule.total_steps=24", "logging.wandb_mode=disabled"]) == 0
    out = capsys.readouterr().out
    assert "resuming from step 24 (checkpoint_step00000024)" in out
    rows = [json.loads(line) for line in storage.read_text(f"{home}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 27))

    with pytest.raises(UserError, match="dataset dir 's3://datasets2/nothing-here' does not exist"):
        main(["--config", "debug", "--data", s3_server("datasets2") + "/nothing-here", "--out", str(runs_root / "none")])
    with pytest.raises(UserError, match=r"--out 's3://runs': name a dir inside the bucket"):
        main(["--config", "debug", "--data", data, "--out", "s3://runs"])
    with pytest.raises(UserError, match=r"cannot write the run dir s3://no-such-bucket/run: .*choose a writable --out"):
        main(["--config", "debug", "--data", data, "--out", "s3://no-such-bucket/run"])