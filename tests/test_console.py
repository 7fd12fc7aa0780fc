"""A clean console (issue 12): a training run prints each step line once and no traceback, also
next to another Ray instance and with malformed chat records; MFU only against a known peak;
DeepSpeed's compiled ops in a folder of this environment's own; Ray's actors told their cluster.

The end-to-end check runs `raylm finetune` as a user does, in a subprocess with a Ray cluster of
its own, while the test session's cluster is alive: two Ray instances on one machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from raylm.core import ray_cluster
from raylm.training.engine import torch_extensions_dir, use_own_torch_extensions_dir
from raylm.training.measure import known_gpu_peak, peak_flops
from raylm.training.report import final_figures
from raylm.training.tracking import format_line

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
STEPS = 4


def chat_file_with_bad_lines(path):
    """60 good records and one of each kind of bad line the reader skips."""
    lines = [json.dumps({"messages": [{"role": "user", "content": f"What does add({i}, {i + 1}) return?"},
                                      {"role": "assistant", "content": f"It returns {2 * i + 1}."}]}) for i in range(60)]
    bad = ["{not json", "[1, 2, 3]", '"a string"', '{"messages": []}', '{"messages": [{"role": "user"}]}',
           '{"messages": [{"role": "wizard", "content": "x"}]}', '{"prompt": 5, "response": null}', '{"prompt": "no response"}']
    for i, line in enumerate(bad):
        lines.insert(3 + 7 * i, line)
    path.write_text("\n".join(lines) + "\n\xff\xfe not utf-8\n")
    return path


@pytest.fixture(scope="module")
def finetune_console(ray_cluster, debug_model_dir, tmp_path_factory):
    """(exit code, console text) of `raylm finetune` in its own process and Ray cluster, the session's running."""
    root = tmp_path_factory.mktemp("console")
    chat = chat_file_with_bad_lines(root / "chat.jsonl")
    env = dict(os.environ)
    # What the user's shell would not have: the test session's own settings.
    for name in ("RAY_ADDRESS", "RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_TRAIN_ENABLE_PRINT_PATCH",
                 "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "TORCH_EXTENSIONS_DIR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(name, None)
    argv = [sys.executable, "-m", "raylm.cli", "finetune", "--config", "sft-debug", "--base", str(debug_model_dir),
            "--data", str(chat), "--out", str(root / "run"), "--num-workers", "2", f"max_steps={STEPS}",
            "logging.every=1", "eval.every=2", "logging.wandb_mode=disabled", "eval_max_tokens=4"]
    result = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900, check=False)
    return result.returncode, ANSI.sub("", result.stdout)


def test_finetune_console_has_each_step_once_and_no_traceback(finetune_console):
    code, text = finetune_console
    assert code == 0, text[-4000:]
    steps = Counter(int(n) for n in re.findall(r"\[raylm\] step (\d+)/", text))
    assert steps == Counter(range(1, STEPS + 1)), text[-4000:]  # once each: Ray Train's print patch is off
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    twice = {line: n for line, n in Counter(lines).items() if n > 1}
    assert not twice, twice
    # Ray Train's placement-group cleaner finds its own cluster's state API although two run here.
    for needle in ("Traceback", "Exception in thread", "Found multiple active Ray instances", "Failed to query",
                   "Running Dataset", "Total Progress",  # Ray Data's progress bars
                   "ServeController.graceful_shutdown",
                   "Reporting training result",  # Ray Train's per-rank report log: our step lines say it
                   "built successfully"):  # DeepSpeed's shm op, printed by every worker
        assert needle not in text, f"{needle!r} in the console:\n{text[-4000:]}"
    assert "9 bad lines skipped" in text  # the malformed records are counted, in one line
    # The command's own cluster is on loopback, though the user's shell did not say so: the worker
    # group's line names each worker's address.
    addresses = set(re.findall(r"\(ip=([0-9.]+), pid=\d+\) world_rank=", text))
    assert addresses == {"127.0.0.1"}, text[-4000:]


def test_cpu_runs_report_no_mfu(finetune_console):
    _, text = finetune_console
    step_lines = [line for line in text.splitlines() if "[raylm] step" in line]
    assert step_lines and not any("mfu" in line for line in step_lines)


def test_deepspeed_ops_are_built_in_this_environments_own_folder(finetune_console):
    from pathlib import Path

    assert (Path(torch_extensions_dir()) / "deepspeed_shm_comm").is_dir()


# ---- units ----------------------------------------------------------------------------------------


def test_mfu_needs_a_known_peak():
    assert peak_flops("cpu", 0.0) is None  # no made-up CPU peak
    assert peak_flops("cpu", 2.0) == 2e12  # the user's peak counts anywhere
    assert known_gpu_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert known_gpu_peak("NVIDIA H100 PCIe") == 756e12
    assert known_gpu_peak("NVIDIA H200") == 989e12
    assert known_gpu_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert known_gpu_peak("NVIDIA A10G") == 125e12
    assert known_gpu_peak("NVIDIA L40S") == 362e12
    assert known_gpu_peak("NVIDIA GeForce RTX 3060") is None
    assert "mfu" not in format_line({"step": 1, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0, "mfu": None}, 2)


def test_report_leaves_out_an_unknown_mfu():
    rows = [{"step": s, "loss": 1.0, "tokens_per_s": 100.0, "mfu": None} for s in (1, 2, 3)]
    assert "mean MFU %" not in final_figures(rows)
    rows = [{"step": s, "loss": 1.0, "tokens_per_s": 100.0, "mfu": m} for s, m in ((1, 0.1), (2, 0.3), (3, 0.5))]
    assert final_figures(rows)["mean MFU %"] == pytest.approx(40.0)  # the first (warm-up) interval left out


def test_torch_extensions_dir_is_keyed_on_the_environment(monkeypatch):
    import torch

    own, prefix = torch_extensions_dir(), sys.prefix
    assert os.path.basename(own).startswith("raylm-") and os.path.dirname(own).endswith("torch_extensions")
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    assert torch_extensions_dir() != own
    monkeypatch.setattr(sys, "prefix", prefix)
    assert torch_extensions_dir() == own
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert torch_extensions_dir() != own


def test_a_users_torch_extensions_dir_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert use_own_torch_extensions_dir() == str(tmp_path)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert use_own_torch_extensions_dir() == torch_extensions_dir() == os.environ["TORCH_EXTENSIONS_DIR"]


def test_a_local_cluster_tells_its_workers_its_state_api(monkeypatch):
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    options = ray_cluster.local_cluster_options(num_cpus=2)
    assert options["address"] == "local" and options["include_dashboard"] and options["dashboard_host"] == "127.0.0.1"
    env = options["runtime_env"]["env_vars"]
    assert env == {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{options['dashboard_port']}"}
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"


def test_a_joined_cluster_tells_its_workers_its_address(monkeypatch):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    monkeypatch.delenv(RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    options = ray_cluster.joined_cluster_options("127.0.0.1:6379", runtime_env={"env_vars": {"A": "1"}})
    assert options["runtime_env"]["env_vars"] == {"A": "1", "RAY_ADDRESS": "127.0.0.1:6379"}
    assert "runtime_env" not in ray_cluster.joined_cluster_options("ray://head:10001")
    # Inside a Ray job whose runtime env sets it already, ray.init would refuse a second value.
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": {"env_vars": {"RAY_ADDRESS": "x:1"}}}))
    assert "runtime_env" not in ray_cluster.joined_cluster_options("127.0.0.1:6379")


def test_quiet_console_turns_off_the_print_patch_unless_the_user_set_it(monkeypatch):
    from raylm.training.pretrain import quiet_console

    monkeypatch.delenv("RAY_TRAIN_ENABLE_PRINT_PATCH", raising=False)
    quiet_console()
    assert os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PRINT_PATCH", "1")
    quiet_console()
    assert os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "1"
