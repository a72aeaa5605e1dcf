"""Partial-adaptation scales learned from data (`fa-jax tune-merge`): one scale per adapter per decoder layer.

RE-Adapt merges W = W_base + a * knowledge + b * delta with a and b set by hand (0.5 / 0.5) for every layer. Here the
scales are parameters: s[i, l] multiplies adapter i's update in decoder layer l, and a few hundred of them are fitted
by gradient descent through the model's forward pass, the adapters and the base frozen:

    L(s) = kl_weight * KL(target || merged(s)) on the probe text + lm_weight * CE(merged(s)) on the domain text

    fa-jax tune-merge --base BASE --adapter KD_RUN --adapter INSTRUCT_LORE --probe probe.txt --target INSTRUCT \\
        --domain domain.txt --out tuned            # tuned/scales.json, tuned/merged (an HF directory), the plots

    tuner = ScaleTuner(config, base, [lora_a, lora_b], probe_batches, target=(tcfg, tparams))   # in memory
    fit = tuner.fit(steps=100, lr=0.02)          # {"scales": [A, L], "history": [...]}
    params = treemath.merge(base, list(zip([lora_a, lora_b], tuner.scale_dicts(fit["scales"]))))

How the merged model is formed at each step: LoRA modules are never made dense. The adapters' factors of one module
are stacked into one LoRA, A = [s[1,l] c_1 A_1, s[2,l] c_2 A_2, ...], B = [B_1; B_2; ...] (c_i the module's own
scale), so the forward costs the sum of the ranks. Dense terms (an RE-Adapter, a DoRA module's base-dependent delta
m * V / ||V||_c - W, a LoRE's kept non-matrix deltas, modules_to_save) are added to the base weights inside the step,
W + sum_i s[i, l] D_i: they cost one dense copy of each such tensor per adapter.

Tensors outside the decoder layers (embedding, final norm, LM head) keep the initial scale of their adapter: the loss
is computed chunk by chunk through the LM head (`losses.chunked_distill_loss`, never [B, T, V] logits), which treats
the head as a constant. The target model needs the base's vocabulary (any architecture: the pruned student's own
teacher is a fine target); its final hidden states over the probe rows are computed once and kept (D floats per
token), its weights other than the LM head are not used again.

Adam on the scales with a cosine schedule; each step takes the next `batch_size` probe rows (and domain rows),
cycling. `loss(scales)` is the objective over every row, reported before and after.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from fa_jax import evaluate, losses, readapt, treemath
from fa_jax import lora as lora_lib
from fa_jax.errors import FaJaxError
from fa_jax.io import hf
from fa_jax.io.atomic import atomic_dir, write_text
from fa_jax.io.load import load_model, load_tokenizer
from fa_jax.models import transformer
from fa_jax.tree import flatten, get_path, set_path, unflatten

SCALES_FILE = "scales.json"
BATCH_KEYS = ("tokens", "labels", "mask", "segment_ids", "positions")


def _split_terms(config, base, tree, where: str):
    """(factors {module path: (A scaled by the module's scale [I, R], B [R, O])}, dense {param path: delta}) of one
    adapter tree: plain LoRA modules stay factors; DoRA modules and dense leaves become dense deltas (`to_dense`)."""
    modules = dict(lora_lib.iter_modules(tree))
    factors, rest = {}, dict(flatten(tree))
    for path, ad in modules.items():
        if lora_lib.is_dora(ad):
            continue
        treemath.check_factors(path, ad, where)
        try:
            kernel = get_path(base, f"{path}.kernel")
        except KeyError:
            raise FaJaxError(f"{where}: adapter module {path} is not a linear layer of the base model") from None
        lora_lib.check_module(path, ad, *kernel.shape, where=where)
        factors[path] = (jnp.asarray(ad["lora_A"], jnp.float32) * jnp.asarray(ad["scale"], jnp.float32),
                         jnp.asarray(ad["lora_B"], jnp.float32))
        for k in ad:
            rest.pop(f"{path}.{k}")
    dense = {}
    if rest:
        base_flat = flatten(base)
        for p, d in flatten(treemath.to_dense(unflatten(rest), base)).items():
            if p not in base_flat:
                raise FaJaxError(f"{where}: adapter tensor {p} is not a tensor of the base model")
            if tuple(d.shape) != tuple(base_flat[p].shape):
                raise FaJaxError(f"{where}: adapter tensor {p} has shape {list(d.shape)}, the base's is "
                                 f"{list(base_flat[p].shape)}")
            dense[p] = jnp.asarray(d, jnp.float32)
    return factors, dense


class ScaleTuner:
    """Learns s [A, L] (adapter, decoder layer) for W = W_base + sum_i s[i, l] * delta_i (module docstring).

    config, base: the base model. adapters: adapter trees (LoRA / DoRA modules and dense deltas at the base's
    parameter paths, as `treemath.merge` takes them). probe_batches / domain_batches: lists of packed batches
    ({"tokens", "labels", "mask", "segment_ids", "positions"} [B, T], `evaluate.document_batches` or `_rows`), all of
    one shape. target: (config, params) of the model to match on the probe rows (None: no KL term). kl_weight /
    lm_weight: the two terms' weights (lm_weight None: 1 when there are domain rows or no target, else 0); the LM term
    reads the domain rows, or the probe rows when none are given. init: each adapter's starting scale (default 0.5),
    also its fixed scale outside the decoder layers. dtype: compute dtype of the forward (None: the params').
    """

    def __init__(self, config, base, adapters, probe_batches, *, target=None, domain_batches=None,
                 kl_weight: float = 1.0, lm_weight: float | None = None, init=None, temperature: float = 1.0,
                 chunk_size: int = 128, dtype=None, remat=False):
        if len(adapters) < 1:
            raise FaJaxError("tune-merge: no adapters given")
        if not probe_batches:
            raise FaJaxError("tune-merge: the probe text gave no rows")
        init = [0.5] * len(adapters) if init is None else [float(v) for v in init]
        if len(init) != len(adapters):
            raise FaJaxError(f"tune-merge: {len(init)} initial scales for {len(adapters)} adapters")
        if lm_weight is None:
            lm_weight = 1.0 if (domain_batches or target is None) else 0.0
        for name, w in (("kl_weight", kl_weight), ("lm_weight", lm_weight)):
            if not (isinstance(w, (int, float)) and not isinstance(w, bool) and np.isfinite(w) and w >= 0):
                raise FaJaxError(f"tune-merge: {name}={w!r}; expected a number >= 0")
        if target is None and kl_weight and lm_weight == 0:
            raise FaJaxError("tune-merge: no target model for the KL term and lm_weight 0: nothing to minimize")
        kl_weight = float(kl_weight) if target is not None else 0.0
        if kl_weight == 0 and lm_weight == 0:
            raise FaJaxError("tune-merge: kl_weight and lm_weight are both 0: nothing to minimize")
        self.config, self.base, self.dtype, self.remat = config, base, dtype, remat
        self.kl_weight, self.lm_weight = kl_weight, float(lm_weight)
        self.temperature, self.chunk_size = float(temperature), int(chunk_size)
        self.layers = config.num_hidden_layers
        self.init = np.asarray(init, np.float32)
        self.n = len(adapters)
        factors, dense = {}, {}
        for i, tree in enumerate(adapters):
            f, d = _split_terms(config, base, tree, f"tune-merge: adapter {i}")
            for p, ab in f.items():
                factors.setdefault(p, []).append((i, ab))
            for p, x in d.items():
                dense.setdefault(p, []).append((i, x))
        if not factors and not dense:
            raise FaJaxError("tune-merge: the adapters hold no updates")
        # static structure (which adapter and group each term has) and the arrays, passed to jit as arguments
        self._factor_owner = {p: tuple((i, self._group(p)) for i, _ in v) for p, v in factors.items()}
        self._dense_owner = {p: tuple((i, self._group(p)) for i, _ in v) for p, v in dense.items()}
        self._arrays = ({p: [ab for _, ab in v] for p, v in factors.items()},
                        {p: [x for _, x in v] for p, v in dense.items()})
        self.used = np.zeros((self.n, self.layers), bool)  # which (adapter, layer) scales touch anything
        for owners in (*self._factor_owner.values(), *self._dense_owner.values()):
            for i, g in owners:
                if g < self.layers:
                    self.used[i, g] = True
        if not self.used.any():
            raise FaJaxError("tune-merge: the adapters change nothing inside the decoder layers; there is no "
                             "per-layer scale to learn")
        self.probe = [self._device(b, "probe") for b in probe_batches]
        self.domain = [self._device(b, "domain") for b in domain_batches] if domain_batches else None
        self.target_cfg, self.target_head, self.target_head_vd = None, None, False
        if self.kl_weight:
            tcfg, tparams = target
            if tcfg.vocab_size != config.vocab_size:
                raise FaJaxError(f"tune-merge: the target has {tcfg.vocab_size} tokens, the base {config.vocab_size}; "
                                 "the KL term needs one vocabulary")
            hidden = jax.jit(lambda p, b: transformer.hidden_states(
                tcfg, p, b["tokens"], segment_ids=b["segment_ids"], positions=b["positions"], dtype=dtype))
            self.target_hidden = [hidden(tparams, b) for b in self.probe]
            self.target_head, self.target_head_vd = transformer.lm_head(tcfg, tparams)
            self.target_cfg = tcfg
        self._value = jax.jit(self._objective)
        self._grad = jax.jit(jax.value_and_grad(self._objective, has_aux=True))

    def _group(self, path: str) -> int:
        i = treemath.layer_of(path)
        return self.layers if i is None else i

    def _device(self, batch, what):
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise FaJaxError(f"tune-merge: a {what} batch lacks {missing}")
        return {k: jnp.asarray(batch[k]) for k in BATCH_KEYS}

    # -------------------------------------------------------------------------------------------- the objective

    def _merged(self, scales, arrays, base):
        """(params, adapters) of `base` merged at scales [A, L + 1] (the last column: outside the layers)."""
        factors, dense = arrays
        adapters = {}
        for p, items in factors.items():
            owners = self._factor_owner[p]
            a = jnp.concatenate([scales[i, g] * A for (i, g), (A, _) in zip(owners, items)], axis=1)
            b = jnp.concatenate([B for _, B in items], axis=0)
            adapters = set_path(adapters, p, {"lora_A": a, "lora_B": b, "scale": jnp.ones((), jnp.float32)})
        params = base
        for p, items in dense.items():
            w = get_path(base, p)
            d = sum(scales[i, g] * x for (i, g), x in zip(self._dense_owner[p], items))
            params = set_path(params, p, (w.astype(jnp.float32) + d).astype(w.dtype))
        return params, adapters

    def _hidden(self, params, adapters, b):
        return transformer.hidden_states(self.config, params, b["tokens"], adapters, segment_ids=b["segment_ids"],
                                         positions=b["positions"], dtype=self.dtype, remat=self.remat)

    def _objective(self, layer_scales, arrays, base, target_head, probe, target_hidden, domain):
        """(weighted loss, {"kl", "lm"}) of one probe batch (and domain batch). Every array is an argument: a
        model closed over would be folded into the program as constants."""
        scales = jnp.concatenate([layer_scales, jnp.asarray(self.init)[:, None]], axis=1)
        params, adapters = self._merged(scales, arrays, base)
        head, vd = transformer.lm_head(self.config, params)
        kw = dict(temperature=self.temperature, chunk_size=self.chunk_size, student_head_vd=vd)
        total, kl, lm = 0.0, jnp.float32(0.0), jnp.float32(0.0)
        if self.kl_weight:
            t_head, t_vd = target_head, self.target_head_vd
            both = self.lm_weight and domain is None  # one forward serves both terms
            w = self.kl_weight + (self.lm_weight if both else 0.0)
            loss, m = losses.chunked_distill_loss(
                self._hidden(params, adapters, probe), head, target_hidden, t_head, probe["labels"], probe["mask"],
                alpha=self.kl_weight / w, teacher_head_vd=t_vd, **kw)
            total, kl = total + w * loss, m["kd"]
            lm = m["lm"] if both else lm
        if self.lm_weight and (domain is not None or not self.kl_weight):
            rows = probe if domain is None else domain
            loss, m = losses.chunked_distill_loss(self._hidden(params, adapters, rows), head, None, None,
                                                  rows["labels"], rows["mask"], alpha=0.0, **kw)
            total, lm = total + self.lm_weight * loss, m["lm"]
        return total, {"kl": kl, "lm": lm}

    def _inputs(self, i):
        """The arguments of `_objective` after the scales for step (or batch) i."""
        th = self.target_hidden[i % len(self.probe)] if self.kl_weight else None
        dom = self.domain[i % len(self.domain)] if self.domain else None
        return self._arrays, self.base, self.target_head, self.probe[i % len(self.probe)], th, dom

    def loss(self, layer_scales) -> dict:
        """The objective over every probe (and domain) row at `layer_scales` [A, L]: {"loss", "kl", "lm"}, each
        batch weighted by its tokens."""
        s = jnp.asarray(self._check_scales(layer_scales))
        n = max(len(self.probe), len(self.domain or ()))
        acc, weight = np.zeros(3), 0.0
        for i in range(n):
            args = self._inputs(i)
            loss, m = self._value(s, *args)
            w = float(jnp.sum(args[3]["mask"]))
            acc += w * np.array([float(loss), float(m["kl"]), float(m["lm"])])
            weight += w
        loss, kl, lm = acc / max(weight, 1.0)
        return {"loss": loss, "kl": kl if self.kl_weight else None, "lm": lm if self.lm_weight else None}

    def _check_scales(self, layer_scales):
        s = np.asarray(layer_scales, np.float32)
        if s.shape != (self.n, self.layers):
            raise FaJaxError(f"tune-merge: scales of shape {list(s.shape)}; expected [{self.n}, {self.layers}] "
                             "(adapters, layers)")
        return s

    def initial(self) -> np.ndarray:
        return np.repeat(self.init[:, None], self.layers, axis=1)

    def fit(self, steps: int = 100, lr: float = 0.02, progress: bool = True, start=None) -> dict:
        """Adam on the layer scales from `start` (default: each adapter's init), `steps` steps with a cosine schedule
        down to lr / 10. Returns {"scales" [A, L], "history": [{"step", "loss", "kl", "lm"}] (per step, its own
        batch), "seconds"}."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise FaJaxError(f"tune-merge: steps={steps!r}; expected an integer >= 1")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise FaJaxError(f"tune-merge: lr={lr!r}; expected a number > 0")
        opt = optax.adam(optax.cosine_decay_schedule(float(lr), steps, alpha=0.1))
        s = jnp.asarray(self.initial() if start is None else self._check_scales(start))
        used = jnp.asarray(self.used)
        state = opt.init(s)

        @jax.jit
        def update(s, state, *args):
            (loss, m), g = self._grad(s, *args)
            g = jnp.where(used, g, 0.0)  # scales of layers an adapter does not touch stay where they are
            u, state = opt.update(g, state, s)
            return optax.apply_updates(s, u), state, loss, m

        history, t0 = [], time.perf_counter()
        bar = tqdm(range(steps), desc="tune-merge", unit="step", disable=not progress or None, leave=False)
        for step in bar:
            s, state, loss, m = update(s, state, *self._inputs(step))
            row = {"step": step + 1, "loss": float(loss), "kl": float(m["kl"]) if self.kl_weight else None,
                   "lm": float(m["lm"]) if self.lm_weight else None}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        return {"scales": np.asarray(s), "history": history, "seconds": time.perf_counter() - t0,
                "batches_per_pass": max(len(self.probe), len(self.domain or ()))}

    def scale_dicts(self, layer_scales) -> list[dict]:
        """Per adapter {"layers": [...], "other": init}: the scales `treemath.merge`, `treemath.combine` and
        `readapt.merge` take."""
        s = self._check_scales(layer_scales)
        return [{"layers": [float(v) for v in s[i]], "other": float(self.init[i])} for i in range(self.n)]


# ------------------------------------------------------------------------------------------------ the command


def _rows(tokenizer, path: str, what: str, seq_len: int, batch_size: int, max_rows: int | None):
    """Packed rows of a text file (`evaluate` packing, one pass, the last batch padded), at most max_rows."""
    if not os.path.isfile(path):
        raise FaJaxError(f"--{what} {path}: no such file")
    out, rows = [], 0
    for batch in evaluate.packed_batches(tokenizer, path, seq_len, batch_size, None, None, "text", "paragraph"):
        if max_rows is not None and rows >= max_rows:
            break
        out.append(batch)
        rows += int(batch["tokens"].shape[0])
    if not out or not any(np.asarray(b["mask"]).any() for b in out):
        raise FaJaxError(f"--{what} {path}: no text to score (empty, or single-token documents only)")
    return out


def plot_scales(result: dict, path: str) -> str:
    """The learned scale of each adapter against the layer, the initial scales dashed; the loss curve beside it."""
    import matplotlib  # lazy: needed for the plot only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for i, a in enumerate(result["adapters"]):
        line, = ax.plot(range(len(a["layers"])), a["layers"], marker="o", label=a["name"])
        ax.axhline(a["init"], color=line.get_color(), ls="--", lw=0.8)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("scale")
    ax.set_title("learned merge scales (dashed: initial)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    hist = result["history"]
    steps, loss = [h["step"] for h in hist], np.asarray([h["loss"] for h in hist])
    k = int(result.get("batches_per_pass") or 1)  # each step sees its own batch: average over one pass of them
    if 1 < k <= len(loss):
        bx.plot(steps, loss, color="0.75", lw=0.8, label="its batch")
        bx.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), lw=2,
                label=f"mean of the last {k} (one pass over the rows)")
        bx.legend(fontsize=8)
    else:
        bx.plot(steps, loss)
    bx.set_xlabel("step")
    bx.set_ylabel("objective")
    bx.set_title(f"before {result['before']['loss']:.4f}, after {result['after']['loss']:.4f} (every row)",
                 fontsize=10)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tune_merge(base_dir: str, adapters, probe: str, out_dir: str, *, target: str | None = None,
               domain: str | None = None, kl_weight: float = 1.0, lm_weight: float | None = None, steps: int = 100,
               lr: float = 0.02, seq_len: int = 256, batch_size: int = 4, max_rows: int | None = 64,
               temperature: float = 1.0, dtype=None, as_lora: bool = False, tau=None, rank=None, budget=None,
               merged: bool = True, tokenizer_dir: str | None = None, overwrite: bool = False,
               progress: bool = True) -> dict:
    """`fa-jax tune-merge`: learn the per-layer scales of `adapters` ([(path, init), ...], each as `fa-jax merge`
    takes it) on the base in `base_dir` and write out_dir/scales.json, out_dir/scales.png and (merged) out_dir/merged,
    the base merged at the learned scales (an HF directory), or with as_lora out_dir/lora, one PEFT LoRA
    (`treemath.combine` under tau / rank / budget). Returns what scales.json holds."""
    if os.path.exists(out_dir) and not overwrite:
        raise FaJaxError(f"{out_dir}: output directory already exists (pass --overwrite)")
    if as_lora and sum(v is not None for v in (tau, rank, budget)) != 1:
        raise FaJaxError("--as-lora: give exactly one of --tau, --rank or --budget")
    if not as_lora and any(v is not None for v in (tau, rank, budget)):
        raise FaJaxError("--tau, --rank and --budget apply with --as-lora")
    if target is None and lm_weight == 0:  # before anything is loaded
        raise FaJaxError("tune-merge: no --target (the KL term) and --lm-weight 0: nothing to minimize")
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise FaJaxError(f"--max-rows {max_rows!r}: expected an integer >= 1")
    if tokenizer_dir is not None:
        readapt.check_tokenizer_dir(tokenizer_dir)
    t0 = time.perf_counter()
    config, reader, names = readapt.open_model(base_dir, "base")
    _, base = hf.load_hf(base_dir, dtype=dtype or "float32")  # bfloat16 compute: bfloat16 weights too
    trees = [readapt.adapter_tree(p, config, base_dir, reader, names) for p, _ in adapters]
    tokenizer = load_tokenizer(base_dir)
    probe_rows = _rows(tokenizer, probe, "probe", seq_len, batch_size, max_rows)
    domain_rows = _rows(tokenizer, domain, "domain", seq_len, batch_size, max_rows) if domain else None
    tgt = load_model(target, dtype=dtype or "float32") if target else None
    tuner = ScaleTuner(config, base, trees, probe_rows, target=tgt, domain_batches=domain_rows, kl_weight=kl_weight,
                       lm_weight=lm_weight, init=[s for _, s in adapters], temperature=temperature, dtype=dtype)
    del tgt
    before = tuner.loss(tuner.initial())
    fit = tuner.fit(steps=steps, lr=lr, progress=progress)
    after = tuner.loss(fit["scales"])
    dicts = tuner.scale_dicts(fit["scales"])
    result = {
        "base": os.path.abspath(base_dir), "target": target, "probe": os.path.abspath(probe),
        "domain": None if domain is None else os.path.abspath(domain),
        "adapters": [{"name": os.path.basename(os.path.normpath(p)) or p, "path": os.path.abspath(p),
                      "init": float(s), "layers": d["layers"], "other": d["other"],
                      "layers_used": [int(v) for v in np.flatnonzero(tuner.used[i])]}
                     for i, ((p, s), d) in enumerate(zip(adapters, dicts))],
        "objective": {"kl_weight": tuner.kl_weight, "lm_weight": tuner.lm_weight, "temperature": temperature},
        "steps": steps, "lr": lr, "seq_len": seq_len, "batch_size": batch_size,
        "rows": {"probe": sum(int(b["tokens"].shape[0]) for b in probe_rows),
                 "domain": sum(int(b["tokens"].shape[0]) for b in domain_rows) if domain_rows else 0},
        "before": before, "after": after, "history": fit["history"], "batches_per_pass": fit["batches_per_pass"],
        "seconds": {"tune": round(fit["seconds"], 1)},
    }
    del tuner, base
    pairs = [(p, d) for (p, _), d in zip(adapters, dicts)]
    with atomic_dir(out_dir, overwrite) as tmp:
        if as_lora:
            report = readapt.merge_as_lora(base_dir, pairs, os.path.join(tmp, "lora"), tau=tau, rank=rank,
                                           budget=budget)
            result["lora"] = {"dir": os.path.join(os.path.abspath(out_dir), "lora"), "params": report["params"],
                              "dense_params": report["dense_params"]}
        elif merged:
            readapt.merge(base_dir, pairs, os.path.join(tmp, "merged"), dtype=None, tokenizer_dir=tokenizer_dir)
            result["merged"] = os.path.join(os.path.abspath(out_dir), "merged")
        result["seconds"]["total"] = round(time.perf_counter() - t0, 1)
        result["plot"] = os.path.join(os.path.abspath(out_dir), "scales.png")
        plot_scales(result, os.path.join(tmp, "scales.png"))
        write_text(os.path.join(tmp, SCALES_FILE), json.dumps(result, indent=2) + "\n")
    return result


def read_scales(path: str) -> list[tuple[str, dict]]:
    """[(adapter path, {"layers", "other"}), ...] from a tune-merge output directory or its scales.json: the
    arguments `fa-jax merge --scales` passes to `readapt.merge` / `merge_as_lora`."""
    f = os.path.join(path, SCALES_FILE) if os.path.isdir(path) else path
    try:
        with open(f) as fh:
            data = json.load(fh)
        return [(a["path"], treemath.check_scale({"layers": a["layers"], "other": a["other"]}, f))
                for a in data["adapters"]]
    except OSError as e:
        raise FaJaxError(f"--scales {f}: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise FaJaxError(f"--scales {f}: not a tune-merge scales.json ({type(e).__name__}: {e})") from None
