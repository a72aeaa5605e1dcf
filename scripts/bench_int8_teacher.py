"""What `teacher.quantize=int8` costs in fidelity and gains in memory and speed, on the embedded teacher.

    .venv/bin/python scripts/bench_int8_teacher.py [--text data/text/jargon.txt] [--rows 16] [--json out.json]

Teacher: SmolLM2-135M-Instruct (`embedded:smollm2-135m-instruct`), loaded in float32. Held-out text: the demo's
(`bash scripts/fetch_text.sh`, the Jargon File), split exactly as `fa_jax.ablation.prepare` splits it (paragraphs,
whitespace unwrapped, 20+ words, `data.split_documents(docs, 0.05, seed=0)`), packed into --rows rows of --seq-len
tokens as `evaluate.TeacherReference` packs them. Reports:

  weights   bytes of the teacher's weights in float32, bfloat16 and int8 (`quant.param_bytes`: q plus scales, with
            norms kept in float32)
  fidelity  against the float32 teacher computing in float32, per real token of the held-out rows: the mean
            KL(float32 teacher || variant) in nats, the top-1 agreement and the variant's own held-out NLL, for
            bfloat16 weights computing in bfloat16 (the usual half-precision teacher, for scale), int8 weights
            computing in float32, int8 weights computing in bfloat16
  speed     forward tokens/s (logits of --batch-size x --seq-len tokens, jitted, compilation untimed) of the four
            models, interleaved over --repeats rounds (this machine's speed drifts), the median of each

GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (as scripts/demo.sh sets it) helps XLA on CPU.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fa_jax import data as data_lib, losses, quant  # noqa: E402
from fa_jax.evaluate import TeacherReference  # noqa: E402
from fa_jax.io.load import load_model, load_tokenizer  # noqa: E402
from fa_jax.models import transformer  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def held_out_documents(text, held_out_fraction=0.05, seed=0, min_words=20):
    """The demo's held-out documents (fa_jax.ablation.prepare's defaults and steps, without loading models)."""
    docs = data_lib.load_documents(text, split="paragraph")
    docs = docs.map(lambda d: {"text": " ".join(d["text"].split())}, desc="unwrap")
    docs = docs.filter(lambda d: len(d["text"].split()) >= min_words, desc=f"keep {min_words}+ words")
    return data_lib.split_documents(docs, held_out_fraction, seed=seed)[1]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


def fidelity(config, ref, variants, chunk_size=64):
    """{name: {"kl", "top1_agreement", "nll", "tokens"}} of each (params, compute dtype) against the reference's
    float32 teacher, over its held-out rows."""
    @functools.partial(jax.jit, static_argnames="dtype")
    def terms(params, reference, h_ref, b, dtype):
        h = transformer.hidden_states(config, params, b["tokens"], segment_ids=b["segment_ids"],
                                      positions=b["positions"], dtype=dtype)
        head, vd = transformer.lm_head(config, params)
        head_ref, ref_vd = transformer.lm_head(config, reference)
        t = losses.chunked_token_terms(h, head, h_ref, head_ref, b["labels"], b["mask"], chunk_size=chunk_size,
                                       student_head_vd=vd, teacher_head_vd=ref_vd)  # [B, T, (kl, agree, ce)]
        return jnp.sum(t, axis=(0, 1)), jnp.sum(b["mask"])

    out = {}
    for name, (params, dtype) in variants.items():
        acc, n = np.zeros(3), 0
        for h_ref, b in zip(ref.hidden, ref.batches):
            s, m = jax.device_get(terms(params, ref.teacher, h_ref, b, dtype=jnp.dtype(dtype)))
            acc, n = acc + s, n + int(m)
        out[name] = {"kl": acc[0] / n, "top1_agreement": acc[1] / n, "nll": acc[2] / n, "tokens": n}
    return out


def speed(config, variants, batch, repeats):
    """{name: forward tokens/s (median over `repeats` interleaved rounds)}."""
    fwd = {name: jax.jit(lambda p, t, dtype=dtype: transformer.forward(config, p, t, dtype=dtype))
           for name, (_, dtype) in variants.items()}
    for name, (params, _) in variants.items():
        fwd[name](params, batch).block_until_ready()  # compile
    times = {name: [] for name in variants}
    order = list(variants)
    for r in range(repeats):
        for name in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            fwd[name](variants[name][0], batch).block_until_ready()
            times[name].append(time.perf_counter() - t0)
    return {name: batch.size / statistics.median(ts) for name, ts in times.items()}, times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", default=os.path.join(ROOT, "data", "text", "jargon.txt"))
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if not os.path.exists(args.text):
        sys.exit(f"{args.text}: no such file (bash scripts/fetch_text.sh fetches the demo's text)")

    t0 = time.time()
    config, f32 = load_model(MODEL, dtype="float32")
    tokenizer = load_tokenizer(MODEL)
    bf16 = transformer.cast(f32, jnp.bfloat16)
    int8 = quant.quantize_params(config, f32, "int8")
    nbytes = {"float32": quant.param_bytes(f32), "bfloat16": quant.param_bytes(bf16), "int8": quant.param_bytes(int8)}
    load_s = time.time() - t0

    ref = TeacherReference(config, f32, tokenizer, held_out_documents(args.text), seq_len=args.seq_len,
                           batch_size=args.batch_size, max_rows=args.rows, dtype="float32", chunk_size=64)
    variants = {"float32": (f32, jnp.float32), "bf16": (bf16, jnp.bfloat16), "int8_f32": (int8, jnp.float32),
                "int8_bf16": (int8, jnp.bfloat16)}
    fid = fidelity(config, ref, {k: v for k, v in variants.items() if k != "float32"})
    fid["float32"] = {"kl": 0.0, "top1_agreement": 1.0, "nll": ref.teacher_metrics["nll"],
                      "tokens": ref.teacher_metrics["tokens"]}
    tps, times = speed(config, variants, np.asarray(ref.batches[0]["tokens"]), args.repeats)

    labels = {"float32": "float32 weights, f32 compute (reference)", "bf16": "bfloat16 weights, bf16 compute",
              "int8_f32": "int8 weights, f32 compute", "int8_bf16": "int8 weights, bf16 compute"}
    print(f"teacher {MODEL} ({config.num_params:,} parameters), CPU {cpu_model()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"held-out: {fid['float32']['tokens']} tokens in {ref.rows} packed rows x {args.seq_len} "
          f"(the demo's split of {os.path.basename(args.text)})")
    print()
    print(f"{'weights':<9} {'bytes':>13} {'MiB':>8} {'vs f32':>7} {'vs bf16':>8}")
    for k, v in nbytes.items():
        print(f"{k:<9} {v:>13,} {v / 2**20:>8.1f} {v / nbytes['float32']:>7.3f} {v / nbytes['bfloat16']:>8.3f}")
    print()
    print(f"{'model':<42} {'KL(f32||x)':>11} {'top-1 agree':>11} {'NLL':>7} {'ppl':>7} {'tokens/s':>9}")
    for k in variants:
        f = fid[k]
        print(f"{labels[k]:<42} {f['kl']:>11.5f} {f['top1_agreement']:>11.4f} {f['nll']:>7.4f} "
              f"{np.exp(f['nll']):>7.2f} {tps[k]:>9.0f}")
    print(f"\nforward: batch {args.batch_size} x {args.seq_len} (logits included), median of {args.repeats} "
          f"interleaved rounds; int8/f32 speed: {tps['int8_f32'] / tps['float32']:.2f}x (f32 compute), "
          f"{tps['int8_bf16'] / tps['float32']:.2f}x (bf16 compute); bf16/f32: {tps['bf16'] / tps['float32']:.2f}x")
    if args.json:
        result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "model": MODEL,
                  "cpu": cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__, "text": args.text,
                  "rows": ref.rows, "seq_len": args.seq_len, "load_s": load_s, "weight_bytes": nbytes,
                  "fidelity": {k: {kk: float(vv) for kk, vv in v.items()} for k, v in fid.items()},
                  "tokens_per_s": tps, "forward_seconds": times, "labels": labels,
                  "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
