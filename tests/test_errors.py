"""User mistakes raise one FaJaxError naming what is wrong, before any output is written.

Every test checks the message names the right thing (file, tensor, parameter path, module or value) and that
nothing is left behind (no output directory, no temporary directory) when a save fails.
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
from fa_jax import FaJaxError
from fa_jax.io import hf as hf_io
from fa_jax.io import peft as peft_io
from fa_jax.io.safetensors import SafetensorsFile, write as st_write
from fa_jax.tree import flatten, unflatten
from helpers import save_hf_model


# ---------------------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny saved llama (2 layers, untied) that tests copy before modifying."""
    d = tmp_path_factory.mktemp("llama") / "model"
    save_hf_model("llama", d)
    return d


@pytest.fixture(scope="module")
def llama(llama_dir):
    return fa_jax.load_model(str(llama_dir))


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """A PEFT adapter made by the peft library on the tiny 2-layer llama (q_proj, v_proj, r=4)."""
    from peft import LoraConfig, get_peft_model

    from helpers import make_hf_model

    d = tmp_path_factory.mktemp("peft") / "adapter"
    model = get_peft_model(make_hf_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(str(d))
    return d


def copy_dir(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def edit_json(path, **changes):
    with open(path) as f:
        d = json.load(f)
    for k, v in changes.items():
        if v is _DELETE:
            d.pop(k, None)
        else:
            d[k] = v
    with open(path, "w") as f:
        json.dump(d, f)


_DELETE = object()


def rewrite_safetensors(path, drop=(), rename=None):
    """Rewrite a safetensors file without the tensors in `drop` and with names mapped by `rename`."""
    src = SafetensorsFile(str(path))
    arrays = {n: np.array(src.get(n)) for n in src.keys() if n not in drop}
    del src
    rename = rename or {}
    entries = [(rename.get(n, n), a.shape, a.dtype, lambda a=a: a) for n, a in arrays.items()]
    st_write(str(path), entries, metadata={"format": "pt"})


def snapshot(d):
    """{relative path: bytes} of every file under d."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = fh.read()
    return out


def failing_write(real, fail_call=1, fail_entry=1):
    """A safetensors writer that, on its `fail_call`-th call, writes the header and the first tensor(s) and then
    fails while fetching entry `fail_entry` (as a full disk would)."""
    calls = {"n": 0}

    def write(path, entries, metadata=None):
        calls["n"] += 1
        entries = list(entries)
        if calls["n"] == fail_call:
            i = min(fail_entry, len(entries) - 1)
            name, shape, dt, _ = entries[i]

            def boom():
                assert os.path.exists(path)  # the file has really been started (header written)
                raise OSError(28, "No space left on device (simulated)")

            entries[i] = (name, shape, dt, boom)
        return real(path, entries, metadata)

    write.calls = calls
    return write


# ---------------------------------------------------------------------------------------------------------------
# load_model: paths and config.json


def test_load_model_dir_without_config_json(llama_dir, tmp_path):
    d = copy_dir(llama_dir, tmp_path)
    os.remove(d / "config.json")
    with pytest.raises(FaJaxError, match=rf"{re.escape(str(d))}.*no config\.json"):
        fa_jax.load_model(str(d))


def test_load_model_missing_path(tmp_path):
    p = tmp_path / "does-not-exist"
    with pytest.raises(FaJaxError, match=rf"{re.escape(str(p))}.*no such file or directory"):
        fa_jax.load_model(str(p))


def test_load_model_on_a_plain_file(llama_dir):
    f = llama_dir / "config.json"
    with pytest.raises(FaJaxError, match=rf"{re.escape(str(f))}.*Hugging Face model directory or a \.gguf"):
        fa_jax.load_model(str(f))


def test_load_model_config_json_not_json(llama_dir, tmp_path):
    d = copy_dir(llama_dir, tmp_path)
    (d / "config.json").write_text("{\"model_type\": \"llama\",")
    with pytest.raises(FaJaxError, match=rf"{re.escape(str(d / 'config.json'))}.*not valid JSON"):
        fa_jax.load_model(str(d))


def test_unsupported_model_type_lists_supported(llama_dir, tmp_path):
    d = copy_dir(llama_dir, tmp_path)
    edit_json(d / "config.json", model_type="gpt2")
    with pytest.raises(FaJaxError) as e:
        fa_jax.load_model(str(d))
    msg = str(e.value)
    assert "'gpt2'" in msg and "config.json" in msg
    for t in ("llama", "mistral", "qwen2", "gemma"):
        assert t in msg
    assert "\n" not in msg


def test_missing_required_field(llama_dir, tmp_path):
    d = copy_dir(llama_dir, tmp_path)
    edit_json(d / "config.json", hidden_size=_DELETE)
    with pytest.raises(FaJaxError, match=r"config\.json: missing required field\(s\) hidden_size"):
        fa_jax.load_model(str(d))


def test_unsupported_rope_type_names_field(llama_dir, tmp_path):
    d = copy_dir(llama_dir, tmp_path)
    edit_json(d / "config.json", rope_parameters={"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0})
    with pytest.raises(FaJaxError, match=r"config\.json: rope_parameters\.rope_type='yarn' is not supported "
                                         r"\(supported: default, linear, llama3\)"):
        fa_jax.load_model(str(d))


def test_unsupported_rope_type_transformers4_layout_names_rope_scaling(llama_dir, tmp_path):
    """A transformers-4 config.json has no rope_parameters: the message must name the field the file has."""
    d = copy_dir(llama_dir, tmp_path)
    edit_json(d / "config.json", rope_parameters=_DELETE, rope_theta=10000.0,
              rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    with pytest.raises(FaJaxError, match=r"config\.json: rope_scaling\.rope_type='yarn' is not supported"):
        fa_jax.load_model(str(d))


def test_llama3_rope_missing_subfield(llama_dir, tmp_path):
    d = copy_dir(llama_dir, tmp_path)
    edit_json(d / "config.json", rope_parameters={"rope_theta": 10000.0, "rope_type": "llama3", "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    with pytest.raises(FaJaxError, match=r"config\.json: rope_type 'llama3' needs "
                                         r"rope_parameters\.original_max_position_embeddings$"):
        fa_jax.load_model(str(d))


# ---------------------------------------------------------------------------------------------------------------
# load_model: tensors


def test_tensor_shape_disagrees_with_config(llama_dir, tmp_path):
    d = copy_dir(llama_dir, tmp_path)
    edit_json(d / "config.json", intermediate_size=96)
    with pytest.raises(FaJaxError) as e:
        fa_jax.load_model(str(d))
    msg = str(e.value)
    assert str(d / "model.safetensors") in msg
    assert "'model.layers.0.mlp.gate_proj.weight'" in msg
    assert "[128, 64]" in msg and "[96, 64]" in msg  # the file's shape and the one config.json implies


def test_missing_tensor(llama_dir, tmp_path):
    d = copy_dir(llama_dir, tmp_path)
    rewrite_safetensors(d / "model.safetensors", drop={"model.layers.1.mlp.down_proj.weight"})
    with pytest.raises(FaJaxError, match=r"missing tensor 'model\.layers\.1\.mlp\.down_proj\.weight' "
                                         r"\(needed by the config: shape \[64, 128\]\)"):
        fa_jax.load_model(str(d))


def test_extra_tensor_config_with_fewer_layers(llama_dir, tmp_path):
    d = copy_dir(llama_dir, tmp_path)
    edit_json(d / "config.json", num_hidden_layers=1)
    with pytest.raises(FaJaxError, match=r"not used by this llama config, e\.g\. 'model\.layers\.1\."):
        fa_jax.load_model(str(d))


@pytest.mark.parametrize("keep", ["half", "header_only", "4_bytes", "empty"])
def test_truncated_safetensors_names_file(llama_dir, tmp_path, keep):
    d = copy_dir(llama_dir, tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    n = {"half": len(data) // 2, "header_only": 40, "4_bytes": 4, "empty": 0}[keep]
    f.write_bytes(data[:n])
    with pytest.raises(FaJaxError, match=rf"^{re.escape(str(f))}: .*(truncated|not a safetensors)"):
        fa_jax.load_model(str(d))


def test_no_safetensors_in_dir(llama_dir, tmp_path):
    d = copy_dir(llama_dir, tmp_path)
    os.remove(d / "model.safetensors")
    with pytest.raises(FaJaxError, match=rf"{re.escape(str(d))}: no model\.safetensors"):
        fa_jax.load_model(str(d))


def test_index_lists_missing_shard(llama_dir, tmp_path):
    d = copy_dir(llama_dir, tmp_path)
    names = list(SafetensorsFile(str(d / "model.safetensors")).keys())
    os.rename(d / "model.safetensors", d / "model-00001-of-00002.safetensors")
    weight_map = {n: ("model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors")
                  for i, n in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(FaJaxError, match=r"model\.safetensors\.index\.json: tensor '.*' is listed in "
                                         r"model-00002-of-00002\.safetensors, which does not exist"):
        fa_jax.load_model(str(d))


def test_load_model_bad_dtype(llama_dir):
    """A dtype name that is not a dtype is a user mistake: one FaJaxError naming the value."""
    with pytest.raises(FaJaxError, match=r"float33"):
        fa_jax.load_model(str(llama_dir), dtype="float33")


# ---------------------------------------------------------------------------------------------------------------
# load_peft


def test_peft_adapter_for_missing_layer(llama, peft_dir):
    config, _ = llama
    one_layer = config.replace(num_hidden_layers=1)
    with pytest.raises(FaJaxError) as e:
        fa_jax.load_peft(one_layer, str(peft_dir))
    msg = str(e.value)
    assert str(peft_dir / "adapter_model.safetensors") in msg
    assert "'model.layers.1.self_attn.q_proj'" in msg and "does not have" in msg


def test_peft_adapter_for_unknown_module_name(llama, peft_dir, tmp_path):
    config, _ = llama
    d = copy_dir(peft_dir, tmp_path)
    old = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    rewrite_safetensors(d / "adapter_model.safetensors", rename={old: old.replace("v_proj", "value")})
    with pytest.raises(FaJaxError, match=r"adapts module 'model\.layers\.0\.self_attn\.value', which this llama "
                                         r"model does not have"):
        fa_jax.load_peft(config, str(d))


def test_peft_adapter_loads(llama, peft_dir):
    """The fixture adapter itself is fine (so the failures above come from the edits)."""
    config, _ = llama
    lora = fa_jax.load_peft(config, str(peft_dir))
    assert set(lora["model"]["layers"]["1"]["self_attn"]) == {"q_proj", "v_proj"}


def test_peft_dir_without_adapter_config(llama, peft_dir, tmp_path):
    config, _ = llama
    d = copy_dir(peft_dir, tmp_path)
    os.remove(d / "adapter_config.json")
    with pytest.raises(FaJaxError, match=rf"{re.escape(str(d))}: no adapter_config\.json"):
        fa_jax.load_peft(config, str(d))


def test_peft_dir_missing(llama, tmp_path):
    config, _ = llama
    with pytest.raises(FaJaxError, match=rf"{re.escape(str(tmp_path / 'nope'))}: no such adapter directory"):
        fa_jax.load_peft(config, str(tmp_path / "nope"))


def test_peft_use_dora_without_magnitude(llama, peft_dir, tmp_path):
    config, _ = llama
    d = copy_dir(peft_dir, tmp_path)
    edit_json(d / "adapter_config.json", use_dora=True)
    with pytest.raises(FaJaxError, match=r"module 'model\.layers\.0\.self_attn\.q_proj' has no lora_magnitude_vector, "
                                         r"but adapter_config\.json says use_dora: true"):
        fa_jax.load_peft(config, str(d))


def test_peft_lora_shape_mismatch(llama, peft_dir, tmp_path):
    """A model whose hidden size differs from the adapter's: names the module and both shapes."""
    config, _ = llama
    with pytest.raises(FaJaxError, match=r"module 'model\.layers\.0\.self_attn\.q_proj' has lora_A \[4, 64\] .* "
                                         r"expected \[r, 32\]"):
        fa_jax.load_peft(config.replace(hidden_size=32), str(peft_dir))


# ---------------------------------------------------------------------------------------------------------------
# save_hf


def test_save_hf_refuses_existing_dir(llama, tmp_path):
    config, params = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = snapshot(tmp_path)
    with pytest.raises(FaJaxError, match=rf"{re.escape(str(out))}: output directory already exists"):
        fa_jax.save_hf(config, params, str(out))
    assert snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_save_hf_wrong_shape_leaves_nothing(llama, tmp_path):
    config, params = llama
    flat = flatten(params)
    flat["model.layers.1.mlp.up_proj.kernel"] = jnp.zeros((64, 96))
    out = tmp_path / "out"
    with pytest.raises(FaJaxError, match=r"save_hf: model\.layers\.1\.mlp\.up_proj\.kernel has shape \[64, 96\], "
                                         r"the config implies \[64, 128\]"):
        fa_jax.save_hf(config, unflatten(flat), str(out))
    assert os.listdir(tmp_path) == []


def test_save_hf_missing_param_leaves_nothing(llama, tmp_path):
    config, params = llama
    flat = flatten(params)
    del flat["model.norm.weight"]
    with pytest.raises(FaJaxError, match=r"save_hf: params have no 'model\.norm\.weight' \(expected shape \[64\]\)"):
        fa_jax.save_hf(config, unflatten(flat), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_save_hf_extra_param_rejected(llama, tmp_path):
    """Params the config does not use (here an lm_head for a tied config) would be silently dropped: refuse."""
    config, params = llama
    tied = config.replace(tie_word_embeddings=True)
    with pytest.raises(FaJaxError, match=r"save_hf: .*'lm_head\.kernel'"):
        fa_jax.save_hf(tied, params, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_save_hf_unstorable_dtype_leaves_nothing(llama, tmp_path):
    config, params = llama
    with pytest.raises(FaJaxError, match=r"complex64"):
        fa_jax.save_hf(config, params, str(tmp_path / "out"), dtype="complex64")
    assert os.listdir(tmp_path) == []


def test_save_hf_failure_midway_leaves_nothing(llama, tmp_path, monkeypatch):
    config, params = llama
    w = failing_write(hf_io.write)
    monkeypatch.setattr(hf_io, "write", w)
    with pytest.raises(OSError, match="No space left"):
        fa_jax.save_hf(config, params, str(tmp_path / "out"))
    assert w.calls["n"] == 1
    assert os.listdir(tmp_path) == []


def test_save_hf_failure_in_second_shard_leaves_nothing(llama, tmp_path, monkeypatch):
    config, params = llama
    w = failing_write(hf_io.write, fail_call=2)
    monkeypatch.setattr(hf_io, "write", w)
    with pytest.raises(OSError, match="No space left"):
        fa_jax.save_hf(config, params, str(tmp_path / "out"), max_shard_size="40KB")
    assert w.calls["n"] == 2
    assert os.listdir(tmp_path) == []


def test_save_hf_failure_with_overwrite_keeps_old_output(llama, tmp_path, monkeypatch):
    config, params = llama
    out = tmp_path / "out"
    fa_jax.save_hf(config, params, str(out))
    before = snapshot(tmp_path)
    monkeypatch.setattr(hf_io, "write", failing_write(hf_io.write))
    with pytest.raises(OSError, match="No space left"):
        fa_jax.save_hf(config, jax.tree.map(lambda x: x + 1, params), str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert snapshot(tmp_path) == before


def test_save_hf_failure_in_final_rename_keeps_old_output(llama, tmp_path, monkeypatch):
    """Even when moving the new directory into place fails, the old output must survive under its own name."""
    config, params = llama
    out = tmp_path / "out"
    fa_jax.save_hf(config, params, str(out))
    before = snapshot(tmp_path)
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(str(src)).startswith(".out.tmp-"):
            raise OSError(18, "Invalid cross-device link (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        fa_jax.save_hf(config, params, str(out), overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------
# save_peft


@pytest.fixture()
def lora(llama):
    config, _ = llama
    return fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=4, alpha=8, targets=["q_proj", "v_proj"])


def test_save_peft_refuses_existing_dir(llama, lora, tmp_path):
    config, _ = llama
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = snapshot(tmp_path)
    with pytest.raises(FaJaxError, match=rf"{re.escape(str(out))}: output directory already exists"):
        fa_jax.save_peft(config, lora, str(out))
    assert snapshot(tmp_path) == before


def test_save_peft_failure_midway_leaves_nothing(llama, lora, tmp_path, monkeypatch):
    config, _ = llama
    monkeypatch.setattr(peft_io, "write", failing_write(peft_io.write))
    with pytest.raises(OSError, match="No space left"):
        fa_jax.save_peft(config, lora, str(tmp_path / "adapter"))
    assert os.listdir(tmp_path) == []


def test_save_peft_failure_with_overwrite_keeps_old_output(llama, lora, tmp_path, monkeypatch):
    config, _ = llama
    out = tmp_path / "adapter"
    fa_jax.save_peft(config, lora, str(out))
    before = snapshot(tmp_path)
    monkeypatch.setattr(peft_io, "write", failing_write(peft_io.write, fail_entry=3))
    with pytest.raises(OSError, match="No space left"):
        fa_jax.save_peft(config, jax.tree.map(lambda x: x * 2, lora), str(out), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    assert snapshot(tmp_path) == before
    assert fa_jax.load_peft(config, str(out))  # still a valid adapter


def test_save_peft_module_not_in_model(llama, lora, tmp_path):
    config, _ = llama
    with pytest.raises(FaJaxError, match=r"save_peft: adapter module 'model\.layers\.1\.self_attn\.q_proj' is not "
                                         r"a linear layer of this model"):
        fa_jax.save_peft(config.replace(num_hidden_layers=1), lora, str(tmp_path / "adapter"))
    assert os.listdir(tmp_path) == []


def test_save_peft_empty_tree(llama, tmp_path):
    config, _ = llama
    with pytest.raises(FaJaxError, match=r"save_peft: the adapter tree holds no LoRA module"):
        fa_jax.save_peft(config, {}, str(tmp_path / "adapter"))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# init_lora


def test_init_lora_unknown_target_lists_modules(llama):
    config, _ = llama
    with pytest.raises(FaJaxError) as e:
        fa_jax.init_lora(config, jax.random.PRNGKey(0), targets=["q_proj", "query"])
    msg = str(e.value)
    assert "'query'" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "all-linear"):
        assert name in msg


@pytest.mark.parametrize("rank", [0, -2])
def test_init_lora_rank_rejected(llama, rank):
    config, _ = llama
    with pytest.raises(FaJaxError, match=rf"LoRA rank must be >= 1, got {rank}"):
        fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=rank)


def test_init_lora_rank_pattern_zero_rejected(llama):
    config, _ = llama
    with pytest.raises(FaJaxError, match=r"rank.*q_proj.*0|q_proj.*rank.*0"):
        fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=4, rank_pattern={"q_proj": 0})


def test_init_lora_pattern_key_matching_nothing_rejected(llama):
    """A typo in rank_pattern would otherwise silently train every module at the default rank."""
    config, _ = llama
    with pytest.raises(FaJaxError, match=r"q_prj"):
        fa_jax.init_lora(config, jax.random.PRNGKey(0), rank=4, rank_pattern={"q_prj": 16})


def test_init_lora_unknown_init(llama):
    config, _ = llama
    with pytest.raises(FaJaxError, match=r"unknown LoRA init 'xavier'"):
        fa_jax.init_lora(config, jax.random.PRNGKey(0), init="xavier")
