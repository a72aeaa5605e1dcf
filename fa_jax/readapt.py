"""RE-Adapt on checkpoint directories, streaming tensor by tensor (`fa-jax diff | truncate | merge`).

Host memory stays near the largest tensors in flight, not the model size: each output tensor is computed from the
input tensors of the same name when it is written, and only LoRA factors (small) are held whole.

    fa-jax diff --base DIR --tuned DIR --out DELTA          # RE-Adapter: tuned - base, as safetensors (HF names)
    fa-jax truncate --delta DELTA --tau 0.5 --out LORE      # LoRE-Adapter: a PEFT LoRA directory (+ the other deltas)
    fa-jax merge --base DIR --adapter A:0.5 --adapter B:0.5 --out MERGED   # partial adaptation, an HF directory
"""
from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from fa_jax import config as config_lib
from fa_jax import lora as lora_lib
from fa_jax import runs, treemath
from fa_jax.errors import FaJaxError
from fa_jax.io import hf, peft
from fa_jax.io.atomic import atomic_dir, write_text
from fa_jax.models.spec import count_params, param_specs
from fa_jax.tree import flatten, unflatten

DELTA_META = "readapt.json"
BLOCK_BYTES = 64 << 20  # float32 bytes of one row block: large tensors are processed a block at a time


def _row_blocks(shape):
    """(start, stop) row ranges covering a tensor's first axis, each about BLOCK_BYTES of float32."""
    rows = shape[0] if shape else 1
    per_row = 4 * int(np.prod(shape[1:], dtype=np.int64)) if shape else 4
    step = max(1, BLOCK_BYTES // max(per_row, 1))
    return [(i, min(rows, i + step)) for i in range(0, rows, step)]


def open_model(path: str, role: str):
    """(config, CheckpointReader, {param path: HF tensor name}) of a Hugging Face directory; `role` names it in
    errors ("base", "tuned")."""
    if not os.path.isdir(path):
        raise FaJaxError(f"{role} {path}: no such directory")
    config = config_lib.load_config(path)
    reader = hf.CheckpointReader(path)
    return config, reader, hf.check_tensors(config, reader, path)


def diff(base_dir: str, tuned_dir: str, out_dir: str, *, linear_only: bool = False, overwrite: bool = False,
         max_shard_size="5GB") -> str:
    """Write tuned - base (float32) for every tensor, with the Hugging Face names, as an RE-Adapter directory."""
    if os.path.exists(out_dir) and not overwrite:
        raise FaJaxError(f"{out_dir}: output directory already exists (pass --overwrite)")
    bcfg, breader, bnames = open_model(base_dir, "base")
    tcfg, treader, tnames = open_model(tuned_dir, "tuned")
    if bcfg != tcfg:
        fields = [f for f in bcfg.__dataclass_fields__ if getattr(bcfg, f) != getattr(tcfg, f) and f != "hf_config"]
        raise FaJaxError(f"diff: base {base_dir} and tuned {tuned_dir} have different architectures "
                         f"({', '.join(f'{f}: {getattr(bcfg, f)} vs {getattr(tcfg, f)}' for f in fields[:3])})")
    entries = []
    for path, name in bnames.items():
        if linear_only and not (path.endswith(".kernel") and path != "lm_head.kernel"):
            continue
        shape = breader.shape(name)

        def blocks(n=name, shape=shape):
            for i, j in _row_blocks(shape):
                yield treader.get_rows(n, i, j).astype(np.float32) - breader.get_rows(n, i, j).astype(np.float32)

        entries.append((name, shape, np.float32, blocks))
    meta = {"kind": "re-adapter", "base": os.path.abspath(base_dir), "tuned": os.path.abspath(tuned_dir),
            "linear_only": linear_only}
    return hf.write_dir(out_dir, entries, bcfg.to_hf_dict(), {DELTA_META: meta}, max_shard_size, overwrite,
                         desc="diff")


def _is_peft(path: str) -> bool:
    return os.path.exists(os.path.join(path, peft.CONFIG))


def _is_delta(path: str) -> bool:
    return os.path.exists(os.path.join(path, DELTA_META))


def truncate(delta_dir: str, out_dir: str, *, tau: float | None = None, rank: int | None = None,
             overwrite: bool = False, plots: bool = True, base_config: str | None = None):
    """LoRE-Adapter: each linear matrix of an RE-Adapter (or PEFT LoRA) directory truncated by SVD, written as a
    PEFT LoRA directory (per-matrix ranks in rank_pattern), with every other non-zero delta kept whole: those of
    the embeddings, LM head and norms as PEFT modules_to_save (their tuned weights, base + delta, from the base
    named in the delta's readapt.json), the rest (biases of adapted layers; everything when that base is not
    there) as float32 deltas in `peft.EXTRA`. A PEFT input's modules_to_save and side file are carried over.

    Returns the report of `treemath.truncate`, its shares counted on this model (`treemath.param_shares`), and
    "non_matrix": {"modules_to_save": [HF names], "side_file": [HF names], "note": why the base was not used}."""
    treemath.check_tau_rank(tau, rank, "--tau ", "--rank ")  # a number in (0, 1]; an integer >= 1
    if (tau is None) == (rank is None):
        raise FaJaxError("truncate: give exactly one of --tau or --rank")
    if os.path.exists(out_dir) and not overwrite:
        raise FaJaxError(f"{out_dir}: output directory already exists (pass --overwrite)")
    if not os.path.isdir(delta_dir):
        raise FaJaxError(f"delta {delta_dir}: no such directory")
    if not _is_peft(delta_dir) and not _is_delta(delta_dir):
        if os.path.exists(os.path.join(delta_dir, "config.json")):  # a whole model: its SVDs would be the weights'
            raise FaJaxError(f"--delta {delta_dir} is a model, not a delta (no {DELTA_META} from fa-jax diff, no "
                             f"{peft.CONFIG}): run fa-jax diff --base BASE --tuned {delta_dir} --out DELTA first")
        raise FaJaxError(f"--delta {delta_dir}: neither an RE-Adapter (fa-jax diff, {DELTA_META}) nor a PEFT LoRA "
                         f"directory ({peft.CONFIG})")
    if _is_peft(delta_dir):
        if base_config is None:
            raise FaJaxError(f"{delta_dir} is a PEFT adapter: pass --base-config DIR (the base model's config)")
        config = config_lib.load_config(base_config)
        peft.check_made_for(delta_dir, config, base_config, "--delta")
        adapter = peft.load_peft(config, delta_dir, warn_non_matrix=False)  # carried over below
        if any(lora_lib.is_dora(ad) for _, ad in lora_lib.iter_modules(adapter)):
            raise FaJaxError(f"{delta_dir} is a DoRA adapter, whose delta depends on the base weights: merge it first "
                             f"(fa-jax merge --base BASE --adapter {delta_dir} --out MERGED), then truncate "
                             f"fa-jax diff --base BASE --tuned MERGED")
        if rank is not None:
            _check_rank_fits(rank, [(p, (ad["lora_A"].shape[0], ad["lora_B"].shape[1]))
                                    for p, ad in lora_lib.iter_modules(adapter)])
        lore, report = treemath.truncate(adapter, tau=tau, rank=rank, keep_non_matrix=False)
        saved, extra, note = [], [], None
        for n, (kind, st, key) in peft.non_matrix_tensors(delta_dir).items():
            (saved if kind == "full" else extra).append((n, st.shape(key), lambda st=st, key=key: st.get(key)))
    else:
        config = config_lib.load_config(delta_dir)
        reader = hf.CheckpointReader(delta_dir)
        saved, extra, note = _non_matrix(config, reader, delta_dir)  # first: a wrong base fails before the SVDs
        lore_flat, modules = {}, {}
        names = [(p, hf.hf_name(p)) for p, (shape, _) in _linear_specs(config) if hf.hf_name(p) in reader]
        if not names:
            raise FaJaxError(f"{delta_dir}: holds no linear-layer matrices to truncate")
        if rank is not None:  # before any SVD; HF layout [out, in]
            _check_rank_fits(rank, [(p[: -len(".kernel")], tuple(reader.shape(n))[::-1]) for p, n in names])
        for path, name in tqdm(names, desc="truncate", unit="matrix", disable=None, leave=False):
            w = jnp.asarray(reader.get(name).astype(np.float32).T)  # [in, out]
            part, rep = treemath.truncate({"m": {"kernel": w}}, tau=tau, rank=rank, keep_non_matrix=False)
            module = path[: -len(".kernel")]
            modules[module] = rep["modules"]["m"]
            if "m" in part:
                for k, v in part["m"].items():
                    lore_flat[f"{module}.{k}"] = np.asarray(v)
        report = {"modules": modules, "params": sum(m["params"] for m in modules.values()),
                  "dense_params": sum(m["dense_params"] for m in modules.values())}
        lore = unflatten(lore_flat)
    if not list(lora_lib.iter_modules(lore)):
        raise FaJaxError(f"truncate: every matrix of {delta_dir} truncated to rank 0 (an all-zero delta?)")
    tied_head = peft.HEAD if config.tie_word_embeddings else None  # PEFT saves a tied head twice: count it once
    kept = sum(int(np.prod(shape)) for n, shape, _ in saved + extra if n != tied_head)
    report.update(treemath.param_shares(report["params"], report["dense_params"], kept, count_params(config)))
    report["non_matrix"] = {"modules_to_save": [n for n, _, _ in saved], "side_file": [n for n, _, _ in extra],
                            "note": note}
    with atomic_dir(out_dir, overwrite) as tmp:
        peft.write_peft(config, lore, tmp, base_model_name_or_path=_base_of(delta_dir), modules_to_save=saved,
                        extra=extra)
        if plots:
            report["plots"] = [os.path.join(out_dir, os.path.basename(p)) for p in _plots(report, tmp)]
        with open(os.path.join(tmp, "lore_report.json"), "w") as f:
            json.dump(_jsonable(report), f, indent=2)
    return report


def _check_rank_fits(rank, modules) -> None:
    """--rank must not exceed what each matrix allows, min(in, out) (modules: [(path, (in, out))]): never
    silently clamped."""
    for path, (d_in, d_out) in modules:
        if int(rank) > min(d_in, d_out):
            raise FaJaxError(f"truncate: --rank {rank} is more than {path} allows: its matrix is {d_in}x{d_out}, so "
                             f"its largest possible rank is {min(d_in, d_out)}")


def _non_matrix(config, reader, delta_dir: str):
    """(modules_to_save, side file, note) entries for `peft.write_peft` from an RE-Adapter directory's tensors other
    than the linear matrices; all-zero deltas are left out. A non-linear module's tensor (embeddings, LM head,
    norms) goes to modules_to_save as base + delta, read from the base named in readapt.json; a bias of an adapted
    linear layer (PEFT has no place for it), or any tensor when that base is not there, to the side file."""
    linear = {p[: -len(".kernel")] for p, _ in _linear_specs(config)}
    matrices = {hf.hf_name(p) for p, _ in _linear_specs(config)}
    names = [n for n in reader.names() if n not in matrices
             and any(b.any() for b in (reader.get_rows(n, i, j) for i, j in _row_blocks(reader.shape(n))))]
    base, note = None, None
    if any(n.rsplit(".", 1)[0] not in linear for n in names):
        base, note = _base_reader(config, delta_dir)
    saved, extra = [], []
    for n in names:
        shape = tuple(reader.shape(n))
        if base is not None and n.rsplit(".", 1)[0] not in linear:
            saved.append((n, shape, lambda n=n, shape=shape: (
                base.get_rows(n, i, j).astype(np.float32) + reader.get_rows(n, i, j).astype(np.float32)
                for i, j in _row_blocks(shape))))
        else:
            extra.append((n, shape, lambda n=n, shape=shape: (
                reader.get_rows(n, i, j).astype(np.float32) for i, j in _row_blocks(shape))))
    return saved, extra, note


def _base_reader(config, delta_dir: str):
    """(reader of the base model named in the delta's readapt.json, None), or (None, a note why there is none)."""
    base = _base_of(delta_dir)
    if base is None or not os.path.isdir(base):
        where = f"its base {base} is not there" if base else f"{delta_dir} names no base ({DELTA_META})"
        return None, (f"{where}: the embedding, LM head and norm deltas went to {peft.EXTRA} instead of PEFT "
                      f"modules_to_save (fa-jax merge applies them; PEFT does not load that file)")
    bcfg, reader, _ = open_model(base, "base")
    if bcfg != config:
        raise FaJaxError(f"truncate: the base {base} named in {os.path.join(delta_dir, DELTA_META)} has a different "
                         f"architecture than the delta")
    return reader, None


def _linear_specs(config):
    return [(p, s) for p, s in param_specs(config).items() if p.endswith(".kernel") and p != "lm_head.kernel"]


def _base_of(delta_dir: str):
    meta = os.path.join(delta_dir, DELTA_META)
    if os.path.exists(meta):
        with open(meta) as f:
            return json.load(f).get("base")
    return None


def _jsonable(report):
    out = dict(report)
    out["modules"] = {k: {kk: vv for kk, vv in v.items() if kk != "spectrum"} for k, v in report["modules"].items()}
    return out


def _plots(report, out_dir: str) -> list[str]:
    """Explained variance against rank for a few matrices (RE-Adapt Fig. 2) and parameter share against tau
    (Fig. 3), next to the adapter."""
    import matplotlib  # lazy: about a second to import, needed for the plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p1 = treemath.plot_explained_variance(report, os.path.join(out_dir, "explained_variance.png"))
    spectra = {k: (np.asarray(v["spectrum"]), tuple(v["shape"])) for k, v in report["modules"].items()}
    taus = np.linspace(0.05, 1.0, 20)
    share = treemath.param_share_curve(spectra, taus, report["non_matrix_params"], report["model_params"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(taus, np.asarray(share) * 100, marker=".")
    ax.set_xlabel("tau (explained variance kept)")
    ax.set_ylabel(f"LoRE-Adapter parameters, % of the model's {report['model_params']:,}")
    ax.set_title("share of the whole model's parameters (RE-Adapt Fig. 3)", fontsize=10)
    ax.set_ylim(0, max(100.0, 105 * max(share)))  # above 100% where full-rank factors outgrow the matrices
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p2 = os.path.join(out_dir, "param_share_vs_tau.png")
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def rank_table(report, limit: int = 12) -> str:
    """A text table of ranks per matrix (the first `limit` rows) and the totals."""
    rows = [f"{'matrix':<48} {'shape':>13} {'rank':>6} {'explained':>9}"]
    mods = report["modules"]
    for name in list(mods)[:limit]:
        m = mods[name]
        rows.append(f"{name:<48} {m['shape'][0]:>6}x{m['shape'][1]:<6} {m['rank']:>6} {m['explained']:>9.3f}")
    if len(mods) > limit:
        rows.append(f"... {len(mods) - limit} more (lore_report.json has all)")
    kept = report["non_matrix_params"]
    rows.append(f"LoRE parameters: {report['params'] + kept:,} = {100 * report['share_of_model']:.2f}% of the model's "
                f"{report['model_params']:,} (share_of_model; {kept:,} of them kept non-matrix deltas)")
    rows.append(f"linear layers: {report['params']:,} = {100 * report['share_of_linear']:.2f}% of their "
                f"{report['dense_params']:,} dense matrix parameters (share_of_linear)")
    return "\n".join(rows)


def load_adapter(path: str, config, base_dir: str = "the base"):
    """An adapter for `merge`: a dense RE-Adapter directory (returned as a lazy reader), a PEFT LoRA / DoRA / LoRE
    directory, or a fa_jax pretrain run / checkpoint directory (its exported PEFT adapter). An adapter made for
    another model than `config` (the model in `base_dir`) is refused, even where the shapes would fit: a PEFT
    adapter's record of its model (`peft.made_for`), an RE-Adapter's own config.json."""
    if not os.path.exists(path):
        raise FaJaxError(f"adapter {path}: no such directory")
    if _is_peft(path):
        peft.check_made_for(path, config, base_dir)
        return "lora", peft.load_peft(config, path, warn_non_matrix=False)  # merge applies the rest itself
    exported = os.path.join(path, runs.EXPORT)
    if _is_peft(exported):  # a fa_jax pretrain run directory, its adapter exported
        keep = runs.keep_layers_of(path)
        if keep is not None:
            raise FaJaxError(f"adapter {path}: trained on a student with keep_layers={keep}; its layer numbers are "
                             "the student's, so it merges only into that student, not into this base")
        peft.check_made_for(exported, config, base_dir)
        return "lora", peft.load_peft(config, exported)
    if os.path.isdir(os.path.join(path, runs.CHECKPOINTS)) and runs.is_run(path):  # a run not exported (yet)
        return "lora", runs.run_adapters(path, config)
    if _is_delta(path) or os.path.exists(os.path.join(path, "config.json")):
        dcfg = config_lib.load_config(path)
        if dcfg != config:
            fields = [f for f, spec in dcfg.__dataclass_fields__.items()
                      if spec.compare and getattr(dcfg, f) != getattr(config, f)]
            what = (f"a {dcfg.model_type} model" if dcfg.model_type != config.model_type else
                    f"a {dcfg.model_type} model with " + ", ".join(f"{f}={getattr(dcfg, f)}" for f in fields[:3]))
            have = (f"is a {config.model_type}" if dcfg.model_type != config.model_type else
                    "has " + ", ".join(f"{f}={getattr(config, f)}" for f in fields[:3]))
            raise FaJaxError(f"--adapter {path}: made for {what} (its config.json); the base {base_dir} {have} (a "
                             f"different architecture)")
        return "dense", hf.CheckpointReader(path)
    raise FaJaxError(f"adapter {path}: not a PEFT adapter, an RE-Adapter (fa-jax diff) or a fa_jax run directory")


def _non_matrix_of(path: str, config, base_names, reader) -> dict:
    """A PEFT adapter directory's modules_to_save weights and side-file deltas (`peft.non_matrix_tensors`), checked
    against the base's tensors; {} for other adapters."""
    if not _is_peft(path):
        return {}
    out = peft.non_matrix_tensors(path)
    if config.tie_word_embeddings and peft.EMBED in out:
        out.pop(peft.HEAD, None)  # PEFT's second copy of the tied embedding
    for n, (kind, st, key) in out.items():
        where = f"{path}: {'modules_to_save' if kind == 'full' else peft.EXTRA} tensor {n}"
        if n not in base_names:
            raise FaJaxError(f"adapter {where} is not a tensor of the base model")
        if tuple(st.shape(key)) != tuple(reader.shape(n)):
            raise FaJaxError(f"adapter {where} has shape {list(st.shape(key))}, the base's is {list(reader.shape(n))}")
    return out


def adapter_tree(path: str, config, base_dir: str, reader, names):
    """One adapter for `merge` as an in-memory tree at the base's parameter paths (what `treemath.merge` takes):
    a PEFT directory's LoRA / DoRA modules plus its non-matrix tensors as dense deltas (modules_to_save: saved -
    base; a LoRE's side file as it is), a fa_jax run's adapter, or a dense RE-Adapter's tensors. reader and
    names: `open_model(base_dir)`'s. A dense RE-Adapter is read whole (model-sized)."""
    kind, a = load_adapter(path, config, base_dir)
    by_name = {n: p for p, n in names.items()}
    flat = {}
    if kind == "dense":
        for p, n in names.items():
            if n in a:
                x = a.get(n).astype(np.float32)
                flat[p] = jnp.asarray(x.T if hf.is_transposed(p) else x)
        return unflatten(flat)
    flat = dict(flatten(a))
    for n, (what, st, key) in _non_matrix_of(path, config, set(names.values()), reader).items():
        p = by_name[n]
        x = st.get(key).astype(np.float32)
        x = x - reader.get(n).astype(np.float32) if what == "full" else x
        x = jnp.asarray(x.T if hf.is_transposed(p) else x)
        flat[p] = flat[p] + x if p in flat else x
    return unflatten(flat)


def merge(base_dir: str, adapters, out_dir: str, *, overwrite: bool = False, dtype=None, max_shard_size="5GB",
          tokenizer: bool = True, tokenizer_dir: str | None = None) -> str:
    """W = base + sum(scale_i * delta_i), tensor by tensor, as an HF directory transformers loads.

    adapters: [(path, scale), ...]; each a dense RE-Adapter, a PEFT LoRA/DoRA/LoRE directory or a fa_jax run; a
    scale is a number or one per layer ({"layers": [...], "other": s}, `treemath.check_scale`; what
    `fa-jax tune-merge` learns).
    Every delta is taken from the base (a DoRA module's, m * V / ||V|| - W, depends on it), as `treemath.merge`.
    tokenizer: copy the tokenizer files (`TOKENIZER_FILES`) into out_dir, from `tokenizer_dir` when given (the
    instruct model's directory: its chat template and end-of-turn token), else from the base.
    """
    if os.path.exists(out_dir) and not overwrite:
        raise FaJaxError(f"{out_dir}: output directory already exists (pass --overwrite)")
    if tokenizer and tokenizer_dir is not None:
        check_tokenizer_dir(tokenizer_dir)
    config, reader, names = open_model(base_dir, "base")
    scales = [treemath.check_scale(s, f"--adapter {p}") for p, s in adapters]
    loaded = [(load_adapter(p, config, base_dir), s) for (p, _), s in zip(adapters, scales)]
    lora_flat = [(flatten(a) if kind == "lora" else None, kind, a, s) for (kind, a), s in loaded]
    extras = [(_non_matrix_of(p, config, set(names.values()), reader), s) for (p, _), s in zip(adapters, scales)]
    out_dt = None if dtype is None else np.dtype(jnp.dtype(dtype))

    def fetch(path, name, dt):
        """Row blocks of base + sum(scale * delta); HF layout [out, in], so rows are output features."""
        m = path[: -len(".kernel")] if path.endswith(".kernel") else None
        for i, j in _row_blocks(reader.shape(name)):
            w0 = reader.get_rows(name, i, j).astype(np.float32)
            w = w0
            for flat, kind, a, scale in lora_flat:
                s = treemath.scale_at(scale, path)
                if kind == "dense":
                    if name in a:
                        w = w + s * a.get_rows(name, i, j).astype(np.float32)
                elif m is not None and f"{m}.lora_A" in flat:
                    A = np.asarray(flat[f"{m}.lora_A"], np.float32)
                    B = np.asarray(flat[f"{m}.lora_B"], np.float32)[:, i:j]
                    if f"{m}.magnitude" in flat:  # DoRA; a block holds whole rows, so each row's norm is exact
                        v = w0 + float(flat[f"{m}.scale"]) * (A @ B).T
                        mag = np.asarray(flat[f"{m}.magnitude"], np.float32)[i:j]
                        w = w + s * (v * (mag / np.linalg.norm(v, axis=1))[:, None] - w0)
                    else:
                        w = w + (s * float(flat[f"{m}.scale"])) * (A @ B).T
            for extra, scale in extras:  # a LoRE's kept non-matrix tensors: delta = saved - base, or the side file's
                if name in extra:
                    s = treemath.scale_at(scale, path)
                    kind, st, key = extra[name]
                    t = st.get_rows(key, i, j).astype(np.float32)
                    w = w + s * (t - w0 if kind == "full" else t)
            yield w.astype(dt)

    entries = []
    for path, name in names.items():
        dt = out_dt or reader.dtype(name)
        entries.append((name, reader.shape(name), dt, lambda p=path, n=name, dt=dt: fetch(p, n, dt)))
    cfg = config.to_hf_dict()
    cfg["dtype"] = str(np.dtype(entries[0][2]).name)
    src = base_dir if tokenizer_dir is None else tokenizer_dir
    hf.write_dir(out_dir, entries, cfg, None, max_shard_size, overwrite, desc="merge",
                 fill=(lambda tmp: _copy_tokenizer(src, tmp)) if tokenizer else None)  # inside the atomic directory
    return out_dir


# what `merge` copies: the tokenizer (a vocabulary file among the first three), its settings and chat template, and
# generation_config.json (an instruct model's lists its end-of-turn token among the EOS ids)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def merge_as_lora(base_dir: str, adapters, out_dir: str, *, tau: float | None = None, rank: int | None = None,
                  budget=None, overwrite: bool = False) -> dict:
    """sum(scale_i * delta_i) of several LoRA adapters as one PEFT LoRA directory (`treemath.combine`: from the
    factors, truncated by `tau`, `rank` or one parameter `budget`; per-module ranks go to rank_pattern). adapters:
    [(path, scale), ...], PEFT LoRA / DoRA / LoRE directories or fa_jax runs (`load_adapter`); a dense RE-Adapter
    is refused (truncate it to a LoRE first: `fa-jax truncate`). Returns combine's report; lore_report.json in
    out_dir holds the ranks."""
    config = config_lib.load_config(base_dir)
    trees = []
    for path, scale in adapters:
        kind, tree = load_adapter(path, config, base_dir)
        if kind != "lora":
            raise FaJaxError(f"--adapter {path}: a dense RE-Adapter; --as-lora combines low-rank adapters (make it a "
                             "LoRE first: fa-jax truncate --delta DIR --tau 0.5 --out LORE)")
        trees.append((tree, treemath.check_scale(scale, f"--adapter {path}")))
    base = None
    if any(lora_lib.is_dora(ad) for tree, _ in trees for _, ad in lora_lib.iter_modules(tree)):
        base = hf.load_hf(base_dir)[1]  # DoRA deltas depend on the base kernels
    lora, report = treemath.combine(trees, tau=tau, rank=rank, budget=budget, base=base)
    if not lora:
        raise FaJaxError("--as-lora: every combined matrix got rank 0 (raise --budget, --tau or --rank)")
    with atomic_dir(out_dir, overwrite) as tmp:
        peft.write_peft(config, lora, tmp, base_model_name_or_path=os.path.abspath(base_dir))
        write_text(os.path.join(tmp, "lore_report.json"), json.dumps(
            {"adapters": [[p, s] for (p, _), (_, s) in zip(adapters, trees)], "tau": tau, "rank": rank,
             "budget": report.get("budget"),
             "params": report["params"], "dense_params": report["dense_params"],
             "rank_pattern": report["rank_pattern"]}, indent=2) + "\n")
    return report


def check_tokenizer_dir(path: str) -> None:
    """A FaJaxError unless `path` is a directory holding a tokenizer's vocabulary (tokenizer.json, tokenizer.model
    or vocab.json)."""
    if not os.path.isdir(path):
        raise FaJaxError(f"--tokenizer {path}: no such directory")
    if not any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES[:3]):
        raise FaJaxError(f"--tokenizer {path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); "
                         "give the instruct model's Hugging Face directory")


def has_chat_template(path: str) -> bool:
    """Whether the tokenizer files in `path` carry a chat template (chat_template.jinja / .json, or a
    "chat_template" in tokenizer_config.json)."""
    if any(os.path.isfile(os.path.join(path, n)) for n in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def tuned_of(adapters) -> str | None:
    """The instruct model an RE-Adapter among `adapters` ([(path, scale), ...]) was taken from (its readapt.json)."""
    for path, _ in adapters:
        try:
            with open(os.path.join(path, DELTA_META)) as f:
                tuned = json.load(f).get("tuned")
        except (OSError, ValueError, AttributeError):
            continue
        if tuned:
            return tuned
    return None


def _copy_tokenizer(src: str, dst: str) -> None:
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))  # the umask's mode, not the source's
