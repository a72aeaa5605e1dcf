"""Downstream fine-tuning (SFT) of an adapter, starting from a foundation adapter, a PEFT adapter or random.

    fa-jax sft --config configs/sft_smollm2.py init=foundation:runs/pretrain_smollm2 data.train=train.jsonl

The loop is pre-training's (`train.train_loop`: one jitted step, checkpoints, resume, SIGTERM, metrics, PEFT
export); only the data and the loss differ. The loss is next-token cross-entropy on response tokens only
(`loss.alpha = 0`); `loss.alpha > 0` adds distillation from `model.teacher` on the same tokens.

Records (JSON Lines, parquet, a `save_to_disk` directory, or a `datasets.Dataset`):
  {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}   chat
  {"prompt": ..., "response" | "completion": ...}
  {"instruction": ..., "input": optional, "output" | "response": ...}
  {"question": ..., "answer": ...}
With a chat template in the tokenizer (and `data.chat_template` true) every record is rendered as a conversation
with the template's own special tokens; the loss covers each assistant turn (the template's end-of-turn tokens
included). Without one, an example is [BOS] prompt response [EOS] and the loss covers response and EOS.

Rows are one example each, padded (`data.pack = false`), or several whole examples packed into a row with segment
ids (`data.pack = true`); an example longer than `data.seq_len + 1` tokens is cut (counted in a warning).
"""
from __future__ import annotations

import json
import os
import warnings

import datasets
import jax
import numpy as np

from fa_jax import lora, run_config, runs, train, validation
from fa_jax import sharding as sh
from fa_jax.adapters import load_adapter_dir
from fa_jax.embedded import resolve_model_path
from fa_jax.errors import FaJaxError
from fa_jax.io.load import load_model, load_tokenizer
from fa_jax.models import transformer
from fa_jax.run_config import INIT_KINDS, parse_init, sft_defaults  # noqa: F401  (public here too: defined here)


# ------------------------------------------------------------------------------------------------- records


_PROMPT_KEYS = ("prompt", "instruction", "question")
_RESPONSE_KEYS = ("response", "completion", "output", "answer")


def load_records(spec, *, max_examples=None) -> list:
    """A list of record dicts from a JSON Lines file, a parquet file, a `save_to_disk` directory, a list of dicts
    or a `datasets.Dataset`. A bad JSON line is a FaJaxError naming file and line."""
    if isinstance(spec, list) and all(isinstance(r, dict) for r in spec):
        records = spec
    elif isinstance(spec, str) and os.path.isdir(spec):
        ds = datasets.load_from_disk(spec)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[list(ds)[0]]
        records = [dict(r) for r in ds]
    elif isinstance(spec, str) and spec.endswith(".parquet"):
        records = [dict(r) for r in datasets.load_dataset("parquet", data_files=spec, split="train")]
    elif isinstance(spec, str):
        if not os.path.exists(spec):
            raise FaJaxError(f"{spec}: no such file")
        records = []
        with open(spec, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FaJaxError(f"{spec}:{lineno}: bad JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise FaJaxError(f"{spec}:{lineno}: a JSON {type(rec).__name__}; expected an object")
                rec["_where"] = f"{spec}:{lineno}"
                records.append(rec)
    elif hasattr(spec, "__iter__"):
        records = [dict(r) for r in spec]
    else:
        raise FaJaxError(f"data.train={spec!r}: expected a .jsonl/.parquet file, a save_to_disk directory or records")
    if max_examples is not None:
        records = records[: int(max_examples)]
    if not records:
        raise FaJaxError(f"data.train={spec!r}: no records")
    return records


def to_messages(record, index: int = 0, prompt_field=None, response_field=None) -> list:
    """The record as chat messages [{"role", "content"}, ...] ending with an assistant turn."""
    where = record.get("_where", f"record {index}")
    if "messages" in record and prompt_field is None:
        msgs = record["messages"]
        if (not isinstance(msgs, list) or not msgs or
                not all(isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in msgs)):
            raise FaJaxError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        if not any(m["role"] == "assistant" for m in msgs):
            raise FaJaxError(f"{where}: 'messages' has no assistant turn to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    pk = prompt_field or next((k for k in _PROMPT_KEYS if k in record), None)
    rk = response_field or next((k for k in _RESPONSE_KEYS if k in record), None)
    fields = ", ".join(k for k in record if k != "_where") or "none"
    if pk is None or pk not in record:
        raise FaJaxError(f"{where}: no prompt field ({prompt_field or ' / '.join(_PROMPT_KEYS)}; fields: {fields})")
    if rk is None or rk not in record:
        raise FaJaxError(f"{where}: no response field ({response_field or ' / '.join(_RESPONSE_KEYS)}; "
                         f"fields: {fields})")
    prompt, response = record[pk], record[rk]
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise FaJaxError(f"{where}: fields {pk!r} and {rk!r} must be strings")
    if pk == "instruction" and isinstance(record.get("input"), str) and record["input"].strip():
        prompt = prompt + "\n\n" + record["input"]
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _ids(x) -> list:
    if hasattr(x, "keys") and "input_ids" in x:  # BatchEncoding from newer transformers
        x = x["input_ids"]
    return [int(t) for t in x]


def encode(tokenizer, messages, *, chat: bool, where: str = "record") -> tuple[np.ndarray, np.ndarray]:
    """(ids [L], target [L]): the token ids of one example and 1 where a token is a response token the loss
    predicts (assistant content, its end-of-turn / EOS), 0 for prompt and template tokens."""
    if chat:
        ids, target = [], []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = _ids(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True))
            upto = _ids(tokenizer.apply_chat_template(messages[: i + 1], tokenize=True))
            if upto[: len(before)] != before or (ids and before[: len(ids)] != ids):
                raise FaJaxError(f"{where}: the tokenizer's chat template does not render conversations prefix by "
                                 "prefix, so response tokens cannot be located (set data.chat_template=false)")
            target += [0] * (len(before) - len(ids)) + [1] * (len(upto) - len(before))
            ids = upto
        return np.asarray(ids, np.int32), np.asarray(target, np.int32)
    prompt = "\n\n".join(m["content"] for m in messages[:-1])
    p_ids = _ids(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    r_ids = _ids(tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = bos + p_ids + r_ids + eos
    target = [0] * (len(bos) + len(p_ids)) + [1] * (len(r_ids) + len(eos))
    return np.asarray(ids, np.int32), np.asarray(target, np.int32)


def make_rows(examples, seq_len: int, pad_id: int, pack: bool) -> list[dict]:
    """Training rows from encoded examples [(ids, target), ...]: int32 [T] tokens, labels, mask, segment_ids,
    positions; mask[t] = 1 exactly where labels[t] is a response token of the same example as tokens[t]."""
    groups, used = [], 0
    for ex in examples:
        n = min(len(ex[0]), seq_len + 1)
        if pack and groups and used + n <= seq_len + 1:
            groups[-1].append(ex)
            used += n
        else:
            groups.append([ex])
            used = n
    return [_row(g, seq_len, pad_id) for g in groups]


def _row(group, T: int, pad_id: int) -> dict:
    """One row from the examples of `group`, each cut to T + 1 tokens, each its own segment."""
    row = np.full(T + 1, pad_id, np.int32)
    tgt, seg, pos = (np.zeros(T + 1, np.int32) for _ in range(3))
    o = 0
    for k, (ids, target) in enumerate(group, 1):
        n = min(len(ids), T + 1)
        row[o:o + n], tgt[o:o + n], seg[o:o + n], pos[o:o + n] = ids[:n], target[:n], k, np.arange(n)
        o += n
    same = (seg[:T] == seg[1:]) & (seg[:T] > 0)
    return {"tokens": row[:T], "labels": row[1:], "mask": (same & (tgt[1:] > 0)).astype(np.int32),
            "segment_ids": seg[:T], "positions": pos[:T]}


class SFTBatches:
    """Global batches of `global_rows` rows, each process keeping its own slice; epochs in a seeded permutation.

    Every process encodes the same global batch (examples are short) and keeps rows [p * B / P, (p + 1) * B / P),
    so batches do not depend on the number of processes. `state()` / `restore()` give the exact position.
    """

    def __init__(self, records, tokenizer, *, seq_len: int, global_rows: int, seed: int = 0, pack: bool = False,
                 chat=None, prompt_field=None, response_field=None):
        self.records, self.tokenizer = records, tokenizer
        self.T, self.B, self.seed, self.pack = int(seq_len), int(global_rows), int(seed), bool(pack)
        self.chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else bool(chat)
        if self.chat and not getattr(tokenizer, "chat_template", None):
            self.chat = False
        self.fields = (prompt_field, response_field)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.epoch, self.cursor, self.truncated = 0, 0, 0
        self._cache = {}
        P, p = jax.process_count(), jax.process_index()
        self.local = slice(p * self.B // P, (p + 1) * self.B // P)

    def example(self, i: int):
        if i not in self._cache:
            rec = self.records[i]
            where = rec.get("_where", f"record {i}")
            ids, target = encode(self.tokenizer, to_messages(rec, i, *self.fields), chat=self.chat, where=where)
            if not target.any():
                raise FaJaxError(f"{where}: the example has no response tokens")
            if len(ids) > self.T + 1:
                self.truncated += 1
            self._cache[i] = (ids, target)
        return self._cache[i]

    def _order(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        T = self.T
        groups, used = [], 0  # the examples of each row of this batch
        while True:
            ex = self.example(int(self._order(self.epoch)[self.cursor]))
            n = min(len(ex[0]), T + 1)
            if self.pack and groups and used + n <= T + 1:
                groups[-1].append(ex)
                used += n
            elif len(groups) == self.B:
                break  # this example would open a row too many: it starts the next batch
            else:
                groups.append([ex])
                used = n
            self.cursor += 1
            if self.cursor >= len(self.records):  # an epoch ends: its last row is not filled from the next one
                self.epoch, self.cursor, used = self.epoch + 1, 0, T + 2
        rows = [_row(g, T, self.pad_id) for g in groups]
        if self.truncated:
            warnings.warn(f"{self.truncated} SFT examples were longer than data.seq_len + 1 tokens and were cut")
            self.truncated = 0
        rows = rows[self.local]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def restore(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


# ------------------------------------------------------------------------------------------- initial adapter


def load_initial_adapter(cfg, student_cfg):
    """The adapter tree `cfg.init` names (None for random), checked against cfg.adapter's targets and rank."""
    kind, path = parse_init(cfg.init)
    if kind == "random":
        return None
    if not os.path.isdir(path):
        raise FaJaxError(f"init={cfg.init}: {path} is not a directory")
    if kind == "foundation":
        if not runs.is_run(path):
            raise FaJaxError(f"init={cfg.init}: {path} is not a fa_jax pre-training run (no {runs.CONFIG})")
        keep = runs.keep_layers_of(path)
        if keep != cfg.model.keep_layers:
            raise FaJaxError(f"init={cfg.init}: the foundation adapter was trained on a student with "
                             f"keep_layers={keep}, this run uses model.keep_layers={cfg.model.keep_layers}")
        exported = runs.exported_adapter(path)
        # not exported yet: its newest checkpoint (on the same student: keep_layers was compared just above)
        adapters = (load_adapter_dir(student_cfg, exported) if exported else
                    runs.run_adapters(path, student_cfg, allow_pruned=True))
    else:
        adapters = load_adapter_dir(student_cfg, path)
    if cfg.adapter.kind not in ("lora", "dora"):
        return adapters  # train.init_state checks the layout against cfg.adapter
    expected = {m: int(cfg.adapter.rank) for m in lora.resolve_targets(student_cfg, cfg.adapter.targets)}
    got = {m: int(a["lora_A"].shape[1]) for m, a in lora.iter_modules(adapters)}
    if expected != got:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        ranks = sorted({r for r in got.values()})
        raise FaJaxError(f"init={cfg.init}: the adapter does not match adapter.rank={cfg.adapter.rank}, "
                         f"adapter.targets={cfg.adapter.targets!r} (adapter ranks {ranks}; missing modules "
                         f"{missing[:3] or 'none'}; extra modules {extra[:3] or 'none'})")
    return adapters


# ------------------------------------------------------------------------------------------------- the run


def load_student(cfg, mesh, rules):
    """(student_cfg, student, tokenizer, teacher_cfg, teacher); the teacher only when loss.alpha > 0."""
    rule_set = sh.Rules(mesh, rules)
    path = resolve_model_path(cfg.model.student)
    student_cfg, student = load_model(path, dtype=cfg.model.dtype, sharding=rule_set)
    tokenizer = load_tokenizer(path)
    teacher_cfg = teacher = None
    if float(cfg.loss.alpha) > 0:
        if cfg.model.teacher is None:
            raise FaJaxError(f"loss.alpha={cfg.loss.alpha} distills from a teacher, but model.teacher is not set")
        t_path = resolve_model_path(cfg.model.teacher)
        teacher_cfg, teacher = load_model(t_path, dtype=cfg.model.dtype, sharding=rule_set)
        train.check_same_tokenizer(load_tokenizer(t_path), tokenizer, t_path, path)
    if cfg.model.keep_layers is not None:
        student_cfg, student = transformer.select_layers(student_cfg, student, cfg.model.keep_layers)
    teacher_cfg, student_cfg = train.with_attention(cfg, teacher_cfg), train.with_attention(cfg, student_cfg)
    teacher, student = train.stack_models(cfg, mesh, rules, teacher_cfg, teacher, student_cfg, student)
    return student_cfg, student, tokenizer, teacher_cfg, teacher


def finetune(cfg, batches=None) -> dict:
    """Run (or resume) SFT as `cfg` says (see `sft_defaults`); returns the summary dict of `train.train_loop`."""
    cfg = run_config.wrap(cfg)
    validation.check_run_config(cfg, "sft", batches_given=batches is not None)
    parse_init(cfg.init)
    mesh = sh.make_mesh(cfg.mesh.shape)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    B = int(cfg.data.batch_size)
    if B % rows or B % (jax.process_count() * int(cfg.optim.grad_accum)):
        raise FaJaxError(f"data.batch_size={B} must be divisible by the mesh's data x fsdp size {rows} "
                         f"(mesh.shape={list(cfg.mesh.shape)}) and by processes x optim.grad_accum = "
                         f"{jax.process_count() * int(cfg.optim.grad_accum)}")
    if batches is None and cfg.data.train is None:
        raise FaJaxError("data.train is not set: give a JSONL/parquet file or a save_to_disk directory of records")
    with train.open_run(cfg, "sft", batches is not None) as run:
        if run.finished is not None:
            return run.finished
        rules = train.mesh_rules(cfg)
        student_cfg, student, tokenizer, teacher_cfg, teacher = load_student(cfg, mesh, rules)
        adapters = load_initial_adapter(cfg, student_cfg)
        if batches is None:
            d = cfg.data
            batches = SFTBatches(load_records(d.train, max_examples=d.max_examples), tokenizer,
                                 seq_len=int(d.seq_len), global_rows=B, seed=int(d.seed), pack=bool(d.pack),
                                 chat=bool(d.chat_template),
                                 prompt_field=d.prompt_field, response_field=d.response_field)
        return train.train_loop(cfg, mesh, rules, run.path, (teacher_cfg, teacher, student_cfg, student), batches,
                                desc="sft", adapters=adapters)
