"""Statistics for comparing runs over seeds: mean, sample standard deviation, a paired t-test.

`nmtrain compare --seeds` runs every cell once per seed. Two cells with the same seed share the model
initialisation and the data order (both come from the run's seed), so their accuracies are *paired*:
the test compares the per-seed differences ``a_s - b_s``, not two independent samples. The paired
t-test (two-sided, alpha = 0.05 by default) asks whether the mean difference is distinguishable from
zero given its seed-to-seed spread; with 3 seeds (2 degrees of freedom) it only detects differences
several times larger than that spread, which is the honest answer for 3 seeds.

Pure Python (no SciPy): Student's t distribution through the regularized incomplete beta function,
evaluated with Lentz's continued fraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA = 0.05


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def std(values: list[float]) -> float | None:
    """Sample standard deviation (n - 1); None for a single value."""
    if len(values) < 2:
        return None
    mu = mean(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


@dataclass
class Paired:
    """A paired comparison of cell A against cell B over the seeds both ran."""
    seeds: list[int]
    difference: float            # mean of A - B, accuracy points
    t: float | None              # None with fewer than 2 shared seeds
    p_value: float | None
    within_noise: bool | None    # None: cannot be tested (fewer than 2 seeds)

    def to_dict(self) -> dict:
        t = self.t if self.t is None or math.isfinite(self.t) else None     # JSON has no infinity
        return {"seeds": self.seeds, "difference": self.difference, "t": t, "p_value": self.p_value,
                "within_noise": self.within_noise}


def paired_test(a: dict[int, float], b: dict[int, float], alpha: float = ALPHA) -> Paired:
    """Paired t-test of ``a`` against ``b`` (value by seed) over their common seeds."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        raise ValueError("paired_test: the two cells share no seed")
    d = mean(diffs)
    if len(diffs) < 2:
        return Paired(seeds, d, None, None, None)
    sd = std(diffs)
    if sd == 0.0:                 # identical differences: no spread, so any non-zero one is exact
        t = 0.0 if d == 0.0 else math.copysign(math.inf, d)
    else:
        t = d / (sd / math.sqrt(len(diffs)))
    p = 1.0 if t == 0.0 else t_two_sided_p(t, len(diffs) - 1)
    return Paired(seeds, d, t, p, p >= alpha)
