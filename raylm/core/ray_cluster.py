"""Joining or starting a Ray cluster, pinned to loopback when it is ours."""

from __future__ import annotations

import os


def pin_to_loopback() -> None:
    """Ray binds the machine's routable address unless told otherwise; keep a local cluster on 127.0.0.1."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> None:
    """Join `address` (or RAY_ADDRESS) when given; otherwise start a local cluster on 127.0.0.1.

    Inside a Ray job or a test session Ray is already initialised and this does nothing.
    """
    import ray

    if ray.is_initialized():
        return
    pin_to_loopback()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        kwargs.setdefault("include_dashboard", False)
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
