"""Model arithmetic on parameter trees (RE-Adapt): differences, truncated SVD to LoRA form, merges.

All functions are pure: they return new trees and never modify their inputs.

    delta = difference(instruct, base)                      # the RE-Adapter, full rank
    lore, report = truncate(delta, tau=0.5)                 # LoRE-Adapter: per matrix, smallest rank reaching tau
    params = merge(base, [(knowledge, 0.5), (delta, 0.5)])  # partial adaptation
    params = merge(base, [(a, {"layers": [0.2, 0.4, ...], "other": 0.5})])  # one scale per layer (fa-jax tune-merge)

An adapter tree mixes two kinds of entries at base-parameter paths: dense deltas (a leaf with the base's name:
`kernel`, `bias`, `weight`, `embedding`) and LoRA modules (`{"lora_A", "lora_B", "scale"}` at a module path,
delta = scale * A @ B). `merge` accepts either, and any mix, per module. DoRA modules (LoRA plus `magnitude` [O])
have delta = m * V / ||V||_c - W with V = W + scale * A @ B, which depends on the base kernel W: `merge` takes it
from its base, `to_dense` and `truncate` need `base=`, and `unmerge` refuses them (the merge cannot be inverted
from the merged weights).
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from fa_jax import lora as lora_lib
from fa_jax.errors import FaJaxError
from fa_jax.tree import flatten, get_path, unflatten

MATRIX_LEAF = "kernel"  # linear layers; embeddings and norms are not decomposed


def layer_of(path: str) -> int | None:
    """The decoder layer a parameter path belongs to (`model.layers.<i>. ...`), or None (embedding, final norm,
    LM head, prompts)."""
    parts = path.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


def check_scale(scale, where: str = "merge"):
    """A merge scale: a number, or per layer {"layers": [s_0, ..., s_{L-1}], "other": s} ("other": the tensors
    outside the decoder layers). Returns it with floats; a FaJaxError names what is wrong."""
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        if not np.isfinite(float(scale)):
            raise FaJaxError(f"{where}: scale {scale!r} is not finite")
        return float(scale)
    if isinstance(scale, dict) and set(scale) <= {"layers", "other"} and "layers" in scale:
        layers = scale["layers"]
        if isinstance(layers, (list, tuple, np.ndarray)) and len(layers) and all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(float(v)) for v in layers):
            other = scale.get("other", 1.0)
            if isinstance(other, numbers.Real) and not isinstance(other, bool) and np.isfinite(float(other)):
                return {"layers": [float(v) for v in layers], "other": float(other)}
    raise FaJaxError(f"{where}: scale {scale!r}; expected a number or {{\"layers\": [one number per layer], "
                     "\"other\": number}")


def scale_at(scale, path: str, where: str = "merge") -> float:
    """The scale a per-layer `scale` (`check_scale`) gives the parameter at `path`; a number is the same everywhere."""
    if not isinstance(scale, dict):
        return float(scale)
    i = layer_of(path)
    if i is None:
        return float(scale.get("other", 1.0))
    if i >= len(scale["layers"]):
        raise FaJaxError(f"{where}: {path} is in layer {i}, but the per-layer scale has {len(scale['layers'])} "
                         "layers")
    return float(scale["layers"][i])


def _is_matrix(path: str, x) -> bool:
    return path.endswith("." + MATRIX_LEAF) and x.ndim == 2 and path != "lm_head.kernel"


def difference(tuned, base, linear_only: bool = False):
    """Leaf-wise `tuned - base` (in float32 for non-float32 leaves). Both trees must have the same paths, shapes
    and dtypes; a mismatch names the parameter path. `linear_only` keeps only the linear-layer matrices."""
    ft, fb = flatten(tuned), flatten(base)
    missing = sorted(set(fb) ^ set(ft))
    if missing:
        side = "tuned" if missing[0] in fb else "base"
        raise FaJaxError(f"difference: {missing[0]} is missing from the {side} tree (the trees differ in structure)")
    out = {}
    for p, b in fb.items():
        t = ft[p]
        if tuple(t.shape) != tuple(b.shape):
            raise FaJaxError(f"difference: {p} has shape {list(t.shape)} in tuned and {list(b.shape)} in base")
        if t.dtype != b.dtype:
            raise FaJaxError(f"difference: {p} has dtype {t.dtype} in tuned and {b.dtype} in base")
        if linear_only and not _is_matrix(p, b):
            continue
        dt = jnp.float32 if t.dtype != jnp.float64 else t.dtype
        out[p] = jnp.asarray(t, dt) - jnp.asarray(b, dt)
    return unflatten(out)


def rank_for_tau(s, tau: float) -> int:
    """Smallest k with sum(s[:k]**2) / sum(s**2) >= tau (0 when all singular values are 0)."""
    energy = np.asarray(s, np.float64) ** 2
    total = energy.sum()
    if total == 0:
        return 0
    ratio = np.cumsum(energy) / total
    return int(min(np.searchsorted(ratio, tau - 1e-12) + 1, len(energy)))


def lowrank_svd(A, B):
    """SVD of A @ B for A [I, R], B [R, O] without forming the product: QR of both factors and an R x R SVD.

    Returns (U [I, R], s [R], Vt [R, O]) with A @ B = U diag(s) Vt, the same singular values as the dense SVD."""
    qa, ra = jnp.linalg.qr(A.astype(jnp.float32))
    qb, rb = jnp.linalg.qr(B.astype(jnp.float32).T)
    u, s, vt = jnp.linalg.svd(ra @ rb.T, full_matrices=False)
    return qa @ u, s, (qb @ vt.T).T


def randomized_svd(M, k: int, oversample: int = 10, power_iters: int = 2, seed: int = 0):
    """Approximate top-k SVD of M [I, O] (Halko et al.): a random range finder with `power_iters` power
    iterations. Returns (U [I, k], s [k], Vt [k, O])."""
    M = jnp.asarray(M, jnp.float32)
    p = min(k + oversample, min(M.shape))
    omega = jax.random.normal(jax.random.PRNGKey(seed), (M.shape[1], p), jnp.float32)
    q, _ = jnp.linalg.qr(M @ omega)
    for _ in range(power_iters):
        q, _ = jnp.linalg.qr(M.T @ q)
        q, _ = jnp.linalg.qr(M @ q)
    u, s, vt = jnp.linalg.svd(q.T @ M, full_matrices=False)
    return (q @ u)[:, :k], s[:k], vt[:k]


def _factors(u, s, vt, k):
    """A = U_k sqrt(s_k), B = sqrt(s_k) Vt_k: the singular values shared evenly between the two factors."""
    r = jnp.sqrt(s[:k])
    return u[:, :k] * r[None, :], r[:, None] * vt[:k]


def check_tau_rank(tau, rank, tau_label: str = "tau=", rank_label: str = "rank=", where: str = "truncate") -> None:
    """tau (when given) a number in (0, 1], rank (when given) an integer >= 1 (2.5 is an error, not rank 2)."""
    if tau is not None:
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
            raise FaJaxError(f"{where}: {tau_label}{tau!r} is not a number (expected one in (0, 1])")
        if not 0.0 < float(tau) <= 1.0:
            raise FaJaxError(f"{where}: {tau_label}{tau} is outside (0, 1]")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Real) or not float(rank).is_integer():
            raise FaJaxError(f"{where}: {rank_label}{rank!r} is not an integer (expected one >= 1; ranks are not "
                             f"rounded)")
        if int(rank) < 1:
            raise FaJaxError(f"{where}: {rank_label}{rank} is below 1")


def truncate(delta, tau: float | None = None, rank: int | None = None, keep_non_matrix: bool = True,
             method: str = "exact", base=None, **randomized_kw):
    """Per-matrix truncated SVD of an adapter tree, in LoRA form. Returns (lore, report).

    Give exactly one of `tau` (keep the smallest k whose explained variance sum(s[:k]**2) / sum(s**2) reaches tau,
    0 < tau <= 1) or `rank` (k = min(rank, the spectrum's length); a rank above min(in, out) of a matrix is an
    error). Matrices are the linear layers' dense deltas (`kernel`) and LoRA modules (decomposed through
    `lowrank_svd`, never formed densely). Each becomes {"lora_A": [I, k], "lora_B": [k, O], "scale": 1}; a
    matrix whose k is 0 is left out. Non-matrix leaves (norms, biases, embeddings) stay dense when `keep_non_matrix`, else are dropped. Same-shaped dense matrices are
    decomposed together (one batched SVD). All in float32 whatever the storage dtype. `method="randomized"`
    (with `rank`) uses `randomized_svd` for very large matrices. A DoRA module needs the base params (`base`):
    its dense delta m * V / ||V||_c - W (generally full rank) is decomposed like a dense matrix.

    report: {"modules": {path: {"rank", "full_rank", "shape", "explained", "params", "dense_params", "spectrum"}},
             "params": total LoRA params, "dense_params": total of the dense matrices,
             "non_matrix_params": the kept non-matrix leaves' size (0 unless `keep_non_matrix`),
             "model_params": the whole model's (`base`'s parameters when given, else the delta tree's dense size,
             the model's own for a full difference), "share_of_model": (params + non_matrix_params) / model_params
             (RE-Adapt's Figure 3 share), "share_of_linear": params / dense_params}.
    """
    if (tau is None) == (rank is None):
        raise FaJaxError("truncate: give exactly one of tau or rank")
    check_tau_rank(tau, rank, "tau=", "rank=")
    if method not in ("exact", "randomized"):
        raise FaJaxError(f"truncate: method={method!r} (expected 'exact' or 'randomized')")
    if method == "randomized" and rank is None:
        raise FaJaxError("truncate: method='randomized' needs rank (its spectrum is partial, so tau is undefined)")

    flat = flatten(delta)
    out: dict = {}
    svds: dict[str, tuple] = {}
    dense_groups: dict[tuple, list[str]] = {}
    lora_leaves = {f"{p}.{k}" for p, ad in lora_lib.iter_modules(delta) for k in ad}
    for path, ad in lora_lib.iter_modules(delta):
        if lora_lib.is_dora(ad):  # becomes a dense kernel delta, decomposed with the dense matrices below
            if base is None:
                raise FaJaxError(f"truncate: {path} is a DoRA module, whose delta depends on the base weights: pass "
                                 f"base=params (or merge it into the base and truncate the difference)")
            d = _module_delta(path, ad, base, "truncate")
            k = f"{path}.{MATRIX_LEAF}"
            flat[k] = d + flat[k].astype(jnp.float32) if k in flat else d
            continue
        check_factors(path, ad, "truncate")
        u, s, vt = lowrank_svd(ad["lora_A"] * ad["scale"].astype(jnp.float32), ad["lora_B"])
        svds[path] = (u, s, vt)
    non_matrix = 0
    for p, x in flat.items():
        if p in lora_leaves:
            continue
        if _is_matrix(p, x):
            dense_groups.setdefault(tuple(x.shape), []).append(p)
        else:
            non_matrix += int(np.prod(x.shape))
            if keep_non_matrix:
                out[p] = x
    for shape, paths in dense_groups.items():
        if method == "randomized":
            for p in paths:
                svds[p[: -len(MATRIX_LEAF) - 1]] = randomized_svd(flat[p], int(rank), **randomized_kw)
            continue
        stacked = jnp.stack([jnp.asarray(flat[p], jnp.float32) for p in paths])
        u, s, vt = jnp.linalg.svd(stacked, full_matrices=False)
        for i, p in enumerate(paths):
            svds[p[: -len(MATRIX_LEAF) - 1]] = (u[i], s[i], vt[i])
    modules, total, dense_total = {}, 0, 0
    for path in sorted(svds):
        u, s, vt = svds[path]
        s_np = np.asarray(s)
        full = int(np.sum(s_np > 0))
        d_in, d_out = u.shape[0], vt.shape[1]
        if rank is not None and int(rank) > min(d_in, d_out):
            raise FaJaxError(f"truncate: rank={rank} is more than {path} ({d_in} x {d_out}) can have; the largest "
                             f"possible is {min(d_in, d_out)}")
        k = rank_for_tau(s_np, float(tau)) if tau is not None else min(int(rank), len(s_np))
        energy = s_np.astype(np.float64) ** 2
        modules[path] = {"rank": k, "full_rank": full, "shape": [d_in, d_out],
                         "explained": float(energy[:k].sum() / energy.sum()) if energy.sum() else 1.0,
                         "params": k * (d_in + d_out), "dense_params": d_in * d_out, "spectrum": s_np}
        total += k * (d_in + d_out)
        dense_total += d_in * d_out
        if k:
            a, b = _factors(u, s, vt, k)
            out[f"{path}.lora_A"], out[f"{path}.lora_B"] = a, b
            out[f"{path}.scale"] = jnp.ones((), jnp.float32)
    model = (sum(int(np.prod(x.shape)) for x in flatten(base).values()) if base is not None
             else dense_total + non_matrix)
    report = {"modules": modules, **param_shares(total, dense_total, non_matrix if keep_non_matrix else 0, model)}
    return unflatten(out), report


def param_shares(params: int, dense_params: int, non_matrix_params: int, model_params: int) -> dict:
    """The parameter counts of a LoRE-Adapter and its two shares: of the whole model (RE-Adapt counts this one:
    LoRA factors plus the kept non-matrix deltas, over every parameter of the model) and of the linear layers
    (LoRA factors over the dense matrices they replace)."""
    return {"params": int(params), "dense_params": int(dense_params), "non_matrix_params": int(non_matrix_params),
            "model_params": int(model_params),
            "share_of_model": (params + non_matrix_params) / model_params if model_params else 0.0,
            "share_of_linear": params / dense_params if dense_params else 0.0}


def check_factors(path: str, ad, caller: str) -> None:
    """A one-line error (not a matmul traceback) when a module's lora_A [I, R] and lora_B [R, O] do not chain."""
    a, b = tuple(np.shape(ad["lora_A"])), tuple(np.shape(ad["lora_B"]))
    if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
        raise FaJaxError(f"{caller}: {path} has lora_A {list(a)} and lora_B {list(b)}, expected [in, r] and "
                         f"[r, out] with the same r")


def _module_delta(path: str, ad, base, caller: str):
    """The dense [I, O] float32 delta of one LoRA (scale * A @ B) or DoRA (m * V / ||V||_c - W) module."""
    check_factors(path, ad, caller)
    if not lora_lib.is_dora(ad):
        return ad["scale"].astype(jnp.float32) * (ad["lora_A"].astype(jnp.float32) @ ad["lora_B"].astype(jnp.float32))
    if base is None:
        raise FaJaxError(f"{caller}: {path} is a DoRA module, whose delta m * V / ||V||_c - W depends on the base "
                         f"kernel W: pass base=params")
    try:
        w = jnp.asarray(get_path(base, f"{path}.{MATRIX_LEAF}"), jnp.float32)
    except KeyError:
        raise FaJaxError(f"{caller}: DoRA module {path} has no {path}.{MATRIX_LEAF} in the base model") from None
    if w.ndim == 2:
        lora_lib.check_module(path, ad, *w.shape, where=caller)  # one line, not a broadcasting error
    return lora_lib.materialize(w, ad) - w


def to_dense(adapter, base=None):
    """Every LoRA module of an adapter tree as a dense delta (`kernel` = scale * A @ B); dense leaves unchanged.

    DoRA modules need the base params (`base`): their `kernel` delta is m * V / ||V||_c - W, V = W + scale * A @ B.
    """
    flat = flatten(adapter)
    out = {}
    modules = dict(lora_lib.iter_modules(adapter))
    for path, ad in modules.items():
        out[f"{path}.kernel"] = _module_delta(path, ad, base, "to_dense")
    skip = {f"{p}.{k}" for p, ad in modules.items() for k in ad}
    for p, x in flat.items():
        if p not in skip:
            if p in out:
                out[p] = out[p] + x.astype(jnp.float32)
            else:
                out[p] = x
    return unflatten(out)


def merge(base, adapters):
    """`base + sum(scale_i * delta_i)` for [(adapter, scale), ...] (a scale is a number or one per layer,
    `check_scale`); each adapter's deltas are added separately, so
    there are no cross terms between different adapters' A and B. Leaves keep the base's dtype (the sum is formed in
    float32). A DoRA module's delta is computed from this base: m * V / ||V||_c - W with V = W + scale * A @ B (at
    scale 1 the merged kernel is PEFT's merged DoRA weight). `unmerge` is the same call with negative scales."""
    flat = flatten(base)
    acc: dict[str, jnp.ndarray] = {}
    for i, (adapter, scale) in enumerate(adapters):
        scale = check_scale(scale, "merge")
        for p, d in flatten(to_dense(adapter, base)).items():
            if p not in flat:
                raise FaJaxError(f"merge: adapter {i} has {p}, which the base model does not have")
            if tuple(d.shape) != tuple(flat[p].shape):
                raise FaJaxError(f"merge: adapter {i} has {p} of shape {list(d.shape)}, the base has "
                                 f"{list(flat[p].shape)}")
            term = scale_at(scale, p) * d.astype(jnp.float32)
            acc[p] = acc[p] + term if p in acc else term
    out = dict(flat)
    for p, d in acc.items():
        out[p] = (flat[p].astype(jnp.float32) + d).astype(flat[p].dtype)
    return unflatten(out)


def unmerge(merged, adapters):
    """Undo `merge(base, adapters)` (up to rounding): the same call with negated scales. Not for DoRA adapters:
    their delta depends on the base weights, which the merged tree no longer holds."""
    for i, (a, _) in enumerate(adapters):
        dora = [p for p, ad in lora_lib.iter_modules(a) if lora_lib.is_dora(ad)]
        if dora:
            raise FaJaxError(f"unmerge: adapter {i} has DoRA modules ({dora[0]}, ...): a DoRA merge cannot be undone "
                             "from the merged weights (its delta depends on the base); merge the base again instead")
    def negated(s):
        s = check_scale(s, "unmerge")
        return {"layers": [-v for v in s["layers"]], "other": -s["other"]} if isinstance(s, dict) else -s

    return merge(merged, [(a, negated(s)) for a, s in adapters])


def subspace_similarity(A1, A2, i: int, j: int) -> float:
    """Normalized overlap of the top-i and top-j singular directions of two adapters' A matrices [in, r]:
    ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), in [0, 1] (1: one subspace contains the other)."""
    u1 = np.linalg.svd(np.asarray(A1, np.float64), full_matrices=False)[0]
    u2 = np.linalg.svd(np.asarray(A2, np.float64), full_matrices=False)[0]
    if not (1 <= i <= u1.shape[1] and 1 <= j <= u2.shape[1]):
        raise FaJaxError(f"subspace_similarity: i={i}, j={j} must be within the ranks {u1.shape[1]}, {u2.shape[1]}")
    return float(np.linalg.norm(u1[:, :i].T @ u2[:, :j]) ** 2 / min(i, j))


def plot_subspace_similarity(A1, A2, path: str, labels=("A1", "A2"), title: str = "subspace similarity") -> str:
    """Heat map of subspace_similarity(A1, A2, i, j) over all i, j (as in the LoRA paper's rank study), as a PNG."""
    import matplotlib  # lazy: about a second to import, needed for the plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r1, r2 = min(np.shape(A1)), min(np.shape(A2))
    grid = np.array([[subspace_similarity(A1, A2, i, j) for j in range(1, r2 + 1)] for i in range(1, r1 + 1)])
    fig, ax = plt.subplots(figsize=(5, 4))
    im = ax.imshow(grid, origin="lower", vmin=0, vmax=1, cmap="viridis",
                   extent=(0.5, r2 + 0.5, 0.5, r1 + 0.5), aspect="auto")
    ax.set_xlabel(f"j (top directions of {labels[1]})")
    ax.set_ylabel(f"i (top directions of {labels[0]})")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_explained_variance(report, path: str, modules=None, taus=(0.25, 0.5, 0.75, 0.9)) -> str:
    """Cumulative explained variance against rank for a few matrices (RE-Adapt Figure 2), as a PNG."""
    import matplotlib  # lazy: about a second to import, needed for the plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = modules or sorted(report["modules"])[:: max(1, len(report["modules"]) // 6)][:6]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        s = np.asarray(report["modules"][name]["spectrum"], np.float64)
        if not (s ** 2).sum():
            continue
        ax.plot(np.arange(1, len(s) + 1), np.cumsum(s ** 2) / (s ** 2).sum(), label=name)
    for t in taus:
        ax.axhline(t, color="grey", lw=0.5, ls="--")
    longest = max((len(report["modules"][n]["spectrum"]) for n in names), default=0)
    if longest > 32:  # a log axis for full-rank deltas; small ranks read better on a linear one
        ax.set_xscale("log")
    ax.set_xlabel("rank k")
    ax.set_ylabel("explained variance")
    ax.set_title("explained variance of the adapter's matrices")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def param_share_curve(spectra: dict, taus, fixed: int = 0, total: int | None = None) -> list[float]:
    """(LoRE parameter count + `fixed`) / `total` for each tau, from {path: (singular values, (I, O))}. By default
    the share of the dense matrices; `fixed` = kept non-matrix deltas and `total` = the model's parameter count give
    the share of the whole model (RE-Adapt Figure 3)."""
    out = []
    total = total or sum(i * o for _, (i, o) in spectra.values())
    for tau in taus:
        out.append((sum(rank_for_tau(s, tau) * (i + o) for s, (i, o) in spectra.values()) + fixed) / total)
    return out


# ------------------------------------------------------------------------------------------- combining adapters


def combine(adapters, tau: float | None = None, rank: int | None = None, budget: float | None = None, base=None):
    """The weighted sum of several adapters as one LoRA: sum_i scale_i * delta_i, truncated. Returns (lora, report).

    adapters: [(tree, scale), ...] (a scale is a number or one per layer, `check_scale`); each tree holds LoRA modules and/or dense `kernel` deltas (and DoRA modules with
    `base`). A module whose terms are all LoRA is combined from the factors: A = [c_1 A_1, c_2 A_2, ...] [I, sum R],
    B = [B_1; B_2; ...] [sum R, O] (c_i = scale_i * the module's own scale), QR of both sides and the SVD of the
    small core (`lowrank_svd`), so the dense [I, O] matrix is never formed. A module with any dense term (a dense
    delta, or a DoRA module whose delta m * V / ||V||_c - W is in general full rank) is summed densely and
    decomposed by a dense SVD. Non-matrix leaves are left out.

    Exactly one of: `tau` (per matrix, the smallest rank whose explained variance reaches tau), `rank` (per matrix,
    at most that rank), `budget` (one parameter budget over all matrices: an int is a number of LoRA parameters, a
    float in (0, 1) a share of the combined matrices' dense parameters). Under a budget the directions of every
    matrix are visited by decreasing singular value, across matrices, and each is kept if its cost (in + out
    parameters of its matrix) still fits what is left: the largest singular values win wherever they are.

    report: {"modules": {path: {"rank", "shape", "spectrum", "explained", "source": "factors" | "dense"}},
             "rank_pattern": {path: rank}, "params", "dense_params", "budget" (parameters, under a budget)}.
    The returned LoRA's modules have scale 1 (A = U_k sqrt(s_k), B = sqrt(s_k) Vt_k); a module whose rank is 0 is
    left out."""
    given = [x is not None for x in (tau, rank, budget)]
    if sum(given) != 1:
        raise FaJaxError("combine: give exactly one of tau, rank or budget")
    check_tau_rank(tau, rank, "tau=", "rank=", where="combine")
    if not adapters:
        raise FaJaxError("combine: no adapters given; expected [(adapter, scale), ...]")
    terms: dict[str, list] = {}  # path -> [("factors", A, B) | ("dense", D)]
    for i, (tree, scale) in enumerate(adapters):
        scale = check_scale(scale, "combine")
        modules = dict(lora_lib.iter_modules(tree))
        for path, ad in modules.items():
            c = scale_at(scale, path, "combine")
            if lora_lib.is_dora(ad):
                terms.setdefault(path, []).append(("dense", c * _module_delta(path, ad, base, "combine")))
                continue
            check_factors(path, ad, "combine")
            a = ad["lora_A"].astype(jnp.float32) * (c * ad["scale"].astype(jnp.float32))
            terms.setdefault(path, []).append(("factors", a, ad["lora_B"].astype(jnp.float32)))
        skip = {f"{p}.{k}" for p, ad in modules.items() for k in ad}
        for p, x in flatten(tree).items():
            if p not in skip and _is_matrix(p, x) and p.endswith("." + MATRIX_LEAF):
                c = scale_at(scale, p, "combine")
                terms.setdefault(p[: -len(MATRIX_LEAF) - 1], []).append(("dense", c * jnp.asarray(x, jnp.float32)))
    svds, sources = {}, {}
    for path, ts in sorted(terms.items()):
        shapes = {(t[1].shape[0], t[2].shape[1]) if t[0] == "factors" else tuple(t[1].shape) for t in ts}
        if len(shapes) != 1:
            raise FaJaxError(f"combine: {path} has matrices of different shapes across the adapters "
                             f"({sorted(shapes)}); expected adapters of one model")
        if all(t[0] == "factors" for t in ts):
            svds[path] = lowrank_svd(jnp.concatenate([t[1] for t in ts], axis=1),
                                     jnp.concatenate([t[2] for t in ts], axis=0))
            sources[path] = "factors"
        else:
            dense = sum(t[1] if t[0] == "dense" else t[1] @ t[2] for t in ts)
            svds[path] = jnp.linalg.svd(dense, full_matrices=False)
            sources[path] = "dense"
    spectra = {p: np.asarray(s, np.float64) for p, (_, s, _) in svds.items()}
    shapes = {p: (int(u.shape[0]), int(vt.shape[1])) for p, (u, _, vt) in svds.items()}
    dense_params = sum(i * o for i, o in shapes.values())
    if budget is not None:
        limit = _budget_params(budget, dense_params)
        ranks = budget_ranks(spectra, shapes, limit)
    elif tau is not None:
        ranks = {p: rank_for_tau(s, float(tau)) for p, s in spectra.items()}
    else:
        ranks = {p: min(int(rank), int(np.sum(s > 0))) for p, s in spectra.items()}
    out, modules, params = {}, {}, 0
    for path, (u, s, vt) in svds.items():
        k = ranks[path]
        energy = spectra[path] ** 2
        modules[path] = {"rank": k, "shape": list(shapes[path]), "spectrum": spectra[path], "source": sources[path],
                         "explained": float(energy[:k].sum() / energy.sum()) if energy.sum() else 1.0}
        params += k * sum(shapes[path])
        if k:
            a, b = _factors(u, s, vt, k)
            out[f"{path}.lora_A"], out[f"{path}.lora_B"] = a, b
            out[f"{path}.scale"] = jnp.ones((), jnp.float32)
    report = {"modules": modules, "rank_pattern": {p: m["rank"] for p, m in modules.items() if m["rank"]},
              "params": int(params), "dense_params": int(dense_params)}
    if budget is not None:
        report["budget"] = int(limit)
    return unflatten(out), report


def _budget_params(budget, dense_params: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or budget <= 0:
        raise FaJaxError(f"combine: budget={budget!r}; expected a number of parameters (an int >= 1) or a share "
                         "of the dense parameters in (0, 1)")
    if isinstance(budget, numbers.Integral):
        return int(budget)
    if budget >= 1:
        raise FaJaxError(f"combine: budget={budget}: a float budget is a share of the dense parameters, in (0, 1); "
                         "give an int for a number of parameters")
    return int(budget * dense_params)


def budget_ranks(spectra: dict, shapes: dict, limit: int) -> dict:
    """{path: rank} spending at most `limit` LoRA parameters: every matrix's singular directions in one list by
    decreasing singular value (ties: path, then index), each kept if its matrix's in + out parameters still fit.
    A matrix's directions are taken in order, so its rank is the count kept."""
    order = sorted(((float(s), p, j) for p, sp in spectra.items() for j, s in enumerate(sp) if s > 0),
                   key=lambda x: (-x[0], x[1], x[2]))
    ranks, left = {p: 0 for p in spectra}, int(limit)
    for _, p, j in order:
        cost = sum(shapes[p])
        if j == ranks[p] and cost <= left:
            ranks[p] += 1
            left -= cost
    return ranks
