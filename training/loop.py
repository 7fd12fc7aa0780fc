"""Ray Train's per-worker entry point: the one train loop, which pretraining and fine-tuning both run.

`training.pretrain.run_training` hands `train_loop_per_worker` to a TorchTrainer with a
`loop_config` of: config (a TrainConfig as a dict), run_dir, tokenizer_dir, init_model_dir (or
None), use_gpu, kind ("pretrain", "finetune"), train_source (the split's row source) and eval_rows
(the fixed eval set, or None). Each
worker runs a Trainer (training/trainer.py); its parts: the data order (data_order.py), the LR
schedule (schedule.py), the losses (losses.py), the model and engine (engine.py), resuming
(resume.py), checkpoints (checkpoint.py) and tracking (tracking.py).
"""

from __future__ import annotations

import os
import warnings

from raylm.training.engine import use_own_torch_extensions_dir
from raylm.training.trainer import Trainer


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's per-worker entry. `loop_config` is built by training.pretrain.run_training."""
    if not loop_config["use_gpu"]:
        # DeepSpeed reads it once, when first imported (in Trainer.setup).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's compiled ops go to this venv's own folder, not one every venv shares (engine.py).
    use_own_torch_extensions_dir()
    # DeepSpeed's ZeRO calls a torch.distributed function that torch deprecates: two lines per worker
    # on every run, about code the user does not own.
    warnings.filterwarnings("ignore", message=r"`torch.distributed.all_gather_into_tensor` is deprecated", category=FutureWarning)
    quiet_ray_train_reports()
    trainer = Trainer(loop_config)
    trainer.setup()
    trainer.train()
    trainer.finish()


def quiet_ray_train_reports() -> None:
    """Ray Train V2 logs "Reporting training result N: TrainingReport(...)" from every rank at each
    checkpoint: the metrics of raylm's own step line again, once per worker. Its logger is named by
    its module's file; a Ray that moves the module just logs them again."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
