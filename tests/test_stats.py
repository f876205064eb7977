"""quantstudy.stats against statsmodels/scipy and float64 hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportion_confint, proportion_effectsize

from quantstudy import stats


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (25, 50), (28, 50), (1, 1), (137, 570)])
def test_wilson_matches_statsmodels(k: int, n: int) -> None:
    lo, hi = stats.wilson(k, n)
    ref = proportion_confint(k, n, alpha=0.05, method="wilson")
    assert lo == pytest.approx(ref[0], abs=1e-12) and hi == pytest.approx(ref[1], abs=1e-12)


def test_wilson_hand_value() -> None:
    # 25/50: centre 0.5, half-width z*sqrt(.25/50 + z^2/10000)/(1+z^2/50), z = 1.959964
    z = 1.959963984540054
    half = z * math.sqrt(0.25 / 50 + z * z / 10000) / (1 + z * z / 50)
    assert stats.wilson(25, 50) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert stats.wilson(0, 7)[0] == 0.0 and stats.wilson(7, 7)[1] == 1.0
    assert all(math.isnan(v) for v in stats.wilson(0, 0))


@pytest.mark.parametrize("b,c", [(0, 0), (2, 5), (5, 2), (0, 7), (1, 7), (12, 30), (40, 41), (100, 60)])
def test_mcnemar_exact_matches_statsmodels(b: int, c: int) -> None:
    table = [[50, b], [c, 50]]  # rows: model a right/wrong; columns: model b right/wrong
    ref = mcnemar(table, exact=True).pvalue
    assert stats.mcnemar_exact(b, c) == pytest.approx(ref, abs=1e-12)
    if b + c:
        assert stats.mcnemar_exact(b, c) == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue, abs=1e-12)


def test_mcnemar_hand_value() -> None:
    # 2 right->wrong, 5 wrong->right: p = 2 * (1 + 7 + 21) / 2^7 = 58/128
    assert stats.mcnemar_exact(2, 5) == pytest.approx(58 / 128, abs=1e-15)


def test_flips_counts() -> None:
    a = np.array([1, 1, 0, 0, 1, 0], bool)
    b = np.array([1, 0, 1, 0, 0, 1], bool)
    assert stats.flips(a, b) == (2, 2)
    assert stats.flips(a, a) == (0, 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_holm_matches_statsmodels(seed: int) -> None:
    p = np.random.default_rng(seed).uniform(0, 0.2, size=17).tolist() + [0.5, 1.0, 0.001]
    ref = multipletests(p, alpha=0.05, method="holm")[1]
    assert stats.holm(p) == pytest.approx(list(ref), abs=1e-12)


def test_holm_hand_value() -> None:
    # sorted 0.01, 0.02, 0.04 -> 3*0.01, max(0.03, 2*0.02), max(0.04, 1*0.04)
    assert stats.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])


@pytest.mark.parametrize("n,sd", [(50, 0.4), (570, 0.3), (1000, 0.12)])
def test_mde_paired_matches_statsmodels_one_sample_power(n: int, sd: float) -> None:
    # statsmodels' one-sample normal power (ratio=0) solves for the standardized effect d; MDE = d * sd.
    d = NormalIndPower().solve_power(effect_size=None, nobs1=n, alpha=0.05, power=0.8, ratio=0,
                                     alternative="two-sided")
    assert stats.mde_paired(n, sd) == pytest.approx(d * sd, rel=1e-4)


def test_mde_paired_binary_uses_discordance() -> None:
    # n=50 with 10 discordant items: sd = sqrt(0.2); (1.959964 + 0.841621) * sqrt(0.2 / 50)
    assert stats.mde_paired_binary(50, 10) == pytest.approx(2.801585 * math.sqrt(0.2 / 50), rel=1e-6)
    assert stats.mde_paired_binary(50, 0) is None


@pytest.mark.parametrize("n,p0", [(50, 0.5), (50, 0.3), (570, 0.6), (1000, 0.9)])
def test_mde_unpaired_matches_statsmodels(n: int, p0: float) -> None:
    h = NormalIndPower().solve_power(effect_size=None, nobs1=n, alpha=0.05, power=0.8, ratio=1)
    mde = stats.mde_unpaired(n, p0)
    assert proportion_effectsize(p0, p0 - mde) == pytest.approx(h, rel=1e-4)


def test_mde_unpaired_at_n50_is_large() -> None:
    # what the original reports' 50 questions could show: only drops of ~27 points at 50% accuracy
    assert 0.25 < stats.mde_unpaired(50, 0.5) < 0.30


def test_paired_bootstrap_matches_paired_t_for_large_n() -> None:
    rng = np.random.default_rng(7)
    a = rng.normal(0.6, 0.3, 4000)
    b = a + rng.normal(0.02, 0.25, 4000)
    r = stats.paired_bootstrap(a, b)
    t = sps.ttest_rel(b, a)
    half = 1.96 * np.std(b - a, ddof=1) / math.sqrt(len(a))
    assert r.diff == pytest.approx(np.mean(b - a), abs=1e-12)
    assert r.diff_lo == pytest.approx(r.diff - half, abs=0.2 * half)
    assert r.diff_hi == pytest.approx(r.diff + half, abs=0.2 * half)
    assert r.p == pytest.approx(t.pvalue, abs=0.01)
    assert r.sd_diff == pytest.approx(np.std(b - a, ddof=1), rel=1e-9)


def test_paired_bootstrap_ratio_matches_delta_method() -> None:
    # retention interval: the bootstrap of sum(b)/sum(a) vs the delta method for a ratio of paired means
    rng = np.random.default_rng(3)
    n = 3000
    a = rng.random(n) < 0.6
    b = np.where(rng.random(n) < 0.1, ~a, a)  # 10% of items flip
    r = stats.paired_bootstrap(a.astype(float), b.astype(float))
    ma, mb = a.mean(), b.mean()
    cov = np.cov(np.stack([a, b]).astype(float), ddof=1) / n
    var = (1 / ma) ** 2 * cov[1, 1] + (mb / ma**2) ** 2 * cov[0, 0] - 2 * mb / ma**3 * cov[0, 1]
    half = 1.96 * math.sqrt(var)
    assert r.ratio == pytest.approx(mb / ma, abs=1e-12)
    assert r.ratio_lo == pytest.approx(mb / ma - half, abs=0.15 * half)
    assert r.ratio_hi == pytest.approx(mb / ma + half, abs=0.15 * half)


def test_paired_bootstrap_identical_and_weighted() -> None:
    x = np.array([1.0, 0.0, 1.0, 1.0])
    r = stats.paired_bootstrap(x, x)
    assert (r.diff, r.diff_lo, r.diff_hi, r.p, r.ratio, r.ratio_lo, r.ratio_hi) == (0, 0, 0, 1.0, 1.0, 1.0, 1.0)
    # weighted: NLL per word = sum(nll) / sum(words)
    nll_a, nll_b, words = np.array([10.0, 20.0]), np.array([12.0, 21.0]), np.array([5.0, 10.0])
    r = stats.paired_bootstrap(nll_a, nll_b, weights=words)
    assert r.stat_a == pytest.approx(30 / 15) and r.stat_b == pytest.approx(33 / 15)
    assert r.diff == pytest.approx(3 / 15)
    with pytest.raises(ValueError):
        stats.paired_bootstrap(np.array([]), np.array([]))


def test_paired_bootstrap_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random(200), rng.random(200)
    assert stats.paired_bootstrap(a, b) == stats.paired_bootstrap(a, b)


def test_bootstrap_ci_of_one_mean_matches_t_interval() -> None:
    x = np.random.default_rng(5).normal(0.7, 0.2, 3000)
    lo, hi = stats.bootstrap_ci(x)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - half, abs=0.15 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.15 * half)


def test_bootstrap_p_never_below_exact_sign_flip_minimum() -> None:
    # 3 items that all move the same way: the bootstrap alone would say p ~ 1/2001; no exact paired
    # test on 3 items can go below 2^(1-3) = 0.25
    a = np.array([10.0, 20.0, 30.0])
    assert stats.paired_bootstrap(a, a + np.array([1.0, 1.2, 0.9])).p == pytest.approx(0.25)
