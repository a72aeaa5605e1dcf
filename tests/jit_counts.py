"""How often JAX traced and XLA compiled each jitted function while a block ran, read from JAX's own monitoring
events (`jax.monitoring`): how tests check that nothing recompiles per step or per generated token, without a
counter in the code under test.

    with jit_counts() as n:
        train.pretrain(cfg)
    assert n.traces["train_step"] == 1 and n.compiles["train_step"] == 1

Names are those JAX reports: the Python function's `__name__` (`jax.jit(f)` of `def train_step` is "train_step").
Only top-level traces are reported (a jitted function called inside another's trace is part of that trace).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses

import jax

# jax._src.dispatch.JAXPR_TRACE_EVENT and BACKEND_COMPILE_EVENT: one event per trace of a jitted function for a new
# signature, one per XLA compilation (with the function's name as "jit(name)")
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class JitCounts:
    traces: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    compiles: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@contextlib.contextmanager
def jit_counts():
    """A `JitCounts` filled while the block runs: traces[name] and compiles[name] per jitted function."""
    counts = JitCounts()

    def listen(event, duration, **kw):
        name = str(kw.get("fun_name", ""))
        if event == TRACE_EVENT:
            counts.traces[name] += 1
        elif event == COMPILE_EVENT:
            counts.compiles[name.removeprefix("jit(").removesuffix(")")] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
