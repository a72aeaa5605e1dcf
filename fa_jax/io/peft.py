"""PEFT LoRA directories in and out: adapter_config.json + adapter_model.safetensors.

PEFT stores, per module, `base_model.model.<module>.lora_A.weight` [R, I] and `...lora_B.weight` [O, R] (torch
layout); fa_jax keeps A [I, R] and B [R, O]. Per-module ranks and alphas travel in `rank_pattern` / `alpha_pattern`.
DoRA adapters (`use_dora: true`) add `...<module>.lora_magnitude_vector` [O], fa_jax's `magnitude`.

Non-matrix tensors (a LoRE-Adapter keeps them, `fa-jax truncate`): PEFT's `modules_to_save` modules store their whole
weight, `base_model.model.<module>.weight` (its delta is that minus the base's); tensors PEFT cannot hold (the
biases of adapted linear layers) go to fa_jax's side file `lore_extra.safetensors`, float32 deltas under their
Hugging Face names. `load_peft` returns the LoRA modules only; `non_matrix_tensors` lists the rest (`fa-jax merge`
applies both).
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from fa_jax import lora as lora_lib
from fa_jax.errors import FaJaxError
from fa_jax.io.atomic import atomic_dir
from fa_jax.io.peft_dir import (  # noqa: F401  (the directory's files; public here too, as they were defined here)
    CONFIG, MODEL_RECORD, RECORD_KEYS, WEIGHTS, check_made_for, made_for, model_record, read_adapter_config,
    weights_file, write_model_record)
from fa_jax.io.peft_prompts import load_peft_prompt, save_peft_prompt
from fa_jax.io.safetensors import SafetensorsFile, write
from fa_jax.models.spec import linear_modules
from fa_jax.tree import unflatten

PREFIX = "base_model.model."
EXTRA = "lore_extra.safetensors"  # float32 deltas (HF names) of tensors PEFT cannot hold: W = base + scale * delta
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _most_common(values):
    return collections.Counter(values).most_common(1)[0][0]


def _alpha_of(scale: float, rank: int, use_rslora: bool) -> float:
    alpha = scale * (math.sqrt(rank) if use_rslora else rank)
    return float(round(alpha)) if abs(alpha - round(alpha)) < 1e-4 else alpha


def save_peft(config, adapters, out_dir: str, *, use_rslora: bool = False, base_model_name_or_path: str | None = None,
              dtype=None, overwrite: bool = False) -> str:
    """Write a LoRA tree as a PEFT directory that `PeftModel.from_pretrained` loads on the transformers model.

    `use_rslora` only chooses how alpha is written (alpha = scale * sqrt(r) instead of scale * r); the math is
    the same either way. Ranks or alphas that differ between modules go to rank_pattern / alpha_pattern.
    A DoRA tree (every module with a `magnitude`) is written with `use_dora: true`.
    """
    if "prompt_tuning" in (adapters or {}) or "prefix_tuning" in (adapters or {}):  # io/peft_prompts.py
        if adapters.get("model"):
            raise FaJaxError("save_peft: a PEFT directory holds one kind of adapter: save the prompt / prefix and "
                             "the per-module adapters (adapters['model']) as two directories")
        return save_peft_prompt(config, adapters, out_dir, base_model_name_or_path=base_model_name_or_path,
                                dtype=dtype, overwrite=overwrite)
    with atomic_dir(out_dir, overwrite) as tmp:
        write_peft(config, adapters, tmp, use_rslora=use_rslora, base_model_name_or_path=base_model_name_or_path,
                   dtype=dtype)
    return out_dir


def write_peft(config, adapters, directory: str, *, use_rslora: bool = False,
               base_model_name_or_path: str | None = None, dtype=None, modules_to_save=(), extra=()) -> None:
    """`save_peft`'s files, written into the existing `directory` (the caller makes it atomic).

    modules_to_save: [(HF tensor name, shape, fetch)], whole trained weights of non-linear modules (embeddings, LM
    head, norms), stored as PEFT's modules_to_save (with a tied LM head, PEFT's `ensure_weight_tying`).
    extra: [(HF tensor name, shape, fetch)], float32 deltas for the side file `EXTRA`. fetch: as in
    `safetensors.write`.
    """
    modules = list(lora_lib.iter_modules(adapters))
    if not modules:
        raise FaJaxError("save_peft: the adapter tree holds no LoRA module (expected lora_A/lora_B/scale leaves)")
    dora = {p for p, ad in modules if lora_lib.is_dora(ad)}
    if dora and len(dora) != len(modules):
        plain = next(p for p, _ in modules if p not in dora)
        raise FaJaxError(f"save_peft: {sorted(dora)[0]} is DoRA but {plain} is plain LoRA; PEFT's use_dora holds for "
                         "every module of an adapter (save them as two adapters)")
    known = dict(linear_modules(config))
    ranks, alphas = {}, {}
    for path, ad in modules:
        if path not in known:
            raise FaJaxError(f"save_peft: adapter module {path!r} is not a linear layer of this model")
        d_in, d_out = known[path]
        A, B = ad["lora_A"], ad["lora_B"]
        if A.shape[0] != d_in or B.shape[1] != d_out or A.shape[1] != B.shape[0]:
            raise FaJaxError(f"save_peft: {path} has lora_A {list(A.shape)} and lora_B {list(B.shape)}, "
                             f"expected [{d_in}, r] and [r, {d_out}]")
        if path in dora and tuple(ad["magnitude"].shape) != (d_out,):
            raise FaJaxError(f"save_peft: {path} has magnitude {list(ad['magnitude'].shape)}, expected [{d_out}]")
        ranks[path] = int(A.shape[1])
        alphas[path] = _alpha_of(float(ad["scale"]), ranks[path], use_rslora)
    r = _most_common(ranks.values())
    alpha = _most_common(alphas.values())
    names = sorted({p.rsplit(".", 1)[-1] for p in ranks})
    every_layer = {m for m in known if m.rsplit(".", 1)[-1] in names}
    target_modules = names if every_layer == set(ranks) else sorted(ranks)
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": target_modules,
        "rank_pattern": {p: k for p, k in ranks.items() if k != r},
        "alpha_pattern": {p: a for p, a in alphas.items() if a != alpha},
        "use_rslora": use_rslora, "use_dora": bool(dora), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "inference_mode": True, "base_model_name_or_path": base_model_name_or_path, "revision": None,
    }
    saved = {n: (shape, fetch) for n, shape, fetch in modules_to_save}
    tied = config.tie_word_embeddings and EMBED in saved
    if tied:  # PEFT ties the LM head to the saved embedding, and wants it saved under both names
        saved[HEAD] = saved[EMBED]
        cfg["ensure_weight_tying"] = True
    for name in saved:
        if name.rsplit(".", 1)[0] in known:
            raise FaJaxError(f"save_peft: {name} belongs to a LoRA-adapted linear layer; PEFT cannot also save it")
    if saved:  # full module paths: PEFT matches entries by suffix, so a short name such as "norm" would catch others
        cfg["modules_to_save"] = sorted({n.rsplit(".", 1)[0] for n in saved} - ({"lm_head"} if tied else set()))
    out_dt = lambda a: np.dtype(jnp.dtype(dtype or a.dtype))
    entries = []
    for path, ad in modules:
        A, B = ad["lora_A"], ad["lora_B"]
        entries.append((f"{PREFIX}{path}.lora_A.weight", (A.shape[1], A.shape[0]), out_dt(A),
                        lambda A=A: np.asarray(jax.device_get(A)).T))
        entries.append((f"{PREFIX}{path}.lora_B.weight", (B.shape[1], B.shape[0]), out_dt(B),
                        lambda B=B: np.asarray(jax.device_get(B)).T))
        if path in dora:
            m = ad["magnitude"]
            entries.append((f"{PREFIX}{path}.lora_magnitude_vector", tuple(m.shape), out_dt(m),
                            lambda m=m: np.asarray(jax.device_get(m))))
    entries += [(f"{PREFIX}{n}", tuple(shape), np.float32, fetch) for n, (shape, fetch) in sorted(saved.items())]
    write(os.path.join(directory, WEIGHTS), entries, metadata={"format": "pt"})
    write_model_record(config, directory)
    if extra:
        write(os.path.join(directory, EXTRA), [(n, tuple(shape), np.float32, fetch) for n, shape, fetch in extra],
              metadata={"format": "pt", "fa_jax": "LoRE-Adapter deltas PEFT cannot hold: W = base + scale * delta"})
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


_LORA_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight")
_DORA_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.(lora_magnitude_vector)(?:\.[A-Za-z0-9_]+)?(?:\.weight)?")


def non_matrix_tensors(in_dir: str, cfg: dict | None = None) -> dict[str, tuple[str, SafetensorsFile, str]]:
    """{HF tensor name: (kind, file, key in file)} of a PEFT directory's tensors that are not LoRA factors: kind
    "full" for modules_to_save weights (the module's whole trained tensor, delta = it - base), "delta" for the
    side file `EXTRA` (float32 deltas). Empty for a plain LoRA directory."""
    cfg = read_adapter_config(in_dir) if cfg is None else cfg
    out = {}
    saved = cfg.get("modules_to_save") or []
    if saved:
        st = SafetensorsFile(weights_file(in_dir))
        names = {k: k[len(PREFIX):] if k.startswith(PREFIX) else k
                 for k in st.keys() if not (_LORA_KEY.fullmatch(k) or _DORA_KEY.fullmatch(k))}
        tied = cfg.get("ensure_weight_tying") and EMBED in names.values()
        for key, name in names.items():
            module = name.rsplit(".", 1)[0]
            if any(module.endswith(m) for m in saved) or (tied and name == HEAD):  # PEFT's suffix rule
                out[name] = ("full", st, key)
    side = os.path.join(in_dir, EXTRA)
    if os.path.exists(side):
        st = SafetensorsFile(side)
        for key in st.keys():
            if key in out:
                raise FaJaxError(f"{side}: tensor {key!r} is also a modules_to_save weight of {WEIGHTS}")
            out[key] = ("delta", st, key)
    return out


def load_peft(config, in_dir: str, dtype=jnp.float32, warn_non_matrix: bool = True):
    """A LoRA tree from a PEFT directory (any PEFT LoRA adapter for a supported architecture). A DoRA adapter
    (`use_dora: true`) gives DoRA modules, with `magnitude` [O] float32. Non-matrix tensors (modules_to_save, the
    side file of a LoRE-Adapter: `non_matrix_tensors`) are not part of the tree; a warning says so unless
    `warn_non_matrix` is False (for callers that apply them themselves, as `fa-jax merge`)."""
    cfg = read_adapter_config(in_dir)
    f = os.path.join(in_dir, CONFIG)
    if cfg.get("peft_type") in ("PROMPT_TUNING", "PREFIX_TUNING"):  # {"prompt_tuning"/"prefix_tuning": ...}
        return load_peft_prompt(config, in_dir, cfg, dtype)
    if cfg.get("peft_type") != "LORA":
        raise FaJaxError(f"{f}: peft_type {cfg.get('peft_type')!r} is not supported here (expected 'LORA')")
    for key, ok, why in (("fan_in_fan_out", False, "fan_in_fan_out layouts"), ("bias", "none", "trained biases")):
        if cfg.get(key, ok) not in (ok, None):
            raise FaJaxError(f"{f}: {key}={cfg[key]!r}: {why} are not supported by load_peft")
    wf = weights_file(in_dir)
    extras = non_matrix_tensors(in_dir, cfg)
    if extras and warn_non_matrix:
        warnings.warn(f"{in_dir}: {len(extras)} non-matrix tensor(s) (modules_to_save / {EXTRA}, e.g. "
                      f"{next(iter(extras))}) are not in the LoRA tree load_peft returns; fa-jax merge applies them",
                      stacklevel=2)
    full_keys = {key for kind, _, key in extras.values() if kind == "full"}
    st = SafetensorsFile(wf)
    known = dict(linear_modules(config))
    use_dora = bool(cfg.get("use_dora", False))
    pairs: dict[str, dict[str, str]] = {}
    for name in st.keys():
        if name in full_keys:
            continue
        m = _LORA_KEY.fullmatch(name) or _DORA_KEY.fullmatch(name)
        if not m:
            raise FaJaxError(f"{wf}: tensor {name!r} is not a LoRA A/B weight (or DoRA magnitude) of a linear layer")
        if m.group(2) == "lora_magnitude_vector" and not use_dora:
            raise FaJaxError(f"{wf}: tensor {name!r} is a DoRA magnitude but {CONFIG} has use_dora false")
        path, which = m.groups()
        if path not in known:
            raise FaJaxError(f"{wf}: tensor {name!r} adapts module {path!r}, which this {config.model_type} model "
                             f"does not have")
        pairs.setdefault(path, {})[which] = name
    use_rslora = bool(cfg.get("use_rslora", False))
    flat = {}
    order = {p: i for i, (p, _) in enumerate(linear_modules(config))}
    for path in sorted(pairs, key=order.get):
        if not {"lora_A", "lora_B"} <= set(pairs[path]):
            raise FaJaxError(f"{wf}: module {path!r} has only {sorted(pairs[path])}, expected lora_A and lora_B")
        if use_dora and "lora_magnitude_vector" not in pairs[path]:
            raise FaJaxError(f"{wf}: module {path!r} has no lora_magnitude_vector, but {CONFIG} says use_dora: true")
        A, B = st.get(pairs[path]["lora_A"]), st.get(pairs[path]["lora_B"])
        d_in, d_out = known[path]
        r = A.shape[0]
        if A.shape != (r, d_in) or B.shape != (d_out, r):
            raise FaJaxError(f"{wf}: module {path!r} has lora_A {list(A.shape)} and lora_B {list(B.shape)}, "
                             f"expected [r, {d_in}] and [{d_out}, r]")
        alpha = float(lora_lib.pattern_value(cfg.get("alpha_pattern"), path, cfg.get("lora_alpha", 8)))
        flat[path] = {"lora_A": jnp.asarray(np.asarray(A, np.float32).T, dtype),
                      "lora_B": jnp.asarray(np.asarray(B, np.float32).T, dtype),
                      "scale": jnp.asarray(alpha / (math.sqrt(r) if use_rslora else r), jnp.float32)}
        if use_dora:
            mag = st.get(pairs[path]["lora_magnitude_vector"])
            if tuple(mag.shape) != (d_out,):
                raise FaJaxError(f"{wf}: module {path!r} has lora_magnitude_vector {list(mag.shape)}, "
                                 f"expected [{d_out}]")
            flat[path]["magnitude"] = jnp.asarray(np.asarray(mag, np.float32), jnp.float32)
    if not flat:
        raise FaJaxError(f"{wf}: holds no LoRA weights")
    return unflatten(flat)
