"""Passes of a frozen teacher over a pre-training stream, done once and stored for later runs.

    fa-jax teacher-cache --config configs/pretrain_smollm2.py --out cache/ [key=value ...]

`teacher_cache` walks the stream `fa-jax pretrain` would train on with the same config (`train.pretrain_batches`:
same documents, order, packing and rows), runs the teacher (`train.load_teacher`: sharded, optionally int8) and
writes its top-k distributions in the format of `fa_jax.teacher_cache`, which also reads them.
"""
from __future__ import annotations

import glob
import json
import os
import secrets
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from fa_jax import losses, run_config, train, validation
from fa_jax import sharding as sh
from fa_jax import teacher_cache as tc
from fa_jax.errors import FaJaxError
from fa_jax.io import safetensors
from fa_jax.io.atomic import write_text
from fa_jax.models import transformer


def _local_rows(x) -> np.ndarray:
    """This process's rows of a global array split by rows (replicas over other axes read once)."""
    shards = {}
    for s in x.addressable_shards:
        shards.setdefault(s.index[0].start or 0, s.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def topk_fn(teacher_cfg, vocab: int, k: int, temperature: float, chunk_size: int, compute_dtype, mesh, rules):
    """fn(teacher, batch) -> `losses.TopK` of the batch's rows, jitted over `mesh`, split by rows."""
    def f(teacher, batch):
        h = transformer.hidden_states(teacher_cfg, teacher, batch["tokens"], segment_ids=batch["segment_ids"],
                                      positions=batch["positions"], dtype=compute_dtype)
        head, vd = transformer.lm_head(teacher_cfg, teacher)
        return losses.teacher_topk(h, head, vocab=vocab, k=k, temperature=temperature, chunk_size=chunk_size,
                                   head_vd=vd)

    batch_sh = sh.batch_sharding(mesh, rules)
    return sh.InMesh(jax.jit(f, out_shardings=losses.TopK(batch_sh, batch_sh, batch_sh)), mesh, rules)


def write_rows(row_dir: str, fn, teacher, batches, *, start: int, steps: int, rows: int, seq_len: int, k: int,
               vocab: int, dtype: str, batch_sharding, progress: bool = True) -> None:
    """Steps [start, steps) of `batches` (this process's `rows` rows of each) through `fn` (`topk_fn`), written to
    `row_dir` in files of about tc.FILE_BYTES, each with the data position after its last step."""
    ids_dtype, np_dtype = tc.ids_dtype(vocab), tc.DTYPES[dtype]
    per_step = rows * seq_len * tc.bytes_per_position(k, vocab, dtype)
    steps_per_file = max(1, tc.FILE_BYTES // max(per_step, 1))
    buf = {"ids": [], "logp": [], "tail": [], "tokens": []}
    covered = np.zeros(2)  # sum of the top-k mass over scored positions, their count
    hist = np.zeros(20, np.int64)  # scored positions by top-k mass, in bins of 0.05
    s0 = start
    bar = tqdm(total=steps, initial=start, desc="teacher-cache", unit="step", disable=not progress)
    for step in range(start, steps):
        local = next(batches)
        batch = {key: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local[key], np.int32))
                 for key in ("tokens", "segment_ids", "positions")}
        ids, logp, tail = (_local_rows(x) for x in fn(teacher, batch))
        mass = -np.expm1(np.minimum(tail, 0.0).astype(np.float64))[np.asarray(local["mask"]) > 0]
        covered += (mass.sum(), mass.size)
        hist += np.histogram(mass, bins=20, range=(0.0, 1.0))[0]
        buf["ids"].append(ids.astype(ids_dtype))
        buf["logp"].append(np.maximum(logp, -6e4).astype(np_dtype))  # (float16 ends at -65504; e**-6e4 is 0)
        buf["tail"].append(tail.astype(np.float32))
        buf["tokens"].append(np.asarray(local["tokens"]).astype(ids_dtype))
        if len(buf["ids"]) == steps_per_file or step + 1 == steps:
            tc.write_file(row_dir, s0, step + 1, buf, batches.state(), covered, hist)
            buf = {key: [] for key in buf}
            covered, hist, s0 = np.zeros(2), np.zeros(20, np.int64), step + 1
        bar.update(1)
    bar.close()


def new_meta(ident: dict, k: int, dtype: str) -> dict:
    """cache.json of a new cache: its identity, a fresh id, k and dtypes."""
    return dict(ident, id=secrets.token_hex(8), k=k, dtype=dtype, ids_dtype=tc.ids_dtype(ident["vocab"]).name,
                created=time.strftime("%Y-%m-%dT%H:%M:%S"))


def teacher_cache(cfg, out_dir: str) -> dict:
    """Write (or continue, or extend to run.steps) the teacher cache of the pre-training run `cfg` describes into
    `out_dir`; returns the summary (also in cache.json). See fa_jax/teacher_cache.py."""
    cfg = run_config.wrap(cfg)
    validation.check_run_config(cfg, "pretrain")
    if cfg.teacher.cache is not None:
        raise FaJaxError(f"teacher.cache={cfg.teacher.cache}: `fa-jax teacher-cache` writes a cache (--out); it "
                         "does not read one")
    mesh = sh.make_mesh(cfg.mesh.shape)
    train.validate(cfg, mesh)
    rules = train.mesh_rules(cfg)
    k = int(cfg.teacher.top_k or tc.DEFAULT_TOP_K)
    steps = int(cfg.run.steps)
    teacher_cfg, teacher, tokenizer = train.load_teacher(cfg, mesh, rules)
    vocab = tc.student_vocab(cfg, teacher_cfg)
    if k > vocab:
        raise FaJaxError(f"teacher.top_k={k}: more than the vocabulary's {vocab} tokens")
    ident = tc.identity(cfg, vocab)
    out_dir = os.path.abspath(out_dir)
    meta_path = os.path.join(out_dir, tc.META)
    main = jax.process_index() == 0
    if os.path.exists(meta_path):
        old = tc.read_meta(out_dir)
        diff = tc.first_difference(old, ident, tc.MATCHED + ("teacher_settings",))
        if diff is None and (old["k"], old["dtype"]) != (k, cfg.teacher.cache_dtype):
            diff = f"teacher.top_k / cache_dtype: the cache has {old['k']} / {old['dtype']}, this run " \
                   f"{k} / {cfg.teacher.cache_dtype}"
        if diff:
            raise FaJaxError(f"{out_dir}: holds a teacher cache of another setting ({diff}); write to a new "
                             "directory")
        meta = old
    elif os.path.exists(out_dir) and os.listdir(out_dir):
        raise FaJaxError(f"{out_dir}: exists and is not a teacher cache; expected a new or empty directory")
    else:
        meta = new_meta(ident, k, cfg.teacher.cache_dtype)
    meta = dict(meta, steps_requested=max(steps, int(meta.get("steps_requested", 0))))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("fa_jax teacher-cache: identity checked")
    if main:
        os.makedirs(out_dir, exist_ok=True)
        write_text(meta_path, json.dumps(meta, indent=2, default=str) + "\n")

    B, P, p = int(cfg.data.batch_size), jax.process_count(), jax.process_index()
    r0, r1 = p * B // P, (p + 1) * B // P
    row_dir = os.path.join(out_dir, f"rows-{r0:06d}-{r1:06d}")
    os.makedirs(row_dir, exist_ok=True)
    for tmp in glob.glob(os.path.join(row_dir, "*.tmp*")):
        os.remove(tmp)  # what a killed writer left
    done = tc.contiguous(tc.index_files(out_dir).get((r0, r1), []))
    start = done[-1][1] if done else 0
    batches = train.pretrain_batches(cfg, tokenizer)
    if start:
        batches.restore(json.loads(safetensors.SafetensorsFile(done[-1][2]).metadata["data_state"]))
    fn = topk_fn(teacher_cfg, vocab, k, float(cfg.loss.temperature), int(cfg.loss.chunk_size),
                 cfg.model.compute_dtype, mesh, rules)
    write_rows(row_dir, fn, teacher, batches, start=start, steps=steps, rows=r1 - r0, seq_len=int(cfg.data.seq_len),
               k=k, vocab=vocab, dtype=cfg.teacher.cache_dtype, batch_sharding=sh.batch_sharding(mesh, rules),
               progress=main)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("fa_jax teacher-cache: written")
    summary = tc.summarize(out_dir)
    if main:
        write_text(meta_path, json.dumps(dict(meta, summary=summary), indent=2, default=str) + "\n")
        print(tc.format_summary(out_dir, summary))
    return summary


