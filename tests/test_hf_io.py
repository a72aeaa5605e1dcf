"""Hugging Face directories in and out: save_hf loads in transformers with equal logits; sharded checkpoints;
loading straight into a sharding."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import fa_jax
from fa_jax.io.hf import CheckpointReader
from fa_jax.tree import flatten
from helpers import hf_logits

TOL = 1e-4


@pytest.mark.parametrize("family", ["llama", "llama3", "mistral", "qwen2", "gemma"])
def test_save_hf_loads_in_transformers(family, hf_dirs, tmp_path):
    config, params = fa_jax.load_model(hf_dirs[family][0])
    # perturb so the saved weights are not just the files we read
    params = jax.tree.map(lambda x: x * 1.01, params)
    out = str(tmp_path / "saved")
    fa_jax.save_hf(config, params, out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__.lower().startswith(config.model_type)
    toks = np.random.RandomState(0).randint(0, 256, (2, 9))
    np.testing.assert_allclose(hf_logits(model, toks), np.asarray(fa_jax.forward(config, params, toks)),
                               atol=TOL, rtol=0)
    again_config, again = fa_jax.load_model(out)
    assert again_config == config
    for k, v in flatten(params).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(flatten(again)[k]))


def test_sharded_save_and_load(hf_dirs, tmp_path):
    config, params = fa_jax.load_model(hf_dirs["llama"][0])
    out = str(tmp_path / "sharded")
    fa_jax.save_hf(config, params, out, max_shard_size=40_000)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 3 and "model.safetensors.index.json" in os.listdir(out)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == set(files)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left behind
    toks = np.random.RandomState(0).randint(0, 256, (1, 7))
    _, again = fa_jax.load_model(out)
    ref = np.asarray(fa_jax.forward(config, params, toks))
    np.testing.assert_array_equal(np.asarray(fa_jax.forward(config, again, toks)), ref)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(model, toks), ref, atol=TOL, rtol=0)


def test_bfloat16_round_trip(hf_dirs, tmp_path):
    config, params = fa_jax.load_model(hf_dirs["qwen2"][0], dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    out = str(tmp_path / "bf16")
    fa_jax.save_hf(config, params, out)
    reader = CheckpointReader(out)
    assert str(reader.get("model.layers.0.self_attn.q_proj.weight").dtype) == "bfloat16"
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_load_into_sharding(hf_dirs):
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))

    def sharding(path, shape):
        if len(shape) == 2:
            return NamedSharding(mesh, P("fsdp", "tensor"))
        return NamedSharding(mesh, P())

    config, params = fa_jax.load_model(hf_dirs["llama"][0], sharding=sharding)
    q = params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (32, 16)
    _, plain = fa_jax.load_model(hf_dirs["llama"][0])
    toks = np.random.RandomState(0).randint(0, 256, (2, 8))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda p, t: fa_jax.forward(config, p, t))(params, toks)),
                               np.asarray(fa_jax.forward(config, plain, toks)), atol=1e-5)
