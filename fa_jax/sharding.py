"""The device mesh and the one table of logical-axis rules that shards student, adapters, teacher and batches.

Every parameter carries logical axis names ("embed", "heads", "kv_heads", "mlp", "vocab", "norm": the table of
models/spec.py, from which the Flax modules of models/modules.py declare their parameters); a rule maps a logical
name to mesh axes. The mesh has the axes (data, fsdp, tensor): batches split over data x fsdp, weights over fsdp
(ZeRO-3 style) and tensor (Megatron style).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fa_jax.errors import FaJaxError
from fa_jax.models.spec import param_specs

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("rank", None),
)


def make_mesh(shape: Sequence[int] | dict = (-1, 1, 1), devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh. One entry may be -1: all the remaining devices (of every process); without a
    -1 the mesh takes the first devices it needs (e.g. [1, 1, 1] runs on one device)."""
    devices = list(devices if devices is not None else jax.devices())
    if isinstance(shape, dict):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise FaJaxError(f"mesh: unknown axis {sorted(unknown)[0]!r} (axes: {', '.join(MESH_AXES)})")
        shape = [shape.get(a, 1) for a in MESH_AXES]
    shape = [int(s) for s in shape]
    if len(shape) != 3 or shape.count(-1) > 1:
        raise FaJaxError(f"mesh shape {shape}: expected 3 sizes for (data, fsdp, tensor), at most one of them -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 not in shape and known < len(devices) and jax.process_count() == 1:
        devices = devices[:known]
    if -1 in shape:
        if len(devices) % known:
            raise FaJaxError(f"mesh shape {shape}: {len(devices)} devices are not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise FaJaxError(f"mesh shape {shape} needs {math.prod(shape)} devices, there are {len(devices)}")
    try:
        arr = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # some topologies (e.g. simulated CPU devices across processes) have no preferred layout
        arr = np.array(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def spec_for(shape, axes, mesh: Mesh, rules=DEFAULT_RULES) -> P:
    """PartitionSpec for one array: each logical axis mapped by `rules`; a dimension the mesh axes do not divide,
    or a mesh axis already used by an earlier dimension, stays replicated."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, axes):
        target = table.get(name)
        names = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        names = tuple(n for n in names if n not in used and mesh.shape.get(n, 1) > 1)
        size = math.prod(mesh.shape[n] for n in names)
        if names and dim % size == 0:
            out.append(names[0] if len(names) == 1 else names)
            used.update(names)
        else:
            out.append(None)
    return P(*out)


class Rules:
    """A mesh plus rule table; `fa_jax.load_model(path, sharding=Rules(mesh))` shards each tensor as it loads."""

    def __init__(self, mesh: Mesh, rules=DEFAULT_RULES):
        self.mesh, self.rules = mesh, tuple(rules)

    def for_config(self, config) -> dict:
        return param_shardings(config, self.mesh, self.rules)


def param_shardings(config, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """{param path: NamedSharding}; pass it to `fa_jax.load_model(..., sharding=...)` or use as a jit sharding."""
    return {path: NamedSharding(mesh, spec_for(shape, axes, mesh, rules))
            for path, (shape, axes) in param_specs(config).items()}


def tree_shardings(config, tree, mesh: Mesh, rules=DEFAULT_RULES):
    """Shardings for a params-shaped or adapter-shaped tree (same nesting as the base params), or a tree that
    nests one (an optimizer state).

    LoRA `lora_A` [in, r] follows the kernel's input axis, `lora_B` [r, out] its output axis; an int8 weight
    (quant.QInt8, paths ending in `.q` / `.scale`) is laid out like the weight, its scale's size-1 axis whole;
    anything else at a module path without a rule (scalars, vectors of adapters) is replicated.
    """
    specs = param_specs(config)

    def one(path, leaf):
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        # Optimizer states nest the adapter tree (e.g. inner_state.0.mu.model.layers...): match from its root.
        for root in ("model", "lm_head"):
            if root in keys:
                keys = keys[keys.index(root):]
                break
        shape = getattr(leaf, "shape", ())
        if len(keys) > 2 and keys[:2] == ["model", "layers"] and not keys[2].isdigit() and shape:
            # stacked layers (transformer.stack_layers): the leading layer axis stays whole, the rest as layer 0's
            inner = one_keys(["model", "layers", "0"] + keys[2:], shape[1:])
            return NamedSharding(mesh, P(None, *inner))
        return NamedSharding(mesh, P(*one_keys(keys, shape)))  # P() for a scalar or an unmatched leaf

    def one_keys(keys, shape):
        dotted = ".".join(keys)
        if dotted in specs:
            return tuple(spec_for(shape, specs[dotted][1], mesh, rules))
        if keys[-1] in ("q", "scale") and ".".join(keys[:-1]) in specs:  # quant.QInt8
            return tuple(spec_for(shape, specs[".".join(keys[:-1])][1], mesh, rules))
        kernel = ".".join(keys[:-1]) + ".kernel"
        if kernel in specs and len(shape) == 2:
            in_axis, out_axis = specs[kernel][1]
            axes = {"lora_A": (in_axis, "rank"), "lora_B": ("rank", out_axis)}.get(keys[-1])
            if axes:
                return tuple(spec_for(shape, axes, mesh, rules))
        return ()

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of [B, T] batch arrays: B over the batch rule's mesh axes (data x fsdp), T replicated."""
    target = dict(rules).get("batch")
    names = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    names = tuple(n for n in names if mesh.shape.get(n, 1) > 1)
    return NamedSharding(mesh, P(names if names else None, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


_RULES = contextvars.ContextVar("fa_jax_rules", default=None)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules=DEFAULT_RULES):
    """`with mesh_context(mesh):` code traced inside sees `mesh` (jax.set_mesh) and the rule table: the attention
    kernels read its devices to pick a kernel (models/attention_kernels.py) and shard_map over it, and the models
    lay out their activations by the rules (`constrain_batch`, `gathered`). Outside of any jit only."""
    token = _RULES.set(tuple(rules))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _RULES.reset(token)


def _context():
    """(abstract mesh, rules) when traced under `mesh_context` on more than one device, else None."""
    rules = _RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty or mesh.size == 1:
        return None
    return mesh, rules


def constrain_batch(x):
    """x [B, ...] with B split over the batch rule's mesh axes and every other axis whole on each device, under
    `mesh_context` (unchanged elsewhere). Where the batch and the weights' model axis are both split over fsdp,
    GSPMD may otherwise split an activation's model axis like the weights' and all-reduce every matmul's output
    (on the seed's setting: a 7.8 GiB all-reduce of a logits chunk) instead of gathering the weights (FSDP)."""
    ctx = _context()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = spec_for(x.shape, ("batch",) + (None,) * (x.ndim - 1), mesh, rules)
    return jax.lax.with_sharding_constraint(x, spec)


def gathered(x, axes):
    """A weight with logical `axes` as its matmul uses it under `mesh_context`: whole along the axes the rules
    split over fsdp (gathered, as FSDP does), still split along tensor-parallel axes; unchanged elsewhere. An int8
    weight (quant.QInt8) is constrained leaf by leaf, its scale's size-1 axis whole."""
    ctx = _context()
    if ctx is None:
        return x
    mesh, rules = ctx
    no_fsdp = tuple((name, tuple(a for a in ((t,) if isinstance(t, str) else (t or ())) if a != "fsdp") or None)
                    for name, t in rules)
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, spec_for(a.shape, axes, mesh, no_fsdp)), x)


class InMesh:
    """A jitted function whose calls, `.lower` and `.trace` run under `mesh_context(mesh)`, so that whoever traces
    it (the training loop, an ahead-of-time compile) traces it the same way. Other attributes are the jitted
    function's."""

    def __init__(self, fn, mesh: Mesh, rules=DEFAULT_RULES):
        self.fn, self.mesh, self.rules = fn, mesh, rules

    def __call__(self, *args, **kwargs):
        with mesh_context(self.mesh, self.rules):
            return self.fn(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with mesh_context(self.mesh, self.rules):
            return self.fn.lower(*args, **kwargs)

    def trace(self, *args, **kwargs):
        with mesh_context(self.mesh, self.rules):
            return self.fn.trace(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.fn, name)
