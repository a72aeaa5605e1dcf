"""Forward-pass parity with Hugging Face transformers (PyTorch) for every family, on tiny random checkpoints."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa_jax
from fa_jax.models import transformer
from helpers import FAMILIES, hf_logits

TOL = 1e-4


def _tokens(B, T, seed=0):
    return np.random.RandomState(seed).randint(3, 256, (B, T))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, hf_dirs):
    path, model = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    toks = _tokens(2, 12)
    out = np.asarray(fa_jax.forward(config, params, toks))
    assert out.dtype == np.float32 and out.shape == (2, 12, 256)
    np.testing.assert_allclose(out, hf_logits(model, toks), atol=TOL, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_padding_left_and_right_match_transformers(family, hf_dirs):
    path, model = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    toks = _tokens(3, 10, seed=1)
    mask = np.ones((3, 10), np.int64)
    mask[0, :4] = 0  # left padded
    mask[1, 7:] = 0  # right padded
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)  # what transformers' generate uses
    ref = hf_logits(model, toks, mask=mask, positions=positions)
    out = np.asarray(fa_jax.forward(config, params, toks, mask=mask))  # positions derived from the mask
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=TOL, rtol=0)
    # padding changes nothing for the real tokens: row 0 equals the unpadded forward of its real part
    alone = np.asarray(fa_jax.forward(config, params, toks[:1, 4:]))
    np.testing.assert_allclose(out[0, 4:], alone[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama3", "gemma"])
def test_explicit_positions_match_transformers(family, hf_dirs):
    path, model = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    toks = _tokens(1, 8, seed=2)
    pos = np.arange(8)[None] + 37
    np.testing.assert_allclose(np.asarray(fa_jax.forward(config, params, toks, positions=pos)),
                               hf_logits(model, toks, positions=pos), atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_documents_do_not_attend_across(family, hf_dirs):
    """A packed row [doc1 doc2 pad] gives, per document, the logits transformers gives that document alone."""
    path, model = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    d1, d2 = _tokens(1, 5, 3)[0], _tokens(1, 6, 4)[0]
    row = np.concatenate([d1, d2, [0, 0]])[None]
    seg = np.array([[1] * 5 + [2] * 6 + [0, 0]])
    out = np.asarray(fa_jax.forward(config, params, row, segment_ids=seg))
    np.testing.assert_allclose(out[0, :5], hf_logits(model, d1[None])[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(out[0, 5:11], hf_logits(model, d2[None])[0], atol=TOL, rtol=0)


def test_sliding_window_is_applied(hf_dirs):
    path, _ = hf_dirs["mistral"]
    config, params = fa_jax.load_model(path)
    assert config.sliding_windows == (5, 5)
    toks = _tokens(1, 12, 5)
    windowed = np.asarray(fa_jax.forward(config, params, toks))
    full = np.asarray(fa_jax.forward(config.replace(sliding_windows=()), params, toks))
    np.testing.assert_allclose(windowed[0, :5], full[0, :5], atol=1e-6)  # inside the window: identical
    assert np.abs(windowed[0, 6:] - full[0, 6:]).max() > 1e-4  # beyond it the window must matter


@pytest.mark.parametrize("family", ["llama3", "gemma"])
def test_bfloat16_compute_is_close(family, hf_dirs):
    path, _ = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    toks = _tokens(2, 12, 6)
    ref = np.asarray(fa_jax.forward(config, params, toks))
    out = fa_jax.forward(config, params, toks, dtype="bfloat16")
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - ref).max() < 0.05 * np.abs(ref).max()
    p16 = transformer.cast(params, jnp.bfloat16)
    out2 = np.asarray(fa_jax.forward(config, p16, toks))
    assert np.abs(out2 - ref).max() < 0.05 * np.abs(ref).max()


def test_forward_jits_once_for_same_shapes(hf_dirs):
    path, _ = hf_dirs["llama"]
    config, params = fa_jax.load_model(path)
    traces = []

    def f(p, t):
        traces.append(1)
        return fa_jax.forward(config, p, t)

    f = jax.jit(f)
    for s in range(3):
        f(params, _tokens(2, 12, s)).block_until_ready()
    assert len(traces) == 1


def test_segment_positions():
    seg = jnp.array([[0, 0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(transformer.segment_positions(seg),
                                  [[0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 3, 0, 1, 2]])
