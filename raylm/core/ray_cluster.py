"""Joining or starting a Ray cluster, pinned to loopback when it is ours.

Ray's own actors must know which cluster they belong to. Ray Train starts a PlacementGroupCleaner
actor per run that asks the state API, every second, whether the run's controller is alive. The
state API is served by the dashboard, and a process that names no address finds the cluster by
looking for running GCS processes: with a second Ray instance on the machine (a user's `ray start`,
a test session, another raylm command) it finds several, raises "Found multiple active Ray
instances", and the cleaner's thread dies with a traceback in the middle of a healthy run. Without
the dashboard's state API it logs "Failed to query Ray Train Controller actor state" every second
instead. So a local cluster starts with its dashboard (on 127.0.0.1, a port chosen here) and every
worker of the job gets that address in RAY_API_SERVER_ADDRESS (job-level runtime_env env_vars,
which Ray's own actors inherit); a joined cluster's workers get RAY_ADDRESS.
"""

from __future__ import annotations

import json
import os
import socket
import sys

LOOPBACK = "127.0.0.1"


def pin_to_loopback() -> None:
    """Ray binds the machine's routable address unless told otherwise; keep a local cluster on 127.0.0.1.

    Ray reads the switch once, when it is imported, so call this before. A Ray imported earlier in
    the process (by a library, a notebook) has read it already: its module constant is set too
    (a private name, checked when Ray picks the address of the node it starts).
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if "ray" in sys.modules and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def job_env_vars() -> dict[str, str]:
    """The env_vars of the runtime env of the Ray job this driver runs in (empty outside a job)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not raw:
        return {}
    try:
        return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return {}


def with_env_vars(runtime_env: dict | None, env_vars: dict[str, str]) -> dict:
    """`runtime_env` plus `env_vars`, never overriding a variable the caller or the job already sets
    (ray.init refuses a job env var that the driver's runtime env sets again)."""
    runtime_env = dict(runtime_env or {})
    given = {**job_env_vars(), **(runtime_env.get("env_vars") or {})}
    merged = dict(runtime_env.get("env_vars") or {})
    merged.update({key: value for key, value in env_vars.items() if key not in given})
    if merged:
        runtime_env["env_vars"] = merged
    return runtime_env


def with_runtime_env(options: dict, env_vars: dict[str, str]) -> dict:
    """ray.init `options` whose runtime_env also sets `env_vars` (see with_env_vars); none when empty."""
    runtime_env = with_env_vars(options.get("runtime_env"), env_vars)
    options = {key: value for key, value in options.items() if key != "runtime_env"}
    return options | ({"runtime_env": runtime_env} if runtime_env else {})


def local_cluster_options(**kwargs) -> dict:
    """ray.init keyword arguments for a new local cluster on 127.0.0.1 whose actors find their own
    state API (see the module docstring). `kwargs` are ray.init's and win over these.

    Also turns Ray Train's preemption watcher off (unless the user set RAY_TRAIN_ENABLE_PREEMPTION_WATCHER):
    it watches for nodes being drained (spot instances), which a one-machine cluster never is, and
    starting its actor logs an error-level line from Ray's core worker on every run. Ray Train
    passes the variable from the driver's environment on to its controller.
    """
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    options = {"address": "local", "include_dashboard": True, "dashboard_host": LOOPBACK, **kwargs}
    if options["include_dashboard"] is False:
        return options
    port = options.setdefault("dashboard_port", free_port())
    return with_runtime_env(options, {"RAY_API_SERVER_ADDRESS": f"http://{LOOPBACK}:{port}"})


def joined_cluster_options(address: str, **kwargs) -> dict:
    """ray.init keyword arguments to join the cluster at `address` (host:port): its workers are
    told that address (RAY_ADDRESS), which Ray's actors otherwise guess (see the module docstring)."""
    options = {"address": address, **kwargs}
    if "://" in address or address in ("auto", "local"):
        return options  # a Ray Client address or none: nothing to pass on
    return with_runtime_env(options, {"RAY_ADDRESS": address})


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> None:
    """Join `address` (or RAY_ADDRESS) when given; otherwise start a local cluster on 127.0.0.1.

    Inside a Ray job or a test session Ray is already initialised and this does nothing.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        pin_to_loopback()  # before `import ray`: a cluster we start stays on loopback
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(**joined_cluster_options(address, **kwargs))
    else:
        ray.init(**local_cluster_options(num_cpus=num_cpus, **kwargs))
