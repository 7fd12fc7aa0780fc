"""`raylm serve`: a model dir behind the OpenAI-compatible API on Ray Serve, in the foreground.

    raylm serve --model MODEL_DIR [--host HOST] [--port PORT] [--api-key KEY] [--config FILE]
                [--max-batch-size N ...any other app arg]

The config file is a Ray Serve config (serving/configs/serve.yaml by default): its first
application's args and deployment options are used, and its http_options give the address (the
default file's where it sets none). --model, --api-key (or RAYLM_API_KEY), the other app-arg flags,
--host and --port take precedence. Ctrl-C or SIGTERM stops it: Serve is shut down, and so is the
Ray cluster when this command started it. `start_serving` is the same thing for in-process callers
(the demo), returning the base URL without blocking.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylm.core.cli_args import add_config_flags, config_values, parse_command_line
from raylm.core.entry import run_main
from raylm.serving.app import (
    API_KEY_ENV,
    DEFAULT_CONFIG,
    AppArgs,
    configured_app,
    deployment_options,
    read_serve_config,
)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


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


def plan_serving(model_dir: str, host: str | None, port: int | None, api_key: str | None, config: str | Path | None, app_args: dict[str, Any] | None = None) -> ServingPlan:
    """The app for `model_dir` from a serve config (default serving/configs/serve.yaml), with
    `app_args` (AppArgs fields) and `api_key` (else RAYLM_API_KEY) over the config's args."""
    from raylm.model.model_dir import read_model_config

    read_model_config(model_dir)  # a bad model dir fails here, in one line, not inside a replica
    serve_config = read_serve_config(config or DEFAULT_CONFIG)
    application = serve_config.applications[0]
    args = {**application.args, **(app_args or {}), "model": str(Path(model_dir).resolve())}
    api_key = api_key or os.environ.get(API_KEY_ENV)
    if api_key:
        args["api_key"] = api_key
    http = http_options(serve_config, host, port)
    if not args.get("api_key") and http["host"] not in LOCAL_HOSTS:
        print(f"warning: serving on {http['host']} without an API key: anyone who can reach it can use it (set --api-key)", file=sys.stderr)
    app = configured_app(args, deployment_options(serve_config))
    return ServingPlan(app, application.name, application.route_prefix or "/", http)


def run_serving(plan: ServingPlan, blocking: bool) -> str:
    """Deploy the plan on the Ray cluster this process is connected to; return its base URL.

    With `blocking`, serve until Ctrl-C/SIGTERM, then return; the caller stops Serve (`stop_serving`).
    """
    from ray import serve

    # Ctrl-C / SIGTERM only set a flag from here on, so one that lands while the app is still
    # starting is still a clean stop after it started, never an exception halfway through.
    stop = StopSignal() if blocking else None
    try:
        serve.start(http_options=plan.http)
        serve.run(plan.app, name=plan.name, route_prefix=plan.route_prefix)
        if stop is not None:
            print(f"serving at {plan.base_url}/v1  (Ctrl-C stops)", flush=True)
            while not stop.requested:
                time.sleep(0.2)
            print("stopping", file=sys.stderr, flush=True)
    finally:
        if stop is not None:
            stop.restore()
    return plan.base_url


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
    init_ray()
    return run_serving(plan, blocking)


class StopSignal:
    """SIGINT and SIGTERM set `requested` instead of raising, until `restore()`."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}

    def request(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="raylm serve", description=__doc__.split("\n\n")[0])
    http = read_serve_config(DEFAULT_CONFIG).http_options
    parser.add_argument("--host", help=f"address to bind (default: the config file's http_options.host, else {http.host})")
    parser.add_argument("--port", type=int, help=f"port (default: the config file's http_options.port, else {http.port})")
    parser.add_argument("--config", help=f"Ray Serve config file (default {DEFAULT_CONFIG})")
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    add_config_flags(parser, AppArgs, note="the app's args; a default shown applies where the config file's args do not set the key")
    return parse_command_line(parser, argv)


def plan_command(argv: list[str] | None) -> tuple[ServingPlan, str | None]:
    """`raylm serve ARGV` -> (what it serves, the Ray address to join), every check done, no Ray started."""
    args = parse_args(argv)
    app_args = config_values(args)
    plan = plan_serving(app_args.pop("model"), args.host, args.port, app_args.pop("api_key", None), args.config, app_args)
    return plan, args.address


def main(argv: list[str] | None = None) -> int:
    plan, address = plan_command(argv)  # a bad model dir, config or flag fails before Ray starts
    import ray

    from raylm.core.ray_cluster import init_ray

    started_ray = not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS"))
    init_ray(address)
    try:
        run_serving(plan, blocking=True)
    finally:
        stop_serving(cluster_ends=started_ray)
        if started_ray:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
