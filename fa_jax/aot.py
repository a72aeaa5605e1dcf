"""Ahead-of-time compilation for TPU topologies: does a config fit, how much does it communicate, how fast could it
run, before anyone pays for a slice.

    fa-jax compile --config configs/pretrain_llama31_8b_to_llama32_1b.py --topology v5e-8
    fa-jax compile --config configs/sft_smollm2.py --topology v6e-8 --program generate --batch 32 --cache-len 2048

With the `libtpu` wheel installed (`pip install -e .[tpu]`), JAX describes the devices of a TPU topology on a
machine without TPUs; the step that `fa-jax pretrain` (or `sft`) would run is built over abstract, sharded inputs
(no weights are read or allocated) and compiled by the real TPU compiler. The executable's memory analysis gives
the per-chip HBM; its cost analysis the FLOPs and bytes; its optimized HLO the collectives (`fa_jax.hlo_stats`).
The step time and MFU are a roofline estimate from the chip facts in `CHIPS` (each with its public source), not a
measurement.

Where a model path in the config does not exist (the shipped seed config names /path/to/...), its shapes come from
the `configs/models/` file of the same name, and the report says so.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils

from fa_jax import adapters as adapters_lib
from fa_jax import config as config_lib
from fa_jax import hlo_stats, quant, run_config, train
from fa_jax import sharding as sh
from fa_jax import teacher_cache as tc
from fa_jax.embedded import resolve_model_path
from fa_jax.errors import FaJaxError
from fa_jax.io.atomic import write_text
from fa_jax.io.gguf import gguf_config
from fa_jax.memory import (  # noqa: F401  (public here too: they were defined here)
    USABLE_FRACTION, GiB, gib, memory_budget, memory_of, parse_bytes)
from fa_jax.metrics import kd_step_flops
from fa_jax.models import transformer

MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models")


@dataclasses.dataclass(frozen=True)
class Chip:
    """Public per-chip figures of a TPU generation (dense bf16, no sparsity)."""

    name: str  # as jax reports device_kind
    hbm_bytes: float
    peak_flops: float  # bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s per chip, bidirectional, all links
    dcn_bandwidth: float | None  # bytes/s per chip between slices (the hosts' NICs shared by their chips)
    cores_in_name: bool  # "v4-8" / "v5p-8" count TensorCores (2 per chip); "v5e-8" / "v6e-8" count chips
    source: str


CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1200e9, 6 * 2 * 45e9, None, True,
               "https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s, 32 GiB, 1200 GB/s); ICI: 6 links x 45 GB/s each "
               "way, https://jax-ml.github.io/scaling-book/tpus/ ; DCN per chip not published: not estimated"),
    "v5e": Chip("TPU v5 lite", 16 * GiB, 197e12, 819e9, 400e9, 2 * 100e9 / 8 / 8, False,
                "https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s, 16 GiB, 819 GB/s, ICI 400 GB/s bidirectional "
                "per chip, 2 x 100 Gbps NIC per host of 8 chips)"),
    "v5p": Chip("TPU v5", 95 * GiB, 459e12, 2765e9, 1200e9, 50e9 / 8, True,
                "https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s, 95 GiB, 2765 GB/s, ICI 1200 GB/s bidirectional "
                "per chip, DCN 50 Gbps per chip)"),
    "v6e": Chip("TPU v6 lite", 32 * GiB, 918e12, 1640e9, 3584e9 / 8, 4 * 200e9 / 8 / 8, False,
                "https://cloud.google.com/tpu/docs/v6e (918 TFLOP/s, 32 GB, 1640 GB/s, ICI 3584 Gbps per chip, "
                "4 x 200 Gbps NIC per host of 8 chips)"),
}
# Slice shapes by chip count: 2D tori for v5e/v6e, 3D for v4/v5p (the shapes Cloud TPU offers).
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: str  # a key of CHIPS
    shape: str  # "2x4", "2x2x1"
    slices: int = 1

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    @property
    def chips_per_slice(self) -> int:
        return math.prod(int(d) for d in self.shape.split("x"))

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.slices

    @property
    def name(self) -> str:
        per = self.chips_per_slice * (2 if self.chip.cores_in_name else 1)
        return f"{self.generation}-{per}" + (f" x {self.slices} slices" if self.slices > 1 else "")


def parse_topology(spec: str, slices: int = 1) -> Topology:
    """"v5e-8", "v6e-256", "v4-8" (TensorCores: 4 chips), "v5p-8", "v5litepod-16", or JAX's own "v5e:2x4" /
    "v5p:2x2x1". `slices` > 1: that many such slices joined by the data-center network."""
    text = str(spec).strip().lower().replace("v5litepod", "v5e")
    known = ", ".join(f"{g}-N" for g in CHIPS)
    if int(slices) < 1:
        raise FaJaxError(f"--slices {slices}: expected 1 or more")
    m = re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+){1,2})", text)
    if m:
        gen, shape = m.groups()
        if gen not in CHIPS:
            raise FaJaxError(f"topology {spec!r}: unknown TPU generation {gen!r} (known: {', '.join(CHIPS)})")
        want = 3 if CHIPS[gen].cores_in_name else 2
        if len(shape.split("x")) != want:
            raise FaJaxError(f"topology {spec!r}: {gen} slices are {want}-D (e.g. {gen}:"
                             f"{'2x2x1' if want == 3 else '2x4'})")
        return Topology(gen, shape, int(slices))
    m = re.fullmatch(r"(v\d+[a-z]?)-(\d+)", text)
    if not m:
        raise FaJaxError(f"topology {spec!r}: expected a slice name such as v5e-8, v6e-256, v4-8, v5p-8 ({known}) "
                         "or a JAX topology such as v5e:2x4")
    gen, n = m.group(1), int(m.group(2))
    if gen not in CHIPS:
        raise FaJaxError(f"topology {spec!r}: unknown TPU generation {gen!r} (known: {', '.join(CHIPS)})")
    chip = CHIPS[gen]
    chips = n // 2 if chip.cores_in_name else n
    table = _SHAPES_3D if chip.cores_in_name else _SHAPES_2D
    if (chip.cores_in_name and n % 2) or chips not in table:
        sizes = ", ".join(f"{gen}-{c * (2 if chip.cores_in_name else 1)}" for c in table)
        raise FaJaxError(f"topology {spec!r}: no {gen} slice of that size (known: {sizes})")
    return Topology(gen, table[chips], int(slices))


def libtpu_install_hint() -> str:
    """The pip command that installs the libtpu the installed jax was released with."""
    try:
        for req in importlib.metadata.requires("jax") or ():
            if req.startswith("libtpu") and "tpu" in req.split(";", 1)[-1]:
                return f'pip install "{req.split(";")[0].strip()}" (or pip install -e ".[tpu]")'
    except importlib.metadata.PackageNotFoundError:
        pass
    return 'pip install -e ".[tpu]"'


def tpu_devices(topology: Topology) -> list:
    """The abstract devices of a TPU topology (no TPU needed; needs the libtpu wheel)."""
    if importlib.util.find_spec("libtpu") is None:
        raise FaJaxError(f"compiling for {topology.name} needs the libtpu wheel, which is not installed: "
                         f"{libtpu_install_hint()}")
    # libtpu takes a machine-wide lock file when it loads; describing a topology touches no TPU, so compiling
    # beside another process that holds it (a second compile, a test run) is safe
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # lazy: TPU-only API, reached once libtpu is known to be installed

    dims = [int(d) for d in topology.shape.split("x")] + [1]
    bounds = tuple(min(d, b) for d, b in zip(dims[:3], (2, 2, 1)))
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{topology.generation}:{topology.shape}",
                                            chip_config_name="default", chips_per_host_bounds=bounds,
                                            num_slices=topology.slices)
    except Exception as e:  # libtpu's own errors are long C++ status strings
        first = " ".join(str(e).split())[:300]
        raise FaJaxError(f"topology {topology.name}: libtpu could not describe it ({type(e).__name__}: {first})"
                         ) from None
    return list(desc.devices)


def topology_mesh(mesh_shape, topology: Topology, devices) -> jax.sharding.Mesh:
    """The config's (data, fsdp, tensor) mesh over one slice's chips; with several slices, the data axis is
    multiplied by the number of slices and crosses them (only the data-parallel gradient reduction goes over the
    data-center network)."""
    per_slice = [d for d in devices if getattr(d, "slice_index", 0) in (0, None)]
    sizes = [int(x) for x in mesh_shape]
    if -1 not in sizes and math.prod(sizes) != len(per_slice):
        raise FaJaxError(f"mesh shape {sizes} uses {math.prod(sizes)} of the {len(per_slice)} chips of "
                         f"{topology.name}" + (" per slice" if topology.slices > 1 else "")
                         + ": give sizes whose product is the chip count, or -1 for one of them")
    if topology.slices == 1:
        return sh.make_mesh(mesh_shape, devices=devices)
    ici = sh.make_mesh(mesh_shape, devices=per_slice[: topology.chips_per_slice]).devices.shape
    try:
        arr = mesh_utils.create_hybrid_device_mesh(ici, (topology.slices, 1, 1), devices)
    except Exception as e:
        raise FaJaxError(f"topology {topology.name}: cannot lay the mesh {list(ici)} per slice over "
                         f"{topology.slices} slices ({' '.join(str(e).split())[:200]})") from None
    return jax.sharding.Mesh(arr, sh.MESH_AXES)


# ------------------------------------------------------------------------------------------ models by shape only


def model_config(spec: str):
    """(ModelConfig, note) of a model path without reading weights: a Hugging Face directory's config.json, a GGUF
    file's metadata, or, where the path does not exist, the configs/models/ file of the same name (note says so)."""
    try:
        path = resolve_model_path(spec)
    except FaJaxError:  # an embedded model whose package is missing: its shapes may still be in configs/models
        path = spec.split(":", 1)[1]
    if os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".json")):
        return config_lib.load_config(path), None
    if os.path.isfile(path) and path.endswith(".gguf"):
        return gguf_config(path), None
    name = os.path.basename(os.path.normpath(str(path))).lower()
    for candidate in (name, name.removesuffix(".gguf")):
        f = os.path.join(MODELS_DIR, candidate + ".json")
        if os.path.exists(f):
            return config_lib.load_config(f), f"{spec} does not exist here: shapes from configs/models/{candidate}.json"
    have = sorted(n[:-5] for n in os.listdir(MODELS_DIR) if n.endswith(".json")) if os.path.isdir(MODELS_DIR) else []
    raise FaJaxError(f"model {spec!r}: no such directory or file, and configs/models/ has no {name}.json to take its "
                     f"shapes from (it has: {', '.join(have) or 'nothing'})")


def abstract_sharded(config, dtype, mesh, rules):
    """The parameter tree as ShapeDtypeStructs carrying the rule table's shardings."""
    shapes = transformer.abstract_params(config, jnp.dtype(dtype))
    return with_shardings(shapes, sh.tree_shardings(config, shapes, mesh, rules))


def with_shardings(shapes, shardings):
    return jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), shapes, shardings)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs (the largest shard of each)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return int(total)


# ---------------------------------------------------------------------------------------------- the programs


@dataclasses.dataclass
class Program:
    """A jitted function with its abstract arguments, and what it is made of."""

    name: str
    fn: object  # jitted
    args: tuple
    arguments: dict  # {"teacher": bytes per device, ...}
    model_flops: float  # per step (or per call), all devices together
    tokens: int  # per step (or per call)
    rules: tuple = sh.DEFAULT_RULES
    remat: object = None
    recompute_flops: float = 0.0  # what rematerialization adds to the model FLOPs (all devices, where known)


def run_kind(config: dict) -> str:
    """"sft" for configs with an `init` key (fa-jax sft), else "pretrain"."""
    return "sft" if "init" in config else "pretrain"


def resolve_run_config(path, overrides=(), kind: str | None = None):
    """(kind, resolved config) as `fa-jax pretrain` / `fa-jax sft` would resolve them."""
    raw = run_config.read_file(path) if path else {}
    kind = kind or run_kind(raw)
    return kind, run_config.load(path, run_config.defaults(kind), overrides, settings=raw)


def _models(cfg, kind, mesh, rules, with_teacher=None):
    """(teacher_cfg, teacher, student_cfg, student, notes) as abstract sharded trees; teacher None without KD."""
    notes = []
    dtype = cfg.model.dtype
    with_teacher = float(cfg.loss.alpha) > 0 if with_teacher is None else with_teacher
    teacher_cfg = teacher = None
    if with_teacher or (kind == "pretrain" and cfg.model.student in (None, cfg.model.teacher)):
        if cfg.model.teacher is None:
            raise FaJaxError(f"loss.alpha={cfg.loss.alpha} distills from a teacher, but model.teacher is not set")
        teacher_cfg, note = model_config(cfg.model.teacher)
        notes += [note] if note else []
        teacher_cfg = train.with_attention(cfg, teacher_cfg)
        teacher = abstract_sharded(teacher_cfg, dtype, mesh, rules)
    student_spec = cfg.model.student if kind == "sft" or cfg.model.student is not None else cfg.model.teacher
    if kind == "pretrain" and cfg.model.student in (None, cfg.model.teacher):
        student_cfg, student = teacher_cfg, teacher  # the same arrays (passed twice: counted twice below)
    else:
        student_cfg, note = model_config(student_spec)
        notes += [note] if note else []
        student_cfg = train.with_attention(cfg, student_cfg)
        student = abstract_sharded(student_cfg, dtype, mesh, rules)
    if cfg.model.keep_layers is not None:
        student_cfg, student = transformer.select_layers(student_cfg, student, cfg.model.keep_layers)
    if cfg.model.get("scan_layers"):  # the layout train.stack_models gives a run
        notes.append("model.scan_layers=true: the program holds one layer body in a loop, and hlo_stats counts its "
                     "collectives once, so the collective traffic and ICI time are per layer; compile with "
                     "model.scan_layers=false for the whole step's traffic")
        stacked = lambda c, p: with_shardings(s := jax.eval_shape(lambda q: transformer.stack_layers(c, q), p),
                                              sh.tree_shardings(c, s, mesh, rules))
        same = student is teacher
        teacher = None if teacher is None else stacked(teacher_cfg, teacher)
        student = teacher if same else stacked(student_cfg, student)
    if teacher is not None and with_teacher:  # teacher.quantize: int8 weights and their scales
        teacher = quant.quantize_params(teacher_cfg, teacher, (cfg.get("teacher") or {}).get("quantize"))
    if not with_teacher:
        teacher_cfg, teacher = None, None
    return teacher_cfg, teacher, student_cfg, student, notes


def cache_batch(cfg, student_cfg, B: int, T: int):
    """({entry: (shape, dtype)}, vocab, note) of the teacher-cache entries a `teacher.cache` run's batch carries:
    the cache's own k and dtypes where teacher.cache names one, else teacher.top_k (64) and teacher.cache_dtype."""
    teacher_vocab = model_config(cfg.model.teacher)[0].vocab_size
    vocab = min(student_cfg.vocab_size, teacher_vocab)
    path, top_k = cfg.teacher.cache, cfg.teacher.top_k
    if os.path.isfile(os.path.join(path, tc.META)):
        meta = tc.read_meta(path)
        k, dtype, vocab = int(top_k or meta["k"]), meta["dtype"], int(meta["vocab"])
        note = f"teacher.cache={path}: k={k} of its {meta['k']} tokens, {dtype} log-probabilities"
    else:
        k, dtype = int(top_k or tc.DEFAULT_TOP_K), cfg.teacher.cache_dtype
        note = (f"teacher.cache={path} is not a cache here: compiled for k={k} and {dtype} log-probabilities "
                "(teacher.top_k, teacher.cache_dtype)")
    ids = tc.ids_dtype(vocab)
    return ({"teacher_ids": ((B, T, k), ids), "teacher_logp": ((B, T, k), tc.DTYPES[dtype]),
             "teacher_tail": ((B, T), np.dtype(np.float32))}, vocab, note + "; no teacher in memory")


def training_program(cfg, kind: str, mesh, remat=None) -> tuple[Program, list]:
    """The jitted training step of `fa-jax pretrain` / `sft` for `cfg` over `mesh`, with abstract arguments."""
    rules = train.mesh_rules(cfg)
    train.validate_shapes(cfg, mesh)
    cached = kind == "pretrain" and (cfg.get("teacher") or {}).get("cache") is not None
    teacher_cfg, teacher, student_cfg, student, notes = _models(cfg, kind, mesh, rules,
                                                                with_teacher=False if cached else None)
    state, optimizer, schedule = train.state_shapes(cfg, student_cfg, mesh, rules)
    batch_sh = sh.batch_sharding(mesh, rules)
    B, T = int(cfg.data.batch_size), int(cfg.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=batch_sh) for k in train.BATCH_KEYS}
    cache_vocab = None
    if cached:
        batch_entries, cache_vocab, note = cache_batch(cfg, student_cfg, B, T)
        batch.update({k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
                      for k, (shape, dtype) in batch_entries.items()})
        notes.append(note)
    remat = train.remat_setting(cfg) if remat is None else remat
    loss_fn = train.make_loss_fn(student_cfg, teacher_cfg or student_cfg, cfg.loss, cfg.model.compute_dtype,
                                 float(cfg.adapter.dropout), remat, cache_vocab=cache_vocab)
    step = train.make_train_step(loss_fn, optimizer, schedule, int(cfg.optim.grad_accum), batch_sh)
    teacher_arg = {} if teacher is None else teacher
    fn = train.jit_train_step(step, state, student, teacher_arg, mesh, rules)
    arguments = {"teacher": per_device_bytes(teacher_arg), "student": per_device_bytes(student),
                 "adapters": per_device_bytes(state["adapters"]), "optimizer state": per_device_bytes(
                     state["opt_state"]), "batch": per_device_bytes(batch)}
    flops = kd_step_flops(transformer.count_params(student_cfg),
                          transformer.count_params(teacher_cfg) if teacher_cfg else 0, B * T,
                          with_teacher=teacher_cfg is not None)
    # remat "full" runs the student's forward once more (2 N per token); the partial policies recompute a part of
    # it that depends on the shapes, left out (the compute estimate is then a little optimistic)
    recompute = 2.0 * transformer.count_params(student_cfg) * B * T if remat == "full" else 0.0
    return Program(f"{kind} step", fn, (state, student, teacher_arg, batch), arguments, flops, B * T, rules,
                   remat, recompute), notes


def generation_programs(cfg, kind: str, mesh, batch: int, prompt_len: int, cache_len: int):
    """(prefill, decode) of `fa_jax.generate` for the run's student with its (unmerged) adapter: prefill runs
    `prompt_len` tokens per row into a cache of `cache_len` slots; decode runs one token at a traced slot."""
    if cache_len < prompt_len + 1:
        raise FaJaxError(f"--cache-len {cache_len} must exceed --prompt-len {prompt_len} (room for new tokens)")
    rules = train.mesh_rules(cfg)
    # the student (with its keep_layers) is what the run's exported adapter generates with; no teacher needed
    _, _, student_cfg, student, notes = _models(cfg, kind, mesh, rules, with_teacher=False)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % rows:
        raise FaJaxError(f"--batch {batch} must be divisible by the mesh's data x fsdp size {rows}")
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    a = dict(cfg.adapter)
    base = transformer.abstract_params(student_cfg, jnp.dtype(cfg.model.dtype)) if a["kind"] == "dora" else None
    ad_shapes = jax.eval_shape(lambda r, p: adapters_lib.init_adapter(student_cfg, r, params=p, a=a), rng, base)
    adapters = with_shardings(ad_shapes, sh.tree_shardings(student_cfg, ad_shapes, mesh, rules))
    dtype = jnp.dtype(cfg.model.compute_dtype or cfg.model.dtype)
    batch_axes = sh.batch_sharding(mesh, rules).spec[0]
    G = student_cfg.num_key_value_heads
    kv_axis = "tensor" if mesh.shape["tensor"] > 1 and G % mesh.shape["tensor"] == 0 else None
    kv = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes, None, kv_axis, None))
    rowwise = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes, None))
    cache_shapes = jax.eval_shape(lambda: transformer.init_cache(student_cfg, batch, cache_len, dtype))
    cache_sh = {"layers": jax.tree.map(lambda _: kv, cache_shapes["layers"]), "positions": rowwise,
                "valid": rowwise}
    cache = with_shardings(cache_shapes, cache_sh)
    p_sh, a_sh = jax.tree.map(lambda x: x.sharding, student), jax.tree.map(lambda x: x.sharding, adapters)

    def prefill(params, adapters, tokens, valid):
        c = transformer.init_cache(student_cfg, batch, cache_len, dtype)
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
        h, c = transformer.hidden_states_with_cache(student_cfg, params, tokens, c, 0, positions, valid, adapters,
                                                    dtype=dtype)
        return transformer.lm_logits(student_cfg, params, h[:, -1]), c

    def decode(params, adapters, cache, token, index):
        positions = jnp.full((batch, 1), index, jnp.int32)
        h, c = transformer.hidden_states_with_cache(student_cfg, params, token, cache, index, positions, None,
                                                    adapters, dtype=dtype)
        return transformer.lm_logits(student_cfg, params, h[:, 0]), c

    rep = sh.replicated(mesh)
    tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=rowwise)
    valid = jax.ShapeDtypeStruct((batch, prompt_len), jnp.bool_, sharding=rowwise)
    one = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=rowwise)
    index = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    pre = jax.jit(prefill, in_shardings=(p_sh, a_sh, rowwise, rowwise), out_shardings=(rowwise, cache_sh))
    dec = jax.jit(decode, in_shardings=(p_sh, a_sh, cache_sh, rowwise, rep), out_shardings=(rowwise, cache_sh),
                  donate_argnums=(2,))
    n = transformer.count_params(student_cfg)
    args = {"student": per_device_bytes(student), "adapters": per_device_bytes(adapters)}
    prompts = per_device_bytes(tokens) + per_device_bytes(valid)
    return ([Program("generate: prefill", pre, (student, adapters, tokens, valid), {**args, "prompts": prompts},
                     2.0 * n * batch * prompt_len, batch * prompt_len, rules),
             Program("generate: one decode step", dec, (student, adapters, cache, one, index),
                     {**args, "kv cache": per_device_bytes(cache)}, 2.0 * n * batch, batch, rules)], notes)


# ------------------------------------------------------------------------------------------------ compilation


def cost_of(compiled) -> dict:
    c = compiled.cost_analysis()
    if isinstance(c, (list, tuple)):
        c = c[0] if c else {}
    c = c or {}
    return {"flops": float(c.get("flops", 0.0)), "bytes_accessed": float(c.get("bytes accessed", 0.0))}


def compile_program(program: Program, mesh):
    """(compiled, seconds). The tracing runs under the mesh (attention kernels read it to pick their shards)."""
    t0 = time.perf_counter()
    with sh.mesh_context(mesh, program.rules):
        compiled = program.fn.lower(*program.args).compile()
    return compiled, time.perf_counter() - t0


def roofline(chip: Chip, flops: float, bytes_accessed: float, ici_bytes: float, dcn_bytes: float) -> dict:
    """Estimated seconds per call of one chip's program: the slowest of compute (XLA's FLOPs at peak), HBM
    traffic (XLA's bytes accessed at full bandwidth) and communication (each chip's collective traffic over its
    ICI links, and over the data-center network between slices), as if they overlapped perfectly. A lower bound:
    real programs reach 40-70% of it on large matmuls and less where they wait on communication."""
    parts = {"compute_s": flops / chip.peak_flops, "hbm_s": bytes_accessed / chip.hbm_bandwidth,
             "ici_s": ici_bytes / chip.ici_bandwidth,
             "dcn_s": (dcn_bytes / chip.dcn_bandwidth) if chip.dcn_bandwidth and dcn_bytes else 0.0}
    bound = max(parts, key=parts.get)
    return {**parts, "step_s": parts[bound], "bound_by": bound[:-2]}


def _dcn_share(program: Program, topology: Topology, collectives: dict) -> tuple[float, float]:
    """(ici, dcn) traffic bytes per chip. With several slices only the data axis crosses them, and only the
    adapters' gradient is reduced over it: its all-reduce (2 (S-1)/S of the float32 gradient shard) goes over DCN."""
    total = sum(c["traffic_bytes"] for c in collectives.values())
    if topology.slices == 1 or "adapters" not in program.arguments:
        return total, 0.0
    s = topology.slices
    dcn = 2.0 * (s - 1) / s * program.arguments["adapters"]
    return max(total - dcn, 0.0), dcn


def analyse(program: Program, compiled, seconds: float, topology: Topology, budget: float, hlo_dir=None) -> dict:
    """The report of one compiled program (see `compile_report`)."""
    chip = topology.chip
    mem = memory_of(compiled)
    cost = cost_of(compiled)
    text = compiled.as_text()
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        name = re.sub(r"[^a-z0-9]+", "_", f"{program.name} {program.remat or ''}".lower()).strip("_")
        write_text(os.path.join(hlo_dir, f"{name}.hlo.txt"), text)
    colls = hlo_stats.collectives(text)
    ici, dcn = _dcn_share(program, topology, colls)
    model_per_chip = program.model_flops / topology.chips
    # XLA counts a loop body once (the loss's chunk loop, micro-batches) and nothing inside Pallas kernels (splash
    # attention): the compute time takes the larger of its count and the model's own plus rematerialization
    executed = (program.model_flops + program.recompute_flops) / topology.chips
    est = roofline(chip, max(cost["flops"], executed), cost["bytes_accessed"], ici, dcn)
    est["mfu"] = model_per_chip / (est["step_s"] * chip.peak_flops) if est["step_s"] else None
    est["tokens_per_s"] = program.tokens / est["step_s"] if est["step_s"] else None
    total = mem.get("total_bytes", 0)
    fits = total <= budget
    return {"program": program.name, "remat": program.remat, "compile_s": round(seconds, 1), "hlo_bytes": len(text),
            "per_chip": {**mem, "arguments": program.arguments, "budget_bytes": int(budget), "fits": fits,
                         "largest_arrays": hlo_stats.largest_arrays(text, 5)},
            "flops": {"model_per_chip": model_per_chip, "with_remat_per_chip": executed, "xla_per_chip": cost["flops"],
                      "bytes_accessed_per_chip": cost["bytes_accessed"]},
            "collectives": colls, "estimate": est}


def compile_report(config, topology: str = "v5e-8", *, overrides=(), slices: int = 1, program: str = "train",
                   kind: str | None = None, batch: int = 8, prompt_len: int = 1024, cache_len: int = 2048,
                   progress=None, hlo_dir: str | None = None) -> dict:
    """Compile a pretrain or sft config for a TPU topology and report per chip what it needs.

    config: a config file path, or a dict / Config resolved as for `fa-jax pretrain` / `sft` (the kind is "sft"
    when it has an `init` key). topology: "v5e-8", "v6e-256", "v4-8", "v5p-8", ... (`parse_topology`).
    program: "train" (the training step) or "generate" (prefill of `prompt_len` tokens and one decode step at
    `batch` rows, cache of `cache_len` slots). hlo_dir: also write each program's optimized HLO there (to read
    what the collectives and the largest arrays are). `model.remat="auto"` compiles the remat policies from fastest to
    leanest (`train.AUTO_REMAT_ORDER`) and keeps the first that fits.

    Returns {"topology", "chips", "mesh", "kind", "chip", "notes", "programs": [one report per program]}, each
    program report with "per_chip" (argument_bytes, output_bytes, alias_bytes, temp_bytes, total_bytes,
    budget_bytes, fits, arguments by part, largest_arrays), "flops", "collectives" {kind: count, bytes,
    traffic_bytes}, "estimate" (roofline: step_s, bound_by, mfu, tokens_per_s) and "compile_s".
    Nothing is raised when a program does not fit: see `check_fits`.
    """
    topo = parse_topology(topology, slices)
    if isinstance(config, (str, os.PathLike)) or config is None:
        kind, cfg = resolve_run_config(config, overrides, kind)
    else:
        kind = kind or run_kind(config)
        cfg = run_config.apply_overrides(run_config.merge(run_config.defaults(kind), dict(config), "config"),
                                         overrides)
    if program not in ("train", "generate"):
        raise FaJaxError(f"program={program!r}: expected train or generate")
    devices = tpu_devices(topo)
    mesh = topology_mesh(cfg.mesh.shape, topo, devices)
    budget = memory_budget(cfg, topo)
    say = progress or (lambda msg: None)
    reports, notes = [], []
    if program == "train":
        candidates, tried = train.remat_candidates(cfg), []
        for remat in candidates:
            prog, notes = training_program(cfg, kind, mesh, remat)
            say(f"compiling the {kind} step (remat {remat or 'none'}) for {topo.name}")
            compiled, seconds = compile_program(prog, mesh)
            rep = analyse(prog, compiled, seconds, topo, budget, hlo_dir)
            rep["remat"] = remat or "none"
            tried.append({"remat": rep["remat"], "total_bytes": rep["per_chip"]["total_bytes"],
                          "compile_s": rep["compile_s"]})
            if rep["per_chip"]["fits"]:
                break
        if len(candidates) > 1:
            rep["remat_tried"] = tried
        reports = [rep]
    else:
        progs, notes = generation_programs(cfg, kind, mesh, int(batch), int(prompt_len), int(cache_len))
        for prog in progs:
            say(f"compiling {prog.name} for {topo.name}")
            compiled, seconds = compile_program(prog, mesh)
            reports.append(analyse(prog, compiled, seconds, topo, budget, hlo_dir))
    chip = topo.chip
    return {"topology": topo.name, "jax_topology": f"{topo.generation}:{topo.shape}", "slices": topo.slices,
            "chips": topo.chips, "mesh": dict(mesh.shape), "kind": kind, "program": program,
            "chip": {"name": chip.name, "hbm_bytes": chip.hbm_bytes, "peak_flops": chip.peak_flops,
                     "hbm_bandwidth": chip.hbm_bandwidth, "ici_bandwidth": chip.ici_bandwidth,
                     "dcn_bandwidth": chip.dcn_bandwidth, "source": chip.source},
            "notes": notes, "programs": reports}


def check_fits(report: dict) -> None:
    """A FaJaxError naming the biggest consumers when a program of the report does not fit its budget."""
    for r in report["programs"]:
        pc = r["per_chip"]
        if pc["fits"]:
            continue
        parts = dict(pc["arguments"])
        parts["temporaries"] = pc["temp_bytes"]
        parts["outputs (not aliased)"] = max(pc["output_bytes"] - pc["alias_bytes"], 0)
        top = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
        big = pc["largest_arrays"][0] if pc["largest_arrays"] else None
        raise FaJaxError(
            f"{r['program']} does not fit {report['topology']}: {gib(pc['total_bytes'])} per chip against "
            f"{gib(pc['budget_bytes'])} usable, over by {gib(pc['total_bytes'] - pc['budget_bytes'])}; biggest: "
            + ", ".join(f"{k} {gib(v)}" for k, v in top)
            + (f"; largest array {big['shape']} ({gib(big['bytes'])})" if big else "")
            + " (try model.remat=auto, a smaller data.batch_size with optim.grad_accum, or more fsdp)")


def _si(n: float, unit: str) -> str:
    for scale, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {p}{unit}"
    return f"{n:.3g} {unit}"


def format_report(report: dict) -> str:
    """The human-readable form `fa-jax compile` prints."""
    chip = report["chip"]
    lines = [f"{report['kind']} config on {report['topology']} ({report['chips']} x {chip['name']}, "
             f"{gib(chip['hbm_bytes'])} HBM each), mesh " + " x ".join(f"{k} {v}" for k, v in report["mesh"].items())]
    lines += [f"note: {n}" for n in report["notes"]]
    for r in report["programs"]:
        pc, fl, est = r["per_chip"], r["flops"], r["estimate"]
        lines.append("")
        lines.append(f"== {r['program']}" + (f" (remat {r['remat']})" if r.get("remat") else "")
                     + f": compiled in {r['compile_s']:.1f} s")
        if r.get("remat_tried"):
            lines.append("   remat=auto tried: " + ", ".join(f"{t['remat']} {gib(t['total_bytes'])}"
                                                          for t in r["remat_tried"]))
        lines.append("   HBM per chip:")
        for k, v in pc["arguments"].items():
            lines.append(f"     argument  {k:<18} {gib(v):>12}")
        lines.append(f"     arguments (XLA)              {gib(pc['argument_bytes']):>12}")
        lines.append(f"     temporaries                  {gib(pc['temp_bytes']):>12}")
        lines.append(f"     outputs                      {gib(pc['output_bytes']):>12}   "
                     f"(of which {gib(pc['alias_bytes'])} reuse donated inputs)")
        lines.append(f"     generated code               {gib(pc['generated_code_bytes']):>12}")
        margin = pc["budget_bytes"] - pc["total_bytes"]
        verdict = (f"fits ({gib(margin)} to spare)" if pc["fits"] else f"does not fit by {gib(-margin)}")
        lines.append(f"     total                        {gib(pc['total_bytes']):>12}   of {gib(pc['budget_bytes'])} "
                     f"usable: {verdict}")
        if pc["largest_arrays"]:
            lines.append("   largest arrays: " + ", ".join(f"{a['shape']} {a['op']} ({gib(a['bytes'])})"
                                                           for a in pc["largest_arrays"][:3]))
        lines.append(f"   FLOPs per chip: model {_si(fl['model_per_chip'], 'FLOP')}, XLA "
                     f"{_si(fl['xla_per_chip'], 'FLOP')} (XLA counts loop bodies once and no kernel FLOPs); "
                     f"HBM traffic {_si(fl['bytes_accessed_per_chip'], 'B')}")
        lines.append("   collectives per chip (static count in the optimized HLO; ops in loops count once):")
        for k, c in r["collectives"].items():
            lines.append(f"     {k:<20} {c['count']:>6} ops {_si(c['bytes'], 'B'):>10}   "
                         f"traffic {_si(c['traffic_bytes'], 'B')}")
        mfu = f"{100 * est['mfu']:.0f}%" if est.get("mfu") is not None else "n/a"
        if fl["with_remat_per_chip"] > fl["model_per_chip"]:
            lines.append(f"   with rematerialization: {_si(fl['with_remat_per_chip'], 'FLOP')} per chip")
        lines.append(f"   estimate (roofline, not a measurement): {1e3 * est['step_s']:.1f} ms per call, bound by "
                     f"{est['bound_by']} (compute {1e3 * est['compute_s']:.1f} ms, HBM {1e3 * est['hbm_s']:.1f} ms, "
                     f"ICI {1e3 * est['ici_s']:.1f} ms, DCN {1e3 * est['dcn_s']:.1f} ms); MFU at most {mfu}; "
                     f"{_si(est['tokens_per_s'] or 0, 'tokens/s')}")
    lines.append("")
    lines.append(f"chip facts: {chip['source']}")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    write_text(path, json.dumps(report, indent=2, default=_json_default) + "\n")


def _json_default(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return str(x)
