"""The optimizer for adapters: AdamW with warm-up then cosine / linear / constant decay, global-norm clipping,
optional skipping of non-finite updates. Leaves that `trainable_mask` marks as constants (LoRA `scale`) get no
optimizer state and are never updated."""
from __future__ import annotations

import optax

from fa_jax.errors import FaJaxError

SCHEDULES = ("cosine", "linear", "constant")


def schedule(lr: float, steps: int, warmup_steps: int = 0, decay: str = "cosine", end_lr_fraction: float = 0.0):
    """Learning rate per step: linear warm-up from 0 to `lr`, then decay to `lr * end_lr_fraction` at `steps`."""
    if decay not in SCHEDULES:
        raise FaJaxError(f"optim.schedule={decay!r}: expected one of {', '.join(SCHEDULES)}")
    warmup_steps = max(0, min(int(warmup_steps), int(steps)))
    rest = max(1, int(steps) - warmup_steps)
    end = lr * end_lr_fraction
    if decay == "cosine":
        after = optax.cosine_decay_schedule(lr, rest, alpha=end_lr_fraction)
    elif decay == "linear":
        after = optax.linear_schedule(lr, end, rest)
    else:
        after = optax.constant_schedule(lr)
    if not warmup_steps:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after], [warmup_steps])


def make_optimizer(mask, *, lr: float, steps: int, warmup_steps: int = 0, schedule_name: str = "cosine",
                   end_lr_fraction: float = 0.0, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, clip_norm: float | None = 1.0, skip_nonfinite: bool = True,
                   max_consecutive_nonfinite: int = 10):
    """(optimizer, learning-rate schedule). `mask` is the adapters' `trainable_mask` tree (or a function of it)."""
    sched = schedule(lr, steps, warmup_steps, schedule_name, end_lr_fraction)
    parts = []
    if clip_norm:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    opt = optax.masked(optax.chain(*parts), mask)
    if skip_nonfinite:
        opt = optax.apply_if_finite(opt, max_consecutive_errors=max_consecutive_nonfinite)
    return opt, sched


def nonfinite_count(opt_state) -> int | None:
    """How many updates `apply_if_finite` has skipped so far (None when skipping is off)."""
    if isinstance(opt_state, optax.ApplyIfFiniteState):
        return opt_state.total_notfinite
    return None
