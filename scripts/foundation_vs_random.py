"""Fine-tune from a foundation adapter and from random init on N training examples; score both against N.

    .venv/bin/python scripts/foundation_vs_random.py --foundation runs/pretrain_smollm2
    .venv/bin/python scripts/foundation_vs_random.py --ns 0,16,64,256,1024 --steps 200    # the full setting

The seed's Figure 2 experiment at the embedded scale. The task comes from the local corpus (the Jargon File,
`scripts/fetch_text.sh`): "What does the hacker jargon term X mean?" answered with the first sentence of the
entry's definition, scored by ROUGE-L F1 on held-out entries (generation, greedy). For each N (0 = no fine-tuning)
both starts get the same examples, seed, steps and learning rate. The foundation adapter is a `fa-jax pretrain`
run on the same student (by default the embedded SmolLM2 setting, trained here for `--pretrain-steps` if the run
directory does not exist yet). Its corpus is the Jargon File itself, so the foundation adapter has seen the text the
held-out definitions come from: this measures what an adapter pre-trained on a domain brings to a task in it.

Writes OUT/results.json, OUT/results.md (the table) and OUT/score_vs_n.png.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_ABBREVIATIONS = ("usu.", "esp.", "e.g.", "i.e.", "vs.", "cf.", "etc.", "orig.", "prob.", "approx.", "st.")
_ENTRY = re.compile(r"^ {3}:([^:\n]{2,40}):\s*(.*)$")


def jargon_records(path: str, min_words: int = 6, max_words: int = 40) -> list[dict]:
    """{"question", "reference", "term"} for each glossary entry: the first sentence of its definition."""
    lines = open(path, encoding="utf-8").read().splitlines()
    records, i = [], 0
    while i < len(lines):
        m = _ENTRY.match(lines[i])
        i += 1
        if not m:
            continue
        term, body = m.group(1).strip(), []
        while i < len(lines) and not _ENTRY.match(lines[i]):
            body.append(lines[i].strip())
            i += 1
        text = " ".join(" ".join(body).split())
        text = re.sub(r"^\(.*?\)\s*", "", text)  # "(also green words)"
        text = re.sub(r"^\[.*?\]\s*", "", text)  # etymology "[from SF fandom]"
        text = re.sub(r"^1\.\s*", "", text)
        text = text.replace("{", "").replace("}", "")
        pieces, first = re.split(r"(?<=[.!?])\s", text), ""
        for piece in pieces:  # a sentence does not end at an abbreviation ("usu.", "esp.", "e.g.")
            first = (first + " " + piece).strip()
            if not first.lower().endswith(_ABBREVIATIONS):
                break
        if min_words <= len(first.split()) <= max_words:
            records.append({"question": f"What does the hacker jargon term \"{term}\" mean?", "reference": first,
                            "term": term})
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--foundation", default=os.path.join(ROOT, "runs", "pretrain_smollm2"),
                   help="a fa-jax pretrain run directory (trained first if missing)")
    p.add_argument("--pretrain-steps", type=int, default=60)
    p.add_argument("--text", default=os.path.join(ROOT, "data", "text", "jargon.txt"))
    p.add_argument("--ns", default="0,16,64", help="numbers of training examples (0: no fine-tuning)")
    p.add_argument("--steps", type=int, default=24, help="fine-tuning steps for every N > 0")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-n", type=int, default=24, help="held-out questions scored")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "foundation_vs_random"))
    p.add_argument("--student", default=None, help="the student model (default: configs/sft_smollm2.py's)")
    p.add_argument("--keep-layers", default=None, help="'none', 'every_other' (default: the config's) or i,j,...")
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args(argv)

    import numpy as np

    from fa_jax import evaluate, run_config, sft, train
    from fa_jax import sharding as sh

    if not os.path.exists(args.text):
        print(f"{args.text}: missing; run `bash scripts/fetch_text.sh` (or pass --text with a Jargon File copy)")
        return 2
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    if not os.path.exists(os.path.join(args.foundation, "adapter_peft", "adapter_config.json")):
        print(f"pre-training the foundation adapter ({args.pretrain_steps} steps) into {args.foundation}")
        cfg = run_config.load(os.path.join(ROOT, "configs", "pretrain_smollm2.py"), train.pretrain_defaults(),
                              [f"data.train={args.text}", f"run.steps={args.pretrain_steps}",
                               f"run.out_dir={args.foundation}", "run.save_every=0"])
        train.pretrain(cfg)

    records = jargon_records(args.text)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(records))
    test = [records[i] for i in order[: args.eval_n]]
    # the training prompts are the evaluation's own prompt format
    pool = [{"prompt": evaluate.qa_prompt(records[i]), "response": records[i]["reference"]}
            for i in order[args.eval_n:]]
    ns = [int(n) for n in args.ns.split(",")]
    if max(ns) > len(pool):
        print(f"--ns asks for {max(ns)} examples; the task has {len(pool)} training entries")
        return 2
    print(f"task: {len(records)} jargon definitions; {len(test)} held out; N in {ns}")

    base = run_config.load(os.path.join(ROOT, "configs", "sft_smollm2.py"), sft.sft_defaults(), [
        f"optim.lr={args.lr}", f"data.batch_size={args.batch}", "data.pack=false",
        f"data.seed={args.seed}", f"run.seed={args.seed}", f"run.steps={args.steps}", "run.save_every=0",
        "run.tensorboard=false", "run.export_peft=false", "optim.warmup_steps=2", "run.log_every=4",
        f"data.seq_len={args.seq_len}"] + ([f"model.student={args.student}"] if args.student else []))
    if args.keep_layers is not None:
        keep = None if args.keep_layers == "none" else (
            args.keep_layers if args.keep_layers == "every_other" else [int(i) for i in args.keep_layers.split(",")])
        base = run_config.merge(base, {"model": {"keep_layers": keep}}, "--keep-layers")
    mesh = sh.make_mesh(base.mesh.shape)
    student_cfg, student, tokenizer, _, _ = sft.load_student(base, mesh, train.mesh_rules(base))
    results = []
    for n in ns:
        for start in ("foundation", "random"):
            cfg = run_config.apply_overrides(base, [
                "init=" + (f"foundation:{args.foundation}" if start == "foundation" else "random"),
                f"run.out_dir={os.path.join(args.out, f'{start}_n{n}')}"])
            if n == 0:
                adapters = sft.load_initial_adapter(cfg, student_cfg)  # None for random: the pruned student
            else:
                cfg = run_config.merge(cfg, {"data": {"train": pool[:n]}}, "foundation_vs_random")
                adapters = sft.finetune(cfg)["adapters"]
            score = evaluate.evaluate_qa(student_cfg, student, tokenizer, test, adapters=adapters,
                                         max_new_tokens=args.max_new_tokens,
                                         out_dir=os.path.join(args.out, f"{start}_n{n}"))
            row = {**{k: v for k, v in score.items() if isinstance(v, (int, float)) and k != "n"},
                   "eval_n": score["n"], "n": n, "init": start}
            results.append(row)
            print(f"N={n:5d} {start:10s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                       if isinstance(v, float)), flush=True)

    write_report(args, ns, results, len(test), time.time() - t0)
    return 0


def write_report(args, ns, results, n_test, seconds) -> None:
    """results.json, results.md (the table) and score_vs_n.png in args.out."""
    key = "rougeL_f1"
    table = ["| N | foundation | random |", "| --- | --- | --- |"]
    for n in ns:
        f = next(r[key] for r in results if r["n"] == n and r["init"] == "foundation")
        r_ = next(r[key] for r in results if r["n"] == n and r["init"] == "random")
        table.append(f"| {n} | {f:.4f} | {r_:.4f} |")
    md = (f"ROUGE-L F1 on {n_test} held-out jargon definitions, {args.steps} steps per N, "
          f"seed {args.seed}\n\n" + "\n".join(table) + "\n")
    print(md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for start, style in (("foundation", "o-"), ("random", "s--")):
        ax.plot([max(n, 1) for n in ns], [next(r[key] for r in results if r["n"] == n and r["init"] == start)
                                          for n in ns], style, label=f"init: {start}")
    ax.set_xscale("log")
    ax.set_xlabel("training examples N (0 shown at 1)")
    ax.set_ylabel("ROUGE-L F1")
    ax.set_title("Foundation adapter vs random init")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "score_vs_n.png"), dpi=120)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": results, "seconds": seconds}, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    print(f"wrote {args.out}/results.json, results.md, score_vs_n.png ({seconds:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
