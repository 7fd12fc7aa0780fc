"""`raylm demo`: the whole journey on the embedded corpus, in one command.

prepare the stdlib corpus -> pretrain the `tiny` recipe (2 workers, ZeRO-2) -> build the embedded
chat set -> fine-tune on it -> serve the result behind the OpenAI-compatible API -> ask it a few
questions through the `openai` client -> print the answers, the figures and where everything is.

Every stage is the same module its own subcommand runs, called in-process on one Ray cluster.
A stage whose output is already complete (its manifest says so) is skipped; an interrupted
training stage resumes from its last checkpoint, because re-running it is how a run resumes.
`--quick` runs the debug recipes for a few steps: the short form that CI runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from raylm.core.entry import run_main
from raylm.core.errors import UserError

QUESTIONS = [
    "What does `json.dumps` do?",
    "What does `os.path.join` do?",
    "What is the `with` statement?",
    "What does `itertools.chain` do?",
]
MIN_FREE_DISK_GB = 2.0


@dataclass
class Recipe:
    """What the demo runs: the full recipes, or the quick (debug) ones."""

    prepare_args: list[str]
    pretrain_config: str  # a built-in recipe name (training/configs/)
    pretrain_overrides: list[str]
    chat_records: int
    finetune_config: str
    finetune_overrides: list[str]
    max_tokens: int


# The time caps keep the demo inside ~15 minutes on a slow or busy machine: a capped run still
# evaluates, checkpoints and exports as if it had reached max_steps.
FULL = Recipe(
    prepare_args=["--vocab-size", "8192", "--seq-len", "256"],
    pretrain_config="tiny",
    pretrain_overrides=["max_time_s=420"],
    chat_records=4000,
    finetune_config="sft-tiny",
    finetune_overrides=["max_time_s=200"],
    max_tokens=48,
)
QUICK = Recipe(
    prepare_args=["--max-docs", "300", "--vocab-size", "512", "--seq-len", "64"],
    pretrain_config="debug",
    pretrain_overrides=["max_steps=6", "data.seq_len=64", "logging.wandb_mode=auto"],
    chat_records=200,
    finetune_config="sft-debug",
    finetune_overrides=["max_steps=4"],
    max_tokens=16,
)


@dataclass
class StageTiming:
    name: str
    seconds: float
    skipped: bool
    note: str = ""


@dataclass
class DemoRun:
    out: Path
    recipe: Recipe
    num_workers: int
    timings: list[StageTiming] = field(default_factory=list)

    @property
    def dataset_dir(self) -> Path:
        return self.out / "data"

    @property
    def pretrain_dir(self) -> Path:
        return self.out / "pretrain"

    @property
    def chat_file(self) -> Path:
        return self.out / "chat.jsonl"

    @property
    def finetune_dir(self) -> Path:
        return self.out / "finetune"


# ---- checks before anything runs ----------------------------------------------------------------


def check_disk(out: Path) -> None:
    probe = out if out.exists() else next(p for p in out.parents if p.exists())
    free_gb = shutil.disk_usage(probe).free / 1e9
    if free_gb < MIN_FREE_DISK_GB:
        raise UserError(f"only {free_gb:.1f} GB free under {probe}; the demo needs about {MIN_FREE_DISK_GB:.0f} GB (use --out elsewhere)")


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the server will: a port whose last connections linger in TIME_WAIT is free to it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise UserError(f"port {port} on {host} is in use; pass --port with a free one") from None


# ---- stages ---------------------------------------------------------------------------------------


def model_dir_complete(run_dir: Path) -> bool:
    return (run_dir / "model" / "manifest.json").is_file() and (run_dir / "run.json").is_file()


def run_stage(demo: DemoRun, index: int, name: str, done: bool, action, note: str = "") -> None:
    total = 6
    print(f"\n=== [{index}/{total}] {name} {'(complete, skipped)' if done else ''}".rstrip(), flush=True)
    start = time.perf_counter()
    if not done:
        action()
    demo.timings.append(StageTiming(name, time.perf_counter() - start, done, note))


def call_stage(module_name: str, argv: list[str]) -> None:
    import importlib

    module = importlib.import_module(module_name)
    code = run_main(module.main, argv)
    if code != 0:
        raise UserError(f"stage `{module_name}` failed (exit {code}); its output is above. Re-run `raylm demo` to resume.")


def prepare_dataset(demo: DemoRun) -> None:
    call_stage("raylm.data.prepare", ["--source", "stdlib", "--out", str(demo.dataset_dir), *demo.recipe.prepare_args])


def pretrain(demo: DemoRun) -> None:
    call_stage(
        "raylm.training.pretrain",
        [
            "--config", demo.recipe.pretrain_config,
            "--data", str(demo.dataset_dir),
            "--out", str(demo.pretrain_dir),
            "--num-workers", str(demo.num_workers),
            "--zero-stage", "2",
            *demo.recipe.pretrain_overrides,
        ],
    )


def prepare_chat(demo: DemoRun) -> None:
    call_stage("raylm.data.chat_dataset", ["--source", "stdlib", "--out", str(demo.chat_file), "--max-records", str(demo.recipe.chat_records)])


def finetune(demo: DemoRun) -> None:
    call_stage(
        "raylm.training.finetune",
        [
            "--config", demo.recipe.finetune_config,
            "--base", str(demo.pretrain_dir / "model"),
            "--data", str(demo.chat_file),
            "--out", str(demo.finetune_dir),
            "--num-workers", str(demo.num_workers),
            *demo.recipe.finetune_overrides,
        ],
    )


def ask_questions(base_url: str, api_key: str | None, max_tokens: int) -> list[tuple[str, str]]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=api_key or "unused")
    model = client.models.list().data[0].id
    answers = []
    for question in QUESTIONS:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0.0
        )
        answers.append((question, reply.choices[0].message.content or ""))
    return answers


# ---- the summary ----------------------------------------------------------------------------------


def read_run_summary(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    return json.loads(path.read_text()).get("summary", {}) if path.is_file() else {}


def format_figure(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def summary_text(demo: DemoRun, answers: list[tuple[str, str]], base_url: str | None) -> str:
    lines = ["", "=== raylm demo: summary", "", "stage            seconds  note"]
    for t in demo.timings:
        lines.append(f"{t.name:<16} {t.seconds:>7.1f}  {'skipped: already complete' if t.skipped else t.note}")
    for label, run_dir in (("pretrain", demo.pretrain_dir), ("finetune", demo.finetune_dir)):
        s = read_run_summary(run_dir)
        lines.append(
            f"{label}: final train loss {format_figure(s.get('final_train_loss'))}, "
            f"val loss {format_figure(s.get('final_val_loss'))}, "
            f"{format_figure(s.get('tokens_per_s'), 0)} tokens/s, {s.get('steps', '-')} steps"
        )
    lines += ["", "answers (greedy, through the OpenAI-compatible API):"]
    for question, answer in answers:
        lines += [f"  Q: {question}", f"  A: {answer.strip()[:300]!r}"]
    lines += [
        "",
        "artifacts:",
        f"  dataset dir       {demo.dataset_dir}",
        f"  pretrain run      {demo.pretrain_dir}   (report: {demo.pretrain_dir / 'report.md'})",
        f"  pretrained model  {demo.pretrain_dir / 'model'}",
        f"  chat set          {demo.chat_file}",
        f"  finetune run      {demo.finetune_dir}   (report: {demo.finetune_dir / 'report.md'})",
        f"  chat model        {demo.finetune_dir / 'model'}",
    ]
    wandb_runs = sorted(str(p) for p in demo.out.rglob("offline-run-*") if p.is_dir())
    if wandb_runs:
        lines.append("  W&B offline runs  " + "\n                    ".join(wandb_runs))
        lines.append("                    (upload later with `wandb sync <dir>`)")
    if base_url:
        lines.append(f"  endpoint          {base_url}/v1  (still serving; Ctrl-C stops it)")
    return "\n".join(lines)


def write_demo_report(demo: DemoRun, text: str) -> Path:
    path = demo.out / "demo-report.md"
    links = [f"- [pretrain report]({demo.pretrain_dir.name}/report.md)", f"- [finetune report]({demo.finetune_dir.name}/report.md)"]
    path.write_text("# raylm demo\n\n" + "\n".join(links) + "\n\n```\n" + text.strip() + "\n```\n")
    return path


# ---- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="raylm demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="where every artifact goes (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="debug recipes, a few steps each: the short form CI runs")
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers for both training stages")
    parser.add_argument("--host", default="127.0.0.1", help="address the endpoint binds (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port of the endpoint")
    parser.add_argument("--keep-serving", action="store_true", help="leave the endpoint running until Ctrl-C")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    from raylm.serving.serve import check_exposure

    # The endpoint's rule (a key beyond loopback), checked now rather than after both trainings,
    # and before the port check binds the host.
    check_exposure(args.host, os.environ.get("RAYLM_API_KEY"), insecure_no_api_key=False)
    check_disk(out)
    check_port_free(args.host, args.port)
    out.mkdir(parents=True, exist_ok=True)
    demo = DemoRun(out=out, recipe=QUICK if args.quick else FULL, num_workers=args.num_workers)

    import ray

    from raylm.core.ray_cluster import init_ray

    connected_here = not ray.is_initialized()
    own_cluster = connected_here and not (args.address or os.environ.get("RAY_ADDRESS"))  # it ends with us
    init_ray(args.address)
    answers: list[tuple[str, str]] = []
    serving = False
    try:
        from raylm.data.dataset_dir import read_dataset_manifest

        def dataset_complete() -> bool:
            try:
                read_dataset_manifest(demo.dataset_dir)
                return True
            except UserError:
                return False

        run_stage(demo, 1, "prepare", dataset_complete(), lambda: prepare_dataset(demo), "stdlib corpus")
        run_stage(demo, 2, "pretrain", model_dir_complete(demo.pretrain_dir), lambda: pretrain(demo), f"{demo.num_workers} workers, ZeRO-2")
        run_stage(demo, 3, "prepare-chat", demo.chat_file.is_file(), lambda: prepare_chat(demo), "embedded chat set")
        run_stage(demo, 4, "finetune", model_dir_complete(demo.finetune_dir), lambda: finetune(demo), "chat SFT")

        from raylm.serving.serve import start_serving

        base_url = ""

        def serve_model() -> None:
            nonlocal base_url, serving
            base_url = start_serving(str(demo.finetune_dir / "model"), host=args.host, port=args.port)
            serving = True

        run_stage(demo, 5, "serve", False, serve_model, base_url or f"http://{args.host}:{args.port}")
        run_stage(demo, 6, "ask", False, lambda: answers.extend(ask_questions(base_url, os.environ.get("RAYLM_API_KEY"), demo.recipe.max_tokens)))
        text = summary_text(demo, answers, base_url if args.keep_serving else None)
        report = write_demo_report(demo, text)
        print(text + f"\n\nthis summary: {report}", flush=True)
        if args.keep_serving:
            print(f"serving at {base_url}/v1 — Ctrl-C to stop", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping", file=sys.stderr)
    finally:
        if serving:
            from raylm.serving.serve import stop_serving

            stop_serving(cluster_ends=own_cluster)  # why not serve.shutdown() alone: see stop_serving
        if connected_here:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
