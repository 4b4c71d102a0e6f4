"""The study's statistics on constructed data: a known effect is found, no effect yields no claim,
and Holm's correction keeps the family-wise false-positive rate at alpha (a seeded simulation)."""

from __future__ import annotations

import numpy as np
import pytest

from srgan import stats

IMAGES = 5
SEEDS = 3
ARMS = ["minimax", "modified", "least_squares", "wasserstein_gp", "hinge", "relativistic_average"]


def _study(rng: np.random.Generator, shifts: dict[str, float], seeds: int = SEEDS, seed_sd: float = 0.3,
           image_sd: float = 1.0) -> dict[str, np.ndarray]:
    """(seeds, images) NIQE-like values: image difficulty shared by every arm, seed noise per run."""
    difficulty = rng.normal(6.0, image_sd, IMAGES)
    return {arm: difficulty + shift + rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, 0.05, (seeds, IMAGES))
            for arm, shift in shifts.items()}


def test_known_effect_is_found_with_an_interval_around_it():
    rng = np.random.default_rng(0)
    arms = _study(rng, {"none": 0.0, **{a: -2.0 for a in ARMS}})
    srresnet = ("srresnet", arms["none"][:1] + 0.3)
    c = stats.compare("niqe", arms, higher_is_better=False, control="none", reference=srresnet)
    for a in ARMS:
        e = c.vs_control[a]
        assert e.lo < -2.0 < e.hi or abs(e.value + 2.0) < 0.6  # the interval is about the true effect
        assert e.hi < 0 and e.excludes_zero
        assert c.p_control[a] < stats.ALPHA and c.better_than_control(a) is True
    assert all(c.vs_reference[a].value < 0 for a in ARMS)
    text = stats.verdict([("valid", "NIQE", 2, c)], "3 seeds x 500 steps")
    assert "better than the control arm: minimax" in text and "not distinguishable from the control" not in text
    assert "the objectives cannot be told apart from each other" in text  # they all shift equally


def test_no_effect_yields_no_claim():
    rng = np.random.default_rng(1)
    arms = _study(rng, {"none": 0.0, **{a: 0.0 for a in ARMS}})
    c = stats.compare("niqe", arms, higher_is_better=False, control="none")
    assert all(c.better_than_control(a) is None for a in ARMS)
    assert c.groups == [sorted(ARMS, key=lambda a: c.means[a].value)]  # one group: nothing ranked
    text = stats.verdict([("valid", "NIQE", 2, c)], "3 seeds")
    assert "not distinguishable from the control arm: " + ", ".join(ARMS) in text
    assert "cannot be told apart" in text and "better than" not in text and "worse than" not in text


def test_two_clear_groups_are_separated_and_not_ranked_inside():
    rng = np.random.default_rng(2)
    shifts = {"a": 0.0, "b": 0.05, "c": 0.02, "d": 4.0, "e": 4.1}
    c = stats.compare("psnr_y", _study(rng, shifts, seeds=6, seed_sd=0.1), higher_is_better=True)
    assert [set(g) for g in c.groups] == [{"d", "e"}, {"a", "b", "c"}]  # higher is better: d, e first
    assert "2 groups, best first, unranked inside a group: {d, e} | {a, b, c}" in stats.verdict(
        [("valid", "PSNR-Y", 2, c)], "6 seeds")


def test_holm_controls_the_family_wise_error_rate():
    """Many null studies (7 arms, 3 seeds, 5 images): the share with any false claim, in either
    family (vs the control, pairwise), stays at alpha within Monte-Carlo error; uncorrected tests
    would claim something in most of them."""
    rng = np.random.default_rng(3)
    n_studies, any_false, any_raw = 300, 0, 0
    for _ in range(n_studies):
        arms = _study(rng, {"none": 0.0, **{a: 0.0 for a in ARMS}})
        c = stats.compare("niqe", arms, higher_is_better=False, control="none", n_boot=20)
        claims = [p for p in (*c.p_control.values(), *c.p_pairs.values()) if p is not None and p < stats.ALPHA]
        any_false += bool(claims)
        means = {k: v.mean(axis=1) for k, v in arms.items()}
        raw = [stats.welch_p(means[a], means[b]) for a in arms for b in arms if a < b]
        any_raw += any(p < stats.ALPHA for p in raw)
    # two families at alpha each: at most 2 alpha overall, plus 3 standard errors of the estimate
    bound = 2 * stats.ALPHA + 3 * np.sqrt(2 * stats.ALPHA * (1 - 2 * stats.ALPHA) / n_studies)
    assert any_false / n_studies <= bound, any_false
    assert any_raw / n_studies > 0.3  # the correction is what keeps it down


def test_welch_matches_scipy():
    from scipy import stats as sps

    rng = np.random.default_rng(6)
    for _ in range(20):
        a, b = rng.normal(0, 1, rng.integers(2, 7)), rng.normal(0.5, 2, rng.integers(2, 7))
        assert stats.welch_p(a, b) == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-9)
    assert stats.welch_p(np.ones(3), np.ones(3)) == 1.0 and stats.welch_p(np.ones(3), np.zeros(3)) == 0.0


def test_holm_adjustment_values():
    adj = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
    assert adj == {"a": pytest.approx(0.03), "c": pytest.approx(0.06), "b": pytest.approx(0.06), "d": None}


def test_bootstrap_pairs_images_across_arms():
    """Image difficulty is shared: an arm's effect against another is tight even when images vary a lot."""
    rng = np.random.default_rng(4)
    arms = _study(rng, {"x": 0.0, "y": 1.0}, seeds=4, seed_sd=0.01, image_sd=5.0)
    reps = stats.bootstrap(arms, n_boot=500)
    assert np.std(reps["y"] - reps["x"]) < 0.1 < np.std(reps["x"])
    with pytest.raises(ValueError, match="same images"):
        stats.bootstrap({"x": np.zeros((2, 3)), "y": np.zeros((2, 4))})


def test_one_seed_cannot_be_tested_and_says_so():
    arms = {"none": np.array([[5.0, 6.0]]), "hinge": np.array([[3.0, 4.0]])}
    c = stats.compare("niqe", arms, higher_is_better=False, control="none", n_boot=100)
    assert c.p_control == {"hinge": None} and c.better_than_control("hinge") is None


def test_seeds_needed_marks_overlapping_neighbours():
    rng = np.random.default_rng(5)
    arms = _study(rng, {"a": 0.0, "b": 0.1, "c": 5.0}, seed_sd=0.3)
    c = stats.compare("niqe", arms, higher_is_better=False, n_boot=500)
    assert stats.seeds_needed(c) == {"a": True, "b": True, "c": False}
