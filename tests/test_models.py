"""Forward-pass parity with Hugging Face transformers (PyTorch) for every family, on tiny random checkpoints."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa_jax
from fa_jax.models import transformer
from helpers import FAMILIES, hf_logits

TOL = 1e-4


def _tokens(B, T, seed=0):
    return np.random.RandomState(seed).randint(3, 256, (B, T))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, hf_dirs):
    path, model = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    toks = _tokens(2, 12)
    out = np.asarray(fa_jax.forward(config, params, toks))
    assert out.dtype == np.float32 and out.shape == (2, 12, 256)
    np.testing.assert_allclose(out, hf_logits(model, toks), atol=TOL, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_padding_left_and_right_match_transformers(family, hf_dirs):
    path, model = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    toks = _tokens(3, 10, seed=1)
    mask = np.ones((3, 10), np.int64)
    mask[0, :4] = 0  # left padded
    mask[1, 7:] = 0  # right padded
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)  # what transformers' generate uses
    ref = hf_logits(model, toks, mask=mask, positions=positions)
    out = np.asarray(fa_jax.forward(config, params, toks, mask=mask))  # positions derived from the mask
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=TOL, rtol=0)
    # padding changes nothing for the real tokens: row 0 equals the unpadded forward of its real part
    alone = np.asarray(fa_jax.forward(config, params, toks[:1, 4:]))
    np.testing.assert_allclose(out[0, 4:], alone[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama3", "gemma"])
def test_explicit_positions_match_transformers(family, hf_dirs):
    path, model = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    toks = _tokens(1, 8, seed=2)
    pos = np.arange(8)[None] + 37
    np.testing.assert_allclose(np.asarray(fa_jax.forward(config, params, toks, positions=pos)),
                               hf_logits(model, toks, positions=pos), atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_documents_do_not_attend_across(family, hf_dirs):
    """A packed row [doc1 doc2 pad] gives, per document, the logits transformers gives that document alone."""
    path, model = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    d1, d2 = _tokens(1, 5, 3)[0], _tokens(1, 6, 4)[0]
    row = np.concatenate([d1, d2, [0, 0]])[None]
    seg = np.array([[1] * 5 + [2] * 6 + [0, 0]])
    out = np.asarray(fa_jax.forward(config, params, row, segment_ids=seg))
    np.testing.assert_allclose(out[0, :5], hf_logits(model, d1[None])[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(out[0, 5:11], hf_logits(model, d2[None])[0], atol=TOL, rtol=0)


def test_sliding_window_is_applied(hf_dirs):
    path, _ = hf_dirs["mistral"]
    config, params = fa_jax.load_model(path)
    assert config.sliding_windows == (5, 5)
    toks = _tokens(1, 12, 5)
    windowed = np.asarray(fa_jax.forward(config, params, toks))
    full = np.asarray(fa_jax.forward(config.replace(sliding_windows=()), params, toks))
    np.testing.assert_allclose(windowed[0, :5], full[0, :5], atol=1e-6)  # inside the window: identical
    assert np.abs(windowed[0, 6:] - full[0, 6:]).max() > 1e-4  # beyond it the window must matter


@pytest.mark.parametrize("family", ["llama3", "gemma"])
def test_bfloat16_compute_is_close(family, hf_dirs):
    path, _ = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    toks = _tokens(2, 12, 6)
    ref = np.asarray(fa_jax.forward(config, params, toks))
    out = fa_jax.forward(config, params, toks, dtype="bfloat16")
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - ref).max() < 0.05 * np.abs(ref).max()
    p16 = transformer.cast(params, jnp.bfloat16)
    out2 = np.asarray(fa_jax.forward(config, p16, toks))
    assert np.abs(out2 - ref).max() < 0.05 * np.abs(ref).max()


def test_forward_jits_once_for_same_shapes(hf_dirs):
    path, _ = hf_dirs["llama"]
    config, params = fa_jax.load_model(path)
    traces = []

    def f(p, t):
        traces.append(1)
        return fa_jax.forward(config, p, t)

    f = jax.jit(f)
    for s in range(3):
        f(params, _tokens(2, 12, s)).block_until_ready()
    assert len(traces) == 1


def test_segment_positions():
    seg = jnp.array([[0, 0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(transformer.segment_positions(seg),
                                  [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 0, 1, 2]])


@pytest.mark.parametrize("T,window", [(256, 0), (512, 100), (96, 0)])
def test_blocked_causal_attention_matches_numpy(T, window):
    """Queries processed in causal blocks (2 for T=256, 4 for T=512) give plain masked softmax attention, with
    packed documents and a sliding window."""
    from fa_jax.models import layers

    assert layers.query_blocks(256) == 2 and layers.query_blocks(512) == 4 and layers.query_blocks(96) == 1
    rng = np.random.default_rng(T)
    B, G, Q, K = 2, 2, 3, 8
    q = rng.standard_normal((B, T, G, Q, K)).astype(np.float32)
    k = rng.standard_normal((B, T, G, K)).astype(np.float32)
    v = rng.standard_normal((B, T, G, K)).astype(np.float32)
    seg = np.ones((B, T), np.int32)
    seg[0, T // 3:] = 2  # two documents in row 0
    seg[1, -7:] = 0  # padding at the end of row 1
    mask = np.asarray(layers.attention_mask(jnp.asarray(seg), window=window))
    got = np.asarray(jax.jit(layers.causal_attention)(q, k, v, jnp.asarray(mask)))
    scores = np.einsum("btgqk,bsgk->bgqts", q, k) / np.sqrt(K)
    scores = np.where(mask[:, None, None], scores, -np.inf)
    scores = np.where(mask.any(-1)[:, None, None, :, None], scores, 0.0)  # fully masked rows: uniform, like ours
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bgqts,bsgk->btgqk", p, v)
    real = seg > 0
    np.testing.assert_allclose(got[real], want[real], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("remat", ["full", "dots", "all_dots", "mlp", "mlp_qkv"])
def test_remat_policies_change_nothing(remat, hf_dirs):
    from fa_jax import lora

    config, params = fa_jax.load_model(hf_dirs["llama"][0])
    ad = lora.init_lora(config, jax.random.PRNGKey(0), rank=4)
    ad = jax.tree.map(lambda x: x + 0.01 if x.ndim == 2 else x, ad)
    toks = jnp.arange(24).reshape(2, 12) % config.vocab_size

    def loss(a, remat):
        return jnp.sum(transformer.hidden_states(config, params, toks, a, remat=remat) ** 2)

    f = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    want_v, want_g = f(ad, False)
    got_v, got_g = f(ad, remat)
    np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):  # float32 rounding of a different schedule
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-5 * float(np.abs(w).max()) + 1e-7)


@pytest.mark.parametrize("remat,kept", [("full", ()), ("mlp", ("gate_proj", "up_proj")),
                                        ("mlp_qkv", ("gate_proj", "up_proj", "q_proj", "k_proj", "v_proj"))])
def test_named_remat_policies_keep_their_projections(remat, kept, hf_dirs):
    """What the backward pass stores under each policy: the named projection outputs of every layer, no others."""
    import contextlib
    import io

    from fa_jax import lora

    config, params = fa_jax.load_model(hf_dirs["llama"][0])
    ad = lora.init_lora(config, jax.random.PRNGKey(0), rank=4)
    toks = jnp.arange(24).reshape(2, 12) % config.vocab_size
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(
            lambda a: jnp.sum(transformer.hidden_states(config, params, toks, a, remat=remat) ** 2), ad)
    names = re.findall(r"named '(\w+)'", out.getvalue())
    assert sorted(names) == sorted(list(kept) * config.num_hidden_layers), out.getvalue()


def test_unknown_remat_policy_is_a_clear_error():
    from fa_jax.errors import FaJaxError

    with pytest.raises(FaJaxError, match="model.remat=.sometimes.: expected false, true or one of none, full, dots"):
        transformer.remat_policy("sometimes")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_flax_modules_declare_the_parameter_table(family, hf_dirs):
    """The Flax modules' own parameters (Model.init under eval_shape: paths, shapes, logical axis names) are exactly
    the table that loaders and sharding read (models/spec.py), and `apply` with the loaded params is `forward`."""
    import flax.linen as nn

    from fa_jax.models import modules, spec
    from fa_jax.tree import flatten

    config, params = fa_jax.load_model(hf_dirs[family][0])
    model = modules.CausalLM(config)
    toks = jnp.zeros((1, 4), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), toks, jnp.zeros((1, 4), jnp.int32),
                                                  jnp.ones((1, 4), jnp.int32), logits=True))
    shapes = {k: v.shape for k, v in flatten(nn.unbox(variables["params"])).items()}
    axes = {k: tuple(v) for k, v in flatten(nn.get_partition_spec(variables)["params"]).items()}
    table = spec.param_specs(config)
    assert shapes == {k: s for k, (s, _) in table.items()}
    assert axes == {k: a for k, (_, a) in table.items()}
    toks = jnp.asarray(_tokens(2, 6))
    seg = jnp.ones((2, 6), jnp.int32)
    got, _ = model.apply({"params": params}, toks, transformer.segment_positions(seg), seg, logits=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(fa_jax.forward(config, params, toks)), atol=1e-6, rtol=0)
