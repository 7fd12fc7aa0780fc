"""`raylm serve`: a model dir behind the OpenAI-compatible API on Ray Serve, in the foreground.

    raylm serve --model MODEL_DIR [--host HOST] [--port PORT] [--api-key KEY] [--config FILE]
                [--insecure-no-api-key] [--max-batch-size N ...any other app arg]

The config file is a Ray Serve config (serving/configs/serve.yaml by default): its first
application's args and deployment options are used, and its http_options give the address (the
default file's where it sets none). --model, --api-key (or RAYLM_API_KEY), the other app-arg flags,
--host and --port take precedence. An address beyond loopback without an API key is refused unless
--insecure-no-api-key is given. Ctrl-C or SIGTERM stops it, to this process or to its whole process
group: Serve is shut down, and so is the Ray cluster when this command started it, every process of
it included. `start_serving` is the same thing for in-process callers (the demo), returning the base
URL without blocking.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylm.core import storage
from raylm.core.cli_args import add_config_flags, config_values, parse_command_line
from raylm.core.entry import run_main
from raylm.core.errors import UserError
from raylm.serving.app import (
    API_KEY_ENV,
    DEFAULT_CONFIG,
    AppArgs,
    configured_app,
    deployment_options,
    read_serve_config,
)

SERVING_CHILD_ENV = "RAYLM_SERVE_CHILD"  # set in the process that runs Ray and Serve (see `supervise`)


@dataclass
class ServingPlan:
    """What `raylm serve` runs, checked before any Ray starts."""

    app: Any  # the ray.serve.Application
    name: str  # the application's name in Serve
    route_prefix: str
    http: dict[str, Any]  # serve.start's http_options

    @property
    def base_url(self) -> str:
        return f"http://{self.http['host']}:{self.http['port']}{self.route_prefix.rstrip('/')}"


def http_options(config, host: str | None, port: int | None) -> dict[str, Any]:
    """serve.start's http_options: --host/--port over the config file's over the default file's."""
    given = {key: value for key, value in (("host", host), ("port", port)) if value is not None}
    default = read_serve_config(DEFAULT_CONFIG).http_options.model_dump(exclude_unset=True)
    return {**default, **config.http_options.model_dump(exclude_unset=True), **given}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False


def check_exposure(host: str, api_key: str | None, insecure_no_api_key: bool) -> None:
    """Refuse to serve beyond loopback without a key, unless the user says so in as many words."""
    if api_key or is_loopback(host):
        return
    if not insecure_no_api_key:
        raise UserError(
            f"refusing to serve on {host} without an API key: anyone who can reach it could use it. "
            f"Set --api-key KEY (or {API_KEY_ENV}), bind 127.0.0.1 (--host), or pass --insecure-no-api-key to serve it open"
        )
    print(f"warning: serving on {host} WITHOUT an API key (--insecure-no-api-key): anyone who can reach it can use it", file=sys.stderr)


def plan_serving(
    model_dir: str,
    host: str | None,
    port: int | None,
    api_key: str | None,
    config: str | Path | None,
    app_args: dict[str, Any] | None = None,
    insecure_no_api_key: bool = False,
) -> ServingPlan:
    """The app for `model_dir` from a serve config (default serving/configs/serve.yaml), with
    `app_args` (AppArgs fields) and `api_key` (else RAYLM_API_KEY) over the config's args."""
    from raylm.model.model_dir import read_model_config

    read_model_config(storage.local_dir(model_dir))  # a bad model dir fails here, in one line, not inside a replica
    serve_config = read_serve_config(config or DEFAULT_CONFIG)
    application = serve_config.applications[0]
    args = {**application.args, **(app_args or {}), "model": storage.join(model_dir)}
    api_key = api_key or os.environ.get(API_KEY_ENV)
    if api_key:
        args["api_key"] = api_key
    http = http_options(serve_config, host, port)
    check_exposure(http["host"], args.get("api_key"), insecure_no_api_key)
    app = configured_app(args, deployment_options(serve_config))
    return ServingPlan(app, application.name, application.route_prefix or "/", http)


def run_serving(plan: ServingPlan, stop: StopSignal | None = None) -> str:
    """Deploy the plan on the Ray cluster this process is connected to; return its base URL.

    With `stop`, serve until it is requested (Ctrl-C/SIGTERM), then return; the caller stops Serve
    (`stop_serving`).
    """
    from ray import serve

    serve.start(http_options=plan.http)
    with quiet_reconnect_notice():
        serve.run(plan.app, name=plan.name, route_prefix=plan.route_prefix)
    if stop is not None:
        print(f"serving at {plan.base_url}/v1  (Ctrl-C stops)", flush=True)
        while not stop.requested:
            time.sleep(0.2)
        print("stopping", file=sys.stderr, flush=True)
    return plan.base_url


@contextmanager
def quiet_reconnect_notice():
    """Drop the "Connecting to existing Serve app ... New http_options will not be applied" notice
    of `serve.run`. serve.run takes no http_options, so `serve.start` starts Serve with ours just
    before, and serve.run then connects to that instance, whose options did apply."""
    serve_logger = logging.getLogger("ray.serve")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Connecting to existing Serve app")

    serve_logger.addFilter(keep)
    try:
        yield
    finally:
        serve_logger.removeFilter(keep)


def stop_serving(cluster_ends: bool) -> None:
    """Take Serve down; `cluster_ends` when this process started the Ray cluster and shuts it down next.

    Ray Serve 2.60's `serve.shutdown()` waits on a call to its controller that never returns: the
    controller kills itself when its teardown is done. The controller is an actor with infinite
    task retries, so the caller's Ray worker reports the killed call on the console ("Task
    ServeController.graceful_shutdown failed. There are infinite retries remaining, ...") before
    the call fails and Serve swallows the error. Where the cluster ends anyway, deleting the apps
    (their replicas drain and stop) and leaving the controller and proxies to `ray.shutdown()` is as
    graceful and prints nothing. On a cluster that lives on, only `serve.shutdown()` removes Serve.
    """
    from ray import serve
    from ray.serve.exceptions import RayServeException

    if not cluster_ends:
        serve.shutdown()
        return
    try:
        names = list(serve.status().applications)
    except RayServeException:  # no Serve on the cluster: nothing to delete
        return
    for name in names:
        serve.delete(name)


def start_serving(
    model_dir: str,
    host: str | None = None,
    port: int | None = None,
    api_key: str | None = None,
    config: str | Path | None = None,
    blocking: bool = False,
) -> str:
    """Deploy `model_dir` on the Ray cluster (joined or started here) and return its base URL.

    Host and port default to the config file's http_options. Stop it with `stop_serving` (or
    `serve.shutdown()`). With `blocking`, serve until Ctrl-C/SIGTERM, then return.
    """
    from raylm.core.ray_cluster import init_ray

    plan = plan_serving(model_dir, host, port, api_key, config)
    if not blocking:
        init_ray()
        return run_serving(plan)
    with StopSignal() as stop:
        init_ray()
        stop.reclaim()
        return run_serving(plan, stop)


class StopSignal:
    """Within `with StopSignal() as stop:`, SIGINT and SIGTERM set `stop.requested` instead of raising
    or ending the process, so a stop that lands while Ray or the app is still starting, or a second
    one while it is stopping, never leaves things halfway."""

    def __enter__(self) -> StopSignal:
        self.requested = False
        self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def reclaim(self) -> None:
        """Take the signals back after `ray.init`, whose driver installs a SIGTERM handler of its own
        (it prints a stack dump and aborts the process, with the cluster still up)."""
        for sig in self.previous:
            signal.signal(sig, self.request)

    def request(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="raylm serve", description=__doc__.split("\n\n")[0])
    http = read_serve_config(DEFAULT_CONFIG).http_options
    parser.add_argument("--host", help=f"address to bind (default: the config file's http_options.host, else {http.host})")
    parser.add_argument("--port", type=int, help=f"port (default: the config file's http_options.port, else {http.port})")
    parser.add_argument("--config", help=f"Ray Serve config file (default {DEFAULT_CONFIG})")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    parser.add_argument(
        "--insecure-no-api-key", action="store_true",
        help="serve on an address beyond loopback without an API key: anyone who can reach it can use it",
    )
    add_config_flags(parser, AppArgs, note="the app's args; a default shown applies where the config file's args do not set the key")
    return parse_command_line(parser, argv)


def plan_command(argv: list[str] | None) -> tuple[ServingPlan, str | None]:
    """`raylm serve ARGV` -> (what it serves, the Ray address to join), every check done, no Ray started."""
    args = parse_args(argv)
    app_args = config_values(args)
    plan = plan_serving(app_args.pop("model"), args.host, args.port, app_args.pop("api_key", None), args.config, app_args, args.insecure_no_api_key)
    return plan, args.address


def main(argv: list[str] | None = None) -> int:
    plan, address = plan_command(argv)  # a bad model dir, config or flag fails before anything starts
    parent = os.environ.get(SERVING_CHILD_ENV)
    if parent is None:
        return supervise(sys.argv[1:] if argv is None else argv)
    return serve_in_foreground(plan, address, int(parent))


def supervise(argv: list[str]) -> int:
    """Run `raylm serve ARGV` in a child process in a session of its own, turn whatever signals reach
    this process into one stop request to it, and return its exit code.

    A terminal's Ctrl-C and a supervisor's SIGTERM go to the whole process group. Ray shields its
    own processes from SIGINT but not from SIGTERM: gcs and raylet would die at once, before Serve
    could be stopped, and the replicas, in process groups of their own, would outlive the command by
    a minute. In a session of their own they hear only the child, which stops them in order.
    """
    with StopSignal() as stop:
        child = subprocess.Popen(
            [sys.executable, "-m", "raylm.serving.serve", *argv], env={**os.environ, SERVING_CHILD_ENV: str(os.getpid())}, start_new_session=True
        )
        told = False
        while True:
            try:
                code = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if stop.requested and not told:
                    child.send_signal(signal.SIGTERM)
                    told = True
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


def serve_in_foreground(plan: ServingPlan, address: str | None, parent: int) -> int:
    """Serve until SIGINT/SIGTERM, then stop Serve, and the Ray cluster when this process started it."""
    import ray

    from raylm.core.ray_cluster import init_ray

    with StopSignal() as stop:
        stop_with_parent(parent)
        started_ray = not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS"))
        init_ray(address)
        stop.reclaim()
        try:
            if not stop.requested:
                run_serving(plan, stop)
        finally:
            stop_serving(cluster_ends=started_ray)
            if started_ray:
                ray.shutdown()
    return 0


def stop_with_parent(parent: int) -> None:
    """Get SIGTERM (a clean stop) when the supervising process dies, even by SIGKILL (Linux only),
    so that a killed `raylm serve` leaves no server behind."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(run_main(main))
