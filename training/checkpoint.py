"""Checkpoints: what a resumable checkpoint holds, how it is written, read back and exported.

A checkpoint folder (each rank writes its part locally; training/checkpoint_store.py copies the
parts into one folder in the run dir, each with its completion record):

    ds/                     DeepSpeed's own checkpoint (tag "ds"): model states, and each rank's
                            ZeRO optimizer / parameter shards (file names carry the rank)
    latest                  DeepSpeed's pointer to the tag
    raylm_state.json        rank 0: step, data position (epoch, batches consumed in it), tokens,
                            world size, ZeRO stage, W&B run id, elapsed seconds
    rng/rank_<r>.json       every rank's Python, NumPy and torch CPU RNG states, and its CUDA
                            device's when it trains on one (dropout and sampling draw from it)
    model/                  optional (checkpoint.export_hf): a Hugging Face model dir
    complete/rank_<r>.json  every rank's completion record, written last (checkpoint_store.py)

Nothing here is pickled by us (JSON); DeepSpeed's own files are read only by DeepSpeed, from a
run dir this run wrote.

A checkpoint written at another world size (or ZeRO stage) is converted to a DeepSpeed universal
checkpoint (`ds_to_universal`) and loaded with `load_universal`; each rank converts into its own
temp dir, so it works when ranks do not share a disk.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from raylm.core.files import write_json_atomic

DS_TAG = "ds"
STATE_FILE = "raylm_state.json"
RNG_DIR = "rng"


# ---- RNG -----------------------------------------------------------------------------------------


def rng_state(device: torch.device) -> dict:
    """Every generator this rank draws from; `device` is the rank's own accelerator (or the CPU)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    # A checkpoint written on GPUs and resumed on CPUs (or the reverse) restores what both have.
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- save ----------------------------------------------------------------------------------------


def save_checkpoint(engine, train_state: dict, rank: int, device: torch.device) -> Path:
    """Every rank: write this rank's part of a checkpoint into a fresh local folder and return it.

    The caller copies it into the run dir (checkpoint_store.publish_part) and removes it.
    """
    folder = Path(tempfile.mkdtemp(prefix="raylm-ckpt-"))
    engine.save_checkpoint(str(folder), tag=DS_TAG)
    write_json_atomic(folder / RNG_DIR / f"rank_{rank}.json", rng_state(device))
    if rank == 0:
        write_json_atomic(folder / STATE_FILE, train_state)
    return folder


# ---- load ----------------------------------------------------------------------------------------


def read_train_state(checkpoint_dir: Path) -> dict:
    path = checkpoint_dir / STATE_FILE
    if not path.is_file():
        raise RuntimeError(f"checkpoint {checkpoint_dir} has no {STATE_FILE}: not a raylm checkpoint")
    return json.loads(path.read_text())


def restore_rng(checkpoint_dir: Path, rank: int, fallback_seed: int, device: torch.device) -> None:
    """This rank's saved RNG states, or (a rank that did not exist before a resize) a fresh seed."""
    path = checkpoint_dir / RNG_DIR / f"rank_{rank}.json"
    if path.is_file():
        set_rng_state(json.loads(path.read_text()), device)
    else:
        seed_everything(fallback_seed)


def needs_universal(train_state: dict, world_size: int, zero_stage: int) -> bool:
    """DeepSpeed refuses ZeRO shards written at another world size or stage; universal checkpoints load anywhere."""
    if train_state["zero_stage"] == 0 and zero_stage == 0:
        return False  # unsharded: the model-states file holds everything
    return train_state["world_size"] != world_size or train_state["zero_stage"] != zero_stage


def convert_to_universal(checkpoint_dir: Path, zero_stage: int) -> Path:
    """ds_to_universal into a local temp dir; returns the dir to pass to `engine.load_checkpoint`."""
    out = Path(tempfile.mkdtemp(prefix="raylm-universal-"))
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(checkpoint_dir / DS_TAG),
        "--output_folder", str(out / DS_TAG),
        "--num_extract_workers", "1",
        "--num_merge_workers", "1",
    ]
    if zero_stage in (1, 2):
        cmd.append("--inject_missing_state")  # ZeRO-1/2 shards lack the param-slice map the converter wants
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        raise RuntimeError(f"ds_to_universal failed on {checkpoint_dir}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    (out / "latest_universal").write_text(DS_TAG)
    return out


def load_checkpoint(engine, load_dir: Path) -> None:
    load_path, _ = engine.load_checkpoint(str(load_dir), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {load_dir}/{DS_TAG}")


# ---- export --------------------------------------------------------------------------------------


def full_state_dict(engine, zero_stage: int, rank: int) -> dict[str, torch.Tensor]:
    """The whole model's weights in fp32 on rank 0's CPU; {} on the other ranks.

    A collective under ZeRO-3 (every rank calls it): the parameters are gathered one module at a
    time and only rank 0 keeps a copy, so no rank holds more than one module's full weights on
    its device at once and only rank 0's CPU memory holds the model (it writes the model dir).
    """
    module = engine.module
    if zero_stage != 3:
        if rank != 0:
            return {}
        return {name: p.detach().to("cpu", torch.float32).clone() for name, p in module.state_dict().items()}
    import deepspeed

    weights: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules():
        own = list(sub.named_parameters(recurse=False))
        if not own:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
            if rank == 0:
                for name, param in own:
                    weights[f"{prefix}.{name}" if prefix else name] = param.detach().to("cpu", torch.float32).clone()
    if rank == 0 and set(weights) != set(module.state_dict()):
        missing = sorted(set(module.state_dict()) - set(weights))
        raise RuntimeError(f"ZeRO-3 export gathered no value for {missing[:5]}")
    return weights
