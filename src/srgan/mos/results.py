"""Turn ratings into reports/mos.{json,md,png} and MOS metrics on the models' MLflow runs."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from srgan.dataio import atomic_path, write_json_atomic, write_text_atomic

from . import stats
from .scale import LABELS, legend
from .study import Study


def compute(study: Study, ratings: Iterable[tuple[str, str, int]]) -> dict[str, Any]:
    """MOS, CI and score distribution per method, per-image MOS and the pairwise tests."""
    ratings = [r for r in ratings if r[1] in study.stimuli]  # stray ids cannot count
    by_method: dict[str, list[int]] = defaultdict(list)
    by_image: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    paired: dict[str, dict[tuple[str, str], int]] = defaultdict(dict)
    for rater, sid, score in ratings:
        st = study.stimuli[sid]
        by_method[st.method].append(score)
        by_image[st.image][st.method].append(score)
        paired[st.method][(rater, st.image)] = score

    order = study.method_order()
    methods: dict[str, Any] = {}
    for name in order:
        s = stats.mean_ci(by_method[name])
        info = study.methods[name]
        methods[name] = {
            "kind": info["kind"], "source": info.get("source", ""), "run_id": info.get("run_id"),
            "n": s.n, "mos": s.mean, "sd": s.sd, "ci95": [s.ci_low, s.ci_high] if s.ci_low is not None else None,
            "counts": {str(k): v for k, v in stats.score_counts(by_method[name]).items()},
        }

    tests = [stats.paired_wilcoxon(paired[a], paired[b], a, b) for a, b in itertools.combinations(order, 2)]
    # The Holm family is the pairs that could be tested (pairs with no common ratings have no p).
    testable = [i for i, t in enumerate(tests) if t.p is not None]
    adjusted = dict(zip(testable, stats.holm([tests[i].p for i in testable])))  # type: ignore[misc]
    pairwise = []
    for i, t in enumerate(tests):
        p_holm = adjusted.get(i)
        pairwise.append({
            "a": t.a, "b": t.b, "n_pairs": t.n_pairs, "n_nonzero": t.n_nonzero, "mean_diff": t.mean_diff,
            "statistic": t.statistic, "p": t.p, "p_holm": p_holm,
            "significant": bool(p_holm is not None and p_holm < stats.ALPHA),
        })

    per_image = {img: {m: stats.mean_ci(by_image[img].get(m, [])).mean for m in order} for img in study.images}
    return {
        "study_id": study.study_id,
        "n_ratings": len(ratings),
        "n_raters": len({r[0] for r in ratings}),
        "n_stimuli": len(study.stimuli),
        "images": study.images,
        "scale": study.scale,
        "crop": study.crop,
        "ci_method": stats.CI_METHOD,
        "test_method": stats.TEST_METHOD,
        "methods": methods,
        "pairwise": pairwise,
        "per_image": per_image,
    }


def _f(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _p(x: float | None) -> str:
    if x is None:
        return "–"
    return "<0.001" if x < 0.001 else f"{x:.3f}"


def markdown(res: dict[str, Any]) -> str:
    """The MOS table, the score distributions and the pairwise tests as Markdown."""
    lines = [
        "# Mean opinion score",
        "",
        f"{res['n_ratings']} ratings from {res['n_raters']} raters on {res['n_stimuli']} stimuli "
        f"({len(res['images'])} images, x{res['scale']}, "
        f"{'whole images' if not res['crop'] else str(res['crop']) + ' px crops'}). "
        f"Scores: {legend()}.",
        "",
        f"95% CI: {res['ci_method']}.",
        "",
        "| Method | Kind | Ratings | MOS | 95% CI | SD | " + " | ".join(map(str, LABELS)) + " |",
        "|---|---|---:|---:|---|---:|" + "---:|" * len(LABELS),
    ]
    for name, m in res["methods"].items():
        ci = f"[{_f(m['ci95'][0])}, {_f(m['ci95'][1])}]" if m["ci95"] else "–"
        kind = m["kind"] + (f" (run {m['run_id'][:8]})" if m.get("run_id") else "")
        counts = " | ".join(str(m["counts"][str(s)]) for s in LABELS)
        lines.append(f"| {name} | {kind} | {m['n']} | {_f(m['mos'])} | {ci} | {_f(m['sd'])} | {counts} |")
    lines += [
        "",
        "## Pairwise tests",
        "",
        f"{res['test_method']}. Mean diff = mean of score(A) - score(B) over the pairs.",
        "",
        "| A | B | Pairs | Mean diff | W | p | p (Holm) | Significant |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for t in res["pairwise"]:
        lines.append(f"| {t['a']} | {t['b']} | {t['n_pairs']} | {_f(t['mean_diff'])} | {_f(t['statistic'], 1)} | "
                     f"{_p(t['p'])} | {_p(t['p_holm'])} | {'yes' if t['significant'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    """MOS with 95% CI (left) and the distribution of scores per method (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["methods"])
    ms = [res["methods"][n] for n in names]
    y = list(range(len(names)))[::-1]  # first method on top
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 0.55 * len(names) + 1.8), sharey=True)
    for yi, m in zip(y, ms):
        if m["mos"] is None:
            continue
        err = [[m["mos"] - m["ci95"][0]], [m["ci95"][1] - m["mos"]]] if m["ci95"] else None
        ax1.errorbar(m["mos"], yi, xerr=err, fmt="o", color="tab:blue", capsize=4)
        ax1.annotate(f"{m['mos']:.2f}", (m["mos"], yi), textcoords="offset points", xytext=(0, 7),
                     ha="center", fontsize=8)
    ax1.set_xlim(min(LABELS), max(LABELS))
    ax1.set_xticks(list(LABELS), [f"{k}\n{v}" for k, v in LABELS.items()], fontsize=8)
    ax1.set_yticks(y, names)
    ax1.set_title("MOS (95% CI)")
    ax1.grid(axis="x", alpha=0.3)

    colors = dict(zip(LABELS, plt.get_cmap("RdYlGn")([0.05, 0.3, 0.5, 0.7, 0.95])))
    for yi, m in zip(y, ms):
        left = 0.0
        for s in LABELS:
            frac = m["counts"][str(s)] / m["n"] if m["n"] else 0.0
            ax2.barh(yi, frac, left=left, color=colors[s], edgecolor="white",
                     label=f"{s} {LABELS[s]}" if yi == y[0] else None)
            left += frac
    ax2.set_xlim(0, 1)
    ax2.set_title("Distribution of scores")
    ax2.set_xlabel("fraction of ratings")
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(LABELS), fontsize=8, frameon=False)
    fig.suptitle(f"Mean opinion score: {res['n_ratings']} ratings, {res['n_raters']} raters", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_reports(res: dict[str, Any], out_dir: Path) -> list[Path]:
    """reports/mos.json, mos.md and mos.png (each written atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "mos.json", out_dir / "mos.md", out_dir / "mos.png"]
    write_json_atomic(paths[0], res)
    write_text_atomic(paths[1], markdown(res))
    plot(res, paths[2])
    return paths


def log_to_runs(res: dict[str, Any], artifacts: list[Path], log: Callable[[str], None] = print) -> int:
    """Log each run-backed model's MOS to its MLflow run; returns how many runs were updated."""
    runs = {n: m for n, m in res["methods"].items() if m.get("run_id") and m["n"]}
    if not runs:
        return 0
    try:
        from srgan import tracking
    except Exception as exc:  # noqa: BLE001 - any import problem means "no tracking here"
        log(f"MLflow logging skipped: tracking unavailable ({exc})")
        return 0
    done = 0
    for name, m in runs.items():
        metrics = {"mos": m["mos"], "mos_n": float(m["n"])}
        if m["ci95"]:
            metrics.update(mos_ci95_low=m["ci95"][0], mos_ci95_high=m["ci95"][1])
        try:
            tracking.log_to_run(m["run_id"], metrics, artifacts)
            done += 1
            log(f"logged MOS {m['mos']:.2f} of {name} to run {m['run_id']}")
        except Exception as exc:  # noqa: BLE001 - one unreachable run must not lose the reports
            log(f"MLflow logging skipped for {name} (run {m['run_id']}): {exc}")
    return done
