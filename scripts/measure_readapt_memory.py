"""Peak host memory of `fa-jax diff` and `fa-jax merge` on a synthetic checkpoint of two Llama-3.1-8B-sized layers
(hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab 128256, untied head, bfloat16), against its size on disk.

    .venv/bin/python scripts/measure_readapt_memory.py [--dir /tmp/readapt_mem] [--keep]

Each command runs in its own process; the peak is that process's VmHWM (reset after imports), so it counts what the
command itself holds. Prints one line per command.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fa_jax.io.safetensors import write  # noqa: E402

CONFIG = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
          "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "tie_word_embeddings": False, "max_position_embeddings": 8192}

CHILD = """
import json, sys
from fa_jax import readapt
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
cmd, args = sys.argv[1], json.loads(sys.argv[2])
getattr(readapt, cmd)(*args["args"], **args.get("kwargs", {}))
print(json.dumps({"peak": status("VmHWM"), "base": base}))
"""


def shapes():
    D, F, V, KV = 4096, 14336, 128256, 1024
    out = {"model.embed_tokens.weight": (V, D)}
    for i in range(2):
        p = f"model.layers.{i}"
        out.update({f"{p}.input_layernorm.weight": (D,), f"{p}.self_attn.q_proj.weight": (D, D),
                    f"{p}.self_attn.k_proj.weight": (KV, D), f"{p}.self_attn.v_proj.weight": (KV, D),
                    f"{p}.self_attn.o_proj.weight": (D, D), f"{p}.post_attention_layernorm.weight": (D,),
                    f"{p}.mlp.gate_proj.weight": (F, D), f"{p}.mlp.up_proj.weight": (F, D),
                    f"{p}.mlp.down_proj.weight": (D, F)})
    out["model.norm.weight"] = (D,)
    out["lm_head.weight"] = (V, D)
    return out


def make(path, seed):
    os.makedirs(path, exist_ok=True)
    json.dump(CONFIG, open(os.path.join(path, "config.json"), "w"))
    rng = np.random.default_rng(seed)
    bf16 = np.dtype(ml_dtypes.bfloat16)

    def fetch(shape):
        rows = shape[0]
        step = max(1, (16 << 20) // max(1, int(np.prod(shape[1:])) * 4))
        for i in range(0, rows, step):
            yield (0.02 * rng.standard_normal((min(rows, i + step) - i,) + shape[1:], np.float32)).astype(bf16)

    write(os.path.join(path, "model.safetensors"), [(n, s, bf16, lambda s=s: fetch(s)) for n, s in shapes().items()])


def run(cmd, args):
    t = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, cmd, json.dumps(args)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return (r["peak"] - r["base"]) / 2**30, time.time() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/readapt_mem")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    d = a.dir
    if not os.path.exists(os.path.join(d, "tuned", "model.safetensors")):
        shutil.rmtree(d, ignore_errors=True)
        make(os.path.join(d, "base"), 0)
        make(os.path.join(d, "tuned"), 1)
    size = os.path.getsize(os.path.join(d, "base", "model.safetensors")) / 2**30
    largest = max(int(np.prod(s)) for s in shapes().values())
    print(f"synthetic checkpoint: 2 Llama-3.1-8B layers + embeddings and head, bf16, {size:.2f} GiB per model; "
          f"largest tensor {largest * 2 / 2**30:.2f} GiB in bf16 ({largest * 4 / 2**30:.2f} GiB in float32)")
    for name in ("delta", "merged"):
        shutil.rmtree(os.path.join(d, name), ignore_errors=True)
    peak, sec = run("diff", {"args": [f"{d}/base", f"{d}/tuned", f"{d}/delta"]})
    print(f"fa-jax diff : peak host memory {peak:.2f} GiB ({peak / size:.2f}x one model), {sec:.0f} s")
    peak, sec = run("merge", {"args": [f"{d}/base", [[f"{d}/delta", 0.5]], f"{d}/merged"]})
    print(f"fa-jax merge: peak host memory {peak:.2f} GiB ({peak / size:.2f}x one model), {sec:.0f} s")
    if not a.keep:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
