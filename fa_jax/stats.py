"""Statistics for research claims: bootstrap intervals over documents or items, and aggregation across seeds.

    ci = bootstrap(per_doc_nll, weights=per_doc_tokens)              # per-token NLL with its 95% interval
    d = paired_bootstrap(nll_kd, nll_cpt, weights=per_doc_tokens)    # the difference, resampling documents
    agg = across_seeds([0.41, 0.44, 0.39])                            # {"mean", "std", "n", "values"}

Every interval is a percentile bootstrap: documents (items) are drawn with replacement `n_resamples` times and the
statistic recomputed; the interval is the (1 - level) / 2 and (1 + level) / 2 quantiles of those statistics. With
`weights` the statistic is a ratio of sums, sum(values) / sum(weights) over the drawn documents (per-token NLL from
per-document sums); without, the plain mean. A paired bootstrap draws the same documents for both arms, so the
variation shared by both (hard documents are hard for every model) cancels in the difference.
"""
from __future__ import annotations

import numpy as np

from fa_jax.errors import FaJaxError

N_RESAMPLES = 10_000
LEVEL = 0.95


def _vector(x, name: str, n: int | None = None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise FaJaxError(f"{name}: shape {a.shape}; expected a non-empty 1-D sequence of numbers")
    if n is not None and a.size != n:
        raise FaJaxError(f"{name}: {a.size} values; expected {n}, one per document (item)")
    if not np.all(np.isfinite(a)):
        raise FaJaxError(f"{name}: {int(np.sum(~np.isfinite(a)))} values are not finite")
    return a


def _check(level: float, n_resamples: int) -> None:
    if not 0.0 < float(level) < 1.0:
        raise FaJaxError(f"level={level!r}: expected a number between 0 and 1 (e.g. 0.95)")
    if not isinstance(n_resamples, int) or n_resamples < 1:
        raise FaJaxError(f"n_resamples={n_resamples!r}: expected an integer >= 1")


def _resampled(values: np.ndarray, weights: np.ndarray | None, n_resamples: int, seed: int) -> np.ndarray:
    """The statistic on `n_resamples` draws of the documents with replacement (in blocks: bounded memory)."""
    rng = np.random.default_rng(seed)
    n = values.size
    out = np.empty(n_resamples)
    block = max(1, (1 << 22) // n)
    for start in range(0, n_resamples, block):
        idx = rng.integers(0, n, size=(min(block, n_resamples - start), n))
        num = values[idx].sum(axis=1)
        out[start:start + len(idx)] = num / (weights[idx].sum(axis=1) if weights is not None else n)
    return out


def _estimate(values: np.ndarray, weights: np.ndarray | None) -> float:
    return float(values.sum() / weights.sum()) if weights is not None else float(values.mean())


def bootstrap(values, *, weights=None, level: float = LEVEL, n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """{"estimate", "lo", "hi", "level", "n"}: the mean of `values` (or sum(values) / sum(weights)) with its
    percentile-bootstrap interval over the documents (items)."""
    _check(level, n_resamples)
    v = _vector(values, "values")
    w = None if weights is None else _vector(weights, "weights", v.size)
    if w is not None and np.any(w <= 0):
        raise FaJaxError("weights: every document needs a positive weight (its number of scored tokens)")
    stats = _resampled(v, w, n_resamples, seed)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return {"estimate": _estimate(v, w), "lo": float(lo), "hi": float(hi), "level": float(level), "n": int(v.size)}


def paired_bootstrap(a, b, *, weights=None, level: float = LEVEL, n_resamples: int = N_RESAMPLES,
                     seed: int = 0) -> dict:
    """The difference a - b (per document, same documents in the same order) as `bootstrap` reports it: the
    estimate, its interval and "excludes_zero" (whether the interval lies wholly on one side of 0)."""
    va = _vector(a, "a")
    vb = _vector(b, "b", va.size)
    out = bootstrap(va - vb, weights=weights, level=level, n_resamples=n_resamples, seed=seed)
    out["excludes_zero"] = bool(out["lo"] > 0 or out["hi"] < 0)
    return out


def across_seeds(values) -> dict:
    """{"mean", "std", "n", "values"} of one metric over runs with different seeds; std is the sample standard
    deviation (ddof 1; 0 for a single run)."""
    v = _vector(values, "values")
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size),
            "values": [float(x) for x in v]}


def format_interval(ci: dict, digits: int = 3, signed: bool = False) -> str:
    """ "0.412 [0.398, 0.427]" (signed: "+0.012 [-0.004, +0.029]")."""
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(ci['estimate'])} [{f.format(ci['lo'])}, {f.format(ci['hi'])}]"


def format_spread(agg: dict, digits: int = 3) -> str:
    """ "0.412 ± 0.015 (3 seeds)": mean ± standard deviation across seeds."""
    return f"{agg['mean']:.{digits}f} ± {agg['std']:.{digits}f} ({agg['n']} seed{'s' if agg['n'] != 1 else ''})"
