"""Speed benchmark: training steps, input pipeline, tiled upscaling, and the machine's own limit.

``python src/bench.py`` (``make bench``) prints a table and writes ``reports/bench.json``
(atomically: a temp file in the same folder, then a rename).

Sections. ``steps``: the generator MSE pre-training step (``Trainer.pretrain_step``), a D-only update
(``Trainer.d_step``) and the full SRGAN step (``Trainer.gan_step``) on a batch held in memory, per
variant, plus a float32 matmul in the same process (the machine's own limit). ``pipeline``: the
tf.data pipeline alone (crops/s) and the G step fed by it vs by the in-memory batch. ``upscale``:
``inference.upscale`` (tiled, tile/overlap from params) of a 510x339 LR image and of one with 4x the
pixels, each in a fresh process for comparable peak RSS. ``quality`` (opt-in): the same small config
trained in float32 and in mixed_bfloat16, validation PSNR-Y of both.

Process model. Every measurement runs in a fresh child process (``python -m srgan.bench --child``,
spec on stdin, one ``BENCH_RESULT <json>`` line on stdout). Variants differ in process-wide state
that cannot be switched back reliably inside one process: Keras' global precision policy,
``TF_ENABLE_ONEDNN_OPTS`` (read once at import) and TF's thread pools (fixed at first use); and
peak-memory figures are only comparable between fresh processes. The parent only orchestrates,
aggregates and writes the report.

Variants (``--variants``, comma-separated; atoms joined by ``+``, optionally ``:steps`` joined by
``/``, e.g. ``onednn+xla:g_pretrain``): ``plain`` (tf.function as configured), ``xla``
(``train.jit_compile: true``), ``bf16`` (``train.precision: mixed_bfloat16``), ``onednn``
(``TF_ENABLE_ONEDNN_OPTS=1``: TF turns oneDNN on by default only on CPUs with AVX512-VNNI/BF16/AMX-class
features), ``inter1`` (one inter-op thread). ``xla`` on a generator with the bicubic skip falls back
to ``bicubic_skip: false`` and says so: ResizeBicubic has no XLA kernel.

FLOP convention. Forward FLOPs = 2 x multiply-adds of every Conv2D/MatMul (``models.generator_flops``
for G; the same count read off the traced graph for D and VGG). A training step of a network is
counted as 3 x forward (forward, input gradients, weight gradients); a frozen network that only
passes gradients (VGG on SR, D inside G's update) as 2 x forward; BN, activations, the optimizer
and the bicubic skip are not counted. So: G pretrain = 3 F_G; D step = F_G + 3 F_D(2B);
SRGAN step = 3 F_G + 3 F_D(2B) + F_D(B) + F_V(2B) + F_V(B).

Timing. Each step is called ``warmup`` times (the first call traces/compiles and is reported as
``first_call_s``), then timed up to ``repeats`` times (fewer for slow steps, see
:func:`time_calls`) one call at a time, synchronised by reading the losses back (as the training
loop does). Figures are medians with IQR and min/max. The CPU time other processes used during each
measurement (and hypervisor steal) is recorded: on a shared 2-core machine that is the main noise.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from . import config
from .config import ROOT, Config
from .dataio import read_json, write_json_atomic

SRC_DIR = Path(__file__).resolve().parents[1]
RESULT_TAG = "BENCH_RESULT "
STEPS = ("g_pretrain", "d_step", "srgan")
STEP_LABELS = {"g_pretrain": "G pretrain (MSE)", "d_step": "D step", "srgan": "SRGAN step"}
VARIANT_ATOMS = ("plain", "xla", "bf16", "onednn", "inter1")
# plain and onednn time every step; bf16 and xla only G pretrain by default (time budget: on a
# CPU without native bf16 a bf16 step here is >10x slower than float32 with oneDNN).
DEFAULT_VARIANTS = "plain,onednn,xla:g_pretrain,bf16:g_pretrain"
QUICK_VARIANTS = "onednn"
# Pipeline and quality run with oneDNN on: TF enables it by default only on CPUs with
# AVX512-VNNI/BF16/AMX-class features, and on this AVX2 CPU it makes the training steps several
# times faster. Upscaling stays on TF's default: with batch-1 tiles oneDNN is far slower here (its
# 9x9 64->3 output conv on one 704x704 window runs at ~0.5 GFLOP/s vs ~6 with Eigen).
DEFAULT_BASE = "onednn"
DEFAULT_UPSCALE = "plain"
UPSCALE_LR = (339, 510)  # (h, w): DIV2K validation LR size at x4 (2040x1356 HR / 4)
# The issue's targets, stated for a 2-core CPU, batch 16, HR 96 crops, a 16-block generator.
# The generator (with its sub-pixel upsampler) and discriminator widths are the paper's: the issue
# predates the 32-filter and light-upsampler defaults.
TARGET_CONFIG = {"blocks": 16, "filters": 64, "upsampler": "paper", "batch": 16, "patch": 96,
                 "d_filters": 64, "d_dense": 1024}
TARGET_OVERRIDES = {
    "model.generator.blocks": 16,
    "model.generator.filters": 64,
    "model.generator.upsampler": "paper",
    "train.batch_size": 16,
    "train.hr_patch": 96,
    "model.discriminator.filters": 64,
    "model.discriminator.dense": 1024,
}
TARGETS = {
    "g_pretrain_steps_per_s": 2.0,
    "srgan_steps_per_s": 0.5,
    "g_frac_matmul": 0.60,
    "upscale_mem_ratio": 1.5,
    "feed_ratio": 1.05,
}


# =========================================================================== small helpers
def stats(xs: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, min, max and count of a sample."""
    a = np.asarray(list(xs), dtype=float)
    if a.size == 0:
        raise ValueError("stats of an empty sample")
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {
        "n": int(a.size),
        "median": float(med),
        "q1": float(q1),
        "q3": float(q3),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def rate(seconds: dict[str, float], per_call: float = 1.0) -> dict[str, float]:
    """Calls/s (times ``per_call``) from time stats: median, IQR bounds and min/max bounds."""

    def inv(s: float) -> float:
        return per_call / s if s > 0 else float("nan")

    return {
        "median": inv(seconds["median"]),
        "iqr_lo": inv(seconds["q3"]),
        "iqr_hi": inv(seconds["q1"]),
        "min": inv(seconds["max"]),
        "max": inv(seconds["min"]),
    }


def finite_or_none(obj: Any) -> Any:
    """Replace NaN/Inf by None recursively (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, np.generic):
        return finite_or_none(obj.item())
    return obj


def write_report(path: Path, report: dict[str, Any]) -> Path:
    """Write the report atomically (temp file in the same folder + rename): never half-written."""
    write_json_atomic(Path(path), finite_or_none(report))
    return Path(path)


class CpuMeter:
    """CPU cores used by *other* processes (and hypervisor steal) while a block runs.

    System busy time minus this process's own CPU time, divided by wall time. On a shared
    machine a high value means the figures measured in that block are pessimistic.
    """

    def __enter__(self) -> "CpuMeter":
        import psutil

        self._proc = psutil.Process()
        self._t = time.perf_counter()
        self._sys = psutil.cpu_times()
        self._own = self._proc.cpu_times()
        return self

    def __exit__(self, *exc: object) -> None:
        import psutil

        wall = max(time.perf_counter() - self._t, 1e-9)
        sys1, own1 = psutil.cpu_times(), self._proc.cpu_times()

        def busy(c: Any) -> float:
            return sum(getattr(c, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))

        own = (own1.user + own1.system) - (self._own.user + self._own.system)
        self.result = {
            "wall_s": wall,
            "own_cores": own / wall,
            "others_cores": max(busy(sys1) - busy(self._sys) - own, 0.0) / wall,
            "steal_cores": (getattr(sys1, "steal", 0.0) - getattr(self._sys, "steal", 0.0)) / wall,
        }


# =========================================================================== machine
def cpu_info() -> dict[str, Any]:
    """CPU model, cores and the instruction-set flags that decide matmul/bf16 speed."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    first: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if first:
                break
            continue
        k, _, v = line.partition(":")
        first.setdefault(k.strip(), v.strip())
    flags = set(first.get("flags", "").split())
    wanted = (
        "avx",
        "avx2",
        "fma",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "amx_bf16",
        "amx_tile",
        "avx_vnni",
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mhz = float(first["bogomips"]) / 2 if "bogomips" in first else None
    # FP32 FLOP/cycle/core: 2 FMA pipes x (8 lanes AVX2 | 16 lanes AVX-512) x 2 (mul+add), at the
    # base clock (BogoMIPS/2). For orientation only: pipes are assumed, and boost clocks (invisible
    # under a hypervisor) can exceed the base clock by ~1.4x.
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8
    return {
        "model": first.get("model name", platform.processor() or "unknown"),
        "vendor": first.get("vendor_id"),
        "family": first.get("cpu family"),
        "model_id": first.get("model"),
        "cores": cores,
        "bogomips_mhz": mhz,
        "flags": {f: f in flags for f in wanted},
        "native_bf16": bool({"avx512_bf16", "amx_bf16"} & flags),
        "hypervisor": "hypervisor" in flags,
        "nominal_peak_gflops": (cores * mhz * 1e6 * per_cycle / 1e9) if mhz and cores else None,
        "nominal_peak_note": f"cores x BogoMIPS/2 MHz x {per_cycle} FP32 FLOP/cycle; boost clocks exceed it",
    }


def machine_info() -> dict[str, Any]:
    """CPU, memory, software versions and load, without importing TensorFlow."""
    import psutil

    def ver(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cpu": cpu_info(),
        "memory_gb": psutil.virtual_memory().total / 2**30,
        "python": platform.python_version(),
        "tensorflow": ver("tensorflow") or ver("tensorflow-cpu"),
        "keras": ver("keras"),
        "loadavg_start": list(os.getloadavg()),
        "env": {k: os.environ.get(k) for k in ("TF_ENABLE_ONEDNN_OPTS", "OMP_NUM_THREADS", "TF_XLA_FLAGS")},
    }


# =========================================================================== TF-side helpers (children)
def _tf_info() -> dict[str, Any]:
    import tensorflow as tf

    try:  # private, but the only way to ask whether oneDNN kernels are active
        from tensorflow.python.util import _pywrap_util_port

        onednn = bool(_pywrap_util_port.IsMklEnabled())
    except Exception:  # noqa: BLE001 - informational only
        onednn = None
    return {
        "onednn": onednn,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def _set_threads(threads: Sequence[int] | None) -> None:
    """Thread pools must be set before TF runs its first op."""
    if threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(int(threads[0]))
        if len(threads) > 1:
            tf.config.threading.set_inter_op_parallelism_threads(int(threads[1]))


def _sync(out: Any) -> dict[str, float]:
    """Read a step's outputs back to the host: the step has finished when this returns."""
    if isinstance(out, dict):
        return {k: float(v) for k, v in out.items()}
    return {"value": float(np.asarray(out).ravel()[0])}


def time_calls(
    fn: Callable[[], Any], warmup: int, repeats: int, budget_s: float = float("inf"), min_repeats: int = 1
) -> dict[str, Any]:
    """First-call time, then per-call times after warm-up (each call synchronised).

    ``warmup`` counts the first (tracing/compiling) call. ``budget_s`` bounds the cost of slow
    steps: a first call longer than the budget counts as the whole warm-up (its one-time costs are
    small next to the step), and timed calls stop once they add up to the budget (after
    ``min_repeats``), so a variant that is 10x slower costs fewer calls, not 10x the time.
    """
    t0 = time.perf_counter()
    out = _sync(fn())
    first = time.perf_counter() - t0
    done_warm = 1
    while done_warm < warmup and first < budget_s:
        out = _sync(fn())
        done_warm += 1
    times: list[float] = []
    while len(times) < repeats and (len(times) < min_repeats or sum(times) < budget_s):
        t = time.perf_counter()
        out = _sync(fn())
        times.append(time.perf_counter() - t)
    return {
        "first_call_s": first,
        "warmup_calls": done_warm,
        "seconds": stats(times),
        "finite": all(math.isfinite(v) for v in out.values()),
    }


def matmul_flops(n: int, repeats: int) -> dict[str, Any]:
    """FLOP/s of a dense float32 n x n matmul in a compiled TF function (2 n^3 FLOPs)."""
    import tensorflow as tf

    a = tf.random.stateless_uniform((n, n), (1, 2))
    b = tf.random.stateless_uniform((n, n), (3, 4))
    mm = tf.function(lambda x, y: tf.reduce_sum(tf.matmul(x, y)[:1, :1]))  # tiny readback
    r = time_calls(lambda: mm(a, b), warmup=2, repeats=repeats)  # ~0.1-1 s per call: no budget
    flops = 2.0 * n**3
    return {
        "n": n,
        "dtype": "float32",
        "seconds": r["seconds"],
        "flop_per_s": flops / r["seconds"]["median"],
        "flop_per_s_max": flops / r["seconds"]["min"],
    }


def graph_flops(model: Any, input_shape: Sequence[int]) -> int:
    """Forward FLOPs (2 x MACs of Conv2D/MatMul ops) of ``model`` traced on a concrete shape."""
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False))
    graph = fn.get_concrete_function(tf.TensorSpec(tuple(input_shape), tf.float32)).graph
    total = 0
    for op in graph.get_operations():
        if op.type == "Conv2D":
            out = op.outputs[0].shape.as_list()
            kh, kw, cin, _ = op.inputs[1].shape.as_list()
            total += 2 * int(np.prod(out)) * kh * kw * cin
        elif op.type in ("MatMul", "BatchMatMulV2", "BatchMatMulV3"):
            out = op.outputs[0].shape.as_list()
            a = op.inputs[0].shape.as_list()
            adj = op.get_attr("transpose_a") if op.type == "MatMul" else op.get_attr("adj_x")
            k = a[-2] if adj else a[-1]
            total += 2 * int(np.prod(out)) * k
    return int(total)


def step_flops(G: Any, D: Any, vgg: Any, batch: int, patch: int, scale: int) -> dict[str, float]:
    """FLOPs per step of each benchmarked step under the module's convention."""
    from .models import generator_flops

    lr = patch // scale
    f_g = float(generator_flops(G, (batch, lr, lr, 3)))
    f_d = float(graph_flops(D, (batch, patch, patch, 3)))  # per B images; D runs on 2B
    f_v = float(graph_flops(vgg, (batch, patch, patch, 3))) if vgg is not None else 0.0
    return {
        "forward_G": f_g,
        "forward_D": f_d,
        "forward_VGG": f_v,
        "g_pretrain": 3 * f_g,
        "d_step": f_g + 3 * 2 * f_d,
        "srgan": 3 * f_g + 3 * 2 * f_d + 1 * f_d + 2 * f_v + f_v,
    }


def target_flops(cfg: Config) -> dict[str, float]:
    """Step FLOPs of the issue's target config (16x64 G, paper D, batch 16, HR 96), for reachability."""
    from . import losses, models

    t = TARGET_CONFIG
    tcfg = config.replace(cfg, TARGET_OVERRIDES)
    G = models.build_generator(tcfg.model.generator, cfg.preprocess.scale)
    D = models.build_discriminator(tcfg.model.discriminator, t["patch"])
    vgg = losses.build_vgg_extractor(cfg.vgg, cfg.seed) if cfg.loss.w_vgg > 0 else None
    return step_flops(G, D, vgg, t["batch"], t["patch"], cfg.preprocess.scale)


def memory_batch(cfg: Config) -> tuple[Any, Any]:
    """A seeded (lr, hr) batch already in memory: HR noise and its 4x4 box-filtered LR."""
    import tensorflow as tf

    t, s = cfg.train, cfg.preprocess.scale
    hr = tf.random.stateless_uniform((t.batch_size, t.hr_patch, t.hr_patch, 3), (cfg.seed, 7))
    lr = tf.nn.avg_pool2d(hr, s, s, "VALID")
    return lr, hr


class BenchSteps:
    """The trainer's own public steps of both phases (what users run), built for timing."""

    def __init__(self, cfg: Config):
        from .trainer import Trainer, prepare_runtime

        prepare_runtime(cfg)
        pre, gan = Trainer(cfg, "pretrain"), Trainer(cfg, "gan")
        self.cfg, self.strategy = cfg, gan.strategy
        self.G, self.D, self.vgg = gan.G, gan.D, gan.vgg
        self.steps = {"g_pretrain": pre.pretrain_step, "d_step": gan.d_step, "srgan": gan.gan_step}


# =========================================================================== child jobs
def _run_steps(trainer: Any, names: Sequence[str], timing: dict[str, Any]) -> dict[str, Any]:
    """Time each named step of ``trainer`` on an in-memory batch."""
    cfg = trainer.cfg
    B, p, s = cfg.train.batch_size, cfg.train.hr_patch, cfg.preprocess.scale
    flops = step_flops(trainer.G, trainer.D, trainer.vgg, B, p, s)
    batch = memory_batch(cfg)
    steps = {}
    for name in names:
        fn = trainer.steps[name]
        with CpuMeter() as meter:
            r = time_calls(lambda fn=fn: fn(batch), **timing)
        r["steps_per_s"] = rate(r["seconds"])
        r["hr_mpix_per_s"] = rate(r["seconds"], B * p * p / 1e6)
        r["flops_per_step"] = flops[name]
        r["flop_per_s"] = flops[name] / r["seconds"]["median"]
        r["cpu"] = meter.result
        steps[name] = r
    return {"flops": flops, "steps": steps}


def child_steps(spec: dict[str, Any]) -> dict[str, Any]:
    """Time the training steps of one variant, plus the matmul limit in the same process.

    With ``spec['pipeline']`` the input-pipeline section runs afterwards in the same process
    (same environment, the G step already compiled: saves a TF start-up on a slow machine).
    """
    _set_threads(spec.get("threads"))
    cfg = config.from_dict(spec["cfg"])
    out: dict[str, Any] = {"tf": _tf_info()}
    mm = [matmul_flops(spec["matmul_n"], spec["matmul_repeats"])]
    if spec.get("target_flops"):
        out["target_flops"] = target_flops(cfg)
    trainer = BenchSteps(cfg)
    try:
        out.update(_run_steps(trainer, spec["steps"], spec["timing"]))
    except Exception as exc:  # only the known XLA gap is retried, the rest re-raised
        msg = str(exc)
        if not (cfg.train.jit_compile and cfg.model.generator.bicubic_skip and "ResizeBicubic" in msg):
            raise
        # ResizeBicubic has no XLA kernel: the bicubic skip cannot be XLA-compiled. Measure XLA on
        # the same generator without the skip (a negligible 3-channel resize) and say so.
        out["fallback"] = {
            "error": msg.split("\n")[0][:300],
            "changed": "model.generator.bicubic_skip=false (ResizeBicubic has no XLA kernel)",
        }
        cfg = config.replace(cfg, {"model.generator.bicubic_skip": False})
        trainer = BenchSteps(cfg)
        out.update(_run_steps(trainer, spec["steps"], spec["timing"]))
    # matmul again after the steps: contention drifts, so the limit is taken over both samples
    mm.append(matmul_flops(spec["matmul_n"], spec["matmul_repeats"]))
    out["matmul"] = {"runs": mm, "flop_per_s": max(m["flop_per_s"] for m in mm)}
    if spec.get("pipeline"):
        try:
            out["pipeline"] = pipeline_section(trainer, spec["pipeline"])
        except Exception as exc:  # noqa: BLE001 - keep the step figures; report the pipeline error
            out["pipeline"] = {"error": f"pipeline: {type(exc).__name__}: {exc}"}
    return out


def pipeline_section(trainer: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Input pipeline alone (crops/s), then G pretrain steps fed by it vs by an in-memory batch."""
    import psutil

    from .pipeline import train_dataset

    cfg = trainer.cfg
    t, s = cfg.train, cfg.preprocess.scale
    shard_dir = Path(spec["shard_dir"])
    out: dict[str, Any] = {"shard_dir": str(shard_dir)}

    # -- pipeline alone: batches pulled as fast as it makes them
    it = iter(train_dataset(shard_dir, t.batch_size, t.hr_patch, s, cfg.seed))
    t0 = time.perf_counter()
    next(it)
    out["first_batch_s"] = time.perf_counter() - t0
    for _ in range(spec["pipe_warmup"]):
        next(it)
    per_crop = []
    with CpuMeter() as meter:
        for _ in range(spec["pipe_chunks"]):
            t0 = time.perf_counter()
            for _ in range(spec["pipe_chunk"]):
                next(it)
            per_crop.append((time.perf_counter() - t0) / (spec["pipe_chunk"] * t.batch_size))
    out["crop_seconds"] = stats(per_crop)
    out["crops_per_s"] = rate(out["crop_seconds"])
    out["cpu_alone"] = meter.result
    # CPU time the pipeline costs per batch: what it takes away from a step on shared cores
    n_batches = spec["pipe_chunks"] * spec["pipe_chunk"]
    out["cpu_s_per_batch"] = meter.result["own_cores"] * meter.result["wall_s"] / n_batches
    del it

    # -- feeding: the same compiled G step, data from the pipeline vs one batch kept in memory.
    ds = train_dataset(shard_dir, t.batch_size, t.hr_patch, s, cfg.seed)
    it = iter(trainer.strategy.experimental_distribute_dataset(ds))  # as trainer.train feeds it
    mem = next(it)
    t0 = time.perf_counter()
    for _ in range(spec["warmup"]):
        _sync(trainer.steps["g_pretrain"](mem))
        _sync(trainer.steps["g_pretrain"](next(it)))
    # Steps per round: enough for ~round_s seconds, so that a fast step is not timed over a few
    # milliseconds of noise and a slow one does not take minutes.
    step_s = (time.perf_counter() - t0) / (2 * spec["warmup"])
    k = int(min(max(round(spec["round_s"] / step_s), spec["min_steps"]), 25))
    mem_t: list[float] = []
    pipe_t: list[float] = []
    wait_t: list[float] = []
    mem_cpu: list[float] = []
    proc = psutil.Process()

    def cpu_s() -> float:
        c = proc.cpu_times()
        return c.user + c.system

    def from_memory() -> None:
        t0, c0 = time.perf_counter(), cpu_s()
        for _ in range(k):
            _sync(trainer.steps["g_pretrain"](mem))
        mem_t.append((time.perf_counter() - t0) / k)
        mem_cpu.append((cpu_s() - c0) / k)

    def from_pipeline() -> None:
        t0, wait = time.perf_counter(), 0.0
        for _ in range(k):
            tw = time.perf_counter()
            b = next(it)
            wait += time.perf_counter() - tw
            _sync(trainer.steps["g_pretrain"](b))
        pipe_t.append((time.perf_counter() - t0) / k)
        wait_t.append(wait / k)

    with CpuMeter() as meter:
        # ABBA order, so load from other processes that drifts during the rounds hits both alike
        for r in range(spec["feed_rounds"]):
            for feed in (from_memory, from_pipeline) if r % 2 == 0 else (from_pipeline, from_memory):
                feed()
    out["feed"] = {
        "step": "g_pretrain",
        "steps_per_round": k,
        "rounds": spec["feed_rounds"],
        "memory_seconds": stats(mem_t),
        "pipeline_seconds": stats(pipe_t),
        "wait_seconds": stats(wait_t),
        "ratio": sum(pipe_t) / sum(mem_t),  # total time over all rounds: the throughput ratio
        "cpu": meter.result,
        "step_cpu_s": stats(mem_cpu),
    }
    # If the step keeps every core busy, the pipeline's CPU time adds to it: ratio = 1 + cpu ratio.
    # An upper bound from CPU accounting, free of the other processes' noise in the timed ratio.
    out["feed"]["ratio_cpu_bound"] = 1.0 + out["cpu_s_per_batch"] / out["feed"]["step_cpu_s"]["median"]
    return out


class RssSampler:
    """Peak resident set size of this process, sampled in a thread (TF allocates outside Python)."""

    def __init__(self, period_s: float = 0.005):
        import psutil

        self._proc, self._period = psutil.Process(), period_s
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._period)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def child_upscale(spec: dict[str, Any]) -> dict[str, Any]:
    """Tiled upscaling of one LR size: time and peak RSS of this fresh process."""
    _set_threads(spec.get("threads"))
    import psutil

    from . import inference, models

    cfg = config.from_dict(spec["cfg"])
    scale, tile, overlap = cfg.preprocess.scale, spec["tile"], spec["overlap"]
    G = models.build_generator(cfg.model.generator, scale)
    h, w = spec["lr_hw"]
    rng = np.random.default_rng(cfg.seed)
    lr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    windows = inference.plan_windows(h, w, tile, overlap) if tile > 0 else []
    win = (windows[0].h, windows[0].w) if windows else (h, w)
    gc.collect()
    base = psutil.Process().memory_info().rss
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    with RssSampler() as sampler, CpuMeter() as meter:
        # Warm-up: one window through the same cached tf.function upscale() uses for tiles, so
        # tracing stays out of the timed call, at the same cost for every image size.
        if len(windows) > 1:
            inference._predict_fn(G)(np.zeros((1, *win, 3), np.float32)).numpy()
        else:  # a single-window plan runs eagerly: warm up on the image itself
            inference.upscale(G, lr, scale, tile=tile, overlap=overlap)
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            sr = inference.upscale(G, lr, scale, tile=tile, overlap=overlap)
            times.append(time.perf_counter() - t0)
    assert sr.shape == (h * scale, w * scale, 3)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sec = stats(times)
    hr_mp = h * w * scale * scale / 1e6
    n_win = max(len(windows), 1)
    f_win = float(models.generator_flops(G, (1, *win, 3)))
    mb = 2**20
    return {
        "tf": _tf_info(),
        "lr_hw": [h, w],
        "hr_mpix": hr_mp,
        "tile": tile,
        "overlap": overlap,
        "windows": n_win,
        "window_hw": list(win),
        "seconds": sec,
        "hr_mpix_per_s": rate(sec, hr_mp),
        "flop_per_s": n_win * f_win / sec["median"],
        "rss_base_mb": base / mb,
        "rss_peak_mb": sampler.peak / mb,
        "rss_peak_delta_mb": (sampler.peak - base) / mb,
        "ru_maxrss_mb": maxrss / mb,
        "ru_maxrss_delta_mb": max(maxrss - max(maxrss0, base), 0) / mb,
        "cpu": meter.result,
    }


def child_quality(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the small config for a tiny budget in one precision; validation PSNR-Y/SSIM-Y."""
    _set_threads(spec.get("threads"))
    from .trainer import TrainData, summarize, train

    cfg = config.from_dict(spec["cfg"])
    data = TrainData.load(Path(spec["processed_dir"]), cfg.train.val_images)
    t0 = time.perf_counter()
    pre, _ = train(cfg, "pretrain", data)
    with tempfile.TemporaryDirectory() as tmp:
        srresnet = pre.export_generator(Path(tmp) / "srresnet.keras")
        _, result = train(cfg, "gan", data, init_generator=srresnet, data_offset=cfg.pretrain.steps)
    return {
        "precision": cfg.train.precision,
        "steps": cfg.pretrain.steps + result.step,
        "seconds": time.perf_counter() - t0,
        "val": result.val,
        "bicubic": data.baseline(cfg.preprocess.scale),
        "final_logs": summarize(result.history),
        "val_images": len(data.valid),
    }


def quality_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One precision's quality runs (one per seed): the runs, PSNR-Y/SSIM-Y means and spread."""
    bad = [r for r in runs if "error" in r]
    if bad:
        return {"error": bad[0]["error"], "runs": runs}
    out: dict[str, Any] = {
        "runs": runs,
        "seconds": sum(r["seconds"] for r in runs),
        "steps": runs[0]["steps"],
    }
    for key in ("psnr_y", "ssim_y"):
        vals = [r["val"][f"val_{key}"] for r in runs]
        out[key] = {"mean": float(np.mean(vals)), **stats(vals)}
    out["bicubic_psnr_y"] = runs[0]["bicubic"]["bicubic_psnr_y"]
    return out


def child_pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    """The input-pipeline section on its own (when its variant's steps are not timed)."""
    _set_threads(spec.get("threads"))
    trainer = BenchSteps(config.from_dict(spec["cfg"]))
    return {"tf": _tf_info(), **pipeline_section(trainer, spec["pipeline"])}


CHILD_JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "steps": child_steps,
    "pipeline": child_pipeline,
    "upscale": child_upscale,
    "quality": child_quality,
}


def child_main() -> int:
    """Entry of a child process: spec JSON on stdin, one tagged result line on stdout."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    spec = json.loads(sys.stdin.read())
    result = CHILD_JOBS[spec["job"]](spec)
    print(RESULT_TAG + json.dumps(finite_or_none(result)), flush=True)
    return 0


# =========================================================================== parent
@dataclass
class Variant:
    """One compiled variant: its config, extra environment, thread pools and the steps it times."""

    name: str
    steps: tuple[str, ...]
    cfg: Config
    env: dict[str, str]
    threads: list[int] | None


def parse_variant(text: str, cfg: Config) -> Variant:
    """``atoms[:step/step]``, e.g. ``onednn+xla`` or ``bf16:g_pretrain``."""
    name, _, step_text = text.strip().partition(":")
    atoms = [a for a in name.split("+") if a]
    bad = [a for a in atoms if a not in VARIANT_ATOMS]
    if bad or not atoms:
        raise ValueError(
            f"--variants: unknown variant {name!r}; atoms: {', '.join(VARIANT_ATOMS)} (join with +)"
        )
    steps = tuple(x for x in step_text.split("/") if x) or STEPS
    bad = [x for x in steps if x not in STEPS]
    if bad:
        raise ValueError(
            f"--variants: unknown step {bad[0]!r} in {text!r}; steps: {', '.join(STEPS)} (join with /)"
        )
    overrides: dict[str, Any] = {}
    env: dict[str, str] = {}
    threads = None
    if "xla" in atoms:
        overrides["train.jit_compile"] = True
    if "bf16" in atoms:
        overrides["train.precision"] = "mixed_bfloat16"
    if "onednn" in atoms:
        env["TF_ENABLE_ONEDNN_OPTS"] = "1"
    if "inter1" in atoms:
        threads = [0, 1]  # intra 0 = TF's default (one thread per core)
    return Variant(name, steps, config.replace(cfg, overrides) if overrides else cfg, env, threads)


def spawn(
    job: str, spec: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 1800
) -> dict[str, Any]:
    """Run one child job in a fresh interpreter; its result dict, or {'error': ...} if it failed."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(SRC_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "srgan.bench", "--child"],
            input=json.dumps({**spec, "job": job}),
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            cwd=str(ROOT),
        )
    except subprocess.TimeoutExpired:
        return {"error": f"{job}: timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG) :])
            res["process_s"] = time.perf_counter() - t0
            return res
    err = proc.stderr.strip().splitlines()
    # the exception line(s) are the useful part of a child's traceback
    key = [ln for ln in err if "Error" in ln or "error" in ln][-3:]
    return {"error": f"{job}: exit code {proc.returncode}: " + " | ".join(key or err[-3:])}


def bench_config(args: argparse.Namespace) -> Config:
    """params.yaml with the CLI's model/batch overrides; single device (benchmarks one CPU)."""
    overrides: dict[str, Any] = {
        "train.distribute": "none",
        **(TARGET_OVERRIDES if args.target_config else {}),
    }
    for flag, key in (
        ("blocks", "model.generator.blocks"),
        ("filters", "model.generator.filters"),
        ("batch", "train.batch_size"),
        ("patch", "train.hr_patch"),
    ):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    return config.load(args.params, overrides)


def usable_processed(processed: Path, cfg: Config) -> bool:
    """A finished preprocess output (manifest written last) whose crops fit this config."""
    manifest = read_json(processed / "manifest.json") if (processed / "manifest.json").is_file() else None
    if not isinstance(manifest, dict) or not list((processed / "train").glob("*.tfrecord")):
        return False
    if not list((processed / "valid" / "hr").glob("*.png")):
        return False
    pre = manifest.get("config", {}).get("preprocess", {})
    return (
        pre.get("scale", cfg.preprocess.scale) == cfg.preprocess.scale
        and pre.get("hr_crop", cfg.train.hr_patch) >= cfg.train.hr_patch
    )


def build_sample_set(cfg: Config, out: Path, quick: bool) -> Path:
    """A small processed set from scikit-image's sample photos (data.source=sample) in ``out``."""
    from .preprocess import preprocess
    from .sources import SAMPLE_TRAIN, SAMPLE_VALID, sample_dir

    src = sample_dir()
    raw = out / "raw"
    for split, names in (("train", SAMPLE_TRAIN[:3] if quick else SAMPLE_TRAIN), ("valid", SAMPLE_VALID)):
        (raw / split).mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copy2(src / n, raw / split / n)
    # 128-px crops are plenty for patch <= 128 and keep the build to a few seconds
    pcfg = config.replace(
        cfg,
        {
            "preprocess.workers": 1,
            "preprocess.hr_crop": max(cfg.train.hr_patch, min(cfg.preprocess.hr_crop, 128)),
        },
    )
    preprocess(pcfg, raw, out / "processed", workers=1, progress=False)
    return out / "processed"


@contextmanager
def processed_data(
    processed: Path, cfg: Config, quick: bool, needed: bool
) -> Iterator[tuple[Path | None, str]]:
    """``processed`` if usable, else a temporary sample set (removed afterwards)."""
    if not needed:
        yield None, ""
    elif usable_processed(processed, cfg):
        yield processed, str(processed.relative_to(ROOT) if processed.is_relative_to(ROOT) else processed)
    else:
        with tempfile.TemporaryDirectory(prefix="srgan-bench-") as tmp:
            _log(f"no usable processed data in {processed}: building a small set from the sample photos")
            yield (
                build_sample_set(cfg, Path(tmp), quick),
                "temporary set built from the scikit-image sample photos",
            )


def upscale_size(quick: bool, tile: int, overlap: int) -> tuple[int, int]:
    """Default small LR size (h, w): DIV2K's, or for --quick the smallest with full-size tile windows.

    Below one window (tile + 2 overlap) per side the windows shrink to the image, so the small and
    the large image would run different window shapes and their memory would not compare.
    """
    if not quick:
        return UPSCALE_LR
    side = tile + 2 * overlap + 1 if tile > 0 else 128
    return side, side


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the requested sections in child processes; the report dict."""
    t_start = time.perf_counter()
    cfg = bench_config(args)
    quick, sections = args.quick, args.sections
    timing = {
        "warmup": args.warmup if args.warmup is not None else (1 if quick else 2),
        "repeats": args.repeats if args.repeats is not None else (1 if quick else 3),
        "budget_s": args.step_budget if args.step_budget is not None else (5.0 if quick else 15.0),
        "min_repeats": 1 if quick else 2,
    }
    timing["min_repeats"] = min(timing["min_repeats"], timing["repeats"])
    texts = [
        v for v in (args.variants or (QUICK_VARIANTS if quick else DEFAULT_VARIANTS)).split(",") if v.strip()
    ]
    variants = [parse_variant(v, cfg) for v in texts]  # validates names before any work
    if len({v.name for v in variants}) != len(variants):
        raise ValueError(f"--variants: a variant is listed twice in {args.variants!r}")
    base = parse_variant(args.base_variant, cfg)
    parse_variant(args.upscale_variant, cfg)  # fail before any work
    threads = [int(x) for x in args.threads.split(",")] if args.threads else None
    ev, t = cfg.evaluate, cfg.train
    report: dict[str, Any] = {
        "schema": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["bench.py", *(args.argv or [])]),
        "machine": machine_info(),
        "config": {
            "blocks": cfg.model.generator.blocks,
            "filters": cfg.model.generator.filters,
            "batch_norm": cfg.model.generator.batch_norm,
            "bicubic_skip": cfg.model.generator.bicubic_skip,
            "upsampler": cfg.model.generator.upsampler,
            "batch": t.batch_size,
            "hr_patch": t.hr_patch,
            "scale": cfg.preprocess.scale,
            "discriminator": cfg.to_dict()["model"]["discriminator"],
            "vgg_layer": cfg.vgg.layer,
            "w_vgg": cfg.loss.w_vgg,
            "adv_loss": cfg.adv.loss,
            "jit_compile": t.jit_compile,
            "precision": t.precision,
            "tile": ev.tile,
            "tile_overlap": ev.tile_overlap,
        },
        "settings": {
            "quick": quick,
            **timing,
            "variants": texts,
            "base_variant": base.name,
            "upscale_variant": args.upscale_variant,
            "threads": threads,
            "sections": sorted(sections),
        },
        "flop_convention": __doc__.split("FLOP convention. ")[1].split("\n\n")[0].replace("\n", " "),
        "targets": {"config": TARGET_CONFIG, **TARGETS},
        "is_target_config": None,
    }

    def thr(v: Variant) -> list[int] | None:
        return v.threads or threads

    need_data = bool({"pipeline", "quality"} & sections)
    with processed_data(args.processed, cfg, quick, need_data) as (processed, source):
        pipe_spec = None
        if "pipeline" in sections:
            pipe_spec = {
                "shard_dir": str(processed / "train"),
                "warmup": timing["warmup"],
                "pipe_warmup": 3,
                "pipe_chunk": 5 if quick else 10,
                "pipe_chunks": 3 if quick else 7,
                "round_s": 0.5 if quick else 2.5,
                "min_steps": 1 if quick else 2,
                "feed_rounds": 2 if quick else 4,
            }
        if "steps" in sections:
            report["variants"] = {}
            for i, v in enumerate(variants):
                _log(f"steps: variant {v.name} ({i + 1}/{len(variants)}): {', '.join(v.steps)}")
                spec = {
                    "cfg": v.cfg.to_dict(),
                    "steps": list(v.steps),
                    "timing": timing,
                    "threads": thr(v),
                    "matmul_n": args.matmul_n,
                    "matmul_repeats": 3,
                    "target_flops": i == 0,
                }
                # the pipeline section rides along in the base variant's process (one TF start-up less)
                if pipe_spec and v.name == base.name and "pipeline" not in report:
                    spec["pipeline"] = pipe_spec
                res = spawn("steps", spec, v.env)
                if "pipeline" in res:
                    report["pipeline"] = {"source": source, "variant": v.name, **res.pop("pipeline")}
                report["variants"][v.name] = {"steps_requested": list(v.steps), "env": v.env, **res}
        if pipe_spec and "pipeline" not in report:
            _log(f"pipeline: variant {base.name}")
            res = spawn(
                "pipeline", {"cfg": base.cfg.to_dict(), "pipeline": pipe_spec, "threads": thr(base)}, base.env
            )
            report["pipeline"] = {"source": source, "variant": base.name, **res}
        if "quality" in sections:
            report["quality"] = {
                "data": source,
                "variant": base.name,
                "config": {
                    "blocks": args.quality_blocks,
                    "filters": cfg.model.generator.filters,
                    "batch": args.quality_batch,
                    "patch": args.quality_patch,
                    "steps": [args.quality_steps, args.quality_gan_steps],
                    "seeds": args.quality_seeds,
                },
            }
            qover = {
                "model.generator.blocks": args.quality_blocks,
                "train.batch_size": args.quality_batch,
                "train.hr_patch": args.quality_patch,
                "pretrain.steps": args.quality_steps,
                "gan.steps": max(args.quality_gan_steps, 1),
                "train.val_images": 0,
                "train.log_every": max(args.quality_steps, 1),
                "train.val_every": 10**9,
                "train.checkpoint_every": 10**9,
            }
            for prec in ("float32", "mixed_bfloat16"):
                runs = []
                for k in range(args.quality_seeds):
                    seed = cfg.seed + k
                    _log(f"quality: {prec}, seed {seed}, {args.quality_steps}+{args.quality_gan_steps} steps")
                    qcfg = config.replace(base.cfg, {**qover, "train.precision": prec, "seed": seed})
                    spec = {"cfg": qcfg.to_dict(), "processed_dir": str(processed), "threads": thr(base)}
                    runs.append({"seed": seed, **spawn("quality", spec, base.env)})
                report["quality"][prec] = quality_summary(runs)

    if "upscale" in sections:
        h, w = args.upscale_lr or upscale_size(quick, ev.tile, ev.tile_overlap)
        up = parse_variant(args.upscale_variant, cfg)
        report["upscale"] = {"variant": up.name}
        for name, hw in (("small", (h, w)), ("large", (2 * h, 2 * w))):  # 4x the pixels
            _log(f"upscale: {name} LR {hw[1]}x{hw[0]} (fresh process, variant {up.name})")
            spec = {
                "cfg": up.cfg.to_dict(),
                "lr_hw": list(hw),
                "tile": ev.tile,
                "overlap": ev.tile_overlap,
                "repeats": 1,
                "threads": thr(up),
            }
            report["upscale"][name] = spawn("upscale", spec, up.env)

    report["is_target_config"] = is_target_config(report["config"])
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    report["summary"] = summarize_report(report)
    report["seconds"] = time.perf_counter() - t_start
    return report


# =========================================================================== summary
def _ok(res: Any) -> bool:
    return isinstance(res, dict) and "error" not in res


def _timed(variants: dict[str, Any], step: str, f32_only: bool = False) -> dict[str, float]:
    """variant -> median steps/s, over the variants that timed ``step``."""
    return {
        v: r["steps"][step]["steps_per_s"]["median"]
        for v, r in variants.items()
        if step in r.get("steps", {}) and not (f32_only and "bf16" in v)
    }


def quality_comparison(q: dict[str, Any]) -> dict[str, Any]:
    """bf16 vs float32 from the two quality_summary() results: mean delta, paired deltas, seed spread."""
    out: dict[str, Any] = {}
    if not (_ok(q.get("float32")) and _ok(q.get("mixed_bfloat16"))):
        return out
    a, b = q["float32"]["psnr_y"], q["mixed_bfloat16"]["psnr_y"]
    out["quality_psnr_y_bf16_minus_f32"] = b["mean"] - a["mean"]
    runs_a, runs_b = q["float32"]["runs"], q["mixed_bfloat16"]["runs"]
    if [r["seed"] for r in runs_a] == [r["seed"] for r in runs_b]:  # same seeds: paired differences
        out["quality_paired_deltas_db"] = [
            rb["val"]["val_psnr_y"] - ra["val"]["val_psnr_y"] for ra, rb in zip(runs_a, runs_b)
        ]
    if a["n"] > 1:
        # equal = the precision changes PSNR-Y by less than changing the seed does
        spread = max(a["max"] - a["min"], b["max"] - b["min"])
        out["quality_seed_spread_db"] = spread
        out["quality_equal_within_seed_spread"] = abs(b["mean"] - a["mean"]) <= spread
    return out


def summarize_report(report: dict[str, Any]) -> dict[str, Any]:
    """Machine limit, fastest variants, upscale memory ratio, quality delta and the issue's targets."""
    out: dict[str, Any] = {"errors": {}}
    variants = report.get("variants") or {}
    for v, r in variants.items():
        if not _ok(r):
            out["errors"][f"variant {v}"] = r.get("error")
    pipe = report.get("pipeline")
    if pipe is not None and not _ok(pipe):
        out["errors"]["pipeline"] = pipe.get("error")
    for sec in ("upscale", "quality"):
        for k, r in (report.get(sec) or {}).items():
            if isinstance(r, dict) and not _ok(r):
                out["errors"][f"{sec} {k}"] = r.get("error")

    good = {v: r for v, r in variants.items() if _ok(r)}
    if good:
        mm = {v: r["matmul"]["flop_per_s"] for v, r in good.items()}
        limit_v = max(mm, key=mm.get)
        out["matmul_flop_per_s"], out["matmul_variant"] = mm[limit_v], limit_v
        out["fastest"] = {}
        for s in STEPS:
            sp = _timed(good, s)
            if sp:
                out["fastest"][s] = max(sp, key=sp.get)
        g = {v: r for v, r in good.items() if "g_pretrain" in r["steps"]}
        out["g_frac_matmul"] = {v: r["steps"]["g_pretrain"]["flop_per_s"] / mm[limit_v] for v, r in g.items()}
        out["g_frac_same_process_matmul"] = {
            v: r["steps"]["g_pretrain"]["flop_per_s"] / r["matmul"]["flop_per_s"] for v, r in g.items()
        }

    up = report.get("upscale") or {}
    if _ok(up.get("small")) and _ok(up.get("large")):
        s, lg = up["small"], up["large"]
        out["upscale_mem_ratio"] = lg["rss_peak_delta_mb"] / max(s["rss_peak_delta_mb"], 1e-9)
        out["upscale_mem_ratio_absolute"] = lg["rss_peak_mb"] / s["rss_peak_mb"]
        # tiles of one shape only when both images are at least one window big
        out["upscale_comparable"] = s["window_hw"] == lg["window_hw"] and s["windows"] > 1

    out.update(quality_comparison(report.get("quality") or {}))
    out["targets"] = targets(report, out)
    return out


def is_target_config(c: dict[str, Any]) -> bool:
    """Whether a report's config is the issue's target setting."""
    t = TARGET_CONFIG
    return (
        c["blocks"],
        c["filters"],
        c.get("upsampler", "paper"),  # reports written before the param existed used the paper's
        c["batch"],
        c["hr_patch"],
        c["discriminator"]["filters"],
        c["discriminator"]["dense"],
    ) == (t["blocks"], t["filters"], t["upsampler"], t["batch"], t["patch"], t["d_filters"], t["d_dense"])


def targets(report: dict[str, Any], summ: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue: measured value, pass/fail, and whether FLOP arithmetic allows it."""
    c = report["config"]
    same = is_target_config(c)
    note = (
        ""
        if same
        else (
            f"measured on the configured {c['blocks']}x{c['filters']} G, batch {c['batch']}, "
            f"HR {c['hr_patch']}, not the target config (--target-config)"
        )
    )
    variants = {v: r for v, r in (report.get("variants") or {}).items() if _ok(r)}
    limit = summ.get("matmul_flop_per_s")
    nominal = report["machine"]["cpu"].get("nominal_peak_gflops")
    tflops = next((r["target_flops"] for r in variants.values() if r.get("target_flops")), None)
    rows: list[dict[str, Any]] = []

    step_targets = (
        ("g_pretrain", "g_pretrain_steps_per_s", "G pretrain steps/s (float32)", True),
        ("srgan", "srgan_steps_per_s", "full SRGAN steps/s", False),
    )
    for step, key, label, f32 in step_targets if variants else ():
        goal = TARGETS[key]
        sp = _timed(variants, step, f32_only=f32)
        v = max(sp, key=sp.get) if sp else None
        # pass/fail only where the measured config is the target's; else an estimate below
        row: dict[str, Any] = {
            "target": label,
            "goal": f">= {goal}",
            "measured": sp.get(v),
            "variant": v,
            "pass": None if v is None or not same else sp[v] >= goal,
            "note": note,
        }
        if tflops and limit:
            need = goal * tflops[step]
            row.update(
                {
                    "target_flops_per_step": tflops[step],
                    "needs_flop_per_s": need,
                    "needs_x_matmul": need / limit,
                    "reachable": need <= limit,
                    "needs_x_nominal_peak": need / (nominal * 1e9) if nominal else None,
                }
            )
            if v is not None and not same:
                # what the same achieved FLOP/s would give on the target config (an estimate)
                est = variants[v]["steps"][step]["flop_per_s"] / tflops[step]
                row["estimate_at_target_config"] = est
                row["estimate_pass"] = est >= goal
        rows.append(row)
    fr = summ.get("g_frac_matmul") or {}
    fr = {v: x for v, x in fr.items() if "bf16" not in v}
    if fr:
        v = max(fr, key=fr.get)
        rows.append(
            {
                "target": "G step FLOP/s / matmul FLOP/s",
                "goal": f">= {TARGETS['g_frac_matmul']}",
                "measured": fr[v],
                "variant": v,
                "pass": fr[v] >= TARGETS["g_frac_matmul"],
                "note": note + ("; " if note else "") + f"same-process matmul: "
                f"{summ['g_frac_same_process_matmul'][v]:.2f}",
                "reachable": None,
            }
        )
    if "upscale_mem_ratio" in summ:
        r = summ["upscale_mem_ratio"]
        rows.append(
            {
                "target": "upscale peak memory 4x image / 1x",
                "goal": f"<= {TARGETS['upscale_mem_ratio']}",
                "measured": r,
                "variant": (report.get("upscale") or {}).get("variant"),
                "pass": r <= TARGETS["upscale_mem_ratio"] if summ["upscale_comparable"] else None,
                "reachable": True,
                "note": "RSS above the process baseline"
                + (
                    ""
                    if summ["upscale_comparable"]
                    else "; NOT comparable: window shapes differ (an image smaller than one tile window)"
                ),
            }
        )
    pipe = report.get("pipeline")
    if _ok(pipe):
        r = pipe["feed"]["ratio"]
        rows.append(
            {
                "target": "G step fed by pipeline / in memory",
                "goal": f"<= {TARGETS['feed_ratio']}",
                "measured": r,
                "variant": pipe.get("variant"),
                "pass": r <= TARGETS["feed_ratio"],
                "note": "",
                "reachable": True,
            }
        )
    return rows


# =========================================================================== table
def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "-" if not isinstance(x, (int, float)) or not math.isfinite(x) else fmt.format(x)


def _first_line(err: str | None) -> str:
    return (err or "missing").splitlines()[0][:200]


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table printed by ``make bench``."""
    m, c, summ, st = report["machine"], report["config"], report["summary"], report["settings"]
    cpu = m["cpu"]
    flags = "+".join(k for k, v in cpu["flags"].items() if v) or "none"
    load0, load1 = m["loadavg_start"][0], (m.get("loadavg_end") or [None])[0]
    on_off = {True: "on", False: "off"}
    d = c["discriminator"]
    lines = [
        f"Machine: {cpu['model']} (family {cpu['family']}, model {cpu['model_id']}), {cpu['cores']} cores"
        f"{' (KVM guest)' if cpu['hypervisor'] else ''}, {m['memory_gb']:.0f} GB; {flags}; "
        f"native bf16: {'yes' if cpu['native_bf16'] else 'no'}",
        f"Software: Python {m['python']}, TensorFlow {m['tensorflow']}, Keras {m['keras']}; load average "
        f"{_f(load0, '{:.1f}')} at start, {_f(load1, '{:.1f}')} at end",
        f"Config: G {c['blocks']} blocks x {c['filters']} filters (BN {on_off[c['batch_norm']]}, "
        f"bicubic skip {on_off[c['bicubic_skip']]}), D {d['filters']} filters / dense {d['dense']}, "
        f"batch {c['batch']}, HR {c['hr_patch']} (LR {c['hr_patch'] // c['scale']}), x{c['scale']}; "
        f"VGG {c['vgg_layer']}; adv {c['adv_loss']}"
        + (" = the target config" if report.get("is_target_config") else ""),
        f"Timing: median of up to {st['repeats']} calls (>= {st['min_repeats']}, ~{st['budget_s']:.0f} s "
        f"budget per step) after {st['warmup']} warm-up call(s), the first of which traces/compiles; [IQR]. "
        f"'others' = CPU cores busy with other processes meanwhile (of {cpu['cores']}).",
    ]
    variants = report.get("variants") or {}
    limit = summ.get("matmul_flop_per_s")
    if variants:
        lines += [
            "",
            "Training steps",
            f"{'variant':<15}{'step':<18}{'steps/s':>8} {'[IQR]':<16}{'n':>2}{'HR MP/s':>8}{'GFLOP/step':>11}"
            f"{'GFLOP/s':>8}{'%matmul':>8}{'1st call s':>11}{'others':>7}",
        ]
        for v, r in variants.items():
            if not _ok(r):
                lines.append(f"{v:<15}ERROR {_first_line(r.get('error'))}")
                continue
            label = v + ("*" if r.get("fallback") else "")
            for s in STEPS:
                if s not in r["steps"]:
                    continue
                x = r["steps"][s]
                sp = x["steps_per_s"]
                frac = x["flop_per_s"] / limit * 100 if limit else None
                gflop = x["flops_per_step"] / 1e9
                lines.append(
                    f"{label:<15}{STEP_LABELS[s]:<18}{sp['median']:>8.3f} "
                    f"{'[' + _f(sp['iqr_lo'], '{:.3f}') + '-' + _f(sp['iqr_hi'], '{:.3f}') + ']':<16}"
                    f"{x['seconds']['n']:>2}{x['hr_mpix_per_s']['median']:>8.2f}{gflop:>11.1f}"
                    f"{x['flop_per_s'] / 1e9:>8.1f}{_f(frac, '{:.0f}%'):>8}{x['first_call_s']:>11.1f}"
                    f"{x['cpu']['others_cores']:>7.2f}" + ("" if x["finite"] else "  NON-FINITE LOSS")
                )
            lines.append(
                f"{'':<15}matmul {r['matmul']['runs'][0]['n']}^2 f32 {r['matmul']['flop_per_s'] / 1e9:.1f} "
                f"GFLOP/s (best of 2 medians); oneDNN {'on' if r['tf'].get('onednn') else 'off'}"
                + (f"; env {r['env']}" if r.get("env") else "")
            )
            if r.get("fallback"):
                lines.append(f"{'':<15}* {r['fallback']['changed']}")
        if summ.get("fastest"):
            lines.append(
                "Fastest here: " + "; ".join(f"{STEP_LABELS[s]}: {v}" for s, v in summ["fastest"].items())
            )
        if limit:
            nom = cpu.get("nominal_peak_gflops")
            lines.append(
                f"Machine limit: TF float32 matmul {limit / 1e9:.1f} GFLOP/s (best median, variant "
                f"{summ['matmul_variant']})"
                + (f"; nominal peak {nom:.0f} GFLOP/s = {cpu['nominal_peak_note']}" if nom else "")
            )
    pipe = report.get("pipeline")
    if pipe is not None:
        lines += ["", f"Input pipeline ({pipe.get('source')}; variant {pipe.get('variant')})"]
        if _ok(pipe):
            cr, fd = pipe["crops_per_s"], pipe["feed"]
            lines.append(
                f"  alone: {cr['median']:.0f} crops/s [IQR {cr['iqr_lo']:.0f}-{cr['iqr_hi']:.0f}] "
                f"= {cr['median'] / c['batch']:.1f} batches/s; first batch {pipe['first_batch_s']:.2f} s; "
                f"others {pipe['cpu_alone']['others_cores']:.2f}"
            )
            lines.append(
                f"  CPU accounting: pipeline {pipe['cpu_s_per_batch'] * 1e3:.0f} ms/batch vs G step "
                f"{fd['step_cpu_s']['median'] * 1e3:.0f} ms/step -> ratio <= {fd['ratio_cpu_bound']:.3f} "
                f"when the step saturates every core"
            )
            lines.append(
                f"  G pretrain step fed by the pipeline / by a batch in memory: {fd['ratio']:.3f} "
                f"({fd['pipeline_seconds']['median']:.3f} vs {fd['memory_seconds']['median']:.3f} s/step, "
                f"{fd['rounds']} ABBA rounds of {fd['steps_per_round']}; waiting for data "
                f"{fd['wait_seconds']['median'] * 1e3:.1f} ms/step; others {fd['cpu']['others_cores']:.2f})"
            )
        else:
            lines.append("  ERROR " + _first_line(pipe.get("error")))
    up = report.get("upscale")
    if up:
        lines += [
            "",
            f"Whole-image upscaling through the tiled path (tile {c['tile']}, overlap {c['tile_overlap']}, "
            f"batch 1; fresh process per size; variant {up.get('variant')})",
            f"{'size':<7}{'LR':>10}{'HR MP':>7}{'windows':>8}{'s':>8}{'HR MP/s':>9}{'GFLOP/s':>9}"
            f"{'peak RSS MB':>12}{'above base':>11}{'others':>7}",
        ]
        for name in ("small", "large"):
            r = up.get(name)
            if r is None:
                continue
            if not _ok(r):
                lines.append(f"{name:<7}ERROR {_first_line(r.get('error'))}")
                continue
            h, w = r["lr_hw"]
            lines.append(
                f"{name:<7}{f'{w}x{h}':>10}{r['hr_mpix']:>7.2f}{r['windows']:>8}{r['seconds']['median']:>8.1f}"
                f"{r['hr_mpix_per_s']['median']:>9.3f}{r['flop_per_s'] / 1e9:>9.1f}{r['rss_peak_mb']:>12.0f}"
                f"{r['rss_peak_delta_mb']:>11.0f}{r['cpu']['others_cores']:>7.2f}"
            )
        if "upscale_mem_ratio" in summ:
            lines.append(
                f"  peak memory large/small: {summ['upscale_mem_ratio']:.2f} above the process baseline "
                f"(TF + model loaded), {summ['upscale_mem_ratio_absolute']:.2f} in absolute RSS"
                + ("" if summ["upscale_comparable"] else "; window shapes differ: not comparable")
            )
    q = report.get("quality")
    if q:
        qc = q.get("config", {})
        lines += [
            "",
            f"Quality: the same small config (G {qc.get('blocks')}x{qc.get('filters')}, batch "
            f"{qc.get('batch')}, HR {qc.get('patch')}) and seeds in both precisions ({q.get('data')}; "
            f"variant {q.get('variant')})",
        ]
        for prec in ("float32", "mixed_bfloat16"):
            r = q.get(prec)
            if not _ok(r):
                lines.append(f"  {prec}: ERROR {_first_line((r or {}).get('error'))}")
                continue
            p, ss = r["psnr_y"], r["ssim_y"]
            runs = r["runs"]
            lines.append(
                f"  {prec:<15} {r['steps']} steps x {p['n']} seed(s), {r['seconds']:.0f} s: val PSNR-Y "
                f"{p['mean']:.3f} dB [{p['min']:.3f}-{p['max']:.3f}], SSIM-Y {ss['mean']:.4f} "
                f"(bicubic {r['bicubic_psnr_y']:.3f} dB; {runs[0]['val_images']} images)"
            )
        if "quality_psnr_y_bf16_minus_f32" in summ:
            verdict = ""
            if "quality_equal_within_seed_spread" in summ:
                verdict = f"; seed-to-seed spread {summ['quality_seed_spread_db']:.3f} dB -> " + (
                    "equal within seed noise" if summ["quality_equal_within_seed_spread"] else "DIFFERENT"
                )
            paired = summ.get("quality_paired_deltas_db") or []
            per_seed = f" (per seed: {', '.join(f'{d:+.3f}' for d in paired)})" if len(paired) > 1 else ""
            lines.append(
                f"  mixed_bfloat16 - float32: {summ['quality_psnr_y_bf16_minus_f32']:+.3f} dB PSNR-Y"
                f"{per_seed}{verdict}"
            )
    rows = summ.get("targets") or []
    if rows:
        lines += [
            "",
            "Targets (issue: 2-core CPU, batch 16, HR 96, 16-block G; "
            "here 16x64 G with the paper upsampler, paper D)",
            f"{'target':<36}{'goal':>8}{'measured':>10}  {'result':<7}{'variant':<9}"
            "reachable? (FLOP arithmetic)",
        ]
        for r in rows:
            res = "-" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
            if "needs_flop_per_s" in r:
                nx = r.get("needs_x_nominal_peak")
                reach = (
                    f"{'yes' if r['reachable'] else 'NO'}: {r['target_flops_per_step'] / 1e9:.0f} GFLOP/step "
                    f"-> needs {r['needs_flop_per_s'] / 1e9:.0f} GFLOP/s = {r['needs_x_matmul']:.1f}x matmul"
                    + (f", {nx:.1f}x nominal peak" if nx else "")
                )
            else:
                reach = {True: "yes", False: "no", None: "-"}[r.get("reachable")]
            lines.append(
                f"{r['target']:<36}{r['goal']:>8}{_f(r['measured'], '{:.3f}'):>10}  {res:<7}"
                f"{str(r['variant']):<9}{reach}"
            )
            extra = [r["note"]] if r.get("note") else []
            if "estimate_at_target_config" in r:
                extra.append(
                    f"the same GFLOP/s on the target config would give ~{r['estimate_at_target_config']:.3f} "
                    f"steps/s: {'pass' if r['estimate_pass'] else 'fail'}"
                )
            if extra:
                lines.append(f"{'':<4}({'; '.join(extra)})")
    for k, e in summ.get("errors", {}).items():
        lines.append(f"ERROR {k}: {_first_line(e)}")
    lines.append(f"\nTotal {report['seconds']:.0f} s")
    return "\n".join(lines)


# =========================================================================== CLI
SECTIONS = ("steps", "pipeline", "upscale", "quality")


def _lr_size(text: str) -> tuple[int, int]:
    """'WxH' -> (h, w)."""
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 510x339, got {text!r}") from None
    if min(w, h) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return h, w


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench.py",
        description="Speed benchmark -> table on stdout and reports/bench.json",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--params", type=Path, default=config.PARAMS_PATH, help="params file (defaults)")
    ap.add_argument("--blocks", type=int, help="generator residual blocks (default: params)")
    ap.add_argument("--batch", type=int, help="global batch size (default: params)")
    ap.add_argument("--patch", type=int, help="HR patch side (default: params)")
    ap.add_argument("--filters", type=int, help="generator conv filters (default: params)")
    ap.add_argument(
        "--target-config",
        action="store_true",
        help="the issue's target setting: 16x64 generator (paper upsampler), paper discriminator "
        "(64 filters, dense 1024), batch 16, HR 96 (other model settings from params); --blocks etc. "
        "still override",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: variant {QUICK_VARIANTS}, 1 timed call, small images",
    )
    ap.add_argument(
        "--variants",
        help="comma list; each is atoms joined by + (plain|xla|bf16|onednn|inter1), "
        "optionally :steps joined by / (g_pretrain|d_step|srgan) "
        f"(default {DEFAULT_VARIANTS})",
    )
    ap.add_argument(
        "--base-variant", default=DEFAULT_BASE, help="variant of the pipeline and quality sections"
    )
    ap.add_argument("--upscale-variant", default=DEFAULT_UPSCALE, help="variant of the upscale section")
    ap.add_argument("--repeats", type=int, help="max timed calls per step (default 3, --quick 1)")
    ap.add_argument(
        "--warmup", type=int, help="untimed calls per step incl. the compiling one (default 2, --quick 1)"
    )
    ap.add_argument(
        "--step-budget",
        type=float,
        help="seconds of timed calls per step before stopping early (default 15, --quick 5)",
    )
    ap.add_argument("--threads", help="INTRA[,INTER] TF thread-pool sizes for every child (default: TF's)")
    ap.add_argument("--matmul-n", type=int, default=2048, help="side of the reference matmul")
    ap.add_argument(
        "--upscale-lr",
        type=_lr_size,
        help="small LR size WxH; the large one is 2x per side "
        "(default 510x339 = DIV2K valid LR; --quick one tile window + 1 px per side)",
    )
    ap.add_argument("--only", help=f"comma list of sections to run: {','.join(SECTIONS)}")
    ap.add_argument(
        "--quality", action="store_true", help="also train float32 and mixed_bfloat16, compare PSNR-Y"
    )
    ap.add_argument("--quality-steps", type=int, default=200, help="quality: phase-1 (MSE) steps")
    ap.add_argument("--quality-gan-steps", type=int, default=50, help="quality: phase-2 (adversarial) steps")
    ap.add_argument("--quality-blocks", type=int, default=2, help="quality: generator blocks")
    ap.add_argument("--quality-batch", type=int, default=8, help="quality: batch size")
    ap.add_argument("--quality-patch", type=int, default=32, help="quality: HR patch")
    ap.add_argument(
        "--quality-seeds", type=int, default=2, help="quality: seeds per precision (>= 2 measures seed noise)"
    )
    ap.add_argument(
        "--processed",
        type=Path,
        default=ROOT / "data/processed",
        help="processed data (else a temporary set is built from the sample photos)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "reports/bench.json", help="JSON report path")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.only:
        args.sections = {s.strip() for s in args.only.split(",") if s.strip()}
        bad = args.sections - set(SECTIONS)
        if bad or not args.sections:
            ap.error(f"--only: unknown section(s) {', '.join(sorted(bad))}; allowed: {', '.join(SECTIONS)}")
    else:
        args.sections = {"steps", "pipeline", "upscale"} | ({"quality"} if args.quality else set())
    for name in ("repeats", "warmup", "quality_steps", "quality_seeds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write the JSON report; returns the report."""
    args = parse_args(argv)
    report = run(args)
    print(format_report(report), flush=True)
    write_report(args.out, report)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        sys.exit(child_main())
    sys.exit(1 if main()["summary"]["errors"] else 0)
