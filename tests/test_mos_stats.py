"""MOS statistics against numbers worked out by hand, and the results/report step."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from srgan.mos import results, stats
from srgan.mos.study import Stimulus, Study

# Student-t quantiles t(0.975, df) from a printed t table, not from scipy.
T975 = {4: 2.7764, 5: 2.5706}


def test_mean_ci_hand_worked_five_ratings():
    r = [4, 5, 3, 4, 4]
    mean = (4 + 5 + 3 + 4 + 4) / 5  # 20 / 5 = 4.0
    ss = 0**2 + 1**2 + 1**2 + 0**2 + 0**2  # squared deviations from 4: 2
    sd = math.sqrt(ss / (5 - 1))  # sqrt(0.5) = 0.70711
    half = T975[4] * sd / math.sqrt(5)  # 2.7764 * 0.70711 / 2.23607 = 0.87799
    s = stats.mean_ci(r)
    assert s.n == 5
    assert s.mean == pytest.approx(4.0)
    assert s.sd == pytest.approx(0.70711, abs=1e-5)
    assert s.ci_low == pytest.approx(mean - half, abs=2e-4)
    assert s.ci_high == pytest.approx(mean + half, abs=2e-4)
    assert (s.ci_low, s.ci_high) == pytest.approx((3.1220, 4.8780), abs=2e-4)


def test_mean_ci_hand_worked_six_ratings():
    s = stats.mean_ci([1, 2, 2, 3, 2, 2])
    # mean 12 / 6 = 2; squared deviations 1 + 0 + 0 + 1 + 0 + 0 = 2; variance 2 / 5 = 0.4;
    # sd 0.63246; se 0.63246 / sqrt(6) = 0.25820; half width 2.5706 * 0.25820 = 0.66372
    assert s.mean == pytest.approx(2.0)
    assert s.sd == pytest.approx(0.63246, abs=1e-5)
    assert (s.ci_low, s.ci_high) == pytest.approx((2 - 0.66372, 2 + 0.66372), abs=2e-4)


def test_mean_ci_degenerate():
    assert stats.mean_ci([]) == stats.Summary(0, None, None, None, None)
    one = stats.mean_ci([3])
    assert (one.n, one.mean, one.ci_low) == (1, 3.0, None)
    same = stats.mean_ci([5, 5, 5])  # zero spread: zero-width interval, not nan
    assert (same.ci_low, same.ci_high) == (5.0, 5.0)


def test_holm_hand_worked():
    # sorted: 0.01*4 = 0.04; 0.03*3 = 0.09; 0.04*2 = 0.08 -> monotone max 0.09; 0.20*1 = 0.20
    assert stats.holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert stats.holm([]) == []


def test_paired_wilcoxon_hand_worked():
    # Four (rater, image) pairs, A beats B by 1, 2, 3, 4: W- = 0. Under H0 each of the 2^4 = 16
    # sign patterns is equally likely and only "all positive" gives W- = 0, so the two-sided
    # exact p = 2 * 1/16 = 0.125.
    a = {("r1", "i1"): 5, ("r1", "i2"): 5, ("r2", "i1"): 5, ("r2", "i2"): 5}
    b = {("r1", "i1"): 4, ("r1", "i2"): 3, ("r2", "i1"): 2, ("r2", "i2"): 1}
    t = stats.paired_wilcoxon(a, b, "A", "B")
    assert (t.n_pairs, t.n_nonzero, t.statistic) == (4, 4, 0.0)
    assert t.mean_diff == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert t.p == pytest.approx(0.125)
    # Only keys rated under both methods pair up.
    assert stats.paired_wilcoxon(a, {("r9", "i9"): 1}).p is None
    # No difference anywhere: p = 1, not nan.
    assert stats.paired_wilcoxon(a, a).p == 1.0


def test_score_counts():
    assert stats.score_counts([1, 5, 5, 3]) == {1: 1, 2: 0, 3: 1, 4: 0, 5: 2}


# -- results -------------------------------------------------------------------------------------


def _study(tmp_path: Path) -> Study:
    """Two images x (nearest, bicubic, model 'g' from a run, hr), stimulus ids s<image><method>."""
    methods = {"nearest": {"kind": "nearest"}, "bicubic": {"kind": "bicubic"},
               "g": {"kind": "model", "source": "runs:/run123", "run_id": "run123"}, "hr": {"kind": "hr"}}
    stimuli = {}
    for img in ("i1", "i2"):
        for m in methods:
            sid = f"{img}-{m}"
            stimuli[sid] = Stimulus(sid, img, m, f"{sid}.png", methods[m].get("run_id"))
    return Study(tmp_path, "study1", 4, 0, ["i1", "i2"], methods, stimuli)


RATINGS = [  # (rater, stimulus, score)
    ("ann", "i1-nearest", 1), ("ann", "i2-nearest", 2), ("bob", "i1-nearest", 1), ("bob", "i2-nearest", 1),
    ("ann", "i1-bicubic", 2), ("ann", "i2-bicubic", 3), ("bob", "i1-bicubic", 2), ("bob", "i2-bicubic", 2),
    ("ann", "i1-g", 4), ("ann", "i2-g", 3), ("bob", "i1-g", 4),  # bob has not rated i2-g yet
    ("ann", "i1-hr", 5), ("ann", "i2-hr", 5), ("bob", "i1-hr", 4), ("bob", "i2-hr", 5),
    ("ann", "not-in-study", 5),  # stray id: ignored
]


def test_compute_hand_worked(tmp_path):
    res = results.compute(_study(tmp_path), RATINGS)
    assert list(res["methods"]) == ["nearest", "bicubic", "g", "hr"]
    assert (res["n_ratings"], res["n_raters"]) == (15, 2)
    m = res["methods"]
    assert m["nearest"]["mos"] == pytest.approx((1 + 2 + 1 + 1) / 4)
    assert m["bicubic"]["mos"] == pytest.approx((2 + 3 + 2 + 2) / 4)
    assert m["g"]["mos"] == pytest.approx((4 + 3 + 4) / 3)
    assert m["hr"]["mos"] == pytest.approx((5 + 5 + 4 + 5) / 4)
    assert m["hr"]["counts"] == {"1": 0, "2": 0, "3": 0, "4": 1, "5": 3}
    assert m["g"]["run_id"] == "run123"
    # g: mean 11/3, squared deviations (1/3)^2 + (2/3)^2 + (1/3)^2 = 6/9, sd = sqrt((6/9)/2) = 0.57735;
    # t(0.975, 2) = 4.3027 from the table: half = 4.3027 * 0.57735 / sqrt(3) = 1.43423
    assert m["g"]["ci95"] == pytest.approx([11 / 3 - 1.43423, 11 / 3 + 1.43423], abs=2e-4)
    pairs = {(t["a"], t["b"]): t for t in res["pairwise"]}
    assert len(pairs) == 6
    # g vs hr pairs on (ann,i1) (ann,i2) (bob,i1): differences -1, -2, 0
    assert pairs[("g", "hr")]["n_pairs"] == 3 and pairs[("g", "hr")]["n_nonzero"] == 2
    assert pairs[("g", "hr")]["mean_diff"] == pytest.approx(-1.0)
    assert all(0 <= t["p"] <= t["p_holm"] <= 1 for t in res["pairwise"])
    assert res["per_image"]["i2"]["g"] == 3.0


def test_write_reports_and_mlflow(tmp_path, monkeypatch):
    res = results.compute(_study(tmp_path), RATINGS)
    paths = results.write_reports(res, tmp_path / "reports")
    assert [p.name for p in paths] == ["mos.json", "mos.md", "mos.png"]
    assert json.loads(paths[0].read_text())["methods"]["hr"]["mos"] == pytest.approx(4.75)
    md = paths[1].read_text()
    assert "| Method | Kind | Ratings | MOS | 95% CI |" in md and "| hr | hr | 4 | 4.75 |" in md
    with Image.open(paths[2]) as im:
        assert im.format == "PNG" and im.width > 500

    calls = []
    fake = types.SimpleNamespace(log_to_run=lambda run_id, metrics, artifacts=(): calls.append((run_id, metrics)))
    import srgan

    monkeypatch.setattr(srgan, "tracking", fake, raising=False)
    monkeypatch.setitem(sys.modules, "srgan.tracking", fake)
    assert results.log_to_runs(res, paths, log=lambda s: None) == 1
    assert calls[0][0] == "run123" and calls[0][1]["mos"] == pytest.approx(11 / 3)

    # Tracking not importable: a message, no exception, reports untouched.
    monkeypatch.delattr(srgan, "tracking")
    monkeypatch.setitem(sys.modules, "srgan.tracking", None)
    msgs: list[str] = []
    assert results.log_to_runs(res, paths, log=msgs.append) == 0
    assert "MLflow logging skipped" in msgs[0]


def test_compute_without_ratings(tmp_path):
    res = results.compute(_study(tmp_path), [])
    assert res["n_ratings"] == 0 and res["methods"]["g"]["mos"] is None
    assert all(t["p"] is None and not t["significant"] for t in res["pairwise"])
    results.write_reports(res, tmp_path / "r")  # empty study still renders
