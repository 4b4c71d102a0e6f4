"""MOS statistics.

Confidence interval
    The MOS of a method is the plain mean of all its ratings (every rater, every image), as in
    Ledig et al., who report that mean plus the per-method distribution of scores. Its 95% CI
    is the Student-t interval on that mean: ``mean +- t(0.975, n-1) * s / sqrt(n)`` with ``s``
    the sample standard deviation (ddof = 1). It treats ratings as independent draws, which
    ignores rater and image effects, so it is a little narrow when few raters or images are
    used; the pairwise tests below are the ones to read for "is A better than B".

Pairwise test: Wilcoxon signed-rank on paired ratings, Holm-corrected
    Every rater scores every method on the same images, so the natural unit is the pair
    (rater, image): the difference score(A) - score(B) removes the rater's leniency and the
    image's difficulty, both of which dominate a 1-5 scale. The pooled, unpaired Mann-Whitney U
    throws that pairing away and loses power. The differences are ordinal and bounded, not
    normal, hence a signed-rank test rather than a paired t-test. Zero differences (same score
    for both) say nothing about direction and are dropped (Wilcoxon's zero method); scipy picks
    the exact null distribution without ties, a full sign-flip permutation for <= 13 tied
    pairs, and the tie-corrected normal approximation beyond. All method pairs form one family
    and are Holm-corrected (uniformly more powerful than Bonferroni, same family-wise error
    guarantee); "significant" means Holm-adjusted p < 0.05.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from .scale import LABELS

ALPHA = 0.05
CI_METHOD = "Student-t 95% CI of the mean over all ratings: mean +- t(0.975, n-1) * sd / sqrt(n), sd with ddof=1"
TEST_METHOD = ("two-sided Wilcoxon signed-rank test on score differences paired by (rater, image), "
               "zero differences dropped, Holm correction over all method pairs, alpha = 0.05")


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float | None
    sd: float | None
    ci_low: float | None
    ci_high: float | None


def mean_ci(scores: Sequence[float], level: float = 0.95) -> Summary:
    """Mean, sample SD and the Student-t CI of the mean (None where undefined)."""
    x = np.asarray(scores, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return Summary(0, None, None, None, None)
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, None, None, None)
    sd = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        # Monotone: an adjusted p is never smaller than one ranked before it.
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class PairTest:
    a: str
    b: str
    n_pairs: int
    n_nonzero: int
    mean_diff: float | None  # mean of score(a) - score(b) over the pairs
    statistic: float | None
    p: float | None


def paired_wilcoxon(a: Mapping[tuple, int], b: Mapping[tuple, int], name_a: str = "a", name_b: str = "b") -> PairTest:
    """Signed-rank test on the keys (e.g. (rater, image)) both ``a`` and ``b`` have scores for."""
    keys = sorted(set(a) & set(b))
    d = np.array([a[k] - b[k] for k in keys], dtype=np.float64)
    nonzero = int(np.count_nonzero(d))
    if d.size == 0:
        return PairTest(name_a, name_b, 0, 0, None, None, None)
    if nonzero == 0:
        # Identical scores everywhere: no evidence of a difference (scipy would return nan).
        return PairTest(name_a, name_b, int(d.size), 0, 0.0, 0.0, 1.0)
    res = sps.wilcoxon(d, zero_method="wilcox", alternative="two-sided", method="auto")
    return PairTest(name_a, name_b, int(d.size), nonzero, float(d.mean()), float(res.statistic), float(res.pvalue))


def score_counts(scores: Sequence[int]) -> dict[int, int]:
    """How many ratings gave each score of the scale (1..5)."""
    return {s: int(sum(1 for x in scores if x == s)) for s in LABELS}
