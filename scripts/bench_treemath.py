"""Tree-math benchmark, fa_jax against a plain reference in the same run.

    .venv/bin/python scripts/bench_treemath.py [--n 4096] [--rank 64] [--merge-gib 1.0]

1. SVD of a rank-64 product A @ B (4096 x 4096): fa_jax's QR route (`treemath.lowrank_svd`, never forms A @ B)
   against the dense SVD of the formed matrix (NumPy/LAPACK). Prints both times, the speed-up, and the largest
   relative difference of the 64 singular values.
2. Merge throughput: `readapt.merge` (base + 0.5 * dense delta, streamed tensor by tensor) against a plain NumPy
   loop over the same safetensors files (`safetensors.numpy.load_file`, add, `save_file`), in GB of base weights
   per second.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from fa_jax import readapt, treemath  # noqa: E402
from fa_jax.io.safetensors import write  # noqa: E402


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def bench_svd(n: int, r: int):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((n, r), dtype=np.float32)
    B = rng.standard_normal((r, n), dtype=np.float32)
    fn = jax.jit(treemath.lowrank_svd)
    jax.block_until_ready(fn(A, B))  # compile outside the timing
    t_qr, (u, s, vt) = best_of(lambda: jax.block_until_ready(fn(A, B)), 3)
    M = A @ B
    t_dense, s_dense = best_of(lambda: np.linalg.svd(M, compute_uv=False), 1)
    rel = float(np.max(np.abs(np.asarray(s) - s_dense[:r]) / s_dense[:r]))
    return t_qr, t_dense, rel


def make_checkpoint(path, gib, seed):
    os.makedirs(path, exist_ok=True)
    D, F = 2048, 8192
    layers = max(1, int(gib * 2**30 / (4 * (4 * D * D + 3 * D * F))))
    cfg = {"model_type": "llama", "vocab_size": 512, "hidden_size": D, "intermediate_size": F,
           "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16,
           "rope_theta": 10000.0, "tie_word_embeddings": True}
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (512, D), "model.norm.weight": (D,)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
                       **{f"{p}.self_attn.{m}_proj.weight": (D, D) for m in "qkvo"},
                       f"{p}.mlp.gate_proj.weight": (F, D), f"{p}.mlp.up_proj.weight": (F, D),
                       f"{p}.mlp.down_proj.weight": (D, F)})
    write(os.path.join(path, "model.safetensors"),
          [(n, s, np.dtype(np.float32), lambda s=s: rng.standard_normal(s, np.float32)) for n, s in shapes.items()])
    return os.path.getsize(os.path.join(path, "model.safetensors"))


def bench_merge(gib: float, tmp: str):
    from safetensors.numpy import load_file, save_file

    base, delta = os.path.join(tmp, "base"), os.path.join(tmp, "delta")
    nbytes = make_checkpoint(base, gib, 0)
    make_checkpoint(delta, gib, 1)
    open(os.path.join(delta, readapt.DELTA_META), "w").write("{}")

    def ours():
        readapt.merge(base, [(delta, 0.5)], os.path.join(tmp, "ours"), overwrite=True, tokenizer=False)

    def numpy_loop():
        b = load_file(os.path.join(base, "model.safetensors"))
        d = load_file(os.path.join(delta, "model.safetensors"))
        out = {k: b[k] + np.float32(0.5) * d[k] for k in b}
        os.makedirs(os.path.join(tmp, "numpy"), exist_ok=True)
        save_file(out, os.path.join(tmp, "numpy", "model.safetensors"))

    results = {}
    for _ in range(2):  # interleaved rounds, best of each
        for name, fn in (("fa_jax", ours), ("numpy", numpy_loop)):
            t, _ = best_of(fn, 1)
            results[name] = min(results.get(name, t), t)
    return nbytes, results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--merge-gib", type=float, default=1.0)
    a = ap.parse_args()
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, JAX {jax.__version__} on {jax.devices()[0].platform}")
    t_qr, t_dense, rel = bench_svd(a.n, a.rank)
    print(f"SVD of a rank-{a.rank} product {a.n}x{a.n}: QR route {t_qr * 1e3:.1f} ms, dense SVD {t_dense:.2f} s, "
          f"speed-up {t_dense / t_qr:.0f}x (target >= 50x); max relative singular-value difference {rel:.1e} "
          f"(target <= 1e-4)")
    tmp = tempfile.mkdtemp(prefix="bench_treemath_")
    try:
        nbytes, res = bench_merge(a.merge_gib, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gb = nbytes / 1e9
    print(f"merge of {gb:.2f} GB float32 (base + 0.5 * delta): fa_jax {gb / res['fa_jax']:.2f} GB/s, "
          f"NumPy loop {gb / res['numpy']:.2f} GB/s, ratio {res['numpy'] / res['fa_jax']:.2f}x")


if __name__ == "__main__":
    main()
