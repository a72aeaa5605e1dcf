"""DoRA (LoRA plus a magnitude vector): identity at init, PEFT `use_dora=True` logits, gradients and merges."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import fa_jax
from fa_jax import lora, readapt, treemath
from fa_jax.errors import FaJaxError
from fa_jax.models import layers
from fa_jax.tree import flatten, get_path, unflatten
from helpers import hf_logits
from test_lora import _randomize_b

TOL = 1e-4


def _random_dora(config, params, seed=0, **kw):
    """A DoRA tree that changes the model: random B, magnitude off the base column norms by ~10%."""
    ad = _randomize_b(lora.init_lora(config, jax.random.PRNGKey(seed), params=params, use_dora=True, **kw), seed + 1)
    flat = flatten(ad)
    keys = jax.random.split(jax.random.PRNGKey(seed + 2), len(flat))
    return unflatten({p: (v * (1 + 0.1 * jax.random.normal(k, v.shape)) if p.endswith("magnitude") else v)
                      for k, (p, v) in zip(keys, flat.items())})


def _dora_np(W, A, B, s, m):
    """PEFT's merged DoRA weight in our [I, O] layout: m * V / ||V|| over the input axis, V = W + s A B."""
    V = W.astype(np.float64) + s * A.astype(np.float64) @ B.astype(np.float64)
    return V * (m / np.linalg.norm(V, axis=0))[None, :]


def _peft_dora(path, seed=0, **kw):
    """A PEFT DoRA model on the transformers checkpoint: random A and B, magnitude off its init by ~10%."""
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, **kw)
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def peft_qwen2(hf_dirs, tmp_path_factory):
    """(path, PEFT DoRA model, its saved directory, config, params, the directory loaded by load_peft). Qwen2 has
    q/k/v biases, which DoRA leaves out of the rescaling."""
    path, _ = hf_dirs["qwen2"]
    model = _peft_dora(path, rank_pattern={"v_proj": 2}, alpha_pattern={"model.layers.1.mlp.down_proj": 3})
    out = str(tmp_path_factory.mktemp("dora") / "peft_dora")
    model.save_pretrained(out)
    config, params = fa_jax.load_model(path)
    return path, model, out, config, params, fa_jax.load_peft(config, out)


def test_init_equals_base_exactly(hf_dirs):
    config, params = fa_jax.load_model(hf_dirs["llama"][0])
    ad = lora.init_lora(config, jax.random.PRNGKey(0), rank=4, alpha=8, use_dora=True, params=params)
    toks = np.arange(10)[None] + 3
    np.testing.assert_array_equal(np.asarray(fa_jax.forward(config, params, toks, adapters=ad)),
                                  np.asarray(fa_jax.forward(config, params, toks)))
    m = dict(lora.iter_modules(ad))["model.layers.1.mlp.down_proj"]
    W = np.asarray(params["model"]["layers"]["1"]["mlp"]["down_proj"]["kernel"])
    assert m["magnitude"].shape == (64,) and m["magnitude"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(m["magnitude"]), np.linalg.norm(W, axis=0), rtol=1e-6)
    assert float(jnp.abs(m["lora_B"]).max()) == 0
    mask = dict(lora.iter_modules(lora.trainable_mask(ad)))["model.layers.1.mlp.down_proj"]
    assert mask == {"lora_A": True, "lora_B": True, "magnitude": True, "scale": False}
    plain = lora.init_lora(config, jax.random.PRNGKey(0), rank=4, alpha=8)
    assert lora.num_params(ad) == lora.num_params(plain) + 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)  # + [O] each
    with pytest.raises(FaJaxError, match=r"use_dora=True\) needs the base params"):
        lora.init_lora(config, jax.random.PRNGKey(0), use_dora=True)


def test_forward_equals_materialized_weights(hf_dirs):
    config, params = fa_jax.load_model(hf_dirs["llama"][0])
    ad = _random_dora(config, params)
    toks = np.random.RandomState(0).randint(0, 256, (2, 9))
    with_adapter = np.asarray(fa_jax.forward(config, params, toks, adapters=ad))
    assert np.abs(with_adapter - np.asarray(fa_jax.forward(config, params, toks))).max() > 1e-3
    np.testing.assert_allclose(with_adapter, np.asarray(fa_jax.forward(config, fa_jax.merge_lora(params, ad), toks)),
                               atol=1e-5, rtol=0)
    mod = dict(lora.iter_modules(ad))["model.layers.0.self_attn.k_proj"]
    W = params["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"]
    want = _dora_np(*(np.asarray(v) for v in (W, mod["lora_A"], mod["lora_B"], mod["scale"], mod["magnitude"])))
    np.testing.assert_allclose(np.asarray(lora.materialize(W, mod)), want, atol=1e-6)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_fa_jax_dora_loads_in_peft(family, hf_dirs, tmp_path):
    path, _ = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    ad = _random_dora(config, params, rank=4, alpha=8, rank_pattern={"v_proj": 6}, alpha_pattern={"o_proj": 3.0})
    out = str(tmp_path / "adapter")
    fa_jax.save_peft(config, ad, out, base_model_name_or_path=path)
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["use_dora"] is True and cfg["r"] == 4
    saved = safetensors.numpy.load_file(os.path.join(out, "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"
    assert saved[key].shape == (128,) and len(saved) == 3 * 14
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                           out).eval()
    sd = model.state_dict()
    np.testing.assert_array_equal(sd[key.replace("vector", "vector.default.weight")].numpy(), saved[key])
    toks = np.random.RandomState(0).randint(0, 256, (2, 10))
    np.testing.assert_allclose(np.asarray(fa_jax.forward(config, params, toks, adapters=ad)), hf_logits(model, toks),
                               atol=TOL, rtol=0)
    back = fa_jax.load_peft(config, out)
    a, b = flatten(ad), flatten(back)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-6, atol=0)


def test_peft_dora_loads_in_fa_jax(peft_qwen2):
    _, model, out, config, params, ad = peft_qwen2
    assert json.load(open(os.path.join(out, "adapter_config.json")))["use_dora"] is True
    mods = dict(lora.iter_modules(ad))
    assert len(mods) == 14 and all(lora.is_dora(m) for m in mods.values())
    assert mods["model.layers.0.self_attn.v_proj"]["lora_A"].shape == (64, 2)
    assert float(mods["model.layers.1.mlp.down_proj"]["scale"]) == pytest.approx(3 / 4)
    toks = np.random.RandomState(1).randint(0, 256, (2, 11))
    ref = hf_logits(model, toks)
    assert np.abs(ref - np.asarray(fa_jax.forward(config, params, toks))).max() > 1e-3
    np.testing.assert_allclose(np.asarray(fa_jax.forward(config, params, toks, adapters=ad)), ref, atol=TOL, rtol=0)


def test_gradients_match_peft(peft_qwen2):
    """jax.grad w.r.t. lora_A, lora_B and magnitude equals torch autograd through PEFT's DoRA (whose column norm is
    detached from the graph)."""
    _, model, _, config, params, ad = peft_qwen2
    toks = np.random.RandomState(2).randint(0, 256, (2, 9))
    model.zero_grad()
    logits = model(input_ids=torch.tensor(toks)).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    (-logp.gather(-1, torch.tensor(toks[:, 1:, None])).mean()).backward()

    def loss(a):
        lp = jax.nn.log_softmax(fa_jax.forward(config, params, toks, adapters=a)[:, :-1], -1)
        return -jnp.take_along_axis(lp, toks[:, 1:, None], -1).mean()

    grads = flatten(jax.grad(loss)(ad))
    n = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        path, which = name.removeprefix("base_model.model.").split(".lora_")
        leaf = {"A": "lora_A", "B": "lora_B", "magnitude_vector": "magnitude"}[which.split(".default")[0]]
        g = p.grad.numpy()
        want = g.T if leaf != "magnitude" else g
        got = np.asarray(grads[f"{path}.{leaf}"])
        assert np.abs(want).max() > 0, name
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=name)
        n += 1
    assert n == 14 * 3
    assert float(jnp.abs(grads["model.layers.0.self_attn.q_proj.scale"])) == 0


def test_dropout_matches_peft_training_path(peft_qwen2):
    """With dropout, PEFT rescales the base output of the dropped input: y + (g - 1) xd W + g s (xd A) B (+ bias).
    The same fixed mask on both sides (q_proj has a bias)."""
    _, model, _, config, params, ad = peft_qwen2
    rng = np.random.RandomState(3)
    x = rng.randn(2, 5, 64).astype(np.float32)
    mask = (rng.rand(2, 5, 64) > 0.3).astype(np.float32) / 0.7

    class FixedDropout(torch.nn.Module):
        def forward(self, v):
            return v * torch.tensor(mask)

    mod = model.base_model.model.model.layers[0].self_attn.q_proj
    saved = mod.lora_dropout["default"]
    mod.lora_dropout["default"] = FixedDropout()
    mod.train()
    try:
        with torch.no_grad():
            want = mod(torch.tensor(x)).numpy()
    finally:
        mod.lora_dropout["default"] = saved
        mod.eval()
    p = params["model"]["layers"]["0"]["self_attn"]["q_proj"]
    a = ad["model"]["layers"]["0"]["self_attn"]["q_proj"]
    got = np.asarray(layers.dense(jnp.asarray(x), p, a, dropout=lambda v: v * mask))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(got - np.asarray(layers.dense(jnp.asarray(x), p, a))).max() > 1e-3  # the mask matters


def test_merge_matches_peft_merge_and_unload(peft_qwen2):
    path, _, out, config, params, ad = peft_qwen2
    merged = treemath.merge(params, [(ad, 1.0)])
    peft_merged = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), out).merge_and_unload()
    sd = peft_merged.state_dict()
    fm = flatten(merged)
    for p, _ in lora.iter_modules(ad):
        np.testing.assert_allclose(np.asarray(fm[f"{p}.kernel"]), sd[f"{p}.weight"].numpy().T, atol=1e-6, err_msg=p)
    toks = np.random.RandomState(4).randint(0, 256, (2, 9))
    np.testing.assert_allclose(np.asarray(fa_jax.forward(config, merged, toks)),
                               np.asarray(fa_jax.forward(config, params, toks, adapters=ad)), atol=TOL, rtol=0)
    # partial adaptation: base + s * (m V / ||V|| - W), the delta taken from the base
    half = flatten(treemath.merge(params, [(ad, 0.5)]))
    m = "model.layers.1.mlp.down_proj"
    mod = dict(lora.iter_modules(ad))[m]
    W = np.asarray(get_path(params, m + ".kernel"))
    want = W + 0.5 * (_dora_np(W, *(np.asarray(mod[k]) for k in ("lora_A", "lora_B", "scale", "magnitude"))) - W)
    np.testing.assert_allclose(np.asarray(half[m + ".kernel"]), want, atol=1e-6)
    with pytest.raises(FaJaxError, match=r"to_dense: model\.layers\.0\.self_attn\.q_proj is a DoRA module.*pass "
                                         r"base=params"):
        treemath.to_dense(ad)
    with pytest.raises(FaJaxError, match=r"unmerge: adapter 0 has DoRA modules"):
        treemath.unmerge(merged, [(ad, 1.0)])


def test_truncate_needs_the_base(peft_qwen2):
    _, _, _, config, params, ad = peft_qwen2
    with pytest.raises(FaJaxError, match=r"truncate: model\.layers\.0\.self_attn\.q_proj is a DoRA module.*"
                                         r"base=params"):
        treemath.truncate(ad, rank=4)
    lore, report = treemath.truncate(ad, tau=1.0, base=params)
    assert not any(lora.is_dora(m) for _, m in lora.iter_modules(lore))
    assert report["modules"]["model.layers.0.self_attn.q_proj"]["full_rank"] > 4  # m V / ||V|| - W is not rank 4
    a, b = flatten(treemath.merge(params, [(lore, 1.0)])), flatten(treemath.merge(params, [(ad, 1.0)]))
    for p in a:
        np.testing.assert_allclose(np.asarray(a[p]), np.asarray(b[p]), atol=1e-5, err_msg=p)


def test_readapt_merge_of_a_peft_dora_dir(peft_qwen2, tmp_path, monkeypatch):
    """`fa-jax merge` streams row blocks of [O, I] tensors; tiny blocks here (a few output features each)."""
    path, _, out, config, params, ad = peft_qwen2
    monkeypatch.setattr(readapt, "BLOCK_BYTES", 600)
    readapt.merge(path, [(out, 0.5)], str(tmp_path / "merged"), tokenizer=False)
    _, merged = fa_jax.load_model(str(tmp_path / "merged"))
    want = flatten(treemath.merge(params, [(ad, 0.5)]))
    for p, x in flatten(merged).items():
        np.testing.assert_allclose(np.asarray(x), np.asarray(want[p]), atol=1e-6, err_msg=p)
    with pytest.raises(FaJaxError, match=r"is a DoRA adapter, whose delta depends on the base weights: merge it first"):
        readapt.truncate(out, str(tmp_path / "lore"), rank=2, base_config=path)


def test_save_peft_rejects_mixed_lora_and_dora(hf_dirs, tmp_path):
    config, params = fa_jax.load_model(hf_dirs["llama"][0])
    dora = lora.init_lora(config, jax.random.PRNGKey(0), targets=["q_proj"], use_dora=True, params=params)
    plain = lora.init_lora(config, jax.random.PRNGKey(0), targets=["v_proj"])
    mixed = unflatten({**flatten(dora), **flatten(plain)})
    with pytest.raises(FaJaxError, match=r"is DoRA but .* is plain LoRA"):
        fa_jax.save_peft(config, mixed, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


def test_jit_grad_with_dropout(hf_dirs):
    """The training path: jit, adapter dropout (one mask per adapter input), remat."""
    config, params = fa_jax.load_model(hf_dirs["llama"][0])
    ad = _random_dora(config, params, targets=["q_proj", "down_proj"])
    toks = np.random.RandomState(5).randint(0, 256, (2, 8))

    @jax.jit
    def grad(a, rng):
        f = lambda a: fa_jax.forward(config, params, toks, adapters=a, dropout_rate=0.1, rng=rng, remat=True).mean()
        return jax.grad(f)(a)

    g1, g2 = flatten(grad(ad, jax.random.PRNGKey(0))), flatten(grad(ad, jax.random.PRNGKey(1)))
    m = "model.layers.1.mlp.down_proj.magnitude"
    assert all(np.isfinite(np.asarray(v)).all() for v in g1.values())
    assert np.abs(np.asarray(g1[m])).max() > 0 and not np.allclose(np.asarray(g1[m]), np.asarray(g2[m]))
