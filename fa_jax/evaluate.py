"""Evaluation: answer metrics, perplexity on held-out text, teacher-student agreement, and QA / summarisation runs.

    rouge_l("There are 291 episodes.", "291")      # {"f1", "recall", "precision"}
    exact_match("There are 291 episodes.", "291")  # 1.0: the reference appears in the response
    perplexity(config, params, tokenizer, held_out_texts, adapters=lora)   # {"perplexity", "nll", "tokens"}
    teacher_agreement(t_cfg, teacher, s_cfg, student, tokenizer, texts, adapters=lora)  # {"kl", "top1_agreement", ...}
    TeacherReference(t_cfg, teacher, tokenizer, texts, per_document=True).score(s_cfg, student)  # + per-document sums
    MultipleChoice(tokenizer, prompts, choices).score(config, params)   # {"logprob", "tokens"} [items, choices]
    evaluate_qa(config, params, tokenizer, "qa.jsonl", adapters=lora, out_dir="runs/eval")  # summary dict

Answer metrics (RE-Adapt, seed 004, section 5.3). Instruction-tuned models answer in full sentences, so the paper
scores QA with ROUGE-L *recall* (the share of the reference's longest common subsequence found in the response)
and with an exact match that asks whether the reference appears anywhere in the response; QMSum summaries (seed
000) are scored with ROUGE-L F1. `score_records` reports all of them, averaged over examples, on a 0-1 scale.

- `rouge_l` uses the `rouge-score` package (Google's reimplementation of ROUGE) with its default tokenizer:
  lower case, every run of characters other than a-z and 0-9 is a separator (so non-Latin text scores 0), and
  Porter stemming on by default (`use_stemmer=True`, "episodes" matches "episode"), the usual setting for
  summarisation; pass use_stemmer=False for the unstemmed variant.
- `exact_match` normalises both strings (`normalize_answer`: lower case, Unicode punctuation deleted, the
  articles a/an/the dropped, whitespace collapsed) and is 1.0 when the reference's words appear as a contiguous run
  of whole words of the response ("291" matches "there are 291 episodes" but not "2910"). A reference that
  normalises to nothing (e.g. "The.") never matches.
- A record may give several references (a list): each metric takes its maximum over them, independently.

Perplexity and agreement read documents exactly as pre-training does (`fa_jax.data.PackedBatches`: BOS/EOS,
packing into rows of `seq_len` with segment ids and positions, one pass, padding masked), so the numbers are
comparable with the `lm` and `agreement` metrics of a run. A document that straddles two rows continues in the
second row as a new segment (its context restarts there), as in training. `TeacherReference` with per_document
instead scores every document whole and on its own (`document_batches`) and sums per document, for intervals over
documents. Both use `fa_jax.losses.chunked_distill_loss`'s terms, so no [B, T, V] float32 logits exist for a whole
row, let alone for two models. `MultipleChoice` scores log-likelihood multiple-choice items (a prompt, K
continuations), the prompt run once and its key/value cache shared by the continuations.

Axis legend: B batch rows, T time, C time steps in a chunk, D model, V vocab.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import unicodedata

import datasets
import jax
import jax.numpy as jnp
import numpy as np

from fa_jax import checks, losses
from fa_jax.data import PackedBatches, load_documents, pack_row
from fa_jax.errors import FaJaxError
from fa_jax.generate import generate_text
from fa_jax.io.atomic import write_text
from fa_jax.models import transformer

# --------------------------------------------------------------------------------------------------- answer metrics

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SCORERS: dict = {}


def normalize_answer(text: str) -> str:
    """Lower case, Unicode punctuation (categories P*) deleted, articles a/an/the removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised reference appears in the normalised prediction as a run of whole words, else 0.0.

    This is RE-Adapt's "exact reference answer anywhere in the response" (see the module docstring)."""
    ref = normalize_answer(_text(reference, "reference"))
    if not ref:
        return 0.0
    return float(f" {ref} " in f" {normalize_answer(_text(prediction, 'prediction'))} ")


def rouge_l(prediction: str, reference: str, *, use_stemmer: bool = True) -> dict:
    """ROUGE-L of one prediction against one reference: {"f1", "recall", "precision"}, each in [0, 1].

    recall = LCS / reference tokens, precision = LCS / prediction tokens, f1 their harmonic mean (rouge-score's
    tokenizer and optional Porter stemmer; see the module docstring). Empty (after tokenization) gives zeros.
    """
    key = bool(use_stemmer)
    if key not in _SCORERS:
        from rouge_score import rouge_scorer  # lazy: it imports nltk (about a second), needed for QA scores only

        _SCORERS[key] = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=key)
    score = _SCORERS[key].score(_text(reference, "reference"), _text(prediction, "prediction"))["rougeL"]
    return {"f1": float(score.fmeasure), "recall": float(score.recall), "precision": float(score.precision)}


def _text(value, name):
    if not isinstance(value, str):
        raise FaJaxError(f"{name}={value!r}: expected a string")
    return value


# ------------------------------------------------------------------------------------------------- held-out text


def packed_batches(tokenizer, documents, seq_len, batch_size, add_bos, add_eos, text_field, split):
    """One padded pass of packed rows over `documents` (see `perplexity`), read as process 0 of 1."""
    source = documents
    if isinstance(documents, (list, tuple)):
        if not documents:
            raise FaJaxError("documents=[]: expected at least one text")
        for i, d in enumerate(documents):
            if not isinstance(d, str):
                raise FaJaxError(f"documents[{i}]: a {type(d).__name__}; expected a string (a list holds texts; "
                                 "give files as one path or glob string)")
        source = datasets.Dataset.from_dict({"text": list(documents)})
    return PackedBatches(source, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=0, process_index=0,
                         process_count=1, add_bos=add_bos, add_eos=add_eos, on_error="fail", num_epochs=1,
                         text_field=text_field, split=split)


def _device_batch(batch):
    return {k: jnp.asarray(batch[k]) for k in ("tokens", "labels", "mask", "segment_ids", "positions")}


def perplexity(config, params, tokenizer, documents, *, adapters=None, seq_len: int = 256, batch_size: int = 4,
               dtype=None, chunk_size: int = 128, add_bos: bool | None = None, add_eos: bool | None = None,
               text_field: str = "text", split: str = "paragraph") -> dict:
    """Token-level perplexity of held-out text: {"perplexity": exp(nll), "nll", "tokens"}.

    documents: a list of texts, or a data source `fa_jax.data.load_documents` reads (a path or glob string, a spec
    dict, a `datasets.Dataset`). They are packed as in pre-training into rows [batch_size, seq_len]; nll is the
    mean over every real next-token pair (BOS -> first token ... last token -> EOS of each document; padding and
    document boundaries masked) of -log p(next token), in nats; tokens is their number. add_bos / add_eos: as in
    `PackedBatches` (None: whichever the tokenizer has); text_field and split (paragraph / line / file, for text
    files) as in `load_documents`. adapters: a LoRA tree for the model, or None. dtype: the
    compute dtype (e.g. "bfloat16"); logits and the loss stay float32. One compilation per call.
    """
    checks.check_adapters(config, adapters)

    def step(params, adapters, b):
        h = transformer.hidden_states(config, params, b["tokens"], adapters, segment_ids=b["segment_ids"],
                                      positions=b["positions"], dtype=dtype)
        head, vd = transformer.lm_head(config, params)
        _, m = losses.chunked_distill_loss(h, head, None, None, b["labels"], b["mask"], alpha=0.0,
                                           chunk_size=chunk_size, normalizer=1.0, student_head_vd=vd)
        return m["lm"], m["tokens"]  # with normalizer 1: sums over the batch

    step = jax.jit(step)
    nll_sum, tokens = 0.0, 0
    for batch in packed_batches(tokenizer, documents, seq_len, batch_size, add_bos, add_eos, text_field, split):
        s, n = jax.device_get(step(params, adapters, _device_batch(batch)))
        nll_sum, tokens = nll_sum + float(s), tokens + int(n)
    if tokens == 0:
        raise FaJaxError("documents: no next-token pairs to score (every document is a single token or empty)")
    nll = nll_sum / tokens
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": tokens}


def _agreement_fn(teacher_cfg, student_cfg, temperature, dtype, chunk_size):
    """jitted (h_teacher, teacher, student, adapters, batch) -> per-token (kd, agreement, student nll) [B, T, 3]."""
    def step(h_t, teacher, student, adapters, b):
        h_s = transformer.hidden_states(student_cfg, student, b["tokens"], adapters, segment_ids=b["segment_ids"],
                                        positions=b["positions"], dtype=dtype)
        head_s, s_vd = transformer.lm_head(student_cfg, student)
        head_t, t_vd = transformer.lm_head(teacher_cfg, teacher)
        return losses.chunked_token_terms(h_s, head_s, h_t, head_t, b["labels"], b["mask"],
                                          temperature=float(temperature), chunk_size=chunk_size,
                                          student_head_vd=s_vd, teacher_head_vd=t_vd)

    return jax.jit(step)


def _teacher_fn(teacher_cfg, dtype, chunk_size):
    """jitted (teacher, batch) -> (hidden states [B, T, D], per-token teacher nll [B, T])."""
    def step(teacher, b):
        h = transformer.hidden_states(teacher_cfg, teacher, b["tokens"], segment_ids=b["segment_ids"],
                                      positions=b["positions"], dtype=dtype)
        head, vd = transformer.lm_head(teacher_cfg, teacher)
        return h, losses.chunked_token_terms(h, head, None, None, b["labels"], b["mask"], chunk_size=chunk_size,
                                             student_head_vd=vd)[..., 2]

    return jax.jit(step)


def _with_tokens(terms, batch) -> np.ndarray:
    """Per-token terms [B, T, k] from the device, float64, with the mask appended as a last column (the token)."""
    terms = np.asarray(jax.device_get(terms), np.float64).reshape(*batch["mask"].shape, -1)
    return np.concatenate([terms, np.asarray(batch["mask"], np.float64)[..., None]], axis=-1)


def _check_temperature(temperature):
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise FaJaxError(f"temperature={temperature!r}: expected a number > 0")


def _agreement_summary(sums) -> dict:
    kd, agree, nll, tokens = sums
    if tokens == 0:
        raise FaJaxError("documents: no next-token pairs to score (every document is a single token or empty)")
    return {"kl": kd / tokens, "top1_agreement": agree / tokens, "student_nll": nll / tokens,
            "perplexity": math.exp(nll / tokens), "tokens": int(tokens)}


def teacher_agreement(teacher_cfg, teacher, student_cfg, student, tokenizer, documents, *, adapters=None,
                      seq_len: int = 256, batch_size: int = 4, temperature: float = 1.0, dtype=None,
                      chunk_size: int = 128, add_bos: bool | None = None, add_eos: bool | None = None,
                      text_field: str = "text", split: str = "paragraph") -> dict:
    """How closely the student (with `adapters`) follows the teacher on held-out text.

    Returns {"kl": mean KL(P_teacher || P_student) per real token at `temperature` (nats, no T**2 factor),
    "top1_agreement": fraction of real tokens where both models' most likely next token is the same,
    "student_nll": the student's mean next-token NLL, "perplexity": exp(student_nll), "tokens": the number of real
    tokens}. Documents, packing and arguments as in `perplexity`; both models must use `tokenizer` (vocabularies
    differing only by padding rows are compared on the shared part, as in training). Computed chunk by chunk
    (`losses.chunked_token_terms`, the terms of `chunked_distill_loss`), so neither model's [B, T, V] float32
    logits are ever held for a whole row. To compare several students with one teacher, `TeacherReference` runs
    the teacher only once.
    """
    _check_temperature(temperature)
    checks.check_adapters(student_cfg, adapters)
    teacher_step = _teacher_fn(teacher_cfg, dtype, chunk_size)
    step = _agreement_fn(teacher_cfg, student_cfg, temperature, dtype, chunk_size)
    sums = np.zeros(4, np.float64)
    for batch in packed_batches(tokenizer, documents, seq_len, batch_size, add_bos, add_eos, text_field, split):
        b = _device_batch(batch)
        h_t, _ = teacher_step(teacher, b)
        sums += _with_tokens(step(h_t, teacher, student, adapters, b), batch).sum((0, 1))
    return _agreement_summary(sums)


def _specials(tokenizer, add_bos, add_eos) -> tuple[list, list, int]:
    """([BOS] or [], [EOS] or [], pad id), as `fa_jax.data.PackedBatches` decides them."""
    out = []
    for name, flag in (("bos", add_bos), ("eos", add_eos)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if flag and token_id is None:
            raise FaJaxError(f"add_{name}=True but the tokenizer has no {name} token")
        out.append([int(token_id)] if (token_id is not None and flag is not False) else [])
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    return out[0], out[1], int(pad if pad is not None else eos if eos is not None else 0)


def _texts(documents, text_field, split) -> list[str]:
    """The documents' texts, in order: a list of strings, a `datasets.Dataset` (its `text_field` column) or a data
    source `fa_jax.data.load_documents` reads."""
    if isinstance(documents, (list, tuple)):
        for i, d in enumerate(documents):
            if not isinstance(d, str):
                raise FaJaxError(f"documents[{i}]: a {type(d).__name__}; expected a string")
        return list(documents)
    if isinstance(documents, datasets.Dataset):
        return list(documents[text_field])
    return list(load_documents(documents, split=split, text_field=text_field, on_error="fail")["text"])


def document_batches(tokenizer, documents, *, seq_len: int = 256, batch_size: int = 4, add_bos: bool | None = None,
                     add_eos: bool | None = None, text_field: str = "text", split: str = "paragraph"):
    """Rows [batch_size, seq_len] in which every document is scored whole, on its own: (batches, docs, number of
    documents).

    Each document is [BOS] + tokens + [EOS] as in `perplexity`; one longer than seq_len + 1 tokens is cut as a
    packed stream of it alone would be (piece r holds its tokens r*T .. r*T + T, the context restarting in each), so
    its sums equal `perplexity([document])`'s. The pieces are never cut further: they are packed whole into rows
    (first fit, longest first), each its own segment (`fa_jax.data.pack_row`: attention stays inside a segment and
    positions restart at 0), so a document is scored exactly as in a row of its own, without the padding such
    rows would cost, and one row shape serves every batch. batches: dicts of int32 [B, T] arrays as
    `PackedBatches` gives them, the last padded with empty rows; docs: int [B, T] per batch, the document (index in
    `documents`) of each token position, -1 where none.
    """
    texts = _texts(documents, text_field, split)
    bos, eos, pad_id = _specials(tokenizer, add_bos, add_eos)
    T = int(seq_len)
    todo = [i for i, t in enumerate(texts) if t and not t.isspace()]
    encoded = tokenizer([texts[i] for i in todo], add_special_tokens=False, return_attention_mask=False,
                        verbose=False)["input_ids"] if todo else []
    pieces = []
    for d, ids in zip(todo, encoded):
        ids = np.asarray(bos + list(ids) + eos, np.int32)
        pieces += [(d, ids[s:s + T + 1]) for s in range(0, len(ids) - 1, T)]
    pieces.sort(key=lambda p: -len(p[1]))  # stable: equal lengths keep the documents' order
    room, rows = np.zeros(0, np.int64), []
    for d, p in pieces:  # first fit: a row holds T + 1 tokens (its last one only as a label)
        fits = np.flatnonzero(room >= len(p))
        if fits.size:
            room[fits[0]] -= len(p)
            rows[fits[0]].append((d, p))
        else:
            room = np.append(room, T + 1 - len(p))
            rows.append([(d, p)])
    batches, docs = [], []
    for start in range(0, len(rows), batch_size):
        packed, owners = [], []
        for row in rows[start:start + batch_size] + [[]] * max(0, start + batch_size - len(rows)):
            tok = np.concatenate([p for _, p in row] or [np.zeros(0, np.int32)])
            piece = np.repeat(np.arange(1, len(row) + 1), [len(p) for _, p in row])
            packed.append(pack_row(tok, piece, T, pad_id))
            owner = np.full(T + 1, -1, np.int64)
            owner[:len(tok)] = np.repeat([d for d, _ in row], [len(p) for _, p in row]).astype(np.int64)
            owners.append(owner[:T])
        batches.append({k: np.stack([r[k] for r in packed]) for k in packed[0]})
        docs.append(np.stack(owners))
    return batches, docs, len(texts)


class TeacherReference:
    """The teacher's view of held-out text, computed once, against which any number of students are scored.

        ref = TeacherReference(teacher_cfg, teacher, tokenizer, held_out_texts, max_rows=16)
        ref.teacher_metrics    # {"perplexity", "nll", "tokens"} of the teacher itself
        ref.score(student_cfg, student, adapters=lora)   # as teacher_agreement: {"kl", "top1_agreement", ...}

        ref = TeacherReference(teacher_cfg, teacher, tokenizer, held_out_texts, per_document=True)
        ref.score(student_cfg, student)["per_document"]  # {"nll_sum", "kl_sum", "agreement_sum", "tokens"} [docs]
        ref.teacher_documents                            # {"nll_sum", "tokens"} [docs] of the teacher

    The held-out rows are packed as in `perplexity` (at most `max_rows` of them, None: all), or with per_document
    every document is scored whole and on its own (`document_batches`), with sums per document in the documents'
    order. The teacher's final hidden states [B, T, D] are kept per batch (D floats per token, not V), so each
    `score` call runs only the student and the two LM heads, chunk by chunk. Students with the same shapes share
    one compilation. `subset(max_tokens)` is the same reference on a spread-out part of the batches.
    """

    def __init__(self, teacher_cfg, teacher, tokenizer, documents, *, seq_len: int = 256, batch_size: int = 4,
                 max_rows: int | None = None, temperature: float = 1.0, dtype=None, chunk_size: int = 128,
                 add_bos: bool | None = None, add_eos: bool | None = None, text_field: str = "text",
                 split: str = "paragraph", per_document: bool = False):
        _check_temperature(temperature)
        if max_rows is not None and int(max_rows) < 1:
            raise FaJaxError(f"max_rows={max_rows!r}: expected at least 1 (or None for every row)")
        if per_document and max_rows is not None:
            raise FaJaxError(f"max_rows={max_rows!r}: per_document scores every document whole; give max_rows=None")
        self.teacher_cfg, self.teacher = teacher_cfg, teacher
        self.temperature, self.dtype, self.chunk_size = float(temperature), dtype, int(chunk_size)
        teacher_step = _teacher_fn(teacher_cfg, dtype, chunk_size)
        self.token_documents, self.documents = None, None
        if per_document:
            batches, self.token_documents, self.documents = document_batches(
                tokenizer, documents, seq_len=seq_len, batch_size=batch_size, add_bos=add_bos, add_eos=add_eos,
                text_field=text_field, split=split)
        else:
            batches = packed_batches(tokenizer, documents, seq_len, batch_size, add_bos, add_eos, text_field, split)
        self.batches, self.hidden, self._teacher_terms = [], [], []
        rows = 0
        for batch in batches:
            if max_rows is not None and rows >= int(max_rows):
                break
            b = _device_batch(batch)
            h, nll = teacher_step(teacher, b)
            self.batches.append(b)
            self.hidden.append(h)
            self._teacher_terms.append(_with_tokens(nll[..., None], batch))
            rows += int(b["tokens"].shape[0])
        self._summarize_teacher()
        self._steps: dict = {}

    def _summarize_teacher(self):
        nll, tokens = sum(t.sum((0, 1)) for t in self._teacher_terms) if self._teacher_terms else (0.0, 0)
        if tokens == 0:
            raise FaJaxError("documents: no next-token pairs to score (every document is a single token or empty)")
        self.teacher_metrics = {"perplexity": math.exp(nll / tokens), "nll": nll / tokens, "tokens": int(tokens)}
        self.teacher_documents = None if self.token_documents is None else self._by_document(
            self._teacher_terms, ("nll_sum", "tokens"))

    def _by_document(self, terms, names) -> dict:
        """Per-token terms [B, T, k] of each batch added up per document: {name: [documents]} (tokens as int)."""
        acc = np.zeros((self.documents, len(names)), np.float64)
        for t, d in zip(terms, self.token_documents):
            np.add.at(acc, d[d >= 0], t[d >= 0])
        return {n: (np.rint(acc[:, i]).astype(np.int64) if n == "tokens" else acc[:, i]) for i, n in enumerate(names)}

    @property
    def rows(self) -> int:
        return sum(int(b["tokens"].shape[0]) for b in self.batches)

    def subset(self, max_tokens: int) -> "TeacherReference":
        """This reference on every k-th batch only, k = ceil(tokens / max_tokens): about `max_tokens` real tokens
        (itself when it holds no more). Shares the arrays and compiled steps."""
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise FaJaxError(f"max_tokens={max_tokens!r}: expected an integer >= 1")
        k = -(-self.teacher_metrics["tokens"] // max_tokens)
        if k <= 1:
            return self
        sub = copy.copy(self)  # the same _steps dict: compilations stay shared
        sub.batches, sub.hidden, sub._teacher_terms = self.batches[::k], self.hidden[::k], self._teacher_terms[::k]
        sub.token_documents = None if self.token_documents is None else self.token_documents[::k]
        sub._summarize_teacher()
        return sub

    def score(self, student_cfg, student, adapters=None) -> dict:
        """{"kl", "top1_agreement", "student_nll", "perplexity", "tokens"} of one student on the held-out rows;
        per_document adds "per_document": {"nll_sum", "kl_sum", "agreement_sum", "tokens"}, arrays [documents]."""
        checks.check_adapters(student_cfg, adapters)
        key = student_cfg  # a frozen dataclass: students with the same config share one compiled step
        if key not in self._steps:
            self._steps[key] = _agreement_fn(self.teacher_cfg, student_cfg, self.temperature, self.dtype,
                                             self.chunk_size)
        step = self._steps[key]
        terms = [_with_tokens(step(h_t, self.teacher, student, adapters, b), b)
                 for h_t, b in zip(self.hidden, self.batches)]
        out = _agreement_summary(sum(t.sum((0, 1)) for t in terms))
        if self.token_documents is not None:
            out["per_document"] = self._by_document(terms, ("kl_sum", "agreement_sum", "nll_sum", "tokens"))
        return out


def _choice_fn(config, dtype):
    """jitted (params, adapters, prompts [N, P], choices [N, K, C], choice mask [N, K, C]) -> log p of each choice
    token [N, K, C] (0 on padding)."""
    def step(params, adapters, prompt, choice, cmask):
        N, P = prompt.shape
        _, K, C = choice.shape
        cdt = jnp.dtype(dtype or params["model"]["embed_tokens"]["embedding"].dtype)
        valid = prompt >= 0  # prompts are left-padded with -1
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
        cache = transformer.init_cache(config, N, P + C, cdt)
        h, cache = transformer.hidden_states_with_cache(config, params, jnp.maximum(prompt, 0), cache, 0, positions,
                                                        valid, adapters, dtype=dtype)
        cache = jax.tree.map(lambda x: jnp.repeat(x, K, axis=0), cache)  # the prompt's keys/values, once per choice
        c_pos = jnp.repeat(positions[:, -1] + 1, K)[:, None] + jnp.arange(C, dtype=jnp.int32)[None]
        c_mask = cmask.reshape(N * K, C) > 0
        h_c, _ = transformer.hidden_states_with_cache(config, params, choice.reshape(N * K, C), cache, P, c_pos,
                                                      c_mask, adapters, dtype=dtype)
        # choice token t is predicted by the prompt's last hidden state (t = 0) or by choice token t - 1
        h_pred = jnp.concatenate([jnp.repeat(h[:, -1:], K, axis=0), h_c[:, :-1]], axis=1)  # [N K, C, D]
        head, vd = transformer.lm_head(config, params)
        spec = "bcd,vd->bcv" if vd else "bcd,dv->bcv"
        logits = jnp.einsum(spec, h_pred, head.astype(h_pred.dtype), preferred_element_type=jnp.float32)
        target = choice.reshape(N * K, C)
        lp = jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
        return jnp.where(c_mask, lp, 0.0).reshape(N, K, C)

    return jax.jit(step)


class MultipleChoice:
    """Log-likelihood multiple choice: how likely each of a prompt's K choices is as its continuation.

        mc = MultipleChoice(tokenizer, prompts, choices)   # choices[i]: the K continuation strings of prompts[i]
        mc.score(config, params, adapters=lora)   # {"logprob": [N, K] float64, "tokens": [N, K] int}

    Prompt i is [BOS] + its tokens (add_bos as in `perplexity`); each choice is tokenized on its own (no special
    tokens) and appended, and logprob[i, j] is the sum over choice j's tokens of log p(token | prompt i, the
    choice's earlier tokens); tokens[i, j] is their number (logprob / tokens: the per-token score). Each prompt runs
    once, its keys and values cached (`transformer.hidden_states_with_cache`) and shared by its K choices, so an
    item costs one prompt and K short continuations. Batches of at most `batch_size` items (as evenly filled as
    that allows) all have one shape (prompts left-padded to a multiple of 16 tokens, choices right-padded to the
    longest): one compilation per model config.
    """

    def __init__(self, tokenizer, prompts, choices, *, batch_size: int = 16, add_bos: bool | None = None,
                 dtype=None):
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise FaJaxError("prompts: expected a non-empty list of strings")
        if (not isinstance(choices, (list, tuple)) or len(choices) != len(prompts)
                or not all(isinstance(c, (list, tuple)) and c and all(isinstance(s, str) for s in c)
                           for c in choices)):
            raise FaJaxError(f"choices: expected {len(prompts)} non-empty lists of strings, one per prompt")
        k = len(choices[0])
        if any(len(c) != k for c in choices):
            raise FaJaxError(f"choices: every prompt needs the same number of choices (the first has {k})")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise FaJaxError(f"batch_size={batch_size!r}: expected an integer >= 1")
        bos, _, _ = _specials(tokenizer, add_bos, False)

        def encode(texts):
            return tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False,
                             verbose=False)["input_ids"]

        p_ids = [bos + list(ids) for ids in encode(prompts)]
        c_ids = encode([s for c in choices for s in c])
        empty = [i // k for i, ids in enumerate(c_ids) if not ids] + [i for i, ids in enumerate(p_ids) if not ids]
        if empty:
            raise FaJaxError(f"item {empty[0]}: a prompt or choice with no tokens")
        n, P, C = len(prompts), -(-max(map(len, p_ids)) // 16) * 16, max(map(len, c_ids))
        batch_size = -(-n // -(-n // batch_size))  # as many batches as batch_size needs, evenly filled
        n_pad = -(-n // batch_size) * batch_size
        prompt = np.full((n_pad, P), -1, np.int32)
        choice = np.zeros((n_pad, k, C), np.int32)
        cmask = np.zeros((n_pad, k, C), np.int32)
        for i in range(n_pad):  # padding items repeat item 0 (their scores are dropped)
            src = i if i < n else 0
            prompt[i, P - len(p_ids[src]):] = p_ids[src]
            for j in range(k):
                ids = c_ids[src * k + j]
                choice[i, j, :len(ids)], cmask[i, j, :len(ids)] = ids, 1
        self.n, self.k, self.batch_size, self.dtype = n, k, batch_size, dtype
        self._arrays = (prompt, choice, cmask)
        self._steps: dict = {}

    def score(self, config, params, adapters=None) -> dict:
        """{"logprob": [N, K] summed log-probabilities of the choices, "tokens": [N, K] their token counts}."""
        checks.check_adapters(config, adapters)
        prompt, choice, cmask = self._arrays
        # a tokenizer of another model gives ids this one has not (padding: -1 in prompts, 0 in choices)
        checks.check_token_ids(config, np.maximum(prompt, 0), "the tokenized prompts")
        checks.check_token_ids(config, choice.reshape(len(choice), -1), "the tokenized choices")
        if config not in self._steps:
            self._steps[config] = _choice_fn(config, self.dtype)
        step = self._steps[config]
        out = []
        for s in range(0, len(prompt), self.batch_size):
            b = slice(s, s + self.batch_size)
            lp = step(params, adapters, jnp.asarray(prompt[b]), jnp.asarray(choice[b]), jnp.asarray(cmask[b]))
            out.append(np.asarray(jax.device_get(lp), np.float64).sum(-1))
        return {"logprob": np.concatenate(out)[: self.n], "tokens": cmask[: self.n].sum(-1).astype(np.int64)}


def target_logprobs(config, params, tokens, targets, mask, adapters=None, *, dtype=None, chunk_size: int = 128):
    """Per-token log-probabilities of given targets: (logprob [B, T] float32, greedy [B, T] bool).

    logprob[b, t] = log p(targets[b, t] | tokens[b, :t + 1]); greedy[b, t] says whether targets[b, t] is the
    model's most likely token there. tokens, targets int [B, T]; mask [B, T], 1 for real tokens (padding on either
    side; positions count from the first real token). Both outputs are 0 / False where mask is 0. The LM head runs
    in chunks of `chunk_size` time steps, so [B, T, V] float32 logits never exist at once. Jit it with the config
    closed over (as `fa_jax.lm_eval_bridge` does). tokens and targets are checked as `forward` checks its tokens.
    """
    checks.check_tokens(config, tokens, mask=mask, targets=targets)
    checks.check_token_ids(config, targets, "targets")
    h = transformer.hidden_states(config, params, tokens, adapters, mask=mask, dtype=dtype)
    head, vd = transformer.lm_head(config, params)
    B, T, D = h.shape
    c = max(1, min(int(chunk_size), T))
    pad = -T % c
    hc = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(B, -1, c, D).swapaxes(0, 1)  # [N, B, C, D]
    tc = jnp.pad(jnp.asarray(targets, jnp.int32), ((0, 0), (0, pad))).reshape(B, -1, c).swapaxes(0, 1)

    def chunk(xs):
        hx, tx = xs
        spec = "bcd,vd->bcv" if vd else "bcd,dv->bcv"
        logits = jnp.einsum(spec, hx, head.astype(hx.dtype), preferred_element_type=jnp.float32)  # [B, C, V]
        picked = jnp.take_along_axis(logits, tx[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == tx

    lp, greedy = jax.lax.map(chunk, (hc, tc))
    lp, greedy = lp.swapaxes(0, 1).reshape(B, -1)[:, :T], greedy.swapaxes(0, 1).reshape(B, -1)[:, :T]
    keep = jnp.asarray(mask) > 0
    return jnp.where(keep, lp, 0.0), greedy & keep


# ---------------------------------------------------------------------------------------------------- QA records

# RE-Adapt, Appendix B (seed 004). qa_messages gives the Llama-3 form with a system turn; qa_prompt the one-user-turn
# form the paper used for Gemma and Mistral, whose chat templates reject a system role. `chat_prompts` renders
# either through the tokenizer's own chat template ("We utilize the huggingface tokenizers library to ensure our
# prompts follow the correct template").
CLOSED_BOOK_SYSTEM = "Answer the following question."
CONTEXT_SYSTEM = "Answer the following question given this context: {context}."
CONTEXT_USER = "Answer the following question given this context: {context}\nQuestion: {question}"


def _question(record) -> str:
    """The question with one trailing "?" (the paper's "<question>?"; Natural Questions has none)."""
    q = record["question"].strip()
    return q if q.endswith("?") else q + "?"


def qa_prompt(record: dict, with_context: bool = False) -> str:
    """The prompt text of one record: the user turn of the Gemma/Mistral form (`chat_prompts` renders it).

    {"prompt": ...} is used verbatim (summarisation, custom formats; `with_context` does not change it).
    {"question": ...} follows RE-Adapt's Appendix B (Gemma/Mistral format):
      closed book:   "<question>?"
      with context:  "Answer the following question given this context: <context>\\nQuestion: <question>?"
    """
    _check_record(record, "record", with_context)
    if "prompt" in record:
        return record["prompt"]
    if with_context:
        return CONTEXT_USER.format(context=record["context"].strip(), question=_question(record))
    return _question(record)


def qa_messages(record: dict, with_context: bool = False) -> list[dict]:
    """RE-Adapt's Llama-3 format as chat messages: a system turn ("Answer the following question." or "Answer
    the following question given this context: <context>.") and the user turn "<question>?", for a chat template
    that takes a system role (`chat_prompts`); "prompt" records give one user turn with the prompt."""
    _check_record(record, "record", with_context)
    if "prompt" in record:
        return [{"role": "user", "content": record["prompt"]}]
    system = (CONTEXT_SYSTEM.format(context=record["context"].strip().rstrip(".")) if with_context
              else CLOSED_BOOK_SYSTEM)
    return [{"role": "system", "content": system}, {"role": "user", "content": _question(record)}]


def _check_record(record, where: str, with_context: bool = False) -> None:
    """A FaJaxError naming `where` unless the record is {"question" | "prompt": str, "reference": str or
    non-empty list of str, optional "context": str} (and has a context when `with_context`)."""
    if not isinstance(record, dict):
        raise FaJaxError(f"{where}: a JSON {type(record).__name__}; expected an object with 'question' (or "
                         "'prompt') and 'reference'")
    has = [k for k in ("question", "prompt") if k in record]
    if len(has) != 1:
        raise FaJaxError(f"{where}: expected exactly one of 'question' and 'prompt' (fields: "
                         f"{', '.join(map(str, record)) or 'none'})")
    if not isinstance(record[has[0]], str) or not record[has[0]].strip():
        raise FaJaxError(f"{where}: field {has[0]!r} must be a non-empty string")
    ref = record.get("reference")
    refs = [ref] if isinstance(ref, str) else ref
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise FaJaxError(f"{where}: field 'reference' must be a string or a non-empty list of strings "
                         f"(got {type(ref).__name__ if ref is not None else 'nothing'})")
    if "context" in record and not isinstance(record["context"], str):
        raise FaJaxError(f"{where}: field 'context' must be a string")
    if with_context and has[0] == "question" and not str(record.get("context", "")).strip():
        raise FaJaxError(f"{where}: with_context=True needs a non-empty 'context' string in every question record")


def _read_records(path: str) -> list[tuple[str, dict]]:
    """(path:line, record) for each non-blank line of a JSON Lines file, each record checked."""
    if not os.path.isfile(path):
        raise FaJaxError(f"{path}: no such file")
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise FaJaxError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FaJaxError(f"{where}: bad JSON ({e.msg} at column {e.colno}); expected one object per "
                                 "line") from None
            _check_record(record, where)
            out.append((where, record))
    if not out:
        raise FaJaxError(f"{path}: no records; expected JSON Lines with 'question' (or 'prompt') and 'reference'")
    return out


def load_records(path: str) -> list[dict]:
    """QA / summarisation records from a JSON Lines file: one object per line with "question" or "prompt" (str),
    "reference" (str or list of str) and optionally "context" (str) and any other fields (kept, e.g. "id").
    Blank lines are skipped; a bad line raises FaJaxError("path:line: ...")."""
    return [r for _, r in _read_records(path)]


def _located(records, with_context) -> tuple[list[str], list[dict]]:
    if isinstance(records, (str, os.PathLike)):
        pairs = _read_records(os.fspath(records))
    elif isinstance(records, (list, tuple)):
        pairs = [(f"records[{i}]", r) for i, r in enumerate(records)]
        if not pairs:
            raise FaJaxError("records=[]: expected at least one record")
    else:
        raise FaJaxError(f"records: a {type(records).__name__}; expected a JSON Lines path or a list of dicts")
    for where, r in pairs:
        _check_record(r, where, with_context)
    return [w for w, _ in pairs], [r for _, r in pairs]


def score_records(records, predictions, *, use_stemmer: bool = True) -> tuple[list[dict], dict]:
    """Scores of predictions against the records' references: (per_example, summary).

    per_example[i] = {"index", "prediction", "reference", "rougeL_f1", "rougeL_recall", "rougeL_precision",
    "exact_match"} (plus the record's "id" if it has one); with several references each score is the maximum over
    them. summary = {"n", and the mean of each score}, all on a 0-1 scale.
    """
    _, records = _located(records, False)
    if not isinstance(predictions, (list, tuple)) or len(predictions) != len(records):
        n = len(predictions) if isinstance(predictions, (list, tuple)) else type(predictions).__name__
        raise FaJaxError(f"predictions: {n}; expected a list of {len(records)} strings, one per record")
    per = []
    for i, (record, pred) in enumerate(zip(records, predictions)):
        if not isinstance(pred, str):
            raise FaJaxError(f"predictions[{i}]: a {type(pred).__name__}; expected a string")
        refs = [record["reference"]] if isinstance(record["reference"], str) else record["reference"]
        rouge = [rouge_l(pred, r, use_stemmer=use_stemmer) for r in refs]
        row = {"index": i, **({"id": record["id"]} if "id" in record else {}), "prediction": pred,
               "reference": record["reference"],
               "rougeL_f1": max(s["f1"] for s in rouge), "rougeL_recall": max(s["recall"] for s in rouge),
               "rougeL_precision": max(s["precision"] for s in rouge),
               "exact_match": max(exact_match(pred, r) for r in refs)}
        per.append(row)
    keys = ("rougeL_f1", "rougeL_recall", "rougeL_precision", "exact_match")
    summary = {"n": len(per), **{k: float(np.mean([p[k] for p in per])) for k in keys}}
    return per, summary


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


PROMPT_FORMATS = ("auto", "system", "user")


def _render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _takes_system_turn(tokenizer, record, with_context) -> bool:
    """Whether the chat template renders `record`'s system turn: it neither raises (Gemma's and Mistral's templates
    raise "System role not supported") nor drops the system text."""
    import jinja2  # lazy: transformers' chat-template engine, not a dependency of fa_jax's own

    messages = qa_messages(record, with_context)
    try:
        text = _render(tokenizer, messages)
    except (jinja2.TemplateError, ValueError, TypeError):
        return False
    return messages[0]["content"] in text


def chat_prompts(tokenizer, records, with_context: bool = False, prompt_format: str = "auto"):
    """The records' QA prompts rendered by the tokenizer's own chat template, ending in the assistant's generation
    prompt (`apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`): (texts, format used).

    prompt_format "system": `qa_messages`, RE-Adapt's Llama-3 form (the instruction as a system turn, the question
    as the user turn); "user": `qa_prompt` as one user turn, the Gemma/Mistral form; "auto": "system" when the
    template renders a system turn (tried on the first question record), else "user". The texts hold the template's
    special tokens (BOS, turn markers): tokenize them with add_special_tokens=False.
    """
    return _chat_prompts(tokenizer, *_located(records, with_context), with_context, prompt_format)


def _chat_prompts(tokenizer, wheres, records, with_context, prompt_format):
    import jinja2  # lazy: as in _takes_system_turn

    if prompt_format not in PROMPT_FORMATS:
        raise FaJaxError(f"prompt_format={prompt_format!r}: expected one of {', '.join(PROMPT_FORMATS)}")
    if not _has_chat_template(tokenizer):
        raise FaJaxError("the tokenizer has no chat template to render QA prompts with (give the model directory "
                         "the instruct model's tokenizer, e.g. fa-jax merge --tokenizer INSTRUCT_DIR, or chat=False)")
    if prompt_format == "auto":
        first = next((r for r in records if "question" in r), None)
        prompt_format = "system" if first and _takes_system_turn(tokenizer, first, with_context) else "user"
    texts = []
    for where, r in zip(wheres, records):
        messages = (qa_messages(r, with_context) if prompt_format == "system"
                    else [{"role": "user", "content": qa_prompt(r, with_context)}])
        try:
            texts.append(_render(tokenizer, messages))
        except (jinja2.TemplateError, ValueError, TypeError) as e:  # e.g. the template's raise_exception(...)
            first_line = (str(e).splitlines() or [type(e).__name__])[0]
            raise FaJaxError(f"{where}: the chat template rejects the {prompt_format!r} prompt format "
                             f"({first_line}); try prompt_format='auto'") from None
    return texts, prompt_format


def evaluate_qa(config, params, tokenizer, records, *, adapters=None, generate_fn=None, max_new_tokens: int = 64,
                with_context: bool = False, chat: bool | None = None, prompt_format: str = "auto",
                batch_size: int = 8, dtype=None, use_stemmer: bool = True, out_dir: str | None = None) -> dict:
    """Generate an answer for every record and score it (`score_records`); returns the summary.

    records: a JSON Lines path (`load_records`) or a list of record dicts. With a chat template (chat=None: when
    the tokenizer has one) the prompts are RE-Adapt's Appendix B formats rendered by that template
    (`chat_prompts`): prompt_format "auto" gives Llama-3 style templates the system-turn form (`qa_messages`) and
    templates that reject a system role (Gemma, Mistral) the one-user-turn form (`qa_prompt`); "system" / "user"
    force one. chat=False: the plain `qa_prompt` text, tokenized with the tokenizer's own special tokens.
    with_context: the retrieval-augmented formats. Generation is greedy, `max_new_tokens` at most, through
    `fa_jax.generate.generate_text` (or `generate_fn`, any callable with its signature, e.g. a fake in tests),
    which gets the rendered texts with chat=False and add_special_tokens=False (no second BOS).
    out_dir: also write `predictions.jsonl` (per example: the prompt as fed to the model, prediction, references
    and scores) and `summary.json` there, each atomically (temporary file, then rename). The summary holds "n",
    the mean "rougeL_f1", "rougeL_recall", "rougeL_precision", "exact_match" (0-1) and the settings used,
    "chat" and "prompt_format" ("system" or "user") among them.
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise FaJaxError(f"max_new_tokens={max_new_tokens!r}: expected an integer >= 1")
    if prompt_format not in PROMPT_FORMATS:
        raise FaJaxError(f"prompt_format={prompt_format!r}: expected one of {', '.join(PROMPT_FORMATS)}")
    wheres, records = _located(records, with_context)
    chat = _has_chat_template(tokenizer) if chat is None else bool(chat)
    if chat:
        prompts, prompt_format = _chat_prompts(tokenizer, wheres, records, with_context, prompt_format)
    elif prompt_format == "system":
        raise FaJaxError("prompt_format='system' needs the tokenizer's chat template (chat=False, or the tokenizer "
                         "has none): the system turn exists only in a chat")
    else:
        prompts, prompt_format = [qa_prompt(r, with_context) for r in records], "user"
    generate_fn = generate_fn or generate_text
    predictions = list(generate_fn(config, params, tokenizer, prompts, adapters=adapters,
                                   max_new_tokens=max_new_tokens, chat=False, add_special_tokens=not chat,
                                   batch_size=batch_size, dtype=dtype))
    per, summary = score_records(records, predictions, use_stemmer=use_stemmer)
    for row, prompt in zip(per, prompts):
        row["prompt"] = prompt
    summary.update({"with_context": bool(with_context), "chat": chat, "prompt_format": prompt_format,
                    "max_new_tokens": max_new_tokens, "use_stemmer": bool(use_stemmer)})
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        _write_atomic(os.path.join(out_dir, "predictions.jsonl"),
                      "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in per))
        _write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary


def _write_atomic(path: str, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path` (never a half-written file)."""
    write_text(path, text)
