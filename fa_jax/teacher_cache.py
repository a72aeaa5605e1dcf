"""The teacher off the training path: its top-k distributions computed once, stored, and read by later runs.

    fa-jax teacher-cache --config configs/pretrain_smollm2.py --out cache/ teacher.top_k=64
    fa-jax pretrain --config configs/pretrain_smollm2.py teacher.cache=cache/

`write` runs the frozen teacher over the pre-training stream of a run config (the same documents, order, packing
and rows as `fa-jax pretrain` with that config, `train.pretrain_batches`) and stores, for every position, the k most
probable tokens at the loss temperature, their log-probabilities and the log of the probability left outside them
(the tail bucket). A pre-training run given `teacher.cache` loads no teacher: its KD term is the divergence between
these coarse distributions and the student's (`losses.cached_distill_loss`, exact when k is the vocabulary size).

Layout of a cache directory:
    cache.json                          what produced it (teacher, tokenizer, data files, packing, temperature,
                                        vocabulary, k, dtypes), the steps written and, once complete, a summary
    rows-R0-R1/steps-S0-S1.safetensors  the global batch rows [R0, R1) (one writing process's rows) of the steps
                                        [S0, S1): "ids" [S, R, T, k] uint16 (uint32 for vocabularies over 65536),
                                        "logp" [S, R, T, k] (teacher.cache_dtype), "tail" [S, R, T] float32 and
                                        "tokens" [S, R, T] (the inputs, so that a run checks every batch it reads);
                                        its metadata holds the data position after step S1 and the covered mass.

Each file is written under a temporary name and renamed, so a killed writer leaves only whole files; writing again
with the same config continues after the last file of each row range (and raising run.steps extends a cache).
Every process writes its own rows; any number of processes can read any rows.

Disk: per scored position k * (2 + 2) bytes at float16 with uint16 ids, plus 4 (tail) and 2 (token): 262 bytes for
k = 64 (Llama 3's 128256-token vocabulary needs uint32 ids and tokens: 392 bytes).
"""
from __future__ import annotations

import glob
import json
import os
import re
import secrets

import ml_dtypes
import numpy as np

from fa_jax import rundir
from fa_jax.embedded import resolve_model_path
from fa_jax.errors import FaJaxError
from fa_jax.io import safetensors
from fa_jax.io.load import load_model_config

FORMAT = 1
META = "cache.json"
DEFAULT_TOP_K = 64
DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
FILE_BYTES = 256 << 20  # about this many bytes per file
KEYS = ("teacher_ids", "teacher_logp", "teacher_tail")  # the batch entries a cached run adds
# what a run must share with the cache it reads (compared before the first step)
MATCHED = ("format", "teacher", "tokenizer", "data", "packing", "temperature", "vocab")
_FILE = re.compile(r"steps-(\d+)-(\d+)\.safetensors$")
_ROWS = re.compile(r"rows-(\d+)-(\d+)$")


# --------------------------------------------------------------------------------------------- identity


def identity(cfg, vocab: int) -> dict:
    """What a cache's numbers depend on (cache.json records it; `MATCHED` keys must equal a reading run's)."""
    d, m = cfg.data, cfg.model
    return {
        "format": FORMAT,
        "teacher": rundir.model_fingerprint(m.teacher),
        "tokenizer": rundir.tokenizer_fingerprint(m.teacher),
        "data": rundir.data_fingerprint(d.train),
        "packing": {"seq_len": int(d.seq_len), "batch_size": int(d.batch_size), "seed": int(d.seed),
                    "text_split": d.text_split, "text_field": d.text_field, "add_bos": d.add_bos,
                    "add_eos": d.add_eos, "streaming": bool(d.streaming), "on_error": d.on_error},
        "temperature": float(cfg.loss.temperature),
        "vocab": int(vocab),
        "teacher_settings": {"dtype": m.dtype, "compute_dtype": m.compute_dtype, "quantize": cfg.teacher.quantize},
    }


def _describe(key: str, value) -> str:
    if key == "data" and isinstance(value, dict):
        return f"data files {value.get('sha256', value)}"
    if key == "packing" and isinstance(value, dict):
        return ", ".join(f"data.{k}={v}" for k, v in value.items())
    text = json.dumps(value, default=str)
    return text if len(text) < 80 else text[:77] + "..."


def first_difference(got: dict, want: dict, keys) -> str | None:
    for key in keys:
        a, b = got.get(key), want.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict) and key == "packing":
                sub = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
                return f"data.{sub}: the cache has {a.get(sub)!r}, this run {b.get(sub)!r}"
            what = {"temperature": "loss.temperature", "vocab": "the shared vocabulary"}.get(key, key)
            return f"{what}: the cache has {_describe(key, a)}, this run {_describe(key, b)}"
    return None


def read_meta(path: str) -> dict:
    f = os.path.join(path, META)
    if not os.path.isdir(path):
        raise FaJaxError(f"teacher.cache={path}: no such directory (write one with `fa-jax teacher-cache`)")
    if not os.path.isfile(f):
        raise FaJaxError(f"teacher.cache={path}: not a teacher cache (no {META}; write one with `fa-jax "
                         "teacher-cache`)")
    try:
        with open(f) as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise FaJaxError(f"{f}: unreadable ({getattr(e, 'msg', e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FaJaxError(f"{f}: not a teacher cache of format {FORMAT}")
    return meta


def student_vocab(cfg, teacher_cfg) -> int:
    """The vocabulary the KD term compares over: the first min(student, teacher) entries (`losses._shared_vocab`)."""
    s = cfg.model.student
    if s in (None, cfg.model.teacher):
        return teacher_cfg.vocab_size
    return min(load_model_config(resolve_model_path(s)).vocab_size, teacher_cfg.vocab_size)


def run_vocab(cfg, student_cfg) -> int:
    """`student_vocab` for a run that has its student loaded but no teacher (only the teacher's config is read)."""
    return min(student_cfg.vocab_size, load_model_config(resolve_model_path(cfg.model.teacher)).vocab_size)


# ----------------------------------------------------------------------------------------------- files


def index_files(path: str) -> dict:
    """{(r0, r1): [(s0, s1, file), ...] sorted} of the whole files of a cache."""
    out = {}
    for d in sorted(glob.glob(os.path.join(path, "rows-*"))):
        m = _ROWS.search(d)
        if not m or not os.path.isdir(d):
            continue
        files = []
        for f in os.listdir(d):
            fm = _FILE.fullmatch(f)
            if fm:
                files.append((int(fm.group(1)), int(fm.group(2)), os.path.join(d, f)))
        out[(int(m.group(1)), int(m.group(2)))] = sorted(files)
    return out


def contiguous(files) -> list:
    """The files that continue each other from step 0 (a gap ends them)."""
    out, end = [], 0
    for s0, s1, f in files:
        if s0 != end:
            break
        out.append((s0, s1, f))
        end = s1
    return out


def ids_dtype(vocab: int):
    return np.dtype(np.uint16) if vocab <= 1 << 16 else np.dtype(np.uint32)


def bytes_per_position(k: int, vocab: int, dtype: str) -> int:
    """Disk bytes per cached position: ids, log-probabilities, tail (float32) and token."""
    i = ids_dtype(vocab).itemsize
    return k * (i + DTYPES[dtype].itemsize) + 4 + i


# ----------------------------------------------------------------------------------------------- writing


def write_file(row_dir, s0, s1, buf, data_state, covered, hist) -> None:
    name = os.path.join(row_dir, f"steps-{s0:09d}-{s1:09d}.safetensors")
    tmp = f"{name}.tmp{secrets.token_hex(4)}"
    arrays = {key: np.stack(v) for key, v in buf.items()}
    try:
        safetensors.write(tmp, [(key, a.shape, a.dtype, lambda a=a: a) for key, a in arrays.items()],
                          metadata={"data_state": json.dumps(data_state), "mass_sum": repr(float(covered[0])),
                                    "positions": str(int(covered[1])), "mass_hist": json.dumps(hist.tolist())})
        os.replace(tmp, name)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def summarize(path: str) -> dict:
    """Steps written (by every row range), bytes on disk and the top-k mass over the scored positions."""
    index = index_files(path)
    mass, n, hist, size = 0.0, 0, np.zeros(20, np.int64), 0
    steps = []
    for files in index.values():
        files = contiguous(files)
        steps.append(files[-1][1] if files else 0)
        for _, _, f in files:
            md = safetensors.SafetensorsFile(f).metadata
            mass += float(md["mass_sum"])
            n += int(md["positions"])
            hist += np.asarray(json.loads(md["mass_hist"]), np.int64)
            size += os.path.getsize(f)
    cum = np.cumsum(hist) / max(n, 1)
    return {"steps": min(steps) if steps else 0, "positions": n, "bytes": size,
            "bytes_per_position": size / max(n, 1) if n else None,
            "mean_topk_mass": mass / max(n, 1),
            "positions_below_mass": {f"{b:.2f}": float(cum[int(b * 20) - 1]) for b in (0.5, 0.8, 0.9, 0.95)}}


def format_summary(path: str, s: dict) -> str:
    below = ", ".join(f"{float(v) * 100:.1f}% below {k}" for k, v in s["positions_below_mass"].items())
    return (f"teacher cache {path}: {s['steps']} steps, {s['positions']} scored positions, "
            f"{s['bytes'] / 2 ** 20:.1f} MiB; the top k hold {s['mean_topk_mass'] * 100:.2f}% of the teacher's "
            f"probability on average ({below})")


# ----------------------------------------------------------------------------------------------- reading


class Cache:
    """A teacher cache opened for reading by a run: `check` it against the run, then `read(step, r0, r1)`."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.meta = read_meta(self.path)
        self.index = {rows: contiguous(files) for rows, files in index_files(self.path).items()}
        self.k, self.vocab = int(self.meta["k"]), int(self.meta["vocab"])
        self._open = {}

    def check(self, cfg, vocab: int, rows: tuple[int, int], steps: int) -> None:
        """A FaJaxError unless this cache was written for the run `cfg` (teacher, tokenizer, data, packing,
        temperature, vocabulary `vocab`) and holds its rows [r0, r1) for `steps` steps."""
        diff = first_difference(self.meta, identity(cfg, vocab), MATCHED)
        if diff:
            raise FaJaxError(f"teacher.cache={self.path} was written for another run ({diff}); write a cache with "
                             "this config (`fa-jax teacher-cache --config ... --out DIR`)")
        top_k = cfg.teacher.top_k
        if top_k is not None and not 1 <= int(top_k) <= self.k:
            raise FaJaxError(f"teacher.top_k={top_k}: the cache {self.path} holds {self.k} tokens per position "
                             f"(expected 1..{self.k}, or None for all of them)")
        have = self.steps_for(rows)
        if have < steps:
            raise FaJaxError(f"teacher.cache={self.path} holds {have} steps of batch rows {rows[0]}..{rows[1] - 1}; "
                             f"this run needs run.steps={steps} (extend it: `fa-jax teacher-cache` with "
                             f"run.steps={steps} and the same --out)")

    def steps_for(self, rows: tuple[int, int]) -> int:
        """How many steps the cache holds for every row in [r0, r1)."""
        r0, r1 = rows
        covered, steps = 0, []
        for (a, b), files in sorted(self.index.items()):
            if b > r0 and a < r1:
                covered += min(b, r1) - max(a, r0)
                steps.append(files[-1][1] if files else 0)
        return min(steps) if covered == r1 - r0 and steps else 0

    def _file(self, f):
        if f not in self._open:
            if len(self._open) > 64:
                self._open.clear()
            self._open[f] = safetensors.SafetensorsFile(f)
        return self._open[f]

    def read(self, step: int, r0: int, r1: int, top_k: int | None = None) -> dict:
        """{"ids", "logp", "tail", "tokens"} of batch rows [r0, r1) at `step`; with `top_k` below the cache's k,
        the remaining tokens are folded into the tail."""
        parts = []
        for (a, b), files in sorted(self.index.items()):
            if b <= r0 or a >= r1:
                continue
            f = next((f for s0, s1, f in files if s0 <= step < s1), None)
            if f is None:
                raise FaJaxError(f"teacher.cache={self.path}: no file holds step {step} of rows {a}..{b - 1}")
            st, s0 = self._file(f), int(_FILE.search(f).group(1))
            lo, hi = max(a, r0) - a, min(b, r1) - a
            parts.append({key: st.get_rows(key, step - s0, step - s0 + 1)[0][lo:hi]
                          for key in ("ids", "logp", "tail", "tokens")})
        out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        if top_k is not None and top_k < self.k:
            rest = out["logp"][..., top_k:].astype(np.float32)
            out["tail"] = np.logaddexp(out["tail"], np.logaddexp.reduce(rest, axis=-1)).astype(np.float32)
            out["ids"], out["logp"] = out["ids"][..., :top_k], out["logp"][..., :top_k]
        return out


class CachedBatches:
    """The run's batches with the cached teacher entries of the same step added (`KEYS`), checking that the cache
    holds the very tokens of each batch; its data position includes the step, so resume reads on in step."""

    def __init__(self, batches, cache: Cache, rows: tuple[int, int], top_k: int | None = None):
        self.batches, self.cache, self.rows, self.top_k = batches, cache, rows, top_k
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = dict(next(self.batches))
        got = self.cache.read(self.step, *self.rows, top_k=self.top_k)
        if not np.array_equal(got["tokens"].astype(np.int64), np.asarray(batch["tokens"], np.int64)):
            bad = int(np.flatnonzero((got["tokens"] != batch["tokens"]).any(axis=-1))[0])
            raise FaJaxError(f"teacher.cache={self.cache.path}: step {self.step}, batch row {self.rows[0] + bad} "
                             "holds other tokens than this run's data; the cache belongs to another data stream")
        batch.update(teacher_ids=got["ids"], teacher_logp=got["logp"], teacher_tail=got["tail"])
        self.step += 1
        return batch

    def state(self) -> dict:
        return dict(self.batches.state(), teacher_cache_step=self.step)

    def restore(self, state: dict) -> None:
        if "teacher_cache_step" not in state:
            raise FaJaxError("the checkpoint's data position was saved by a run without teacher.cache; resume it "
                             "as it was started")
        self.batches.restore(state)
        self.step = int(state["teacher_cache_step"])

    def shapes(self, rows: int, seq_len: int) -> dict:
        """ShapeDtypeStruct-like (shape, dtype) of the added entries for `rows` rows."""
        k = self.top_k or self.cache.k
        return {"teacher_ids": ((rows, seq_len, k), np.dtype(self.cache.meta["ids_dtype"])),
                "teacher_logp": ((rows, seq_len, k), DTYPES[self.cache.meta["dtype"]]),
                "teacher_tail": ((rows, seq_len), np.dtype(np.float32))}
