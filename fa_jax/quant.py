"""Weight-only int8 quantization of a frozen model: the live teacher of `teacher.quantize: int8`.

A matrix W is held as int8 `q` and float32 `scale`, symmetric (no zero point), one scale per channel:

    scale = max |W| over the reduced axis / 127     (1 for an all-zero channel: its q is exactly 0)*
    q     = round(W / scale), in [-127, 127]         (round half to even)*
    W    ~= q * scale                                (scale keeps the channel axis and has size 1 on the other)

    * divisions computed as products with a float32 reciprocal, max |W| * (1 / 127) and W * (1 / scale), the way
      XLA rewrites a division by a constant or a broadcast, so NumPy can reproduce q and scale exactly

    params = quantize_params(config, params, "int8")      # kernels, the embedding and an untied head become QInt8
    param_bytes(params)                                   # about half of the bfloat16 tree

Channels: a linear `kernel` [I, O] (stacked [L, I, O] under `model.scan_layers`) keeps O (scale [1, O], [L, 1, O]);
the embedding `model.embed_tokens.embedding` [V, D] keeps V (scale [V, 1]), so a tied LM head has one scale per
vocabulary entry too; an untied `lm_head.kernel` [D, V] is a kernel, one scale per vocabulary column. Norms and
biases stay as they are.

The model computes with q itself: `einsum` is (x @ q.astype(x.dtype)) * scale, exact algebra since the scale is
constant along the contracted axis, and `take` looks up q[ids] * scale[ids]. The product q * scale of a whole
matrix never exists. q itself is converted to the activations' dtype for the matmul: XLA:CPU writes that converted
copy of one matrix at a time to a transient buffer just before its dot (seen in the optimized HLO); GPU and TPU
compilers can fuse the convert into the matmul (not checked here).

Axis legend: I in, O out, L layers, V vocab, D model.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fa_jax.errors import FaJaxError

MODES = ("int8",)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q", "scale"], meta_fields=["float_dtype"])
@dataclasses.dataclass(frozen=True)
class QInt8:
    """A per-channel int8 matrix: `q` int8 of the weight's shape, `scale` float32 of the same rank with size 1 on
    the reduced axis, W ~= q * scale. A pytree whose leaves are q and scale (key paths end in `.q` / `.scale`), so
    jit, sharding, stacking and nn.scan handle it like two arrays. `float_dtype` (static) is the dtype of the weight
    it stands for: `dequantize()` gives it back, and a model holding QInt8 weights computes in it by default."""

    q: Any
    scale: Any
    float_dtype: Any = np.dtype(np.float32)

    @property
    def shape(self) -> tuple:
        return tuple(self.q.shape)

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def ndim(self) -> int:
        return len(self.q.shape)

    @property
    def nbytes(self) -> int:
        return param_bytes(self)

    @property
    def T(self) -> "QInt8":
        """The transposed matrix (a tied embedding [V, D] as the head [D, V]), q and scale transposed alike."""
        return QInt8(self.q.T, self.scale.T, self.float_dtype)

    def dequantize(self, dtype=None):
        """q * scale in `dtype` (default `float_dtype`): the whole matrix, for reference and tests."""
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype or self.float_dtype)


def quantize(w, axis: int) -> QInt8:
    """`w` (any float array, traced or not) as a QInt8 with one scale per slice along every axis but `axis`, the
    reduced one (module docstring)."""
    w32 = jnp.asarray(w).astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=axis, keepdims=True)
    scale = jnp.where(amax > 0, amax * np.float32(1 / 127), 1.0)  # written as XLA would rewrite amax / 127
    q = jnp.clip(jnp.round(w32 * (1.0 / scale)), -127, 127).astype(jnp.int8)
    return QInt8(q, scale, jnp.dtype(w.dtype))


def dequantize(w, dtype=None):
    """A weight as a plain array: q * scale for a QInt8 (in `dtype`, default its float dtype), else `w` (in
    `dtype` if given)."""
    if isinstance(w, QInt8):
        return w.dequantize(dtype)
    return w if dtype is None else w.astype(dtype)


def float_dtype(w):
    """The dtype a weight computes in: its own, or the float dtype a QInt8 was quantized from."""
    return jnp.dtype(w.float_dtype if isinstance(w, QInt8) else w.dtype)


# ------------------------------------------------------------------------------------------------ computing


def einsum(spec: str, x, w, *, preferred_element_type=None):
    """`jnp.einsum(spec, x, w)` with w cast to x's dtype, for w an array or a QInt8. For a QInt8, the channel axis
    its scale keeps must be the output's last axis (a kernel [I, O] in "...i,io->...o", an LM head [D, V] or [V, D]
    giving [..., V]): the product is accumulated in float32, scaled per channel, then cast to
    `preferred_element_type` or x's dtype, so it rounds once like the unquantized matmul."""
    if not isinstance(w, QInt8):
        return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=preferred_element_type)
    y = jnp.einsum(spec, x, w.q.astype(x.dtype), preferred_element_type=jnp.float32)
    scale = w.scale.reshape(-1)
    if scale.shape[0] != y.shape[-1]:
        raise FaJaxError(f"quant.einsum({spec!r}): the weight's scale {list(w.scale.shape)} is not per channel of "
                         f"the output's last axis ({y.shape[-1]})")
    return (y * scale).astype(preferred_element_type or x.dtype)


def take(table, ids):
    """Rows `ids` [...] of an embedding table [V, D] (array or QInt8): [..., D]; a QInt8's rows in float32."""
    if not isinstance(table, QInt8):
        return jnp.take(table, ids, axis=0)
    return jnp.take(table.q, ids, axis=0).astype(jnp.float32) * jnp.take(table.scale, ids, axis=0)


def vocab_slice(head, v: int, vd: bool):
    """The first `v` vocabulary entries of an LM head, [V, D] if `vd` else [D, V] (array or QInt8)."""
    return jax.tree.map(lambda a: a[:v] if vd else a[:, :v], head)


# ------------------------------------------------------------------------------------------------ whole trees


def _reduced_axis(path: str, leaf) -> int | None:
    """The axis a quantized leaf reduces over (None: the leaf stays as it is). Kernels [I, O] / [L, I, O] keep
    their output axis, the embedding [V, D] its rows."""
    name = path.rsplit(".", 1)[-1]
    ndim = len(np.shape(leaf))
    if name == "kernel":
        if ndim not in (2, 3):
            raise FaJaxError(f"quantize: {path} has shape {list(np.shape(leaf))}; expected a kernel [in, out] or "
                             f"stacked layers' [layers, in, out]")
        return ndim - 2
    if name == "embedding" and path.endswith("embed_tokens.embedding"):
        if ndim != 2:
            raise FaJaxError(f"quantize: {path} has shape {list(np.shape(leaf))}; expected [vocab, model]")
        return 1
    return None


def _scale_sharding(sharding, ndim: int, axis: int):
    """The sharding of a scale computed from a weight with `sharding`: the weight's layout with the reduced axis
    (size 1 in the scale) whole. None where the weight's sharding is not a NamedSharding (let jit choose)."""
    if isinstance(sharding, NamedSharding):
        spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
        spec[axis] = None
        return NamedSharding(sharding.mesh, P(*spec))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    return None


@functools.lru_cache(maxsize=None)
def _jitted(axis: int, out_shardings):
    def fn(w):
        out = quantize(w, axis)
        return out.q, out.scale

    return jax.jit(fn, out_shardings=out_shardings)


def _quantize_leaf(x, axis: int, donate: bool):
    """One leaf: abstract (ShapeDtypeStruct, shardings carried over), traced (plain function), or concrete (a jit
    that keeps the input's sharding; the input deleted afterwards when `donate`)."""
    shape, ndim = tuple(np.shape(x)), len(np.shape(x))
    scale_shape = shape[:axis] + (1,) + shape[axis + 1:]
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = getattr(x, "sharding", None)
        scale_sh = None if sharding is None else _scale_sharding(sharding, ndim, axis)
        return QInt8(jax.ShapeDtypeStruct(shape, jnp.int8, sharding=sharding),
                     jax.ShapeDtypeStruct(scale_shape, jnp.float32, sharding=scale_sh), jnp.dtype(x.dtype))
    if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
        return quantize(x, axis)
    scale_sh = _scale_sharding(x.sharding, ndim, axis)
    fn = _jitted(axis, None if scale_sh is None else (x.sharding, scale_sh))
    q, scale = fn(x)
    if donate:
        x.delete()  # the buffer goes once the quantizing computation is done with it
    return QInt8(q, scale, jnp.dtype(x.dtype))


def quantize_params(config, params, mode: str | None = "int8", *, donate: bool = False, keep=None):
    """The params tree (HF-path nested dicts, per-layer or stacked layers) with every linear `kernel`, the embedding
    and an untied `lm_head.kernel` as QInt8 (module docstring); norms, biases and QInt8 leaves unchanged. mode None
    returns `params` as it is; an unknown mode is a FaJaxError.

    Leaves may be arrays (each quantized by a jit that keeps its sharding: a model sharded over a mesh stays sharded
    the same way, the scales laid out like their weights' kept axis), tracers (so it works under jit and
    `jax.eval_shape`) or `jax.ShapeDtypeStruct`s (for an ahead-of-time compile: q keeps the struct's sharding).
    An array appearing at several paths is quantized once and stays shared.

    donate: delete each full-precision array once it is quantized, so memory peaks near one full-precision copy
    plus one leaf, not plus the whole int8 copy; the caller must not use `params` afterwards. Arrays that are also
    leaves of `keep` (another tree, e.g. a student sharing the teacher's layers) are never deleted.
    `config` (the model's ModelConfig) checks that the tree is this model's."""
    if mode is None:
        return params
    if mode not in MODES:
        raise FaJaxError(f"quantize={mode!r}: expected one of {', '.join(MODES)} (or None for full precision)")
    emb = params.get("model", {}).get("embed_tokens", {}).get("embedding") if isinstance(params, dict) else None
    want = (config.vocab_size, config.hidden_size)
    if emb is None or tuple(np.shape(emb)) != want:
        got = "no model.embed_tokens.embedding" if emb is None else f"embedding {list(np.shape(emb))}"
        raise FaJaxError(f"quantize: the params hold {got}; this {config.model_type} config expects "
                         f"[{want[0]}, {want[1]}]")
    kept = {id(x) for x in jax.tree.leaves(keep)} if donate and keep is not None else set()
    done: dict[int, QInt8] = {}

    def walk(node, path):
        if isinstance(node, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        if isinstance(node, QInt8) or node is None:
            return node
        axis = _reduced_axis(path, node)
        if axis is None:
            return node
        if id(node) not in done:
            done[id(node)] = _quantize_leaf(node, axis, donate and id(node) not in kept)
        return done[id(node)]

    return walk(params, "")


def param_bytes(tree) -> int:
    """Total bytes of the leaves of a params tree (arrays or ShapeDtypeStructs; a QInt8 counts q and scale)."""
    return int(sum(math.prod(np.shape(x)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
