"""`model.scan_layers`: the decoder layers under nn.scan with stacked weights give the logits of transformers and the
gradients of the unrolled model (itself checked against torch elsewhere), for every adapter kind."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa_jax
from fa_jax import bottleneck, llama_adapter, lora, prompts
from fa_jax import sharding as sh
from fa_jax.errors import FaJaxError
from fa_jax.models import transformer
from helpers import FAMILIES, hf_logits

TOL = 1e-4


def _tokens(B, T, seed=0):
    return np.random.RandomState(seed).randint(3, 256, (B, T))


def _randomize(tree, seed):
    """Nonzero values everywhere (fresh adapters start at zero B / gate / up-projection), scales kept."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    rng = np.random.RandomState(seed)
    out = [x if getattr(p[-1], "key", None) == "scale" else jnp.asarray(0.1 * rng.randn(*x.shape), x.dtype)
           for p, x in leaves]
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scanned_logits_match_transformers(family, hf_dirs):
    path, model = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    scanned = config.replace(scan_layers=True)
    toks = _tokens(3, 10, seed=1)
    mask = np.ones((3, 10), np.int64)
    mask[0, :4] = 0  # left padded
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    ref = hf_logits(model, toks, mask=mask, positions=positions)
    stacked = transformer.stack_layers(config, params)
    assert transformer.is_stacked(stacked) and not transformer.is_stacked(params)
    for p in (params, stacked):  # per-layer params are stacked on the way in
        out = np.asarray(fa_jax.forward(scanned, p, toks, mask=mask))
        np.testing.assert_allclose(out[mask.astype(bool)], ref[mask.astype(bool)], atol=TOL, rtol=0)


def _mixed_adapters(config, params):
    """LoRA with a per-layer rank (padded under scan) on layer 0's q_proj only and on every v_proj, bottleneck adapters
    in layer 1 only, a LLaMA-Adapter prompt in the top layer only: every kind of zero-padding of stack_adapters."""
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    ad = lora.init_lora(config, k[0], rank=4, targets=["model.layers.0.self_attn.q_proj", "v_proj"],
                        rank_pattern={"model.layers.1.self_attn.v_proj": 2})
    bn = bottleneck.init_bottleneck(config, k[1], size=8, layers=[1])
    la = llama_adapter.init_llama_adapter(config, k[2], adapter_len=3, adapter_layers=1)
    layers = ad["model"]["layers"]
    for src in (bn, la):
        for i, sub in src["model"]["layers"].items():
            for site, v in sub.items():
                layers.setdefault(i, {}).setdefault(site, {}).update(v) if site == "self_attn" else \
                    layers.setdefault(i, {}).__setitem__(site, v)
    return _randomize(ad, 2)


@pytest.mark.parametrize("remat", [False, "mlp"])
def test_scanned_gradients_equal_unrolled(remat, hf_dirs):
    config, params = fa_jax.load_model(hf_dirs["llama"][0])
    ad = _mixed_adapters(config, params)
    seg = np.array([[1] * 6 + [2] * 6, [1] * 9 + [0] * 3])  # packed documents and padding
    toks = jnp.asarray(_tokens(2, 12, seed=3))

    def loss(cfg, p):
        return jax.jit(jax.value_and_grad(lambda a: jnp.sum(
            transformer.hidden_states(cfg, p, toks, a, segment_ids=seg, remat=remat) ** 2)))

    v0, g0 = loss(config, params)(ad)
    v1, g1 = loss(config.replace(scan_layers=True), transformer.stack_layers(config, params))(ad)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    assert jax.tree.structure(g1) == jax.tree.structure(ad)  # gradients of the per-layer tree, padding dropped
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["dora", "prompt_tuning", "prefix_tuning"])
def test_scanned_forward_equals_unrolled(kind, hf_dirs):
    config, params = fa_jax.load_model(hf_dirs["mistral"][0])  # sliding window 5 in every layer
    rng = jax.random.PRNGKey(4)
    if kind == "dora":
        ad = _randomize(lora.init_lora(config, rng, rank=4, use_dora=True, params=params,
                                       rank_pattern={"model.layers.0.self_attn.q_proj": 2}), 5)
    elif kind == "prompt_tuning":
        ad = prompts.init_prompt_tuning(config, rng, num_virtual_tokens=3)
    else:
        ad = prompts.init_prefix_tuning(config, rng, num_virtual_tokens=3, prefix_projection=True)
    toks = _tokens(2, 12, seed=6)
    want = np.asarray(fa_jax.forward(config, params, toks, ad))
    got = np.asarray(fa_jax.forward(config.replace(scan_layers=True), params, toks, ad))
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_stacking_round_trips_and_refuses_what_it_cannot_pad(hf_dirs):
    config, params = fa_jax.load_model(hf_dirs["llama"][0])
    stacked = transformer.stack_layers(config, params)
    assert stacked["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 64, 64)
    back = transformer.unstack_layers(config, stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    dora = lora.init_lora(config, jax.random.PRNGKey(0), rank=2, targets=["model.layers.0.self_attn.q_proj"],
                          use_dora=True, params=params)
    with pytest.raises(FaJaxError, match=r"DoRA module model.layers.\*.self_attn.q_proj is missing in layers \[1\]"):
        transformer.stack_adapters(config, dora)
    windows = config.replace(sliding_windows=(0, 4), scan_layers=True)
    with pytest.raises(FaJaxError, match=r"model.scan_layers=true needs the same attention window in every layer"):
        fa_jax.forward(windows, params, _tokens(1, 4))


def test_stacked_params_shard_like_their_layers():
    config = fa_jax.ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    mesh = sh.make_mesh((2, 4, 1))
    shapes = transformer.abstract_params(config)
    flat = sh.tree_shardings(config, shapes, mesh)
    stacked = sh.tree_shardings(config, jax.eval_shape(lambda p: transformer.stack_layers(config, p), shapes), mesh)
    for name in ("self_attn.q_proj.kernel", "mlp.down_proj.kernel", "input_layernorm.weight"):
        keys = name.split(".")
        one, st = flat["model"]["layers"]["1"], stacked["model"]["layers"]
        for k in keys:
            one, st = one[k], st[k]
        assert st.spec == jax.sharding.PartitionSpec(None, *one.spec), name
    assert stacked["model"]["layers"]["self_attn"]["q_proj"]["kernel"].spec[1] == "fsdp"


def test_stack_models_keeps_shared_arrays_valid_and_shards_the_stack(hf_dirs):
    """train.stack_models as a run calls it: a student made of the teacher's layers (sharing their arrays), on a 2x4
    mesh; the per-layer arrays are donated except those the other model still needs, and the stacks are sharded."""
    from fa_jax import run_config, train

    cfg = run_config.merge(train.pretrain_defaults(), {"model": {"scan_layers": True}}, "test")
    config, teacher = fa_jax.load_model(hf_dirs["llama"][0])
    s_cfg, student = transformer.select_layers(config, teacher, [1, 0])
    mesh = sh.make_mesh((2, 4, 1))
    t_cfg, s_cfg = train.with_attention(cfg, config), train.with_attention(cfg, s_cfg)
    assert t_cfg.scan_layers and s_cfg.scan_layers
    want_t = transformer.stack_layers(config, jax.tree.map(np.asarray, teacher))
    want_s = transformer.stack_layers(s_cfg, jax.tree.map(np.asarray, student))
    t, s = train.stack_models(cfg, mesh, sh.DEFAULT_RULES, t_cfg, teacher, s_cfg, student)
    for got, want in ((t, want_t), (s, want_s)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), b)
    q = t["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape == (2, 64, 64) and tuple(q.sharding.spec)[:2] == (None, "fsdp")
