"""Statistics for comparing model variants on the same evaluation items.

Every function here is a textbook formula, written out (a few lines each) because the
product depends only on numpy/scipy; tests check each one against statsmodels:
  - Wilson score interval for one accuracy (k of n correct).
  - McNemar's exact test for paired right/wrong outcomes: a two-sided binomial test on
    the discordant pairs (b = right->wrong, c = wrong->right; H0: b ~ Bin(b+c, 1/2)).
  - Paired bootstrap (items resampled jointly for both models) for differences and ratios
    of "sum over items / sum of weights" statistics: mean accuracy, mean F1, and NLL per
    word (weights = words per document). Percentile intervals; the p-value comes from the
    bootstrap distribution re-centred on zero (H0: no difference), never below 2^(1-n).
  - Holm's step-down adjustment across all comparisons of one report.
  - Minimum detectable effect (MDE) at 80% power, two-sided alpha 0.05:
      paired:   MDE = (z_{1-a/2} + z_{power}) * sd_d / sqrt(n), sd_d = SD of the per-item
                difference. For right/wrong outcomes sd_d = sqrt(psi) under H0, psi = share
                of discordant items (the normal approximation to McNemar's test).
      unpaired: the drop from accuracy p0 that a two-sample test of n vs n items detects
                (Cohen's h = 2 asin sqrt(p0) - 2 asin sqrt(p1)); conservative for paired data,
                and a property of the design alone (what n can show before running anything).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom, norm

ALPHA = 0.05
POWER = 0.80
BOOT_RESAMPLES = 2000
BOOT_SEED = 0  # fixed: re-rendering a report gives the same intervals


def wilson(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (nan, nan for n = 0)."""
    if n == 0:
        return (math.nan, math.nan)
    z = norm.ppf(1 - alpha / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at k = 0 (k = n) the bound is exactly 0 (1); the formula leaves a rounding residue of ~1e-17
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def flips(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int]:
    """(right->wrong, wrong->right) going from model a to model b on the same items."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    return int(np.sum(a & ~b)), int(np.sum(~a & b))


def mcnemar_exact(right_to_wrong: int, wrong_to_right: int) -> float:
    """Two-sided exact McNemar p-value: 2 * P(X <= min(b, c)), X ~ Bin(b + c, 1/2), capped at 1."""
    m = right_to_wrong + wrong_to_right
    if m == 0:
        return 1.0
    return float(min(1.0, 2 * binom.cdf(min(right_to_wrong, wrong_to_right), m, 0.5)))


def holm(pvalues: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (same order as given)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * pvalues[i])  # monotone: never below an earlier step
        adjusted[i] = min(1.0, running)
    return adjusted


def _z_sum(alpha: float, power: float) -> float:
    return float(norm.ppf(1 - alpha / 2) + norm.ppf(power))


def mde_paired(n: int, sd_diff: float, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """Smallest true mean difference a paired two-sided z-test detects with `power` (None if n = 0)."""
    if n == 0:
        return None
    return _z_sum(alpha, power) * sd_diff / math.sqrt(n)


def mde_paired_binary(n: int, discordant: int, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """Paired MDE for right/wrong outcomes with `discordant` items that differ (None when none differ)."""
    if n == 0 or discordant == 0:
        return None
    return mde_paired(n, math.sqrt(discordant / n), alpha, power)


def mde_unpaired(n: int, p0: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Accuracy drop from p0 that a two-sample test with n items per arm detects (Cohen's h)."""
    h = _z_sum(alpha, power) * math.sqrt(2 / n)  # effect size for equal arms
    angle = math.asin(math.sqrt(p0)) - h / 2
    return p0 if angle <= 0 else p0 - math.sin(angle) ** 2


def _resampled_sums(cols: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Column sums of `resamples` draws of n rows with replacement from cols (n, c)."""
    n = len(cols)
    rows, counts = np.unique(cols, axis=0, return_counts=True)
    if len(rows) <= 64:
        # few distinct rows (right/wrong pairs have at most 4): drawing n items with replacement is a
        # multinomial over the distinct rows, exactly; this makes MMLU-sized bootstraps instant
        return rng.multinomial(n, counts / n, size=resamples) @ rows
    sums = []
    chunk = max(1, 2_000_000 // n)  # resamples per chunk: keeps the (chunk, n, c) gather under ~50 MB
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        sums.append(cols[idx].sum(axis=1))
    return np.concatenate(sums)


@dataclass
class PairedBootstrap:
    """b vs a on the same items; a is the reference. stat = sum(x) / sum(weights)."""

    n: int
    stat_a: float
    stat_b: float
    diff: float  # stat_b - stat_a
    diff_lo: float
    diff_hi: float
    p: float  # two-sided, bootstrap distribution re-centred on zero
    ratio: float | None  # stat_b / stat_a (retention); None when stat_a == 0
    ratio_lo: float | None
    ratio_hi: float | None
    sd_diff: float  # SD of per-item differences (x_b - x_a) / mean weight, for the paired MDE


def paired_bootstrap(x_a: np.ndarray, x_b: np.ndarray, weights: np.ndarray | None = None,
                     resamples: int | None = None, seed: int = BOOT_SEED, alpha: float = ALPHA) -> PairedBootstrap:
    """Paired percentile bootstrap of stat = sum(x) / sum(w) for two models on the same n items.

    resamples: default BOOT_RESAMPLES; the p-value cannot go below 1 / (resamples + 1)."""
    resamples = resamples or BOOT_RESAMPLES
    a, b = np.asarray(x_a, np.float64), np.asarray(x_b, np.float64)
    n = len(a)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    if n == 0 or len(b) != n or len(w) != n:
        raise ValueError(f"paired bootstrap needs two equal, non-empty samples (got {len(a)} and {len(b)})")
    cols = np.stack([a, b, w], axis=1)  # (n, 3)
    rng = np.random.default_rng(seed)
    s = _resampled_sums(cols, resamples, rng)  # (resamples, 3): sum a, sum b, sum w per resample
    stat_a, stat_b = a.sum() / w.sum(), b.sum() / w.sum()
    diff = stat_b - stat_a
    boot_diff = (s[:, 1] - s[:, 0]) / s[:, 2]
    lo, hi = np.quantile(boot_diff, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")
    # p: how often a re-centred resample (a world with no difference) lands as far from 0 as observed
    extreme = np.sum(np.abs(boot_diff - diff) >= abs(diff) - 1e-12)
    # On few items a bootstrap test is anti-conservative (n=3 items all moving one way gives p ~ 1/B), so p
    # is never reported below 2^(1-n): the smallest p any exact paired test (sign flips) can reach on n items.
    p = float(min(1.0, max((extreme + 1) / (resamples + 1), 2.0 ** (1 - n))))
    ratio = ratio_lo = ratio_hi = None
    if a.sum() != 0:
        ratio = float(b.sum() / a.sum())
        # a resample with sum a = 0 gives inf (counts as "very large"); 0/0 says nothing and is dropped
        with np.errstate(divide="ignore", invalid="ignore"):
            boot_ratio = s[:, 1] / s[:, 0]
        ratio_lo, ratio_hi = (float(v) for v in np.nanquantile(boot_ratio, [alpha / 2, 1 - alpha / 2],
                                                                        method="inverted_cdf"))
    per_item = (b - a) / w.mean()
    return PairedBootstrap(n, float(stat_a), float(stat_b), float(diff), float(lo), float(hi), p,
                           ratio, ratio_lo, ratio_hi, float(per_item.std(ddof=1)) if n > 1 else 0.0)


def bootstrap_ci(x: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(x) / sum(w) for one model (the paired one against zeros)."""
    r = paired_bootstrap(np.zeros(len(x)), x, weights)
    return (r.diff_lo, r.diff_hi)
