"""The CPU decode-attention kernel (paged_attention.c): build, load, call.

The C source is compiled on first use with this machine's C compiler (`$CC`, else `cc`) for this
CPU (`-march=native`), into `$RAYLM_KERNEL_CACHE` (default `~/.cache/raylm/kernels`). The file is
named by a hash of the source, the flags, the compiler and the CPU's model and features, so nodes
that share a home directory but not a CPU each get their own. Building takes about 2 s
and happens once per machine; the result is written under a temporary name and renamed, so
processes building at once never load half a file.

No compiler, a failed build, or `RAYLM_CPU_DECODE_KERNEL=0`: `load_decode_kernel()` returns None
(logging why, once per process) and `KVCache` attends with SDPA instead, which gives the same
result and is slower at long contexts.

Why C and not torch: a decode step's attention is one query per sequence and head against that
sequence's keys. With SDPA each sequence is a call of its own (tens of microseconds of Python and
dispatch each), or the batch's blocks are first copied into one padded tensor; a 16-bit cache is
converted to float32 first, another copy. The kernel reads the blocks in place, in the cache's
dtype, for the whole batch in one call that releases the GIL, asking for each block two blocks
ahead (a CPU's prefetcher stops at the page edge a block starts on). Built with OpenMP, it shares
a long batch out to torch's own threads (torch's libgomp, loaded first, serves its soname). What
it cannot change: each decode reads all its keys and values once per step, so where memory bounds
the step (a CPU that reads slowly for its arithmetic), a long decode's cost follows the cache's
bytes, and a 16-bit cache (`kv_cache_dtype`) halves them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.c")
COMPILE_FLAGS = ["-O3", "-ffast-math", "-fopenmp-simd", "-fPIC"]  # fast-math lets expf and the sums vectorise
# Tried in order: not every compiler has OpenMP (Apple's clang) or knows -march=native.
FLAG_CHOICES = [["-fopenmp", "-march=native"], ["-march=native"], ["-fopenmp"], []]
# Share a call out to torch's threads only while each still has this much cache to read (per layer):
# below it, waking threads costs more than it saves.
PARALLEL_MIN_BYTES = 1 << 20
BUILD_TIMEOUT_S = 120  # a compiler that hangs must not hold a replica's start for longer
CACHE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the C source's CACHE_* codes


def padded_block_table(blocks: list[list[int]]) -> torch.Tensor:
    """Each sequence's block ids in a row [B, W], padded with block 0 to the longest. One tensor from
    padded lists: a copy per row cost 4x as much (200 µs a step at batch 32)."""
    width = max(len(ids) for ids in blocks)
    return torch.tensor([ids + [0] * (width - len(ids)) for ids in blocks], dtype=torch.long)


@dataclass
class DecodeBatch:
    """One step's decodes, as the kernel takes them (built once per step, used by every layer)."""

    rows: torch.Tensor  # [B] int64: each decode's row (token) in the step's packed forward
    table: torch.Tensor  # [B, W] int64: each one's blocks in order, padded
    lengths: torch.Tensor  # [B] int64: each one's key count, its new token's included
    threads: int  # torch's threads that attend them together


class DecodeKernel:
    """`paged_decode_attention` from the built library: `batch()` once per step, then call it per
    layer."""

    def __init__(self, library: ctypes.CDLL, parallel: bool):
        self.attend = library.paged_decode_attention
        self.attend.restype = ctypes.c_int
        self.attend.argtypes = ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] * 2 + [ctypes.c_void_p] * 5
                                + [ctypes.c_int64] * 7 + [ctypes.c_float, ctypes.c_int64, ctypes.c_int64])
        self.serves_shape = library.paged_decode_attention_serves
        self.serves_shape.restype = ctypes.c_int
        self.serves_shape.argtypes = [ctypes.c_int64] * 3
        self.parallel = parallel  # built with OpenMP: it can use torch's threads

    def serves(self, cache_dtype: torch.dtype, head_dim: int, group: int) -> bool:
        """Whether the kernel takes a cache of this dtype, and is the faster path for this head dim and
        query heads per KV head."""
        return cache_dtype in CACHE_DTYPES and bool(self.serves_shape(CACHE_DTYPES[cache_dtype], head_dim, group))

    def batch(self, rows: list[int], blocks: list[list[int]], lengths: list[int], bytes_per_key: int) -> DecodeBatch:
        """The step's decodes: their rows, their blocks and key counts, and the threads to share them
        (torch's, fewer when each would read under PARALLEL_MIN_BYTES a layer)."""
        table = padded_block_table(blocks)
        threads = min(torch.get_num_threads(), sum(lengths) * bytes_per_key // PARALLEL_MIN_BYTES) if self.parallel else 1
        return DecodeBatch(torch.tensor(rows), table, torch.tensor(lengths), max(1, threads))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, batch: DecodeBatch,
                 block_size: int) -> None:
        """Write the decodes' attention into `out`. q and out [1, H, N, D] float32 (the step's packed
        rows, any strides but a contiguous D); k and v [Hkv, slots, D], one layer of the cache in a
        dtype it `serves`, contiguous."""
        _, heads, _, dim = q.shape
        kv_heads, slots, _ = k.shape
        failed = self.attend(q.data_ptr(), q.stride(2), q.stride(1), out.data_ptr(), out.stride(2), out.stride(1),
                             batch.rows.data_ptr(), k.data_ptr(), v.data_ptr(), batch.table.data_ptr(), batch.lengths.data_ptr(),
                             len(batch.rows), heads, kv_heads, dim, slots, batch.table.shape[1], block_size, dim ** -0.5,
                             CACHE_DTYPES[k.dtype], batch.threads)
        if failed:
            raise ValueError(f"decode attention does not serve a {k.dtype} cache with head dim {dim} and {heads // kv_heads} query heads per KV head")


def cpu_identity() -> str:
    """What a native build depends on: the architecture, and on Linux the CPU's model and features."""
    identity = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                identity += "\n" + line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        identity += "\n" + platform.processor()
    return identity


def compiler_version(compiler: str) -> str:
    """The compiler's first --version line: a new compiler builds anew."""
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S).stdout.partition("\n")[0]
    except (OSError, subprocess.SubprocessError):
        return ""


def build(compiler: str, flags: list[str], target: Path) -> None:
    """Compile, then link without -ffast-math: linking a shared library with it makes GCC add
    start-up code that flushes denormals to zero for the whole process, torch included."""
    with tempfile.TemporaryDirectory() as work:
        obj, library = Path(work) / "kernel.o", Path(work) / "kernel.so"
        openmp = ["-fopenmp"] if "-fopenmp" in flags else []  # links libgomp: at load, the copy torch has loaded
        for command in ([compiler, *flags, "-c", str(SOURCE), "-o", str(obj)], [compiler, "-shared", *openmp, str(obj), "-o", str(library), "-lm"]):
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, staged = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")  # unique across nodes sharing the dir
        os.close(handle)
        try:
            shutil.copyfile(library, staged)
            os.replace(staged, target)  # atomic: a concurrent loader sees the old file or the whole new one
        finally:
            Path(staged).unlink(missing_ok=True)


def first_error(error: subprocess.CalledProcessError) -> str:
    """The compiler's first error line (its last is often only "compilation terminated.")."""
    lines = (error.stderr or "").strip().splitlines()
    return next((line for line in lines if "error" in line), lines[-1] if lines else f"exit {error.returncode}")


@functools.cache
def load_decode_kernel() -> DecodeKernel | None:
    """The built kernel, or None (with one log line saying why) where it cannot be had. Once per
    process: CC, RAYLM_KERNEL_CACHE and RAYLM_CPU_DECODE_KERNEL are read at the first call."""
    if os.environ.get("RAYLM_CPU_DECODE_KERNEL", "1") == "0":
        log.info("RAYLM_CPU_DECODE_KERNEL=0: decode attention on the CPU uses SDPA")
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler (%s) on PATH: decode attention on the CPU uses SDPA, slower at long contexts. "
                    "Install gcc or clang, or set CC.", os.environ.get("CC", "cc"))
        return None
    cache = Path(os.environ.get("RAYLM_KERNEL_CACHE", Path.home() / ".cache" / "raylm" / "kernels"))
    errors, built_from = [], [SOURCE.read_text(), compiler, compiler_version(compiler), cpu_identity()]
    for choice in FLAG_CHOICES:
        flags = [*COMPILE_FLAGS, *choice]
        key = hashlib.sha256("\0".join([*built_from, *flags]).encode()).hexdigest()[:16]
        target = cache / f"paged_attention-{key}.so"
        try:
            if not target.exists():
                build(compiler, flags, target)
            return DecodeKernel(ctypes.CDLL(str(target)), parallel="-fopenmp" in flags)
        except subprocess.CalledProcessError as error:
            errors.append(first_error(error))
        except subprocess.TimeoutExpired:
            errors.append(f"no result in {BUILD_TIMEOUT_S} s")
        except OSError as error:
            errors.append(str(error))
    log.warning("could not build the CPU decode-attention kernel with %s into %s (%s): decode attention uses SDPA, slower "
                "at long contexts. Set CC to another compiler, or RAYLM_KERNEL_CACHE to a writable dir.", compiler, cache, "; ".join(errors))
    return None
