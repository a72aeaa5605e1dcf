"""Prompt tuning and prefix tuning (fa_jax/prompts.py) against PEFT's PromptTuning / PrefixTuning on the tiny
transformers models: logits of the real tokens, gradients, greedy generation, PEFT directories both ways."""
from __future__ import annotations

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import fa_jax
from fa_jax import generate as gen
from fa_jax import prompts
from fa_jax.errors import FaJaxError
from fa_jax.models import transformer
from test_generate import _cut, _prompts, hf_generate, one_torch_thread

TOL = 1e-4
N = 5  # virtual tokens


def _peft(model, kind, n=N, projection=False, hidden=None, seed=0):
    """A PEFT prompt-learning model on a fresh copy of `model` (PEFT's own random init)."""
    torch.manual_seed(seed)
    base = type(model)(model.config).eval()
    base.load_state_dict(model.state_dict())
    if kind == "prompt_tuning":
        cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
    else:
        cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prefix_projection=projection,
                                      encoder_hidden_size=hidden)
    return peft.get_peft_model(base, cfg).eval()


def _encoder(pm):
    return pm.prompt_encoder["default"]


def _from_peft(config, pm, grad=False):
    """fa_jax's tree holding the PEFT model's parameters (or, with `grad`, their gradients)."""
    enc = _encoder(pm)
    t = lambda x: jnp.asarray((x.grad if grad else x).detach().numpy())
    if pm.peft_config["default"].peft_type == "PROMPT_TUNING":
        return {"prompt_tuning": {"embedding": t(enc.embedding.weight)}}
    if getattr(enc, "prefix_projection", False):
        return {"prefix_tuning": {"embedding": t(enc.embedding.weight), "mlp": {
            "hidden": {"kernel": t(enc.transform[0].weight).T, "bias": t(enc.transform[0].bias)},
            "output": {"kernel": t(enc.transform[2].weight).T, "bias": t(enc.transform[2].bias)}}}}
    L, G, K = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    kv = t(enc.embedding.weight).reshape(-1, L, 2, G, K)
    return {"prefix_tuning": {"key": jnp.moveaxis(kv[:, :, 0], 0, 1), "value": jnp.moveaxis(kv[:, :, 1], 0, 1)}}


def _to_peft(pm, adapters):
    """Copy fa_jax's prompt / reparametrised prefix into the PEFT model."""
    enc = _encoder(pm)
    p = lambda x: torch.nn.Parameter(torch.tensor(np.asarray(x)))
    with torch.no_grad():
        if "prompt_tuning" in adapters:
            enc.embedding.weight.copy_(torch.tensor(np.asarray(adapters["prompt_tuning"]["embedding"])))
            return
        a = adapters["prefix_tuning"]
        enc.embedding.weight.copy_(torch.tensor(np.asarray(a["embedding"])))
        enc.transform[0].weight = p(np.asarray(a["mlp"]["hidden"]["kernel"]).T)
        enc.transform[0].bias = p(a["mlp"]["hidden"]["bias"])
        enc.transform[2].weight = p(np.asarray(a["mlp"]["output"]["kernel"]).T)
        enc.transform[2].bias = p(a["mlp"]["output"]["bias"])


def _batch(seed=0, lengths=(9, 6)):
    """Right-padded tokens and mask [B, T] (PEFT and transformers count positions from the row start)."""
    rng = np.random.RandomState(seed)
    T = max(lengths)
    toks = rng.randint(3, 256, (len(lengths), T))
    mask = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
    return toks, mask


def _peft_logits(pm, toks, mask, n=N):
    with torch.no_grad():
        out = pm(input_ids=torch.tensor(toks), attention_mask=torch.tensor(mask)).logits.float().numpy()
    return out[:, n:] if pm.peft_config["default"].peft_type == "PROMPT_TUNING" else out


def _check_logits(config, params, adapters, pm, seed=0, lengths=(9, 6)):
    toks, mask = _batch(seed, lengths)
    got = np.asarray(fa_jax.forward(config, params, toks, adapters, mask=mask))
    want = _peft_logits(pm, toks, mask)
    real = mask.astype(bool)
    base = np.asarray(fa_jax.forward(config, params, toks, mask=mask))
    assert np.abs(base[real] - want[real]).max() > 1e-2  # the prompt changes the logits
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Logits


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.slow), pytest.param("gemma", marks=pytest.mark.slow)])
def test_prompt_tuning_matches_peft(family, hf_dirs):
    path, model = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    pm = _peft(model, "prompt_tuning")
    _check_logits(config, params, _from_peft(config, pm), pm)
    ours = fa_jax.init_prompt_tuning(config, jax.random.PRNGKey(1), num_virtual_tokens=N)  # the other way round
    _to_peft(pm, ours)
    _check_logits(config, params, ours, pm, seed=1)


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.slow), "mistral", "gemma"])
def test_prefix_tuning_matches_peft(family, hf_dirs):
    """The plain prefix from PEFT; Mistral's sliding window (5) is shorter than the rows, so it cuts the prefix
    off for the later tokens, as in transformers."""
    path, model = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    pm = _peft(model, "prefix_tuning")
    ad = _from_peft(config, pm)
    assert ad["prefix_tuning"]["key"].shape == (2, N, config.num_key_value_heads, config.head_dim)
    _check_logits(config, params, ad, pm, lengths=(12, 7))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prefix_projection_matches_peft_both_ways(family, hf_dirs):
    path, model = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    pm = _peft(model, "prefix_tuning", projection=True, hidden=24)
    _check_logits(config, params, _from_peft(config, pm), pm)
    ours = fa_jax.init_prefix_tuning(config, jax.random.PRNGKey(3), num_virtual_tokens=N, prefix_projection=True,
                                     encoder_hidden_size=24)
    _to_peft(pm, ours)
    _check_logits(config, params, ours, pm, seed=2)
    folded = prompts.fold_prefix_projection(config, ours)
    assert set(folded["prefix_tuning"]) == {"key", "value"}
    toks, mask = _batch(3)
    np.testing.assert_allclose(np.asarray(fa_jax.forward(config, params, toks, folded, mask=mask)),
                               np.asarray(fa_jax.forward(config, params, toks, ours, mask=mask)), atol=1e-5, rtol=0)


def test_defaults_follow_peft(hf_dirs):
    """PEFT's defaults: N(0, 1) embeddings, encoder_hidden_size = G*K, projection widths."""
    config, params = fa_jax.load_model(hf_dirs["qwen2"][0])
    G, K, L = config.num_key_value_heads, config.head_dim, config.num_hidden_layers
    a = fa_jax.init_prefix_tuning(config, jax.random.PRNGKey(0), num_virtual_tokens=7, prefix_projection=True)
    a = a["prefix_tuning"]
    assert a["embedding"].shape == (7, G * K) and a["mlp"]["hidden"]["kernel"].shape == (G * K, G * K)
    assert a["mlp"]["output"]["kernel"].shape == (G * K, L * 2 * G * K)
    assert prompts.prefix_key_values(config, {"prefix_tuning": a})[0].shape == (L, 7, G, K)
    pm = _peft(hf_dirs["qwen2"][1], "prefix_tuning", n=7, projection=True)
    assert tuple(_encoder(pm).transform[0].weight.shape) == (G * K, G * K)
    emb = fa_jax.init_prompt_tuning(config, jax.random.PRNGKey(0), num_virtual_tokens=400)["prompt_tuning"]
    assert emb["embedding"].shape == (400, 64) and abs(float(jnp.std(emb["embedding"])) - 1) < 0.02
    zero = fa_jax.init_prefix_tuning(config, jax.random.PRNGKey(0), num_virtual_tokens=3, init="zero")
    assert not np.any(np.asarray(zero["prefix_tuning"]["key"]))


def test_vocab_and_text_init(hf_dirs):
    """Gemma feeds sqrt(D) * embedding rows to the first layer: a vocabulary init is taken as fed (as PEFT's)."""
    config, params = fa_jax.load_model(hf_dirs["gemma"][0])
    table = np.asarray(params["model"]["embed_tokens"]["embedding"]) * np.sqrt(config.hidden_size)
    emb = np.asarray(fa_jax.init_prompt_tuning(config, jax.random.PRNGKey(0), num_virtual_tokens=4, params=params,
                                               init="vocab")["prompt_tuning"]["embedding"])
    assert all(np.abs(table - row).max(axis=1).min() < 1e-5 for row in emb)
    emb = np.asarray(fa_jax.init_prompt_tuning(config, None, num_virtual_tokens=5, params=params, init="text",
                                               token_ids=[7, np.int64(9)])["prompt_tuning"]["embedding"])
    np.testing.assert_allclose(emb, table[[7, 9, 7, 9, 7]], rtol=1e-6)


def test_packed_rows_see_the_prompt_in_every_document(hf_dirs):
    """Segments of a packed row give the logits each document gets alone: the prompt is in front of each."""
    config, params = fa_jax.load_model(hf_dirs["llama"][0])
    fwd = jax.jit(lambda a, t, s: fa_jax.forward(config, params, t, a, segment_ids=s))
    for ad in (fa_jax.init_prompt_tuning(config, jax.random.PRNGKey(0), num_virtual_tokens=3),
               fa_jax.init_prefix_tuning(config, jax.random.PRNGKey(0), num_virtual_tokens=3)):
        toks = np.random.RandomState(0).randint(3, 256, (1, 11))
        seg = np.array([[1] * 6 + [2] * 4 + [0]])
        packed = np.asarray(fwd(ad, toks, seg))
        first = np.asarray(fwd(ad, toks[:, :6], np.ones((1, 6), int)))
        second = np.asarray(fwd(ad, toks[:, 6:10], np.ones((1, 4), int)))
        np.testing.assert_allclose(packed[:, :6], first, atol=1e-5, rtol=0)
        np.testing.assert_allclose(packed[:, 6:10], second, atol=1e-5, rtol=0)


@pytest.mark.slow  # 21 s; bash scripts/test.sh -m slow
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_query_blocks_with_prefix_match_the_cache_path(family, hf_dirs):
    """A 256-token row runs causal attention in two query blocks; the prefix block must read the same for both.
    Reference: the cached decoder (one masked attention over prefix + tokens)."""
    config, params = fa_jax.load_model(hf_dirs[family][0])
    T = 256
    assert fa_jax.models.layers.query_blocks(T) == 2
    toks = np.random.RandomState(0).randint(3, 256, (1, T))
    for ad in (fa_jax.init_prompt_tuning(config, jax.random.PRNGKey(0), num_virtual_tokens=N),
               fa_jax.init_prefix_tuning(config, jax.random.PRNGKey(1), num_virtual_tokens=N)):
        got = np.asarray(fa_jax.forward(config, params, toks, ad))
        cache = transformer.fill_cache(config, params, ad, transformer.init_cache(config, 1, N + T), jnp.float32)
        h, _ = transformer.hidden_states_with_cache(config, params, toks, cache, N, N + np.arange(T)[None])
        np.testing.assert_allclose(got, np.asarray(transformer.lm_logits(config, params, h)), atol=1e-4, rtol=0)
        remat = np.asarray(fa_jax.forward(config, params, toks[:, :8], ad, remat=True))
        np.testing.assert_allclose(remat, got[:, :8], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Gradients


def _loss_weights(shape, seed=5):
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


@pytest.mark.parametrize("kind,projection", [("prompt_tuning", False),
                                             pytest.param("prefix_tuning", False, marks=pytest.mark.slow),
                                             ("prefix_tuning", True)])  # the MLP variant runs the plain prefix too
def test_gradients_match_torch(kind, projection, hf_dirs):
    """jax.grad of sum(w * logits) over the real tokens w.r.t. every prompt / prefix parameter equals torch
    autograd through PEFT."""
    path, model = hf_dirs["qwen2"]
    config, params = fa_jax.load_model(path)
    pm = _peft(model, kind, projection=projection, hidden=16)
    ad = _from_peft(config, pm)
    toks, mask = _batch(4)
    w = _loss_weights(toks.shape + (config.vocab_size,)) * mask[..., None]

    def loss(a):
        return jnp.sum(fa_jax.forward(config, params, toks, a, mask=mask) * w)

    grads = jax.grad(loss)(ad)
    out = pm(input_ids=torch.tensor(toks), attention_mask=torch.tensor(mask)).logits
    if kind == "prompt_tuning":
        out = out[:, N:]
    (out * torch.tensor(w)).sum().backward()
    want = _from_peft(config, pm, grad=True)
    flat_g, flat_w = jax.tree.leaves_with_path(grads), dict(jax.tree.leaves_with_path(want))
    assert len(flat_g) == len(flat_w) >= 1
    for path_, g in flat_g:
        ref = np.asarray(flat_w[path_])
        assert np.abs(ref).max() > 0
        np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())



# ---------------------------------------------------------------------------------------------------------------
# Generation


def _greedy_without_cache(config, params, adapters, prompt_ids, steps):
    """Greedy decoding by re-running `forward` on the whole left-padded batch at every step (one width, so one
    compilation)."""
    out = [list(p) for p in prompt_ids]
    T = max(len(p) for p in out) + steps
    fwd = jax.jit(lambda a, t, m: fa_jax.forward(config, params, t, a, mask=m)[:, -1])
    for _ in range(steps):
        toks = np.array([[0] * (T - len(p)) + p for p in out])
        mask = np.array([[0] * (T - len(p)) + [1] * len(p) for p in out])
        for row, nxt in zip(out, np.asarray(fwd(adapters, toks, mask)).argmax(-1)):
            row.append(int(nxt))
    return [row[len(p):] for row, p in zip(out, prompt_ids)]


def _peft_greedy_without_cache(pm, prompt, steps, eos):
    """PEFT's model, greedy, the whole sequence through its forward at every step (no cache, one unpadded prompt):
    the reference that does not depend on how transformers' `generate` and PEFT hand the prefix to each other."""
    ids = list(prompt)
    with one_torch_thread(), torch.no_grad():
        for _ in range(steps):
            mask = torch.ones(1, len(ids), dtype=torch.long)
            ids.append(int(pm(input_ids=torch.tensor([ids]), attention_mask=mask).logits[0, -1].argmax()))
    return _cut(ids[len(prompt):], eos)


@pytest.mark.parametrize("kind", ["prompt_tuning", "prefix_tuning"])
@pytest.mark.parametrize("family", ["llama", pytest.param("mistral", marks=pytest.mark.slow)])  # mistral: bash scripts/test.sh -m slow
def test_greedy_generation_matches_no_cache_loop_and_peft(family, kind, hf_dirs):
    """Left-padded batch of three prompts through the cached decoder = the no-cache loop = PEFT's forward, greedy,
    on each prompt alone.

    PEFT's `generate(do_sample=False)` is compared too where it agrees with PEFT's own forward: on the same batch for
    prefix tuning without sliding windows, else on each prompt alone (PEFT's prompt tuning generation ignores
    position ids and numbers the left padding; transformers' sliding window counts cache slots, so padding between
    the prefix and the prompt pushes the prefix out of the window, where fa_jax measures the window in positions, as
    for an unpadded prompt). Where it does not (transformers 5.24.0 with peft 0.21.2: prompt-learning `generate`
    departs from the model's own forward after a few tokens, or from the first), the test says so in a warning."""
    path, model = hf_dirs[family]
    config, params = fa_jax.load_model(path)
    pm = _peft(model, kind, seed=7)
    ad = _from_peft(config, pm)
    prompt_ids, steps = _prompts(), 8
    got = gen.generate_tokens(config, params, prompt_ids, adapters=ad, max_new_tokens=steps, eos_token_ids=[])
    assert got == _greedy_without_cache(config, params, ad, prompt_ids, steps)
    if family == "llama":  # (in 2 layers of window 5, the prefix reaches only the first few positions)
        assert got != gen.generate_tokens(config, params, prompt_ids, max_new_tokens=steps, eos_token_ids=[])
    eos = {config.eos_token_id} if isinstance(config.eos_token_id, int) else set(config.eos_token_id or ())
    want = [_peft_greedy_without_cache(pm, p, steps, eos) for p in prompt_ids]
    assert [_cut(g, eos) for g in got] == want

    if kind == "prefix_tuning" and not config.sliding_windows:
        peft_generate = hf_generate(pm, prompt_ids, steps)
    else:
        peft_generate = [hf_generate(pm, [p], steps)[0] for p in prompt_ids]
    if peft_generate != want:
        warnings.warn(f"PEFT {peft.__version__} generate with transformers {transformers.__version__} disagrees with "
                      f"PEFT's own forward pass on {kind} ({peft_generate} vs {want}); compared with the forward only")


# ---------------------------------------------------------------------------------------------------------------
# PEFT directories


@pytest.mark.parametrize("kind,projection", [("prompt_tuning", False), ("prefix_tuning", False),
                                             ("prefix_tuning", True)])
def test_peft_directory_round_trips(kind, projection, hf_dirs, tmp_path):
    """PEFT save_pretrained -> fa_jax.load_peft, and fa_jax.save_peft -> PeftModel.from_pretrained: same logits.
    A reparametrised prefix travels folded (PEFT saves the MLP's output)."""
    path, model = hf_dirs["qwen2"]
    config, params = fa_jax.load_model(path)
    pm = _peft(model, kind, projection=projection, hidden=16)
    pm.save_pretrained(str(tmp_path / "peft"))
    loaded = fa_jax.load_peft(config, str(tmp_path / "peft"))
    assert list(loaded) == [kind] and (kind == "prompt_tuning" or set(loaded[kind]) == {"key", "value"})
    _check_logits(config, params, loaded, pm)

    ours = (fa_jax.init_prompt_tuning(config, jax.random.PRNGKey(2), num_virtual_tokens=N) if kind == "prompt_tuning"
            else fa_jax.init_prefix_tuning(config, jax.random.PRNGKey(2), num_virtual_tokens=N,
                                           prefix_projection=projection))
    fa_jax.save_peft(config, ours, str(tmp_path / "ours"), base_model_name_or_path=path)
    cfg = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    assert cfg["peft_type"] == kind.upper() and cfg["num_virtual_tokens"] == N
    base = type(model)(model.config).eval()
    base.load_state_dict(model.state_dict())
    back = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours")).eval()
    _check_logits(config, params, ours, back, seed=3)
    again = fa_jax.load_peft(config, str(tmp_path / "ours"))
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(prompts.fold_prefix_projection(config, ours))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize("call,message", [
    (lambda c, p: fa_jax.init_prompt_tuning(c, jax.random.PRNGKey(0), num_virtual_tokens=0), "num_virtual_tokens"),
    (lambda c, p: fa_jax.init_prefix_tuning(c, jax.random.PRNGKey(0), num_virtual_tokens=-2), "num_virtual_tokens"),
    (lambda c, p: fa_jax.init_prompt_tuning(c, jax.random.PRNGKey(0), num_virtual_tokens=2.5), "num_virtual_tokens"),
    (lambda c, p: fa_jax.init_prompt_tuning(c, jax.random.PRNGKey(0), init="vocab"), "params"),
    (lambda c, p: fa_jax.init_prompt_tuning(c, jax.random.PRNGKey(0), init="words"), "init"),
    (lambda c, p: fa_jax.init_prompt_tuning(c, None, params=p, init="text", token_ids=[9999]), "token_ids"),
    (lambda c, p: fa_jax.init_prefix_tuning(c, jax.random.PRNGKey(0), encoder_hidden_size=8), "prefix_projection"),
    (lambda c, p: fa_jax.init_prefix_tuning(c, jax.random.PRNGKey(0), prefix_projection=True,
                                            encoder_hidden_size=0), "encoder_hidden_size"),
    (lambda c, p: fa_jax.forward(c, p, [[5, 6]], {"prefix_tuning": {"key": jnp.zeros((2, 3, 1, 16)),
                                                                   "value": jnp.zeros((2, 3, 1, 16))}}), "shape"),
    (lambda c, p: fa_jax.forward(c, p, [[5, 6]], {"prompt_tuning": {"embedding": jnp.zeros((3, 8))}}), "shape"),
    (lambda c, p: fa_jax.forward(c, p, [[5, 6]], {**fa_jax.init_prompt_tuning(c, jax.random.PRNGKey(0)),
                                                  **fa_jax.init_prefix_tuning(c, jax.random.PRNGKey(0))}), "both"),
    (lambda c, p: fa_jax.save_peft(c, {**fa_jax.init_prompt_tuning(c, jax.random.PRNGKey(0)),
                                       **fa_jax.init_lora(c, jax.random.PRNGKey(0))}, "/tmp/never"), "two"),
])
def test_bad_arguments_are_clear_errors(call, message, hf_dirs):
    config, params = fa_jax.load_model(hf_dirs["llama"][0])
    with pytest.raises(FaJaxError, match=message):
        call(config, params)


def test_loading_a_prompt_for_another_model_is_a_clear_error(hf_dirs, tmp_path):
    config, _ = fa_jax.load_model(hf_dirs["llama"][0])
    fa_jax.save_peft(config, fa_jax.init_prefix_tuning(config, jax.random.PRNGKey(0), num_virtual_tokens=2),
                     str(tmp_path / "a"))
    other = config.replace(num_hidden_layers=3)
    with pytest.raises(FaJaxError, match="num_layers"):
        fa_jax.load_peft(other, str(tmp_path / "a"))
    cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
    cfg.pop("num_layers")
    json.dump(cfg, open(tmp_path / "a" / "adapter_config.json", "w"))
    with pytest.raises(FaJaxError, match="shape"):
        fa_jax.load_peft(other, str(tmp_path / "a"))
    assert os.path.exists(tmp_path / "a" / "adapter_model.safetensors")
