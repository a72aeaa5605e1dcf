"""The embedded default end to end: the seed's ablation at small scale on SmolLM2-135M-Instruct and local prose.

    .venv/bin/python scripts/demo.py --text data/text/jargon.txt [--out runs/demo] [--steps 60]
    .venv/bin/python scripts/demo.py --seeds 0,1,2                  # three training seeds: mean ± std (~3x longer)
    .venv/bin/python scripts/demo.py --keep-layers 0,1,2,3,4,5,6,7   # a milder student: the first 8 layers

Teacher: the full 30-layer model. Student: every other layer of it, frozen, with LoRA r 8 on all linear layers
(layer pruning + distillation recovery). Trains one adapter with the LM loss only (alpha 0) and one with KD + LM
(alpha 0.5) on the train documents, then compares the pruned student, both adapters and the teacher on every
held-out document (per-token NLL with a 95% bootstrap interval over documents, perplexity, KL, top-1 agreement, the
paired NLL differences between the models with their intervals) and on a 4-way multiple-choice test built from the
held-out Jargon File glossary entries (accuracy with its interval; skipped with a note for a text without glossary
entries), sweeps partial merges of the KD adapter and takes its LoRE spectrum (`fa_jax.ablation`). Prints the
table; writes results.json, results.md, predictions.json and PNG plots to --out.

Options beyond the training ones:
  --keep-layers   the student's layers: every_other (default), none (all of them: with --student, a smaller intact
                  model; alone, the teacher itself) or indices such as 0,1,2,3 (the first 4: a milder pruning)
  --student       the student model (default: the teacher's weights, pruned by --keep-layers); same tokenizer
  --seeds         training seeds, e.g. 0,1,2 (default 0: one run takes about 23 minutes on a 2-core CPU); each seed trains
                  both adapters anew; the held-out documents (--split-seed) and the multiple-choice items never change
  --mc-items      at most this many multiple-choice items (default 100; the Jargon File's default split has 69)
  --merge-steps   the KD and CPT adapters merged at fixed scales, at per-layer scales learned in this many steps
                  on train rows (`fa-jax tune-merge`'s ScaleTuner), and both as one LoRA under one budget (default
                  30; 0: none)
  --sweep-rows    the partial-adaptation sweep and the LoRE are scored on about this many rows of --seq-len tokens,
                  spread over the held-out rows (the table itself scores every held-out document)
  --cache-k       also train the KD adapter from a top-k teacher cache (one teacher pass written first, then a step
                  with no teacher): its row sits beside the live-teacher KD row, with its NLL difference to it
                  (default 64; 0: no such row)
"""
from __future__ import annotations

import argparse
import os
import sys

import jax

import fa_jax
from fa_jax.ablation import parse_keep_layers, parse_seeds, run_ablation
from fa_jax.embedded import resolve_model_path
from fa_jax.errors import FaJaxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=os.environ.get("TEXT") or os.path.join(ROOT, "data", "text", "jargon.txt"),
                    help="English text (paragraphs separated by blank lines)")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"), help="output directory")
    ap.add_argument("--teacher", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--student", default=None, help="student model (default: the teacher's weights)")
    ap.add_argument("--keep-layers", default="every_other", help="every_other | none | i,j,... (the student's layers)")
    ap.add_argument("--steps", type=int, default=45, help="training steps per adapter")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated (e.g. 0,1,2)")
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split (fixed across --seeds)")
    ap.add_argument("--mc-items", type=int, default=100, help="most multiple-choice items")
    ap.add_argument("--cache-k", type=int, default=64, help="top-k teacher cache row (0: none)")
    ap.add_argument("--merge-steps", type=int, default=30,
                    help="steps learning per-layer merge scales of the KD and CPT adapters (0: no merging study)")
    ap.add_argument("--sweep-rows", type=int, default=16,
                    help="held-out rows of --seq-len tokens for the partial-adaptation sweep and the LoRE")
    args = ap.parse_args()
    try:
        keep_layers, seeds = parse_keep_layers(args.keep_layers), parse_seeds(args.seeds)
    except FaJaxError as e:
        sys.exit(f"demo: {e}")
    if not os.path.exists(args.text):
        sys.exit(f"demo: no text at {args.text}; run scripts/fetch_text.sh or pass TEXT=/path/to/file.txt")
    print(f"fa_jax {fa_jax.__version__}, JAX {jax.__version__} on {jax.devices()[0].platform} "
          f"({jax.device_count()} device(s)); model {resolve_model_path(args.teacher)}; text {args.text}")
    try:
        run_ablation(args.text, args.out, teacher=args.teacher, student=args.student, keep_layers=keep_layers,
                     steps=args.steps, lr=args.lr, seq_len=args.seq_len, batch_size=args.batch_size, seeds=seeds,
                     split_seed=args.split_seed, mc_items=args.mc_items, sweep_rows=args.sweep_rows,
                     cache_k=args.cache_k or None, merge_steps=args.merge_steps)
    except FaJaxError as e:
        sys.exit(f"demo: {e}")


if __name__ == "__main__":
    main()
