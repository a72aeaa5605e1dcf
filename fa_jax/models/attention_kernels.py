"""Memory-efficient attention behind `layers.attention`: the Pallas splash kernel on TPU, cuDNN's fused attention on
NVIDIA GPUs. `layers.causal_attention` (blocked einsums compiled by XLA) stays the path everywhere else and the
reference both kernels are tested against (tests/test_attention_kernels.py).

`ModelConfig.attention_impl` (run configs: `model.attention`, applied by `train.with_attention`) chooses:

    "xla"     layers.causal_attention, always (the ModelConfig default: a bare `fa_jax.forward` is unchanged).
    "splash"  jax.experimental.pallas.ops.tpu.splash_attention, TPU only. Never forms the [T, S] scores: memory
              linear in the sequence length, fully masked blocks (above the diagonal, outside a window, between
              documents) skipped.
    "cudnn"   jax.nn.dot_product_attention(implementation="cudnn"), NVIDIA GPU only, bf16/fp16. UNTESTED ON
              HARDWARE: this project has had no GPU; the call is only traced here (jax.eval_shape).
    "auto"    splash on TPU, cudnn on GPU where the call is supported, else xla (the run-config default).

The platform is that of the devices of the mesh in context (`fa_jax.sharding.mesh_context`, which
`train.jit_train_step`'s calls and lowerings enter), read when the step is traced; not jax.default_backend(): a
step compiled ahead of time for a TPU topology on a CPU host must get the TPU kernel. With no mesh in context "auto"
is xla, and an explicit "splash"/"cudnn" is an error saying so.

An explicit "splash"/"cudnn" that cannot compute a call is a one-line FaJaxError naming what is unsupported; "auto"
falls back to xla for it silently. Not supported by either kernel: prompt/prefix-tuning prefixes (extra keys in
front of the sequence); queries and keys of different lengths. Splash also needs T a multiple of 128 (its blocks);
cudnn a bf16/fp16 compute dtype, a head dim <= 128 and a multiple of 8, an even T. LLaMA-Adapter's prompt attention
is added separately (layers.attention) and works with every choice. Splash's training step compiled for v5e with
head dims 8, 16, 64, 80, 96, 128 and 256, so no head dim is refused.

Under jax.checkpoint the kernels are not matmuls to a remat policy: every policy (transformer.REMAT_POLICIES)
recomputes the forward kernel in the backward pass, which rebuilds the residuals (output, logsumexp) the kernel's
own backward needs.

Same numbers for real tokens; padding differs: a padding position (segment id 0) sees no key in xla (a uniform
softmax over the keys of its query block), while both kernels let padding positions attend to the padding before
them. Their outputs are never read by real tokens and the loss masks them, so losses and gradients agree.
Scores and softmax are float32 in every path; splash takes the 1/sqrt(K) scale on the queries in their own dtype
(the kernel has no scale argument), which is exact for K = 64 and rounds once more in bf16 for K = 128.

Axis legend: B batch, T query time, S key time, H query heads, G key/value heads, Q query heads per key/value head
(H = G * Q, head h reads key/value head h // Q), K head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fa_jax import sharding as sh
from fa_jax.errors import FaJaxError

IMPLS = ("auto", "xla", "splash", "cudnn")
SPLASH_BLOCKS = (512, 256, 128)  # query/key block sizes tried, largest first; the kernel needs multiples of 128
CUDNN_MAX_HEAD_DIM = 128  # cuDNN flash attention before Hopper (256 from Hopper on; not enabled untested)


def check_impl(impl) -> str:
    if impl not in IMPLS:
        raise FaJaxError(f"model.attention={impl!r}: expected one of {', '.join(IMPLS)}")
    return impl


def context_device():
    """(platform, device kind) of the mesh in context ("tpu", "TPU v5 lite"), or (None, None) without one."""
    mesh = jax.sharding.get_abstract_mesh()
    dev = None if mesh.empty else mesh.abstract_device
    return (None, None) if dev is None else (dev.platform, dev.device_kind)


def unsupported(impl: str, q_shape, k_shape, dtype, *, prefix=None, platform=None, device_kind=None) -> str | None:
    """Why kernel `impl` ("splash" or "cudnn") cannot compute attention of q [B, T, H, K] over k [B, S, G, K] in
    `dtype` on `platform`, or None if it can."""
    T, S, K = q_shape[1], k_shape[1], q_shape[-1]
    if platform is None:
        return "no device mesh in context to run the kernel on (trace under fa_jax.sharding.mesh_context(mesh))"
    if impl == "splash" and platform != "tpu":
        return f"the Pallas splash kernel runs on TPU only; the mesh in context is {platform} ({device_kind})"
    if impl == "cudnn" and (platform != "gpu" or "nvidia" not in str(device_kind).lower()):
        return f"cuDNN runs on NVIDIA GPUs only; the mesh in context is {platform} ({device_kind})"
    if prefix is not None:
        return "prompt/prefix-tuning prefixes (extra keys in front of the sequence) are not supported"
    if T != S:
        return f"queries ({T}) and keys ({S}) of different lengths are not supported"
    if impl == "splash" and T % SPLASH_BLOCKS[-1]:
        return f"sequence length {T} is not a multiple of the kernel's block of {SPLASH_BLOCKS[-1]}"
    if impl == "cudnn":
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"compute dtype {jnp.dtype(dtype).name} is not supported (bfloat16 or float16)"
        if K > CUDNN_MAX_HEAD_DIM or K % 8:
            return f"head dim {K} is not supported (a multiple of 8, at most {CUDNN_MAX_HEAD_DIM})"
        if T % 2:
            return f"odd sequence length {T} is not supported"
    return None


def choose(impl: str, q_shape, k_shape, dtype, *, prefix=None) -> str:
    """The path ("xla", "splash" or "cudnn") that computes this call for setting `impl` (see the module docstring).
    Runs at trace time."""
    impl = check_impl(impl)
    if impl == "xla":
        return "xla"
    platform, kind = context_device()
    if impl == "auto":
        want = {"tpu": "splash", "gpu": "cudnn"}.get(platform)
        ok = want and not unsupported(want, q_shape, k_shape, dtype, prefix=prefix, platform=platform,
                                      device_kind=kind)
        return want if ok else "xla"
    reason = unsupported(impl, q_shape, k_shape, dtype, prefix=prefix, platform=platform, device_kind=kind)
    if reason:
        raise FaJaxError(f"model.attention={impl!r}: {reason}")
    return impl


# ------------------------------------------------------------------------------------------------------ TPU


def splash_attention(q, k, v, segment_ids, window: int = 0, *, mesh=None, interpret: bool = False):
    """Causal attention of q [B, T, H, K] over k, v [B, T, G, K] with the splash kernel -> [B, T, H, K].

    segment_ids [B, T]: packed documents, 0 = padding; a query sees keys of its own segment only. window > 0: keys
    fewer than `window` positions back only (LocalMask). T must be a multiple of 128.

    Pallas kernels are not partitioned by the compiler: with a `mesh` (the mesh in context when None and one is
    set) the kernel runs under shard_map with batch over the batch rule's mesh axes and heads over the heads rule's
    (sharding.DEFAULT_RULES: data x fsdp, tensor), each where it divides; other runs reshard around it. Differentiable
    (the kernel's own custom vjp) and usable inside jax.checkpoint. `interpret=True` runs the kernel in Pallas'
    interpreter (any platform; tests).
    """

    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    local = lambda q, k, v, seg: _splash_local(q, k, v, seg, window, interpret)
    if mesh.empty:
        return local(q, k, v, segment_ids)
    B, T, H, K = q.shape
    G = k.shape[2]
    axes = ("batch", None, "heads", None)
    spec = sh.spec_for((B, T, H, K), axes, mesh)
    if sh.spec_for((B, T, G, K), axes, mesh) != spec:  # kv heads the tensor axis does not divide: keep heads whole
        spec = sh.spec_for((B, T, 1, K), axes, mesh)
    # check_vma off: pallas_call does not annotate which mesh axes its output varies over; every shard's work is
    # independent (no collectives), so there is nothing for the check to find.
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, jax.sharding.PartitionSpec(spec[0], None)),
                         out_specs=spec, check_vma=False)(q, k, v, segment_ids)


def _splash_local(q, k, v, segment_ids, window, interpret):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    B, T, H, K = q.shape
    blk = next(b for b in SPLASH_BLOCKS if T % b == 0)
    sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    # LocalMask's left window counts the keys before the query: q - k < window
    mask = sa.LocalMask((T, T), (window - 1, 0), offset=0) if window else sa.CausalMask((T, T))
    # built per trace: the block tables come from mask_info's lru_cache, the rest is cheap
    kernel = sa.make_splash_mha(sa.MultiHeadMask((mask,) * H), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    q = q * jnp.asarray(K ** -0.5, q.dtype)
    seg = segment_ids.astype(jnp.int32)
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # the kernel takes [heads, time, K] per batch row
    out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(s, s)))(
        heads_major(q), heads_major(k), heads_major(v), seg)
    return heads_major(out)


# ------------------------------------------------------------------------------------------------------ GPU


def cudnn_attention(q, k, v, segment_ids, window: int = 0):
    """Causal attention of q [B, T, H, K] over k, v [B, T, G, K] with cuDNN's fused kernel -> [B, T, H, K].

    UNTESTED ON HARDWARE (no GPU in this project): checked only to trace (tests/test_attention_kernels.py). This jax
    version's `dot_product_attention` takes no segment ids, so the documents of packed rows become a boolean
    [B, 1, T, S] mask, which cuDNN turns into an additive bias: O(T * S) per row, shared by the heads (the xla
    path's float32 scores are that per head). Sharding is left to the compiler (the cuDNN call has partitioning
    rules).
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = (same & (segment_ids[:, None, :] != 0))[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                        local_window_size=(window - 1, 0) if window else None,
                                        implementation="cudnn")
