"""coder.stats: the t quantile against closed forms and published values, the paired t interval against a direct
computation and by its coverage, and the bootstrap by its spread and coverage."""
import math

import numpy as np
import pytest

from coder.stats import bootstrap_means, paired_t_interval, percentile_interval, t_cdf_abs, t_quantile

# two-sided 95% (p = 0.975) critical values as printed in standard t tables, 6 significant digits
T_TABLE_975 = {1: 12.7062, 2: 4.30265, 3: 3.18245, 4: 2.77645, 5: 2.57058, 6: 2.44691, 7: 2.36462, 8: 2.30600,
               9: 2.26216, 10: 2.22814, 15: 2.13145, 20: 2.08596, 25: 2.05954, 29: 2.04523, 30: 2.04227}


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995, 0.1, 0.025])
def test_t_quantile_equals_the_closed_forms_of_df_1_2_and_4(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
    alpha = 4 * p * (1 - p)  # df 4: q = sign(p - 1/2) 2 sqrt(cos(acos(sqrt(alpha)) / 3) / sqrt(alpha) - 1)
    expected = math.copysign(2 * math.sqrt(math.cos(math.acos(math.sqrt(alpha)) / 3) / math.sqrt(alpha) - 1), p - 0.5)
    assert t_quantile(p, 4) == pytest.approx(expected, rel=1e-10)


def test_t_quantile_matches_the_printed_table_and_tends_to_the_normal():
    for df, value in T_TABLE_975.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=6e-5), df
    assert t_quantile(0.975, 2000) == pytest.approx(1.959964, abs=2e-3)
    assert t_quantile(0.5, 7) == 0.0 and t_quantile(0.025, 7) == -t_quantile(0.975, 7)


def test_t_quantile_matches_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 31):
        for p in (0.55, 0.8, 0.95, 0.975, 0.999):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9), (p, df)


def test_t_cdf_is_a_distribution_function():
    for df in (1, 2, 3, 8, 9):
        values = [t_cdf_abs(t, df) for t in (0.0, 0.5, 1.0, 3.0, 1000.0)]
        assert values[0] == 0.0 and values == sorted(values) and 0.99 < values[-1] <= 1.0
    with pytest.raises(ValueError, match="df"):
        t_cdf_abs(1.0, 0)


def test_paired_interval_against_a_direct_computation():
    """docs/studies.md's per-seed CODER - triplet differences, by hand: mean, sd / sqrt(3), t_{0.975, 2}."""
    a, b = [430.0, 428.6, 417.3], [441.9, 430.0, 462.1]
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    got = paired_t_interval(a, b)
    assert got.n == 3 and got.mean == pytest.approx(mean, abs=1e-12)
    assert got.half_width == pytest.approx(4.302652729911275 * sd / math.sqrt(3), rel=1e-9)
    assert got.low == pytest.approx(mean - got.half_width) and got.high == pytest.approx(mean + got.half_width)


def test_identical_runs_give_zero_with_zero_width_and_one_pair_no_interval():
    same = paired_t_interval([401.5, 390.0, 422.25], [401.5, 390.0, 422.25])
    assert same.mean == 0.0 and same.half_width == 0.0 and same.low == same.high == 0.0
    shifted = paired_t_interval([11.0, 12.0, 13.0], [1.0, 2.0, 3.0])  # every seed moves by the same 10
    assert shifted.mean == pytest.approx(10.0) and shifted.half_width == pytest.approx(0.0, abs=1e-12)
    one = paired_t_interval([5.0], [2.0])
    assert one.mean == 3.0 and one.half_width is None and one.low is None
    with pytest.raises(ValueError, match="equally many"):
        paired_t_interval([1.0, 2.0], [1.0])


@pytest.mark.parametrize("n", [3, 6])
def test_paired_interval_covers_the_true_difference_95_percent_of_the_time(n):
    """4,000 simulated studies of n seeds: a shared seed effect (cancels in the pairs) plus noise, true
    difference 4. With n = 3 a normal quantile in place of t's would cover only ~87%."""
    rng = np.random.default_rng(n)
    covered = 0
    for _ in range(4000):
        seed_effect = rng.normal(0, 20, n)
        a = 430 + 4 + seed_effect + rng.normal(0, 5, n)
        b = 430 + seed_effect + rng.normal(0, 5, n)
        interval = paired_t_interval(a, b)
        covered += interval.low <= 4 <= interval.high
    assert 0.94 <= covered / 4000 <= 0.96, covered / 4000


def test_bootstrap_spread_is_the_standard_error_of_the_mean():
    values = np.random.default_rng(0).normal(size=(400, 2)) * [1.0, 3.0]
    means = bootstrap_means(values, resamples=4000, seed=1)
    se = values.std(axis=0, ddof=0) / math.sqrt(400)  # the bootstrap's own (plug-in) standard error
    assert means.std(axis=0) == pytest.approx(se, rel=0.05)
    assert means.mean(axis=0) == pytest.approx(values.mean(axis=0), abs=0.2 * se.max())
    assert np.array_equal(bootstrap_means(values, 300, seed=5), bootstrap_means(values, 300, seed=5))  # seeded
    assert np.array_equal(bootstrap_means(values, 300, seed=5, block=7), bootstrap_means(values, 300, seed=5, block=7))


def test_bootstrap_means_equal_a_loop_over_the_drawn_indices():
    """One block: the bincount-and-product shortcut against averaging the drawn rows one resample at a time."""
    values = np.random.default_rng(2).normal(size=(50, 3))
    means = bootstrap_means(values, resamples=20, seed=9, block=20)
    drawn = np.random.default_rng(9).integers(0, 50, size=(20, 50))
    assert np.allclose(means, np.stack([values[row].mean(axis=0) for row in drawn]), atol=1e-12)


def test_constant_differences_give_a_zero_width_bootstrap_interval():
    low, high = percentile_interval(bootstrap_means(np.zeros((30, 4)), 1000))
    assert np.all(low == 0) and np.all(high == 0)
