"""The report: a summary of the children's results, the printed table, reports/bench.json."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..dataio import write_json_atomic
from .limits import POLICY_DTYPE
from .steps import LABELS, STEPS, limit_fraction

SHORT = {"float32": "f32", "bfloat16": "bf16"}


def ok(res: Any) -> bool:
    """A child's result that is neither an error nor a skip."""
    return isinstance(res, dict) and "error" not in res and "skipped" not in res


def finite(obj: Any) -> Any:
    """NaN/Inf -> None, recursively (strict JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    return [finite(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write strict JSON atomically (a temp file renamed into place: never half-written)."""
    write_json_atomic(Path(path), finite(report))


def _fastest(speeds: dict[str, float]) -> tuple[str, float] | None:
    return max(speeds.items(), key=lambda kv: kv[1]) if speeds else None


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Errors by part; per step the fastest project variant, PyTorch's fastest precision and the
    project/PyTorch ratio of the two; the upscale peak-memory ratio large / small."""
    parts = {**{f"variant {k}": v for k, v in report.get("variants", {}).items()},
             **{f"upscale {k}": v for k, v in report.get("upscale", {}).items() if k != "variant"},
             **{k: report[k] for k in ("pipeline", "torch_peer") if k in report},
             **{f"quality {r['precision']} seed {r['seed']}": r for r in report.get("quality_runs", [])}}
    out: dict[str, Any] = {"errors": {k: v["error"] for k, v in parts.items() if "error" in v}, "steps": {}}
    variants = {k: v for k, v in report.get("variants", {}).items() if ok(v)}
    peer = report.get("torch_peer")
    for step in STEPS:
        row = out["steps"][step] = {}
        if tf := _fastest({k: v["steps"][step]["per_s"]["median"] for k, v in variants.items()}):
            row.update(variant=tf[0], steps_per_s=tf[1])
        torch = {d: r[step]["per_s"]["median"] for d, r in peer["precisions"].items()} if ok(peer) else {}
        if pt := _fastest(torch):
            row.update(torch_precision=pt[0], torch_steps_per_s=pt[1])
            if tf:
                row["project_over_torch"] = tf[1] / pt[1]
    up = report.get("upscale", {})
    if ok(up.get("small")) and ok(up.get("large")):
        small, large = up["small"]["rss_above_base_mb"], up["large"]["rss_above_base_mb"]
        out["upscale_mem_ratio"] = large / max(small, 1e-9)
    return out


def _error(name: str, res: dict[str, Any]) -> str:
    return f"{name}: {str(res.get('error') or res.get('skipped')).splitlines()[0][:200]}"


def _steps(report: dict[str, Any]) -> list[str]:
    t = report["settings"]["timing"]
    lines = [f"\nTraining steps: median of <= {t['repeats']} calls after {t['warmup']} warm-up; %limit: of "
             "the same-process matmul in the step's dtype; others: CPU cores other processes used",
             f"{'variant':<13}{'step':<18}{'steps/s':>8} {'[IQR]':<15}{'GFLOP/s':>8}{'%limit':>10}"
             f"{'others':>7}"]
    for name, v in report["variants"].items():
        if not ok(v):
            lines.append(_error(name, v))
            continue
        for step, r in v["steps"].items():
            ps, short = r["per_s"], SHORT[POLICY_DTYPE[v["precision"]]]
            iqr, frac = f"[{ps['iqr_lo']:.3f}-{ps['iqr_hi']:.3f}]", f"{limit_fraction(v, step):.0%} {short}"
            lines.append(f"{name:<13}{LABELS[step]:<18}{ps['median']:>8.3f} {iqr:<15}"
                         f"{r['flop_per_s'] / 1e9:>8.1f}{frac:>10}{r['cpu']['others_cores']:>7.2f}"
                         + ("" if r["finite"] else " NON-FINITE"))
        limits = ", ".join(f"{d} {x['flop_per_s'] / 1e9:.1f}" for d, x in v["limits"].items())
        lines.append(f"{'':<13}matmul GFLOP/s: {limits}; {v['note']}")
    flops = next((v["flops"] for v in report["variants"].values() if ok(v)), {})
    return [*lines, "GFLOP per step: " + ", ".join(f"{LABELS[s]} {flops[s] / 1e9:.3g}" for s in STEPS
                                                   if s in flops)]


def _pipeline(report: dict[str, Any]) -> list[str]:
    p = report["pipeline"]
    if not ok(p):
        return ["", _error("pipeline", p)]
    how = "crops in memory (train.cache_mb)" if p["cached"] else "streamed (train.cache_mb: 0)"
    return ["", f"Input pipeline ({report['data']}), as training runs it: {how}, G step in {p['precision']}",
            f"  {p['crops_per_s']['median']:.0f} crops/s alone (streamed: {p['streamed_crops_per_s']['median']:.0f})",
            f"  feed ratio (G step fed by the pipeline / from memory): {p['feed_ratio']:.3f} "
            f"({p['pipeline_s']['median']:.4f} vs {p['memory_s']['median']:.4f} s/step; streamed "
            f"{p['feed_ratio_streamed']:.3f}, {p['streamed_s']['median']:.4f} s/step; {p['rounds']} rounds of "
            f"{p['steps_per_round']}; others {p['cpu_fed']['others_cores']:.2f})"]


def _upscale(report: dict[str, Any]) -> list[str]:
    up, ev = report["upscale"], report["config"]["evaluate"]
    lines = ["", f"Tiled upscaling (tile {ev['tile']}, overlap {ev['tile_overlap']}; "
             f"variant {up['variant']})"]
    for size in ("small", "large"):
        r = up[size]
        lines.append(_error(f"  {size}", r) if not ok(r) else
                     f"  {size} LR {r['lr_hw'][1]}x{r['lr_hw'][0]}: {r['seconds']:.2f} s, "
                     f"{r['hr_mpix_per_s']:.3f} HR MP/s, peak RSS {r['rss_peak_mb']:.0f} MB "
                     f"({r['rss_above_base_mb']:.0f} above base); others {r['cpu']['others_cores']:.2f}")
    if "upscale_mem_ratio" in report["summary"]:
        lines.append(f"  peak RSS above base, large / small: {report['summary']['upscale_mem_ratio']:.2f}")
    return lines


def _torch(report: dict[str, Any]) -> list[str]:
    peer = report["torch_peer"]
    if not ok(peer):
        return ["", _error("PyTorch peer", peer)]
    lines = ["", f"PyTorch {peer['torch']} peer (eager, channels_last, {peer['threads']} threads), "
             "each framework at its fastest precision:"]
    for step, r in report["summary"]["steps"].items():
        lines.append(f"  {LABELS[step]:<18} project {r.get('steps_per_s', math.nan):.3f} steps/s "
                     f"({r.get('variant')}), PyTorch {r['torch_steps_per_s']:.3f} ({r['torch_precision']}): "
                     f"project/PyTorch {r.get('project_over_torch', math.nan):.2f}")
    return lines


def _quality(report: dict[str, Any]) -> list[str]:
    q = report["quality"]
    lines = ["", f"Quality ({q['config']}): validation PSNR-Y"]
    lines += [f"  {p:<15}{q[p]['mean']:.3f} dB, seeds {q[p]['seeds']}, spread {q[p]['spread']:.3f} dB"
              for p in ("float32", "mixed_bfloat16") if p in q]
    if "bf16_minus_f32_db" in q:
        verdict = {True: "; equal within the seed spread", False: "; DIFFERENT beyond the seed spread"}
        lines.append(f"  mixed_bfloat16 - float32: {q['bf16_minus_f32_db']:+.3f} dB"
                     + verdict.get(q.get("equal_within_seed_spread"), ""))
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The table ``make bench`` prints."""
    m, cpu, summ = report["machine"], report["machine"]["cpu"], report["summary"]
    model, t = report["config"]["model"], report["config"]["train"]
    g, d = model["generator"], model["discriminator"]
    flags = " ".join(f for f, on in cpu["flags"].items() if on)
    lines = [f"Machine: {cpu['model']}, {cpu['cores']} cores, flags {flags} (native bf16: "
             f"{'yes' if cpu['native_bf16'] else 'no'}); TF {m.get('tensorflow')}, Keras {m.get('keras')}; "
             f"load {m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end",
             f"Config: G {g.get('arch', 'srresnet')} {g['blocks']}x{g['filters']} ({g['upsampler']} "
             f"upsampler, BN {g['batch_norm']}, bicubic skip {g['bicubic_skip']}), D {d['filters']} / dense "
             f"{d['dense']}, batch {t['batch_size']}, HR {t['hr_patch']}"]
    for key, part in (("variants", _steps), ("pipeline", _pipeline), ("upscale", _upscale),
                      ("torch_peer", _torch), ("quality", _quality)):
        lines += part(report) if key in report else []
    lines += [f"ERROR {k}: {str(e).splitlines()[0][:200]}" for k, e in summ["errors"].items()]
    return "\n".join([*lines, f"\nTotal {report['seconds']:.0f} s"])
