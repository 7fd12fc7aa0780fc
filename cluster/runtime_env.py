"""What a submitted stage carries to the cluster: the raylm package as working_dir, and the environment.

The job's working_dir is the package laid out as `pip install` lays it out: `raylm/` with the
stage folders (data/, training/, serving/, cluster/) mapped inside it to raylm.data, ... (as in
pyproject.toml). So `python -m raylm.training.pretrain` in the job runs exactly the submitter's
code, whatever raylm the cluster's image has installed. Ray zips and uploads it through the head
(100 MiB at most; the package is well under 1 MiB). Credentials the stages read (W&B, Hugging
Face, object storage) travel as env vars when they are set here; `--env KEY=VALUE` adds more.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from raylm.core.errors import UserError

# Source folder of the checkout -> where it sits in the installed package (pyproject.toml's package-dir).
PACKAGE_LAYOUT: dict[str, str] = {
    "raylm": "raylm",
    "data": "raylm/data",
    "training": "raylm/training",
    "serving": "raylm/serving",
    "cluster": "raylm/cluster",
}
# Never shipped, wherever they appear.
WORKING_DIR_EXCLUDES: list[str] = ["__pycache__/", "*.pyc"]

# Variables a stage reads when they are set on the submitting machine: tracking, model hub and
# object-storage credentials, the serving API key, and the settings that choose the device and
# the trainer.
PASSED_THROUGH_ENV: list[str] = [
    "RAYLM_API_KEY",
    "WANDB_API_KEY",
    "WANDB_MODE",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_BASE_URL",
    "HF_TOKEN",
    "HF_ENDPOINT",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "DS_ACCELERATOR",
    "RAY_TRAIN_V2_ENABLED",
]


def project_root() -> Path:
    """The source checkout this package runs from."""
    root = Path(__file__).resolve().parents[1]
    if not all((root / folder).is_dir() for folder in PACKAGE_LAYOUT):
        raise UserError(
            f"raylm submit ships the project's source as the job's working_dir, but {root} is not a "
            "source checkout; run it from a clone installed with `pip install -e .`"
        )
    return root


def stage_package(root: Path) -> Path:
    """A fresh dir holding the package as installed (see PACKAGE_LAYOUT), built from the checkout at `root`."""
    staged = Path(tempfile.mkdtemp(prefix="raylm-job-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder, target in PACKAGE_LAYOUT.items():
        shutil.copytree(root / folder, staged / target, ignore=ignore, dirs_exist_ok=True)
    return staged


def parse_env_assignments(assignments: list[str]) -> dict[str, str]:
    """`KEY=VALUE` strings from `--env` → a dict; a malformed one is named."""
    env: dict[str, str] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum() or key[0].isdigit():
            raise UserError(f"--env {item!r}: expected KEY=VALUE with KEY a variable name")
        env[key] = value
    return env


def passed_through_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The pass-through variables that are set (and not empty) in `environ`."""
    environ = os.environ if environ is None else environ
    return {key: environ[key] for key in PASSED_THROUGH_ENV if environ.get(key)}


def build_runtime_env(extra_env: dict[str, str], project: Path | None = None) -> dict:
    """The job's runtime_env: the staged package as working_dir, and env vars (`extra_env` wins)."""
    return {
        "working_dir": str(stage_package(project or project_root())),
        "excludes": list(WORKING_DIR_EXCLUDES),
        "env_vars": {**passed_through_env(), **extra_env},
    }
