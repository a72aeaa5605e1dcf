"""Houlsby bottleneck adapters (fa_jax.bottleneck): identity at init, 2md + d + m parameters, the forward and the
gradients against transformers' tiny models with the same adapters added by forward hooks (torch autograd), the
cached decoder and greedy generation, bad arguments."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import fa_jax
from fa_jax import bottleneck, lora
from fa_jax import config as config_lib
from fa_jax import generate as gen
from fa_jax.errors import FaJaxError
from fa_jax.models import transformer
from fa_jax.tree import flatten, unflatten
from helpers import hf_logits, left_padded

TOL = 1e-4


def _config(**kw):
    d = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 50, "rope_theta": 10000.0,
         **kw}
    return config_lib.from_hf_dict(d)


def _random_bottleneck(config, seed=0, size=8, **kw):
    """An adapter tree with every weight and bias random (so that each of them shows in the output)."""
    ad = bottleneck.init_bottleneck(config, jax.random.PRNGKey(seed), size=size, **kw)
    flat = flatten(ad)
    keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(flat))
    return unflatten({k: 0.2 * jax.random.normal(key, v.shape, v.dtype) for key, (k, v) in zip(keys, flat.items())})


class _TorchBottleneck(torch.nn.Module):
    def __init__(self, ad):
        super().__init__()
        t = lambda x: torch.nn.Parameter(torch.tensor(np.asarray(x, np.float32)))
        self.down_w, self.down_b = t(ad["down"]["kernel"]), t(ad["down"]["bias"])
        self.up_w, self.up_b = t(ad["up"]["kernel"]), t(ad["up"]["bias"])

    def forward(self, o):
        return o + torch.nn.functional.gelu(o @ self.down_w + self.down_b) @ self.up_w + self.up_b


def _hook_model(model, adapters):
    """Forward hooks on each decoder layer's self_attn and mlp that replace the sub-layer output o by
    o + up(gelu(down(o))), the same formula written in torch. Returns (modules by (layer, site), hook handles)."""
    mods, handles = {}, []
    for i, site, ad in bottleneck.iter_adapters(adapters):
        m = _TorchBottleneck(ad)
        mods[(i, site)] = m
        layer = model.model.layers[i]
        if site == "attn_adapter":
            hook = lambda mod, args, out, m=m: (m(out[0]),) + tuple(out[1:])
            handles.append(layer.self_attn.register_forward_hook(hook))
        else:
            handles.append(layer.mlp.register_forward_hook(lambda mod, args, out, m=m: m(out)))
    return mods, handles


def test_init_is_the_base_model(hf_dirs):
    config, params = fa_jax.load_model(hf_dirs["llama"][0])
    ad = bottleneck.init_bottleneck(config, jax.random.PRNGKey(0), size=8)
    toks, mask = left_padded()
    base = np.asarray(fa_jax.forward(config, params, toks, mask=mask))
    np.testing.assert_array_equal(np.asarray(fa_jax.forward(config, params, toks, ad, mask=mask)), base)
    # a near-identity init (tiny up projection) is close to, but not exactly, the base
    near = bottleneck.init_bottleneck(config, jax.random.PRNGKey(0), size=8, up_std=1e-4)
    diff = np.abs(np.asarray(fa_jax.forward(config, params, toks, near, mask=mask)) - base).max()
    assert 0 < diff < 1e-2


def test_parameter_count():
    config = _config(hidden_size=64, num_hidden_layers=3)
    d, m = config.hidden_size, 8
    ad = bottleneck.init_bottleneck(config, jax.random.PRNGKey(0), size=m)
    assert bottleneck.num_params_per_adapter(d, m) == 2 * m * d + d + m
    one = ad["model"]["layers"]["0"]["attn_adapter"]
    assert sum(x.size for x in jax.tree.leaves(one)) == 2 * m * d + d + m
    assert one["down"]["kernel"].shape == (d, m) and one["up"]["kernel"].shape == (m, d)
    assert one["down"]["bias"].shape == (m,) and one["up"]["bias"].shape == (d,)
    total = config.num_hidden_layers * 2 * (2 * m * d + d + m)
    assert lora.num_params(ad) == lora.num_params(ad, trainable_only=False) == total  # everything is trainable
    assert all(jax.tree.leaves(lora.trainable_mask(ad)))
    assert list(lora.iter_modules(ad)) == []
    only = bottleneck.init_bottleneck(config, jax.random.PRNGKey(0), size=m, sites=["mlp_adapter"], layers=[2])
    assert list(only["model"]["layers"]) == ["2"] and list(only["model"]["layers"]["2"]) == ["mlp_adapter"]
    assert lora.num_params(only) == 2 * m * d + d + m


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_forward_matches_torch_hooks(family, hf_dirs):
    """Logits with random adapters after both sub-layers of every layer equal transformers' model with the same
    adapters added by forward hooks (left padding included); only the attention adapter of layer 1 also matches."""
    path, model = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    toks, mask = left_padded(1)
    for kw in ({}, {"sites": ["attn_adapter"], "layers": [1]}):
        ad = _random_bottleneck(config, size=8, **kw)
        _, handles = _hook_model(model, ad)
        try:
            want = hf_logits(model, toks, mask)
        finally:
            for h in handles:
                h.remove()
        got = np.asarray(fa_jax.forward(config, params, toks, ad, mask=mask))
        real = mask.astype(bool)
        assert np.abs(got - np.asarray(fa_jax.forward(config, params, toks, mask=mask)))[real].max() > 1e-2
        np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0)
    remat = np.asarray(fa_jax.forward(config, params, toks, ad, mask=mask, remat=True))
    np.testing.assert_allclose(remat, got, atol=1e-5, rtol=0)


def test_gradients_match_torch_autograd(hf_dirs):
    """d loss / d (every adapter weight and bias) for loss = sum(logits * R) equals torch autograd through the
    hook-based model."""
    path, model = hf_dirs["llama"]
    config, params = fa_jax.load_model(path)
    toks, mask = left_padded(2, T=7)
    ad = _random_bottleneck(config, seed=3, size=4)
    R = np.random.RandomState(0).randn(2, 7, config.vocab_size).astype(np.float32) * mask[:, :, None]

    def loss(a):
        return jnp.sum(fa_jax.forward(config, params, toks, a, mask=mask) * R)

    g = jax.grad(loss)(ad)
    mods, handles = _hook_model(model, ad)
    try:
        out = model(input_ids=torch.tensor(toks), attention_mask=torch.tensor(mask)).logits
        (out * torch.tensor(R)).sum().backward()
    finally:
        for h in handles:
            h.remove()
    for (i, site), m in mods.items():
        got = g["model"]["layers"][str(i)][site]
        for name, leaf in (("down_w", got["down"]["kernel"]), ("down_b", got["down"]["bias"]),
                           ("up_w", got["up"]["kernel"]), ("up_b", got["up"]["bias"])):
            want = getattr(m, name).grad.numpy()
            assert np.abs(want).max() > 0
            np.testing.assert_allclose(np.asarray(leaf), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.slow  # the default suite checks cached == uncached generation for every kind (tests/test_adapters.py)
def test_cached_decoding_and_greedy_generation(hf_dirs):
    """The cached decoder (prefill + one-token steps) gives the logits of `forward`; greedy generation with the
    adapters equals transformers' greedy `generate` on the hooked model."""
    from test_generate import hf_generate

    path, model = hf_dirs["mistral"]  # sliding window 5: the adapters also run beyond the window
    config, params = fa_jax.load_model(path)
    ad = _random_bottleneck(config, seed=5, size=8)
    toks, mask = left_padded(3, T=8)
    want = np.asarray(fa_jax.forward(config, params, toks, ad, mask=mask))
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    cache = transformer.init_cache(config, 2, 10)
    h, cache = transformer.hidden_states_with_cache(config, params, toks[:, :5], cache, 0, positions[:, :5],
                                                    mask[:, :5].astype(bool), ad)
    got = [np.asarray(transformer.lm_logits(config, params, h))]
    for t in range(5, 8):
        h, cache = transformer.hidden_states_with_cache(config, params, toks[:, t:t + 1], cache, jnp.int32(t),
                                                        positions[:, t:t + 1], None, ad)
        got.append(np.asarray(transformer.lm_logits(config, params, h)))
    got = np.concatenate(got, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0)

    prompts = [[5, 17, 99, 3], [42, 8, 200, 31, 77, 12, 6]]
    out = gen.generate_tokens(config, params, prompts, adapters=ad, max_new_tokens=8)
    assert out != gen.generate_tokens(config, params, prompts, max_new_tokens=8)
    _, handles = _hook_model(model, ad)
    try:
        assert out == hf_generate(model, prompts, 8)
    finally:
        for h in handles:
            h.remove()


def test_bad_arguments():
    config = _config()
    rng = jax.random.PRNGKey(0)
    for kw, msg in (({"size": 0}, "size must be a positive integer"), ({"size": 2.5}, "size must be"),
                    ({"sites": ["ffn_adapter"]}, "attn_adapter, mlp_adapter"), ({"sites": []}, "sites"),
                    ({"layers": [2]}, r"layer indices in \[0, 2\)"), ({"layers": [0, 0]}, "distinct"),
                    ({"layers": 1}, "list of layer indices"), ({"down_std": -1.0}, "down_std must be >= 0")):
        with pytest.raises(FaJaxError, match=msg):
            bottleneck.init_bottleneck(config, rng, **kw)
