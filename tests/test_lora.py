"""The LoRA tree: exact identity at init, equality with materialized weights, gradients to adapters only."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa_jax
from fa_jax import lora
from fa_jax.tree import flatten


def _randomize_b(tree, seed=1, std=0.05):
    """Non-zero B everywhere, so the adapter actually changes the model."""
    flat = flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
    out = {p: (std * jax.random.normal(k, v.shape) if p.endswith("lora_B") else v) for k, (p, v) in zip(keys, flat.items())}
    from fa_jax.tree import unflatten
    return unflatten(out)


@pytest.fixture(scope="module")
def llama(hf_dirs):
    return fa_jax.load_model(hf_dirs["llama"][0])


def test_init_logits_equal_base_exactly(llama):
    config, params = llama
    ad = fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=4, alpha=8)
    toks = np.arange(10)[None] + 3
    np.testing.assert_array_equal(np.asarray(fa_jax.forward(config, params, toks, adapters=ad)),
                                  np.asarray(fa_jax.forward(config, params, toks)))
    mods = dict(lora.iter_modules(ad))
    assert len(mods) == 2 * 7
    m = mods["model.layers.1.mlp.down_proj"]
    assert m["lora_A"].shape == (128, 4) and m["lora_B"].shape == (4, 64) and float(m["scale"]) == 2.0
    assert float(jnp.abs(m["lora_A"]).max()) > 0 and float(jnp.abs(m["lora_B"]).max()) == 0


def test_forward_equals_materialized_weights(llama):
    config, params = llama
    ad = _randomize_b(fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=4, alpha=8))
    toks = np.random.RandomState(0).randint(0, 256, (2, 9))
    with_adapter = np.asarray(fa_jax.forward(config, params, toks, adapters=ad))
    merged = np.asarray(fa_jax.forward(config, fa_jax.merge_lora(params, ad), toks))
    base = np.asarray(fa_jax.forward(config, params, toks))
    assert np.abs(with_adapter - base).max() > 1e-3  # the adapter does something
    np.testing.assert_allclose(with_adapter, merged, atol=1e-5, rtol=0)
    # materialize is W + scale * A @ B, checked in NumPy
    m = flatten(ad)
    W = np.asarray(params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"])
    A, B = np.asarray(m["model.layers.0.self_attn.q_proj.lora_A"]), np.asarray(m["model.layers.0.self_attn.q_proj.lora_B"])
    got = lora.materialize(jnp.asarray(W), {"lora_A": A, "lora_B": B, "scale": jnp.float32(2.0)})
    np.testing.assert_allclose(np.asarray(got), W + 2.0 * A @ B, atol=1e-6)


def test_targets_and_rslora(llama):
    config, _ = llama
    ad = fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=16, alpha=8, targets=["q_proj", "v_proj"],
                          use_rslora=True)
    paths = [p for p, _ in lora.iter_modules(ad)]
    assert paths == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    assert float(dict(lora.iter_modules(ad))[paths[0]]["scale"]) == pytest.approx(8 / 4)
    one = fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=2, alpha=2,
                           targets=["model.layers.1.mlp.up_proj"], rank_pattern={"up_proj": 3})
    (p, m), = lora.iter_modules(one)
    assert p == "model.layers.1.mlp.up_proj" and m["lora_A"].shape == (64, 3)


def test_gradients_reach_adapters_only(llama):
    config, params = llama
    ad = _randomize_b(fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=4, alpha=8))
    toks = jnp.asarray(np.random.RandomState(1).randint(0, 256, (2, 8)))

    def loss(adapters):
        logits = fa_jax.forward(config, params, toks[:, :-1], adapters=adapters)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), toks[:, 1:, None], -1))

    loss = jax.jit(loss)
    grads = jax.jit(jax.grad(loss))(ad)
    flat = flatten(grads)
    assert set(flat) == set(flatten(ad))  # the gradient tree is the adapter tree: no base leaves
    assert all(float(jnp.abs(v).max()) > 0 for p, v in flat.items() if p.endswith(("lora_A", "lora_B")))
    assert all(float(v) == 0 for p, v in flat.items() if p.endswith("scale"))  # scale is a constant
    mask = flatten(lora.trainable_mask(ad))
    assert [p for p, m in mask.items() if not m] == [p for p in flat if p.endswith("scale")]
    # finite differences along a random direction agree with the analytic gradient
    direction = jax.tree.map(lambda g: jnp.sign(g), grads)
    eps = 1e-3
    plus = jax.tree.map(lambda a, d: a + eps * d, ad, direction)
    minus = jax.tree.map(lambda a, d: a - eps * d, ad, direction)
    fd = (loss(plus) - loss(minus)) / (2 * eps)
    an = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction))
             if g.ndim)  # scale leaves have zero gradient
    assert abs(float(fd) - an) < 2e-2 * abs(an)


def test_dropout_only_in_training(llama):
    config, params = llama
    ad = _randomize_b(fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=4, alpha=8))
    toks = np.arange(12)[None] + 5
    ref = np.asarray(fa_jax.forward(config, params, toks, adapters=ad))
    same = np.asarray(fa_jax.forward(config, params, toks, adapters=ad, dropout_rate=0.0, rng=jax.random.PRNGKey(3)))
    np.testing.assert_array_equal(ref, same)
    d1 = np.asarray(fa_jax.forward(config, params, toks, adapters=ad, dropout_rate=0.3, rng=jax.random.PRNGKey(3)))
    d2 = np.asarray(fa_jax.forward(config, params, toks, adapters=ad, dropout_rate=0.3, rng=jax.random.PRNGKey(4)))
    assert np.abs(d1 - ref).max() > 1e-4 and np.abs(d1 - d2).max() > 1e-4
    # dropout acts on the adapter path only: with B = 0 it changes nothing
    zero = fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=4, alpha=8)
    np.testing.assert_array_equal(
        np.asarray(fa_jax.forward(config, params, toks, adapters=zero, dropout_rate=0.5, rng=jax.random.PRNGKey(3))),
        np.asarray(fa_jax.forward(config, params, toks)))


def test_low_rank_backward_equals_autodiff_of_the_formula():
    """The written-out backward pass of the LoRA term against JAX's own derivative of scale * (x @ A) @ B."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 12)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((12, 3)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, 5, 7)), jnp.float32)
    adapter = {"lora_A": a, "lora_B": b, "scale": jnp.float32(1.5)}
    y = jnp.zeros((2, 5, 7))

    def plain(x, a, b):
        return y + 1.5 * np.float32(1) * jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", x, a), b)

    def ours(x, a, b):
        return lora.apply(x, y, {**adapter, "lora_A": a, "lora_B": b})

    want_y, want_vjp = jax.vjp(plain, x, a, b)
    got_y, got_vjp = jax.vjp(ours, x, a, b)
    np.testing.assert_allclose(np.asarray(got_y), np.asarray(want_y), rtol=1e-6, atol=1e-6)
    for got, want in zip(got_vjp(g), want_vjp(g)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # the scale is a constant of the adapter: zero cotangent
    ds = jax.grad(lambda s: jnp.sum(lora.apply(x, y, {**adapter, "scale": s})))(jnp.float32(1.5))
    assert float(ds) == 0.0
