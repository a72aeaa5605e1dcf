"""PEFT LoRA interop, checked against PEFT itself on the transformers model."""
import json
import os

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

import fa_jax
from fa_jax import lora
from fa_jax.tree import flatten
from helpers import hf_logits, make_hf_model
from test_lora import _randomize_b

TOL = 1e-4


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_fa_jax_adapter_loads_in_peft(family, hf_dirs, tmp_path):
    path, _ = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    ad = fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=4, alpha=8,
                          rank_pattern={"model.layers.1.mlp.down_proj": 2, "v_proj": 6},
                          alpha_pattern={"o_proj": 3.0})
    ad = _randomize_b(ad)
    out = str(tmp_path / "adapter")
    fa_jax.save_peft(config, ad, out, base_model_name_or_path=path)
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["alpha_pattern"]
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    toks = np.random.RandomState(0).randint(0, 256, (2, 10))
    np.testing.assert_allclose(np.asarray(fa_jax.forward(config, params, toks, adapters=ad)),
                               hf_logits(model, toks), atol=TOL, rtol=0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_loads_in_fa_jax(use_rslora, hf_dirs, tmp_path):
    path, _ = hf_dirs["llama"]
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                           rank_pattern={"q_proj": 2, "model.layers.1.mlp.up_proj": 8}, alpha_pattern={"k_proj": 5},
                           use_rslora=use_rslora)
    model = peft.get_peft_model(base, pcfg).eval()
    out = str(tmp_path / "peft_adapter")
    model.save_pretrained(out)
    toks = np.random.RandomState(1).randint(0, 256, (2, 11))
    ref = hf_logits(model, toks)

    config, params = fa_jax.load_model(path)
    ad = fa_jax.load_peft(config, out)
    mods = dict(lora.iter_modules(ad))
    assert len(mods) == 14
    assert mods["model.layers.0.self_attn.q_proj"]["lora_A"].shape == (64, 2)
    assert mods["model.layers.1.mlp.up_proj"]["lora_A"].shape == (64, 8)
    k_scale = 5 / (np.sqrt(4) if use_rslora else 4)
    assert float(mods["model.layers.0.self_attn.k_proj"]["scale"]) == pytest.approx(k_scale)
    base_logits = np.asarray(fa_jax.forward(config, params, toks))
    assert np.abs(ref - base_logits).max() > 1e-3  # the PEFT adapter is not a no-op
    np.testing.assert_allclose(np.asarray(fa_jax.forward(config, params, toks, adapters=ad)), ref, atol=TOL, rtol=0)


def test_save_load_round_trip(hf_dirs, tmp_path):
    config, _ = fa_jax.load_model(hf_dirs["gemma"][0])
    ad = _randomize_b(fa_jax.init_lora(config, jax.random.PRNGKey(2), rank=3, alpha=7.5, targets=["q_proj", "down_proj"],
                                       use_rslora=True))
    fa_jax.save_peft(config, ad, str(tmp_path / "a"), use_rslora=True)
    back = fa_jax.load_peft(config, str(tmp_path / "a"))
    a, b = flatten(ad), flatten(back)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-6, atol=0)
    cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
    assert cfg["target_modules"] == ["down_proj", "q_proj"] and cfg["use_rslora"] is True
