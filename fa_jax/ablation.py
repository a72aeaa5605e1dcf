"""The seed's ablation at small scale: does a foundation adapter trained with KD + LM recover a pruned student?

    results = run_ablation("data/text/jargon.txt", "runs/demo")          # what `bash scripts/demo.sh` runs
    results = run_ablation(text, out, seeds=(0, 1, 2), keep_layers=[0, 1, 2, 3, 4, 5])   # several seeds, first 6 layers

The student is the teacher with layers removed (`keep_layers`: "every_other", the default; None, all of them, which
makes sense with a separate, smaller `student` model; or a list of layer indices, e.g. the first k), frozen, with
LoRA on its linear layers. Four models are compared on held-out documents (split off by document with `split_seed`,
never trained on, the same documents for every seed):

- (a) the pruned student alone,
- (b) + an adapter trained with the language-modelling loss only (continued pre-training, alpha = 0),
- (c) + an adapter trained with KD + LM (alpha = 0.5, the seed's setting),
- (c') the same, its KD term read from a top-`cache_k` teacher cache (`fa_jax.teacher_cache`; written by one teacher
  pass over the same rows, float16): the quality cost of keeping only the teacher's top tokens (cache_k None: no row),
- the teacher itself,

by held-out perplexity, KL(teacher || student) per token and teacher-student top-1 agreement, every held-out
document scored whole and on its own (`evaluate.TeacherReference` with per_document: documents packed into rows as
separate segments, a document over `seq_len` tokens cut every `seq_len` tokens; the teacher run once, its hidden
states kept), with a 95% bootstrap interval over documents for the per-token NLL and paired bootstrap intervals for the
NLL differences KD - CPT, CPT - pruned and KD - pruned (`fa_jax.stats`, documents weighted by their tokens). A third
metric neither loss optimises: a 4-way multiple-choice test from the held-out Jargon File glossary entries ("which
term does this definition belong to", `fa_jax.jargon`, scored by log-likelihood with `evaluate.MultipleChoice`),
accuracy with a bootstrap interval over items (chance 0.25); skipped with a note when the text has no glossary
entries whose definition is held out.

Each seed in `seeds` trains both adapters anew (the seed draws the adapter init and the data order); the held-out
documents, the multiple-choice items and the teacher's pass stay fixed, and the seed-independent rows (the pruned
student, the teacher) are scored once. results.json holds every seed's table with its intervals and the aggregate
(mean and standard deviation across seeds of every table metric); predictions.json the per-document sums (NLL, KL,
agreement, tokens) of every model and seed and the option log-likelihoods, chosen and right option of every
multiple-choice item, from which every number of the table can be recomputed; results.md the table.

Then the first seed's KD adapter is merged into the student at partial scales (`treemath.merge`, W = W_student +
s * scale * A @ B for s in 0 .. 1) and its LoRE spectrum is taken (`treemath.truncate`: how much of each matrix's
update a smaller rank explains); the LoRE at the first tau is scored too. These are scored on a spread-out part of
the held-out rows (`TeacherReference.subset`, about `sweep_rows` x `seq_len` tokens) to keep the run short.
Then the same seed's KD and CPT adapters are recombined (`merging`, `merge_steps` > 0): merged at fixed scales
(a, b) in `MERGE_GRID`, at one scale per adapter per layer learned with `tune_merge.ScaleTuner` on train documents
only (`tuning_documents`; the training objective, KL to the teacher + LM), and both (0.5, 0.5) and the learned scales
as one LoRA under the parameter budget of one adapter (`treemath.combine`), with paired NLL differences over the
held-out documents. Everything lands in `out_dir`: results.json, results.md, predictions.json, training_curves.png,
ablation.png, partial_adaptation.png, lore_spectrum.png, merge_scales.png, and per seed the two runs' own
directories (seed<N>/cpt, seed<N>/kd with metrics, checkpoint and the PEFT export).

The pieces are public so a notebook can run them one at a time: `prepare`, `train_adapter`, `reference`, `score`,
`glossary_items`, `mc_scorer`, `score_mc`, `model_row`, `partial_adaptation`, `lore_spectrum`, the `plot_*` functions,
`format_table` and `format_markdown`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fa_jax import data as data_lib
from fa_jax import evaluate, jargon, lora, precompute, run_config, stats, teacher_cache, train, treemath, tune_merge
from fa_jax import sharding as sh
from fa_jax.errors import FaJaxError
from fa_jax.evaluate import MultipleChoice, TeacherReference
from fa_jax.io.atomic import write_text
from fa_jax.metrics import read_history

SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
TAUS = (0.5, 0.75, 0.9)
MC_OPTIONS = 4
LORA_ALPHA = 16.0


def parse_keep_layers(value):
    """--keep-layers as `prepare` takes it: "every_other", "none" (None: every layer) or "i,j,..." (a list)."""
    text = str(value).strip()
    if text in ("every_other", "none"):
        return None if text == "none" else text
    try:
        keep = [int(i) for i in text.split(",")]
    except ValueError:
        keep = []
    if not keep or any(i < 0 for i in keep):
        raise FaJaxError(f"keep_layers={value!r}: expected 'every_other', 'none' or layer indices such as 0,1,2,3")
    return keep


def parse_seeds(value) -> list[int]:
    """--seeds "0,1,2" as a list of distinct integers >= 0."""
    try:
        seeds = [int(s) for s in str(value).split(",")]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise FaJaxError(f"seeds={value!r}: expected distinct integers >= 0 separated by commas, such as 0,1,2")
    return seeds


@dataclasses.dataclass
class Setup:
    """Models and documents of one ablation: the teacher, the pruned student (sharing the teacher's arrays), the
    tokenizer, the mesh, and the train / held-out documents."""
    mesh: object
    rules: tuple
    teacher_cfg: object
    teacher: dict
    student_cfg: object
    student: dict
    tokenizer: object
    train_docs: object
    held_out_docs: object
    teacher_path: str
    keep_layers: object
    student_path: str | None = None


def prepare(text, *, teacher: str = "embedded:smollm2-135m-instruct", student: str | None = None,
            keep_layers="every_other", held_out_fraction: float = 0.05, seed: int = 0, mesh_shape=(-1, 1, 1),
            text_split: str = "paragraph", min_words: int = 20, dtype: str = "float32") -> Setup:
    """Load the teacher, make the student (`student`, default the teacher's weights, with the layers `keep_layers`
    kept), and split `text` (any `data.load_documents` source) into train and held-out documents
    (`data.split_documents`, by document, with `seed`: keep it fixed and the held-out documents never change).

    Documents are unwrapped (every run of whitespace becomes one space: hard-wrapped, indented text files would
    otherwise spend much of the loss on predicting line breaks and indentation) and those under `min_words` words
    (headings, list items, one-line glossary entries) are dropped, so the comparison is on prose."""
    if isinstance(text, str) and not any(ch in text for ch in "*?[") and not os.path.exists(text):
        raise FaJaxError(f"text={text!r}: no such file; give any English text file (e.g. `bash scripts/fetch_text.sh` "
                         "fetches the Jargon File)")
    mesh = sh.make_mesh(list(mesh_shape))
    rules = sh.DEFAULT_RULES
    cfg = run_config.wrap(run_config.merge(train.pretrain_defaults(), {
        "model": {"teacher": teacher, "student": student, "keep_layers": keep_layers, "dtype": dtype}}, "ablation"))
    teacher_cfg, teacher_params, student_cfg, student_params, tokenizer = train.load_models(cfg, mesh, rules)
    docs = data_lib.load_documents(text, split=text_split)
    docs = docs.map(lambda d: {"text": " ".join(d["text"].split())}, desc="unwrap")
    docs = docs.filter(lambda d: len(d["text"].split()) >= int(min_words), desc=f"keep {min_words}+ words")
    if len(docs) < 2:
        raise FaJaxError(f"text={text!r}: {len(docs)} paragraphs of {min_words}+ words; the ablation needs prose to "
                         "train on and to hold out (lower min_words or give a longer text)")
    train_docs, held_out = data_lib.split_documents(docs, held_out_fraction, seed=seed)
    return Setup(mesh, rules, teacher_cfg, teacher_params, student_cfg, student_params, tokenizer, train_docs,
                 held_out, teacher, keep_layers, student)


def train_adapter(setup: Setup, out_dir: str, *, alpha: float, steps: int = 60, lr: float = 2e-3,
                  warmup_steps: int = 5, rank: int = 8, lora_alpha: float = LORA_ALPHA, targets="all-linear",
                  seq_len: int = 256, batch_size: int = 4, temperature: float = 1.0, chunk_size: int = 64,
                  remat: str | None = "full", seed: int = 0, log_every: int = 10, cache_k: int | None = None):
    """Train one adapter on the student with L = alpha * KD + (1 - alpha) * LM (alpha 0: no teacher in the step);
    returns (adapters, summary of `train.train_loop`). `out_dir` is this run's own directory: a previous run there
    is replaced. `seed` draws the adapter's init and the order of the training rows.

    cache_k: the KD term reads the teacher's top `cache_k` tokens per position (float16, `fa_jax.teacher_cache`)
    from a cache written first into out_dir/teacher_cache by one teacher pass over the same rows; the step then
    holds no teacher (as `fa-jax pretrain teacher.cache=DIR` after `fa-jax teacher-cache`)."""
    if os.path.isdir(out_dir):
        if not os.path.exists(os.path.join(out_dir, "config.json")):
            raise FaJaxError(f"{out_dir}: exists and is not a training run; choose another out_dir")
        shutil.rmtree(out_dir)
    cfg = run_config.wrap(run_config.merge(train.pretrain_defaults(), {
        "model": {"teacher": setup.teacher_path, "student": setup.student_path, "keep_layers": setup.keep_layers,
                  "remat": remat},
        "adapter": {"rank": rank, "alpha": lora_alpha, "targets": targets},
        "loss": {"alpha": alpha, "temperature": temperature, "chunk_size": chunk_size},
        "data": {"train": "(documents of the ablation)", "seq_len": seq_len, "batch_size": batch_size, "seed": seed},
        "optim": {"lr": lr, "warmup_steps": min(warmup_steps, steps - 1), "schedule": "cosine"},
        "mesh": {"shape": [int(n) for n in setup.mesh.devices.shape]},
        "run": {"steps": steps, "out_dir": out_dir, "seed": seed, "log_every": log_every, "save_every": 0,
                "resume": False},
    }, "ablation"))
    train.validate(cfg, setup.mesh)
    out_dir = train.prepare_out_dir(cfg)
    batches = train.RowStreams(setup.train_docs, setup.tokenizer, seq_len=seq_len, global_rows=batch_size, seed=seed,
                               add_bos=True, add_eos=True, on_error="skip", streaming=False, split="paragraph",
                               text_field="text")
    teacher_cfg, teacher = (setup.teacher_cfg, setup.teacher) if alpha > 0 else (None, None)
    if cache_k and alpha > 0:
        batches = _cached(setup, cfg, os.path.join(out_dir, "teacher_cache"), int(cache_k), batches)
        teacher_cfg, teacher = None, None
    summary = train.train_loop(cfg, setup.mesh, setup.rules, out_dir,
                               (teacher_cfg, teacher, setup.student_cfg, setup.student), batches,
                               desc=f"train alpha={alpha:g} seed {seed}")
    if summary["step"] < summary["steps"]:  # SIGTERM: the run saved its checkpoint and stopped; so does the ablation
        raise FaJaxError(f"{out_dir}: stopped at step {summary['step']} of {summary['steps']} (SIGTERM); the "
                         "ablation is incomplete")
    return summary.pop("adapters"), summary


def _cached(setup: Setup, cfg, cache_dir: str, k: int, batches):
    """A top-k cache of the run's rows, written by the teacher into `cache_dir`, and the run's batches reading it
    (a stream like `batches`, from its start)."""
    vocab = min(setup.student_cfg.vocab_size, setup.teacher_cfg.vocab_size)
    fn = precompute.topk_fn(setup.teacher_cfg, vocab, k, float(cfg.loss.temperature), int(cfg.loss.chunk_size),
                            None, setup.mesh, setup.rules)
    B = int(cfg.data.batch_size)
    row_dir = os.path.join(cache_dir, f"rows-{0:06d}-{B:06d}")
    os.makedirs(row_dir)
    precompute.write_rows(row_dir, fn, setup.teacher, batches, start=0, steps=int(cfg.run.steps), rows=B,
                          seq_len=int(cfg.data.seq_len), k=k, vocab=vocab, dtype="float16",
                          batch_sharding=sh.batch_sharding(setup.mesh, setup.rules))
    meta = precompute.new_meta(teacher_cache.identity(cfg, vocab), k, "float16")
    write_text(os.path.join(cache_dir, teacher_cache.META), json.dumps(meta, indent=2, default=str) + "\n")
    fresh = train.RowStreams(setup.train_docs, setup.tokenizer, seq_len=int(cfg.data.seq_len), global_rows=B,
                             seed=int(cfg.data.seed), add_bos=True, add_eos=True, on_error="skip", streaming=False,
                             split="paragraph", text_field="text")
    return teacher_cache.CachedBatches(fresh, teacher_cache.Cache(cache_dir), (0, B))


def reference(setup: Setup, *, seq_len: int = 256, batch_size: int = 4, max_rows: int | None = 16,
              per_document: bool = False, temperature: float = 1.0, chunk_size: int = 64):
    """The teacher's pass over the held-out documents (`evaluate.TeacherReference`): the first `max_rows` packed
    rows, or with per_document every document whole, in rows of its own (max_rows None)."""
    return TeacherReference(setup.teacher_cfg, setup.teacher, setup.tokenizer, setup.held_out_docs, seq_len=seq_len,
                            batch_size=batch_size, max_rows=None if per_document else max_rows,
                            temperature=temperature, chunk_size=chunk_size, per_document=per_document)


def score(setup: Setup, ref, adapters=None, params=None) -> dict:
    """{"perplexity", "kl", "top1_agreement", "nll", "tokens"} of the student (or `params`, a merged student);
    with a per-document reference also "per_document" ({"nll_sum", "kl_sum", "agreement_sum", "tokens"})."""
    out = ref.score(setup.student_cfg, setup.student if params is None else params, adapters=adapters)
    row = {"perplexity": out["perplexity"], "kl": out["kl"], "top1_agreement": out["top1_agreement"],
           "nll": out["student_nll"], "tokens": out["tokens"]}
    if "per_document" in out:
        row["per_document"] = out["per_document"]
    return row


def teacher_row(ref) -> dict:
    t = ref.teacher_metrics
    row = {"perplexity": t["perplexity"], "kl": 0.0, "top1_agreement": 1.0, "nll": t["nll"], "tokens": t["tokens"]}
    if ref.teacher_documents is not None:
        d = ref.teacher_documents
        row["per_document"] = {"nll_sum": d["nll_sum"], "kl_sum": np.zeros_like(d["nll_sum"]),
                               "agreement_sum": d["tokens"].astype(np.float64), "tokens": d["tokens"]}
    return row


def _plain(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "per_document"}


def partial_adaptation(setup: Setup, ref, adapters, scales=SCALES) -> list[dict]:
    """Score W = W_student + s * (adapter's delta) for each s, merged into dense weights by `treemath.merge`."""
    # A zero adapter adds nothing; with it and the student's own shardings the step compiled for scoring the
    # adapters serves the merged weights too.
    zero = _zero_like(adapters)
    return [{"scale": float(s), **_plain(_score_merged(setup, ref, zero, [(adapters, float(s))]))}
            for s in tqdm(scales, desc="partial adaptation", unit="scale", leave=False)]


def _zero_like(adapters):
    return jax.tree.map(lambda x: jax.device_put(jnp.zeros(x.shape, x.dtype), x.sharding), adapters)


def _score_merged(setup: Setup, ref, zero, adapters) -> dict:
    """`score` of the student with `adapters` ([(tree, scale), ...]) merged into its weights (`treemath.merge`),
    placed like the student's, through the all-zero adapter `zero` (the compiled step of the adapters' shapes)."""
    merged = jax.tree.map(lambda m, w: jax.device_put(m, w.sharding), treemath.merge(setup.student, adapters),
                          setup.student)
    return score(setup, ref, adapters=zero, params=merged)


def lore_spectrum(adapters, taus=TAUS) -> tuple[dict, dict]:
    """The KD adapter's singular values per matrix and, per tau, the LoRE's mean rank and parameter share of the
    LoRA it came from: ({"taus": {tau: {"mean_rank", "params", "share_of_lora"}}, "lora_params", ...}, report of
    `treemath.truncate` at the last tau, which holds the spectra)."""
    lora_params = sum(int(np.prod(m["lora_A"].shape)) + int(np.prod(m["lora_B"].shape))
                      for _, m in lora.iter_modules(adapters))
    _, report = treemath.truncate(adapters, tau=float(taus[-1]))  # one SVD per matrix; every tau reads its spectrum
    per_tau = {}
    for tau in taus:
        ranks = {p: treemath.rank_for_tau(np.asarray(m["spectrum"]), float(tau)) for p, m in report["modules"].items()}
        params = sum(k * sum(report["modules"][p]["shape"]) for p, k in ranks.items())
        per_tau[f"{float(tau):g}"] = {"mean_rank": float(np.mean(list(ranks.values()))),
                                      "min_rank": int(min(ranks.values())), "max_rank": int(max(ranks.values())),
                                      "params": int(params), "share_of_lora": params / lora_params}
    spectra = {p: [float(v) for v in np.asarray(m["spectrum"])] for p, m in report["modules"].items()}
    return {"taus": per_tau, "lora_params": lora_params, "modules": len(spectra), "spectra": spectra}, report


# ------------------------------------------------------------------------------------------- merging the adapters

MERGE_GRID = ((1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.0, 0.5), (0.5, 1.0), (1.0, 1.0))


def tuning_documents(setup: Setup, count: int = 64):
    """The probe documents `fa-jax tune-merge` learns its scales on: the last `count` train documents (never a
    held-out one)."""
    n = len(setup.train_docs)
    return setup.train_docs.select(range(max(0, n - int(count)), n))


def merging(setup: Setup, ref, kd, cpt, *, seq_len: int = 256, batch_size: int = 4, rows: int = 16,
            steps: int = 30, lr: float = 0.05, kd_alpha: float = 0.5, grid=MERGE_GRID, budget: int | None = None,
            bootstrap_kw=None) -> dict:
    """The KD and CPT adapters recombined, scored on `ref`'s rows (per document):

    - fixed scales: W = W_student + a * delta_KD + b * delta_CPT for each (a, b) in `grid` (`treemath.merge`);
    - learned scales: one per adapter per layer (`tune_merge.ScaleTuner`, from 0.5 / 0.5), fitted on `rows` rows of
      train documents (`tuning_documents`) with the training objective, kd_alpha * KL(teacher || merged) +
      (1 - kd_alpha) * CE, for `steps` Adam steps;
    - each of (0.5, 0.5) and the learned scales as one LoRA under one parameter `budget` (`treemath.combine`;
      default: the parameters of one of the two adapters), merged into the weights to score.

    Returns {"fixed": [...], "learned": {...}, "as_lora": {...}, "differences": paired NLL differences over
    documents, "per_document": {name: sums}}."""
    boot = bootstrap_kw or {}
    zero = _zero_like(kd)
    per_doc = {}

    def scored(name, adapters):
        row = _score_merged(setup, ref, zero, adapters)
        per_doc[name] = row.pop("per_document", None)
        return row

    fixed = []
    for a, b in tqdm(grid, desc="merge grid", unit="merge", leave=False):
        fixed.append({"kd": a, "cpt": b, **scored(f"fixed {a:g}/{b:g}", [(kd, a), (cpt, b)])})
    docs = tuning_documents(setup, 4 * rows)
    probe = [b for b, _ in zip(evaluate.packed_batches(setup.tokenizer, docs, seq_len, batch_size, True, True, "text",
                                                 "paragraph"), range(-(-rows // batch_size)))]
    t0 = time.perf_counter()
    tuner = tune_merge.ScaleTuner(setup.student_cfg, setup.student, [kd, cpt], probe,
                                  target=(setup.teacher_cfg, setup.teacher), kl_weight=kd_alpha,
                                  lm_weight=1.0 - kd_alpha, init=(0.5, 0.5))
    before = tuner.loss(tuner.initial())
    fit = tuner.fit(steps=steps, lr=lr)
    after = tuner.loss(fit["scales"])
    seconds = time.perf_counter() - t0
    learned_scales = tuner.scale_dicts(fit["scales"])
    del tuner
    learned = {"scales": {"kd": learned_scales[0]["layers"], "cpt": learned_scales[1]["layers"]},
               "objective_before": before, "objective_after": after, "history": fit["history"],
               "batches_per_pass": fit["batches_per_pass"], "steps": steps,
               "lr": lr, "probe_rows": sum(int(b["tokens"].shape[0]) for b in probe), "probe_documents": len(docs),
               "seconds": round(seconds, 1), **scored("learned", [(kd, learned_scales[0]), (cpt, learned_scales[1])])}
    if budget is None:
        budget = sum(int(np.prod(m["lora_A"].shape)) + int(np.prod(m["lora_B"].shape))
                     for _, m in lora.iter_modules(kd))
    as_lora = {"budget": int(budget)}
    for name, scales in (("fixed 0.5/0.5", (0.5, 0.5)), ("learned", learned_scales)):
        combined, report = treemath.combine(list(zip((kd, cpt), scales)), budget=int(budget))
        ranks = list(report["rank_pattern"].values())
        as_lora[name] = {"params": report["params"], "min_rank": min(ranks, default=0),
                         "max_rank": max(ranks, default=0), "modules": len(ranks),
                         **scored(f"{name} as one LoRA", [(combined, 1.0)])}
    best = min(fixed, key=lambda r: r["nll"])
    best_name = f"fixed {best['kd']:g}/{best['cpt']:g}"
    pairs = [("learned - fixed 0.5/0.5", "learned", "fixed 0.5/0.5"),
             (f"learned - best fixed ({best_name[6:]})", "learned", best_name),
             ("learned - KD alone", "learned", "fixed 1/0"),
             ("fixed 0.5/0.5 as one LoRA - fixed 0.5/0.5", "fixed 0.5/0.5 as one LoRA", "fixed 0.5/0.5"),
             ("learned as one LoRA - learned", "learned as one LoRA", "learned")]
    diffs = differences(per_doc, pairs, **boot) if all(per_doc.values()) else {}
    return {"fixed": fixed, "learned": learned, "as_lora": as_lora, "differences": diffs,
            "best_fixed": best_name, "per_document": per_doc}


def format_merging(merge: dict, seed: int = 0) -> str:
    """The merging study as text: fixed and learned scales, both as one LoRA, and the paired NLL differences."""
    rows = {f"KD {r['kd']:g} + CPT {r['cpt']:g}": r for r in merge["fixed"]}
    learned = merge["learned"]
    kd, cpt = np.asarray(learned["scales"]["kd"]), np.asarray(learned["scales"]["cpt"])
    rows[f"learned (KD {kd.min():.2f}..{kd.max():.2f}, CPT {cpt.min():.2f}..{cpt.max():.2f})"] = learned
    b = merge["as_lora"]["budget"]
    for name in ("fixed 0.5/0.5", "learned"):
        r = merge["as_lora"][name]
        rows[f"{name}, one LoRA (ranks {r['min_rank']}..{r['max_rank']})"] = r
    out = [f"\nthe KD and CPT adapters merged (seed {seed}, same rows as the partial adaptation); scales learned on "
           f"{learned['probe_rows']} train rows in {learned['steps']} steps ({learned['seconds']:.0f} s): objective "
           f"{learned['objective_before']['loss']:.4f} -> {learned['objective_after']['loss']:.4f}; one LoRA: "
           f"budget {b:,} parameters (one adapter's)",
           format_table(rows, "merge")]
    if merge["differences"]:
        out.append("paired ΔNLL over held-out documents, 95% interval: " + "; ".join(
            f"{k} {stats.format_interval(v, signed=True)}" for k, v in merge["differences"].items()))
    return "\n".join(out)


def plot_merge_scales(merge: dict, path: str) -> str:
    """The learned scales of the KD and CPT adapters against the student's layer, with the tuning loss."""
    learned = merge["learned"]
    result = {"adapters": [{"name": f"{k.upper()} adapter", "init": 0.5, "layers": v}
                           for k, v in learned["scales"].items()],
              "history": learned["history"], "batches_per_pass": learned.get("batches_per_pass"),
              "before": learned["objective_before"],
              "after": learned["objective_after"]}
    return tune_merge.plot_scales(result, path)


# ------------------------------------------------------------------------------------------- multiple choice


def glossary_items(setup: Setup, text, *, max_items: int | None = 100, seed: int = 0) -> tuple[list[dict], str | None]:
    """(items, None), the multiple-choice items of the held-out glossary entries of `text` (`jargon` module), or
    ([], why there are none)."""
    if not (isinstance(text, str) and os.path.isfile(text)):
        return [], "multiple-choice test skipped: the text is not one Jargon File (no glossary entries to ask about)"
    entries = jargon.glossary_entries(text)
    if not entries:
        return [], f"multiple-choice test skipped: {os.path.basename(text)} has no Jargon File glossary entries"
    items = jargon.multiple_choice_items(entries, setup.held_out_docs["text"], setup.train_docs["text"],
                                         max_items=max_items, n_options=MC_OPTIONS, seed=seed)
    if not items:
        return [], "multiple-choice test skipped: no glossary entry's definition paragraph is a held-out document"
    return items, None


def mc_scorer(setup: Setup, items: list[dict], batch_size: int = 16):
    """`evaluate.MultipleChoice` over the items: each option scored as the continuation term + closing quote."""
    return MultipleChoice(setup.tokenizer, [it["prompt"] for it in items],
                          [[o + jargon.MC_CLOSE for o in it["options"]] for it in items], batch_size=batch_size)


def score_mc(scorer, items: list[dict], config, params, adapters=None) -> dict:
    """Per item: "logprob" and "tokens" of each option, "chosen" (argmax of the summed log-likelihood),
    "chosen_per_token" (argmax per token), "answer" (the right option) and "correct" (chosen == answer)."""
    out = scorer.score(config, params, adapters=adapters)
    answer = np.array([it["answer"] for it in items], np.int64)
    chosen = np.argmax(out["logprob"], axis=1)
    return {"logprob": out["logprob"], "tokens": out["tokens"], "chosen": chosen,
            "chosen_per_token": np.argmax(out["logprob"] / out["tokens"], axis=1), "answer": answer,
            "correct": (chosen == answer).astype(np.float64)}


# ------------------------------------------------------------------------------------------------ statistics


def model_row(per_document: dict, mc: dict | None = None, **bootstrap_kw) -> dict:
    """One model's table row from its per-document sums (and multiple-choice scores): "nll" (per token), its
    bootstrap interval "nll_ci" over documents (weights: tokens), "perplexity", "kl", "top1_agreement", "tokens",
    "documents", and "mc_accuracy" (an interval over items) and "mc_accuracy_per_token" where there is a test."""
    t = np.asarray(per_document["tokens"])
    keep = t > 0
    n = float(t.sum())
    nll = float(np.sum(per_document["nll_sum"]) / n)
    row = {"nll": nll, "perplexity": math.exp(nll), "kl": float(np.sum(per_document["kl_sum"]) / n),
           "top1_agreement": float(np.sum(per_document["agreement_sum"]) / n), "tokens": int(n),
           "documents": int(keep.sum()),
           "nll_ci": stats.bootstrap(np.asarray(per_document["nll_sum"])[keep], weights=t[keep], **bootstrap_kw)}
    if mc is not None:
        row["mc_accuracy"] = stats.bootstrap(mc["correct"], **bootstrap_kw)
        row["mc_accuracy_per_token"] = float(np.mean(mc["chosen_per_token"] == mc["answer"]))
    return row


def differences(per_document: dict, pairs, **bootstrap_kw) -> dict:
    """{"A - B": paired bootstrap of the per-token NLL difference over documents} for each (label, A, B) in
    pairs, A and B naming entries of `per_document` ({model: per-document sums})."""
    out = {}
    for label, a, b in pairs:
        t = np.asarray(per_document[a]["tokens"])
        if not np.array_equal(t, per_document[b]["tokens"]):
            raise FaJaxError(f"{a} and {b} were scored on different tokens; a paired comparison needs the same")
        keep = t > 0
        out[label] = stats.paired_bootstrap(np.asarray(per_document[a]["nll_sum"])[keep],
                                            np.asarray(per_document[b]["nll_sum"])[keep], weights=t[keep],
                                            **bootstrap_kw)
    return out


TABLE_METRICS = ("nll", "perplexity", "kl", "top1_agreement", "mc_accuracy")


def _value(x):
    return x["estimate"] if isinstance(x, dict) else x


def aggregate(per_seed: list[dict]) -> dict:
    """Mean and standard deviation across seeds (`stats.across_seeds`) of every table metric, NLL difference,
    multiple-choice difference and share of the KL gap closed."""
    first = per_seed[0]
    models = {name: {m: stats.across_seeds([_value(s["models"][name][m]) for s in per_seed])
                     for m in TABLE_METRICS if m in row} for name, row in first["models"].items()}
    out = {"seeds": [s["seed"] for s in per_seed], "models": models}
    for key in ("differences", "mc_differences", "kl_gap_closed"):
        out[key] = {k: stats.across_seeds([_value(s[key][k]) for s in per_seed]) for k in first.get(key, {})}
    return out


# ------------------------------------------------------------------------------------------------------ output

VARIANTS = ("pruned student", "+ CPT adapter (alpha 0)", "+ CPT+KD adapter (alpha 0.5)", "teacher")
DIFFERENCES = ("KD - CPT", "CPT - pruned", "KD - pruned")
CACHE_DIFFERENCES = ("KD cache - KD", "KD cache - pruned")  # the cached KD row against the live one, the pruned


def cached_name(k: int, kd_alpha: float = 0.5) -> str:
    """The table's name of the KD adapter trained from a top-k teacher cache."""
    return f"+ CPT+KD adapter, top-{k} teacher cache (alpha {kd_alpha:g})"


def format_table(rows: dict, key_name: str = "model") -> str:
    """A plain-text table of {name: {"perplexity", "kl", "top1_agreement"}}."""
    width = max(len(key_name), *(len(str(k)) for k in rows))
    lines = [f"{key_name:<{width}}  {'held-out ppl':>12}  {'KL(T||S)':>9}  {'top-1 agree':>11}",
             "-" * (width + 38)]
    for name, r in rows.items():
        lines.append(f"{str(name):<{width}}  {r['perplexity']:>12.2f}  {r['kl']:>9.3f}  {r['top1_agreement']:>11.3f}")
    return "\n".join(lines)


def _ppl(v: float) -> str:
    return f"{v:,.0f}" if v >= 1000 else f"{v:.1f}"


def _negated(ci: dict) -> dict:
    return {**ci, "estimate": -ci["estimate"], "lo": -ci["hi"], "hi": -ci["lo"]}


def _spread(agg: dict, digits: int, signed: bool = False, fmt=None) -> str:
    if fmt is not None:
        return f"{fmt(agg['mean'])} ± {fmt(agg['std'])}"
    return f"{agg['mean']:{'+' if signed else ''}.{digits}f} ± {agg['std']:.{digits}f}"


def format_markdown(results: dict) -> str:
    """The table of `run_ablation`'s results as Markdown, with a caption: per model the held-out NLL (nats per
    token) and perplexity, KL, top-1 agreement, multiple-choice accuracy and the NLL differences against the other
    adapter and against the pruned student. One seed: the value and its 95% bootstrap interval; several: mean ±
    standard deviation across seeds, each seed's intervals listed below the table."""
    seeds, setting = results["seeds"], results["setting"]
    names = list(seeds[0]["models"])
    mc = results.get("multiple_choice") or {}
    has_mc = "mc_accuracy" in seeds[0]["models"][names[0]]
    level = f"{100 * setting['bootstrap']['level']:g}%"
    head = ["model", f"held-out NLL [{level} CI]" if len(seeds) == 1 else "held-out NLL", "perplexity",
            "KL(T‖S)", "top-1 agreement"]
    head += [f"MC accuracy [{level} CI]" if len(seeds) == 1 else "MC accuracy"] if has_mc else []
    ci = f" [{level} CI]" if len(seeds) == 1 else ""
    head += [f"ΔNLL vs the other adapter{ci}", f"ΔNLL vs the pruned student{ci}"]
    other = {names[1]: ("KD - CPT", True), names[2]: ("KD - CPT", False)}
    vs_pruned = {names[1]: "CPT - pruned", names[2]: "KD - pruned"}
    cached = CACHE_DIFFERENCES[0] in seeds[0]["differences"]
    if cached:  # the cached KD row: against the live-teacher KD adapter
        other[names[3]] = (CACHE_DIFFERENCES[0], False)
        vs_pruned[names[3]] = CACHE_DIFFERENCES[1]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    if len(seeds) == 1:
        s = seeds[0]
        for name in names:
            r = s["models"][name]
            cells = [name, stats.format_interval(r["nll_ci"]), _ppl(r["perplexity"]), f"{r['kl']:.3f}",
                     f"{r['top1_agreement']:.3f}"]
            cells += [stats.format_interval(r["mc_accuracy"], 2)] if has_mc else []
            if name in other:
                label, flip = other[name]
                d = s["differences"][label]
                cells.append(stats.format_interval(_negated(d) if flip else d, signed=True))
                cells.append(stats.format_interval(s["differences"][vs_pruned[name]], signed=True))
            else:
                cells += ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
    else:
        agg = results["aggregate"]
        for name in names:
            a = agg["models"][name]
            cells = [name, _spread(a["nll"], 3), _spread(a["perplexity"], 0, fmt=_ppl), _spread(a["kl"], 3),
                     _spread(a["top1_agreement"], 3)]
            cells += [_spread(a["mc_accuracy"], 2)] if has_mc else []
            if name in other:
                label, flip = other[name]
                d = agg["differences"][label]
                d = {**d, "mean": -d["mean"]} if flip else d
                cells += [_spread(d, 3, signed=True), _spread(agg["differences"][vs_pruned[name]], 3, signed=True)]
            else:
                cells += ["", ""]
            lines.append("| " + " | ".join(cells) + " |")
    caption = [f"Held-out: {setting['documents']['held_out']} documents, {seeds[0]['models'][names[0]]['tokens']} "
               "tokens, each document scored whole; NLL in nats per token (perplexity = exp NLL). ΔNLL: the row's "
               "per-token NLL minus the other adapter's (the pruned student's), paired by document; negative = lower."
               + (f" The top-{setting.get('cache_k')} cache row's other adapter is the live-teacher KD adapter: its "
                  "ΔNLL is the quality cost of keeping only the teacher's top tokens." if cached else "")]
    if has_mc:
        caption.append(f"MC accuracy: which of {MC_OPTIONS} terms a held-out glossary definition belongs to, by "
                       f"log-likelihood; {mc.get('items')} items, chance {1 / MC_OPTIONS:.2f}.")
    elif mc.get("note"):
        caption.append(mc["note"] + ".")
    caption.append(f"Intervals: {level} percentile bootstrap over documents (MC: items), "
                   f"{setting['bootstrap']['n_resamples']:,} resamples." if len(seeds) == 1 else
                   f"{len(seeds)} seeds ({', '.join(str(s['seed']) for s in seeds)}): mean ± standard deviation "
                   "across seeds; the held-out documents and MC items are the same for every seed.")
    out = " ".join(caption) + "\n\n" + "\n".join(lines) + "\n"
    if results.get("merging"):
        out += "\n```" + format_merging(results["merging"], setting["seeds"][0]) + "\n```\n"
    if len(seeds) > 1:
        out += f"\nPer seed, {level} bootstrap intervals:\n\n"
        short = dict(zip(names, ("pruned", "CPT", "KD", "KD cache", "teacher") if cached else
                         ("pruned", "CPT", "KD", "teacher")))
        for s in seeds:
            line = "; ".join(f"{k} {stats.format_interval(s['differences'][k], signed=True)}"
                             for k in DIFFERENCES + (CACHE_DIFFERENCES if cached else ()))
            if has_mc:
                line += "; MC accuracy " + ", ".join(
                    f"{short[n]} {stats.format_interval(s['models'][n]['mc_accuracy'], 2)}" for n in names)
            out += f"- seed {s['seed']}: ΔNLL {line}\n"
    return out


def _plt():
    import matplotlib  # lazy: about a second to import, needed for the plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(histories: dict, path: str) -> str:
    """Training curves of the runs: the LM loss (both) and the KD term (where there is one)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, hist in histories.items():
        for key, style in (("lm", "-"), ("kd", "--")):
            pts = [(r["step"], r[key]) for r in hist if key in r and (key != "kd" or r.get("kd", 0) > 0)]
            if pts:
                ax.plot(*zip(*pts), style, marker=".", label=f"{name}: {key}")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token (training rows)")
    ax.set_title("training: LM cross-entropy and KL(teacher || student)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ablation(rows: dict, path: str) -> str:
    """Bars of held-out perplexity, KL and top-1 agreement for each model."""
    plt = _plt()
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, (key, label) in zip(axes, (("perplexity", "held-out perplexity (log scale)"),
                                       ("kl", "KL(teacher || student), nats"),
                                       ("top1_agreement", "top-1 agreement with the teacher"))):
        vals = [rows[n][key] for n in names]
        colors = ["#999999", "#6699cc", "#cc6633"] + ["#e0a060"] * (len(names) - 4) + ["#339966"]
        bars = ax.bar(range(len(names)), vals, color=colors[: len(names)])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(names)), [textwrap.fill(n, 14) for n in names], fontsize=7)
        ax.set_title(label, fontsize=9)
        if key == "perplexity":
            ax.set_yscale("log")
    fig.suptitle("held-out text: the pruned student, its adapters, the teacher")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_partial(sweep: list[dict], teacher: dict, path: str) -> str:
    """Held-out metrics against the merge scale s, with the teacher's value as a line."""
    plt = _plt()
    s = [r["scale"] for r in sweep]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, label) in zip(axes, (("perplexity", "held-out perplexity"), ("kl", "KL(teacher || student)"),
                                       ("top1_agreement", "top-1 agreement"))):
        ax.plot(s, [r[key] for r in sweep], marker="o")
        ax.axhline(teacher[key], color="#339966", ls="--", lw=1, label="teacher")
        ax.set_xlabel("merge scale s of the KD adapter")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        if key == "perplexity":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("partial adaptation: W = W_student + s * delta_KD (treemath.merge)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_spectrum(report, path: str) -> str:
    """Explained variance against rank for a few of the adapter's matrices (`treemath.plot_explained_variance`)."""
    return treemath.plot_explained_variance(report, path, taus=TAUS)


# ------------------------------------------------------------------------------------------------------ the run


def _lists(d: dict) -> dict:
    return {k: np.asarray(v).tolist() for k, v in d.items()}


def run_ablation(text, out_dir: str = "runs/demo", *, teacher: str = "embedded:smollm2-135m-instruct",
                 student: str | None = None, keep_layers="every_other", steps: int = 45, lr: float = 2e-3,
                 rank: int = 8, seq_len: int = 256, batch_size: int = 4, kd_alpha: float = 0.5,
                 held_out_fraction: float = 0.05, sweep_rows: int = 16, min_words: int = 20, scales=SCALES,
                 taus=TAUS, seeds=(0,), split_seed: int = 0, mc_items: int | None = 100,
                 n_resamples: int = stats.N_RESAMPLES, mesh_shape=(-1, 1, 1), cache_k: int | None = 64,
                 merge_steps: int = 30, merge_rows: int = 16) -> dict:
    """The whole ablation (module docstring); prints the tables and returns what results.json holds.
    cache_k: also train the KD adapter from a top-`cache_k` teacher cache (a row beside the live-teacher KD row;
    None: not). merge_steps: the first seed's KD and CPT adapters recombined (`merging`: fixed scales, scales
    learned on `merge_rows` train rows in `merge_steps` steps, and both as one LoRA under one budget; 0: not)."""
    seeds = parse_seeds(seeds if isinstance(seeds, (str, int)) else ",".join(map(str, seeds)))
    # checked before anything trains
    if not isinstance(sweep_rows, int) or sweep_rows < 1:
        raise FaJaxError(f"sweep_rows={sweep_rows!r}: expected an integer >= 1")
    for name, value, low in (("merge_steps", merge_steps, 0), ("merge_rows", merge_rows, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise FaJaxError(f"{name}={value!r}: expected an integer >= {low}")
    if mc_items is not None and (not isinstance(mc_items, int) or mc_items < 1):
        raise FaJaxError(f"mc_items={mc_items!r}: expected an integer >= 1 (or None for every eligible entry)")
    t0 = time.perf_counter()
    seconds = {}
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    boot_kw = {"n_resamples": int(n_resamples), "level": stats.LEVEL, "seed": 0}

    def lap(name, start):
        seconds[name] = round(time.perf_counter() - start, 1)
        return time.perf_counter()

    setup = prepare(text, teacher=teacher, student=student, keep_layers=keep_layers,
                    held_out_fraction=held_out_fraction, seed=split_seed, mesh_shape=mesh_shape, min_words=min_words)
    print(f"teacher: {teacher} ({setup.teacher_cfg.num_hidden_layers} layers, "
          f"{setup.teacher_cfg.num_params / 1e6:.1f}M parameters); student: {student or 'the teacher'}, layers "
          f"{keep_layers if keep_layers is not None else 'all'} ({setup.student_cfg.num_hidden_layers} layers, "
          f"{setup.student_cfg.num_params / 1e6:.1f}M), frozen, LoRA r {rank} on all linear layers")
    print(f"documents: {len(setup.train_docs)} train, {len(setup.held_out_docs)} held out (split by document, "
          f"split seed {split_seed}); training seeds {', '.join(map(str, seeds))}")
    items, mc_note = glossary_items(setup, text, max_items=mc_items, seed=split_seed)
    print(f"multiple choice: {len(items)} items from held-out glossary entries, {MC_OPTIONS} options"
          if items else mc_note)
    t = lap("load", t0)

    # Seed-independent: the teacher's pass, and the pruned student and the teacher on every document and item.
    ref = reference(setup, seq_len=seq_len, batch_size=batch_size, per_document=True)
    scorer = mc_scorer(setup, items) if items else None
    layers = (setup.student_cfg.num_hidden_layers, setup.teacher_cfg.num_hidden_layers)
    names = [f"pruned student ({layers[0]} of {layers[1]} layers)", VARIANTS[1],
             f"+ CPT+KD adapter (alpha {kd_alpha:g})"]
    names += [cached_name(cache_k, kd_alpha)] if cache_k else []
    names += [VARIANTS[3]]
    teacher_name = names[-1]
    # The pruned student through an adapter with B = 0 (it adds exactly nothing): the adapters' compiled steps.
    blank = lora.init_lora(setup.student_cfg, jax.random.PRNGKey(0), rank=rank, alpha=LORA_ALPHA)
    blank = jax.device_put(blank, sh.tree_shardings(setup.student_cfg, blank, setup.mesh, setup.rules))
    fixed = {names[0]: score(setup, ref, adapters=blank), teacher_name: teacher_row(ref)}
    fixed_mc = {}
    if scorer is not None:
        fixed_mc[names[0]] = score_mc(scorer, items, setup.student_cfg, setup.student, blank)
        fixed_mc[teacher_name] = score_mc(scorer, items, setup.teacher_cfg, setup.teacher)
    t = lap("reference", t)

    kw = dict(steps=steps, lr=lr, rank=rank, seq_len=seq_len, batch_size=batch_size)
    per_seed, predictions, adapters_of, cpt_of, histories = [], [], {}, {}, {}
    for seed in seeds:
        run_dir = os.path.join(out_dir, f"seed{seed}")
        cpt, cpt_summary = train_adapter(setup, os.path.join(run_dir, "cpt"), alpha=0.0, seed=seed, **kw)
        t = lap(f"seed {seed}: train CPT", t)
        kd, kd_summary = train_adapter(setup, os.path.join(run_dir, "kd"), alpha=kd_alpha, seed=seed, **kw)
        t = lap(f"seed {seed}: train KD", t)
        trained = [(names[1], cpt), (names[2], kd)]
        if cache_k:
            kd_cached, cached_summary = train_adapter(setup, os.path.join(run_dir, "kd_cache"), alpha=kd_alpha,
                                                      seed=seed, cache_k=cache_k, **kw)
            trained.append((names[3], kd_cached))
            t = lap(f"seed {seed}: teacher cache + train KD from it", t)
        scores, mc_scores = dict(fixed), dict(fixed_mc)
        for name, adapters in trained:
            scores[name] = score(setup, ref, adapters=adapters)
            if scorer is not None:
                mc_scores[name] = score_mc(scorer, items, setup.student_cfg, setup.student, adapters)
        t = lap(f"seed {seed}: evaluate", t)
        docs = {n: scores[n]["per_document"] for n in names}
        rows = {n: model_row(docs[n], mc_scores.get(n), **boot_kw) for n in names}
        gap = rows[names[0]]["kl"]
        pairs = [("KD - CPT", names[2], names[1]), ("CPT - pruned", names[1], names[0]),
                 ("KD - pruned", names[2], names[0])]
        pairs += [(CACHE_DIFFERENCES[0], names[3], names[2]), (CACHE_DIFFERENCES[1], names[3], names[0])] \
            if cache_k else []
        result = {"seed": seed, "models": rows,
                  "differences": differences(docs, pairs, **boot_kw),
                  "kl_gap_closed": {n: 1.0 - rows[n]["kl"] / gap if gap else 0.0 for n in names[1:-1]},
                  "runs": {"cpt": cpt_summary.get("out_dir"), "kd": kd_summary.get("out_dir"),
                           "kd_peft_adapter": kd_summary.get("peft_adapter")}}
        if cache_k:
            result["runs"].update(kd_cache=cached_summary.get("out_dir"),
                                  kd_cache_peft_adapter=cached_summary.get("peft_adapter"))
        if scorer is not None:
            result["mc_differences"] = {"KD - CPT": stats.paired_bootstrap(
                mc_scores[names[2]]["correct"], mc_scores[names[1]]["correct"], **boot_kw)}
        per_seed.append(result)
        predictions.append({"seed": seed, "documents": {n: _lists({k: docs[n][k] for k in
                                                                  ("nll_sum", "tokens", "kl_sum", "agreement_sum")})
                                                        for n in names},
                            "mc": {n: _lists({k: m[k] for k in ("logprob", "tokens", "chosen", "chosen_per_token")})
                                   for n, m in mc_scores.items()}})
        adapters_of[seed] = kd
        cpt_of[seed] = cpt
        histories[f"CPT (alpha 0), seed {seed}"] = _history(cpt_summary)
        histories[f"CPT+KD (alpha {kd_alpha:g}), seed {seed}"] = _history(kd_summary)
        if cache_k:
            histories[f"CPT+KD from a top-{cache_k} cache, seed {seed}"] = _history(cached_summary)

    # The first seed's KD adapter: partial merges and its LoRE, on a spread-out part of the held-out rows.
    sub = ref.subset(int(sweep_rows) * int(seq_len))
    kd = adapters_of[seeds[0]]
    sweep = partial_adaptation(setup, sub, kd, scales)
    t = lap("partial adaptation", t)
    spectrum, report = lore_spectrum(kd, taus)
    lore, _ = treemath.truncate(kd, tau=float(taus[0]))
    lore_row = _plain(score(setup, sub, adapters=lore))
    t = lap("lore", t)
    merge = None
    if merge_steps:
        merge = merging(setup, sub, kd, cpt_of[seeds[0]], seq_len=seq_len, batch_size=batch_size, rows=merge_rows,
                        steps=merge_steps, kd_alpha=kd_alpha, bootstrap_kw=boot_kw)
        t = lap("merging", t)

    agg = aggregate(per_seed)
    means = {n: {m: agg["models"][n][m]["mean"] for m in ("perplexity", "kl", "top1_agreement")} for n in names}
    plots = {
        "training_curves": plot_training(histories, os.path.join(out_dir, "training_curves.png")),
        "ablation": plot_ablation(means, os.path.join(out_dir, "ablation.png")),
        "partial_adaptation": plot_partial(sweep, _plain(teacher_row(sub)),
                                           os.path.join(out_dir, "partial_adaptation.png")),
        "lore_spectrum": plot_spectrum(report, os.path.join(out_dir, "lore_spectrum.png")),
    }
    if merge is not None:
        plots["merge_scales"] = plot_merge_scales(merge, os.path.join(out_dir, "merge_scales.png"))
    seconds["total"] = round(time.perf_counter() - t0, 1)
    held_texts = list(setup.held_out_docs["text"])
    results = {
        "setting": {"teacher": teacher, "student": student, "keep_layers": keep_layers,
                    "student_layers": setup.student_cfg.num_hidden_layers, "rank": rank, "steps": steps, "lr": lr,
                    "seq_len": seq_len, "batch_size": batch_size, "kd_alpha": kd_alpha, "seeds": seeds,
                    "cache_k": cache_k,
                    "split_seed": split_seed, "min_words": min_words,
                    "train_tokens_per_run": steps * seq_len * batch_size, "text": str(text),
                    "documents": {"train": len(setup.train_docs), "held_out": len(setup.held_out_docs)},
                    "held_out_rows": ref.rows, "held_out_tokens": ref.teacher_metrics["tokens"],
                    "bootstrap": boot_kw, "devices": f"{jax.device_count()} x {jax.devices()[0].platform}"},
        "seeds": per_seed,
        "aggregate": agg,
        "multiple_choice": {"items": len(items), "options": MC_OPTIONS, "chance": 1 / MC_OPTIONS,
                            "max_items": mc_items, "prompt": jargon.MC_PROMPT, "close": jargon.MC_CLOSE,
                            "note": mc_note},
        "partial_adaptation": sweep,
        "partial_adaptation_rows": {"seed": seeds[0], "rows": sub.rows, "tokens": sub.teacher_metrics["tokens"],
                                    "teacher": _plain(teacher_row(sub))},
        "lore": {**spectrum, "scored_tau": float(taus[0]), "scored": lore_row},
        "merging": None if merge is None else {k: v for k, v in merge.items() if k != "per_document"},
        "predictions": os.path.join(out_dir, "predictions.json"),
        "plots": plots,
        "seconds": seconds,
    }
    write_text(os.path.join(out_dir, "predictions.json"), json.dumps({
        "held_out_documents": held_texts,
        "mc_items": [{k: it[k] for k in ("term", "definition", "prompt", "options", "answer")} for it in items],
        "seeds": predictions}))
    write_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=2, default=float))
    table = format_markdown(results)
    write_text(os.path.join(out_dir, "results.md"), table)
    print()
    print(table)
    print("share of the pruned student's KL gap to the teacher closed: " +
          ", ".join(f"{n.split('(')[0].strip(' +')} {100 * v['mean']:.0f}%" for n, v in agg["kl_gap_closed"].items()))
    print(f"\npartial adaptation of the KD adapter (seed {seeds[0]}, treemath.merge; {sub.rows} of the held-out rows, "
          f"{sub.teacher_metrics['tokens']} tokens):")
    print(format_table({f"s = {r['scale']:g}": r for r in sweep}, "scale"))
    shares = ", ".join(f"tau {k}: mean rank {v['mean_rank']:.1f} of {rank} ({100 * v['share_of_lora']:.0f}% of "
                       "the LoRA parameters)" for k, v in spectrum["taus"].items())
    print(f"\nLoRE spectrum of the KD adapter ({spectrum['modules']} matrices): {shares}")
    print(f"LoRE at tau {taus[0]:g}: held-out perplexity {lore_row['perplexity']:.2f}, KL {lore_row['kl']:.3f}, "
          f"top-1 agreement {lore_row['top1_agreement']:.3f} (same rows as the partial adaptation)")
    if merge is not None:
        print(format_merging(merge, seeds[0]))
    print(f"\nwrote {os.path.join(out_dir, 'results.json')}, results.md, predictions.json and {len(plots)} plots; "
          f"{seconds['total'] / 60:.1f} min in all ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})")
    return results


def _history(summary) -> list[dict]:
    return read_history(summary["out_dir"])
