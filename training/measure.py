"""What a log row reports about speed and memory: tokens/s over a window of steps, MFU's peak, peak memory."""

from __future__ import annotations

import functools
import resource
from dataclasses import dataclass

import torch

# Dense bf16 tensor-core peaks (FLOP/s, without sparsity) of the GPUs whose MFU we report, by a
# part of torch.cuda.get_device_name(); the longest matching name wins ("H100 PCIe" over "H100",
# "A100" over "A10"). Any other device reports no MFU unless logging.peak_tflops_per_worker is set.
GPU_PEAK_FLOPS = {
    "B200": 2250e12,
    "GH200": 989e12,
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "A10G": 125e12,
    "A10": 125e12,
    "L4": 121e12,
}


def known_gpu_peak(device_name: str) -> float | None:
    """The bf16 peak of the GPU named `device_name` (e.g. "NVIDIA H100 80GB HBM3"), or None."""
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
        if key in device_name:
            return GPU_PEAK_FLOPS[key]
    return None


@functools.cache
def peak_flops(device_type: str, configured_tflops: float) -> float | None:
    """FLOP/s one worker could reach, for MFU: the configured peak (logging.peak_tflops_per_worker),
    else a known GPU's bf16 peak, else None: no MFU. A CPU has no peak worth the name (a made-up
    one gave "mfu 78%"), so a CPU run reports MFU only against a peak the user gives."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device_type == "cuda":
        return known_gpu_peak(torch.cuda.get_device_name())
    return None


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
