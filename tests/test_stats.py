"""quantstudy.report.stats against statsmodels/scipy and float64 hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportion_confint, proportion_effectsize

from quantstudy.report import stats


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


# ----------------------------------------------------------------------------- non-inferiority (Tango)
def _restricted_p_c_numeric(b: int, c: int, n: int, delta: float) -> float:
    """The MLE of p_c under p_b = p_c + delta, by maximising the multinomial log-likelihood numerically."""
    from scipy.optimize import minimize_scalar

    def nll(pc: float) -> float:
        pb, rest = pc + delta, 1 - 2 * pc - delta
        return -(b * math.log(max(pb, 1e-300)) + c * math.log(max(pc, 1e-300)) + (n - b - c) * math.log(max(rest, 1e-300)))

    lo, hi = max(0.0, -delta), (1 - delta) / 2
    return float(minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12}).x)


@pytest.mark.parametrize("b,c,n,delta", [(3, 2, 60, 0.01), (6, 2, 60, 0.05), (0, 3, 50, 0.01), (12, 30, 400, 0.02),
                                         (5, 0, 30, 0.1), (40, 41, 570, -0.01)])
def test_tango_restricted_mle_matches_numerical_maximum(b: int, c: int, n: int, delta: float) -> None:
    assert float(stats._tango_p_c(b, c, n, delta)) == pytest.approx(_restricted_p_c_numeric(b, c, n, delta), abs=1e-6)


def test_tango_upper_solves_the_score_equation_and_zero_discordance_closed_form() -> None:
    z = sps.norm.ppf(0.95)
    for b, c, n in [(3, 2, 60), (6, 2, 60), (0, 3, 50), (40, 41, 570)]:
        u = stats.tango_upper(b, c, n)
        assert float(stats.tango_z(b, c, n, u)) == pytest.approx(-z, abs=1e-6)
        assert u > (b - c) / n
    # b = c = 0: p_c~ = 0, so Z = -sqrt(n d / (1 - d)) and the bound is z^2 / (n + z^2) (4.3 points at n = 60)
    for n in (10, 60, 1000):
        assert stats.tango_upper(0, 0, n) == pytest.approx(z * z / (n + z * z), abs=1e-9)


def test_tango_upper_approaches_wald_for_large_n() -> None:
    # n = 20000, 4% / 3% discordant: the score bound and the Wald bound d + z sqrt((psi - d^2) / n) agree
    n, b, c = 20000, 800, 600
    d, psi = (b - c) / n, (b + c) / n
    wald = d + sps.norm.ppf(0.95) * math.sqrt((psi - d * d) / n)
    assert stats.tango_upper(b, c, n) == pytest.approx(wald, abs=2e-4)


@pytest.mark.parametrize("b,c,n", [(0, 3, 50), (4, 7, 50), (2, 1, 30), (1, 6, 40), (0, 5, 50), (2, 9, 60)])
def test_tango_test_agrees_with_the_exact_unconditional_test(b: int, c: int, n: int) -> None:
    # Independent reference: the exact unconditional p-value of H0 "loss = 1 point" (sup over the nuisance
    # discordance of P(Z <= Z_obs) under the trinomial), from scipy's multinomial pmf.
    from scipy.stats import multinomial

    delta = 0.01
    bb, cc = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    ok = bb + cc <= n
    bb, cc = bb[ok], cc[ok]
    rej = stats.tango_z(bb, cc, n, delta) <= float(stats.tango_z(b, c, n, delta)) + 1e-12
    exact = max(multinomial.pmf(np.stack([bb, cc, n - bb - cc], 1), n, [pc + delta, pc, 1 - 2 * pc - delta])[rej].sum()
                for pc in np.linspace(0, (1 - delta) / 2, 300))
    approx = sps.norm.cdf(float(stats.tango_z(b, c, n, delta)))
    if exact < 0.2:  # where decisions are made; the exact test's sup over the nuisance is a little larger
        assert approx == pytest.approx(exact, abs=0.03)
    for alpha in (0.05, 0.0125):  # the same decision at the levels the report uses, where p is not on the edge
        if abs(exact - alpha) > 0.01:
            assert (stats.tango_upper(b, c, n, alpha) < delta) == (exact < alpha)


COVERAGE_CASES = [(60, 0.05, 0.05), (30, 0.10, 0.03), (200, 0.02, 0.01), (40, 0.0, 0.0), (500, 0.06, 0.04),
                  (20, 0.15, 0.05), (57, 0.12, 0.08)]


def test_tango_bound_coverage_by_simulation() -> None:
    """Known truth: draw (right->wrong, wrong->right) counts from a trinomial and count how often the one-sided
    95% bound is at or above the true loss. (U >= true loss exactly when the score test of H0: loss = true
    loss does not reject, Z is decreasing; checked on the first 200 draws with tango_upper itself.)"""
    rng = np.random.default_rng(2026)
    z = sps.norm.ppf(0.95)
    coverage = {}
    for n, pb, pc in COVERAGE_CASES:
        draws = rng.multinomial(n, [pb, pc, 1 - pb - pc], size=20000)
        covered = stats.tango_z(draws[:, 0], draws[:, 1], n, pb - pc) > -z
        direct = [stats.tango_upper(int(b), int(c), n) >= pb - pc - 1e-12 for b, c, _ in draws[:200]]
        assert list(covered[:200]) == direct
        coverage[(n, pb, pc)] = covered.mean()
    print("Tango one-sided 95% bound coverage:", {k: round(v, 4) for k, v in coverage.items()})
    # 20000 draws: Monte Carlo SE 0.0015; the score bound is near nominal, never below 1 - alpha by more than noise
    assert all(v >= 0.95 - 0.005 for v in coverage.values())
    assert np.mean(list(coverage.values())) >= 0.95


@pytest.mark.parametrize("psi,margin,true_loss", [(0.1, 0.05, 0.0), (0.2, 0.03, 0.0), (0.05, 0.02, 0.0),
                                                  (0.1, 0.05, 0.01), (0.15, 0.01, 0.0)])
def test_planned_n_has_the_planned_power_by_simulation(psi: float, margin: float, true_loss: float) -> None:
    n = stats.n_noninferiority_binary(psi, margin, true_loss=true_loss)
    pb, pc = (psi + true_loss) / 2, (psi - true_loss) / 2
    draws = np.random.default_rng(11).multinomial(n, [pb, pc, 1 - psi], size=10000)
    power = np.mean(stats.tango_z(draws[:, 0], draws[:, 1], n, margin) < -sps.norm.ppf(0.95))
    print(f"psi {psi} margin {margin} true loss {true_loss}: n = {n}, simulated power {power:.3f}")
    assert power == pytest.approx(0.80, abs=0.025)
    # and 25% fewer items fall clearly short: the formula is not just generous
    small = np.random.default_rng(12).multinomial(int(0.75 * n), [pb, pc, 1 - psi], size=10000)
    assert np.mean(stats.tango_z(small[:, 0], small[:, 1], int(0.75 * n), margin) < -sps.norm.ppf(0.95)) < 0.75


def test_planned_n_closed_forms() -> None:
    z = sps.norm.ppf(0.95)
    # no discordance: s1 = 0 and s0^2 = m (1 - m), so n = z^2 (1 - m) / m: the n at which z^2 / (n + z^2) = m
    assert stats.n_noninferiority_binary(0.0, 0.01) == math.ceil(z * z * 0.99 / 0.01)
    assert stats.n_noninferiority_binary(0.1, 0.01, true_loss=0.01) is None  # the truth sits on the margin
    assert stats.n_noninferiority_binary(0.01, 0.05, true_loss=0.03) is None  # impossible: |loss| > discordance
    # continuous: statsmodels' one-sided one-sample normal power solved for n
    n_ref = NormalIndPower().solve_power(effect_size=0.02 / 0.3, nobs1=None, alpha=0.05, power=0.8, ratio=0,
                                         alternative="larger")
    assert stats.n_noninferiority_mean(0.3, 0.02) == math.ceil(n_ref - 1e-6)
