"""`raylm submit [--address URL] [--no-wait] [--env KEY=VALUE ...] -- <stage> <its arguments>`.

Runs any stage as a Ray job: the entrypoint is `python -m <stage module> <arguments>` (the same
program as `raylm <stage>`), the raylm package is the job's working_dir, and credentials travel as env
vars (see cluster/runtime_env.py). Prints the job id, follows the logs to the end and exits with
the job's outcome: 0 when it SUCCEEDED, 1 when it FAILED or was STOPPED. `--no-wait` returns once
the job is submitted.

`serve` is a server that never ends on its own: its job is followed until every Serve application
on the cluster is RUNNING, then `raylm submit` returns 0 and leaves the job (and the endpoint)
running; `raylm jobs stop JOB_ID` takes it down.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import shutil
import sys
import time
import uuid

from raylm.cluster.client import connect, job_errors_as_user_errors, resolve_address
from raylm.cluster.runtime_env import build_runtime_env, parse_env_assignments
from raylm.core.commands import COMMANDS
from raylm.core.entry import run_main
from raylm.core.errors import UserError

# Stages that make no sense as a job on the cluster: they talk to the cluster themselves.
NOT_SUBMITTABLE = {"submit", "jobs"}
POLL_SECONDS = 1.0
SERVE_START_TIMEOUT_S = 600.0
SERVE_STOP_WAIT_S = 60
# Longer than checkpoint.stop_grace_s (25 s): a stopped training job writes its checkpoint first.
TRAIN_STOP_WAIT_S = 40
AGENT_WAIT_S = 60.0  # how long a freshly started head may take to accept jobs


def submittable_stages() -> dict[str, str]:
    """stage name -> module, from the same table the CLI reads so the two cannot disagree."""
    return {name: module for name, (module, _) in COMMANDS.items() if name not in NOT_SUBMITTABLE}


def build_entrypoint(stage: str, stage_args: list[str]) -> str:
    """The shell command the job runs on the head: the stage's module with its arguments."""
    stages = submittable_stages()
    if stage not in stages:
        raise UserError(f"unknown stage {stage!r} to submit; expected one of: {', '.join(stages)}")
    return shlex.join(["python", "-m", stages[stage], *stage_args])


def stage_env(stage: str) -> dict[str, str]:
    """Env vars a stage needs as a job: `raylm jobs stop` gives a server time to shut Serve down, and
    a training run time to checkpoint at its next step (Ray's job supervisor SIGKILLs 3 s after
    SIGTERM by default, which would leave the app up and the steps since the last checkpoint lost)."""
    wait = {"serve": SERVE_STOP_WAIT_S, "pretrain": TRAIN_STOP_WAIT_S, "finetune": TRAIN_STOP_WAIT_S, "demo": SERVE_STOP_WAIT_S}
    return {"RAY_JOB_STOP_WAIT_TIME_S": str(wait[stage])} if stage in wait else {}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="raylm submit",
        description="Run a raylm stage as a Ray job on a cluster.",
        epilog="example: raylm submit -- pretrain --config tiny --data /mnt/raylm/datasets/stdlib "
        "--out /mnt/raylm/runs/tiny (paths on a filesystem every node mounts; see docs/cluster.md)",
    )
    parser.add_argument("--address", help="job server URL (default: RAY_ADDRESS, else http://127.0.0.1:8265)")
    parser.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="an env var for the job (repeatable)"
    )
    parser.add_argument("--job-id", help="the job's submission id (default: raylm-<stage>-<random>)")
    parser.add_argument("stage", help="prepare, pretrain, finetune, serve, demo, ...")
    parser.add_argument("stage_args", nargs=argparse.REMAINDER, help="the stage's own arguments")
    return parser.parse_args(argv)


async def _print_log_stream(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def follow_logs(client, job_id: str) -> None:
    """Print the job's logs as they come, until the job ends (or the stream drops)."""
    try:
        asyncio.run(_print_log_stream(client, job_id))
    except RuntimeError as err:
        # The stream closes early when the head restarts or the network blips; the status poll
        # that follows still reports the outcome.
        print(f"raylm submit: log stream ended early ({err})", file=sys.stderr)


def wait_until_done(client, job_id: str):
    """Poll until the job reaches a terminal status; returns its JobInfo."""
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal():
            return info
        time.sleep(POLL_SECONDS)


def report_outcome(info, job_id: str) -> int:
    """One line that says how the job ended (with Ray's reason when it failed); the exit code."""
    status = str(info.status)
    if status == "SUCCEEDED":
        print(f"raylm submit: job {job_id} SUCCEEDED")
        return 0
    # Ray's message repeats the log tail that was just printed; its first line is the reason.
    reason = (info.message or "no reason given").strip().splitlines()[0].split(", last available logs")[0]
    print(f"raylm submit: job {job_id} {status}: {reason}", file=sys.stderr)
    return 1


def serve_applications_running(url: str) -> bool:
    """True when the cluster's Serve has at least one application and all of them are RUNNING."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(url).get_serve_details()
    statuses = [app.get("status") for app in (details.get("applications") or {}).values()]
    return bool(statuses) and all(status == "RUNNING" for status in statuses)


def wait_for_serving(client, url: str, job_id: str) -> int:
    """Wait until the serve job's applications are RUNNING, then detach and leave it running."""
    deadline = time.monotonic() + SERVE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        info = client.get_job_info(job_id)
        if info.status.is_terminal():
            sys.stdout.write(client.get_job_logs(job_id))
            return report_outcome(info, job_id)
        if str(info.status) == "RUNNING" and serve_applications_running(url):
            sys.stdout.write(client.get_job_logs(job_id))
            print(
                f"raylm submit: job {job_id} is serving (Serve applications RUNNING); it keeps "
                f"running: `raylm jobs logs {job_id} --follow`, `raylm jobs stop {job_id}`"
            )
            return 0
        time.sleep(2 * POLL_SECONDS)
    print(
        f"raylm submit: job {job_id} has not started serving after {SERVE_START_TIMEOUT_S:.0f} s; "
        f"see `raylm jobs logs {job_id}`",
        file=sys.stderr,
    )
    return 1


def submit(client, job_id: str, entrypoint: str, runtime_env: dict, stage: str) -> None:
    """Submit the job; a head that has just started may not have its job agent yet, so wait for it."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(
                entrypoint=entrypoint,
                submission_id=job_id,
                runtime_env=runtime_env,
                metadata={"raylm_stage": stage},
            )
            return
        except ValueError as err:
            # Ray refuses a working_dir over its upload limit; its message names the limit.
            raise UserError(f"could not ship {runtime_env['working_dir']} as the job's working_dir: {err}") from None
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(POLL_SECONDS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    entrypoint = build_entrypoint(args.stage, args.stage_args)
    extra_env = {**stage_env(args.stage), **parse_env_assignments(args.env)}
    url = resolve_address(args.address)
    client = connect(url)
    job_id = args.job_id or f"raylm-{args.stage}-{uuid.uuid4().hex[:8]}"
    try:
        with job_errors_as_user_errors(url, job_id):
            runtime_env = build_runtime_env(extra_env)
            try:
                submit(client, job_id, entrypoint, runtime_env, args.stage)
            finally:
                shutil.rmtree(runtime_env["working_dir"], ignore_errors=True)  # uploaded by now
            print(f"raylm submit: submitted job {job_id} to {url}: {entrypoint}", flush=True)
            if args.no_wait:
                print(f"raylm submit: follow it with `raylm jobs logs {job_id} --follow`")
                return 0
            if args.stage == "serve":
                return wait_for_serving(client, url, job_id)
            follow_logs(client, job_id)
            return report_outcome(wait_until_done(client, job_id), job_id)
    except KeyboardInterrupt:
        print(
            f"\nraylm submit: stopped following; job {job_id} keeps running "
            f"(`raylm jobs stop {job_id}` ends it)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(run_main(main))
