"""Options and orchestration: each measurement in a child process, then the table and the report."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .. import config, quiet
from ..config import ROOT, Config
from ..dataio import read_manifest
from . import quality, steps, torch_peer
from .limits import MATMUL_N, cpu_info
from .report import format_report, ok, summarize, write_report

SRC_DIR = Path(__file__).resolve().parents[2]
SECTIONS = ("steps", "pipeline", "upscale", "torch", "quality")
# variant atom -> (config overrides, environment); a variant joins atoms with '+', e.g. onednn+bf16
ATOMS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "plain": ({}, {}),  # TF's defaults: oneDNN only on CPUs with AVX512-VNNI/BF16/AMX
    "onednn": ({}, {"TF_ENABLE_ONEDNN_OPTS": "1"}),
    "xla": ({"train.jit_compile": True}, {}),
    "bf16": ({"train.precision": "mixed_bfloat16"}, {}),
}
DEFAULT_VARIANTS, QUICK_VARIANTS = "plain,onednn,xla,onednn+bf16", "onednn"
BASE = "onednn"  # the pipeline and quality sections run as training does (train.onednn: true)
UPSCALE = "plain"  # inference runs on TF's defaults (batch-1 windows are slower with oneDNN here)
# --target-config: the paper's networks and sizes (Ledig et al. 2017)
TARGET = {"model.generator.blocks": 16, "model.generator.filters": 64, "model.generator.batch_norm": True,
          "model.generator.upsampler": "paper", "model.generator.bicubic_skip": False,
          "model.discriminator.filters": 64, "model.discriminator.dense": 1024, "train.batch_size": 16,
          "train.hr_patch": 96}
SETTINGS = {  # by --quick
    False: {"timing": {"warmup": 2, "repeats": 5, "budget_s": 20.0, "min_repeats": 2},
            "pipeline": {"warmup_batches": 3, "chunk": 10, "chunks": 5, "warmup": 2, "round_s": 3.0,
                         "rounds": 6},
            # median of 6 after 2 warm-up calls; emulated bf16 (~10-30x slower here) within a budget
            "torch": {"warmup": 2, "repeats": 6, "budget_s": 60.0, "min_repeats": 1}},
    True: {"timing": {"warmup": 1, "repeats": 1, "budget_s": 5.0, "min_repeats": 1},
           "pipeline": {"warmup_batches": 1, "chunk": 4, "chunks": 2, "warmup": 1, "round_s": 0.5,
                        "rounds": 2},
           "torch": {"warmup": 1, "repeats": 1}},
}
UPSCALE_LR = (339, 510)  # (h, w): a DIV2K validation image at x4; the large one is 2x per side
QUALITY = {"model.generator.blocks": 2, "train.batch_size": 8, "train.hr_patch": 32, "train.val_images": 0,
           "train.val_every": 10**9, "train.checkpoint_every": 10**9}
SAMPLE_HR_CROP = 128  # crops of the temporary sample set: enough for patches <= 128, quick to build
CHILD_TIMEOUT_S = 3600


@dataclass
class Variant:
    """A measured variant: its config, its environment and what it changes (for the table)."""

    name: str
    cfg: Config
    env: dict[str, str]
    note: str


def parse_variant(text: str, cfg: Config) -> Variant:
    """``atom[+atom...]`` with atoms from ATOMS."""
    atoms = text.strip().split("+")
    if not all(a in ATOMS for a in atoms):
        raise ValueError(f"--variants: unknown variant {text!r}; atoms {', '.join(ATOMS)} joined by +")
    over = {k: v for a in atoms for k, v in ATOMS[a][0].items()}
    env = {k: v for a in atoms for k, v in ATOMS[a][1].items()}
    note = ", ".join(f"{k}={v}" for k, v in {**env, **over}.items()) or "TF defaults"
    return Variant(text.strip(), config.replace(cfg, over), env, note)


def spawn(spec: dict[str, Any], env: dict[str, str] | None = None, python: str | None = None) -> dict:
    """Run one child job in a fresh interpreter: its result, or ``{'error': ...}``."""
    path = os.pathsep.join(filter(None, [str(SRC_DIR), os.environ.get("PYTHONPATH")]))
    full = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {}), "PYTHONPATH": path}
    try:
        proc = subprocess.run([python or sys.executable, "-m", "srgan.bench.child"], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, cwd=ROOT, env=full,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:  # no such interpreter, or it hung
        return {"error": f"{spec['job']}: {exc}"}
    if proc.returncode == 0 and proc.stdout.strip():
        with contextlib.suppress(ValueError):  # a last line that is not JSON: reported as an error below
            return json.loads(proc.stdout.strip().splitlines()[-1])
    err = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()][-3:]
    return {"error": f"{spec['job']}: exit code {proc.returncode}: " + " | ".join(err)}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextmanager
def processed_data(processed: Path, cfg: Config) -> Iterator[tuple[Path, str]]:
    """``processed`` if its crops fit this config, else a temporary set made from the sample photos."""
    from .. import preprocess, sources

    pre = read_manifest(processed).get("config", {}).get("preprocess", {})
    if pre.get("scale") == cfg.preprocess.scale and pre.get("hr_crop", 0) >= cfg.train.hr_patch:
        yield processed, str(processed)
        return
    with tempfile.TemporaryDirectory(prefix="srgan-bench-") as tmp:
        log(f"no usable processed data in {processed}: building a temporary set from the sample photos")
        scfg = config.replace(cfg, {"data.source": "sample",
                                    "preprocess.hr_crop": max(cfg.train.hr_patch, SAMPLE_HR_CROP)})
        sources.fetch(scfg, Path(tmp, "raw"), Path(tmp, "downloads"), progress=False)
        preprocess.preprocess(scfg, Path(tmp, "raw"), Path(tmp, "processed"), progress=False)
        yield Path(tmp, "processed"), "temporary set from the sample photos"


def bench_config(args: argparse.Namespace) -> Config:
    """params.yaml with the CLI's overrides, one device, float32 unless a variant says bf16."""
    over: dict[str, Any] = {"train.distribute": "none", "train.precision": "float32",
                            **(TARGET if args.target_config else {})}
    for flag, key in (("blocks", "model.generator.blocks"), ("filters", "model.generator.filters"),
                      ("batch", "train.batch_size"), ("patch", "train.hr_patch")):
        if getattr(args, flag) is not None:
            over[key] = getattr(args, flag)
    return config.load(args.params, over)


def machine_info() -> dict[str, Any]:
    """CPU, software versions and load, without importing TensorFlow here."""
    versions = {}
    for dist in ("tensorflow", "tensorflow-cpu", "keras"):
        try:
            versions.setdefault("keras" if dist == "keras" else "tensorflow", metadata.version(dist))
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu_info(), "python": platform.python_version(), **versions,
            "loadavg_start": os.getloadavg()}


def run_quality(args: argparse.Namespace, base: Variant, processed: Path) -> dict[str, Any]:
    """Both precisions over ``--quality-seeds`` seeds, a fresh process each: the runs and their summary."""
    n = args.quality_steps
    over = {**QUALITY, "pretrain.steps": n, "gan.steps": max(n // 4, 1), "train.log_every": n}
    runs = []
    for prec in quality.PRECISIONS:
        for seed in range(base.cfg.seed, base.cfg.seed + args.quality_seeds):
            log(f"quality: {prec}, seed {seed}")
            qcfg = config.replace(base.cfg, {**over, "train.precision": prec, "seed": seed})
            spec = {"job": "quality", "processed_dir": str(processed), "cfg": qcfg.to_dict()}
            runs.append({"precision": prec, "seed": seed, **spawn(spec, base.env)})
    by_prec = {p: [r for r in runs if r["precision"] == p] for p in quality.PRECISIONS}
    summary = quality.summarize({p: rs for p, rs in by_prec.items() if all(map(ok, rs))})
    blocks = QUALITY["model.generator.blocks"]
    about = f"G {blocks} blocks, {n}+{over['gan.steps']} steps, variant {base.name}"
    return {"quality_runs": runs, "quality": {"config": about, **summary}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the requested sections; the report."""
    t0, cfg, quick, sections = time.perf_counter(), bench_config(args), args.quick, args.sections
    names = args.variants or (QUICK_VARIANTS if quick else DEFAULT_VARIANTS)
    variants = [parse_variant(v, cfg) for v in names.split(",")]
    base, up, ev, todo = parse_variant(BASE, cfg), parse_variant(UPSCALE, cfg), cfg.evaluate, SETTINGS[quick]
    report: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": ["bench.py", *args.argv],
        "machine": machine_info(), "config": cfg.to_dict(), "settings": todo,
        "flop_convention": steps.__doc__.split("FLOP convention. ")[1].split("\n\n")[0]}
    if "steps" in sections:
        report["variants"] = {}
        for v in variants:
            log(f"steps: variant {v.name} ({v.note})")
            spec = {"job": "steps", "cfg": v.cfg.to_dict(), "steps": steps.STEPS, "timing": todo["timing"],
                    "matmul_n": args.matmul_n}
            report["variants"][v.name] = {**spawn(spec, v.env), "note": v.note}
    if {"pipeline", "quality"} & sections:
        with processed_data(args.processed, cfg) as (processed, report["data"]):
            if "pipeline" in sections:
                log(f"pipeline: variant {base.name}")
                # at the precision training picks here: the faster the step, the more the feed shows
                fed = config.replace(base.cfg, {"train.precision": "auto"})
                report["pipeline"] = spawn({"job": "pipeline", "cfg": fed.to_dict(), **todo["pipeline"],
                                            "shard_dir": str(processed / "train")}, base.env)
            if "quality" in sections:
                report.update(run_quality(args, base, processed))
    if "upscale" in sections:
        side = ev.tile + 2 * ev.tile_overlap + 1  # --quick: the smallest image with full-size windows
        h, w = args.upscale_lr or ((side, side) if quick else UPSCALE_LR)
        report["upscale"] = {"variant": up.name}
        for size, hw in (("small", (h, w)), ("large", (2 * h, 2 * w))):
            log(f"upscale: {size} LR {hw[1]}x{hw[0]}, variant {up.name}")
            report["upscale"][size] = spawn({"job": "upscale", "cfg": up.cfg.to_dict(), "lr_hw": hw}, up.env)
    if "torch" in sections:
        log(f"PyTorch peer: {args.torch_python}")
        spec = {"job": "torch_peer", "net": torch_peer.net_spec(cfg), "steps": steps.STEPS,
                "timing": todo["torch"]}
        report["torch_peer"] = spawn(spec, python=args.torch_python)
    report["machine"]["loadavg_end"] = os.getloadavg()
    return {**report, "summary": summarize(report), "seconds": time.perf_counter() - t0}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; ``args.sections`` holds the sections to run."""
    ap = argparse.ArgumentParser(prog="bench.py", description="Speed benchmark: a table, reports/bench.json",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--params", type=Path, default=config.PARAMS_PATH, help="params file (defaults)")
    for flag in ("blocks", "filters", "batch", "patch"):
        ap.add_argument(f"--{flag}", type=int, help=f"override the {flag} of params.yaml")
    ap.add_argument("--target-config", action="store_true", help="the paper's sizes: 16x64 G with BN, "
                    "the paper upsampler, D 64 filters / dense 1024, batch 16, HR 96 (--blocks etc. on top)")
    ap.add_argument("--quick", action="store_true", help=f"smoke run: variant {QUICK_VARIANTS}, 1 timed call")
    ap.add_argument("--variants", help=f"comma list of atoms ({'|'.join(ATOMS)}) joined by + "
                    f"[{DEFAULT_VARIANTS}]")
    ap.add_argument("--only", help=f"comma list of sections ({','.join(SECTIONS)})")
    ap.add_argument("--quality", action="store_true", help="also the quality section (slow)")
    ap.add_argument("--quality-steps", type=int, default=200, help="quality: MSE steps (+ a quarter as GAN)")
    ap.add_argument("--quality-seeds", type=int, default=2, help="quality: seeds per precision")
    ap.add_argument("--matmul-n", type=int, default=MATMUL_N, help="side of the reference matmuls")
    ap.add_argument("--upscale-lr", type=lambda s: tuple(int(x) for x in s.lower().split("x"))[::-1],
                    help="small LR image WxH (default 510x339; --quick: one tile window + 1 px)")
    ap.add_argument("--torch-python", default=os.environ.get("BENCH_TORCH_PYTHON", sys.executable),
                    help="interpreter with torch (PyTorch peer; default $BENCH_TORCH_PYTHON, else this one)")
    ap.add_argument("--processed", type=Path, default=ROOT / "data/processed", help="processed data (else a "
                    "temporary set from the sample photos)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports/bench.json", help="JSON report")
    quiet.add_verbose_option(ap)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    default = {"steps", "pipeline", "upscale", "torch"} | ({"quality"} if args.quality else set())
    args.sections = {s.strip() for s in args.only.split(",")} if args.only else default
    if not args.sections <= set(SECTIONS) or min(args.quality_steps, args.quality_seeds) < 1:
        ap.error(f"--only takes sections of {', '.join(SECTIONS)}; --quality-steps/-seeds must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write the JSON report, print the table; returns the report."""
    args = parse_args(argv)
    report = run(args)
    write_report(args.out, report)  # first: the figures are kept even if the table fails
    print(format_report(report), f"wrote {args.out}", sep="\n", flush=True)
    return report
