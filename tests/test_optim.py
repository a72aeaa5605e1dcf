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


@pytest.mark.parametrize("warm", [0, 10])
def test_linear_schedule_matches_transformers(warm):
    """"linear" with end_lr_fraction 0 is Hugging Face's get_linear_schedule_with_warmup (the Trainer's "linear",
    which RE-Adapt's Table 4 names): lr * s / warm, then lr * max(0, (steps - s) / (steps - warm))."""
    import torch
    import transformers

    lr, steps = 2e-4, 100
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    hf = transformers.get_linear_schedule_with_warmup(opt, warm, steps)
    ours = optim.schedule(lr, steps, warm, "linear", 0.0)
    for s in range(steps + 1):
        assert float(ours(s)) == pytest.approx(lr * hf.lr_lambdas[0](s), rel=1e-5, abs=1e-12), s


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


def test_global_reductions_match_optax_and_visit_the_last_layer_first():
    import optax

    rng = np.random.default_rng(0)
    tree = {"model": {"layers": {str(i): {"q": {"lora_A": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)}}
                                 for i in range(12)}},
            "prompt": jnp.asarray(rng.standard_normal(4), jnp.float32)}
    np.testing.assert_allclose(float(optim.global_norm(tree)), float(optax.tree.norm(tree)), rtol=1e-6)
    order = optim.backward_ordered_leaves(tree)
    flat = dict(jax.tree_util.tree_leaves_with_path(tree))
    by_id = {id(v): jax.tree_util.keystr(k) for k, v in flat.items()}
    names = [by_id[id(x)] for x in order]
    assert names[0].startswith("['model']['layers']['11']") and names[10].startswith("['model']['layers']['1']")
    assert names[11].startswith("['model']['layers']['0']") and names[-1] == "['prompt']"
    assert bool(optim.all_finite(tree))
    tree["model"]["layers"]["3"]["q"]["lora_A"] = tree["model"]["layers"]["3"]["q"]["lora_A"].at[0, 0].set(jnp.inf)
    assert not bool(optim.all_finite(tree))


def test_skipping_gives_up_after_max_consecutive_nonfinite():
    params = {"w": jnp.ones(2)}
    opt, _ = optim.make_optimizer({"w": True}, lr=0.1, steps=10, warmup_steps=0, schedule_name="constant",
                                  clip_norm=None, max_consecutive_nonfinite=2)
    state = opt.init(params)
    bad = {"w": jnp.array([jnp.nan, 1.0])}
    moved = []
    for _ in range(4):
        updates, state = opt.update(bad, state, params)
        moved.append(bool(jnp.any(updates["w"] != 0)))
    assert moved == [False, False, True, True]  # the third bad step in a row is applied, as optax does
    assert int(optim.nonfinite_count(state)) == 4
