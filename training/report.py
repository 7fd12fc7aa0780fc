"""The run report: RUN_DIR/report.md with PNG plots, written at the end of every pretrain and fine-tune run.

Inputs are the run dir's own files, so a report can be (re)made from any finished or interrupted
run without Ray or a model:
    RUN_DIR/metrics.jsonl   one JSON object per logged step (step, loss, lr, tokens_per_s, mfu
                            (None without a known peak), and val_loss / val_ppl on eval steps, ...)
    RUN_DIR/run.json        the resolved config, the kind of run, the data/base, summary figures
Outputs:
    RUN_DIR/plots/{loss,lr,tokens_per_s}.png   made with matplotlib's Agg canvas (no display)
    RUN_DIR/report.md                          final figures, evaluation, plots, samples, config
Sample generations are the caller's (fine-tuning: answers before and after) or, by default,
greedy continuations of a few fixed prompts by RUN_DIR/model.

A figure whose metric was never logged is left out rather than drawn empty. The same figures go
to W&B as images (`report/loss`, ...) when a W&B run is active in the calling process; the
per-step curves themselves are already W&B charts, logged by the train loop on rank 0. The run
finished on a worker, so the driver does not reopen it on its own (a second writer to an offline
run's folder surprises readers); `python -m raylm.training.report RUN_DIR --wandb` resumes the run whose
folder is in RUN_DIR/wandb/ and attaches the images.

Run it by hand with `python -m raylm.training.report RUN_DIR [--wandb]`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from raylm.core.entry import run_main
from raylm.core.errors import UserError
from raylm.core.files import write_atomic

PLOTS_DIR = "plots"
# Continued by the run's model when the caller gives no samples (pretraining: the stdlib corpus).
DEFAULT_PROMPTS = ["import os\n", "def read_lines(path):\n", "class Stack:\n    \"\"\""]
SAMPLE_MAX_TOKENS = 48
# A CPU-only driver skips default samples of bigger models: loading them there would take minutes.
SAMPLE_MAX_PARAMS_ON_CPU = 500_000_000

# name -> (title, y label, [(metric key, legend label)])
FIGURES: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "loss": ("Loss", "cross-entropy (nats/token)", [("loss", "train"), ("val_loss", "val")]),
    "lr": ("Learning rate", "lr", [("lr", "lr")]),
    "tokens_per_s": ("Throughput", "tokens/s", [("tokens_per_s", "tokens/s")]),
}


# ---- reading -------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl -> rows; a torn last line (a run killed mid-write) is ignored, others refused."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UserError(f"{path}: line {number} is not a JSON object") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def read_run_info(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected a JSON object")
    return info


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that logged a finite number for `key`."""
    steps, values = [], []
    for i, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(row.get("step", i))
            values.append(value)
    return steps, values


# ---- plots ---------------------------------------------------------------------------------------


def plot_figure(rows: list[dict[str, Any]], name: str, out_dir: Path) -> Path | None:
    """One PNG for FIGURES[name], or None when none of its metrics was logged."""
    from matplotlib.figure import (
        Figure,  # the Agg canvas, without pyplot's global state
    )

    title, ylabel, keys = FIGURES[name]
    lines = [(label, *series(rows, key)) for key, label in keys]
    lines = [line for line in lines if line[1]]
    if not lines:
        return None
    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for label, steps, values in lines:
        # Eval points are sparse: markers make a short val curve visible.
        ax.plot(steps, values, label=label, marker="o" if len(steps) <= 30 else None, markersize=3)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend()
    path = out_dir / f"{name}.png"
    fig.savefig(path)
    return path


def plot_all(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: plot_figure(rows, name, out_dir) for name in FIGURES}
    return {name: path for name, path in paths.items() if path is not None}


def log_figures_to_wandb(figures: dict[str, Path]) -> bool:
    """Log the PNGs as `report/<name>` images to the active W&B run; False when there is none."""
    # A process with a W&B run has imported wandb; the driver that writes a run's report usually has
    # not (the run lives in rank 0's worker), and importing it only to find no run took ~2 s.
    wandb = sys.modules.get("wandb")
    if wandb is None or wandb.run is None or not figures:
        return False
    wandb.log({f"report/{name}": wandb.Image(str(path)) for name, path in figures.items()})
    return True


def wandb_run_in(run_dir: Path) -> tuple[str, str] | None:
    """(run id, mode) of the latest W&B run in RUN_DIR/wandb/, or None."""
    # Each run folder (`run-<time>-<id>`, `offline-run-<time>-<id>`, with `-1`... on a name clash)
    # holds `run-<id>.wandb`: the id is read from that file's name.
    records = sorted((run_dir / "wandb").glob("*run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    if not records:
        return None
    run_id = records[-1].stem.removeprefix("run-")
    return run_id, "offline" if records[-1].parent.name.startswith("offline-") else "online"


def log_figures_to_run(run_dir: Path, figures: dict[str, Path]) -> str:
    """Resume the run dir's own W&B run and attach the figures; returns the run id."""
    import wandb

    found = wandb_run_in(run_dir)
    if found is None:
        raise UserError(f"{run_dir}/wandb/ holds no W&B run folder (was W&B disabled for this run?)")
    run_id, mode = found
    logging = read_run_info(run_dir / "run.json").get("config", {}).get("logging", {})
    run = wandb.init(project=logging.get("wandb_project", "raylm"), entity=logging.get("wandb_entity"), id=run_id,
                     resume="allow", dir=str(run_dir), mode=os.environ.get("WANDB_MODE", mode))
    try:
        log_figures_to_wandb(figures)
    finally:
        run.finish()
    return run_id


# ---- samples ---------------------------------------------------------------------------------------


def default_samples(run_dir: Path) -> list[dict[str, str]]:
    """Greedy continuations of DEFAULT_PROMPTS by RUN_DIR/model; [] when there is no model to ask."""
    import torch

    from raylm.inference.generate import generate_texts
    from raylm.model.model_dir import read_model_config
    from raylm.model.transformer import count_params

    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file():
        return []
    params = count_params(read_model_config(model_dir))
    if params > SAMPLE_MAX_PARAMS_ON_CPU and not torch.cuda.is_available():
        print(f"report: no sample generations ({params / 1e9:.1f}B parameters on a CPU-only driver); try `raylm generate --model {model_dir}`")
        return []
    texts = generate_texts(str(model_dir), DEFAULT_PROMPTS, max_tokens=SAMPLE_MAX_TOKENS, temperature=0.0)
    return [{"prompt": prompt, "completion": text} for prompt, text in zip(DEFAULT_PROMPTS, texts)]


# ---- figures and markdown -------------------------------------------------------------------------


def final_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers a reader wants first, computed from the metrics history."""
    figures: dict[str, Any] = {}
    if rows:
        figures["logged steps"] = len(rows)
        figures["last step"] = rows[-1].get("step")
    _, train = series(rows, "loss")
    if train:
        figures["final train loss"] = train[-1]
        figures["first train loss"] = train[0]
    _, val = series(rows, "val_loss")
    if val:
        figures["final val loss"] = val[-1]
        figures["best val loss"] = min(val)
        figures["final val perplexity"] = math.exp(min(val[-1], 50.0))
    _, speed = series(rows, "tokens_per_s")
    if speed:
        # The first logged interval carries start-up costs; leave it out when there are more.
        steady = speed[1:] if len(speed) > 1 else speed
        figures["mean tokens/s"] = sum(steady) / len(steady)
    _, mfu = series(rows, "mfu")  # None (no known peak: a CPU run without logging.peak_tflops_per_worker) is left out
    if mfu:
        steady = mfu[1:] if len(mfu) > 1 else mfu
        figures["mean MFU %"] = 100 * sum(steady) / len(steady)
    _, elapsed = series(rows, "elapsed_s")
    if elapsed:
        figures["elapsed s"] = elapsed[-1]
    return figures


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value)
        return f"`{text}`" if "`" not in text else text  # a backtick inside would end the code span
    return str(value)


def table(pairs: dict[str, Any]) -> list[str]:
    if not pairs:
        return []
    lines = ["| | |", "|:--|:--|"]
    lines += [f"| {key} | {format_value(value).replace('|', '/')} |" for key, value in pairs.items()]
    return lines + [""]


def fenced(text: str) -> str:
    """Text in a code fence that cannot be closed early by backticks inside the text."""
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}\n{text.rstrip()}\n{fence}"


def samples_section(samples: list[dict[str, str]]) -> list[str]:
    """Each sample: a `prompt` and one or more named outputs (e.g. `completion`, or `before`/`after`)."""
    lines = ["## Sample generations", ""]
    for i, sample in enumerate(samples, start=1):
        lines += [f"### {i}. Prompt", "", fenced(str(sample.get("prompt", ""))), ""]
        for key, text in sample.items():
            if key != "prompt":
                lines += [f"**{key}**", "", fenced(str(text)), ""]
    return lines


def render_markdown(
    run_dir: Path,
    info: dict[str, Any],
    rows: list[dict[str, Any]],
    figures: dict[str, Path],
    samples: list[dict[str, str]] | None,
    sections: dict[str, dict[str, Any]] | None,
) -> str:
    kind = info.get("kind", "training")
    lines = [f"# Run report: {run_dir.name} ({kind})", ""]
    about = {k: v for k, v in info.items() if not isinstance(v, (dict, list)) and k != "kind"}
    lines += table(about)
    lines += ["## Final figures", ""]
    lines += table(final_figures(rows)) or ["No metrics were logged.", ""]
    for key, value in info.items():  # e.g. summary, dataset, wandb: whatever the run recorded
        if isinstance(value, dict) and key != "config":
            lines += [f"## {key.replace('_', ' ').capitalize()}", ""] + (table(value) or ["(empty)", ""])
    for title, pairs in (sections or {}).items():
        lines += [f"## {title}", ""] + (table(pairs) or ["(empty)", ""])
    if figures:
        lines += ["## Plots", ""]
        lines += [f"![{FIGURES[name][0]}]({PLOTS_DIR}/{path.name})" for name, path in figures.items()] + [""]
    if samples:
        lines += samples_section(samples)
    if "config" in info:
        lines += ["## Config", "", fenced(yaml.safe_dump(info["config"], sort_keys=False)), ""]
    return "\n".join(lines)





def write_report(
    run_dir: str | Path,
    samples: list[dict[str, str]] | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write RUN_DIR/report.md and RUN_DIR/plots/*.png from the run dir's metrics and run.json.

    `samples`: generations to show, each a dict with a `prompt` and named outputs; None = greedy
    continuations of DEFAULT_PROMPTS by RUN_DIR/model when it exists.
    `sections`: extra tables, {title: {name: value}} (fine-tuning: held-out loss before/after, data counts).
    Returns the report's path. Safe to call again: it replaces the previous report.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run dir {str(run_dir)!r} does not exist")
    rows = read_metrics(run_dir / "metrics.jsonl")
    info = read_run_info(run_dir / "run.json")
    if samples is None:
        samples = default_samples(run_dir)
    figures = plot_all(rows, run_dir / PLOTS_DIR)
    log_figures_to_wandb(figures)
    path = run_dir / "report.md"
    write_atomic(path, render_markdown(run_dir, info, rows, figures, samples, sections))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raylm.training.report", description="(Re)write RUN_DIR/report.md and its plots.")
    parser.add_argument("run_dir", help="a pretrain or finetune run dir (with metrics.jsonl and run.json): a path, or an s3://, gs:// URI")
    parser.add_argument("--wandb", action="store_true", help="also attach the plots to the run's own W&B run (resumed by id)")
    args = parser.parse_args(argv)
    from raylm.training import run_home

    if run_home.is_remote(args.run_dir):  # rewritten in this machine's copy, then sent back
        home = args.run_dir.rstrip("/")
        run_home.fetch_run_files(home)
        run_home.fetch_model(home)
        path = write_report(run_home.work_dir(home))
        run_home.send_run_files(home)
    else:
        path = write_report(args.run_dir)
    print(path)
    if args.wandb:
        figures = {name: p for name in FIGURES if (p := path.parent / PLOTS_DIR / f"{name}.png").is_file()}
        print(f"plots attached to W&B run {log_figures_to_run(path.parent, figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
