"""The real-model config.json files in configs/models/: they parse, build the parameter tree abstractly (nothing is
allocated), have the published parameter counts (checked against an independent formula and against transformers
on the meta device), and round-trip through `to_hf_dict`.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import pytest

import fa_jax
from fa_jax import config as config_lib

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models")

# Published parameter counts (tied embeddings counted once).
PUBLISHED = {
    "llama-3.1-8b-instruct": 8_030_261_248,
    "llama-3-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-1b-instruct": 1_235_814_400,
    "smollm2-135m-instruct": 134_515_008,
}
NAMES = sorted(PUBLISHED)

# rope settings as on the hub: (rope_type, factor, rope_theta)
ROPE = {
    "llama-3.1-8b-instruct": ("llama3", 8.0, 500000.0),
    "llama-3-8b": ("default", None, 500000.0),
    "llama-3.2-1b": ("llama3", 32.0, 500000.0),
    "llama-3.2-1b-instruct": ("llama3", 32.0, 500000.0),
    "smollm2-135m-instruct": ("default", None, 100000.0),
}


def path_of(name: str) -> str:
    return os.path.join(CONFIG_DIR, f"{name}.json")


def raw(name: str) -> dict:
    with open(path_of(name)) as f:
        return json.load(f)


def formula_count(d: dict) -> int:
    """Parameter count of a Llama-style decoder from the config.json fields alone (no fa_jax code)."""
    D, F, V, L = d["hidden_size"], d["intermediate_size"], d["vocab_size"], d["num_hidden_layers"]
    H = d["num_attention_heads"]
    KV = d.get("num_key_value_heads") or H
    hd = d.get("head_dim") or D // H
    attention = D * (H * hd) + 2 * D * (KV * hd) + (H * hd) * D  # q, k, v, o (no biases in Llama)
    mlp = 3 * D * F  # gate, up, down
    norms = 2 * D  # input_layernorm, post_attention_layernorm
    embed = V * D
    head = 0 if d.get("tie_word_embeddings", False) else V * D
    return embed + L * (attention + mlp + norms) + D + head  # + final norm


def test_all_files_present():
    assert set(NAMES) <= {f[: -len(".json")] for f in os.listdir(CONFIG_DIR) if f.endswith(".json")}


@pytest.mark.parametrize("name", NAMES)
def test_load_config(name):
    c = fa_jax.load_config(path_of(name))
    d = raw(name)
    assert c.model_type == "llama"
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (
        d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"])
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (
        d["num_attention_heads"], d["num_key_value_heads"], d["vocab_size"])
    assert c.head_dim == d.get("head_dim", d["hidden_size"] // d["num_attention_heads"])
    assert c.tie_word_embeddings == d["tie_word_embeddings"]
    assert c.rms_norm_eps == 1e-5
    rope_type, factor, theta = ROPE[name]
    assert (c.rope_type, c.rope_theta) == (rope_type, theta)
    if rope_type == "llama3":
        assert (c.rope_factor, c.rope_low_freq_factor, c.rope_high_freq_factor, c.rope_original_max_position) == (
            factor, 1.0, 4.0, 8192)


def test_hub_values():
    """Spot checks of the values the hub's config.json files have."""
    l31 = raw("llama-3.1-8b-instruct")
    assert l31["eos_token_id"] == [128001, 128008, 128009] and l31["bos_token_id"] == 128000
    assert l31["max_position_embeddings"] == 131072 and l31["tie_word_embeddings"] is False
    assert l31["rope_scaling"] == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    l3 = raw("llama-3-8b")
    assert l3["rope_scaling"] is None and l3["max_position_embeddings"] == 8192 and l3["eos_token_id"] == 128001
    l1, l1i = raw("llama-3.2-1b"), raw("llama-3.2-1b-instruct")
    assert l1["eos_token_id"] == 128001 and l1i["eos_token_id"] == [128001, 128008, 128009]
    assert {k: v for k, v in l1.items() if k != "eos_token_id"} == {k: v for k, v in l1i.items() if k != "eos_token_id"}
    assert l1["head_dim"] == 64 and l1["tie_word_embeddings"] is True and l1["rope_scaling"]["factor"] == 32.0
    s = raw("smollm2-135m-instruct")
    assert (s["bos_token_id"], s["eos_token_id"], s["pad_token_id"]) == (1, 2, 2)
    assert s["tie_word_embeddings"] is True and s["rope_theta"] == 100000


@pytest.mark.parametrize("name", NAMES)
def test_abstract_params_count(name):
    c = fa_jax.load_config(path_of(name))
    live = len(jax.live_arrays())
    t = time.perf_counter()
    tree = fa_jax.abstract_params(c)
    assert time.perf_counter() - t < 10
    leaves = jax.tree.leaves(tree)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert len(jax.live_arrays()) <= live  # nothing was allocated
    count = sum(math.prod(x.shape) for x in leaves)
    assert count == formula_count(raw(name)) == PUBLISHED[name]
    assert count == c.num_params
    emb = tree["model"]["embed_tokens"]["embedding"]
    assert emb.shape == (c.vocab_size, c.hidden_size) and emb.dtype == jnp.float32
    assert ("lm_head" in tree) == (not c.tie_word_embeddings)
    q = tree["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    k = tree["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"]
    assert q.shape == (c.hidden_size, c.num_attention_heads * c.head_dim)
    assert k.shape == (c.hidden_size, c.num_key_value_heads * c.head_dim)


def test_abstract_params_dtype():
    c = fa_jax.load_config(path_of("llama-3.2-1b"))
    leaves = jax.tree.leaves(fa_jax.abstract_params(c, jnp.bfloat16))
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    assert sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves) == 2 * PUBLISHED["llama-3.2-1b"]


def _transformers_count(d: dict) -> int:
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(**d)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.mark.parametrize("name", NAMES)
def test_transformers_builds_same_count(name):
    t = time.perf_counter()
    n = _transformers_count(raw(name))
    assert time.perf_counter() - t < 10
    assert n == PUBLISHED[name] == fa_jax.load_config(path_of(name)).num_params


@pytest.mark.parametrize("name", NAMES)
def test_round_trip(name):
    c = fa_jax.load_config(path_of(name))
    d = c.to_hf_dict()
    json.dumps(d)  # writable as config.json
    assert config_lib.from_hf_dict(d) == c
    assert config_lib.from_hf_dict(json.loads(json.dumps(d))) == c  # through an actual JSON file too


@pytest.mark.parametrize("name", NAMES)
def test_transformers_reads_rope_back(name):
    import transformers

    c = fa_jax.load_config(path_of(name))
    ours = transformers.AutoConfig.for_model(**c.to_hf_dict())
    hub = transformers.AutoConfig.for_model(**raw(name))  # transformers' reading of the v4 layout
    rope_type, factor, theta = ROPE[name]
    for tc in (ours, hub):
        rp = tc.rope_parameters
        assert rp["rope_type"] == rope_type
        assert float(rp["rope_theta"]) == theta
        if rope_type == "llama3":
            assert (rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"],
                    rp["original_max_position_embeddings"]) == (factor, 1.0, 4.0, 8192)
    assert ours.tie_word_embeddings == hub.tie_word_embeddings == c.tie_word_embeddings
    assert ours.head_dim == hub.head_dim == c.head_dim


def test_round_trip_keeps_param_count_in_transformers():
    c = fa_jax.load_config(path_of("llama-3.1-8b-instruct"))
    assert _transformers_count(c.to_hf_dict()) == PUBLISHED["llama-3.1-8b-instruct"]


@pytest.mark.parametrize("name", NAMES)
def test_config_is_hashable_static_argument(name):
    """ModelConfig promises to be a static argument of jax.jit; list-valued eos_token_id must not break that."""
    c = fa_jax.load_config(path_of(name))
    assert hash(c) == hash(fa_jax.load_config(path_of(name)))
    f = jax.jit(lambda cfg, x: x + cfg.num_hidden_layers, static_argnums=0)
    assert int(f(c, jnp.int32(0))) == c.num_hidden_layers


def test_knowledge_adapter_config_is_the_seeds_table_4():
    """configs/knowledge_llama3_8b.py has RE-Adapt's Appendix A, Table 4 settings (DoRA r 64, alpha 128, dropout
    0.05, all-linear, batch 20, AdamW 2e-4, linear decay to 0, no warm-up), and builds a DoRA tree on Llama-3-8B."""
    from fa_jax import adapters as adapters_lib
    from fa_jax import run_config, train

    path = os.path.join(os.path.dirname(CONFIG_DIR), "knowledge_llama3_8b.py")
    cfg = run_config.load(path, train.pretrain_defaults())
    a, o = cfg.adapter, cfg.optim
    assert (a.kind, a.rank, a.alpha, a.dropout, a.targets) == ("dora", 64, 128.0, 0.05, "all-linear")
    assert cfg.data.batch_size == 20 and cfg.loss.alpha == 0.0
    assert (o.lr, o.schedule, o.warmup_steps, o.end_lr_fraction, o.weight_decay) == (2e-4, "linear", 0, 0.0, 0.0)
    doc = open(path).read()
    assert "Appendix A, Table 4" in doc and "0.5" in doc
    model = fa_jax.load_config(path_of("llama-3-8b"))
    shapes = jax.eval_shape(lambda p: adapters_lib.init_adapter(model, jax.random.PRNGKey(0), a=dict(a), params=p),
                            fa_jax.abstract_params(model, jnp.bfloat16))
    _, sched = train.make_optimizer(cfg, shapes)
    steps = cfg.run.steps
    assert [float(sched(s)) for s in (0, steps // 2, steps)] == pytest.approx([2e-4, 1e-4, 0.0], rel=1e-6, abs=1e-12)
    q = shapes["model"]["layers"]["0"]["self_attn"]["q_proj"]
    assert q["lora_A"].shape == (4096, 64) and q["magnitude"].shape == (4096,)
