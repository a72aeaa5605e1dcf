"""Fine-tune from a foundation adapter and from random init on N examples, several seeds; score both against N.

    .venv/bin/python scripts/foundation_vs_random.py                      # defaults: < 15 min on a 2-core CPU
    .venv/bin/python scripts/foundation_vs_random.py --ns 0,16,64,256,1024 --seeds 0,1,2,3,4 --steps 48 \\
        --pretrain-steps 200                                               # heavier: hours on a CPU

The seed's Figure 2 experiment (seed 000: ROUGE-L against the number of training examples, LoRA initialised
randomly or from the pre-trained foundation LoRA) at the embedded scale, with the spread across seeds that the seed's
other claim (foundation init is more stable across runs) needs.

The task comes from the local corpus (the Jargon File, `scripts/fetch_text.sh`): "What does the hacker jargon term X
mean?" answered with the first sentence of the entry's definition. In this order, before anything trains:

1. The test entries (`--eval-n`, drawn with `--split-seed`) are split off.
2. The foundation adapter's pre-training text is the Jargon File without them: every paragraph of a test entry is
   dropped, then every paragraph that still contains a test reference (normalised as the scores normalise text), and
   the result is checked: no test reference occurs in any pre-training document (`OUT/pretrain_corpus.txt`). A
   `--foundation` run directory given by the user is checked the same way against its own `data.train`.
3. Fine-tuning examples come from the remaining entries only.

Both arms start from the same frozen student (by default configs/sft_smollm2.py's: every other layer of SmolLM2),
so N = 0, the student prompted zero-shot, is one shared point, as in the seed's Figure 2. For every seed the N
examples are the first N of a seed-dependent order of the training entries (nested: the 16 are among the 64), and
both arms get the same examples, steps, learning rate, batches and seed; the seed also draws the random init and the
data order. The foundation adapter is pre-trained once (KD + LM, configs/pretrain_smollm2.py), so across-seed spread
is the fine-tuning's.

Scores on the test entries, per run: the teacher-forced NLL of the reference answers (nats per response token,
chat template as in training; the primary metric: cheap and low-variance), ROUGE-L recall and F1 of greedy answers,
and exact match in the response (the normalised reference appears in the answer, RE-Adapt's metric; rarely non-zero
for whole-sentence definitions). Reported as mean and standard deviation across seeds, plus the per-seed paired
difference foundation - random.

Readings taken where the seed is silent: fixed steps for every N (the seed does not give its schedule; fixed steps
keep one compiled program for every run and make N the only variable); rank and alpha as configs/sft_smollm2.py
(r 8, the foundation adapter's rank; the seed's Figure 2 used r 64 on a 1B student); the foundation adapter also
appears unfine-tuned as an extra row ("foundation, no fine-tuning"), which the seed's figure does not show.

Writes OUT/results.json (every run), OUT/results.md (the table), OUT/score_vs_n.png (error bars: std across seeds),
OUT/task_split.json (test and training terms), OUT/pretrain_corpus.txt, and per run its predictions.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fa_jax.jargon import jargon_records  # noqa: E402  (the glossary parser lives in the library)

from fa_jax.jargon import ENTRY as _ENTRY  # noqa: E402
METRICS = ("nll", "rougeL_recall", "rougeL_f1", "exact_match")
LABELS = {"nll": "NLL of the reference (nats/token, lower is better)", "rougeL_recall": "ROUGE-L recall",
          "rougeL_f1": "ROUGE-L F1", "exact_match": "exact match in response"}


def split_task(records: list[dict], eval_n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(test, train): `eval_n` entries drawn with `seed`, the rest in a fixed order. Terms are unique to one side."""
    import numpy as np

    if not 0 < eval_n < len(records):
        raise ValueError(f"--eval-n {eval_n}: expected between 1 and {len(records) - 1} (the task has {len(records)} "
                         "entries)")
    order = np.random.default_rng(seed).permutation(len(records))
    test = [records[i] for i in order[:eval_n]]
    held = {r["term"].lower() for r in test}
    return test, [records[i] for i in order[eval_n:] if records[i]["term"].lower() not in held]


def _norm(text: str) -> str:
    from fa_jax.evaluate import normalize_answer

    return normalize_answer(text.replace("{", "").replace("}", ""))


def leaked(references, documents) -> list[str]:
    """The references whose normalised text occurs in any normalised document."""
    docs = [_norm(d) for d in documents]
    return [r for r in references if any(f" {_norm(r)} " in f" {d} " for d in docs)]


def pretraining_documents(path: str, test: list[dict]) -> tuple[list[str], dict]:
    """The paragraphs of the Jargon File `path` minus the test entries' paragraphs and minus any paragraph that
    still contains a test reference: (paragraphs, {"paragraphs", "dropped_entry", "dropped_reference"})."""
    paragraphs = [p for p in re.split(r"\n\s*\n", open(path, encoding="utf-8").read()) if p.strip()]
    held = {r["term"].lower() for r in test}
    refs = [_norm(r["reference"]) for r in test]
    kept, term, by_entry, by_ref = [], None, 0, 0
    for p in paragraphs:
        m = _ENTRY.match(p.splitlines()[0]) if p.splitlines() else None
        if m:
            term = m.group(1).strip().lower()
        if term in held:
            by_entry += 1
            continue
        np_ = f" {_norm(p)} "
        if any(f" {r} " in np_ for r in refs):
            by_ref += 1
            continue
        kept.append(p)
    return kept, {"paragraphs": len(paragraphs), "dropped_entry": by_entry, "dropped_reference": by_ref}


def _write(path: str, text: str) -> None:
    from fa_jax.io.atomic import write_text

    write_text(path, text)


def _foundation_text(run_dir: str) -> list[str]:
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    spec = cfg.get("data", {}).get("train")
    if not isinstance(spec, str) or not os.path.exists(spec):
        raise SystemExit(f"--foundation {run_dir}: its data.train ({spec!r}) is not a file here, so it cannot be "
                         "checked for the test entries; leave --foundation out to pre-train a clean one")
    return [p for p in re.split(r"\n\s*\n", open(spec, encoding="utf-8").read()) if p.strip()]


def response_nll(student_cfg, student, tokenizer, records, adapters=None, *, seq_len: int, batch_size: int = 8):
    """Per record (NLL summed over its response tokens, number of response tokens), teacher-forced with the chat
    template exactly as the fine-tuning rows are built (`sft.encode`, `sft.make_rows`)."""
    import jax
    import numpy as np

    from fa_jax import evaluate, sft

    if student_cfg not in _NLL_FNS:  # one compiled function per student (a frozen dataclass)
        _NLL_FNS[student_cfg] = jax.jit(lambda p, a, t, y, m: evaluate.target_logprobs(student_cfg, p, t, y, m, a)[0])
    fn = _NLL_FNS[student_cfg]
    chat = bool(getattr(tokenizer, "chat_template", None))  # as sft.SFTBatches decides
    rows = []
    for i, r in enumerate(records):
        msgs = sft.to_messages({"prompt": r["question"], "response": r["reference"]}, i)
        rows += sft.make_rows([sft.encode(tokenizer, msgs, chat=chat)], seq_len, 0, pack=False)
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
        b = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
        lp = np.asarray(fn(student, adapters, b["tokens"], b["labels"], (b["segment_ids"] > 0).astype(np.int32)))
        m = b["mask"]
        out += [(float(-(lp[j] * m[j]).sum()), int(m[j].sum())) for j in range(len(chunk))]
    return out[:len(rows)]


_NLL_FNS: dict = {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--foundation", default=None,
                   help="a fa-jax pretrain run directory (default: OUT/foundation, pre-trained here on the text "
                        "without the test entries)")
    p.add_argument("--pretrain-steps", type=int, default=20)
    p.add_argument("--pretrain-seq-len", type=int, default=128)
    p.add_argument("--pretrain-batch", type=int, default=4)
    p.add_argument("--teacher", default=None, help="the foundation adapter's teacher (default: the config's)")
    p.add_argument("--text", default=os.path.join(ROOT, "data", "text", "jargon.txt"))
    p.add_argument("--ns", default="0,16,64,256", help="numbers of training examples (0: no fine-tuning)")
    p.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds (init, example choice, data order)")
    p.add_argument("--steps", type=int, default=6, help="fine-tuning steps for every N > 0")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-n", type=int, default=24, help="test entries, split off before anything trains")
    p.add_argument("--split-seed", type=int, default=0, help="which entries are the test entries")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "foundation_vs_random"))
    p.add_argument("--student", default=None, help="the student model (default: configs/sft_smollm2.py's)")
    p.add_argument("--keep-layers", default=None, help="'none', 'every_other' (default: the config's) or i,j,...")
    p.add_argument("--seq-len", type=int, default=96)
    args = p.parse_args(argv)

    try:
        ns = sorted({int(n) for n in args.ns.split(",")})
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--ns {args.ns!r} / --seeds {args.seeds!r}: expected comma-separated integers")
    if min(ns) < 0 or not seeds or len(set(seeds)) != len(seeds):
        p.error(f"--ns {args.ns!r} / --seeds {args.seeds!r}: expected N >= 0 and distinct seeds")
    if not os.path.exists(args.text):
        print(f"{args.text}: missing; run `bash scripts/fetch_text.sh` (or pass --text with a Jargon File copy)")
        return 2

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    with _compilation_cache(os.path.join(out, ".jax_cache")):
        return _experiment(args, ns, seeds, out)


@contextlib.contextmanager
def _compilation_cache(path: str):
    """JAX's persistent compilation cache in `path` for the experiment only (every fine-tuning run compiles the
    same step: compile it once, then read it from disk); the caller's settings come back afterwards."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    before = {k: getattr(jax.config, k) for k in keys}
    for k, v in zip(keys, (path, 0, 0)):
        jax.config.update(k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()


def _experiment(args, ns, seeds, out) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from fa_jax import evaluate, run_config, sft, train
    from fa_jax import sharding as sh

    t0 = time.time()
    # 1. the test entries, before anything trains
    records = jargon_records(args.text)
    try:
        test, pool = split_task(records, args.eval_n, args.split_seed)
    except ValueError as e:
        print(e)
        return 2
    if max(ns) > len(pool):
        print(f"--ns asks for {max(ns)} examples; the task has {len(pool)} training entries")
        return 2
    _write(os.path.join(out, "task_split.json"), json.dumps({
        "text": os.path.abspath(args.text), "split_seed": args.split_seed,
        "test": [{"term": r["term"], "reference": r["reference"]} for r in test],
        "train_terms": [r["term"] for r in pool]}, indent=1))
    print(f"task: {len(records)} jargon definitions; {len(test)} test entries split off; {len(pool)} for training; "
          f"N in {ns}; seeds {seeds}")

    # 2. the foundation adapter, on text without the test entries
    foundation = args.foundation or os.path.join(out, "foundation")
    if os.path.exists(os.path.join(foundation, "adapter_peft", "adapter_config.json")):
        bad = leaked([r["reference"] for r in test], _foundation_text(foundation))
        if bad:
            print(f"--foundation {foundation}: its pre-training text contains {len(bad)} of the {len(test)} test "
                  f"references (e.g. {bad[0]!r}); pre-train without them (leave --foundation out)")
            return 2
        print(f"foundation adapter: {foundation} (its pre-training text holds none of the test references)")
    else:
        docs, counts = pretraining_documents(args.text, test)
        corpus = os.path.join(out, "pretrain_corpus.txt")
        _write(corpus, "\n\n".join(docs) + "\n")
        bad = leaked([r["reference"] for r in test], docs)
        assert not bad, f"test references left in the pre-training text: {bad[:3]}"
        print(f"pre-training the foundation adapter ({args.pretrain_steps} steps) into {foundation} on {corpus}: "
              f"{len(docs)} of {counts['paragraphs']} paragraphs ({counts['dropped_entry']} of test entries and "
              f"{counts['dropped_reference']} quoting a test reference dropped)")
        pre = run_config.load(os.path.join(ROOT, "configs", "pretrain_smollm2.py"), train.pretrain_defaults(), [
            f"data.train={corpus}", f"run.steps={args.pretrain_steps}", f"run.out_dir={foundation}",
            "run.save_every=0", "run.tensorboard=false", f"data.seq_len={args.pretrain_seq_len}", "model.remat=none",
            f"data.batch_size={args.pretrain_batch}",
            "optim.warmup_steps=4", "run.resume=false"] + ([f"model.teacher={args.teacher}"] if args.teacher else []))
        if args.keep_layers is not None:
            pre = run_config.merge(pre, {"model": {"keep_layers": _keep(args.keep_layers)}}, "--keep-layers")
        train.pretrain(pre)
    t_pre = time.time() - t0

    # 3. both arms from the same student
    base = run_config.load(os.path.join(ROOT, "configs", "sft_smollm2.py"), sft.sft_defaults(), [
        f"optim.lr={args.lr}", f"data.batch_size={args.batch}", "data.pack=false", "model.remat=none",
        f"run.steps={args.steps}", "run.save_every=0", "run.tensorboard=false", "run.export_peft=false",
        "optim.warmup_steps=1", f"run.log_every={max(1, args.steps // 3)}", f"data.seq_len={args.seq_len}",
        "run.resume=false", f"init=foundation:{foundation}"] + ([f"model.student={args.student}"] if args.student else []))
    if args.keep_layers is not None:
        base = run_config.merge(base, {"model": {"keep_layers": _keep(args.keep_layers)}}, "--keep-layers")
    base = run_config.wrap(base)
    mesh = sh.make_mesh(base.mesh.shape)
    rules = train.mesh_rules(base)
    student_cfg, student, tokenizer, _, _ = sft.load_student(base, mesh, rules)
    found = sft.load_initial_adapter(base, student_cfg)
    eval_records = [{"prompt": r["question"], "reference": r["reference"], "term": r["term"]} for r in test]

    def score(adapters, run_dir):
        t = time.time()
        nll = response_nll(student_cfg, student, tokenizer, test, adapters, seq_len=args.seq_len,
                           batch_size=args.batch)
        t_nll = time.time() - t
        qa = evaluate.evaluate_qa(student_cfg, student, tokenizer, eval_records, adapters=adapters,
                                  max_new_tokens=args.max_new_tokens, batch_size=args.batch,
                                  out_dir=os.path.join(run_dir, "eval"))
        return {"nll": sum(s for s, _ in nll) / sum(n for _, n in nll), "nll_per_item": [s for s, _ in nll],
                "tokens_per_item": [n for _, n in nll], "rougeL_recall": qa["rougeL_recall"],
                "rougeL_f1": qa["rougeL_f1"], "exact_match": qa["exact_match"], "eval_n": qa["n"],
                "seconds_nll": round(t_nll, 1), "seconds_generate": round(time.time() - t - t_nll, 1)}

    runs = []
    plan = [(s, n, arm) for s in seeds for n in ns if n > 0 for arm in ("foundation", "random")]
    bar = tqdm(total=len(plan) + 2, desc="runs", unit="run")
    runs.append({"init": "shared", "n": 0, "seed": None, **score(None, os.path.join(out, "n0_student"))})
    bar.update()
    runs.append({"init": "foundation, no fine-tuning", "n": 0, "seed": None,
                 **score(found, os.path.join(out, "n0_foundation"))})
    bar.update()
    for seed, n, arm in plan:
        order = np.random.default_rng(1000 + seed).permutation(len(pool))
        train_recs = [{"prompt": pool[i]["question"], "response": pool[i]["reference"]} for i in order[:n]]
        run_dir = os.path.join(out, f"{arm}_n{n}_seed{seed}")
        cfg = run_config.wrap(run_config.apply_overrides(base, [
            "init=" + (f"foundation:{foundation}" if arm == "foundation" else "random"), f"run.out_dir={run_dir}",
            f"data.seed={seed}", f"run.seed={seed}"]))
        out_dir = train.prepare_out_dir(cfg)
        batches = sft.SFTBatches(train_recs, tokenizer, seq_len=args.seq_len, global_rows=args.batch, seed=seed,
                                 chat=True)
        t = time.time()
        summary = train.train_loop(cfg, mesh, rules, out_dir, (None, None, student_cfg, student), batches,
                                   desc=f"{arm} N={n} seed {seed}", adapters=found if arm == "foundation" else None)
        if summary["step"] < summary["steps"]:  # SIGTERM: the loop saved and stopped; so does the experiment
            print(f"stopped at step {summary['step']} of {run_dir}; the experiment is incomplete")
            return 143
        row = {"init": arm, "n": n, "seed": seed, "seconds_train": round(time.time() - t, 1),
               **score(summary["adapters"], run_dir)}
        runs.append(row)
        bar.update()
        bar.write(f"N={n:4d} seed {seed} {arm:10s} " + "  ".join(f"{k} {row[k]:.4f}" for k in METRICS))
    bar.close()
    report = summarize(runs, ns, seeds)
    write_report(out, args, ns, seeds, runs, report, len(test), {"pretrain": t_pre, "total": time.time() - t0})
    return 0


def _keep(spec: str):
    if spec == "none":
        return None
    if spec == "every_other":
        return spec
    return [int(i) for i in spec.split(",")]


def summarize(runs: list[dict], ns, seeds) -> dict:
    """Per (arm, N): each metric's mean and standard deviation across seeds (`stats.across_seeds`); per N > 0 the
    per-seed paired difference foundation - random, aggregated the same way. N = 0 is the shared student."""
    from fa_jax import stats

    shared = next(r for r in runs if r["init"] == "shared")
    out = {"arms": {}, "difference": {}}
    for arm in ("foundation", "random"):
        out["arms"][arm] = {}
        for n in ns:
            rows = [shared] if n == 0 else sorted((r for r in runs if r["init"] == arm and r["n"] == n),
                                                  key=lambda r: r["seed"])
            out["arms"][arm][str(n)] = {k: stats.across_seeds([r[k] for r in rows]) for k in METRICS}
    for n in ns:
        if n == 0:
            continue
        pairs = [(next(r for r in runs if r["init"] == "foundation" and r["n"] == n and r["seed"] == s),
                  next(r for r in runs if r["init"] == "random" and r["n"] == n and r["seed"] == s)) for s in seeds]
        out["difference"][str(n)] = {k: stats.across_seeds([f[k] - r[k] for f, r in pairs]) for k in METRICS}
    nofit = next((r for r in runs if r["init"] == "foundation, no fine-tuning"), None)
    if nofit:
        out["foundation_no_finetuning"] = {k: nofit[k] for k in METRICS}
    return out


def format_markdown(report: dict, ns, n_test: int, steps: int) -> str:
    def cell(a, d=3):
        return f"{a['mean']:.{d}f} ± {a['std']:.{d}f}" if a["n"] > 1 else f"{a['mean']:.{d}f}"

    seeds = max(report["arms"]["random"][str(n)]["nll"]["n"] for n in ns)
    lines = [f"{n_test} test entries, {steps} fine-tuning steps per N > 0, mean ± std across {seeds} seeds "
             "(N = 0: the student alone, one shared point)", "",
             "| N | init | NLL (nats/token) | ROUGE-L recall | ROUGE-L F1 | exact match |", "| --- | --- | --- | --- | --- | --- |"]
    for n in ns:
        for arm in (("shared",) if n == 0 else ("foundation", "random")):
            a = report["arms"]["random" if arm == "shared" else arm][str(n)]
            lines.append(f"| {n} | {'student (both)' if n == 0 else arm} | " +
                         " | ".join(cell(a[k]) for k in METRICS) + " |")
        if n > 0:
            d = report["difference"][str(n)]
            lines.append(f"| {n} | foundation - random (per seed) | " +
                         " | ".join(f"{d[k]['mean']:+.3f} ± {d[k]['std']:.3f}" for k in METRICS) + " |")
    if "foundation_no_finetuning" in report:
        f = report["foundation_no_finetuning"]
        lines.append("| 0 | foundation, no fine-tuning | " + " | ".join(f"{f[k]:.3f}" for k in METRICS) + " |")
    return "\n".join(lines) + "\n"


def write_report(out, args, ns, seeds, runs, report, n_test, seconds) -> None:
    """results.json, results.md (the table) and score_vs_n.png in `out`."""
    md = format_markdown(report, ns, n_test, args.steps)
    print(md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    xs = [max(n, 4) for n in ns]  # N = 0 drawn at 4 on the log axis
    for ax, key in zip(axes, ("nll", "rougeL_recall", "exact_match")):
        for k, (arm, style) in enumerate((("foundation", "o-"), ("random", "s--"))):
            a = [report["arms"][arm][str(n)][key] for n in ns]
            ax.errorbar([x * (1.04 if k else 1 / 1.04) for x in xs], [v["mean"] for v in a],
                        yerr=[v["std"] for v in a], fmt=style, capsize=3, label=f"init: {arm}")
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("training examples N")
        ax.set_title(LABELS[key], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"foundation adapter vs random init: mean ± std over {len(seeds)} seeds, {n_test} test entries")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "score_vs_n.png"), dpi=120)
    plt.close(fig)
    _write(os.path.join(out, "results.json"), json.dumps(
        {"args": vars(args), "ns": ns, "seeds": seeds, "runs": runs, "report": report,
         "seconds": {k: round(v, 1) for k, v in seconds.items()}}, indent=1))
    _write(os.path.join(out, "results.md"), md)
    print(f"wrote {out}/results.json, results.md, score_vs_n.png ({seconds['total'] / 60:.1f} min; "
          f"foundation pre-training {seconds['pretrain']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
