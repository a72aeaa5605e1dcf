"""distill_loss against a PyTorch implementation of the same formula; chunked_distill_loss against distill_loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fa_jax import losses

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _batch(seed, b=3, t=11, vs=50, vt=50, scale=3.0):
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal((b, t, vs)) * scale).astype(np.float32)
    te = (rng.standard_normal((b, t, vt)) * scale).astype(np.float32)
    labels = rng.integers(0, min(vs, vt), (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.float32)
    mask[0, -4:] = 0  # right padding
    mask[1, :2] = 0   # left padding
    return s, te, labels, mask


def torch_distill(s, t, labels, mask, alpha, temperature, divergence, beta):
    """The formula in PyTorch, float64: kl_div / log_softmax / cross_entropy with ignore_index for padding."""
    ls, lt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    if divergence == "forward_kl":    # kl_div(input, target) = KL(target || input)
        kd = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    elif divergence == "reverse_kl":
        kd = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)
    else:
        lm = (beta * lt.exp() + (1 - beta) * ls.exp()).log()
        kd = (beta * F.kl_div(lm, lt, log_target=True, reduction="none").sum(-1)
              + (1 - beta) * F.kl_div(lm, ls, log_target=True, reduction="none").sum(-1))
    n = mask.sum()
    targets = torch.where(mask > 0, labels, torch.full_like(labels, -100))
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return alpha * temperature ** 2 * (kd * mask).sum() / n + (1 - alpha) * ce / n


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_distill_loss_matches_torch(divergence):
    s, t, labels, mask = _batch(0)
    for alpha, temperature, beta in [(0.5, 1.0, 0.5), (0.0, 2.0, 0.1), (1.0, 0.7, 0.9), (0.3, 4.0, 0.5)]:
        def f(x):
            return losses.distill_loss(x, t, labels, mask, alpha=alpha, temperature=temperature,
                                       divergence=divergence, beta=beta)
        (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(s)
        st = torch.tensor(s, dtype=torch.float64, requires_grad=True)
        ref = torch_distill(st, torch.tensor(t, dtype=torch.float64), torch.tensor(labels, dtype=torch.long),
                            torch.tensor(mask, dtype=torch.float64), alpha, temperature, divergence, beta)
        ref.backward()
        np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(grad), st.grad.numpy(), rtol=1e-5, atol=1e-5)
        assert float(metrics["loss"]) == float(loss)
        np.testing.assert_allclose(float(loss), alpha * temperature ** 2 * float(metrics["kd"])
                                   + (1 - alpha) * float(metrics["lm"]), rtol=1e-6)
    agree = ((s.argmax(-1) == t.argmax(-1)) * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(metrics["agreement"]), agree, rtol=1e-6)
    assert float(metrics["tokens"]) == mask.sum()


def test_padding_rows_with_extreme_logits_change_nothing():
    s, t, labels, mask = _batch(1)
    s2, t2 = s.copy(), t.copy()
    s2[0, -4:] = np.array([np.inf, -np.inf, np.nan, 3e38])[:, None]
    t2[0, -4:] = np.array([-3e38, np.nan, np.inf, 1e30])[:, None]
    s2[1, 0, ::2], t2[1, 1, 1::2] = 3e38, -3e38
    labels2 = labels.copy()
    labels2[0, -1] = -100
    for divergence in DIVERGENCES:
        def f(x, y, lab):
            return losses.distill_loss(x, y, lab, mask, temperature=2.0, divergence=divergence)[0]
        lv, g = jax.value_and_grad(f)(s, t, labels)
        lv2, g2 = jax.value_and_grad(f)(s2, t2, labels2)
        assert np.isfinite(float(lv2)) and np.all(np.isfinite(np.asarray(g2)))
        np.testing.assert_allclose(float(lv2), float(lv), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(g2), np.asarray(g), rtol=1e-6, atol=1e-8)


def test_normalizer_lets_micro_batches_add_up():
    s, t, labels, mask = _batch(2, b=4)
    full = losses.distill_loss(s, t, labels, mask, alpha=0.3, temperature=2.0)
    parts = [losses.distill_loss(s[i:i + 2], t[i:i + 2], labels[i:i + 2], mask[i:i + 2], alpha=0.3,
                                 temperature=2.0, normalizer=mask.sum()) for i in (0, 2)]
    for key in ("loss", "kd", "lm", "agreement", "tokens"):
        np.testing.assert_allclose(sum(float(p[1][key]) for p in parts), float(full[1][key]), rtol=1e-5)


def test_forward_kl_of_identical_logits_is_zero():
    s, _, labels, mask = _batch(3)
    _, metrics = losses.distill_loss(s, s, labels, mask, temperature=1.5)
    assert abs(float(metrics["kd"])) < 1e-6
    assert float(metrics["agreement"]) == pytest.approx(1.0)


def test_jsd_limits():
    s, t, labels, mask = _batch(4)
    kd = {d: float(losses.distill_loss(s, t, labels, mask, divergence=d, temperature=2.0)[1]["kd"])
          for d in ("forward_kl", "reverse_kl")}

    def jsd(beta):
        return float(losses.distill_loss(s, t, labels, mask, divergence="jsd", beta=beta, temperature=2.0)[1]["kd"])

    for eps in (1e-2, 1e-3):  # JSD / beta -> KL(teacher || student), JSD / (1 - beta) -> KL(student || teacher)
        assert jsd(eps) / eps == pytest.approx(kd["forward_kl"], rel=10 * eps)
        assert jsd(1 - eps) / eps == pytest.approx(kd["reverse_kl"], rel=10 * eps)
    assert 0 < jsd(0.5) <= np.log(2)
    with pytest.raises(ValueError):
        losses.distill_loss(s, t, labels, mask, divergence="jsd", beta=0.0)
    with pytest.raises(ValueError):
        losses.distill_loss(s, t, labels, mask, divergence="kl")


def test_shared_vocab_ignores_padding_rows():
    s, t, labels, mask = _batch(5, vs=48, vt=56)
    ref = losses.distill_loss(s, t[..., :48], labels, mask, divergence="jsd")
    got = losses.distill_loss(s, t, labels, mask, divergence="jsd")
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-7)


def _hidden(seed, b=2, t=37, ds=16, dt=24, vs=56, vt=50):
    rng = np.random.default_rng(seed)
    hs = rng.standard_normal((b, t, ds)).astype(np.float32)
    ht = rng.standard_normal((b, t, dt)).astype(np.float32)
    ws = (rng.standard_normal((ds, vs)) / np.sqrt(ds) * 3).astype(np.float32)
    wt = (rng.standard_normal((dt, vt)) / np.sqrt(dt) * 3).astype(np.float32)
    labels = rng.integers(0, min(vs, vt), (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.float32)
    mask[0, -5:] = 0
    mask[1, :3] = 0
    return hs, ws, ht, wt, labels, mask


@pytest.mark.parametrize("divergence,chunk", [("forward_kl", 8), ("reverse_kl", 16), ("jsd", 8)])
def test_chunked_matches_reference(divergence, chunk):
    hs, ws, ht, wt, labels, mask = _hidden(6)  # T = 37: not a multiple of the chunk size
    kw = dict(alpha=0.4, temperature=2.0, divergence=divergence, beta=0.3)

    def ref(h):
        return losses.distill_loss(h @ ws, ht @ wt, labels, mask, **kw)

    def chunked(h):
        return losses.chunked_distill_loss(h, ws, ht, wt, labels, mask, chunk_size=chunk, **kw)

    (loss, metrics), grad = jax.value_and_grad(ref, has_aux=True)(hs)
    (closs, cmetrics), cgrad = jax.jit(jax.value_and_grad(chunked, has_aux=True))(hs)
    np.testing.assert_allclose(float(closs), float(loss), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cgrad), np.asarray(grad), rtol=1e-5, atol=1e-5)
    for key in metrics:
        np.testing.assert_allclose(float(cmetrics[key]), float(metrics[key]), rtol=1e-5, atol=1e-6)
    # no gradient requested: the plain (primal) path gives the same numbers
    np.testing.assert_allclose(float(jax.jit(chunked)(hs)[0]), float(loss), rtol=1e-5, atol=1e-5)


def test_chunked_gradients_reach_student_hidden_only_and_scale_with_cotangent():
    hs, ws, ht, wt, labels, mask = _hidden(7, t=16)

    def f(h, w, t_h, t_w):
        loss, _ = losses.chunked_distill_loss(h, w, t_h, t_w, labels, mask, chunk_size=4, temperature=1.0)
        return 3.0 * loss

    gh, gw, gth, gtw = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(hs, ws, ht, wt)
    ref = jax.grad(lambda h: 3.0 * losses.distill_loss(h @ ws, ht @ wt, labels, mask)[0])(hs)
    np.testing.assert_allclose(np.asarray(gh), np.asarray(ref), rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(gw)) and not np.any(np.asarray(gth)) and not np.any(np.asarray(gtw))


def test_chunked_takes_traced_hyperparameters():
    hs, ws, ht, wt, labels, mask = _hidden(9, t=12)

    @jax.jit
    def f(h, alpha, temperature, beta):
        return losses.chunked_distill_loss(h, ws, ht, wt, labels, mask, alpha=alpha, temperature=temperature,
                                           divergence="jsd", beta=beta, chunk_size=5)[0]

    loss, grad = jax.value_and_grad(f)(hs, 0.3, 1.0, 0.2)
    ref = jax.jit(jax.value_and_grad(lambda h: losses.chunked_distill_loss(
        h, ws, ht, wt, labels, mask, alpha=0.3, temperature=1.0, divergence="jsd", beta=0.2, chunk_size=5)[0]))(hs)
    np.testing.assert_allclose(float(loss), float(ref[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref[1]), rtol=1e-5, atol=1e-7)


def test_without_teacher_is_cross_entropy():
    hs, ws, _, _, labels, mask = _hidden(10, t=20)
    (loss, metrics), grad = jax.jit(jax.value_and_grad(lambda h: losses.chunked_distill_loss(
        h, ws, None, None, labels, mask, alpha=0.0, chunk_size=8), has_aux=True))(hs)
    ref, ref_grad = jax.value_and_grad(lambda h: losses.distill_loss(h @ ws, None, labels, mask, alpha=0.0)[0])(hs)
    ht = torch.tensor(hs, dtype=torch.float64, requires_grad=True)
    targets = torch.where(torch.tensor(mask) > 0, torch.tensor(labels, dtype=torch.long), -100)
    ce = F.cross_entropy((ht @ torch.tensor(ws, dtype=torch.float64)).reshape(-1, ws.shape[1]), targets.reshape(-1))
    ce.backward()
    for value in (loss, ref, metrics["lm"]):
        np.testing.assert_allclose(float(value), ce.item(), rtol=1e-5)
    for g in (grad, ref_grad):
        np.testing.assert_allclose(np.asarray(g), ht.grad.numpy(), rtol=1e-5, atol=1e-7)
    assert float(metrics["kd"]) == 0 and float(metrics["agreement"]) == 0
    with pytest.raises(ValueError):
        losses.chunked_distill_loss(hs, ws, None, None, labels, mask, alpha=0.5)


def test_chunked_bf16_hidden():
    hs, ws, ht, wt, labels, mask = _hidden(8, t=32)

    def f(h):
        return losses.chunked_distill_loss(h, ws, ht.astype(jnp.bfloat16), wt, labels, mask, chunk_size=8)[0]

    loss, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(hs, jnp.bfloat16))
    ref, ref_grad = jax.jit(jax.value_and_grad(f))(hs)
    assert grad.dtype == jnp.bfloat16 and loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), float(ref), rtol=2e-2)
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(ref_grad), rtol=0.1, atol=2e-4)


def test_chunked_needs_a_fraction_of_the_memory():
    b, t, d, v = 2, 1024, 64, 32000
    hs = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    labels = jax.ShapeDtypeStruct((b, t), jnp.int32)
    mask = jax.ShapeDtypeStruct((b, t), jnp.float32)

    def ref(h, ws, ht, wt, lab, m):
        return losses.distill_loss(h @ ws, ht @ wt, lab, m)

    def chunked(h, ws, ht, wt, lab, m):
        return losses.chunked_distill_loss(h, ws, ht, wt, lab, m, chunk_size=128)

    temp = {}
    for name, f in (("reference", ref), ("chunked", chunked)):
        compiled = jax.jit(jax.value_and_grad(f, has_aux=True)).lower(hs, w, hs, w, labels, mask).compile()
        temp[name] = compiled.memory_analysis().temp_size_in_bytes
    print(f"value_and_grad temp memory, B={b} T={t} V={v}: reference {temp['reference'] / 2**20:.1f} MiB, "
          f"chunked {temp['chunked'] / 2**20:.1f} MiB ({temp['reference'] / temp['chunked']:.1f}x)")
    assert temp["reference"] >= 3 * temp["chunked"]


def test_chunked_takes_vocab_major_heads():
    """A tied head given as the [V, D] embedding gives the numbers of its [D, V] transpose, padding rows too."""
    hs, ws, ht, wt, labels, mask = _hidden(9)  # Vs 56, Vt 50: the shared 50 entries count

    def run(**kw):
        sw = ws.T.copy() if kw.get("student_head_vd") else ws
        tw = wt.T.copy() if kw.get("teacher_head_vd") else wt
        return jax.value_and_grad(lambda h: losses.chunked_distill_loss(h, sw, ht, tw, labels, mask, chunk_size=8,
                                                                        **kw)[0])(hs)

    want, want_g = run()
    for kw in ({"student_head_vd": True}, {"teacher_head_vd": True}, {"student_head_vd": True, "teacher_head_vd": True}):
        got, got_g = run(**kw)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(got_g), np.asarray(want_g), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_chunked_token_terms_add_up_to_the_metrics(divergence):
    """Per-token (kd, agreement, ce) from chunked_token_terms: zero on padding, their sums the metrics of
    chunked_distill_loss at normalizer 1, each token's kd the reference formula; without a teacher, ce only."""
    hs, ws, ht, wt, labels, mask = _hidden(10)  # T = 37, chunk 8: a padded last chunk; Vs 56, Vt 50
    kw = dict(temperature=2.0, divergence=divergence, beta=0.3, chunk_size=8)
    terms = np.asarray(jax.jit(lambda h: losses.chunked_token_terms(h, ws, ht, wt, labels, mask, **kw))(hs))
    assert terms.shape == hs.shape[:2] + (3,)
    assert not terms[mask == 0].any()
    _, m = losses.chunked_distill_loss(hs, ws, ht, wt, labels, mask, alpha=0.5, normalizer=1.0, **kw)
    np.testing.assert_allclose(terms.sum((0, 1)), [float(m["kd"]), float(m["agreement"]), float(m["lm"])],
                               rtol=1e-5)
    one = losses.distill_loss((hs @ ws)[:1, 5:6], (ht @ wt)[:1, 5:6], labels[:1, 5:6], mask[:1, 5:6],
                              normalizer=1.0, temperature=2.0, divergence=divergence, beta=0.3)[1]
    np.testing.assert_allclose(terms[0, 5], [float(one["kd"]), float(one["agreement"]), float(one["lm"])], rtol=1e-5)
    alone = np.asarray(losses.chunked_token_terms(hs, ws, None, None, labels, mask, chunk_size=8))
    np.testing.assert_allclose(alone[..., 2].sum(), float(losses.chunked_distill_loss(
        hs, ws, None, None, labels, mask, alpha=0.0, normalizer=1.0, chunk_size=8)[1]["lm"]), rtol=1e-5)
    assert not alone[..., :2].any()
