"""What a log row reports about speed and memory: tokens/s over a window of steps, MFU's peak, peak memory."""

from __future__ import annotations

import functools
import resource
import time
from dataclasses import dataclass

import torch

# bf16 dense peaks (FLOP/s) of GPUs we may meet, for MFU; others are measured.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


@functools.lru_cache(maxsize=1)
def peak_flops(device_type: str, configured_tflops: float) -> float:
    """FLOP/s one worker could reach: configured, a known GPU's bf16 peak, else a measured fp32 matmul rate."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    device = torch.device(device_type)
    a = torch.randn(512, 512, device=device)
    b = torch.randn(512, 512, device=device)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        a @ b
        reps += 1
    if device_type == "cuda":
        torch.cuda.synchronize()
    return 2 * 512**3 * reps / (time.perf_counter() - start)


def memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # peak RSS (Linux reports KiB)


@dataclass
class Throughput:
    """Tokens and step seconds since the last logged row; evals, logging and checkpoints are not timed."""

    tokens: int = 0
    seconds: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    def take(self) -> float:
        """Tokens per second over the window, which then starts afresh."""
        rate = self.tokens / max(self.seconds, 1e-9)
        self.tokens, self.seconds = 0, 0.0
        return rate
