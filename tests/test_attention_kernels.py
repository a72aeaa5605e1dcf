"""Attention kernels (fa_jax/models/attention_kernels.py) against the blocked XLA path: splash values and gradients
in Pallas' interpreter on CPU, a tiny training step compiled for a TPU topology, "auto" on CPU, one-line errors,
cuDNN traced (no GPU here).

Axis legend: B batch, T time, H query heads, G key/value heads, K head dim.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fa_jax import adapters as adapters_lib
from fa_jax import config as config_lib
from fa_jax import lora, optim, run_config, train
from fa_jax import sharding as sh
from fa_jax.errors import FaJaxError
from fa_jax.models import attention_kernels as ak
from fa_jax.models import layers, transformer

TOL = dict(rtol=1e-5, atol=1e-5)
# libtpu lets one process at a time load it (/tmp/libtpu_lockfile) unless told otherwise; these tests only compile,
# no TPU is used, so another process compiling for a topology at the same time is no reason to skip. Set at import:
# JAX loads libtpu when it first looks for devices, before any test here runs.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _qkv_segments(B=2, T=256, H=4, G=2, K=64, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, G, K)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, G, K)), jnp.float32)
    seg = np.ones((B, T), np.int32)
    seg[0, 90:] = 2  # packed: three documents in row 0, then padding
    seg[0, 170:] = 3
    seg[0, 230:] = 0
    seg[1, 40:] = 5  # two documents in row 1, no padding
    return q, k, v, jnp.asarray(seg)


def _xla(q, k, v, seg, window):
    B, T, H, K = q.shape
    G = k.shape[2]
    mask = layers.attention_mask(seg, window=window)
    return layers.causal_attention(q.reshape(B, T, G, H // G, K), k, v, mask).reshape(B, T, H, K)


def _value_and_grads(attend, q, k, v, seg):
    """Outputs and d/d(q, k, v) of a loss that reads real tokens only (padding outputs differ by design)."""
    real = (seg != 0).astype(jnp.float32)[:, :, None, None]
    loss = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v)) * real)
    return jax.jit(lambda q, k, v: (attend(q, k, v) * real, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


@pytest.mark.parametrize("window", [0, 100])
def test_splash_equals_xla_values_and_gradients(window):
    """GQA (2 query heads per kv head), three packed documents plus padding, with and without a sliding window."""
    q, k, v, seg = _qkv_segments()
    want, want_g = _value_and_grads(lambda q, k, v: _xla(q, k, v, seg, window), q, k, v, seg)
    got, got_g = _value_and_grads(lambda q, k, v: ak.splash_attention(q, k, v, seg, window, interpret=True),
                                  q, k, v, seg)
    np.testing.assert_allclose(got, want, **TOL)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, **TOL)


def test_splash_under_shard_map_equals_xla():
    """Batch over data, heads (and kv heads) over tensor on a (2, 1, 2) mesh of CPU devices: same numbers."""
    q, k, v, seg = _qkv_segments(seed=1)
    mesh = sh.make_mesh((2, 1, 2))
    want, want_g = _value_and_grads(lambda q, k, v: _xla(q, k, v, seg, 0), q, k, v, seg)
    got, got_g = _value_and_grads(lambda q, k, v: ak.splash_attention(q, k, v, seg, mesh=mesh, interpret=True),
                                  q, k, v, seg)
    np.testing.assert_allclose(got, want, **TOL)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, **TOL)


def _tiny_config(**kw):
    d = dict(model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    d.update(kw)
    return config_lib.ModelConfig(**d)


def _packed_batch(B, T, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((B, T), np.int32)
    seg[:, T // 3:] = 2
    seg[0, -20:] = 0
    tokens = rng.integers(0, 256, (B, T)).astype(np.int32)
    return {"tokens": tokens, "labels": np.roll(tokens, -1, 1), "mask": (seg != 0).astype(np.int32),
            "segment_ids": seg, "positions": np.asarray(transformer.segment_positions(jnp.asarray(seg)))}


def _fake_tpu(monkeypatch):
    """The mesh's devices read as TPU and splash runs in the interpreter: the model path of a TPU, on CPU."""
    kernel = ak._splash_local
    monkeypatch.setattr(ak, "context_device", lambda: ("tpu", "TPU (test)"))
    monkeypatch.setattr(ak, "_splash_local", lambda q, k, v, seg, window, _: kernel(q, k, v, seg, window, True))


def test_model_loss_and_adapter_grads_with_splash_equal_xla(monkeypatch):
    """The student's KD + LM loss and its LoRA gradients through splash (remat "full", a sliding-window layer,
    batch over 2 devices, heads over 2) equal the xla path's."""
    cfg = _tiny_config(sliding_windows=(0, 50))
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    teacher_cfg = _tiny_config(num_hidden_layers=1)
    teacher = transformer.init_params(teacher_cfg, jax.random.PRNGKey(1))
    adapters = adapters_lib.init_adapter(cfg, jax.random.PRNGKey(2), {"rank": 4})
    adapters = jax.tree.map(lambda x: x + 0.01 if x.ndim == 2 else x, adapters)  # B != 0: every matrix gets a grad
    batch = _packed_batch(4, 128)
    mesh = sh.make_mesh((2, 1, 2))
    loss_cfg = run_config.wrap({"alpha": 0.5, "temperature": 1.0, "divergence": "forward_kl", "beta": 0.5,
                                "chunk_size": 64})
    _fake_tpu(monkeypatch)

    def run(impl):
        fn = train.make_loss_fn(cfg.replace(attention_impl=impl), teacher_cfg.replace(attention_impl=impl), loss_cfg,
                                remat="full")
        grad = jax.jit(jax.value_and_grad(fn, has_aux=True))
        with sh.mesh_context(mesh):
            (loss, _), g = grad(adapters, params, teacher, batch, jnp.float32(batch["mask"].sum()), None)
        return loss, g

    loss_x, g_x = run("xla")
    loss_s, g_s = run("splash")
    np.testing.assert_allclose(loss_s, loss_x, **TOL)
    for s, x in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_x)):
        np.testing.assert_allclose(s, x, **TOL)


def test_auto_on_cpu_is_exactly_xla():
    cfg = _tiny_config()
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    batch = _packed_batch(2, 128)
    fwd = lambda c: jax.jit(lambda p, t, s: transformer.forward(c, p, t, segment_ids=s))
    xla = fwd(cfg)(params, batch["tokens"], batch["segment_ids"])
    np.testing.assert_array_equal(fwd(cfg.replace(attention_impl="auto"))(params, batch["tokens"],
                                                                           batch["segment_ids"]), xla)
    with sh.mesh_context(sh.make_mesh((1, 1, 1))):
        assert ak.choose("auto", (2, 128, 4, 32), (2, 128, 2, 32), jnp.float32) == "xla"
        got = fwd(cfg.replace(attention_impl="auto"))(params, batch["tokens"], batch["segment_ids"])
        want = fwd(cfg)(params, batch["tokens"], batch["segment_ids"])
    np.testing.assert_array_equal(got, want)


def _one_line_error(fn, *words):
    with pytest.raises(FaJaxError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_errors_are_one_line(monkeypatch):
    q, k = (2, 256, 4, 64), (2, 256, 2, 64)
    cpu = sh.make_mesh((1, 1, 1))
    _one_line_error(lambda: ak.choose("flash", q, k, jnp.float32), "model.attention='flash'", "splash")
    _one_line_error(lambda: ak.choose("splash", q, k, jnp.float32), "no device mesh in context")
    with sh.mesh_context(cpu):
        _one_line_error(lambda: ak.choose("splash", q, k, jnp.float32), "TPU only", "cpu")
        _one_line_error(lambda: ak.choose("cudnn", q, k, jnp.bfloat16), "NVIDIA GPUs only", "cpu")
    monkeypatch.setattr(ak, "context_device", lambda: ("tpu", "TPU v5 lite"))
    _one_line_error(lambda: ak.choose("splash", (2, 200, 4, 64), (2, 200, 2, 64), jnp.float32),
                    "sequence length 200", "128")
    _one_line_error(lambda: ak.choose("splash", q, k, jnp.float32, prefix=(None, None, None)), "prefix")
    assert ak.choose("auto", (2, 200, 4, 64), (2, 200, 2, 64), jnp.float32) == "xla"  # auto falls back quietly
    assert ak.choose("auto", q, k, jnp.float32, prefix=(None, None, None)) == "xla"
    assert ak.choose("auto", q, k, jnp.float32) == "splash"
    monkeypatch.setattr(ak, "context_device", lambda: ("gpu", "NVIDIA H100 80GB HBM3"))
    _one_line_error(lambda: ak.choose("cudnn", q, k, jnp.float32), "float32")
    _one_line_error(lambda: ak.choose("cudnn", (2, 256, 4, 96 + 4), (2, 256, 2, 100), jnp.bfloat16), "head dim 100")
    assert ak.choose("auto", q, k, jnp.float32) == "xla"
    assert ak.choose("auto", q, k, jnp.bfloat16) == "cudnn"
    # the run config's key, and the model path raising it from inside a traced forward
    cfg = run_config.merge(train.pretrain_defaults(), {"model": {"attention": "fast"}}, "test")
    _one_line_error(lambda: train.with_attention(cfg, _tiny_config()), "model.attention='fast'")
    monkeypatch.setattr(ak, "context_device", lambda: ("cpu", "cpu"))
    tiny = _tiny_config().replace(attention_impl="splash")
    params = transformer.init_params(tiny, jax.random.PRNGKey(0))
    _one_line_error(lambda: jax.jit(lambda p: transformer.forward(tiny, p, jnp.zeros((1, 128), jnp.int32)))(params),
                    "model.attention='splash'", "TPU only")


def test_with_attention_reaches_the_configs_not_config_json():
    cfg = run_config.merge(train.pretrain_defaults(), {"model": {"attention": "splash"}}, "test")
    mc = train.with_attention(cfg, _tiny_config())
    assert mc.attention_impl == "splash" and train.with_attention(cfg, None) is None
    assert "attention_impl" not in mc.to_hf_dict() and mc != _tiny_config() and hash(mc) != hash(_tiny_config())
    assert train.pretrain_defaults()["model"]["attention"] == "auto"


def test_cudnn_path_traces(monkeypatch):
    """Shapes only: jax.eval_shape of the value and gradients through cuDNN's fused attention (bf16, GQA, packed
    segments, a window). No GPU here: cuDNN's version check, which needs the CUDA libraries, is stubbed."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90500)
    q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 256), jnp.int32)
    f = lambda q, k, v, s: jnp.sum(ak.cudnn_attention(q, k, v, s, 100).astype(jnp.float32))
    loss, grads = jax.eval_shape(jax.value_and_grad(f, argnums=(0, 1, 2)), q, k, k, seg)
    assert loss.shape == () and [g.shape for g in grads] == [q.shape, k.shape, k.shape]


# ------------------------------------------------------------------------- ahead of time, for a TPU topology


@pytest.fixture(scope="module")
def v5e_mesh():
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                            chips_per_host_bounds=(2, 2, 1), num_slices=1)
    except Exception as e:  # no libtpu wheel (pip install libtpu), or one this jax cannot load
        pytest.skip(f"cannot describe a v5e:2x2 TPU topology without libtpu ({type(e).__name__}: {e})"[:300])
    return jax.sharding.Mesh(np.array(topo.devices).reshape(1, 4, 1), sh.MESH_AXES)


def _compiled_step(impl, mesh, T):
    """The LoRA training step (LM loss, remat "full") of a one-layer model with 8 heads of 64 over hidden 128,
    batch 4 x T over fsdp 4, compiled for the mesh's TPU from abstract shapes (nothing allocated)."""
    cfg = _tiny_config(num_hidden_layers=1, num_attention_heads=8, head_dim=64).replace(attention_impl=impl)
    rules = sh.DEFAULT_RULES
    attach = lambda tree: jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), tree,
                                       sh.tree_shardings(cfg, tree, mesh, rules))
    params = attach(transformer.abstract_params(cfg, jnp.bfloat16))
    adapters = jax.eval_shape(lambda r: adapters_lib.init_adapter(cfg, r, {"rank": 8}), jax.random.PRNGKey(0))
    optimizer, schedule = optim.make_optimizer(lora.trainable_mask(adapters), lr=1e-3, steps=10)
    rep = sh.replicated(mesh)
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), "adapters": attach(adapters),
             "opt_state": attach(jax.eval_shape(optimizer.init, adapters)),
             "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)}
    batch = {k: jax.ShapeDtypeStruct((4, T), jnp.int32, sharding=sh.batch_sharding(mesh, rules))
             for k in ("tokens", "labels", "mask", "segment_ids", "positions")}
    loss_cfg = run_config.wrap({"alpha": 0.0, "temperature": 1.0, "divergence": "forward_kl", "beta": 0.5,
                                "chunk_size": 512})
    loss_fn = train.make_loss_fn(cfg, cfg, loss_cfg, "bfloat16", remat="full")
    step = train.make_train_step(loss_fn, optimizer, schedule)
    # jit_train_step's lower() traces under the mesh: "auto" would pick splash here too
    return train.jit_train_step(step, state, params, {}, mesh, rules).lower(state, params, {}, batch).compile()


def test_tpu_step_compiles_with_splash(v5e_mesh):
    """v5e:2x2: "auto" picks splash for the TPU mesh in context, and the training step with it compiles for the
    TPU (the Mosaic kernel is in the executable)."""
    with sh.mesh_context(v5e_mesh):
        assert ak.choose("auto", (1, 256, 8, 64), (1, 256, 2, 64), jnp.bfloat16) == "splash"
    assert "tpu_custom_call" in _compiled_step("auto", v5e_mesh, 256).as_text()


@pytest.mark.slow
def test_tpu_step_with_splash_needs_less_memory(v5e_mesh):
    """v5e:2x2, sequence 4096 (a few minutes: the xla step's unrolled query blocks compile slowly): the splash step's
    per-chip scratch is at most half the xla step's, whose float32 score blocks grow with the square of the sequence
    (measured: 23 MB against 341 MB; at 2048 the xla blocks of this small model still fit the chip's VMEM, which
    the HBM figure does not count, and both are about 7-15 MB)."""
    splash = _compiled_step("splash", v5e_mesh, 4096)
    xla = _compiled_step("xla", v5e_mesh, 4096)
    assert "tpu_custom_call" not in xla.as_text()
    t_splash, t_xla = (c.memory_analysis().temp_size_in_bytes for c in (splash, xla))
    assert t_splash <= 0.5 * t_xla, (t_splash, t_xla)
