"""Tree math (RE-Adapt) against NumPy: differences, truncated SVD, merges, subspace similarity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa_jax
from fa_jax import treemath
from fa_jax.errors import FaJaxError
from fa_jax.models import transformer
from fa_jax.tree import flatten
from test_lora import _randomize_b

CFG = fa_jax.config.from_hf_dict(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      rope_theta=10000.0))


def _pair(seed=0, rank=None):
    """(base, tuned): tuned = base + a perturbation (low-rank-ish plus noise when rank is given)."""
    base = transformer.init_params(CFG, jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 100))

    def bump(x):
        k1, k2, k3 = jax.random.split(next(keys), 3)
        if x.ndim == 2 and rank:
            low = jax.random.normal(k1, (x.shape[0], rank)) @ jax.random.normal(k2, (rank, x.shape[1])) * 0.01
            return x + low + 1e-4 * jax.random.normal(k3, x.shape)
        return x + 0.01 * jax.random.normal(k1, x.shape)

    return base, jax.tree.map(bump, base)


def test_difference_is_exact_and_pure():
    base, tuned = _pair()
    before = {k: np.asarray(v).copy() for k, v in flatten(base).items()}
    delta = treemath.difference(tuned, base)
    for p, d in flatten(delta).items():
        np.testing.assert_array_equal(np.asarray(d), np.asarray(flatten(tuned)[p]) - np.asarray(flatten(base)[p]))
    for k, v in flatten(base).items():
        np.testing.assert_array_equal(np.asarray(v), before[k])
    linear = flatten(treemath.difference(tuned, base, linear_only=True))
    assert linear and all(p.endswith(".kernel") for p in linear) and "lm_head.kernel" not in linear


def test_difference_mismatch_names_the_path():
    base, tuned = _pair()
    bad = jax.tree.map(lambda x: x, tuned)
    bad["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"] = jnp.zeros((32, 47))
    with pytest.raises(FaJaxError, match=r"model.layers.1.mlp.up_proj.kernel has shape \[32, 47\] in tuned and "
                                         r"\[32, 48\] in base"):
        treemath.difference(bad, base)
    del bad["model"]["norm"]
    with pytest.raises(FaJaxError, match="model.norm.weight is missing"):
        treemath.difference(bad, base)


@pytest.mark.parametrize("tau", [0.3, 0.5, 0.9, 1.0])
def test_truncate_tau_rule_and_eckart_young(tau):
    base, tuned = _pair(rank=3)
    delta = treemath.difference(tuned, base)
    lore, report = treemath.truncate(delta, tau=tau)
    mods = dict(fa_jax.lora.iter_modules(lore))
    assert len(report["modules"]) == 14
    for path, info in report["modules"].items():
        d = np.asarray(flatten(delta)[path + ".kernel"], np.float64)
        s = np.linalg.svd(d, compute_uv=False)
        ratio = np.cumsum(s ** 2) / np.sum(s ** 2)
        k = int(np.argmax(ratio >= tau - 1e-12)) + 1  # NumPy's answer to the tau rule
        assert info["rank"] == k, path
        approx = np.asarray(mods[path]["lora_A"]) @ np.asarray(mods[path]["lora_B"])
        err = np.linalg.norm(d - approx)
        np.testing.assert_allclose(err, np.sqrt(np.sum(s[k:] ** 2)), rtol=1e-3, atol=1e-6)
    assert report["params"] == sum(m["rank"] * sum(m["shape"]) for m in report["modules"].values())
    assert "model.norm.weight" in flatten(lore)  # non-matrix leaves kept dense
    sizes = {p: x.size for p, x in flatten(base).items()}
    linear = sum(n for p, n in sizes.items() if p.endswith("_proj.kernel"))
    kept = sum(sizes.values()) - linear
    assert report["share_of_model"] == pytest.approx((report["params"] + kept) / sum(sizes.values()), rel=1e-12)
    assert report["share_of_linear"] == pytest.approx(report["params"] / linear, rel=1e-12)
    dropped, rep = treemath.truncate(delta, tau=tau, keep_non_matrix=False, base=base)
    assert "model.norm.weight" not in flatten(dropped)
    assert rep["share_of_model"] == pytest.approx(report["params"] / sum(sizes.values()), rel=1e-12)


def test_truncate_rank_and_bad_arguments():
    base, tuned = _pair(rank=3)
    delta = treemath.difference(tuned, base)
    lore, report = treemath.truncate(delta, rank=5)
    assert {m["rank"] for m in report["modules"].values()} == {5}
    with pytest.raises(FaJaxError, match=r"rank=1000 is more than .* can have; the largest possible is \d+"):
        treemath.truncate(delta, rank=1000)
    for kw, match in (({"tau": 0.0}, r"tau=0.0 is outside \(0, 1\]"), ({"tau": 1.5}, "outside"),
                      ({"rank": 0}, "rank=0 is below 1"), ({}, "exactly one"), ({"tau": 0.5, "rank": 2}, "exactly one")):
        with pytest.raises(FaJaxError, match=match):
            treemath.truncate(delta, **kw)


def test_lowrank_svd_equals_dense_svd():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    A, B = jax.random.normal(k1, (300, 8)), jax.random.normal(k2, (8, 200))
    _, s, _ = treemath.lowrank_svd(A, B)
    dense = np.linalg.svd(np.asarray(A, np.float64) @ np.asarray(B, np.float64), compute_uv=False)[:8]
    np.testing.assert_allclose(np.asarray(s), dense, rtol=1e-4)
    # and a LoRA tree truncates through it to the same reconstruction as its dense form
    base = transformer.init_params(CFG, jax.random.PRNGKey(0))
    ad = _randomize_b(fa_jax.init_lora(CFG, jax.random.PRNGKey(1), rank=6, alpha=12), std=0.3)
    l1, r1 = treemath.truncate(ad, rank=2)
    l2, r2 = treemath.truncate(treemath.to_dense(ad), rank=2)
    for p in r1["modules"]:
        np.testing.assert_allclose(r1["modules"][p]["spectrum"][:6], r2["modules"][p]["spectrum"][:6], rtol=1e-3,
                                   atol=1e-6)
    np.testing.assert_allclose(np.asarray(fa_jax.forward(CFG, base, np.arange(9)[None], adapters=l1)),
                               np.asarray(fa_jax.forward(CFG, base, np.arange(9)[None], adapters=l2)), atol=1e-5)


def test_randomized_svd_error_against_exact():
    rng = np.random.default_rng(0)
    M = rng.standard_normal((400, 20)) @ rng.standard_normal((20, 300)) + 0.01 * rng.standard_normal((400, 300))
    u, s, vt = treemath.randomized_svd(M, 20, power_iters=2)
    exact = np.linalg.svd(M, compute_uv=False)
    rel = np.abs(np.asarray(s) - exact[:20]) / exact[:20]
    err = np.linalg.norm(M - np.asarray(u) * np.asarray(s) @ np.asarray(vt)) / np.linalg.norm(M)
    best = np.sqrt(np.sum(exact[20:] ** 2)) / np.linalg.norm(M)
    print(f"randomized SVD: max singular-value error {rel.max():.2e}, reconstruction {err:.4e} vs optimal {best:.4e}")
    assert rel.max() < 1e-3 and err < 1.01 * best


def test_merge_partial_adaptation_and_unmerge():
    base, tuned = _pair(seed=3)
    delta = treemath.difference(tuned, base)
    knowledge = _randomize_b(fa_jax.init_lora(CFG, jax.random.PRNGKey(5), rank=4, alpha=8))
    merged = treemath.merge(base, [(knowledge, 0.5), (delta, 0.25)])
    fk = flatten(treemath.to_dense(knowledge))
    for p, b in flatten(base).items():
        want = np.asarray(b) + 0.25 * np.asarray(flatten(delta)[p])
        if p in fk:
            want = want + 0.5 * np.asarray(fk[p])
        np.testing.assert_allclose(np.asarray(flatten(merged)[p]), want, atol=1e-6)
    # a = 0, b = 1, no truncation: the tuned model again
    again = treemath.merge(base, [(delta, 1.0)])
    for p, t in flatten(tuned).items():
        np.testing.assert_allclose(np.asarray(flatten(again)[p]), np.asarray(t), atol=1e-7, rtol=0)
    # a LoRA merged by the tree math equals the LoRA applied unmerged
    toks = np.arange(10)[None]
    np.testing.assert_allclose(np.asarray(fa_jax.forward(CFG, treemath.merge(base, [(knowledge, 1.0)]), toks)),
                               np.asarray(fa_jax.forward(CFG, base, toks, adapters=knowledge)), atol=1e-5)
    back = treemath.unmerge(merged, [(knowledge, 0.5), (delta, 0.25)])
    for p, b in flatten(base).items():
        np.testing.assert_allclose(np.asarray(flatten(back)[p]), np.asarray(b), atol=1e-6)
    with pytest.raises(FaJaxError, match="adapter 0 has model.layers.7"):
        treemath.merge(base, [({"model": {"layers": {"7": {"mlp": {"up_proj": {"kernel": jnp.zeros((32, 48))}}}}}}, 1)])


def test_subspace_similarity(tmp_path):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((64, 8))
    assert treemath.subspace_similarity(A, A, 8, 8) == pytest.approx(1.0)
    assert treemath.subspace_similarity(A, A @ rng.standard_normal((8, 8)), 8, 4) == pytest.approx(1.0)
    q = np.linalg.qr(rng.standard_normal((64, 16)))[0]
    assert treemath.subspace_similarity(q[:, :8], q[:, 8:], 8, 8) == pytest.approx(0.0, abs=1e-12)
    B = rng.standard_normal((64, 4))
    u1 = np.linalg.svd(A, full_matrices=False)[0]
    u2 = np.linalg.svd(B, full_matrices=False)[0]
    want = np.sum((u1[:, :3].T @ u2[:, :2]) ** 2) / 2
    assert treemath.subspace_similarity(A, B, 3, 2) == pytest.approx(want)
    png = treemath.plot_subspace_similarity(A, B, str(tmp_path / "sim.png"))
    assert open(png, "rb").read(4) == b"\x89PNG"
