"""The adapter registry: a new kind plugs in from this file alone (init, forward, gradients, checks, save/load,
counting, the run config's adapter.kind), and the one rank/alpha pattern matcher follows PEFT's rule."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from peft.utils.other import get_pattern_key

import fa_jax
from fa_jax import adapters as adapters_lib
from fa_jax import lora, run_config, train, validation
from fa_jax.adapters import native, registry
from fa_jax.errors import FaJaxError
from fa_jax.models.spec import linear_modules
from fa_jax.tree import set_path


def _gain_linear(x, p, adapter, dropout=None):
    """A dummy kind: every output feature of the module scaled by (1 + gain)."""
    y = jnp.einsum("...i,io->...o", x, p["kernel"].astype(x.dtype))
    if p.get("bias") is not None:
        y = y + p["bias"].astype(y.dtype)
    return y * (1 + adapter["gain"].astype(y.dtype))


def _gain_init(config, rng, a, params=None):
    tree = {}
    for i, (path, (_, d_out)) in enumerate(m for m in linear_modules(config) if m[0].endswith(a["gain_target"])):
        tree = set_path(tree, path, {"gain": 0.1 * jax.random.normal(jax.random.fold_in(rng, i), (d_out,))})
    return tree


def _gain_check(path, adapter, d_in, d_out, where):
    if np.shape(adapter["gain"]) != (d_out,):
        raise FaJaxError(f"{where}: {path}.gain has shape {list(np.shape(adapter['gain']))}, expected [{d_out}]")


@pytest.fixture
def gain_kind():
    kind = registry.register(registry.Kind(
        name="gain", init=_gain_init, defaults={"gain_target": "v_proj"}, save=functools.partial(native.save, "gain"),
        load=native.load, linear=_gain_linear, linear_keys=("gain",), check_linear=_gain_check, priority=5))
    yield kind
    registry.unregister("gain")


def test_a_kind_registered_from_a_test_file_works_everywhere(gain_kind, hf_dirs, tmp_path):
    config, params = fa_jax.load_model(hf_dirs["qwen2"][0])  # q/k/v biases: the kind sees them
    assert "gain" in adapters_lib.KINDS and adapters_lib.adapter_defaults()["gain_target"] == "v_proj"
    ad = adapters_lib.init_adapter(config, jax.random.PRNGKey(0), {"kind": "gain"})
    assert adapters_lib.kind_of(ad) == "gain"
    assert adapters_lib.num_params(config, {"kind": "gain"}) == 2 * 32  # two layers, v_proj out-features 32
    toks = np.random.RandomState(0).randint(3, 256, (2, 7))
    got = np.asarray(fa_jax.forward(config, params, toks, ad))
    # reference: the same scaling folded into the base weights, run with no adapter
    folded = params
    for i in ("0", "1"):
        v = params["model"]["layers"][i]["self_attn"]["v_proj"]
        g = 1 + np.asarray(ad["model"]["layers"][i]["self_attn"]["v_proj"]["gain"])
        folded = set_path(folded, f"model.layers.{i}.self_attn.v_proj",
                          {"kernel": np.asarray(v["kernel"]) * g, "bias": np.asarray(v["bias"]) * g})
    want = np.asarray(fa_jax.forward(config, folded, toks))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(got - np.asarray(fa_jax.forward(config, params, toks))).max() > 1e-3
    grads = jax.grad(lambda a: jnp.sum(fa_jax.forward(config, params, toks, a) ** 2))(ad)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    # its own checks run at the forward pass; save / load through the registry
    bad = set_path(ad, "model.layers.0.self_attn.v_proj", {"gain": jnp.zeros(5)})
    with pytest.raises(FaJaxError, match=r"model.layers.0.self_attn.v_proj.gain has shape \[5\], expected \[32\]"):
        fa_jax.forward(config, params, toks, bad)
    adapters_lib.save_adapter(config, ad, str(tmp_path / "gain"))
    back = adapters_lib.load_adapter_dir(config, str(tmp_path / "gain"))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(ad)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and a run config may name it
    cfg = run_config.merge(train.pretrain_defaults(), {"adapter": {"kind": "gain", "gain_target": "q_proj"}}, "t")
    validation.check_run_config(cfg, "pretrain", batches_given=True)


def test_unknown_kind_lists_the_registered_ones():
    with pytest.raises(FaJaxError, match=r"adapter.kind='gains': expected one of lora, dora, bottleneck"):
        adapters_lib.check_kind("gains")


@pytest.mark.parametrize("pattern", [
    {"q_proj": 4},
    {"model.layers.0.self_attn.q_proj": 2, "q_proj": 4},
    {"q_proj": 4, "model.layers.0.self_attn.q_proj": 2},  # PEFT: the first matching key wins, not the exact one
    {"layers.1.self_attn.q_proj": 3},
    {r"layers\.[01]\.mlp\..*_proj": 5},
    {"proj": 6},  # matches nothing: a key is matched whole after a dot
])
def test_pattern_matcher_follows_peft(pattern, hf_dirs):
    config = fa_jax.load_config(hf_dirs["llama"][0])
    for path, _ in linear_modules(config):
        key = get_pattern_key(list(pattern), path)
        want = pattern[key] if key in pattern else None
        assert lora.pattern_value(pattern, path, None) == want, path
