"""Tree-math benchmark, fa_jax against a plain reference in the same run.

    .venv/bin/python scripts/bench_treemath.py [--n 4096] [--rank 64] [--merge-gib 1.0]

1. SVD of a rank-64 product A @ B (4096 x 4096): fa_jax's QR route (`treemath.lowrank_svd`, never forms A @ B)
   against the dense SVD of the formed matrix (NumPy/LAPACK). Prints both times, the speed-up, and the largest
   relative difference of the 64 singular values.
2. Merge throughput: `readapt.merge` (base + 0.5 * dense delta, streamed tensor by tensor) against a plain NumPy
   loop over the same safetensors files (`safetensors.numpy.load_file`, add, `save_file`), in GB of base weights
   per second.
3. Two rank-64 LoRAs combined into one LoRA of rank 64 per matrix on one Llama-3.1-8B-shaped layer (q, o 4096 x
   4096; k, v 4096 x 1024; gate, up 4096 x 14336; down 14336 x 4096): `treemath.combine` (from the factors)
   against the dense route of PEFT's `add_weighted_adapter` (form each scale * A @ B, sum, full SVD with NumPy,
   keep the top 64), each in its own process: time and peak RSS (VmHWM), and the largest relative difference of
   the kept singular values.
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


SHAPES_8B = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
             "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}


def _loras(r: int):
    rng = np.random.default_rng(0)
    out = []
    for i in range(2):
        tree = {name: {"lora_A": rng.standard_normal((a, r), np.float32) / np.sqrt(a),
                       "lora_B": rng.standard_normal((r, b), np.float32), "scale": np.float32(2.0)}
                for name, (a, b) in SHAPES_8B.items()}
        out.append((tree, 0.5))
    return out


def _hwm_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def combine_worker(kind: str, r: int, path: str) -> None:
    """One side of benchmark 3 in this process; writes {seconds, peak_rss_gib, spectra} to `path`."""
    items = _loras(r)
    base_kb = _hwm_kb()
    t = time.perf_counter()
    if kind == "fa_jax":
        _, report = treemath.combine(items, rank=r)
        spectra = {p: np.asarray(m["spectrum"][:r], np.float64).tolist() for p, m in report["modules"].items()}
    else:
        spectra = {}
        for name in SHAPES_8B:
            m = sum(c * float(t[name]["scale"]) * (t[name]["lora_A"] @ t[name]["lora_B"]) for t, c in items)
            u, sv, vt = np.linalg.svd(m, full_matrices=False)
            _ = (u[:, :r] * np.sqrt(sv[:r]), np.sqrt(sv[:r])[:, None] * vt[:r])
            spectra[name] = sv[:r].astype(np.float64).tolist()
    seconds = time.perf_counter() - t
    json.dump({"seconds": seconds, "peak_rss_gib": _hwm_kb() / 2**20, "inputs_rss_gib": base_kb / 2**20,
               "spectra": spectra}, open(path, "w"))


def bench_combine(r: int):
    import subprocess

    out = {}
    for kind in ("fa_jax", "dense"):
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--combine-worker", kind, "--rank", str(r),
                        "--result", path], check=True)
        out[kind] = json.load(open(path))
        os.unlink(path)
    rel = max(float(np.max(np.abs(np.asarray(out["fa_jax"]["spectra"][n]) - np.asarray(out["dense"]["spectra"][n]))
                           / np.asarray(out["dense"]["spectra"][n]))) for n in SHAPES_8B)
    return out, rel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--merge-gib", type=float, default=1.0)
    ap.add_argument("--only-combine", action="store_true", help="run benchmark 3 alone")
    ap.add_argument("--combine-worker", choices=("fa_jax", "dense"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.combine_worker:
        combine_worker(a.combine_worker, a.rank, a.result)
        return
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, JAX {jax.__version__} on {jax.devices()[0].platform}")
    res, rel = bench_combine(a.rank)
    f, d = res["fa_jax"], res["dense"]
    print(f"two rank-{a.rank} LoRAs -> one rank-{a.rank} LoRA, one Llama-3.1-8B layer (7 matrices): treemath.combine "
          f"{f['seconds']:.2f} s, peak RSS {f['peak_rss_gib']:.2f} GiB; dense route (form, sum, SVD) "
          f"{d['seconds']:.1f} s, peak RSS {d['peak_rss_gib']:.2f} GiB (inputs {d['inputs_rss_gib']:.2f} GiB); "
          f"speed-up {d['seconds'] / f['seconds']:.0f}x, max relative singular-value difference {rel:.1e}")
    if a.only_combine:
        return
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
