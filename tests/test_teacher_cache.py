"""The teacher top-k cache: the sparse KD term against NumPy and the full loss, `fa-jax teacher-cache` files, and
pre-training from a cache against the live teacher (same losses at k = vocabulary), resume, and mismatches."""
import contextlib
import glob
import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fa_jax import losses, precompute, run_config, train, validation
from fa_jax import teacher_cache as tc
from fa_jax.cli import main
from fa_jax.errors import FaJaxError
from fa_jax.io import safetensors
from fa_jax.io.load import load_model_config
from test_train import _cfg, _losses


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _coarse_reference(s_logits, t_logits, k, temperature, divergence, beta=0.5):
    """Per-token divergence of the coarse distributions (top k of the teacher + one bucket), in float64 NumPy."""
    lt, ls = _log_softmax(t_logits / temperature), _log_softmax(s_logits / temperature)
    order = np.argsort(-lt, axis=-1, kind="stable")[..., :k]
    pt, ps = np.exp(lt), np.exp(ls)
    pk, qk = np.take_along_axis(pt, order, -1), np.take_along_axis(ps, order, -1)
    p = np.concatenate([pk, 1 - pk.sum(-1, keepdims=True)], -1)
    q = np.concatenate([qk, 1 - qk.sum(-1, keepdims=True)], -1)
    kl = lambda a, b: np.sum(np.where(a > 0, a * (np.log(np.where(a > 0, a, 1)) - np.log(b)), 0), -1)
    if divergence == "forward_kl":
        return kl(p, q)
    if divergence == "reverse_kl":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def _problem(seed=0, B=2, T=10, D=8, V=33):
    rng = np.random.default_rng(seed)
    hs = rng.normal(size=(B, T, D)).astype(np.float32)
    head = rng.normal(size=(D, V)).astype(np.float32)
    t_logits = (rng.normal(size=(B, T, V)) * 3).astype(np.float32)
    labels = rng.integers(0, V, (B, T))
    mask = (rng.random((B, T)) > 0.3).astype(np.int32)
    return hs, head, t_logits, labels, mask


def _topk(t_logits, k, temperature):
    lt = _log_softmax(t_logits.astype(np.float64) / temperature)
    ids = np.argsort(-lt, axis=-1, kind="stable")[..., :k]
    logp = np.take_along_axis(lt, ids, -1)
    rest = np.exp(lt).sum(-1) - np.exp(logp).sum(-1)
    tail = np.log(np.maximum(rest, 0)) if k < lt.shape[-1] else np.full(lt.shape[:-1], -np.inf)
    return losses.TopK(jnp.asarray(ids, jnp.int32), jnp.asarray(logp, jnp.float32), jnp.asarray(tail, jnp.float32))


@pytest.mark.parametrize("divergence", losses.DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_cache_equals_the_full_loss(divergence, temperature):
    """k = V: loss, metrics and the gradient equal distill_loss on full logits (float32 rounding)."""
    hs, head, t_logits, labels, mask = _problem()
    V = head.shape[1]
    cached = _topk(t_logits, V, temperature)
    kw = dict(temperature=temperature, divergence=divergence, alpha=0.7)
    f = lambda h: losses.cached_distill_loss(h, head, cached, labels, mask, vocab=V, chunk_size=4, **kw)
    g = lambda h: losses.distill_loss(h @ head, t_logits, labels, mask, **kw)
    (a, ma), ga = jax.value_and_grad(f, has_aux=True)(jnp.asarray(hs))
    (b, mb), gb = jax.value_and_grad(g, has_aux=True)(jnp.asarray(hs))
    np.testing.assert_allclose(a, b, rtol=2e-6)
    for key in ("kd", "lm", "agreement", "tokens"):
        np.testing.assert_allclose(ma[key], mb[key], rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("divergence", losses.DIVERGENCES)
def test_top_k_cache_is_the_coarse_divergence(divergence):
    """k < V: the KD term is the divergence over the k tokens plus one tail bucket (NumPy, float64), and for the
    forward KL never above the full KL; the gradient is finite; garbage in masked rows changes nothing."""
    hs, head, t_logits, labels, mask = _problem(seed=1)
    V, k, temperature = head.shape[1], 5, 1.5
    cached = _topk(t_logits, k, temperature)
    ref = _coarse_reference((hs @ head).astype(np.float64), t_logits.astype(np.float64), k, temperature, divergence)
    terms = lambda c: losses.cached_distill_loss(jnp.asarray(hs), head, c, labels, mask, vocab=V, chunk_size=4,
                                                 temperature=temperature, divergence=divergence)
    _, m = terms(cached)
    np.testing.assert_allclose(m["kd"], (ref * mask).sum() / mask.sum(), rtol=1e-5)
    if divergence == "forward_kl":
        full = losses.distill_loss(hs @ head, t_logits, labels, mask, temperature=temperature)[1]["kd"]
        assert m["kd"] <= full + 1e-6
    grad = jax.grad(lambda h: losses.cached_distill_loss(h, head, cached, labels, mask, vocab=V, chunk_size=4,
                                                         divergence=divergence, temperature=temperature)[0])(
        jnp.asarray(hs))
    assert np.isfinite(grad).all()
    off = mask == 0
    poisoned = losses.TopK(jnp.where(off[..., None], 0, cached.ids), jnp.where(off[..., None], jnp.nan, cached.logp),
                           jnp.where(off, jnp.inf, cached.tail))
    _, m2 = terms(poisoned)
    np.testing.assert_allclose(m2["kd"], m["kd"], rtol=1e-6)


def test_teacher_topk_against_numpy():
    """ids, log-probabilities and tail of `losses.teacher_topk` equal a NumPy sort of the log-softmax."""
    hs, head, _, _, _ = _problem(seed=2, T=7)
    got = losses.teacher_topk(jnp.asarray(hs), jnp.asarray(head), vocab=30, k=6, temperature=2.0, chunk_size=3)
    ref = _topk((hs @ head)[..., :30], 6, 2.0)
    np.testing.assert_array_equal(got.ids, ref.ids)
    np.testing.assert_allclose(got.logp, ref.logp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.tail, ref.tail, rtol=1e-5, atol=1e-6)
    full = losses.teacher_topk(jnp.asarray(hs), jnp.asarray(head), vocab=30, k=30, chunk_size=4)
    assert np.all(np.isneginf(full.tail))


# ------------------------------------------------------------------------------------------ files and runs


@pytest.fixture(scope="module")
def caches(teacher_corpus, tmp_path_factory):
    """(root, corpus, vocab, full, top4): a float32 k = V cache and a k = 4 float16 cache of _cfg's 4 steps."""
    root, corpus = teacher_corpus
    out = tmp_path_factory.mktemp("caches")
    V = load_model_config(str(root / "teacher")).vocab_size
    full = str(out / "full")
    precompute.teacher_cache(_cfg(root, corpus, out / "unused", **{"teacher.top_k": V, "teacher.cache_dtype":
                                                                     "float32"}), full)
    top4 = str(out / "top4")  # through the command line
    conf = out / "conf.py"
    conf.write_text(f"import json\n\n\ndef get_config():\n    return json.loads({json.dumps(_cfg(root, corpus, 'x'))!r})\n")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["teacher-cache", "--config", str(conf), "--out", top4, "teacher.top_k=4", "run.steps=2"]) == 0
    assert "the top k hold" in printed.getvalue() and f"teacher.cache={top4}" in printed.getvalue()
    return root, corpus, V, full, top4


def test_cache_files_hold_the_stream(caches):
    """cache.json records the setting and a summary; each step's tokens are the pretrain stream's, the ids are
    stored as uint16 and the log-probabilities in the chosen dtype; k = V covers all the mass."""
    root, corpus, V, full, top4 = caches
    meta = tc.read_meta(full)
    assert meta["k"] == V and meta["vocab"] == V and meta["packing"]["seq_len"] == 16
    assert meta["summary"]["steps"] == 4 and meta["summary"]["mean_topk_mass"] == pytest.approx(1.0)
    cfg = _cfg(root, corpus, "unused")
    stream = train.pretrain_batches(cfg, train.load_tokenizer(str(root / "teacher")))
    cache = tc.Cache(full)
    for step in range(4):
        got = cache.read(step, 0, 8)
        np.testing.assert_array_equal(got["tokens"], next(stream)["tokens"])
    assert got["ids"].dtype == np.uint16 and got["logp"].dtype == np.float32 and got["ids"].shape == (8, 16, V)
    small = tc.Cache(top4).read(1, 2, 6)
    assert small["logp"].dtype == np.float16 and small["ids"].shape == (4, 16, 4)
    assert tc.read_meta(top4)["summary"]["bytes_per_position"] > tc.bytes_per_position(4, V, "float16")


def test_cached_run_equals_the_live_teacher(caches, tmp_path):
    """Pre-training from the k = V cache gives the live teacher's losses, also with gradient accumulation (the
    cached run accumulates 2 micro-batches; the live one takes the batch at once)."""
    root, corpus, V, full, _ = caches
    train.pretrain(_cfg(root, corpus, tmp_path / "live"))
    train.pretrain(_cfg(root, corpus, tmp_path / "cached", **{"teacher.cache": full, "optim.grad_accum": 2}))
    live, cached = _losses(tmp_path / "live"), _losses(tmp_path / "cached")
    assert [s for s, _ in cached] == [1, 2, 3, 4]
    np.testing.assert_allclose([l for _, l in cached], [l for _, l in live], rtol=2e-5)


def test_cached_resume_equals_uninterrupted(caches, tmp_path):
    """A cached run stopped after 2 steps and resumed reads on at step 2 of the cache: the same losses."""
    root, corpus, V, _, top4 = caches
    over = {"teacher.cache": top4, "run.steps": 2}
    train.pretrain(_cfg(root, corpus, tmp_path / "whole", **over))
    first = train.pretrain(_cfg(root, corpus, tmp_path / "split", **over, **{"run.stop_after": 1}))
    assert first["status"] == "stopped"
    train.pretrain(_cfg(root, corpus, tmp_path / "split", **over))
    np.testing.assert_allclose([l for _, l in _losses(tmp_path / "split")][-1],
                               [l for _, l in _losses(tmp_path / "whole")][-1], rtol=1e-6)


def test_fewer_tokens_fold_into_the_tail(caches):
    """Reading k' < k tokens folds the rest into the tail: the coarse distribution over k' + 1 buckets."""
    _, _, V, full, _ = caches
    cache = tc.Cache(full)
    whole, cut = cache.read(0, 0, 8), cache.read(0, 0, 8, top_k=3)
    np.testing.assert_array_equal(cut["ids"], whole["ids"][..., :3])
    np.testing.assert_allclose(np.exp(cut["tail"]), np.exp(whole["logp"][..., 3:].astype(np.float64)).sum(-1),
                               rtol=1e-5, atol=1e-7)


def test_writer_continues_and_extends(caches, tmp_path):
    """A cache written 1 step at a time (killed mid-file: a stray .tmp file), then extended to 2 steps, holds the
    arrays of the cache written at once."""
    root, corpus, V, _, top4 = caches
    out = str(tmp_path / "grown")
    precompute.teacher_cache(_cfg(root, corpus, "unused", **{"teacher.top_k": 4, "run.steps": 1}), out)
    stray = glob.glob(os.path.join(out, "rows-*"))[0] + "/steps-000000001-000000002.safetensors.tmp1234"
    open(stray, "wb").write(b"half")
    precompute.teacher_cache(_cfg(root, corpus, "unused", **{"teacher.top_k": 4, "run.steps": 2}), out)
    assert not os.path.exists(stray)
    assert len(glob.glob(os.path.join(out, "rows-*", "*.safetensors"))) == 2
    a, b = tc.Cache(out), tc.Cache(top4)
    for key in ("ids", "logp", "tail", "tokens"):
        np.testing.assert_array_equal(a.read(1, 0, 8)[key], b.read(1, 0, 8)[key])
    with pytest.raises(FaJaxError, match="another setting.*top_k"):
        precompute.teacher_cache(_cfg(root, corpus, "unused", **{"teacher.top_k": 5, "run.steps": 2}), out)


@pytest.mark.parametrize("over, match", [
    ({"data.seq_len": 8}, "data.seq_len: the cache has 16, this run 8"),
    ({"loss.temperature": 2.0}, "loss.temperature"),
    ({"run.steps": 3}, "holds 2 steps .* needs run.steps=3"),
    ({"data.seed": 1}, "data.seed"),
    ({"teacher.top_k": 5}, "teacher.top_k=5: the cache .* holds 4"),
    ({"data.train": "EDITED"}, "data: the cache has data files"),
    ({"model.teacher": "OTHER"}, "teacher: the cache has"),
])
def test_a_mismatched_cache_is_refused(caches, tmp_path, over, match):
    """`Cache.check`, which `train.pretrain` runs before its first step (shown for the first case): another
    sequence length, temperature, seed, k, fewer steps, another data file, another teacher."""
    root, corpus, V, _, top4 = caches
    if over.get("data.train") == "EDITED":  # the same file name and size, one word changed
        text = open(corpus).read()
        edited = tmp_path / os.path.basename(corpus)
        edited.write_text(text.replace(" ", "x", 1))
        over = {"data.train": str(edited)}
    if over.get("model.teacher") == "OTHER":  # the same tokenizer, another checkpoint
        other = tmp_path / "other"
        shutil.copytree(root / "teacher", other)
        cfg_json = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps(dict(cfg_json, rms_norm_eps=1e-3)))
        over = {"model.teacher": str(other)}
    cfg = _cfg(root, corpus, tmp_path / "run", **{"teacher.cache": top4, "run.steps": 2, **over})
    with pytest.raises(FaJaxError, match=match):
        tc.Cache(top4).check(cfg, V, (0, 8), int(cfg.run.steps))
    if "data.seq_len" in over:
        with pytest.raises(FaJaxError, match=match):
            train.pretrain(cfg)
        assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_other_tokens_in_the_cache_are_an_error(caches, tmp_path):
    """A cache whose stored tokens differ from the run's batch (another stream) stops at that step and row."""
    root, corpus, _, _, top4 = caches
    bad = str(tmp_path / "bad")
    shutil.copytree(top4, bad)
    f = sorted(glob.glob(os.path.join(bad, "rows-*", "*.safetensors")))[0]
    st = safetensors.SafetensorsFile(f)
    arrays = {k: st.get(k).copy() for k in st.keys()}
    arrays["tokens"][0, 3, 5] += 1
    safetensors.write(f, [(k, a.shape, a.dtype, lambda a=a: a) for k, a in arrays.items()], metadata=st.metadata)
    with pytest.raises(FaJaxError, match="step 0, batch row 3 holds other tokens"):
        train.pretrain(_cfg(root, corpus, tmp_path / "run", **{"teacher.cache": bad, "run.steps": 2}))


def test_config_errors():
    def check(**over):
        cfg = run_config.apply_overrides(train.pretrain_defaults(), [f"{k}={v!r}" for k, v in over.items()])
        validation.check_run_config(cfg, "pretrain", batches_given=True)

    with pytest.raises(FaJaxError, match="teacher.cache=c with loss.alpha=0"):
        check(**{"teacher.cache": "c", "loss.alpha": 0.0})
    with pytest.raises(FaJaxError, match="a cached run loads no teacher"):
        check(**{"teacher.cache": "c", "teacher.quantize": "int8"})
    with pytest.raises(FaJaxError, match="teacher.cache_dtype='int4'"):
        check(**{"teacher.cache_dtype": "int4"})
    with pytest.raises(FaJaxError, match="no such directory"):
        tc.Cache("/nonexistent/cache")
