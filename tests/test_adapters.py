"""Every adapter kind through the shared machinery: `adapter.kind` in pre-training and SFT, the export each kind
writes, loading it back, generation with the KV cache, and the README's parameter table."""
import json
import os
import re

import jax
import numpy as np
import pytest

import fa_jax
from fa_jax import adapters as adapters_lib
from fa_jax import run_config, sft, train
from fa_jax.errors import FaJaxError
from fa_jax.generate import generate_tokens
from fa_jax.models import transformer
from jit_counts import jit_counts

pytestmark = pytest.mark.usefixtures("contained_datasets_cache")

SETTINGS = {  # LoRA's way through training, export, generation and sft: tests/test_train, test_sft, test_generate
    "dora": {},
    "bottleneck": {"adapter.bottleneck_size": 8},
    "prompt_tuning": {"adapter.num_virtual_tokens": 4},
    "prefix_tuning": {"adapter.num_virtual_tokens": 4, "adapter.prefix_projection": True,
                      "adapter.encoder_hidden_size": 16},
    "llama_adapter": {"adapter.adapter_len": 3, "adapter.adapter_layers": 1},
}
README = os.path.join(os.path.dirname(__file__), "..", "README.md")
MODELS = os.path.join(os.path.dirname(__file__), "..", "configs", "models")


@pytest.fixture(scope="module")
def setup(make_teacher_corpus):
    root, corpus = make_teacher_corpus("kinds", n_docs=60, model_dir="model")  # the teacher of pretrain, sft's student
    records = [{"prompt": "the hacker wrote a program", "response": "it was on the system"},
               {"question": "what is the text", "answer": "a line of code"}]
    sft_data = root / "sft.jsonl"
    sft_data.write_text("\n".join(json.dumps(r) for r in records * 8) + "\n")
    return root, corpus, str(sft_data)


def _cfg(defaults, root, out, overrides):
    base = {"model": {"keep_layers": [0, 1], "remat": "full"}, "mesh": {"shape": [1, 1, 1]},
            "adapter": {"rank": 4, "alpha": 8.0}, "loss": {"chunk_size": 8},
            "optim": {"lr": 3e-2, "warmup_steps": 0},
            "run": {"steps": 2, "out_dir": str(out), "log_every": 1, "save_every": 0, "async_checkpoint": False,
                    "tensorboard": False}}
    cfg = run_config.merge(defaults, base, "test")
    return run_config.apply_overrides(cfg, [f"{k}={v!r}" for k, v in overrides.items()])


def _greedy(config, params, prompt, n, adapters):
    """Greedy decoding without a cache: the whole sequence through `forward` at every step, in a fixed-size buffer
    (attention is causal, so the filler after position t does not change the logits at t; one compilation)."""
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, :len(prompt)] = prompt
    step = jax.jit(lambda p, a, b: fa_jax.forward(config, p, b, adapters=a)[0])
    for t in range(len(prompt), len(prompt) + n):
        buf[0, t] = int(np.argmax(np.asarray(step(params, adapters, buf))[t - 1]))
    return buf[0, len(prompt):].tolist()


# LoRA and DoRA run by default; the other kinds end to end among the slow tests (bash scripts/test.sh -m slow):
# their numbers are checked against PEFT / NumPy in their own test modules.
@pytest.mark.parametrize("kind", [k if k in ("lora", "dora") else pytest.param(k, marks=pytest.mark.slow)
                                  for k in SETTINGS])
def test_every_kind_trains_exports_generates_and_fine_tunes(setup, tmp_path, kind):
    root, corpus, sft_data = setup
    model = str(root / "model")
    over = {"adapter.kind": kind, "model.teacher": model, "data.train": corpus, "data.seq_len": 16,
            "data.batch_size": 8, **SETTINGS[kind]}
    with jit_counts() as n:
        summary = train.pretrain(_cfg(train.pretrain_defaults(), root, tmp_path / "pre", over))
    assert n.traces["train_step"] == 1 and np.isfinite(summary["metrics"]["loss"])
    trained = jax.device_get(summary["adapters"])
    assert adapters_lib.kind_of(trained) == kind

    config, params = fa_jax.load_model(model)
    s_cfg, student = transformer.select_layers(config, params, [0, 1])
    fresh = adapters_lib.init_adapter(s_cfg, jax.random.PRNGKey(0), {"kind": kind, "rank": 4, "alpha": 8.0,
                                      **{k.split(".")[1]: v for k, v in SETTINGS[kind].items()}}, params=student)
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(fresh))]
    assert max(moved) > 1e-4  # two steps changed the adapter

    # the export (PEFT, or fa_jax's format for bottleneck adapters) loads back with the same logits
    exported = adapters_lib.load_adapter_dir(s_cfg, summary["peft_adapter"])
    toks = np.array([[1, 5, 9, 30, 41, 12, 7]])
    np.testing.assert_allclose(np.asarray(fa_jax.forward(s_cfg, student, toks, adapters=exported)),
                               np.asarray(fa_jax.forward(s_cfg, student, toks, adapters=trained)), atol=2e-5)

    # generation with the KV cache: the greedy tokens of a no-cache loop over forward
    prompts = [[1, 5, 9, 30], [1, 41]]
    got = generate_tokens(s_cfg, student, prompts, adapters=trained, max_new_tokens=5, eos_token_ids=[])
    assert got == [_greedy(s_cfg, student, p, 5, trained) for p in prompts]

    # downstream fine-tuning from this foundation adapter, same kind (a prefix is exported folded: plain k/v);
    # prompt tuning's way through is the same as the prefix's (tests/test_sft.py has LoRA's)
    if kind == "prompt_tuning":
        return
    sft_over = {"adapter.kind": kind, "model.student": model, "data.train": sft_data, "data.seq_len": 24,
                "data.batch_size": 8, "init": f"foundation:{tmp_path / 'pre'}", "run.steps": 1,
                **SETTINGS[kind]}
    if kind == "prefix_tuning":
        sft_over.update({"adapter.prefix_projection": False, "adapter.encoder_hidden_size": None})
    out = sft.finetune(_cfg(sft.sft_defaults(), root, tmp_path / "sft", sft_over))
    assert np.isfinite(out["metrics"]["loss"])


def test_a_foundation_of_another_kind_is_a_clear_error(setup, tmp_path):
    root, corpus, sft_data = setup
    model = str(root / "model")
    train.pretrain(_cfg(train.pretrain_defaults(), root, tmp_path / "pre",
                        {"adapter.kind": "bottleneck", "adapter.bottleneck_size": 8, "model.teacher": model,
                         "data.train": corpus, "data.seq_len": 16, "data.batch_size": 8, "run.steps": 1}))
    cfg = _cfg(sft.sft_defaults(), root, tmp_path / "sft",
               {"adapter.kind": "llama_adapter", "adapter.adapter_layers": 1, "model.student": model,
                "data.train": sft_data, "data.seq_len": 24, "data.batch_size": 8,
                "init": f"foundation:{tmp_path / 'pre'}"})
    with pytest.raises(FaJaxError, match="layout of adapter.kind='llama_adapter'"):
        sft.finetune(cfg)
    with pytest.raises(FaJaxError, match="adapter.kind='ia3'"):
        adapters_lib.init_adapter(transformer.select_layers(*fa_jax.load_model(model), [0])[0],
                                  jax.random.PRNGKey(0), {"kind": "ia3"})


def test_readme_parameter_table():
    """The README's table of adapter kinds: parameter counts for Llama-3.2-1B at the default settings, computed
    here from shapes (jax.eval_shape) and by hand from the architecture."""
    config = fa_jax.load_config(os.path.join(MODELS, "llama-3.2-1b.json"))
    D, F, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    G = config.num_key_value_heads * config.head_dim
    d = adapters_lib.adapter_defaults()
    r, m, n = d["rank"], d["bottleneck_size"], d["num_virtual_tokens"]
    linear = [(D, D), (D, G), (D, G), (D, D), (D, F), (D, F), (F, D)]
    by_hand = {
        "lora": L * sum(r * (i + o) for i, o in linear),
        "dora": L * sum(r * (i + o) + o for i, o in linear),
        "bottleneck": L * 2 * (2 * m * D + D + m),
        "prompt_tuning": n * D,
        "prefix_tuning": L * 2 * n * G,
        "llama_adapter": L * (d["adapter_len"] * D + 1),
    }
    table = re.search(r"\| kind \| .*?\n\n", open(README).read(), re.S).group(0)
    rows = {m_.group(1): int(m_.group(2).replace(",", ""))
            for m_ in re.finditer(r"^\| `(\w+)` \| ([\d,]+) \|", table, re.M)}
    assert set(rows) == set(adapters_lib.KINDS)
    for kind in adapters_lib.KINDS:
        counted = adapters_lib.num_params(config, {"kind": kind})
        assert counted == by_hand[kind] == rows[kind], kind
