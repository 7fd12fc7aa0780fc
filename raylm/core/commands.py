"""The table of raylm's commands: name -> (module with `main(argv)`, one-line help).

It lives on the lowest floor so that both the CLI (top) and `raylm submit` (cluster stage) read the
same table without the cluster stage importing the CLI. Modules are named, not imported.
"""

from __future__ import annotations

COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("raylm.data.prepare", "corpus -> tokenizer + packed Parquet shards (a dataset dir)"),
    "prepare-chat": ("raylm.data.chat_dataset", "chat records -> a chat dataset dir of packed SFT rows (or the embedded chat set as JSONL)"),
    "pretrain": ("raylm.training.pretrain", "train a model from scratch on a dataset dir"),
    "finetune": ("raylm.training.finetune", "chat SFT of a model dir on chat records or a chat dataset dir"),
    "generate": ("raylm.inference.generate", "sample from a model dir locally"),
    "serve": ("raylm.serving.serve", "serve a model dir behind an OpenAI-compatible API"),
    "submit": ("raylm.cluster.submit", "run any stage as a Ray job on a cluster"),
    "jobs": ("raylm.cluster.jobs", "status, logs or stop of a submitted Ray job"),
    "demo": ("raylm.demo", "the whole journey on the embedded corpus"),
}
