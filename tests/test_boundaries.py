"""Every API boundary checks its inputs on the host, before tracing: one FaJaxError line naming the argument or
parameter path, the bad value and what was expected (fa_jax/checks.py, lora.check_module / check_rank, readapt).

Tokens (forward, generate, evaluate): integer dtype, [batch, seq], ids in the vocabulary when concrete; adapters
that belong to another model; ranks that are not integers; `fa-jax truncate` on a whole model or with a rank a
matrix cannot have; `fa-jax merge` of an adapter made for another architecture whose shapes happen to fit.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa_jax
from fa_jax import FaJaxError, evaluate, readapt, treemath
from fa_jax.cli import main
from fa_jax.io import peft as peft_io
from helpers import save_hf_model

TOKS = np.random.RandomState(0).randint(3, 256, (2, 7))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Tiny llama and mistral checkpoints of identical shapes (TINY sizes), and an RE-Adapter of the llama."""
    root = tmp_path_factory.mktemp("boundaries")
    save_hf_model("llama", root / "llama")
    save_hf_model("mistral", root / "mistral")
    readapt.diff(str(root / "llama"), str(root / "llama"), str(root / "delta"))
    return root


@pytest.fixture(scope="module")
def llama(dirs):
    return fa_jax.load_model(str(dirs / "llama"))


@pytest.fixture(scope="module")
def small_lora(llama):
    """A LoRA for a narrower model (hidden 32 instead of 64): every projection's in- or out-features differ."""
    config, _ = llama
    return fa_jax.init_lora(config.replace(hidden_size=32, intermediate_size=64), jax.random.PRNGKey(0), rank=4)


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------------------------
# tokens


@pytest.mark.parametrize("tokens,match", [
    (TOKS.astype(np.float32), r"^tokens has dtype float32: expected integer token ids"),
    (jnp.asarray(TOKS, jnp.bfloat16), r"^tokens has dtype bfloat16: expected integer"),
    (TOKS.astype(bool), r"^tokens has dtype bool: expected integer"),
    (TOKS[0], r"^tokens has shape \[7\]: expected \[batch, seq\] \(one sequence: tokens\[None\]\)"),
    (TOKS[None], r"^tokens has shape \[1, 2, 7\]: expected \[batch, seq\]"),
    (np.array([[1, 300], [256, 2]]), r"^tokens holds token id 300 \(largest\): expected ids in \[0, 256\) \(the "
                                     r"model's vocab_size is 256\)$"),
    (jnp.asarray([[5, -7], [-2, 1]]), r"^tokens holds token id -7 \(smallest\): expected ids in \[0, 256\)"),
    (np.array([[-1, 300]]), r"^tokens holds token id -1 \(smallest\) and 300 \(largest\)"),
    ([[1, 2], [3]], r"^tokens: expected token ids \[batch, seq\] \(rows of equal length\)"),
])
def test_forward_checks_tokens(llama, tokens, match):
    config, params = llama
    with pytest.raises(FaJaxError, match=match) as e:
        fa_jax.forward(config, params, tokens)
    one_line(e)


@pytest.mark.parametrize("kw", ["mask", "positions", "segment_ids"])
def test_forward_checks_shapes_against_tokens(llama, kw):
    config, params = llama
    with pytest.raises(FaJaxError, match=rf"^{kw} has shape \[2, 6\]: expected the shape of tokens, \[2, 7\]"):
        fa_jax.forward(config, params, TOKS, **{kw: np.ones((2, 6), np.int32)})


def test_valid_tokens_still_work_eagerly_under_jit_and_grad(llama):
    """Lists, NumPy and jax arrays of any integer dtype pass; traced ids (jit, grad, eval_shape) are not range
    checked, so the checks cost nothing there and never force a device sync; their dtype and shape still are."""
    config, params = llama
    want = np.asarray(fa_jax.forward(config, params, TOKS.tolist()))  # eager, range-checked
    np.testing.assert_allclose(np.asarray(fa_jax.forward(config, params, TOKS.astype(np.uint8))), want, atol=1e-5)
    traced = lambda t: fa_jax.forward(config, params, t, mask=jnp.ones_like(t), segment_ids=None)
    assert jax.eval_shape(traced, jax.ShapeDtypeStruct((2, 7), jnp.int32)).shape == (2, 7, 256)
    g = jax.eval_shape(jax.grad(lambda p, t: fa_jax.forward(config, p, t).sum()), params, TOKS)
    assert g["model"]["norm"]["weight"].shape == (64,)
    closed = jnp.asarray(TOKS)  # a concrete array that a trace closes over is still range checked, on the host
    assert jax.eval_shape(lambda p: fa_jax.forward(config, p, closed), params).shape == (2, 7, 256)
    bad = closed.at[0, 0].set(300)
    with pytest.raises(FaJaxError, match=r"token id 300 \(largest\)"):
        jax.eval_shape(jax.grad(lambda p: fa_jax.forward(config, p, bad).sum()), params)
    with pytest.raises(FaJaxError, match="dtype float32"):  # dtypes and shapes are still checked under jit
        jax.jit(traced)(jnp.asarray(TOKS, jnp.float32))


def test_evaluate_target_logprobs_checks_tokens_and_targets(llama):
    config, params = llama
    mask = np.ones_like(TOKS)
    with pytest.raises(FaJaxError, match=r"^targets holds token id 256 \(largest\)"):
        evaluate.target_logprobs(config, params, TOKS, np.full_like(TOKS, 256), mask)
    with pytest.raises(FaJaxError, match=r"^tokens has dtype float64"):
        evaluate.target_logprobs(config, params, TOKS.astype(np.float64), TOKS, mask)
    with pytest.raises(FaJaxError, match=r"^targets has shape \[2, 6\]: expected the shape of tokens"):
        evaluate.target_logprobs(config, params, TOKS, TOKS[:, :6], mask)
    lp, _ = evaluate.target_logprobs(config, params, TOKS, TOKS, mask)
    assert np.isfinite(np.asarray(lp)).all()


# ---------------------------------------------------------------------------------------------------------------
# adapters that belong to another model


def test_forward_and_generate_refuse_a_lora_for_another_model(llama, small_lora):
    config, params = llama
    msg = (r"^adapters: adapter for another model: model\.layers\.0\.self_attn\.q_proj has in-features 32 "
           r"\(lora_A \[32, 4\]\), the model's module has 64$")
    with pytest.raises(FaJaxError, match=msg):
        fa_jax.forward(config, params, TOKS, adapters=small_lora)
    with pytest.raises(FaJaxError, match=msg):
        fa_jax.generate(config, params, [[1, 2, 3]], adapters=small_lora, max_new_tokens=2)
    with pytest.raises(FaJaxError, match=msg):
        fa_jax.generate.generate_tokens(config, params, [[1, 2, 3]], adapters=small_lora, max_new_tokens=2)


@pytest.mark.parametrize("make,match", [
    (lambda c: fa_jax.init_lora(c.replace(num_hidden_layers=3), jax.random.PRNGKey(0), rank=2),
     r"model\.layers\.2 is not a module of this llama model, which has 2 layers \(0\.\.1\)"),
    (lambda c: {"model": {"layers": {"0": {"self_attn": {"qkv_proj": {}}}}}},
     r"model\.layers\.0\.self_attn\.qkv_proj is not a module of this llama model"),
    (lambda c: {"lm_head": {}}, r"^adapters: lm_head is not a module"),
    (lambda c: fa_jax.init_lora(c.replace(intermediate_size=96), jax.random.PRNGKey(0), rank=2, targets=["down_proj"]),
     r"model\.layers\.0\.mlp\.down_proj has in-features 96 \(lora_A \[96, 2\]\), the model's module has 128"),
    (lambda c: fa_jax.init_lora(c.replace(num_key_value_heads=4), jax.random.PRNGKey(0), rank=2, targets=["k_proj"]),
     r"model\.layers\.0\.self_attn\.k_proj has out-features 64 \(lora_B \[2, 64\]\), the model's module has 32"),
    (lambda c: fa_jax.init_bottleneck(c.replace(hidden_size=32), jax.random.PRNGKey(0), 8),
     r"model\.layers\.0\.attn_adapter\.down\.kernel has shape \[32, 8\], expected \[64, m\]"),
    (lambda c: fa_jax.init_llama_adapter(c.replace(hidden_size=32), jax.random.PRNGKey(0)),
     r"self_attn\.adaption_prompt has shape \[10, 32\], expected \[n, 64\]"),
])
def test_adapter_paths_and_shapes_must_fit_the_model(llama, make, match):
    config, params = llama
    with pytest.raises(FaJaxError, match=match) as e:
        fa_jax.forward(config, params, TOKS, adapters=make(config))
    one_line(e)


def test_matching_adapters_still_work(llama):
    config, params = llama
    mixed = {**fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=4),
             **fa_jax.init_prompt_tuning(config, jax.random.PRNGKey(1), num_virtual_tokens=3)}
    assert jax.eval_shape(lambda a: fa_jax.forward(config, params, TOKS, adapters=a), mixed).shape == (2, 7, 256)
    from fa_jax.checks import check_adapters  # what forward / generate / evaluate run first: every kind passes

    for tree in (fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=2, use_dora=True, params=params,
                                  targets=["q_proj"]),
                 fa_jax.init_bottleneck(config, jax.random.PRNGKey(0), 8),
                 fa_jax.init_llama_adapter(config, jax.random.PRNGKey(0)),
                 fa_jax.init_prefix_tuning(config, jax.random.PRNGKey(0), num_virtual_tokens=2), {}, None):
        check_adapters(config, tree)


def test_merge_lora_and_treemath_merge_refuse_mismatched_modules(llama, small_lora):
    config, params = llama
    with pytest.raises(FaJaxError, match=r"^merge_lora: adapter for another model: model\.layers\.0\.self_attn"
                                         r"\.q_proj has in-features 32") as e:
        fa_jax.merge_lora(params, small_lora)
    one_line(e)
    bad = fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=4, targets=["q_proj"])
    q = bad["model"]["layers"]["0"]["self_attn"]["q_proj"]
    q["lora_B"] = jnp.zeros((3, 64))  # rank 3 against lora_A's 4
    with pytest.raises(FaJaxError, match=r"q_proj has lora_A \[64, 4\] and lora_B \[3, 64\]"):
        treemath.merge(params, [(bad, 1.0)])
    narrow = config.replace(hidden_size=32, intermediate_size=64)
    dora = fa_jax.init_lora(narrow, jax.random.PRNGKey(0), rank=2, use_dora=True, targets=["q_proj"],
                            params=fa_jax.init_params(narrow, jax.random.PRNGKey(1)))
    with pytest.raises(FaJaxError, match=r"^to_dense: adapter for another model: .* has in-features 32") as e:
        treemath.merge(params, [(dora, 1.0)])  # a DoRA delta depends on the base kernel: no broadcasting error
    one_line(e)


# ---------------------------------------------------------------------------------------------------------------
# ranks


@pytest.mark.parametrize("call,match", [
    (lambda c: fa_jax.init_lora(c, jax.random.PRNGKey(0), rank=2.5), r"^LoRA rank=2\.5: expected an integer >= 1"),
    (lambda c: fa_jax.init_lora(c, jax.random.PRNGKey(0), rank="8"), r"^LoRA rank='8': expected an integer"),
    (lambda c: fa_jax.init_lora(c, jax.random.PRNGKey(0), rank=4, rank_pattern={"q_proj": 1.5}),
     r"^LoRA rank_pattern\['q_proj'\]=1\.5: expected an integer >= 1"),
    (lambda c: fa_jax.init_adapter(c, jax.random.PRNGKey(0), {"kind": "lora", "rank": 2.5}),
     r"^adapter\.rank=2\.5: expected an integer >= 1"),
])
def test_non_integral_ranks_are_errors(llama, call, match):
    with pytest.raises(FaJaxError, match=match):
        call(llama[0])


def test_integral_float_ranks_still_work(llama):
    lora = fa_jax.init_lora(llama[0], jax.random.PRNGKey(0), rank=4.0, rank_pattern={"q_proj": np.int64(2)})
    attn = lora["model"]["layers"]["0"]["self_attn"]
    assert attn["k_proj"]["lora_A"].shape == (64, 4) and attn["q_proj"]["lora_A"].shape == (64, 2)


# ---------------------------------------------------------------------------------------------------------------
# fa-jax truncate


def test_truncate_refuses_a_model_as_delta(dirs, tmp_path, capsys):
    model = dirs / "llama"
    assert main(["truncate", "--delta", str(model), "--tau", "0.5", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--delta {model} is a model, not a delta" in err, err
    assert f"run fa-jax diff --base BASE --tuned {model} --out DELTA first" in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(FaJaxError, match="is a model, not a delta"):
        readapt.truncate(str(model), str(tmp_path / "x"), rank=2)


@pytest.mark.parametrize("kw,match", [
    ({"rank": 2.5}, r"^truncate: --rank 2\.5 is not an integer"),
    ({"rank": 0}, r"^truncate: --rank 0 is below 1"),
    ({"rank": True}, r"^truncate: --rank True is not an integer"),
    ({"tau": 0}, r"^truncate: --tau 0 is outside \(0, 1\]"),
    ({"tau": 1.01}, r"^truncate: --tau 1\.01 is outside \(0, 1\]"),
    ({"tau": float("nan")}, r"^truncate: --tau nan is outside \(0, 1\]"),
    ({"tau": "0.5"}, r"^truncate: --tau '0\.5' is not a number"),
])
def test_truncate_checks_rank_and_tau(dirs, tmp_path, kw, match):
    with pytest.raises(FaJaxError, match=match):
        readapt.truncate(str(dirs / "delta"), str(tmp_path / "x"), **kw)
    assert not (tmp_path / "x").exists()


def test_truncate_rank_above_a_matrix_is_an_error_not_clamped(dirs, llama, tmp_path, capsys):
    """k_proj of the tiny llama is 64 x 32 (in x out): rank 33 is more than it can have."""
    want = (r"truncate: --rank 33 is more than model\.layers\.0\.self_attn\.k_proj allows: its matrix is 64x32, so "
            r"its largest possible rank is 32")
    assert main(["truncate", "--delta", str(dirs / "delta"), "--rank", "33", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert re.search(want, err) and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()
    config, _ = llama  # a PEFT input (truncate --base-config) too
    fa_jax.save_peft(config, fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=4), str(tmp_path / "lora"))
    with pytest.raises(FaJaxError, match=want):
        readapt.truncate(str(tmp_path / "lora"), str(tmp_path / "x"), rank=33, base_config=str(dirs / "llama"))


# ---------------------------------------------------------------------------------------------------------------
# fa-jax merge: adapters made for another architecture, even with fitting shapes


@pytest.fixture(scope="module")
def llama_lora(dirs, llama, tmp_path_factory):
    """A PEFT LoRA fa_jax saved for the llama (its fa_jax_model.json records the model)."""
    config, _ = llama
    out = tmp_path_factory.mktemp("llama_lora") / "lora"
    fa_jax.save_peft(config, fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=2), str(out),
                     base_model_name_or_path="meta-llama/a-hub-name")
    return out


def test_saved_adapters_record_their_model_and_peft_loads_them(llama_lora, llama):
    import warnings

    config, _ = llama
    rec = json.load(open(llama_lora / peft_io.MODEL_RECORD))
    assert rec == {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                   "vocab_size": 256}
    assert "model_type" not in json.load(open(llama_lora / peft_io.CONFIG))  # PEFT's own config is left as it was
    from peft import LoraConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unexpected keyword arguments" warning from PEFT
        assert LoraConfig.from_pretrained(str(llama_lora)).r == 2
    prompt = llama_lora.parent / "prompt"
    fa_jax.save_peft(config, fa_jax.init_prompt_tuning(config, jax.random.PRNGKey(0), 2), str(prompt))
    assert json.load(open(prompt / peft_io.MODEL_RECORD))["model_type"] == "llama"


def test_merge_refuses_an_adapter_recorded_for_another_model(dirs, llama_lora, tmp_path, capsys):
    base = dirs / "mistral"  # same shapes as the llama
    assert main(["merge", "--base", str(base), "--adapter", str(llama_lora), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    want = (f"--adapter {llama_lora}: made for a llama model ({llama_lora / peft_io.MODEL_RECORD}); the base {base} "
            f"is a mistral")
    assert want in err and err.count("\n") == 1, err
    assert not (tmp_path / "m").exists()


def test_merge_reads_base_model_name_or_path_without_a_record(dirs, llama, tmp_path):
    config, _ = llama
    fa_jax.save_peft(config, fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=2), str(tmp_path / "a"),
                     base_model_name_or_path=str(dirs / "llama"))
    os.remove(tmp_path / "a" / peft_io.MODEL_RECORD)  # as a PEFT-made adapter: only base_model_name_or_path
    with pytest.raises(FaJaxError, match=re.escape(f"made for a llama model (base_model_name_or_path "
                                                   f"{dirs / 'llama'}); the base {dirs / 'mistral'} is a mistral")):
        readapt.merge(str(dirs / "mistral"), [(str(tmp_path / "a"), 1.0)], str(tmp_path / "m"))
    # nothing recorded (a hub name, or none): accepted as before
    cfg = json.load(open(tmp_path / "a" / peft_io.CONFIG))
    cfg["base_model_name_or_path"] = "some-org/some-model"
    (tmp_path / "a" / peft_io.CONFIG).write_text(json.dumps(cfg))
    readapt.merge(str(dirs / "mistral"), [(str(tmp_path / "a"), 1.0)], str(tmp_path / "m"), tokenizer=False)
    assert (tmp_path / "m" / "config.json").exists()


def test_merge_compares_the_recorded_sizes(dirs, llama_lora, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama_lora, bad)
    rec = json.load(open(bad / peft_io.MODEL_RECORD))
    (bad / peft_io.MODEL_RECORD).write_text(json.dumps({**rec, "num_hidden_layers": 4}))
    with pytest.raises(FaJaxError, match=r"made for a llama model with num_hidden_layers=4 .*; the base .* has "
                                         r"num_hidden_layers=2$"):
        readapt.merge(str(dirs / "llama"), [(str(bad), 1.0)], str(tmp_path / "m"))
    readapt.merge(str(dirs / "llama"), [(str(llama_lora), 1.0)], str(tmp_path / "ok"), tokenizer=False)  # its own


def test_merge_refuses_an_re_adapter_of_another_architecture(dirs, tmp_path):
    with pytest.raises(FaJaxError, match=re.escape(f"--adapter {dirs / 'delta'}: made for a llama model (its "
                                                   f"config.json); the base {dirs / 'mistral'} is a mistral")):
        readapt.merge(str(dirs / "mistral"), [(str(dirs / "delta"), 1.0)], str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()
