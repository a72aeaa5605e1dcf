"""Loading reads tensor by tensor: host memory grows by about one model size, not two."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from fa_jax.io.safetensors import write

SCRIPT = textwrap.dedent("""
    import sys, jax, numpy as np
    import fa_jax

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    jax.numpy.zeros(1).block_until_ready()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS")
    config, params = fa_jax.load_model(sys.argv[1])
    jax.block_until_ready(params)
    print(status("VmHWM") - base)
""")


def test_load_peak_host_memory_near_one_model_size(tmp_path):
    cfg = dict(model_type="llama", vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=8, rope_theta=10000.0, tie_word_embeddings=False)
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    D, F, V = 1024, 4096, 8192
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(4):
        for n in ("q", "k", "v", "o"):
            shapes[f"model.layers.{i}.self_attn.{n}_proj.weight"] = (D, D)
        shapes[f"model.layers.{i}.mlp.gate_proj.weight"] = (F, D)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (F, D)
        shapes[f"model.layers.{i}.mlp.down_proj.weight"] = (D, F)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (D,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (D,)
    rng = np.random.default_rng(0)
    write(str(tmp_path / "model.safetensors"),
          [(n, s, np.dtype(np.float32), lambda s=s: np.full(s, 0.5, np.float32)) for n, s in shapes.items()])
    model_bytes = sum(4 * int(np.prod(s)) for s in shapes.values())  # ~320 MB, largest tensor 5% of it
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True,
                         env={**os.environ, "XLA_FLAGS": ""})
    grown = int(out.stdout.strip().splitlines()[-1])
    # Measured here: 1.3x (glibc keeps some freed per-tensor buffers in its heap); a loader holding a second copy
    # of the model (e.g. memory-mapped pages beside the converted arrays) measured 2.0x.
    assert grown < 1.5 * model_bytes, (grown, model_bytes)
