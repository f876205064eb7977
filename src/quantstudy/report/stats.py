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


# ----------------------------------------------------------------------------- non-inferiority
# No library we depend on (scipy, statsmodels) has a confidence interval or a sample size for the
# difference of two *paired* proportions, so Tango's score interval and the matching sample-size
# formula are written out here; tests check the restricted MLE against a numerical maximisation of
# the multinomial likelihood, the coverage and the power by simulation.
#
# Notation: n items scored by a parent and a variant; b = right->wrong, c = wrong->right.
# loss = p_b - p_c (the parent's accuracy minus the variant's, as a fraction).


def _tango_p_c(b: np.ndarray | float, c: np.ndarray | float, n: np.ndarray | float, delta: float) -> np.ndarray:
    """Restricted MLE of p_c (wrong->right) under loss = delta (Tango 1998, eq. 4): a quadratic's root."""
    a2 = 2 * n
    bb = -b - c + (2 * n - b + c) * delta
    cc = -c * delta * (1 - delta)
    return (np.sqrt(np.maximum(bb * bb - 4 * a2 * cc, 0.0)) - bb) / (2 * a2)


def tango_z(b: np.ndarray | float, c: np.ndarray | float, n: np.ndarray | float, delta: float) -> np.ndarray:
    """Tango's score statistic for H0: loss = delta; very negative when the data show loss < delta.

    Z = (b - c - n delta) / sqrt(n (2 p_c~ + delta (1 - delta))), p_c~ the restricted MLE: the variance
    of b - c under H0, n (p_b + p_c - delta^2), with p_b = p_c + delta."""
    b, c, n = (np.asarray(x, np.float64) for x in (b, c, n))
    var = n * (2 * _tango_p_c(b, c, n, delta) + delta * (1 - delta))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (b - c - n * delta) / np.sqrt(var)
    return np.where(var > 0, z, np.where(b - c - n * delta < 0, -np.inf, 0.0))


def tango_upper(b: int, c: int, n: int, alpha: float = ALPHA) -> float:
    """One-sided (1 - alpha) upper confidence bound of the paired loss p_b - p_c: the largest delta that
    Tango's score test does not reject, i.e. the root of Z(delta) = -z_{1-alpha} above the observed loss.

    Unlike a bootstrap, it stays informative when the two models never disagree (b = c = 0: the bound is
    z^2 / (n + z^2), e.g. 4.3 points at n = 60, alpha 0.05), so identical answers on few items never pass
    for proof of equivalence."""
    from scipy.optimize import brentq

    if n <= 0:
        return math.nan
    z = float(norm.ppf(1 - alpha))
    observed = (b - c) / n

    def f(d: float) -> float:
        return float(tango_z(b, c, n, d)) + z

    hi = 1.0 - 1e-12
    if f(hi) > 0:
        return 1.0
    return float(brentq(f, observed, hi, xtol=1e-10))


def n_noninferiority_binary(discordance: float, margin: float, alpha: float = ALPHA, power: float = POWER,
                            true_loss: float = 0.0) -> int | None:
    """Items needed for Tango's one-sided score test to show loss < margin with `power` (Nam 1997's method
    for paired proportions, the non-inferiority form of Connor 1987):

        n = (z_{1-a} sigma0 + z_{power} sigma1)^2 / (margin - true_loss)^2
        sigma1^2 = psi - true_loss^2                         (variance per item of the true design)
        sigma0^2 = 2 p_c~ + margin (1 - margin)              (variance under H0: loss = margin, p_c~ the
                                                              restricted MLE at the expected counts)
    psi = discordance (share of items the two models answer differently). None when true_loss >= margin
    (no n shows it) or the inputs are impossible (|true_loss| > psi)."""
    if true_loss >= margin or abs(true_loss) > discordance + 1e-12 or not 0 <= discordance <= 1:
        return None
    p_b, p_c = (discordance + true_loss) / 2, (discordance - true_loss) / 2
    p_c0 = float(_tango_p_c(p_b, p_c, 1.0, margin))  # the restricted MLE is scale-free: counts / n
    sigma0 = math.sqrt(2 * p_c0 + margin * (1 - margin))
    sigma1 = math.sqrt(max(discordance - true_loss**2, 0.0))
    n = (norm.ppf(1 - alpha) * sigma0 + norm.ppf(power) * sigma1) ** 2 / (margin - true_loss) ** 2
    return max(1, math.ceil(n - 1e-9))


def n_noninferiority_mean(sd_diff: float, margin: float, alpha: float = ALPHA, power: float = POWER,
                          true_loss: float = 0.0) -> int | None:
    """Items needed for a one-sided paired z-test of a continuous per-item loss (SD sd_diff) to show
    loss < margin: n = (z_{1-a} + z_{power})^2 sd^2 / (margin - true_loss)^2. None when true_loss >= margin."""
    if true_loss >= margin:
        return None
    n = (norm.ppf(1 - alpha) + norm.ppf(power)) ** 2 * sd_diff**2 / (margin - true_loss) ** 2
    return max(1, math.ceil(n - 1e-9))
