"""The serving peer of bench/serve.py: `transformers serve` on the same model dir, on 127.0.0.1.

What a user would pick to serve a Llama-format dir on a CPU box without us: Hugging Face's own
OpenAI-compatible server with continuous batching and paged attention, fp32, the model preloaded.
bench/serve.py sends it the same streaming `/v1/completions` load it sends raylm's endpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator


def transformers_cli() -> str:
    """The `transformers` command of this environment."""
    here = Path(sys.executable).with_name("transformers")
    found = str(here) if here.exists() else shutil.which("transformers")
    if not found:
        raise SystemExit("--peer needs the `transformers` command (pip install 'transformers[serving]')")
    return found


@contextlib.contextmanager
def transformers_serve(model_dir: Path, port: int, threads: int, log: Path, timeout_s: float = 300) -> Iterator[str]:
    """Run `transformers serve MODEL_DIR --continuous-batching` on 127.0.0.1:`port` with `threads`
    torch threads; yield its base URL once /health answers; stop it (its process group) after."""
    import httpx

    command = [transformers_cli(), "serve", str(model_dir), "--device", "cpu", "--dtype", "float32",
               "--continuous-batching", "--host", "127.0.0.1", "--port", str(port)]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {proc.returncode}; its log: {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve did not answer /health within {timeout_s:.0f}s; its log: {log}")
            time.sleep(1)
        yield base_url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
