"""The Ray Serve side: the `LLMServer` deployment (one engine per replica) and the app builder.

`build_app(args)` is the `import_path` of serving/configs/serve.yaml, so `serve run` / `serve deploy`
of that file (or `serve run raylm.serving.app:build_app model=DIR`) build the same app that
`raylm serve` runs. Deployment options (autoscaling, queue limits, CPUs/GPUs per replica, health
checks, graceful shutdown) come from the config file; the decorator's values are the fallbacks
when the builder is run bare.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from ray import serve

from raylm.core.config import from_dict, parse_override
from raylm.core.errors import UserError

API_KEY_ENV = "RAYLM_API_KEY"
log = logging.getLogger(__name__)


@dataclass
class AppArgs:
    model: str  # the model dir (HF Llama format: config.json, model.safetensors, tokenizer files)
    model_name: str = ""  # the id clients ask for as `model`; "" = the model dir's name
    api_key: str = ""  # required as `Authorization: Bearer ...` when set; "" = RAYLM_API_KEY or none
    max_batch_size: int = 32  # sequences decoded together per replica (KV cache slots)
    max_model_len: int = 0  # longest prompt + output; 0 = the model's context
    max_body_bytes: int = 1 << 20  # request bodies above this get 413
    stream_interval_s: float = 0.0  # least time between two SSE writes of a stream; > 0 trades smoothness for throughput
    device: str = "auto"  # cpu | cuda | auto (cuda when the replica has a GPU)
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto (bfloat16 on CUDA, float32 on CPU)

    def validate(self) -> None:
        if self.max_body_bytes < 1024:
            raise UserError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")


def parse_app_args(args: dict) -> AppArgs:
    """Builder args -> AppArgs. `serve run ... key=value` passes every value as a string."""
    numeric = {f.name for f in dataclasses.fields(AppArgs) if f.type in ("int", int, "float", float)}
    parsed = {k: parse_override(f"{k}={v}")[1] if k in numeric and isinstance(v, str) else v for k, v in args.items()}
    app_args = from_dict(AppArgs, parsed, prefix="args.")
    if not Path(app_args.model).is_dir():
        raise UserError(f"args.model: model dir {app_args.model!r} does not exist")
    # Replicas may not share the builder's working directory.
    return dataclasses.replace(app_args, model=str(Path(app_args.model).resolve()))


def replica_cpu_threads() -> int:
    """torch threads for this replica: the CPUs Ray gave it (at least 1), so replicas do not fight."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, int(cpus))


def export_engine_metrics(engine, stop: threading.Event, period_s: float = 2.0) -> None:
    """Mirror the engine's counters into Ray's metrics (Prometheus, Grafana), beside Serve's own."""
    from ray.util.metrics import Gauge

    gauges: dict = {}
    while not stop.wait(period_s):
        for name, value in engine.stats().items():
            if isinstance(value, (int, float)):
                if name not in gauges:
                    gauges[name] = Gauge(f"raylm_engine_{name}", description=f"raylm engine: {name.replace('_', ' ')}")
                gauges[name].set(value)


@serve.deployment(
    name="LLMServer",
    max_ongoing_requests=48,
    max_queued_requests=64,
    backpressure_config={"status_code": 429, "retry_after_s": 2},
    ray_actor_options={"num_cpus": 1},
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()
class LLMServer:
    def __init__(self, args: AppArgs):
        from raylm.inference.engine import Engine, EngineConfig, EngineLoop

        config = EngineConfig(
            max_batch_size=args.max_batch_size,
            max_model_len=args.max_model_len,
            device=args.device,
            dtype=args.dtype,
            threads=replica_cpu_threads(),
        )
        self.loop = EngineLoop(Engine(args.model, config))
        self.args = args
        self.stop_metrics = threading.Event()
        threading.Thread(target=export_engine_metrics, args=(self.loop.engine, self.stop_metrics), daemon=True).start()
        log.info("raylm engine ready: %s on %s, %d slots", args.model, self.loop.engine.device, config.max_batch_size)

    def __serve_build_asgi_app__(self):
        from raylm.serving.api import ApiSettings, build_api

        settings = ApiSettings(
            model_name=self.args.model_name or Path(self.args.model).name,
            api_key=self.args.api_key or os.environ.get(API_KEY_ENV) or None,
            max_body_bytes=self.args.max_body_bytes,
            stream_interval_s=self.args.stream_interval_s,
        )
        return build_api(self.loop, settings)

    def check_health(self) -> None:
        if not self.loop.alive():
            raise RuntimeError("the engine thread has stopped")

    def __del__(self) -> None:
        self.stop_metrics.set()
        self.loop.stop()


def build_app(args: dict) -> serve.Application:
    """The app builder of `import_path: raylm.serving.app:build_app` (Serve passes exactly the args dict)."""
    return configured_app(args, None)


def configured_app(args: dict, deployment_options: dict | None) -> serve.Application:
    """The Serve application for `args` (see AppArgs), with deployment options as a config file gives them."""
    app_args = parse_app_args(args)
    deployment = LLMServer.options(**deployment_options) if deployment_options else LLMServer
    return deployment.bind(app_args)
