"""`raylm jobs list|status|logs|stop [JOB_ID]`: look after jobs that `raylm submit` started.

`status` exits 0 while a job is pending, running or succeeded and 1 once it failed or was stopped,
so scripts can branch on it; `logs --follow` streams until the job ends; `stop` asks Ray to stop
the job (its driver gets SIGTERM, then SIGKILL) and waits until it has.
"""

from __future__ import annotations

import argparse
import sys

from raylm.cluster.client import connect, job_errors_as_user_errors, resolve_address
from raylm.cluster.submit import follow_logs, wait_until_done
from raylm.core.entry import run_main

FAILED_STATUSES = {"FAILED", "STOPPED"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="raylm jobs", description="Status, logs or stop of Ray jobs.")
    parser.add_argument("--address", help="job server URL (default: RAY_ADDRESS, else http://127.0.0.1:8265)")
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every job on the cluster, newest last")
    for name, text in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a job")):
        action = actions.add_parser(name, help=text)
        action.add_argument("job_id")
    actions.choices["logs"].add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    return parser.parse_args(argv)


def describe(info, job_id: str) -> str:
    line = f"{job_id}  {info.status}"
    if info.metadata and info.metadata.get("raylm_stage"):
        line += f"  [{info.metadata['raylm_stage']}]"
    if info.message:
        line += f"  {info.message.strip().splitlines()[0]}"
    return line


def list_jobs(client) -> int:
    jobs = sorted(client.list_jobs(), key=lambda job: job.start_time or 0)
    for job in jobs:
        print(describe(job, job.submission_id or job.job_id or "?"))
    if not jobs:
        print("no jobs on this cluster")
    return 0


def show_status(client, job_id: str) -> int:
    info = client.get_job_info(job_id)
    print(describe(info, job_id))
    return 1 if str(info.status) in FAILED_STATUSES else 0


def show_logs(client, job_id: str, follow: bool) -> int:
    if follow:
        follow_logs(client, job_id)
        return show_status(client, job_id)
    sys.stdout.write(client.get_job_logs(job_id))
    return 0


def stop(client, job_id: str) -> int:
    if client.stop_job(job_id):
        print(f"raylm jobs: stopping {job_id}")
    info = wait_until_done(client, job_id)
    print(describe(info, job_id))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = resolve_address(args.address)
    client = connect(url)
    job_id = getattr(args, "job_id", "")
    try:
        with job_errors_as_user_errors(url, job_id):
            if args.action == "list":
                return list_jobs(client)
            if args.action == "status":
                return show_status(client, job_id)
            if args.action == "logs":
                return show_logs(client, job_id, args.follow)
            return stop(client, job_id)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(run_main(main))
