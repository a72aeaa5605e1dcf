"""Learning-rate schedules against their formulas (NumPy), and skipping of non-finite updates."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fa_jax import optim
from fa_jax.errors import FaJaxError


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_schedule_matches_formula(decay):
    lr, steps, warm, end = 1e-3, 100, 10, 0.1
    sched = optim.schedule(lr, steps, warm, decay, end)
    for s in (0, 5, 10, 37, 70, 100):
        if s < warm:
            want = lr * s / warm
        else:
            frac = (s - warm) / (steps - warm)
            want = {"cosine": lr * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * frac))),
                    "linear": lr + (lr * end - lr) * frac, "constant": lr}[decay]
        assert float(sched(s)) == pytest.approx(want, rel=1e-5, abs=1e-12), (decay, s)


def test_unknown_schedule():
    with pytest.raises(FaJaxError, match="optim.schedule='step'"):
        optim.schedule(1e-3, 10, 0, "step")


def test_masked_adamw_clips_skips_nonfinite_and_leaves_constants_alone():
    params = {"w": jnp.ones(3), "scale": jnp.float32(2.0)}
    mask = {"w": True, "scale": False}
    opt, _ = optim.make_optimizer(mask, lr=0.1, steps=10, warmup_steps=0, schedule_name="constant",
                                  weight_decay=0.5, clip_norm=1.0)
    state = opt.init(params)
    grads = {"w": jnp.array([3.0, 4.0, 0.0]), "scale": jnp.float32(0.0)}
    updates, state = opt.update(grads, state, params)
    # Adam's first step moves each coordinate by lr * sign(g) (clipping rescales g, not its sign), plus decay
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.1 * (np.array([1, 1, 0]) + 0.5 * 1.0), rtol=1e-4)
    assert float(updates["scale"]) == 0.0  # a constant: no decay, no update
    bad = {"w": jnp.array([jnp.nan, 1.0, 1.0]), "scale": jnp.float32(0.0)}
    updates, state = opt.update(bad, state, params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
    assert int(optim.nonfinite_count(state)) == 1
