"""`raylm serve`: a model dir behind the OpenAI-compatible API on Ray Serve, in the foreground.

    raylm serve --model MODEL_DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--config FILE]

The config file is a Ray Serve config (serving/configs/serve.yaml by default): its first
application's args and deployment options are used, with --model, --api-key (or RAYLM_API_KEY),
--host and --port taking precedence. Ctrl-C or SIGTERM stops it: Serve is shut down, and so is the
Ray cluster when this command started it. `start_serving` is the same thing for in-process callers
(the demo), returning the base URL without blocking.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from raylm.core.entry import run_main
from raylm.core.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "serve.yaml"


def read_serve_config(path: str | Path):
    """The config file's first application (a ServeApplicationSchema), validated by Serve's schema."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from raylm.core.config import read_yaml

    try:
        config = ServeDeploySchema(**read_yaml(path))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"serve config {str(path)!r}: {where}: {first['msg']}") from None
    if not config.applications:
        raise UserError(f"serve config {str(path)!r} has no applications")
    app = config.applications[0]
    if app.import_path != "raylm.serving.app:build_app":
        raise UserError(f"serve config {str(path)!r}: import_path is {app.import_path!r}, expected 'raylm.serving.app:build_app'")
    if len(app.deployments) > 1:
        raise UserError(f"serve config {str(path)!r}: expected one deployment (LLMServer), found {len(app.deployments)}")
    return app


def start_serving(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    config: str | Path | None = None,
    blocking: bool = False,
) -> str:
    """Deploy `model_dir` on the Ray cluster (joined or started here) and return its base URL.

    Stop it with `serve.shutdown()`. With `blocking`, serve until Ctrl-C/SIGTERM, then shut down.
    """
    from ray import serve

    from raylm.core.ray_cluster import init_ray
    from raylm.model.model_dir import read_model_config
    from raylm.serving.app import API_KEY_ENV, configured_app

    read_model_config(model_dir)  # a bad model dir fails here, in one line, not inside a replica
    application = read_serve_config(config or DEFAULT_CONFIG)
    args = {**application.args, "model": str(Path(model_dir).resolve())}
    api_key = api_key or os.environ.get(API_KEY_ENV)
    if api_key:
        args["api_key"] = api_key
    elif host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host} without an API key: anyone who can reach it can use it (set --api-key)", file=sys.stderr)
    options = [d.model_dump(exclude_unset=True) for d in application.deployments]
    app = configured_app(args, options[0] if options else None)

    init_ray()
    # Ctrl-C / SIGTERM only set a flag from here on, so one that lands while the app is still
    # starting is still a clean stop after it started, never an exception halfway through.
    stop = StopSignal() if blocking else None
    try:
        serve.start(http_options={"host": host, "port": port})
        route_prefix = application.route_prefix or "/"
        serve.run(app, name=application.name, route_prefix=route_prefix)
        base_url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
        if stop is not None:
            print(f"serving at {base_url}/v1  (Ctrl-C stops)", flush=True)
            while not stop.requested:
                time.sleep(0.2)
            print("stopping", file=sys.stderr, flush=True)
            serve.shutdown()
    finally:
        if stop is not None:
            stop.restore()
    return base_url


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
    parser.add_argument("--model", required=True, help="model dir (Hugging Face Llama format)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--api-key", default=None, help="require this Bearer key (default: $RAYLM_API_KEY, else none)")
    parser.add_argument("--config", default=None, help=f"Ray Serve config file (default {DEFAULT_CONFIG})")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    from raylm.core.ray_cluster import init_ray
    from raylm.model.model_dir import read_model_config

    # Fail on a bad model dir or config before paying for a Ray cluster.
    read_model_config(args.model)
    read_serve_config(args.config or DEFAULT_CONFIG)

    started_ray = not ray.is_initialized() and not (args.address or os.environ.get("RAY_ADDRESS"))
    init_ray(args.address)
    try:
        start_serving(args.model, args.host, args.port, args.api_key, args.config, blocking=True)
    finally:
        from ray import serve

        serve.shutdown()
        if started_ray:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
