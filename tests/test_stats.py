"""fa_jax.stats against SciPy's bootstrap and the standard library on hand-made examples."""
import statistics

import numpy as np
import pytest
from scipy import stats as sps

from fa_jax import stats
from fa_jax.errors import FaJaxError


def test_bootstrap_matches_scipy_percentile_interval():
    rng = np.random.default_rng(1)
    x = rng.exponential(2.0, size=60)
    got = stats.bootstrap(x, n_resamples=20000, seed=3)
    ref = sps.bootstrap((x,), np.mean, n_resamples=20000, method="percentile", random_state=4).confidence_interval
    assert got["estimate"] == pytest.approx(x.mean())
    assert got["lo"] < x.mean() < got["hi"]
    # two independent Monte Carlo estimates of the same quantiles
    np.testing.assert_allclose([got["lo"], got["hi"]], [ref.low, ref.high], rtol=0.03)


def test_weighted_bootstrap_is_a_ratio_of_sums_over_documents():
    rng = np.random.default_rng(2)
    tokens = rng.integers(5, 300, size=40).astype(float)
    nll_sums = tokens * rng.normal(3.0, 0.5, size=40)
    got = stats.bootstrap(nll_sums, weights=tokens, n_resamples=20000, seed=0)
    assert got["estimate"] == pytest.approx(nll_sums.sum() / tokens.sum())
    ref = sps.bootstrap((nll_sums, tokens), lambda a, b, axis=-1: a.sum(axis) / b.sum(axis), paired=True,
                        vectorized=True, n_resamples=20000, method="percentile", random_state=5).confidence_interval
    np.testing.assert_allclose([got["lo"], got["hi"]], [ref.low, ref.high], rtol=0.02)


def test_paired_bootstrap_hand_made():
    # a constant per-document difference: every resample gives it exactly, the interval is a point
    a = np.array([3.0, 5.0, 9.0, 1.0])
    d = stats.paired_bootstrap(a, a - 0.5, n_resamples=500)
    assert d["estimate"] == d["lo"] == d["hi"] == pytest.approx(0.5) and d["excludes_zero"]
    # documents vary a lot but the pairing removes it: +0.1 +-0.05 on every document is clearly positive ...
    rng = np.random.default_rng(0)
    base = rng.normal(0, 10, size=50)
    b = base
    a = base + 0.1 + rng.uniform(-0.05, 0.05, size=50)
    assert stats.paired_bootstrap(a, b)["excludes_zero"]
    # ... while an unpaired view of the same numbers cannot tell them apart
    ia, ib = stats.bootstrap(a), stats.bootstrap(b)
    assert ia["lo"] < ib["hi"] and ib["lo"] < ia["hi"]
    # no difference at all: the interval straddles zero
    noise = rng.normal(0, 1, size=50)
    assert not stats.paired_bootstrap(base + noise, base - noise[::-1])["excludes_zero"]


def test_across_seeds_and_formatting():
    agg = stats.across_seeds([0.41, 0.44, 0.39])
    assert agg["mean"] == pytest.approx(statistics.mean([0.41, 0.44, 0.39]))
    assert agg["std"] == pytest.approx(statistics.stdev([0.41, 0.44, 0.39]))
    assert stats.across_seeds([2.0])["std"] == 0.0
    assert stats.format_spread(agg) == "0.413 ± 0.025 (3 seeds)"
    assert stats.format_interval({"estimate": 0.012, "lo": -0.004, "hi": 0.029}, signed=True) == \
        "+0.012 [-0.004, +0.029]"


@pytest.mark.parametrize("call, match", [
    (lambda: stats.bootstrap([]), "non-empty"),
    (lambda: stats.bootstrap([1.0, float("nan")]), "not finite"),
    (lambda: stats.bootstrap([1.0, 2.0], weights=[1.0]), "expected 2"),
    (lambda: stats.bootstrap([1.0, 2.0], weights=[1.0, 0.0]), "positive weight"),
    (lambda: stats.paired_bootstrap([1.0, 2.0], [1.0]), "expected 2"),
    (lambda: stats.bootstrap([1.0], level=95), "between 0 and 1"),
])
def test_bad_input(call, match):
    with pytest.raises(FaJaxError, match=match):
        call()
