"""Statistics of a comparison of training arms: intervals, effects, corrected tests, groups, a verdict.

An *arm* is one way of training (an adversarial objective, or the control without one) repeated
over seeds; every run of every arm is scored on the same images. Its data is a (seeds, images)
array of one metric. A *reference* (the SRResNet every arm starts from) is one model: (1, images).

* Means and effects get 95% intervals from a bootstrap over seeds and images, the images paired:
  each replicate draws one set of images for every arm (so image difficulty cancels in an effect)
  and, per arm, its seeds.
* Tests take the seed as the unit of replication: Welch's t-test on the runs' means over the
  (shared) images, one family per question (each objective against the control; the objectives
  pairwise), Holm-corrected within the family (Holm 1979), so the chance of any false claim in a
  family stays at ``alpha``.
* Groups: arms that no corrected test separates cannot be told apart; each group is a maximal set
  of mutually indistinguishable arms, and nothing inside a group is ranked.

numpy + scipy only; tests build data with known effects and simulate null studies.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

LEVEL = 0.95  # interval coverage
ALPHA = 0.05  # family-wise error rate of each family of tests
N_BOOT = 2000  # bootstrap replicates
MIN_SEEDS_TO_TEST = 2  # Welch's test needs a spread on both sides


@dataclass(frozen=True)
class Estimate:
    """A mean (or a difference of means) with its bootstrap interval."""

    value: float
    lo: float
    hi: float

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "lo": self.lo, "hi": self.hi}


@dataclass
class Comparison:
    """Everything the study says about one metric on one evaluation set."""

    metric: str
    higher_is_better: bool | None
    seeds: dict[str, int]
    n_images: int
    means: dict[str, Estimate]
    vs_control: dict[str, Estimate] = field(default_factory=dict)
    vs_reference: dict[str, Estimate] = field(default_factory=dict)
    p_control: dict[str, float] = field(default_factory=dict)  # Holm-adjusted
    p_pairs: dict[tuple[str, str], float] = field(default_factory=dict)  # Holm-adjusted
    groups: list[list[str]] = field(default_factory=list)
    control: str | None = None
    reference: str | None = None

    def better_than_control(self, arm: str, alpha: float = ALPHA) -> bool | None:
        """True/False when the corrected test separates ``arm`` from the control, None when it cannot."""
        p = self.p_control.get(arm)
        if p is None or p >= alpha or self.higher_is_better is None:
            return None
        return (self.vs_control[arm].value > 0) == self.higher_is_better

    def as_dict(self) -> dict:
        return {
            "metric": self.metric, "higher_is_better": self.higher_is_better, "seeds": self.seeds,
            "n_images": self.n_images, "control": self.control, "reference": self.reference,
            "means": {k: v.as_dict() for k, v in self.means.items()},
            "vs_control": {k: {**v.as_dict(), "p_holm": self.p_control.get(k)} for k, v in self.vs_control.items()},
            "vs_reference": {k: v.as_dict() for k, v in self.vs_reference.items()},
            "pairs": [{"a": a, "b": b, "p_holm": p} for (a, b), p in self.p_pairs.items()],
            "groups": self.groups,
        }


def _as_runs(values: np.ndarray) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 2 or not a.size:
        raise ValueError(f"expected a (seeds, images) array, got shape {a.shape}")
    return a


def bootstrap(arms: Mapping[str, np.ndarray], n_boot: int = N_BOOT, seed: int = 0) -> dict[str, np.ndarray]:
    """Bootstrap replicates of each arm's mean: images drawn once per replicate for all arms
    (paired), seeds drawn per arm. Returns name -> (n_boot,) replicate means."""
    data = {k: _as_runs(v) for k, v in arms.items()}
    n_images = {v.shape[1] for v in data.values()}
    if len(n_images) != 1:
        raise ValueError(f"every arm must be scored on the same images, got image counts {sorted(n_images)}")
    n = n_images.pop()
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, n, size=(n_boot, n))
    out = {}
    for name, v in data.items():
        seeds = rng.integers(0, v.shape[0], size=(n_boot, v.shape[0]))
        # per replicate: mean over the drawn seeds and the drawn images
        picked = v[seeds[:, :, None], imgs[:, None, :]]
        out[name] = picked.mean(axis=(1, 2))
    return out


def interval(point: float, replicates: np.ndarray, level: float = LEVEL) -> Estimate:
    """Percentile interval of bootstrap replicates around a point estimate."""
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(replicates, [tail, 100.0 - tail])
    return Estimate(float(point), float(lo), float(hi))


def welch_p(a: np.ndarray, b: np.ndarray) -> float | None:
    """Two-sided Welch t-test p-value of two sets of run means; None with fewer than two runs a side.

    Written out (Welch 1947, Satterthwaite's degrees of freedom) with the t distribution from
    scipy.special: scipy.stats.ttest_ind gives the same value at ~100x the cost per call.
    """
    from scipy.special import stdtr

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < MIN_SEEDS_TO_TEST or len(b) < MIN_SEEDS_TO_TEST:
        return None
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = a.mean() - b.mean()
    if va + vb == 0:  # no spread at all: separated iff the values differ
        return 0.0 if diff else 1.0
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return float(2.0 * stdtr(df, -abs(t)))


def holm(pvalues: Mapping[object, float | None]) -> dict[object, float | None]:
    """Holm's step-down adjustment of one family of p-values (None = untestable, kept None)."""
    keyed = sorted(((p, k) for k, p in pvalues.items() if p is not None), key=lambda t: t[0])
    m, out, running = len(keyed), {k: None for k, p in pvalues.items() if p is None}, 0.0
    for i, (p, k) in enumerate(keyed):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


def groups(names: Sequence[str], means: Mapping[str, float], separated: set[frozenset[str]],
           higher_is_better: bool | None) -> list[list[str]]:
    """Maximal sets of arms no test separates (each listed best first by mean; arms may be in two
    groups when the tests chain), the groups ordered by their best member."""
    names = list(names)
    tied = {a: {b for b in names if b == a or frozenset((a, b)) not in separated} for a in names}
    cliques: list[set[str]] = []
    for size in range(len(names), 0, -1):  # few arms: check subsets from the largest down
        for combo in itertools.combinations(names, size):
            s = set(combo)
            if all(s <= tied[a] for a in s) and not any(s <= c for c in cliques):
                cliques.append(s)
    sign = -1.0 if higher_is_better else 1.0
    ordered = [sorted(c, key=lambda a: sign * means[a]) for c in cliques]
    return sorted(ordered, key=lambda g: sign * means[g[0]])


def compare(metric: str, arms: Mapping[str, np.ndarray], higher_is_better: bool | None,
            control: str | None = None, reference: tuple[str, np.ndarray] | None = None,
            alpha: float = ALPHA, n_boot: int = N_BOOT, seed: int = 0) -> Comparison:
    """Compare the arms (name -> (seeds, images) values of ``metric``) with each other, with the
    ``control`` arm and with one ``reference`` model ((name, (1, images) values))."""
    data = {k: _as_runs(v) for k, v in arms.items()}
    everyone = dict(data)
    if reference is not None:
        everyone[reference[0]] = _as_runs(reference[1])
    reps = bootstrap(everyone, n_boot, seed)
    point = {k: float(v.mean()) for k, v in everyone.items()}
    out = Comparison(metric, higher_is_better, {k: v.shape[0] for k, v in data.items()},
                     next(iter(data.values())).shape[1], {k: interval(point[k], reps[k]) for k in data},
                     control=control, reference=reference[0] if reference else None)
    run_means = {k: v.mean(axis=1) for k, v in data.items()}
    objectives = [k for k in data if k != control]
    if control is not None:
        for k in objectives:
            out.vs_control[k] = interval(point[k] - point[control], reps[k] - reps[control])
        out.p_control = holm({k: welch_p(run_means[k], run_means[control]) for k in objectives})
    if reference is not None:
        ref = reference[0]
        for k in data:
            out.vs_reference[k] = interval(point[k] - point[ref], reps[k] - reps[ref])
    out.p_pairs = holm({(a, b): welch_p(run_means[a], run_means[b]) for a, b in itertools.combinations(objectives, 2)})
    separated = {frozenset(pair) for pair, p in out.p_pairs.items() if p is not None and p < alpha}
    out.groups = groups(objectives, point, separated, higher_is_better)
    return out


# --------------------------------------------------------------------------- the verdict
def _fmt(e: Estimate, digits: int) -> str:
    return f"{e.value:+.{digits}f} [{e.lo:+.{digits}f}, {e.hi:+.{digits}f}]"


def verdict(comparisons: Sequence[tuple[str, str, int, Comparison]], budget: str, alpha: float = ALPHA) -> str:
    """One paragraph from the numbers: what is distinguishable, what is not, and what it rests on.

    ``comparisons``: (set name, metric label, digits, Comparison). Never orders arms inside a group.
    """
    parts = []
    for set_name, label, digits, c in comparisons:
        if c.higher_is_better is None:
            continue
        better = "higher" if c.higher_is_better else "lower"
        seeds = sorted(set(c.seeds.values()))
        seeds_txt = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
        head = f"{label} on {set_name} ({c.n_images} images, {seeds_txt} seeds per arm; {better} is better)"
        says = []
        if c.control is not None and c.vs_control:
            won = [a for a in c.vs_control if c.better_than_control(a, alpha) is True]
            lost = [a for a in c.vs_control if c.better_than_control(a, alpha) is False]
            none = [a for a in c.vs_control if c.better_than_control(a, alpha) is None]
            if won:
                says.append(f"better than the control arm: {', '.join(f'{a} {_fmt(c.vs_control[a], digits)}' for a in won)}")
            if lost:
                says.append(f"worse than the control arm: {', '.join(f'{a} {_fmt(c.vs_control[a], digits)}' for a in lost)}")
            if none:
                says.append(f"not distinguishable from the control arm: {', '.join(none)}")
        objectives = [a for a in c.means if a != c.control]
        if len(objectives) > 1:
            if len(c.groups) == 1 and len(c.groups[0]) == len(objectives):
                says.append("the objectives cannot be told apart from each other")
            else:
                shown = " | ".join("{" + ", ".join(sorted(g)) + "}" for g in c.groups)
                says.append(f"the objectives form {len(c.groups)} groups, best first, unranked inside a group: {shown}")
        parts.append(f"{head}: " + "; ".join(says) + ".")
    if not parts:
        return "No metric with a direction was compared."
    return (" ".join(parts) + f" Effects are differences of means with 95% bootstrap intervals (seeds and images "
            f"resampled, images paired); claims are Welch t-tests on the runs' means, Holm-corrected within each "
            f"family at alpha {alpha}. It rests on {budget}.")


def seeds_needed(c: Comparison) -> dict[str, bool]:
    """Arms whose interval still overlaps a neighbour's (by mean) and that another seed could
    separate: the adaptive study gives each of them one more seed."""
    if c.higher_is_better is None:
        return {k: False for k in c.means}
    order = sorted(c.means, key=lambda k: c.means[k].value)
    overlap = {k: False for k in order}
    for a, b in zip(order, order[1:]):
        if c.means[a].hi >= c.means[b].lo:
            overlap[a] = overlap[b] = True
    return overlap


def finite(values: Sequence[float | None]) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)
