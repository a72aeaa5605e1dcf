"""Multi-host start-up: one fa_jax process per host, joined by `jax.distributed.initialize` before JAX touches a device.

    fa-jax pretrain --distributed --config ...          # on every host of a TPU pod slice (scripts/launch_tpu_pod.sh)

With FA_JAX_COORDINATOR=HOST:PORT, FA_JAX_NUM_PROCESSES=N and FA_JAX_PROCESS_ID=I set, those are used (any cluster;
two processes on 127.0.0.1 in the tests). Without them JAX finds the cluster itself (Cloud TPU pod slices, SLURM,
Open MPI). Each process then loads only its own shards of the models and reads only its rows of the data.
"""
from __future__ import annotations

import os

import jax

from fa_jax.errors import FaJaxError

ENV = ("FA_JAX_COORDINATOR", "FA_JAX_NUM_PROCESSES", "FA_JAX_PROCESS_ID")


def initialize(timeout_s: int = 300) -> tuple[int, int]:
    """Join the cluster; returns (process index, process count)."""
    given = {k: os.environ[k] for k in ENV if os.environ.get(k)}
    if given and len(given) != len(ENV):
        missing = ", ".join(k for k in ENV if k not in given)
        raise FaJaxError(f"--distributed: {', '.join(given)} set but {missing} not: set all three or none")
    if given:
        address = given["FA_JAX_COORDINATOR"]
        try:
            n, i = int(given["FA_JAX_NUM_PROCESSES"]), int(given["FA_JAX_PROCESS_ID"])
        except ValueError:
            raise FaJaxError(f"--distributed: FA_JAX_NUM_PROCESSES={given['FA_JAX_NUM_PROCESSES']!r} and "
                             f"FA_JAX_PROCESS_ID={given['FA_JAX_PROCESS_ID']!r} must be integers") from None
        if not 0 <= i < n:
            raise FaJaxError(f"--distributed: FA_JAX_PROCESS_ID={i} is not in [0, FA_JAX_NUM_PROCESSES={n})")
        kw = {}
        if address.startswith(("127.", "localhost")):  # a single machine: keep the coordinator off the network
            kw["coordinator_bind_address"] = address
        jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=i,
                                   initialization_timeout=timeout_s, **kw)
    else:
        jax.distributed.initialize(initialization_timeout=timeout_s)
    return jax.process_index(), jax.process_count()
