"""One process of the two-process pre-training test (run by tests/test_multiprocess.py, not by pytest itself).

    python tests/multiprocess_pretrain.py PROCESS_ID PORT CONFIG_JSON [CACHE_DIR CACHED_CONFIG_JSON]

With CACHE_DIR, the two processes then write the teacher cache of CONFIG_JSON there (each its own rows) and train
CACHED_CONFIG_JSON (which reads it).
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

process_id, port, cfg_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                           coordinator_bind_address=f"127.0.0.1:{port}", initialization_timeout=60)
assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4

from fa_jax import train  # noqa: E402
from jit_counts import jit_counts  # noqa: E402  (this script's directory is on sys.path)

with jit_counts() as n:
    summary = train.pretrain(json.load(open(cfg_path)))
print("DONE", process_id, summary["step"], n.traces["train_step"])  # traces of the step: 1, none per step
if len(sys.argv) > 4:
    from fa_jax import precompute  # noqa: E402

    precompute.teacher_cache(json.load(open(cfg_path)), sys.argv[4])
    summary = train.pretrain(json.load(open(sys.argv[5])))
    print("CACHED", process_id, summary["step"])
