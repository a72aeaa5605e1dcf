"""The seed's ablation at small scale: does a foundation adapter trained with KD + LM recover a pruned student?

    results = run_ablation("data/text/jargon.txt", "runs/demo")          # what `bash scripts/demo.sh` runs

The student is the teacher with layers removed (`keep_layers`, every other one by default), frozen, with LoRA on
its linear layers. Four models are compared on held-out documents (split off by document, never trained on):

- (a) the pruned student alone,
- (b) + an adapter trained with the language-modelling loss only (continued pre-training, alpha = 0),
- (c) + an adapter trained with KD + LM (alpha = 0.5, the seed's setting),
- the teacher itself,

by held-out perplexity, KL(teacher || student) per token and teacher-student top-1 agreement
(`evaluate.TeacherReference`: the teacher runs once). Then the KD adapter is merged into the student at partial
scales (`treemath.merge`, W = W_student + s * scale * A @ B for s in 0 .. 1) with the same metrics, and its LoRE
spectrum is taken (`treemath.truncate`: how much of each matrix's update a smaller rank explains); the LoRE at the
first tau is scored too. Everything lands in `out_dir`: results.json, training_curves.png, ablation.png,
partial_adaptation.png, lore_spectrum.png, and the two runs' own directories (cpt/, kd/ with metrics, checkpoint and
the PEFT export).

The pieces are public so a notebook can run them one at a time: `prepare`, `train_adapter`, `score`,
`partial_adaptation`, `lore_spectrum`, the `plot_*` functions and `format_table`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import textwrap
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from fa_jax import lora, run_config, treemath
from fa_jax import sharding as sh
from fa_jax.errors import FaJaxError
from fa_jax.io.atomic import write_text

SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
TAUS = (0.5, 0.75, 0.9)


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


def prepare(text, *, teacher: str = "embedded:smollm2-135m-instruct", keep_layers="every_other",
            held_out_fraction: float = 0.05, seed: int = 0, mesh_shape=(-1, 1, 1), text_split: str = "paragraph",
            min_words: int = 20, dtype: str = "float32") -> Setup:
    """Load the teacher, prune it into the student, and split `text` (any `data.load_documents` source) into train
    and held-out documents (`data.split_documents`, by document).

    Documents are unwrapped (every run of whitespace becomes one space: hard-wrapped, indented text files would
    otherwise spend much of the loss on predicting line breaks and indentation) and those under `min_words` words
    (headings, list items, one-line glossary entries) are dropped, so the comparison is on prose."""
    from fa_jax import data as data_lib
    from fa_jax import train

    if isinstance(text, str) and not any(ch in text for ch in "*?[") and not os.path.exists(text):
        raise FaJaxError(f"text={text!r}: no such file; give any English text file (e.g. `bash scripts/fetch_text.sh` "
                         "fetches the Jargon File)")
    mesh = sh.make_mesh(list(mesh_shape))
    rules = sh.DEFAULT_RULES
    cfg = run_config.wrap(run_config.merge(train.pretrain_defaults(), {
        "model": {"teacher": teacher, "keep_layers": keep_layers, "dtype": dtype}}, "ablation"))
    teacher_cfg, teacher_params, student_cfg, student, tokenizer = train.load_models(cfg, mesh, rules)
    docs = data_lib.load_documents(text, split=text_split)
    docs = docs.map(lambda d: {"text": " ".join(d["text"].split())}, desc="unwrap")
    docs = docs.filter(lambda d: len(d["text"].split()) >= int(min_words), desc=f"keep {min_words}+ words")
    if len(docs) < 2:
        raise FaJaxError(f"text={text!r}: {len(docs)} paragraphs of {min_words}+ words; the ablation needs prose to "
                         "train on and to hold out (lower min_words or give a longer text)")
    train_docs, held_out = data_lib.split_documents(docs, held_out_fraction, seed=seed)
    return Setup(mesh, rules, teacher_cfg, teacher_params, student_cfg, student, tokenizer, train_docs, held_out,
                 teacher, keep_layers)


def train_adapter(setup: Setup, out_dir: str, *, alpha: float, steps: int = 60, lr: float = 2e-3,
                  warmup_steps: int = 5, rank: int = 8, lora_alpha: float = 16.0, targets="all-linear",
                  seq_len: int = 256, batch_size: int = 4, temperature: float = 1.0, chunk_size: int = 64,
                  remat: str | None = "full", seed: int = 0, log_every: int = 10):
    """Train one adapter on the student with L = alpha * KD + (1 - alpha) * LM (alpha 0: no teacher in the step);
    returns (adapters, summary of `train.train_loop`). `out_dir` is this run's own directory: a previous run there
    is replaced."""
    from fa_jax import train

    if os.path.isdir(out_dir):
        if not os.path.exists(os.path.join(out_dir, "config.json")):
            raise FaJaxError(f"{out_dir}: exists and is not a training run; choose another out_dir")
        shutil.rmtree(out_dir)
    cfg = run_config.wrap(run_config.merge(train.pretrain_defaults(), {
        "model": {"teacher": setup.teacher_path, "keep_layers": setup.keep_layers, "remat": remat},
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
    summary = train.train_loop(cfg, setup.mesh, setup.rules, out_dir,
                               (teacher_cfg, teacher, setup.student_cfg, setup.student), batches,
                               desc=f"train alpha={alpha:g}")
    return summary.pop("adapters"), summary


def reference(setup: Setup, *, seq_len: int = 256, batch_size: int = 4, max_rows: int | None = 16,
              temperature: float = 1.0, chunk_size: int = 64):
    """The teacher's pass over the held-out documents (`evaluate.TeacherReference`)."""
    from fa_jax.evaluate import TeacherReference

    return TeacherReference(setup.teacher_cfg, setup.teacher, setup.tokenizer, setup.held_out_docs, seq_len=seq_len,
                            batch_size=batch_size, max_rows=max_rows, temperature=temperature,
                            chunk_size=chunk_size)


def score(setup: Setup, ref, adapters=None, params=None) -> dict:
    """{"perplexity", "kl", "top1_agreement", "nll", "tokens"} of the student (or `params`, a merged student)."""
    out = ref.score(setup.student_cfg, setup.student if params is None else params, adapters=adapters)
    return {"perplexity": out["perplexity"], "kl": out["kl"], "top1_agreement": out["top1_agreement"],
            "nll": out["student_nll"], "tokens": out["tokens"]}


def teacher_row(ref) -> dict:
    t = ref.teacher_metrics
    return {"perplexity": t["perplexity"], "kl": 0.0, "top1_agreement": 1.0, "nll": t["nll"], "tokens": t["tokens"]}


def partial_adaptation(setup: Setup, ref, adapters, scales=SCALES) -> list[dict]:
    """Score W = W_student + s * (adapter's delta) for each s, merged into dense weights by `treemath.merge`."""
    out = []
    for s in tqdm(scales, desc="partial adaptation", unit="scale", leave=False):
        merged = treemath.merge(setup.student, [(adapters, float(s))])
        out.append({"scale": float(s), **score(setup, ref, params=merged)})
        del merged
    return out


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


# ------------------------------------------------------------------------------------------------------ output

VARIANTS = ("pruned student", "+ CPT adapter (alpha 0)", "+ CPT+KD adapter (alpha 0.5)", "teacher")


def format_table(rows: dict, key_name: str = "model") -> str:
    """A plain-text table of {name: {"perplexity", "kl", "top1_agreement"}}."""
    width = max(len(key_name), *(len(str(k)) for k in rows))
    lines = [f"{key_name:<{width}}  {'held-out ppl':>12}  {'KL(T||S)':>9}  {'top-1 agree':>11}",
             "-" * (width + 38)]
    for name, r in rows.items():
        lines.append(f"{str(name):<{width}}  {r['perplexity']:>12.2f}  {r['kl']:>9.3f}  {r['top1_agreement']:>11.3f}")
    return "\n".join(lines)


def _plt():
    import matplotlib

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
        bars = ax.bar(range(len(names)), vals, color=["#999999", "#6699cc", "#cc6633", "#339966"][: len(names)])
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


def run_ablation(text, out_dir: str = "runs/demo", *, teacher: str = "embedded:smollm2-135m-instruct",
                 keep_layers="every_other", steps: int = 60, lr: float = 2e-3, rank: int = 8, seq_len: int = 256,
                 batch_size: int = 4, kd_alpha: float = 0.5, held_out_fraction: float = 0.05, eval_rows: int = 16,
                 min_words: int = 20, scales=SCALES, taus=TAUS, seed: int = 0, mesh_shape=(-1, 1, 1)) -> dict:
    """The whole ablation (module docstring); prints the tables and returns what results.json holds."""
    t0 = time.perf_counter()
    seconds = {}
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    def lap(name, start):
        seconds[name] = round(time.perf_counter() - start, 1)
        return time.perf_counter()

    setup = prepare(text, teacher=teacher, keep_layers=keep_layers, held_out_fraction=held_out_fraction, seed=seed,
                    mesh_shape=mesh_shape, min_words=min_words)
    print(f"teacher: {teacher} ({setup.teacher_cfg.num_hidden_layers} layers, "
          f"{setup.teacher_cfg.num_params / 1e6:.1f}M parameters); student: layers {keep_layers} "
          f"({setup.student_cfg.num_hidden_layers} layers, {setup.student_cfg.num_params / 1e6:.1f}M), frozen, "
          f"LoRA r {rank} on all linear layers")
    print(f"documents: {len(setup.train_docs)} train, {len(setup.held_out_docs)} held out (split by document)")
    t = lap("load", t0)
    kw = dict(steps=steps, lr=lr, rank=rank, seq_len=seq_len, batch_size=batch_size, seed=seed)
    cpt, cpt_summary = train_adapter(setup, os.path.join(out_dir, "cpt"), alpha=0.0, **kw)
    t = lap("train_cpt", t)
    kd, kd_summary = train_adapter(setup, os.path.join(out_dir, "kd"), alpha=kd_alpha, **kw)
    t = lap("train_kd", t)

    ref = reference(setup, seq_len=seq_len, batch_size=batch_size, max_rows=eval_rows)
    names = list(VARIANTS)
    names[2] = f"+ CPT+KD adapter (alpha {kd_alpha:g})"
    rows = {}
    for name, adapters in tqdm(list(zip(names[:3], (None, cpt, kd))), desc="held-out evaluation", unit="model",
                               leave=False):
        rows[name] = score(setup, ref, adapters=adapters)
    rows[names[3]] = teacher_row(ref)
    t = lap("evaluate", t)
    sweep = partial_adaptation(setup, ref, kd, scales)
    t = lap("partial_adaptation", t)
    spectrum, report = lore_spectrum(kd, taus)
    lore, _ = treemath.truncate(kd, tau=float(taus[0]))
    lore_row = score(setup, ref, adapters=lore)
    t = lap("lore", t)

    gap = rows[names[0]]["kl"]
    closed = {n: 1.0 - rows[n]["kl"] / gap if gap else 0.0 for n in names[1:3]}
    plots = {
        "training_curves": plot_training({"CPT (alpha 0)": _history(cpt_summary),
                                          f"CPT+KD (alpha {kd_alpha:g})": _history(kd_summary)},
                                         os.path.join(out_dir, "training_curves.png")),
        "ablation": plot_ablation(rows, os.path.join(out_dir, "ablation.png")),
        "partial_adaptation": plot_partial(sweep, rows[names[3]], os.path.join(out_dir, "partial_adaptation.png")),
        "lore_spectrum": plot_spectrum(report, os.path.join(out_dir, "lore_spectrum.png")),
    }
    seconds["total"] = round(time.perf_counter() - t0, 1)
    results = {
        "setting": {"teacher": teacher, "keep_layers": keep_layers, "rank": rank, "steps": steps, "lr": lr,
                    "seq_len": seq_len, "batch_size": batch_size, "kd_alpha": kd_alpha, "seed": seed,
                    "min_words": min_words, "train_tokens_per_run": steps * seq_len * batch_size, "text": str(text),
                    "documents": {"train": len(setup.train_docs), "held_out": len(setup.held_out_docs)},
                    "held_out_rows": ref.rows, "held_out_tokens": ref.teacher_metrics["tokens"],
                    "devices": f"{jax.device_count()} x {jax.devices()[0].platform}"},
        "models": rows,
        "kl_gap_closed": closed,
        "partial_adaptation": sweep,
        "lore": {**spectrum, "scored_tau": float(taus[0]), "scored": lore_row},
        "runs": {"cpt": cpt_summary.get("out_dir"), "kd": kd_summary.get("out_dir"),
                 "kd_peft_adapter": kd_summary.get("peft_adapter")},
        "plots": plots,
        "seconds": seconds,
    }
    write_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=2, default=float))
    print()
    print(format_table(rows))
    print("\nshare of the pruned student's KL gap to the teacher closed: " +
          ", ".join(f"{n.split('(')[0].strip(' +')} {100 * c:.0f}%" for n, c in closed.items()))
    print("\npartial adaptation of the KD adapter (treemath.merge):")
    print(format_table({f"s = {r['scale']:g}": r for r in sweep}, "scale"))
    shares = ", ".join(f"tau {k}: mean rank {v['mean_rank']:.1f} of {rank} ({100 * v['share_of_lora']:.0f}% of "
                       "the LoRA parameters)" for k, v in spectrum["taus"].items())
    print(f"\nLoRE spectrum of the KD adapter ({spectrum['modules']} matrices): {shares}")
    print(f"LoRE at tau {taus[0]:g}: held-out perplexity {lore_row['perplexity']:.2f}, KL {lore_row['kl']:.3f}, "
          f"top-1 agreement {lore_row['top1_agreement']:.3f}")
    print(f"\nwrote {os.path.join(out_dir, 'results.json')} and {len(plots)} plots; "
          f"{seconds['total'] / 60:.1f} min in all ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})")
    return results


def _history(summary) -> list[dict]:
    from fa_jax.metrics import read_history

    return read_history(summary["out_dir"])
