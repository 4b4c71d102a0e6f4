"""reports/index.html: one self-contained page (images inlined) that opens from disk.

Sections appear when their inputs exist: the run summary and metrics (evaluate), training curves
(train), image comparisons (evaluate), the loss comparison (compare.py), the tuning study (tune.py),
mean opinion scores (mos.py) and the benchmark (bench.py).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Any

from . import metrics as metric_registry
from .dataio import read_csv, read_json, write_text_atomic

MAX_COMPARISONS = 12  # keep the page light on DIV2K-sized validation sets

CSS = """tr.ref td{color:#555;font-style:italic}

body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1rem 2rem;color:#222}
h1{margin-bottom:.2rem} h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0} td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
img{max-width:100%;height:auto;image-rendering:pixelated} .muted{color:#777;font-size:.9em}
.better{color:#0a7d22;font-weight:600} .worse{color:#b00020;font-weight:600} figure{margin:1rem 0}
figcaption{font-size:.9em;color:#555} code{background:#f4f4f4;padding:0 .2rem}
"""


def data_uri(path: Path) -> str:
    """The file as a base64 data URI (so the page has no external references)."""
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
    return f"data:{mime.get(path.suffix.lower(), 'application/octet-stream')};base64," + base64.b64encode(
        path.read_bytes()).decode()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return html.escape(str(v))


def table(rows: list[dict[str, Any]], keys: list[str] | None = None) -> str:
    """An HTML table of dict rows."""
    if not rows:
        return "<p class=muted>(no rows)</p>"
    keys = keys or list(rows[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(k, ''))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def curves_png(history_csv: Path, bicubic_psnr_y: float | None = None) -> bytes | None:
    """Training curves as PNG bytes: losses, validation PSNR-Y and, for the adversarial phase, the
    discriminator's held-out health (accuracy and AUC)."""
    if not history_csv.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with history_csv.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None

    def series(key: str) -> tuple[list[float], list[float]]:
        pts = [(float(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    keys = [k for k in ("g_mse", "g_l1", "g_vgg", "g_adv", "d_loss") if k in rows[0]]
    health = [k for k in map(metric_registry.val_key, ("d_acc", "d_auc")) if series(k)[1]]
    fig, axes = plt.subplots(1, 3 if health else 2, figsize=(16 if health else 11, 3.6))
    for k in keys:
        x, y = series(k)
        if y and min(y) > 0:
            axes[0].plot(x, y, label=k)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("losses")
    axes[0].legend()
    psnr_key = metric_registry.val_key("psnr_y")
    if psnr_key in rows[0] or any(r.get(psnr_key) for r in rows):
        x, y = series(psnr_key)
        axes[1].plot(x, y, "o-", label="generator")
    if bicubic_psnr_y is not None:
        axes[1].axhline(bicubic_psnr_y, color="k", ls="--", lw=1, label="bicubic")
    axes[1].legend()
    axes[1].set_xlabel("step")
    axes[1].set_title("validation PSNR-Y (dB)")
    if health:
        for k in health:
            x, y = series(k)
            axes[2].plot(x, y, "o-", label=metric_registry.get(k).label)
        axes[2].axhline(0.5, color="k", ls=":", lw=1, label="chance")
        axes[2].axhline(metric_registry.D_SEPARATES, color="g", ls="--", lw=1, label="separates")
        axes[2].set_ylim(0.0, 1.0)
        axes[2].legend()
        axes[2].set_xlabel("step")
        axes[2].set_title("discriminator on held-out images")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


METHOD_LABELS = {"bicubic": "bicubic", "srresnet": "SRResNet (pixel loss)", "srgan": "SRGAN", "hr": "HR (reference)"}


def _metric_section(metrics: dict[str, Any]) -> str:
    """One table per evaluation set: each method's metrics, and the gain over bicubic."""
    out = []
    for set_name, block in metrics.items():
        if not isinstance(block, dict):
            continue
        order = list(METHOD_LABELS)  # bicubic, SRResNet, SRGAN first (metrics.json is key-sorted)
        methods = sorted((m for m in block if isinstance(block[m], dict)),
                         key=lambda m: (order.index(m.removesuffix("_x8")) if m.removesuffix("_x8") in order
                                        else len(order), m))
        shown = [m for m in metric_registry.image_metrics() if any(m.name in block[x] for x in methods)]
        head = "".join(f"<th>{html.escape(m.label)}</th>" for m in shown)
        body = []
        for x in methods:
            cells = []
            for m in shown:
                v, gain = block[x].get(m.name), block[x].get(f"{m.name}_gain")
                better = gain is not None and m.better(gain, 0.0)
                g = "" if gain is None else f" <span class={'better' if better else 'worse'}>({gain:+.4f})</span>"
                cells.append(f"<td>{m.format(v)}{g}</td>")
            label = METHOD_LABELS.get(x.removesuffix("_x8"), x) + (" (self-ensemble x8)" if x.endswith("_x8") else "")
            body.append(f"<tr><td>{html.escape(label)}</td>{''.join(cells)}</tr>")
        model = f"; NIQE model: {html.escape(str(block['niqe_model']))}" if block.get("niqe_model") else ""
        out.append(f"<h3>{html.escape(set_name)} ({block.get('n_images', '?')} images{model})</h3>"
                   f"<table><thead><tr><th>method</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
    notes = "".join(f"<li>{html.escape(m.label)}: {html.escape(m.note)}</li>"
                    for m in metric_registry.image_metrics() if m.note)
    out.append(f"<p class=muted>Means over whole images, x{metrics.get('scale', '?')}; Y channel (BT.601), border "
               "of <i>scale</i> pixels cropped, SR rounded to 8 bits (the SRGAN/BasicSR convention); in brackets "
               f"the difference to bicubic.</p><ul class=muted>{notes}</ul>")
    return "".join(out)


def _images_section(title: str, paths: list[Path], note: str = "") -> str:
    if not paths:
        return ""
    figs = "".join(f"<figure><img alt='{html.escape(p.stem)}' src='{data_uri(p)}'>"
                   f"<figcaption>{html.escape(p.parent.name + '/' + p.stem)}</figcaption></figure>" for p in paths)
    return f"<h2>{html.escape(title)}</h2>{note}{figs}"


def page_head(title: str) -> str:
    """The start of a self-contained report page (doctype, title, the shared style)."""
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width,initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>")


def build(reports_dir: Path, params: dict[str, Any] | None = None) -> Path:
    """Write reports_dir/index.html from whatever report files exist; returns its path."""
    reports_dir = Path(reports_dir)
    parts = [page_head("SRGAN report"), "<h1>SRGAN super-resolution report</h1>"]
    if (reports_dir / "compare" / "index.html").exists():
        study = read_json(reports_dir / "compare" / "study.json", {})
        parts.append(f"<p><a href='compare/index.html'>Loss study {html.escape(str(study.get('study', '')))}</a>: "
                     "every adversarial objective compared (tables, crops, perception-distortion plot).</p>")
    runs = []
    for stage, label in (("pretrain", "SRResNet"), ("train", "SRGAN")):
        summary = read_json(reports_dir / stage / "summary.json", {})
        if summary:
            runs.append(f"{label}: MLflow run <code>{html.escape(str(summary.get('run_id')))}</code>, "
                        f"{summary.get('total_steps', '?')} steps")
    if runs:
        parts.append(f"<p class=muted>{' · '.join(runs)}</p>")
    metrics = read_json(reports_dir / "metrics.json")
    if metrics:
        parts += ["<h2 id=metrics>Metrics against bicubic</h2>", _metric_section(metrics)]
    rows = read_csv(reports_dir / "per_image.csv")
    if rows:
        parts += ["<details><summary>Per-image metrics</summary>", table(rows), "</details>"]
    curves = []
    for stage, label in (("pretrain", "SRResNet pre-training"), ("train", "adversarial training")):
        stage_summary = read_json(reports_dir / stage / "summary.json", {})
        bicubic = stage_summary.get("bicubic_psnr_y")
        if warning := stage_summary.get("d_health_warning"):
            curves.append(f"<p class=worse>Warning: {html.escape(warning)}</p>")
        png = curves_png(reports_dir / stage / "history.csv", bicubic)
        if png:
            uri = "data:image/png;base64," + base64.b64encode(png).decode()
            curves.append(f"<h3>{label}</h3><img alt='{label} curves' src='{uri}'>")
    if curves:
        parts += ["<h2 id=curves>Training curves</h2>", *curves]
    comps = sorted((reports_dir / "eval").glob("*/*_compare.png"))
    parts.append(_images_section(
        "Comparisons", comps[:MAX_COMPARISONS],
        "<p class=muted>LR (nearest) | bicubic | SRResNet | SRGAN | HR; below, the boxed detail enlarged.</p>"))
    if len(comps) > MAX_COMPARISONS:
        parts.append(f"<p class=muted>{len(comps) - MAX_COMPARISONS} more in reports/eval/.</p>")
    tune_dir = reports_dir / "tune"
    if (tune_dir / "best_params.yaml").exists():
        parts += ["<h2 id=tune>Loss-weight search (Optuna)</h2>",
                  f"<pre>{html.escape((tune_dir / 'best_params.yaml').read_text())}</pre>"]
        parts.append(_images_section("", sorted(tune_dir.glob("*.png"))))
    mos = read_json(reports_dir / "mos.json")
    if mos:
        parts += ["<h2 id=mos>Mean opinion score</h2>"]
        if (reports_dir / "mos.md").exists():
            parts.append(f"<pre>{html.escape((reports_dir / 'mos.md').read_text())}</pre>")
        if (reports_dir / "mos.png").exists():
            parts.append(f"<img alt='MOS' src='{data_uri(reports_dir / 'mos.png')}'>")
    bench = read_json(reports_dir / "bench.json")
    if bench:
        parts += ["<h2 id=bench>Benchmark</h2>", f"<pre>{html.escape(json.dumps(bench, indent=2))}</pre>"]
    if params:
        flat = [{"param": k, "value": v} for k, v in sorted(params.items())]
        parts += ["<h2 id=params>Params</h2><details><summary>all params</summary>", table(flat), "</details>"]
    parts.append("</body></html>")
    out = reports_dir / "index.html"
    write_text_atomic(out, "\n".join(p for p in parts if p))
    return out
