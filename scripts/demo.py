"""The embedded default end to end: the seed's ablation at small scale on SmolLM2-135M-Instruct and local prose.

    .venv/bin/python scripts/demo.py --text data/text/jargon.txt [--out runs/demo] [--steps 60]

Teacher: the full 30-layer model. Student: every other layer of it, frozen, with LoRA r 8 on all linear layers
(layer pruning + distillation recovery). Trains one adapter with the LM loss only (alpha 0) and one with KD + LM
(alpha 0.5) on the train documents, then compares the pruned student, both adapters and the teacher on held-out
documents, sweeps partial merges of the KD adapter and takes its LoRE spectrum (`fa_jax.ablation`). Prints the
tables; writes results.json and PNG plots to --out.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax

import fa_jax
from fa_jax.ablation import run_ablation
from fa_jax.embedded import resolve_model_path
from fa_jax.errors import FaJaxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=os.environ.get("TEXT") or os.path.join(ROOT, "data", "text", "jargon.txt"),
                    help="English text (paragraphs separated by blank lines)")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"), help="output directory")
    ap.add_argument("--teacher", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=60, help="training steps per adapter")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-rows", type=int, default=16, help="held-out rows of --seq-len tokens to score")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not os.path.exists(args.text):
        sys.exit(f"demo: no text at {args.text}; run scripts/fetch_text.sh or pass TEXT=/path/to/file.txt")
    print(f"fa_jax {fa_jax.__version__}, JAX {jax.__version__} on {jax.devices()[0].platform} "
          f"({jax.device_count()} device(s)); model {resolve_model_path(args.teacher)}; text {args.text}")
    try:
        run_ablation(args.text, args.out, teacher=args.teacher, steps=args.steps, lr=args.lr, seq_len=args.seq_len,
                     batch_size=args.batch_size, eval_rows=args.eval_rows, seed=args.seed)
    except FaJaxError as e:
        sys.exit(f"demo: {e}")


if __name__ == "__main__":
    main()
