"""The machine's limits: CPU model and instruction-set flags, and TF's dense matmul FLOP/s per dtype."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from .timing import time_calls

MATMUL_N = 2048  # side of the reference matmul: large enough for every kernel to reach its speed
MATMUL_DTYPES = ("float32", "bfloat16")
# The dtype a Keras precision policy runs its convolutions in: a step's limit is the matmul in that dtype.
POLICY_DTYPE = {"float32": "float32", "mixed_bfloat16": "bfloat16"}
# Flags that decide float32/bf16 matmul speed: AVX-512 BF16 and AMX give native bf16, AVX2 does not.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
MATMUL_BUDGET_S = 10.0  # timed seconds per dtype at most (bf16 is emulated, so slow, on AVX2-only CPUs)


def cpu_info() -> dict[str, Any]:
    """CPU model, usable cores and the flags that decide matmul speed (Linux /proc/cpuinfo)."""
    from ..distribute import BF16_CPU_FLAGS, CPUINFO, cpu_flags
    from ..preprocess import resolve_workers

    flags, model = cpu_flags(), platform.processor() or "unknown"
    if Path(CPUINFO).exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path(CPUINFO).read_text().splitlines()
                 if ln.startswith("model name")]
        model = names[0] if names else model
    return {"model": model, "cores": resolve_workers(0), "flags": {f: f in flags for f in CPU_FLAGS},
            "native_bf16": bool(set(BF16_CPU_FLAGS) & flags), "hypervisor": "hypervisor" in flags}


def matmul_limit(dtype: str, n: int = MATMUL_N, repeats: int = 3) -> dict[str, Any]:
    """FLOP/s (2 n^3 per call) of a compiled ``tf.matmul`` of two n x n matrices in ``dtype``."""
    import tensorflow as tf

    a, b = (tf.cast(tf.random.stateless_uniform((n, n), (seed, 1)), dtype) for seed in (1, 2))
    mm = tf.function(lambda x, y: {"corner": tf.cast(tf.matmul(x, y)[0, 0], tf.float32)})  # tiny readback
    r = time_calls(lambda: mm(a, b), warmup=2, repeats=repeats, budget_s=MATMUL_BUDGET_S)
    flops = 2.0 * n**3
    return {"dtype": dtype, "n": n, "seconds": r["seconds"], "flop_per_s": flops / r["seconds"]["median"]}


def matmul_limits(n: int = MATMUL_N) -> dict[str, dict[str, Any]]:
    """The matmul limit of every dtype a step can run in, measured in this process."""
    return {d: matmul_limit(d, n) for d in MATMUL_DTYPES}

