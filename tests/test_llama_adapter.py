"""LLaMA-Adapter (fa_jax.llama_adapter) against PEFT's adaption prompts (`AdaptionPromptConfig`): the base at init,
logits and gradients equal to PEFT's for the same prompts and gates (GQA and MHA, top-L layers), PEFT directories
in and out, generation, and a mixed tree (LoRA + bottleneck + adaption prompts) through every tree utility."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import fa_jax
from fa_jax import bottleneck, llama_adapter, lora, sharding
from fa_jax import config as config_lib
from fa_jax import generate as gen
from fa_jax.errors import FaJaxError
from fa_jax.tree import flatten, unflatten
from helpers import TINY, hf_logits, left_padded

TOL = 1e-4


def _positions(mask):
    """Positions counted from each row's first real token, as fa_jax (and transformers' `generate`) count them.
    The adaption prompt's keys carry no rope while the queries do, so unlike plain attention its output depends on
    absolute positions: transformers' forward must get these explicitly (its default is 0..T-1 for padded rows
    too)."""
    return np.maximum(np.cumsum(mask, 1) - 1, 0)


def _model_dir(hf_dirs, tmp_path, family):
    """(directory, fresh torch model): PEFT wraps modules in place, so never the session's shared model."""
    if family == "llama_mha":  # num_key_value_heads == num_attention_heads
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(**{**TINY, "num_key_value_heads": 4}, tie_word_embeddings=False)
        transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "mha"))
        path = str(tmp_path / "mha")
    else:
        path = hf_dirs[family][0]
    return path, transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _peft_model(base, adapter_len, adapter_layers, seed=0):
    """PEFT adaption prompts with random prompts and nonzero random gates."""
    pm = peft.get_peft_model(base, peft.AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers,
                                                              task_type="CAUSAL_LM")).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if name.endswith("adaption_prompt"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("adaption_gate"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return pm


def _random_gates(ad, seed=0):
    flat = flatten(ad)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
    return unflatten({k: (0.5 + jax.random.uniform(key, v.shape)) if k.endswith("adaption_gate") else v
                      for key, (k, v) in zip(keys, flat.items())})


def test_init_is_the_base_model(hf_dirs):
    config, params = fa_jax.load_model(hf_dirs["llama"][0])
    ad = llama_adapter.init_llama_adapter(config, jax.random.PRNGKey(0), adapter_len=4, adapter_layers=1)
    assert list(ad["model"]["layers"]) == ["1"]  # the top layer
    a = ad["model"]["layers"]["1"]["self_attn"]
    assert a["adaption_prompt"].shape == (4, config.hidden_size) and a["adaption_gate"].shape == (1,)
    assert float(a["adaption_gate"][0]) == 0 and abs(float(jnp.std(a["adaption_prompt"])) - 1) < 0.2
    toks, mask = left_padded()
    base = np.asarray(fa_jax.forward(config, params, toks, mask=mask))
    np.testing.assert_array_equal(np.asarray(fa_jax.forward(config, params, toks, ad, mask=mask)), base)
    full = llama_adapter.init_llama_adapter(config, jax.random.PRNGKey(0))
    assert sorted(full["model"]["layers"]) == ["0", "1"]  # default: every layer, 10 prompt tokens
    assert full["model"]["layers"]["0"]["self_attn"]["adaption_prompt"].shape == (10, config.hidden_size)
    assert all(jax.tree.leaves(lora.trainable_mask(full)))
    assert lora.num_params(full) == 2 * (10 * config.hidden_size + 1)
    # bfloat16 compute runs and stays near float32
    on = _random_gates(full)
    f32 = np.asarray(fa_jax.forward(config, params, toks, on, mask=mask))
    bf16 = np.asarray(fa_jax.forward(config, params, toks, on, mask=mask, dtype="bfloat16"))
    assert np.abs(f32 - base).max() > 1e-2 and np.abs(bf16 - f32).max() < 0.1


@pytest.mark.parametrize("family,layers_", [("llama", 1), pytest.param("llama", 2, marks=pytest.mark.slow), ("mistral", 2),
                                            pytest.param("llama_mha", 1, marks=pytest.mark.slow)])
def test_peft_adapter_loads_and_matches(family, layers_, hf_dirs, tmp_path):
    """PEFT's adaption prompts with random prompts and gates, saved by PEFT, loaded by fa_jax: the same logits
    (GQA: llama and mistral tiny models have 2 kv heads for 4 query heads; MHA; top 1 or 2 layers)."""
    path, base = _model_dir(hf_dirs, tmp_path, family)
    pm = _peft_model(base, adapter_len=3, adapter_layers=layers_)
    toks, mask = left_padded(1)
    want = hf_logits(pm, toks, mask, _positions(mask))
    pm.save_pretrained(str(tmp_path / "ap"))
    config, params = fa_jax.load_model(path)
    ad = llama_adapter.load_llama_adapter(config, str(tmp_path / "ap"))
    n = config.num_hidden_layers
    assert sorted(ad["model"]["layers"], key=int) == [str(i) for i in range(n - layers_, n)]
    got = np.asarray(fa_jax.forward(config, params, toks, ad, mask=mask))
    real = mask.astype(bool)
    assert np.abs(got - np.asarray(fa_jax.forward(config, params, toks, mask=mask)))[real].max() > 1e-2
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0)


def test_fa_jax_adapter_loads_in_peft(hf_dirs, tmp_path):
    path = hf_dirs["llama3"][0]  # llama3 rope scaling, tied embeddings
    config, params = fa_jax.load_model(path)
    ad = _random_gates(llama_adapter.init_llama_adapter(config, jax.random.PRNGKey(1), adapter_len=5,
                                                        adapter_layers=2), seed=2)
    out = str(tmp_path / "ours")
    llama_adapter.save_llama_adapter(config, ad, out, base_model_name_or_path=path)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, out).eval()
    assert pm.peft_config["default"].adapter_len == 5 and pm.peft_config["default"].adapter_layers == 2
    toks, mask = left_padded(2)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(fa_jax.forward(config, params, toks, ad, mask=mask))[real],
                               hf_logits(pm, toks, mask, _positions(mask))[real], atol=TOL, rtol=0)
    back = llama_adapter.load_llama_adapter(config, out)
    a, b = flatten(ad), flatten(back)
    assert a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


@pytest.mark.slow  # the default suite checks cached == uncached generation for every kind (tests/test_adapters.py)
def test_generation_matches_peft_and_the_uncached_loop(hf_dirs, tmp_path):
    """Greedy tokens with the adapter (KV cache, left padding) equal PEFT's `generate` and a no-cache greedy loop
    over `forward`."""
    from test_generate import _cut, hf_generate

    path, base = _model_dir(hf_dirs, tmp_path, "llama")
    pm = _peft_model(base, adapter_len=4, adapter_layers=2, seed=3)
    pm.save_pretrained(str(tmp_path / "ap"))
    config, params = fa_jax.load_model(path)
    ad = llama_adapter.load_llama_adapter(config, str(tmp_path / "ap"))
    prompts = [[5, 17, 99, 3], [42, 8, 200, 31, 77, 12, 6]]
    n_new = 8
    got = gen.generate_tokens(config, params, prompts, adapters=ad, max_new_tokens=n_new, eos_token_ids=[])
    assert got != gen.generate_tokens(config, params, prompts, max_new_tokens=n_new, eos_token_ids=[])
    for b, p in enumerate(prompts):  # no cache: the whole sequence through forward at every step
        seq = list(p)
        for _ in range(n_new):
            seq.append(int(np.argmax(np.asarray(fa_jax.forward(config, params, np.array([seq]), ad))[0, -1])))
        assert got[b] == seq[len(p):]
    eos = config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    with_eos = gen.generate_tokens(config, params, prompts, adapters=ad, max_new_tokens=n_new)
    assert with_eos == [_cut(row, eos) for row in got]
    assert with_eos == hf_generate(pm, prompts, n_new)


def test_gradients_match_peft_autograd(hf_dirs, tmp_path):
    """d loss / d prompt and d loss / d gate of every adapted layer equal torch autograd through PEFT's model."""
    path, base = _model_dir(hf_dirs, tmp_path, "mistral")
    pm = _peft_model(base, adapter_len=3, adapter_layers=2, seed=4)
    pm.save_pretrained(str(tmp_path / "ap"))
    config, params = fa_jax.load_model(path)
    ad = llama_adapter.load_llama_adapter(config, str(tmp_path / "ap"))
    toks, mask = left_padded(4, T=7)
    R = np.random.RandomState(0).randn(2, 7, config.vocab_size).astype(np.float32) * mask[:, :, None]
    g = jax.grad(lambda a: jnp.sum(fa_jax.forward(config, params, toks, a, mask=mask) * R))(ad)
    out = pm(input_ids=torch.tensor(toks), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(_positions(mask))).logits
    (out * torch.tensor(R)).sum().backward()
    tg = {n: p.grad.numpy() for n, p in pm.named_parameters() if "adaption_" in n}
    assert len(tg) == 4
    for i in range(2):
        for leaf, shape in (("adaption_prompt", (3, config.hidden_size)), ("adaption_gate", (1,))):
            want = next(v for n, v in tg.items() if f"layers.{i}.self_attn" in n and n.endswith(leaf))
            want = want.reshape(shape)
            assert np.abs(want).max() > 0
            np.testing.assert_allclose(np.asarray(g["model"]["layers"][str(i)]["self_attn"][leaf]), want,
                                       rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _mixed_tree(config, seed=0):
    """LoRA on every linear layer (random B) + bottleneck adapters + adaption prompts (random gates), one tree."""
    lo = fa_jax.init_lora(config, jax.random.PRNGKey(seed), rank=2, alpha=4)
    flat = flatten(lo)
    keys = jax.random.split(jax.random.PRNGKey(seed + 3), len(flat))
    lo = unflatten({k: 0.1 * jax.random.normal(key, v.shape) if k.endswith("lora_B") else v
                    for key, (k, v) in zip(keys, flat.items())})
    bn = bottleneck.init_bottleneck(config, jax.random.PRNGKey(seed + 1), size=4, up_std=0.1)
    la = _random_gates(llama_adapter.init_llama_adapter(config, jax.random.PRNGKey(seed + 2), adapter_len=3,
                                                        adapter_layers=1))
    return lo, bn, la, unflatten({**flatten(lo), **flatten(bn), **flatten(la)})


def test_mixed_tree(hf_dirs, tmp_path):
    """LoRA + bottleneck + adaption prompts in one tree: lora.iter_modules / trainable_mask / merge_into,
    sharding.tree_shardings and jax.grad all work; the logits equal torch with the LoRA merged into the weights,
    PEFT's adaption prompts on top and the bottleneck adapters as hooks."""
    from test_bottleneck import _hook_model

    path = hf_dirs["llama"][0]
    config, params = fa_jax.load_model(path)
    lo, bn, la, mixed = _mixed_tree(config)
    assert [p for p, _ in lora.iter_modules(mixed)] == [p for p, _ in lora.iter_modules(lo)]
    mask_flat = flatten(lora.trainable_mask(mixed))
    assert {k for k, v in mask_flat.items() if not v} == {k for k in flatten(lo) if k.endswith(".scale")}
    mesh = sharding.make_mesh((2, 2, 2))  # data x fsdp x tensor: LoRA and base weights really shard
    sh = flatten(sharding.tree_shardings(config, mixed, mesh))
    for k in flatten(bn) | flatten(la):
        assert sh[k].spec == jax.sharding.PartitionSpec()  # replicated
    placed = jax.device_put(mixed, sharding.tree_shardings(config, mixed, mesh))
    placed_params = jax.device_put(params, sharding.tree_shardings(config, params, mesh))
    toks, mask = left_padded(5)
    got = np.asarray(jax.jit(lambda p, a: fa_jax.forward(config, p, toks, a, mask=mask))(placed_params, placed))

    merged = lora.merge_into(params, mixed)
    fa_jax.save_hf(config, merged, str(tmp_path / "merged"))
    assert np.abs(got - np.asarray(fa_jax.forward(config, merged, toks, unflatten({**flatten(bn), **flatten(la)}),
                                                  mask=mask))).max() < TOL
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    llama_adapter.save_llama_adapter(config, la, str(tmp_path / "ap"))
    pm = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "ap")).eval()
    _, handles = _hook_model(pm.base_model.model, bn)
    try:
        want = hf_logits(pm, toks, mask, _positions(mask))
    finally:
        for h in handles:
            h.remove()
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0)

    trainable = lora.trainable_mask(mixed)
    g = jax.grad(lambda a: jnp.sum(fa_jax.forward(config, params, toks, a, mask=mask, remat=True)[..., :8]))(mixed)
    for k, v in flatten(g).items():
        assert np.all(np.isfinite(np.asarray(v)))
        if flatten(trainable)[k] and not k.endswith("lora_A"):  # with lora_B random, every trainable leaf moves
            assert np.abs(np.asarray(v)).max() > 0, k


def test_bad_arguments(hf_dirs, tmp_path):
    config = config_lib.from_hf_dict({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                      "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                                      "vocab_size": 50, "rope_theta": 10000.0})
    rng = jax.random.PRNGKey(0)
    for kw, msg in (({"adapter_layers": 3}, r"expected an integer in \[1, 2\] \(this model has 2 layers\)"),
                    ({"adapter_layers": 0}, "adapter_layers=0"), ({"adapter_len": 0}, "adapter_len=0"),
                    ({"adapter_len": 2.0}, "positive integer"), ({"prompt_std": -1.0}, "prompt_std")):
        with pytest.raises(FaJaxError, match=msg):
            llama_adapter.init_llama_adapter(config, rng, **kw)
    ad = llama_adapter.init_llama_adapter(config, rng, adapter_len=2, adapter_layers=2)
    del ad["model"]["layers"]["1"]  # only layer 0: not the top layer
    with pytest.raises(FaJaxError, match="not the top 1 of 2"):
        llama_adapter.save_llama_adapter(config, ad, str(tmp_path / "x"))
    with pytest.raises(FaJaxError, match="holds no LLaMA-Adapter layer"):
        llama_adapter.save_llama_adapter(config, fa_jax.init_lora(config, rng, rank=2), str(tmp_path / "x"))
    lora_dir = str(tmp_path / "lora")
    fa_jax.save_peft(config, fa_jax.init_lora(config, rng, rank=2), lora_dir)
    with pytest.raises(FaJaxError, match="is not an adaption prompt"):
        llama_adapter.load_llama_adapter(config, lora_dir)
    with pytest.raises(FaJaxError, match="no such adapter directory"):
        llama_adapter.load_llama_adapter(config, str(tmp_path / "missing"))
