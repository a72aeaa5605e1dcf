"""treemath.combine: several adapters summed into one LoRA from their factors, under tau, rank or one global
parameter budget, against NumPy's dense SVD of the summed matrices."""
import jax.numpy as jnp
import numpy as np
import pytest

from fa_jax import treemath
from fa_jax.errors import FaJaxError
from fa_jax.tree import flatten

SHAPES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.mlp.up_proj": (16, 40),
          "model.layers.1.mlp.down_proj": (40, 16)}


def _lora(seed, rank, scale):
    rng = np.random.default_rng(seed)
    tree = {}
    for path, (i, o) in SHAPES.items():
        node = tree
        for part in path.split("."):
            node = node.setdefault(part, {})
        node.update(lora_A=jnp.asarray(rng.normal(size=(i, rank)), jnp.float32),
                    lora_B=jnp.asarray(rng.normal(size=(rank, o)), jnp.float32), scale=jnp.asarray(scale, jnp.float32))
    return tree


def _dense_sum(items):
    """{path: sum_i c_i * scale_i * A_i @ B_i} in float64."""
    out = {}
    for tree, c in items:
        flat = flatten(tree)
        for path in SHAPES:
            a, b = (np.asarray(flat[f"{path}.{k}"], np.float64) for k in ("lora_A", "lora_B"))
            m = c * float(flat[f"{path}.scale"]) * a @ b
            out[path] = out.get(path, 0) + m
    return out


ITEMS = [(_lora(0, 4, 2.0), 0.5), (_lora(1, 6, 1.0), 0.7), (_lora(2, 2, 0.5), -0.3)]


def _product(lora, path):
    flat = flatten(lora)
    if f"{path}.lora_A" not in flat:
        return 0.0
    return float(flat[f"{path}.scale"]) * np.asarray(flat[f"{path}.lora_A"], np.float64) @ np.asarray(
        flat[f"{path}.lora_B"], np.float64)


def test_rank_k_combination_is_the_truncated_svd_of_the_sum():
    """Singular values equal NumPy's of the dense sum (1e-5 relative); the rank-k LoRA's error is Eckart-Young's
    sqrt(sum of the dropped squared singular values)."""
    lora, report = treemath.combine(ITEMS, rank=5)
    for path, m in _dense_sum(ITEMS).items():
        s = np.linalg.svd(m, compute_uv=False)
        r = report["modules"][path]
        assert r["source"] == "factors" and r["rank"] == 5
        np.testing.assert_allclose(r["spectrum"][:12], s[:12], rtol=1e-5)
        err = np.linalg.norm(m - _product(lora, path))
        np.testing.assert_allclose(err, np.sqrt(np.sum(s[5:] ** 2)), rtol=1e-4)


def test_tau_picks_the_smallest_rank_reaching_it():
    _, report = treemath.combine(ITEMS, tau=0.8)
    for path, m in _dense_sum(ITEMS).items():
        e = np.linalg.svd(m, compute_uv=False) ** 2
        want = int(np.argmax(np.cumsum(e) / e.sum() >= 0.8 - 1e-12)) + 1
        assert report["modules"][path]["rank"] == want


def _numpy_budget(spectra, shapes, limit):
    """The global rule written independently: all directions by decreasing singular value, each kept in order
    when its matrix's in + out parameters fit."""
    items = sorted(((s, p, j) for p, sp in spectra.items() for j, s in enumerate(sp) if s > 1e-9),
                   key=lambda x: (-x[0], x[1], x[2]))
    ranks, left = dict.fromkeys(spectra, 0), limit
    for s, p, j in items:
        cost = sum(shapes[p])
        if ranks[p] == j and cost <= left:
            ranks[p], left = ranks[p] + 1, left - cost
    return ranks


@pytest.mark.parametrize("budget", [300, 0.3])
def test_one_budget_over_all_matrices(budget):
    lora, report = treemath.combine(ITEMS, budget=budget)
    dense = _dense_sum(ITEMS)
    spectra = {p: np.linalg.svd(m, compute_uv=False) for p, m in dense.items()}
    limit = budget if isinstance(budget, int) else int(budget * sum(i * o for i, o in SHAPES.values()))
    want = _numpy_budget(spectra, SHAPES, limit)
    assert {p: report["modules"][p]["rank"] for p in SHAPES} == want
    assert report["params"] == sum(want[p] * sum(SHAPES[p]) for p in SHAPES) <= limit
    assert len(set(want.values())) > 1  # the budget is not spread evenly: the larger singular values won
    assert report["rank_pattern"] == {p: r for p, r in want.items() if r}
    for path, m in dense.items():
        k = want[path]
        np.testing.assert_allclose(np.linalg.norm(m - _product(lora, path)), np.sqrt(np.sum(spectra[path][k:] ** 2)),
                                   rtol=1e-4)


def test_dense_terms_are_summed_densely():
    """A dense `kernel` delta among the adapters: that module is decomposed from the dense sum."""
    path = "model.layers.0.self_attn.q_proj"
    d = np.random.default_rng(5).normal(size=SHAPES[path])
    dense_tree = {"model": {"layers": {"0": {"self_attn": {"q_proj": {"kernel": jnp.asarray(d, jnp.float32)}}}}}}
    _, report = treemath.combine(ITEMS[:1] + [(dense_tree, 2.0)], rank=3)
    assert report["modules"][path]["source"] == "dense"
    assert report["modules"]["model.layers.0.mlp.up_proj"]["source"] == "factors"
    m = _dense_sum(ITEMS[:1])[path] + 2.0 * d
    np.testing.assert_allclose(report["modules"][path]["spectrum"], np.linalg.svd(m, compute_uv=False), rtol=1e-5)


def test_errors():
    with pytest.raises(FaJaxError, match="exactly one of tau, rank or budget"):
        treemath.combine(ITEMS, tau=0.5, rank=2)
    with pytest.raises(FaJaxError, match="budget=1.5"):
        treemath.combine(ITEMS, budget=1.5)
    other = _lora(3, 2, 1.0)
    other["model"]["layers"]["0"]["mlp"]["up_proj"]["lora_B"] = jnp.zeros((2, 8))
    with pytest.raises(FaJaxError, match="up_proj has matrices of different shapes"):
        treemath.combine([ITEMS[0], (other, 1.0)], rank=2)
    with pytest.raises(FaJaxError, match="no adapters"):
        treemath.combine([], rank=2)


def test_merge_as_lora_writes_a_peft_adapter(hf_dirs, tmp_path):
    """`fa-jax merge --as-lora`: two PEFT LoRAs at 0.5 and 0.7 as one PEFT LoRA. At full rank PEFT's logits equal
    transformers with both deltas added to the weights; under a budget the per-module ranks go to rank_pattern and
    PEFT loads them as fa_jax does."""
    import copy
    import json

    import jax
    import torch
    from peft import PeftModel

    import fa_jax
    from fa_jax import lora as lora_lib
    from fa_jax.cli import main
    from fa_jax.models import transformer

    base_dir, torch_model = hf_dirs["llama"]
    config, params = fa_jax.load_model(base_dir)
    dirs, trees = [], []
    for i, r in enumerate((2, 3)):
        ad = lora_lib.init_lora(config, jax.random.PRNGKey(i), rank=r, alpha=2.0 * r)
        ad = jax.tree_util.tree_map_with_path(
            lambda p, x: jax.random.normal(jax.random.PRNGKey(7 + i), x.shape) * 0.05
            if jax.tree_util.keystr(p).endswith("'lora_B']") else x, ad)
        d = str(tmp_path / f"a{i}")
        fa_jax.save_peft(config, ad, d)
        dirs.append(d)
        trees.append(ad)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 9))

    def peft_logits(out):
        m = PeftModel.from_pretrained(copy.deepcopy(torch_model), out).eval()
        with torch.no_grad():
            return m(torch.tensor(tokens)).logits.numpy()

    out = str(tmp_path / "full")
    assert main(["merge", "--base", base_dir, "--adapter", f"{dirs[0]}:0.5", "--adapter", f"{dirs[1]}:0.7",
                 "--as-lora", "--rank", "5", "--out", out]) == 0
    ref = copy.deepcopy(torch_model)
    named = dict(ref.named_modules())
    for tree, c in zip(trees, (0.5, 0.7)):
        for path, ad in lora_lib.iter_modules(tree):
            delta = c * float(ad["scale"]) * np.asarray(ad["lora_A"], np.float64) @ np.asarray(ad["lora_B"], np.float64)
            lin = named[path]
            with torch.no_grad():
                lin.weight += torch.tensor(delta.T, dtype=lin.weight.dtype)
    with torch.no_grad():
        want = ref.eval()(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(peft_logits(out), want, rtol=1e-4, atol=1e-4)

    out = str(tmp_path / "budget")
    assert main(["merge", "--base", base_dir, "--adapter", f"{dirs[0]}:0.5", "--adapter", f"{dirs[1]}:0.7",
                 "--as-lora", "--budget", "0.02", "--out", out]) == 0
    pattern = json.load(open(f"{out}/adapter_config.json")).get("rank_pattern") or {}
    combined, report = treemath.combine([(t, c) for t, c in zip(trees, (0.5, 0.7))], budget=0.02)
    assert len(set(report["rank_pattern"].values())) > 1 and pattern
    mine = transformer.forward(config, params, jnp.asarray(tokens), fa_jax.load_peft(config, out))
    np.testing.assert_allclose(peft_logits(out), np.asarray(mine), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(transformer.forward(config, params, jnp.asarray(tokens), combined)),
                               np.asarray(mine), rtol=1e-5, atol=1e-5)
