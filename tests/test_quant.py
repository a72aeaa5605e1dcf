"""Int8 weights (fa_jax/quant.py): exact q and scale against NumPy, the quantized forward against transformers run
with the quantize-then-dequantize weights, the distillation loss with an int8 teacher head, stacked layers, LoRA and
DoRA over an int8 base, sharded and abstract trees."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import fa_jax
from fa_jax import losses, lora, quant
from fa_jax import sharding as sh
from fa_jax.errors import FaJaxError
from fa_jax.models import transformer
from fa_jax.tree import flatten, unflatten
from helpers import hf_logits

TOL = 1e-4  # as tests/test_models.py
# jitted: one compilation per model and shape instead of one per operation (the tests stay fast)
forward = jax.jit(transformer.forward, static_argnums=0)
quantize_params = jax.jit(quant.quantize_params, static_argnums=(0, 2))  # the traced path (array leaves: below)
CFG = fa_jax.config.from_hf_dict(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      rope_theta=10000.0, tie_word_embeddings=False))


def np_quantize(w, axis):
    """Symmetric per-channel int8, reducing over `axis`: (q int8, scale float32 with that axis of size 1)."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=axis, keepdims=True)
    scale = np.where(amax > 0, amax * np.float32(1 / 127), np.float32(1)).astype(np.float32)  # max|w| / 127
    return np.clip(np.round(w * (np.float32(1) / scale)), -127, 127).astype(np.int8), scale  # w / scale


def init_params(config, seed=0, dtype=jnp.float32):
    """Random params from NumPy (compiling jax.random for every leaf would take seconds): matrices normal(0, 0.02),
    norms 1 + normal(0, 0.1)."""
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda s: jnp.asarray((0.02 if len(s.shape) > 1 else 0.1) * rng.randn(*s.shape)
                                              + (len(s.shape) == 1), dtype),
                        transformer.abstract_params(config))


@jax.jit
def dequantized(tree):
    """The tree with every QInt8 replaced by q * scale (float32)."""
    return jax.tree.map(lambda x: x.dequantize(jnp.float32) if isinstance(x, quant.QInt8) else x, tree,
                        is_leaf=lambda x: isinstance(x, quant.QInt8))


def _tokens(B, T, seed=0, vocab=256):
    return np.random.RandomState(seed).randint(3, vocab, (B, T))


def test_quantize_matches_numpy():
    w = np.random.RandomState(0).randn(48, 40).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero channel: scale 1, q 0, no NaN
    for axis in (0, 1):
        got = jax.jit(quant.quantize, static_argnums=1)(w, axis)
        q, scale = np_quantize(w, axis)
        assert got.q.dtype == jnp.int8 and got.scale.dtype == jnp.float32 and got.scale.shape == scale.shape
        np.testing.assert_array_equal(np.asarray(got.q), q)
        np.testing.assert_array_equal(np.asarray(got.scale), scale)
        assert np.abs(np.asarray(got.q)).max() == 127 and np.all(np.isfinite(np.asarray(got.dequantize())))
    assert np.all(np.asarray(quant.quantize(jnp.asarray(w), 0).dequantize())[:, 3] == 0)

    params = init_params(CFG, 0, jnp.bfloat16)
    qp = quantize_params(CFG, params)
    flat, qflat = flatten(params), flatten(qp)
    for path, x in flat.items():
        got = qflat[path]
        if path.endswith(".kernel") or path.endswith("embedding"):
            axis = 0 if path.endswith(".kernel") else 1  # kernels [I, O] per output; embedding [V, D] per row
            q, scale = np_quantize(np.asarray(x.astype(jnp.float32)), axis)
            assert isinstance(got, quant.QInt8) and got.float_dtype == jnp.bfloat16, path
            np.testing.assert_array_equal(np.asarray(got.q), q, err_msg=path)
            np.testing.assert_array_equal(np.asarray(got.scale), scale, err_msg=path)
        else:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(x), err_msg=path)  # norms stay as they are
    assert quant.param_bytes(qp) == sum(x.size for x in flat.values() if x.ndim == 2) + 4 * sum(
        q.scale.size for q in qflat.values() if isinstance(q, quant.QInt8)) + sum(
        2 * x.size for x in flat.values() if x.ndim == 1)


@pytest.mark.parametrize("family", ["llama3", "llama"])  # tied and untied embeddings
def test_forward_matches_transformers_with_dequantized_weights(family, hf_dirs):
    path, model = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    qp = quant.quantize_params(config, params)
    assert isinstance(transformer.lm_head(config, qp)[0], quant.QInt8)
    ref = copy.deepcopy(model)  # the session's model stays as it is
    with torch.no_grad():
        for name, p in ref.named_parameters():  # torch [out, in] and embeddings [V, D]: one scale per row
            if p.ndim == 2:
                q, scale = np_quantize(p.numpy(), axis=1)
                p.copy_(torch.from_numpy(q.astype(np.float32) * scale))
    toks = _tokens(2, 12)
    out = np.asarray(forward(config, qp, toks))
    np.testing.assert_allclose(out, hf_logits(ref, toks), atol=TOL, rtol=0)
    assert np.abs(out - hf_logits(model, toks)).max() > 2 * TOL  # the quantization shows, and is matched


@pytest.mark.parametrize("t_vd", [True, False])
def test_chunked_loss_with_int8_teacher_head_equals_dequantized_head(t_vd):
    B, T, Ds, Dt, Vs, Vt = 2, 10, 16, 24, 50, 56  # the teacher's vocabulary padded: the loss cuts it to Vs
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    hs, ht = jax.random.normal(ks[0], (B, T, Ds)), jax.random.normal(ks[1], (B, T, Dt))
    head_s = 0.3 * jax.random.normal(ks[2], (Ds, Vs))
    head_t = quant.quantize(0.3 * jax.random.normal(ks[3], (Vt, Dt) if t_vd else (Dt, Vt)), 1 if t_vd else 0)
    labels = jax.random.randint(ks[4], (B, T), 0, Vs)
    mask = jnp.ones((B, T)).at[1, 7:].set(0)

    def loss(hs, head_t):
        return losses.chunked_distill_loss(hs, head_s, ht, head_t, labels, mask, chunk_size=4, teacher_head_vd=t_vd)

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (l_q, m_q), g_q = grad(hs, head_t)
    (l_d, m_d), g_d = grad(hs, head_t.dequantize())
    np.testing.assert_allclose(l_q, l_d, rtol=1e-5)
    for k in m_d:
        np.testing.assert_allclose(m_q[k], m_d[k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(g_q, g_d, rtol=1e-4, atol=1e-7)
    # under a mesh the loss gathers the int8 head leaf by leaf: whole over fsdp, vocab split over tensor, q and scale
    axes = ("vocab", "embed") if t_vd else ("embed", "vocab")
    mesh = sh.make_mesh((1, 2, 4))
    with sh.mesh_context(mesh):
        g = jax.jit(lambda h: sh.gathered(h, axes))(head_t)
    want = jax.sharding.NamedSharding(mesh, sh.P(*(("tensor", None) if t_vd else (None, "tensor"))))
    assert isinstance(g, quant.QInt8)
    assert g.q.sharding.is_equivalent_to(want, 2) and g.scale.sharding.is_equivalent_to(want, 2)


def test_param_bytes_of_int8_is_about_half_of_bfloat16():
    cfg = CFG.replace(hidden_size=128, intermediate_size=256, vocab_size=512, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32)
    params = transformer.abstract_params(cfg, jnp.bfloat16)  # abstract: nothing allocated
    qp = quant.quantize_params(cfg, params)
    ratio = quant.param_bytes(qp) / quant.param_bytes(params)
    assert 0.5 < ratio < 0.55, ratio
    emb = qp["model"]["embed_tokens"]["embedding"]
    assert emb.nbytes == 512 * 128 + 4 * 512 and emb.shape == (512, 128) and emb.dtype == jnp.int8


def test_stacked_layers_equal_unrolled():
    params = init_params(CFG, 1)
    qp = quantize_params(CFG, params)
    stacked_cfg = CFG.replace(scan_layers=True)
    stacked = jax.jit(transformer.stack_layers, static_argnums=0)(stacked_cfg, params)
    q_of_stacked = quantize_params(stacked_cfg, stacked)  # kernels [L, I, O]: per output channel per layer
    k = q_of_stacked["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert k.q.shape == (2, 32, 32) and k.scale.shape == (2, 1, 32)
    for a, b in zip(jax.tree.leaves(q_of_stacked), jax.tree.leaves(
            jax.jit(transformer.stack_layers, static_argnums=0)(stacked_cfg, qp))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    toks = _tokens(2, 9, vocab=64)
    np.testing.assert_allclose(forward(stacked_cfg, q_of_stacked, toks),
                               forward(CFG, qp, toks), atol=1e-5, rtol=0)


def test_bad_mode_is_an_error():
    params = init_params(CFG, 0)
    with pytest.raises(FaJaxError, match="quantize='int4'"):
        quant.quantize_params(CFG, params, "int4")
    assert quant.quantize_params(CFG, params, None) is params
    with pytest.raises(FaJaxError, match="embedding"):
        quant.quantize_params(CFG.replace(vocab_size=65), params)


def test_lora_and_dora_over_an_int8_base():
    params = init_params(CFG, 2)
    qp = quantize_params(CFG, params)
    base = dequantized(qp)
    attn, mlp = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]
    lora_part = lora.init_lora(CFG, jax.random.PRNGKey(3), rank=4, targets=attn)
    dora_part = lora.init_lora(CFG, jax.random.PRNGKey(4), rank=4, targets=mlp, use_dora=True, params=qp)
    rng = np.random.RandomState(5)  # non-zero B, so that the adapters change the model
    adapters = unflatten({p: jnp.asarray(0.05 * rng.randn(*x.shape), x.dtype) if p.endswith("lora_B") else x
                          for p, x in {**flatten(lora_part), **flatten(dora_part)}.items()})
    toks = _tokens(2, 8, vocab=64)
    ref = forward(CFG, base, toks, adapters)
    np.testing.assert_allclose(forward(CFG, qp, toks, adapters), ref, atol=1e-5, rtol=0)
    merged = lora.merge_into(qp, adapters)  # an int8 kernel merges into a float one
    assert merged["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(forward(CFG, merged, toks), ref, atol=1e-4, rtol=0)


def test_bfloat16_params_compute_in_bfloat16():
    qp = quantize_params(CFG, init_params(CFG, 0, jnp.bfloat16))
    h = jax.eval_shape(lambda p: transformer.hidden_states(CFG, p, _tokens(1, 5, vocab=64)), qp)
    assert h.dtype == jnp.bfloat16


def test_sharded_params_stay_sharded_and_donation_frees_them(hf_dirs):
    mesh = sh.make_mesh((1, 2, 4))  # fsdp x tensor: kernels really split
    config, params = fa_jax.load_model(hf_dirs["llama"][0], sharding=sh.Rules(mesh))
    ref = quant.quantize_params(config, fa_jax.load_model(hf_dirs["llama"][0])[1])
    norm = params["model"]["norm"]["weight"]
    kept = params["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"]
    before = jax.tree.map(lambda x: x.sharding, params)
    qp = quant.quantize_params(config, params, donate=True, keep={"a": kept})
    for path, x in flatten(params).items():
        if path.endswith("kernel") or path.endswith("embedding"):
            assert x.is_deleted() == (x is not kept), path
            assert flatten(qp)[path].q.sharding == flatten(before)[path], path
    assert qp["model"]["norm"]["weight"] is norm and not norm.is_deleted()
    assert qp["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].q.sharding.spec == sh.P("fsdp", "tensor")
    want = sh.tree_shardings(config, qp, mesh)
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(qp), jax.tree.leaves(want)):
        assert x.sharding == s, jax.tree_util.keystr(path)
    for a, b in zip(jax.tree.leaves(qp), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    toks = _tokens(2, 12)  # the shape of the parity test above: its compiled forward serves `ref` here
    with sh.mesh_context(mesh):
        out = jax.jit(lambda p, t: transformer.forward(config, p, t))(qp, toks)
    np.testing.assert_allclose(out, forward(config, ref, toks), atol=1e-5, rtol=0)


def test_abstract_trees_keep_their_shardings():
    mesh = sh.make_mesh((1, 2, 4))
    shapes = transformer.abstract_params(CFG, jnp.bfloat16)
    abstract = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), shapes,
                            sh.tree_shardings(CFG, shapes, mesh))
    qa = quant.quantize_params(CFG, abstract)
    concrete = jax.eval_shape(lambda p: quant.quantize_params(CFG, p), abstract)  # the traced path agrees
    assert jax.tree.structure(qa) == jax.tree.structure(concrete)
    for a, b, s in zip(jax.tree.leaves(qa), jax.tree.leaves(concrete), jax.tree.leaves(sh.tree_shardings(CFG, qa,
                                                                                                         mesh))):
        assert (a.shape, a.dtype) == (b.shape, b.dtype) and a.sharding == s


def test_int8_teacher_pretrain_run(teacher_corpus, tmp_path):
    """teacher.quantize=int8 through `train.pretrain`, the student being the teacher's own (shared) weights: with the
    float32 teacher the first KD term is 0 (student == teacher, LoRA B = 0); with the int8 teacher it is the small
    divergence rounding the teacher's weights causes, and the student's LM term is unchanged (its arrays stay
    float32)."""
    import json as _json

    from fa_jax import train
    from test_train import _cfg

    root, corpus = teacher_corpus
    over = {"run.steps": 1, "model.keep_layers": None}
    live = train.pretrain(_cfg(root, corpus, tmp_path / "f32", **over))
    q = train.pretrain(_cfg(root, corpus, tmp_path / "int8", **over, **{"teacher.quantize": "int8"}))
    assert live["metrics"]["kd"] < 1e-6 and 1e-6 < q["metrics"]["kd"] < 5e-3
    assert q["metrics"]["lm"] == pytest.approx(live["metrics"]["lm"], rel=1e-6)  # the student is untouched
    assert _json.load(open(tmp_path / "int8" / "config.json"))["teacher"]["quantize"] == "int8"
