"""Foundation-adapter pre-training: a frozen student with trainable adapters learns from a frozen teacher and from
the text, L = alpha * KD + (1 - alpha) * LM, in one jitted, mesh-sharded step.

    fa-jax pretrain --config configs/pretrain_smollm2.py run.steps=200

The step differentiates with respect to the adapters only; the student's and the teacher's weights are arguments
that are never differentiated, so they have neither gradients nor optimizer state. LM heads and the loss run in
sequence chunks (`losses.chunked_distill_loss`), so no [batch, seq, vocab] float32 logits exist for either model.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.experimental import multihost_utils

from fa_jax import adapters as adapters_lib
from fa_jax import data as data_lib
from fa_jax import losses, lora, optim, quant, rundir, run_config, runs, validation
from fa_jax import teacher_cache as tc
from fa_jax import sharding as sh
from fa_jax.checkpoint import Checkpointer, abstract_like
from fa_jax.embedded import resolve_model_path
from fa_jax.errors import FaJaxError
from fa_jax.io.atomic import write_text
from fa_jax.io.load import load_model, load_tokenizer
from fa_jax.memory import gib, memory_budget, memory_of
from fa_jax.metrics import MetricsLogger, kd_step_flops, peak_flops_per_device
from fa_jax.models import attention_kernels, transformer
from fa_jax.run_config import pretrain_defaults  # noqa: F401  (public here too: it was defined here)


# ----------------------------------------------------------------------------------------------- the step


def make_loss_fn(student_cfg, teacher_cfg, loss_cfg, compute_dtype=None, dropout=0.0, remat=False,
                 cache_vocab=None):
    """loss_fn(adapters, student, teacher, batch, normalizer, rng) -> (loss, metrics).

    cache_vocab: the teacher comes from a top-k cache (`fa_jax.teacher_cache`) over this many tokens, as the batch's
    `teacher_ids` / `teacher_logp` / `teacher_tail`; `teacher` is then unused."""
    with_teacher = float(loss_cfg["alpha"]) > 0

    def loss_fn(adapters, student, teacher, batch, normalizer, rng):
        kw = dict(segment_ids=batch["segment_ids"], positions=batch["positions"], dtype=compute_dtype)
        h_s = transformer.hidden_states(student_cfg, student, batch["tokens"], adapters, dropout_rate=dropout,
                                        rng=rng, remat=remat, **kw)
        if cache_vocab is not None:
            head_s, s_vd = transformer.lm_head(student_cfg, student)
            cached = losses.TopK(batch["teacher_ids"], batch["teacher_logp"], batch["teacher_tail"])
            return losses.cached_distill_loss(
                h_s, head_s, cached, batch["labels"], batch["mask"], vocab=cache_vocab,
                alpha=float(loss_cfg["alpha"]), temperature=float(loss_cfg["temperature"]),
                divergence=loss_cfg["divergence"], beta=float(loss_cfg["beta"]),
                chunk_size=int(loss_cfg["chunk_size"]), normalizer=normalizer, student_head_vd=s_vd)
        h_t, (head_t, t_vd) = None, (None, False)
        if with_teacher:
            h_t = jax.lax.stop_gradient(transformer.hidden_states(teacher_cfg, teacher, batch["tokens"], **kw))
            head_t, t_vd = transformer.lm_head(teacher_cfg, teacher)
        head_s, s_vd = transformer.lm_head(student_cfg, student)
        return losses.chunked_distill_loss(
            h_s, head_s, h_t, head_t, batch["labels"], batch["mask"],
            alpha=float(loss_cfg["alpha"]), temperature=float(loss_cfg["temperature"]),
            divergence=loss_cfg["divergence"], beta=float(loss_cfg["beta"]), chunk_size=int(loss_cfg["chunk_size"]),
            normalizer=normalizer, student_head_vd=s_vd, teacher_head_vd=t_vd)

    return loss_fn


def make_train_step(loss_fn, optimizer, schedule, grad_accum: int = 1, batch_sharding=None):
    """train_step(state, student, teacher, batch) -> (state, metrics). state = {step, adapters, opt_state, rng}.

    With grad_accum > 1 the global batch is split into micro-batches (row i goes to micro-batch i % grad_accum, so
    each device keeps its own rows); gradients and metrics are summed with the global token count as normalizer,
    so the update equals the one of the whole batch at once.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, student, teacher, batch):  # the name JAX reports its traces under (tests count them)
        normalizer = jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0)
        rng = jax.random.fold_in(state["rng"], state["step"])
        adapters = state["adapters"]
        if grad_accum == 1:
            (_, metrics), grads = grad_fn(adapters, student, teacher, batch, normalizer, rng)
        else:
            def split(x):
                x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
                return x
            micro = jax.tree.map(split, batch)

            def body(carry, xs):
                i, mb = xs
                if batch_sharding is not None:
                    mb = jax.lax.with_sharding_constraint(mb, batch_sharding)
                (_, m), g = grad_fn(adapters, student, teacher, mb, normalizer, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (g, m)), None

            zero_g = jax.tree.map(jnp.zeros_like, adapters)
            zero_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
                lambda: grad_fn(adapters, student, teacher, jax.tree.map(lambda x: x[0], micro), normalizer, rng)[0][1]))
            (grads, metrics), _ = jax.lax.scan(body, (zero_g, zero_m), (jnp.arange(grad_accum), micro))
        updates, opt_state = optimizer.update(grads, state["opt_state"], adapters)
        new_adapters = optax.apply_updates(adapters, updates)
        mask = lora.trainable_mask(adapters)
        metrics = dict(metrics)
        metrics["grad_norm"] = optim.global_norm(jax.tree.map(lambda g, m: g if m else jnp.zeros(()), grads, mask))
        metrics["lr"] = schedule(state["step"])
        skipped = optim.nonfinite_count(opt_state)
        if skipped is not None:
            metrics["skipped_updates"] = skipped.astype(jnp.float32)
        return {"step": state["step"] + 1, "adapters": new_adapters, "opt_state": opt_state, "rng": state["rng"]}, metrics

    return train_step


def remat_setting(cfg):
    """cfg.model.remat as `transformer.hidden_states` takes it: False, or a policy name (checked here)."""
    r = cfg.model.remat
    if r in (False, None, 0, "none"):
        return False
    if r == "auto":
        raise FaJaxError("model.remat='auto' is resolved by compiling (remat_candidates), not here")
    transformer.remat_policy(r)  # a clear error for an unknown name
    return "full" if r is True else r


# model.remat=auto tries these from first to last and keeps the first whose compiled step fits. The order is by the
# work the backward pass redoes: none recomputes nothing; all_dots only elementwise work; mlp_qkv norms, rope and
# attention; mlp also the attention block's input projections; dots the activations and attention again; full the
# whole layer (one more forward pass).
AUTO_REMAT_ORDER = ("none", "all_dots", "mlp_qkv", "mlp", "dots", "full")


def remat_candidates(cfg) -> list:
    """The remat settings a run compiles: its own, or for "auto" every policy of AUTO_REMAT_ORDER."""
    if cfg.model.remat == "auto":
        return [False if r == "none" else r for r in AUTO_REMAT_ORDER]
    return [remat_setting(cfg)]


def choose_step(cfg, build, args, budget: float):
    """(jitted or compiled step, remat) for the run: `build(remat)` makes the jitted step; with model.remat=auto
    each candidate is compiled for `args` (arrays or abstract values) and the first whose memory analysis fits
    `budget` bytes per device is returned compiled. None fitting is a FaJaxError naming the leanest's size."""
    candidates = remat_candidates(cfg)
    if len(candidates) == 1:
        return build(candidates[0]), candidates[0]
    tried = []
    for remat in candidates:
        compiled = build(remat).lower(*args).compile()
        total = memory_of(compiled).get("total_bytes", 0)
        tried.append(f"{remat or 'none'} {gib(total)}")
        if total <= budget:
            print(f"model.remat=auto: {remat or 'none'} ({gib(total)} per device; budget {gib(budget)})")
            return compiled, remat
    raise FaJaxError(f"model.remat=auto: no remat policy fits {gib(budget)} per device (compiled: "
                     f"{', '.join(tried)}); lower data.batch_size (with optim.grad_accum), add fsdp, or raise "
                     "run.memory_budget")


# XLA:CPU's default scheduler runs independent operations concurrently; on the training step it also moves the
# rematerialized forward computations of all layers ahead of the backward pass, which undoes rematerialization
# (the step's scratch memory stayed at 1.3 GB with every student layer recomputed). The memory-minimizing
# scheduler keeps the order; on this step it is not slower.
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def jit_train_step(step, state, student, teacher, mesh, rules):
    """The jitted step with explicit shardings (state donated), compiled once per run. Its calls and `.lower` trace
    under `sharding.mesh_context(mesh)`, where the attention kernels find their devices (sharding.InMesh)."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    options = CPU_COMPILER_OPTIONS if mesh.devices.flat[0].platform == "cpu" else None
    return sh.InMesh(jax.jit(step, in_shardings=(state_sh, jax.tree.map(lambda x: x.sharding, student),
                                                 jax.tree.map(lambda x: x.sharding, teacher),
                                                 sh.batch_sharding(mesh, rules)),
                             out_shardings=(state_sh, sh.replicated(mesh)), donate_argnums=(0,),
                             compiler_options=options), mesh, rules)


# ------------------------------------------------------------------------------------------------ set-up


def load_models(cfg, mesh, rules):
    """(teacher_cfg, teacher, student_cfg, student, tokenizer), each model sharded by the rule table as it loads.
    With `teacher.cache` no teacher is loaded (teacher_cfg and teacher are None; the tokenizer is still the
    teacher's, and the student defaults to the teacher's weights as ever); with `teacher.quantize` the teacher's
    weights are quantized (`fa_jax.quant`), never the student's."""
    rule_set = sh.Rules(mesh, rules)
    teacher_path = resolve_model_path(cfg.model.teacher)
    cached = _teacher_setting(cfg, "cache") is not None
    teacher_cfg, teacher = (None, None) if cached else load_model(teacher_path, dtype=cfg.model.dtype,
                                                                  sharding=rule_set)
    tokenizer = load_tokenizer(teacher_path)
    if cfg.model.student in (None, cfg.model.teacher):
        student_cfg, student = (teacher_cfg, teacher) if not cached else load_model(
            teacher_path, dtype=cfg.model.dtype, sharding=rule_set)  # (the same arrays as the teacher's, not a copy)
    else:
        student_path = resolve_model_path(cfg.model.student)
        student_cfg, student = load_model(student_path, dtype=cfg.model.dtype, sharding=rule_set)
        check_same_tokenizer(tokenizer, load_tokenizer(student_path), teacher_path, student_path)
    if cfg.model.keep_layers is not None:
        student_cfg, student = transformer.select_layers(student_cfg, student, cfg.model.keep_layers)
    teacher_cfg, student_cfg = with_attention(cfg, teacher_cfg), with_attention(cfg, student_cfg)
    teacher, student = stack_models(cfg, mesh, rules, teacher_cfg, teacher, student_cfg, student)
    teacher = quantized_teacher(cfg, teacher_cfg, teacher, keep=student)
    return teacher_cfg, teacher, student_cfg, student, tokenizer


def load_teacher(cfg, mesh, rules):
    """(teacher_cfg, teacher, tokenizer): the teacher alone, as `load_models` prepares it (sharded, its layers
    stacked under model.scan_layers, quantized under teacher.quantize)."""
    teacher_path = resolve_model_path(cfg.model.teacher)
    teacher_cfg, teacher = load_model(teacher_path, dtype=cfg.model.dtype, sharding=sh.Rules(mesh, rules))
    teacher_cfg = with_attention(cfg, teacher_cfg)
    teacher, _ = stack_models(cfg, mesh, rules, teacher_cfg, teacher, None, None)
    return teacher_cfg, quantized_teacher(cfg, teacher_cfg, teacher, keep=None), load_tokenizer(teacher_path)


def _teacher_setting(cfg, key):
    return (cfg.get("teacher") or {}).get(key)


def quantized_teacher(cfg, teacher_cfg, teacher, keep=None):
    """The teacher's weights as `teacher.quantize` says (None: unchanged). Each full-precision array is freed once
    quantized, except those the tree `keep` holds too (the student's, when it is made of the teacher's layers)."""
    mode = _teacher_setting(cfg, "quantize")
    if mode is None or teacher is None:
        return teacher
    return quant.quantize_params(teacher_cfg, teacher, mode=mode, donate=True, keep=keep)


def with_attention(cfg, model_cfg):
    """`model_cfg` computing attention as the run's `model.attention` says (models/attention_kernels.py), its layers
    scanned if `model.scan_layers`; None stays None."""
    if model_cfg is None:
        return None
    return model_cfg.replace(attention_impl=attention_kernels.check_impl(cfg.model.get("attention", "auto")),
                             scan_layers=bool(cfg.model.get("scan_layers", False)))


def stack_models(cfg, mesh, rules, teacher_cfg, teacher, student_cfg, student):
    """(teacher, student) with their layers stacked for `model.scan_layers` (each config from `with_attention`),
    laid out by the rule table; unchanged without it. The per-layer arrays are donated, except those the other
    model shares (a student made from the teacher's layers): loading peaks at twice the models' weights, once."""
    if not cfg.model.get("scan_layers"):
        return teacher, student

    def stack(config, params, donate):
        shapes = jax.eval_shape(lambda p: transformer.stack_layers(config, p), params)
        fn = jax.jit(lambda p: transformer.stack_layers(config, p), donate_argnums=(0,) if donate else (),
                     out_shardings=sh.tree_shardings(config, shapes, mesh, rules))
        return fn(params)

    if student is teacher:
        stacked = stack(teacher_cfg, teacher, True)
        return stacked, stacked
    first = None if student is None else jax.tree.leaves(student)[0]
    shared = teacher is not None and any(first is a for a in jax.tree.leaves(teacher))
    teacher = None if teacher is None else stack(teacher_cfg, teacher, not shared)
    return teacher, None if student is None else stack(student_cfg, student, True)


def check_same_tokenizer(t_tok, s_tok, t_path, s_path):
    """Distillation compares distributions token by token: both models must share the tokenizer. Vocabulary
    sizes of the weights may still differ by padding rows (the loss uses the shared part)."""
    tv, sv = t_tok.get_vocab(), s_tok.get_vocab()
    if tv != sv:
        diff = sorted(set(tv.items()) ^ set(sv.items()))[:1]
        raise FaJaxError(f"teacher {t_path} and student {s_path} use different tokenizers ({len(tv)} vs {len(sv)} "
                         f"tokens; first difference {diff[0] if diff else '?'}): distillation needs one tokenizer")


def init_state(cfg, student_cfg, mesh, rules, adapters=None, student=None):
    """The train state {step, adapters, opt_state, rng}, created directly in its sharding.

    `adapters`: a tree of kind cfg.adapter.kind to start from (a foundation or PEFT adapter); None draws a fresh
    one from cfg.adapter. `student`: the student's parameters (DoRA's magnitude starts at their column norms;
    None: abstract shapes, enough for everything but a fresh DoRA).
    """
    a = cfg.adapter
    kind = adapters_lib.check_kind(a.kind)
    rng = jax.random.PRNGKey(int(cfg.run.seed))
    params = None  # only DoRA's init reads the base weights (abstract shapes will do under eval_shape)
    if kind == "dora":
        params = transformer.abstract_params(student_cfg, jnp.dtype(cfg.model.dtype)) if student is None else student
    per_layer = functools.partial(transformer.unstack_layers, student_cfg)  # (stacked under model.scan_layers)
    init = lambda r, params: adapters_lib.init_adapter(student_cfg, r, dict(a), params=per_layer(params))
    shapes = jax.eval_shape(lambda r, p: init(r, params=p), rng, params)
    adapter_sh = sh.tree_shardings(student_cfg, shapes, mesh, rules)
    if adapters is None:
        if kind == "dora" and student is None and not isinstance(rng, jax.core.Tracer):  # (eval_shape: fine)
            raise FaJaxError("adapter.kind='dora' needs the student's parameters to initialise")
        adapters = jax.jit(lambda r, p: init(r, params=p), out_shardings=adapter_sh)(rng, params)
    else:
        if kind == "dora" and not any("magnitude" in m for _, m in lora.iter_modules(adapters)):
            # a LoRA start: DoRA with the same output
            adapters = jax.jit(lambda ad, p: lora.init_magnitude(ad, per_layer(p)))(adapters, student)
        if jax.tree.structure(adapters) != jax.tree.structure(shapes):
            raise FaJaxError(f"the starting adapter does not have the layout of adapter.kind={kind!r} with this "
                             "config's settings (different modules or leaves)")
        bad = [(p, list(x.shape), list(s.shape)) for (p, x), s in zip(
            jax.tree_util.tree_flatten_with_path(adapters)[0], jax.tree.leaves(shapes)) if x.shape != s.shape]
        if bad:
            path, got, want = bad[0]
            raise FaJaxError(f"the starting adapter has {jax.tree_util.keystr(path)} of shape {got}; adapter.* "
                             f"settings give {want}")
        adapters = jax.device_put(jax.tree.map(lambda x, s: np.asarray(x, s.dtype), adapters, shapes), adapter_sh)
    optimizer, schedule = make_optimizer(cfg, adapters)
    rep = sh.replicated(mesh)
    # Moments follow the adapters' shardings; scalars (counts) are replicated over the mesh.
    opt_sh = sh.tree_shardings(student_cfg, jax.eval_shape(optimizer.init, adapters), mesh, rules)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(adapters)
    step0, key = jax.jit(lambda: (jnp.zeros((), jnp.int32), jax.random.fold_in(rng, 1)), out_shardings=(rep, rep))()
    state = {"step": step0, "adapters": adapters, "opt_state": opt_state, "rng": key}
    return state, optimizer, schedule


def make_optimizer(cfg, adapters):
    """(optimizer, schedule) of cfg.optim for an adapter tree (arrays or shapes)."""
    o = cfg.optim
    return optim.make_optimizer(
        lora.trainable_mask(adapters), lr=float(o.lr), steps=int(cfg.run.steps), warmup_steps=int(o.warmup_steps),
        schedule_name=o.schedule, end_lr_fraction=float(o.end_lr_fraction), weight_decay=float(o.weight_decay),
        b1=float(o.b1), b2=float(o.b2), clip_norm=o.clip_norm, skip_nonfinite=bool(o.skip_nonfinite))


def state_shapes(cfg, student_cfg, mesh, rules):
    """(state, optimizer, schedule) with the state as ShapeDtypeStructs in the shardings `init_state` gives it:
    what ahead-of-time compilation (`fa_jax.aot`) lowers the step with, nothing allocated."""
    kind = adapters_lib.check_kind(cfg.adapter.kind)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    params = transformer.abstract_params(student_cfg, jnp.dtype(cfg.model.dtype)) if kind == "dora" else None
    init = functools.partial(adapters_lib.init_adapter, student_cfg, a=dict(cfg.adapter))
    adapters = jax.eval_shape(lambda r, p: init(r, params=p), rng, params)
    optimizer, schedule = make_optimizer(cfg, adapters)
    opt_state = jax.eval_shape(optimizer.init, adapters)
    rep = sh.replicated(mesh)
    attach = lambda tree: jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), tree,
                                       sh.tree_shardings(student_cfg, tree, mesh, rules))
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), "adapters": attach(adapters),
             "opt_state": attach(opt_state), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)}
    return state, optimizer, schedule


def validate_shapes(cfg, mesh=None):
    """The checks that need no data: batch against mesh and micro-batches, loss weight, steps."""
    if mesh is not None:
        rows = mesh.shape["data"] * mesh.shape["fsdp"]
        if int(cfg.data.batch_size) % rows:
            raise FaJaxError(f"data.batch_size={cfg.data.batch_size} must be divisible by the mesh's data x fsdp "
                             f"size {rows} (mesh.shape={list(cfg.mesh.shape)})")
    if int(cfg.data.batch_size) % int(cfg.optim.grad_accum):
        raise FaJaxError(f"data.batch_size={cfg.data.batch_size} must be divisible by optim.grad_accum="
                         f"{cfg.optim.grad_accum}")
    if not 0.0 <= float(cfg.loss.alpha) <= 1.0:
        raise FaJaxError(f"loss.alpha={cfg.loss.alpha}: expected a value in [0, 1]")


def validate(cfg, mesh=None):
    validate_shapes(cfg, mesh)
    if cfg.data.train is None:
        raise FaJaxError("data.train is not set: give a text/JSONL/parquet file, a save_to_disk directory, or a list")
    n_proc = jax.process_count()
    B, accum = int(cfg.data.batch_size), int(cfg.optim.grad_accum)
    if B % (n_proc * accum):
        raise FaJaxError(f"data.batch_size={B} must be divisible by processes x optim.grad_accum = {n_proc * accum}")
    if int(cfg.run.steps) < 1:
        raise FaJaxError(f"run.steps={cfg.run.steps}: expected at least 1")


# --------------------------------------------------------------------------------------------- the data


class RowStreams:
    """Packed batches whose global content does not depend on the number of processes.

    Row r of every global batch comes from its own packed stream over the documents perm[r::B] (B global rows);
    process p builds only its rows [p * B / P, (p + 1) * B / P) and so reads only their documents. One process with
    8 devices and two processes with 4 devices each therefore train on identical batches.
    """

    def __init__(self, documents, tokenizer, *, seq_len: int, global_rows: int, seed: int, name: str = "data.train",
                 **kw):
        P, p = jax.process_count(), jax.process_index()
        local = global_rows // P
        try:
            n = len(documents)
        except TypeError:  # a streaming source: its size is not known up front
            n = None
        if n is not None and n < global_rows:
            raise FaJaxError(f"{name}: {n} document(s) for {global_rows} batch rows (data.batch_size); each row "
                             "reads its own documents, so give at least data.batch_size documents")
        self.streams = [data_lib.PackedBatches(documents, tokenizer, seq_len=seq_len, batch_size=1, seed=seed,
                                      process_index=r, process_count=global_rows, **kw)
                        for r in range(p * local, (p + 1) * local)]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = [next(s) for s in self.streams]
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

    def state(self) -> dict:
        return {"rows": [s.state() for s in self.streams]}

    def restore(self, state: dict) -> None:
        if len(state.get("rows", ())) != len(self.streams):
            raise FaJaxError(f"data position of {len(state.get('rows', ()))} rows cannot resume {len(self.streams)} "
                             "rows: resume with the same data.batch_size and number of processes")
        for s, st in zip(self.streams, state["rows"]):
            s.restore(st)


# --------------------------------------------------------------------------------------------- the loop


BATCH_KEYS = ("tokens", "labels", "mask", "segment_ids", "positions")  # int32 [B, T] (plus tc.KEYS when cached)
EXIT_INTERRUPTED = 75  # the command's exit status after SIGTERM / SIGINT with a checkpoint saved (EX_TEMPFAIL)


class _Stop:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to checkpoint and exit at the next step boundary; a
    second SIGINT interrupts at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = None  # the name of the signal received
        self._old = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handler(self, signum, frame):
        if self.requested == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print("\nSIGINT: saving a checkpoint at the end of this step (Ctrl-C again to abort without one)",
                  flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def pretrain(cfg, batches=None) -> dict:
    """Run (or resume) pre-training as `cfg` says; returns a summary dict (also written to out_dir/summary.json).

    `batches`: an iterator of local batches to use instead of building one from cfg.data (tests).
    summary["status"]: "finished", "stopped" (run.stop_after) or "interrupted" (SIGTERM / SIGINT, checkpoint
    saved); a run directory that already finished is left as it is and its summary returned.
    """
    cfg = run_config.wrap(cfg)
    validation.check_run_config(cfg, "pretrain", batches_given=batches is not None)
    mesh = sh.make_mesh(cfg.mesh.shape)
    if batches is None:
        validate(cfg, mesh)
    cache = None if _teacher_setting(cfg, "cache") is None else tc.Cache(cfg.teacher.cache)  # (missing: an error now)
    with open_run(cfg, "pretrain", batches is not None) as run:
        if run.finished is not None:
            return run.finished
        rules = mesh_rules(cfg)
        teacher_cfg, teacher, student_cfg, student, tokenizer = load_models(cfg, mesh, rules)
        if batches is None:
            batches = pretrain_batches(cfg, tokenizer)
        if cache is not None:
            batches = cached_batches(cfg, cache, student_cfg, batches)
        return train_loop(cfg, mesh, rules, run.path, (teacher_cfg, teacher, student_cfg, student), batches,
                          desc="pretrain")


def cached_batches(cfg, cache, student_cfg, batches) -> "tc.CachedBatches":
    """`batches` with the teacher's cached entries added, after checking that `cache` was written for this run
    (teacher, tokenizer, data, packing, temperature, vocabulary) and holds this process's rows for run.steps."""
    B, P, p = int(cfg.data.batch_size), jax.process_count(), jax.process_index()
    rows = (p * B // P, (p + 1) * B // P)
    cache.check(cfg, tc.run_vocab(cfg, student_cfg), rows, int(cfg.run.steps))
    top_k = _teacher_setting(cfg, "top_k")
    return tc.CachedBatches(batches, cache, rows, None if top_k is None else int(top_k))


def pretrain_batches(cfg, tokenizer) -> "RowStreams":
    """The pre-training stream of `cfg.data`: this process's rows of every global batch (`fa-jax teacher-cache`
    walks the same stream)."""
    d = cfg.data
    docs = data_lib.load_documents(d.train, split=d.text_split, text_field=d.text_field, on_error=d.on_error,
                                   streaming=bool(d.streaming))
    return RowStreams(docs, tokenizer, seq_len=int(d.seq_len), global_rows=int(d.batch_size), seed=int(d.seed),
                      add_bos=d.add_bos, add_eos=d.add_eos, on_error=d.on_error, streaming=bool(d.streaming),
                      split=d.text_split, text_field=d.text_field, name=f"data.train={d.train}")


def open_run(cfg, kind: str, batches_given: bool):
    """The run directory as a context manager (fa_jax.rundir.RunDir): identity check against an existing run
    before anything changes, the lock (process 0), config.json and run.json; what a run that fails before its
    first checkpoint wrote is removed again. A finished run's `.finished` is its summary (with a message)."""
    run = rundir.RunDir(cfg, kind, batches_given=batches_given, main=jax.process_index() == 0)

    class _Ctx:
        def __enter__(self):
            run.__enter__()
            if run.finished is not None:
                print(f"{run.path}: this run already finished (step {run.finished.get('step')} of "
                      f"{cfg.run.steps}); nothing changed. To train further raise run.steps and pass --force-resume")
                run.finished = dict(run.finished, status="already finished")
            return run

        def __exit__(self, *exc):
            return run.__exit__(*exc)

    return _Ctx()


def prepare_out_dir(cfg) -> str:
    """Create run.out_dir and write config.json (for callers that manage the directory themselves; `pretrain`
    and `finetune` go through `open_run`)."""
    out_dir = os.path.abspath(cfg.run.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if jax.process_index() == 0:
        write_text(os.path.join(out_dir, runs.CONFIG), json.dumps(cfg, indent=2, sort_keys=True, default=str))
    return out_dir


def mesh_rules(cfg):
    return tuple(tuple(r) for r in cfg.mesh.rules) if cfg.mesh.rules else sh.DEFAULT_RULES


def train_loop(cfg, mesh, rules, out_dir, models, batches, *, desc: str, adapters=None) -> dict:
    """The loop shared by `pretrain` and `fa_jax.sft.finetune`: one jitted step over `batches` (an iterator of
    local numpy batches with tokens, labels, mask, segment_ids, positions; with state()/restore() when its position
    belongs in checkpoints), checkpoints, resume, SIGTERM, metrics, PEFT export. models = (teacher_cfg, teacher,
    student_cfg, student); the teacher may be None when loss.alpha is 0. `adapters`: the starting adapter (None:
    a fresh one from cfg.adapter)."""
    teacher_cfg, teacher, student_cfg, student = models
    teacher_cfg = teacher_cfg or student_cfg
    teacher = {} if teacher is None else teacher
    state, optimizer, schedule = init_state(cfg, student_cfg, mesh, rules, adapters, student)

    batch_sh = sh.batch_sharding(mesh, rules)
    cached = isinstance(batches, tc.CachedBatches)

    def build(remat):
        loss_fn = make_loss_fn(student_cfg, teacher_cfg, cfg.loss, cfg.model.compute_dtype,
                               float(cfg.adapter.dropout), remat, cache_vocab=batches.cache.vocab if cached else None)
        step = make_train_step(loss_fn, optimizer, schedule, int(cfg.optim.grad_accum), batch_sh)
        return jit_train_step(step, state, student, teacher, mesh, rules)

    shape = (int(cfg.data.batch_size), int(cfg.data.seq_len))
    batch_shapes = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh) for k in BATCH_KEYS}
    if cached:
        batch_shapes.update({k: jax.ShapeDtypeStruct(s, d, sharding=batch_sh)
                             for k, (s, d) in batches.shapes(*shape).items()})
    budget = None
    if cfg.model.remat == "auto":
        budget = memory_budget(cfg, device=mesh.devices.flat[0])
    step_fn, remat = choose_step(cfg, build, (state, student, teacher, batch_shapes), budget)

    ckpt = Checkpointer(os.path.join(out_dir, runs.CHECKPOINTS), keep=int(cfg.run.keep_checkpoints),
                        async_save=bool(cfg.run.async_checkpoint))
    start = 0
    if cfg.run.resume and ckpt.latest_step() is not None:
        positional = hasattr(batches, "restore")
        start, state, data_state = ckpt.restore(abstract_like(state), need_data=positional)
        if positional:
            batches.restore(data_state)
        else:
            print("note: these batches have no position to restore; they start again from their beginning")
        print(f"resumed from step {start} ({ckpt.directory})")
    steps = int(cfg.run.steps)
    stop_at = steps if cfg.run.stop_after is None else min(steps, start + int(cfg.run.stop_after))
    logger = MetricsLogger(out_dir, steps, start, tensorboard=bool(cfg.run.tensorboard), desc=desc)
    n_tokens = int(cfg.data.batch_size) * int(cfg.data.seq_len)
    flops = kd_step_flops(transformer.count_params(student_cfg), transformer.count_params(teacher_cfg), n_tokens,
                          with_teacher=float(cfg.loss.alpha) > 0 and not cached)
    peak = peak_flops_per_device(cfg.run.peak_flops)
    pending, t_last, n_since, last = [], None, 0, {}
    step = start
    with _Stop() as stop:
        while step < stop_at:
            local = next(batches)
            # (a step compiled ahead of time by model.remat=auto takes exactly the int32 batch it was compiled for)
            batch = {k: jax.make_array_from_process_local_data(
                batch_sh, np.asarray(local[k], np.int32 if budget is not None and k in BATCH_KEYS else None))
                     for k in batch_shapes}
            state, metrics = step_fn(state, student, teacher, batch)
            step += 1
            pending.append(metrics)
            logger.advance()
            if step == start + 1:
                jax.block_until_ready(metrics)
                t_last, n_since = time.perf_counter(), 0  # the first step includes compilation: not timed
                pending = []
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                logger.log(step, last)
            else:
                n_since += 1
            if pending and (step % int(cfg.run.log_every) == 0 or step == stop_at):
                fetched = jax.device_get(pending)
                now = time.perf_counter()
                last = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                last["tokens_per_s"] = n_since * n_tokens / max(now - t_last, 1e-9)
                if peak:
                    last["mfu"] = last["tokens_per_s"] / n_tokens * flops / (peak * jax.device_count())
                logger.log(step, last)
                pending, t_last, n_since = [], now, 0
            if stop.requested or (int(cfg.run.save_every) and step % int(cfg.run.save_every) == 0):
                ckpt.save(step, state, batches.state() if hasattr(batches, "state") else None)
            if stop.requested:
                ckpt.wait()
                print(f"{stop.requested}: checkpoint saved at step {step}; run the same command again to resume")
                break
    if step == stop_at and ckpt.latest_step() != step:
        ckpt.save(step, state, batches.state() if hasattr(batches, "state") else None, force=True)
    ckpt.close()
    plot = logger.close()
    status = "finished" if step >= steps else "interrupted" if stop.requested else "stopped"
    summary = {"step": step, "steps": steps, "status": status, "out_dir": out_dir, "metrics": last,
               "remat": remat or "none",
               "checkpoints": ckpt.directory, "loss_curve": plot}
    if step >= steps and cfg.run.export_peft:
        summary["peft_adapter"] = export_peft(student_cfg, state["adapters"], os.path.join(out_dir, runs.EXPORT),
                                              cfg)
    if jax.process_index() == 0:
        write_text(os.path.join(out_dir, runs.SUMMARY), json.dumps(summary, indent=2, default=str) + "\n")
    summary["adapters"] = state["adapters"]
    return summary


def export_peft(student_cfg, adapters, out_dir, cfg) -> str:
    """The adapters as a PEFT directory (bottleneck adapters, which PEFT has no format for: fa_jax's own, see
    `adapters.save_adapter`), gathered to the host and written by process 0."""
    host = multihost_utils.process_allgather(adapters, tiled=True) if jax.process_count() > 1 else adapters
    if jax.process_index() == 0:
        adapters_lib.save_adapter(student_cfg, jax.device_get(host), out_dir, use_rslora=bool(cfg.adapter.use_rslora),
                                  base_model_name_or_path=cfg.model.student or cfg.model.teacher, overwrite=True)
    return out_dir
