"""The `fa-jax` command line (also `python -m fa_jax`).

    fa-jax info PATH                      # architecture and parameter count of an HF directory or .gguf file
    fa-jax convert PATH OUT_DIR           # HF directory or .gguf file -> HF directory (safetensors + tokenizer)
    fa-jax pretrain --config FILE [key=value ...]   # foundation-adapter pre-training (KD + LM)
    fa-jax sft --config FILE init=foundation:RUN ...  # downstream fine-tuning (response tokens only)
    fa-jax eval --model M [--adapter DIR] --perplexity TEXT | --qa RECORDS | --agreement TEXT --teacher T
    fa-jax diff --base DIR --tuned DIR --out DIR    # RE-Adapter = tuned - base
    fa-jax truncate --delta DIR (--tau 0.5 | --rank 64) --out DIR   # LoRE-Adapter (PEFT LoRA directory)
    fa-jax merge --base DIR --adapter DIR[:SCALE] ... --out DIR   # partial adaptation -> HF directory
    fa-jax tune-merge --base DIR --adapter A --adapter B --probe FILE [--target DIR] --out DIR   # learned scales
    fa-jax compile --config FILE --topology v5e-8 [key=value ...]  # per-chip HBM, collectives, roofline on a TPU

User mistakes are reported as one line on stderr with exit status 2; no traceback. `pretrain` and `sft` exit with
75 when SIGTERM or SIGINT stopped them with a checkpoint saved (run the same command again to resume), 0 when the
run finished (or had already finished: then nothing changes) or stopped at run.stop_after.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

from fa_jax import adapters as adapters_lib
from fa_jax import aot, distributed, evaluate, precompute, readapt, run_config, runs, sft, train, treemath, tune_merge
from fa_jax.config import load_config
from fa_jax.embedded import resolve_model_path
from fa_jax.errors import FaJaxError
from fa_jax.io import peft as peft_io
from fa_jax.io.atomic import atomic_dir, write_text
from fa_jax.io.hf import _parse_size, save_hf
from fa_jax.io.load import load_model, load_tokenizer
from fa_jax.models import transformer
from fa_jax.validation import FLOAT_DTYPES


def _info(args) -> None:
    if args.path.endswith(".gguf"):
        config, _ = load_model(args.path)  # GGUF metadata needs the reader; small models load fast
    else:
        config = load_config(args.path)
    print(f"{args.path}: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads} heads / {config.num_key_value_heads} kv heads, vocab {config.vocab_size}, "
          f"rope {config.rope_type} (theta {config.rope_theta:g}), tied embeddings: {config.tie_word_embeddings}")
    print(f"parameters: {config.num_params:,}")


def _keep_layers(text):
    """--keep-layers: None, "every_other" or comma-separated layer indices."""
    if text in (None, "every_other"):
        return text
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise FaJaxError(f"--keep-layers {text}: expected every_other or comma-separated layer indices, e.g. 0,2,4")


def _convert(args) -> None:
    t0 = time.time()
    keep = _keep_layers(args.keep_layers)
    args.path = resolve_model_path(args.path)
    config, params = load_model(args.path, dtype=args.dtype)
    if keep is not None:
        n = config.num_hidden_layers
        config, params = transformer.select_layers(config, params, keep)
        print(f"kept {config.num_hidden_layers} of {n} layers")
    tokenizer = None
    if not args.no_tokenizer:
        try:
            tokenizer = load_tokenizer(args.path)
        except Exception as e:  # a checkpoint without tokenizer files still converts
            print(f"note: no tokenizer saved ({type(e).__name__}: {str(e).splitlines()[0][:120]})", file=sys.stderr)
    save_hf(config, params, args.out, max_shard_size=args.max_shard_size, tokenizer=tokenizer,
            overwrite=args.overwrite)
    print(f"wrote {os.path.abspath(args.out)} ({config.num_params:,} parameters, {time.time() - t0:.1f} s)")


def _export(args) -> None:
    """A run's adapter (its latest checkpoint) as a PEFT / fa_jax adapter directory, or merged into the student's
    weights as a Hugging Face directory."""
    cfg = runs.run_config_of(args.run)
    model = resolve_model_path(cfg.model.student or cfg.model.teacher)
    keep = cfg.model.keep_layers
    if args.merged or model.endswith(".gguf"):  # (a GGUF file's config is read with its weights)
        config, params = load_model(model, dtype=args.dtype)
    else:
        config = load_config(model)
        params = transformer.abstract_params(config)
    if keep is not None:
        config, params = transformer.select_layers(config, params, keep)
    adapters = runs.run_adapters(args.run, config, allow_pruned=True)
    kind = adapters_lib.kind_of(adapters)
    if not args.merged:
        adapters_lib.save_adapter(config, adapters, args.out, base_model_name_or_path=model,
                                  use_rslora=bool(cfg.adapter.use_rslora), overwrite=args.overwrite)
        print(f"wrote {os.path.abspath(args.out)} ({kind} adapter of {args.run})")
        return
    if not adapters_lib.MERGEABLE[kind]:
        raise FaJaxError(f"--merged: a {kind} adapter cannot be merged into the weights (only lora and dora can); "
                         "export it as an adapter instead")
    tokenizer = load_tokenizer(model)
    save_hf(config, treemath.merge(params, [(adapters, 1.0)]), args.out, tokenizer=tokenizer,
            overwrite=args.overwrite)
    print(f"wrote {os.path.abspath(args.out)} (the {config.num_hidden_layers}-layer student with the {kind} adapter "
          "merged in)")


def _run_training(args, kind: str) -> None:
    """`pretrain` or `sft`: resolve the config, run, and print the last metrics."""
    if args.distributed:
        distributed.initialize()
    overrides = list(args.overrides) + (["run.force_resume=true"] if args.force_resume else [])
    cfg = run_config.load(args.config, run_config.defaults(kind), overrides)
    if args.print_config:
        print(json.dumps(cfg, indent=2, default=str))
        return
    summary = train.pretrain(cfg) if kind == "pretrain" else sft.finetune(cfg)
    if summary.get("status") == "already finished":
        return 0
    m = summary["metrics"]
    terms = (f"kd {m.get('kd', float('nan')):.4f}, lm {m.get('lm', float('nan')):.4f}" if kind == "pretrain" else
             f"response-token cross-entropy {m.get('lm', float('nan')):.4f}")
    print(f"step {summary['step']}/{summary['steps']}: loss {m.get('loss', float('nan')):.4f} ({terms}), "
          f"{m.get('tokens_per_s', 0):.0f} tokens/s")
    print(f"wrote {summary['out_dir']} (checkpoints, metrics.jsonl, tensorboard/, loss_curve.png"
          + (", adapter_peft/)" if "peft_adapter" in summary else ")"))
    if summary.get("status") == "interrupted":
        return train.EXIT_INTERRUPTED
    return 0


def _teacher_cache(args) -> None:
    """`teacher-cache`: the teacher's top-k distributions over a pretrain config's stream, written once."""
    if args.distributed:
        distributed.initialize()
    cfg = run_config.load(args.config, run_config.defaults("pretrain"), args.overrides)
    if args.print_config:
        print(json.dumps(cfg, indent=2, default=str))
        return
    precompute.teacher_cache(cfg, args.out)
    print(f"wrote {os.path.abspath(args.out)}; train from it with `fa-jax pretrain --config {args.config or '...'} "
          f"teacher.cache={args.out}` (and the same overrides)")


def _load_eval_adapter(path, config, keep_layers):
    """(config, adapters, keep_layers) for `eval --adapter`: a PEFT directory or a fa_jax run directory (its
    exported adapter, on the student its config.json names with keep_layers)."""
    if path is None:
        return None, keep_layers
    if not os.path.isdir(path):
        raise FaJaxError(f"--adapter {path}: no such directory")
    exported = runs.exported_adapter(path)
    if exported:
        return exported, runs.keep_layers_of(path) if keep_layers is None else keep_layers
    if runs.holds_adapter(path):
        return path, keep_layers
    raise FaJaxError(f"--adapter {path}: not a PEFT adapter directory or a fa_jax run with adapter_peft/")


def _eval(args) -> None:
    if not (args.perplexity or args.agreement or args.qa):
        raise FaJaxError("eval: nothing to do; give --perplexity TEXT, --agreement TEXT (with --teacher) or --qa "
                         "RECORDS.jsonl")
    if args.agreement and not args.teacher:
        raise FaJaxError("eval --agreement needs --teacher MODEL")
    keep = _keep_layers(args.keep_layers)
    adapter_dir, keep = _load_eval_adapter(args.adapter, None, keep)
    path = resolve_model_path(args.model)
    config, params = load_model(path, dtype=args.dtype)
    tokenizer = load_tokenizer(path)
    if keep is not None:
        config, params = transformer.select_layers(config, params, keep)
    adapters = adapters_lib.load_adapter_dir(config, adapter_dir) if adapter_dir else None
    summary = {"model": args.model, "adapter": args.adapter, "keep_layers": keep}
    kw = dict(seq_len=args.seq_len, batch_size=args.batch_size)
    # a new --out directory appears complete or not at all; files in an existing one are each replaced atomically
    out_ctx = contextlib.nullcontext(None)
    if args.out:
        out_ctx = contextlib.nullcontext(args.out) if os.path.isdir(args.out) else atomic_dir(args.out)
    with out_ctx as out:
        if args.perplexity:
            summary["perplexity"] = evaluate.perplexity(config, params, tokenizer, args.perplexity,
                                                        adapters=adapters, **kw)
        if args.agreement:
            t_path = resolve_model_path(args.teacher)
            t_cfg, teacher = load_model(t_path, dtype=args.dtype)
            summary["teacher_agreement"] = evaluate.teacher_agreement(t_cfg, teacher, config, params, tokenizer,
                                                                      args.agreement, adapters=adapters, **kw)
        if args.qa:
            summary["qa"] = evaluate.evaluate_qa(config, params, tokenizer, args.qa, adapters=adapters,
                                                 max_new_tokens=args.max_new_tokens, with_context=args.with_context,
                                                 prompt_format=args.prompt_format, out_dir=out)
        text = json.dumps(summary, indent=2, default=str)
        print(text)
        if out:
            write_text(os.path.join(out, "eval_summary.json"), text + "\n")


def _diff(args) -> None:
    readapt.diff(args.base, args.tuned, args.out, linear_only=args.linear_only, overwrite=args.overwrite)
    print(f"wrote {os.path.abspath(args.out)} (RE-Adapter: tuned - base, float32, Hugging Face tensor names)")


def _truncate(args) -> None:
    report = readapt.truncate(args.delta, args.out, tau=args.tau, rank=args.rank, overwrite=args.overwrite,
                              base_config=args.base_config)
    print(readapt.rank_table(report))
    kept = report["non_matrix"]
    side = f" and {len(kept['side_file'])} in {peft_io.EXTRA}" if kept["side_file"] else ""
    print(f"wrote {os.path.abspath(args.out)} (PEFT LoRA directory, {len(kept['modules_to_save'])} modules_to_save "
          f"tensor(s){side}, lore_report.json, explained_variance.png, param_share_vs_tau.png)")
    if kept["note"]:
        print(f"note: {kept['note']}", file=sys.stderr)


def _dtype_arg(text: str) -> str:
    """--dtype of convert / merge: a floating-point dtype name (an argparse usage error otherwise)."""
    if text not in FLOAT_DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(FLOAT_DTYPES)}")
    return text


def _shard_size_arg(text: str) -> str:
    """--max-shard-size: a positive size as save_hf parses it (5GB, 500MB, 2GiB or bytes); kept as given."""
    try:
        ok = _parse_size(text) > 0
    except (ValueError, OverflowError):
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive size such as 5GB, 500MB, 2GiB or a number "
                                         "of bytes")
    return text


def _budget_arg(text: str):
    """--budget: an int (parameters) or a float in (0, 1) (a share of the dense parameters)."""
    value = run_config.parse_value(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (
            isinstance(value, float) and value >= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a share in (0, 1) such as 0.02 or a number of "
                                         "parameters such as 5000000")
    return value


def _parse_adapter(text: str, default: float = 1.0):
    path, _, scale = text.rpartition(":")
    if not path or not scale:
        return text, default
    try:
        return path, float(scale)
    except ValueError:
        return text, default  # a ':' inside the path, no scale


def _merge(args) -> None:
    if args.scales and args.adapter:
        raise FaJaxError("--scales names the adapters and their per-layer scales; give it instead of --adapter")
    if not args.scales and not args.adapter:
        raise FaJaxError("give --adapter DIR[:SCALE] (one or more) or --scales TUNED_DIR")
    adapters = tune_merge.read_scales(args.scales) if args.scales else [_parse_adapter(a) for a in args.adapter]
    limits = {"--tau": args.tau, "--rank": args.rank, "--budget": args.budget}
    if args.as_lora:
        if sum(v is not None for v in limits.values()) != 1:
            raise FaJaxError("--as-lora: give exactly one of --tau, --rank or --budget")
        if args.tokenizer or args.dtype:
            raise FaJaxError("--as-lora writes a PEFT LoRA directory: --tokenizer and --dtype do not apply")
        report = readapt.merge_as_lora(args.base, adapters, args.out, tau=args.tau, rank=args.rank,
                                       budget=args.budget, overwrite=args.overwrite)
        ranks = sorted(report["rank_pattern"].values())
        print(f"wrote {os.path.abspath(args.out)}: one LoRA = "
              + " + ".join(f"{_scale_text(s)} * {p}" for p, s in adapters)
              + f", {report['params']:,} parameters ({100 * report['params'] / report['dense_params']:.2f}% of the "
              f"{report['dense_params']:,} dense ones), ranks {ranks[0]}..{ranks[-1]} over {len(ranks)} modules")
        return
    given = [k for k, v in limits.items() if v is not None]
    if given:
        raise FaJaxError(f"{given[0]} applies with --as-lora (a merged model is not truncated)")
    readapt.merge(args.base, adapters, args.out, overwrite=args.overwrite, dtype=args.dtype,
                  tokenizer_dir=args.tokenizer)
    print(f"wrote {os.path.abspath(args.out)} = base + " + " + ".join(f"{_scale_text(s)} * {p}" for p, s in adapters))
    if args.tokenizer is None and not readapt.has_chat_template(args.base):
        instruct = readapt.tuned_of(adapters) or "INSTRUCT_DIR"
        print(f"note: the base's tokenizer has no chat template, so fa-jax eval --qa on {args.out} prompts without "
              f"one; merge with --tokenizer {instruct} to carry the instruct model's", file=sys.stderr)


def _scale_text(s) -> str:
    if isinstance(s, dict):
        v = s["layers"]
        return f"[{min(v):.3g}..{max(v):.3g} by layer]"
    return f"{s:g}"


def _tune_merge(args) -> None:
    adapters = [_parse_adapter(a, default=0.5) for a in args.adapter]
    result = tune_merge.tune_merge(
        args.base, adapters, args.probe, args.out, target=args.target, domain=args.domain, kl_weight=args.kl_weight,
        lm_weight=args.lm_weight, steps=args.steps, lr=args.lr, seq_len=args.seq_len, batch_size=args.batch_size,
        max_rows=args.max_rows, temperature=args.temperature, dtype=args.compute_dtype, as_lora=args.as_lora,
        tau=args.tau, rank=args.rank, budget=args.budget, merged=not args.scales_only, tokenizer_dir=args.tokenizer,
        overwrite=args.overwrite)
    b, a = result["before"], result["after"]
    terms = lambda r: ", ".join(f"{k} {r[k]:.4f}" for k in ("kl", "lm") if r[k] is not None)
    print(f"objective over the probe rows: {b['loss']:.4f} ({terms(b)}) at the initial scales -> {a['loss']:.4f} "
          f"({terms(a)}) after {args.steps} steps")
    for ad in result["adapters"]:
        v = [ad["layers"][i] for i in ad["layers_used"]]
        print(f"  {ad['path']}: init {ad['init']:g}, learned {min(v):.3f}..{max(v):.3f} (mean {np.mean(v):.3f}) "
              f"over {len(v)} layers")
    out = os.path.abspath(args.out)
    what = "lora/ (one PEFT LoRA)" if "lora" in result else "merged/ (an HF directory)" if "merged" in result else ""
    print(f"wrote {out}: scales.json, scales.png" + (f", {what}" if what else ""))


def _compile(args) -> None:
    """Ahead-of-time compilation of a pretrain / sft config for a TPU topology (fa_jax.aot)."""
    t0 = time.time()
    report = aot.compile_report(args.config, args.topology, overrides=args.overrides, slices=args.slices,
                                program=args.program, kind=args.kind, batch=args.batch, prompt_len=args.prompt_len,
                                cache_len=args.cache_len, progress=lambda m: print(m + " ...", flush=True),
                                hlo_dir=args.hlo)
    print(aot.format_report(report))
    if args.json:
        aot.write_json(report, args.json)
        print(f"wrote {os.path.abspath(args.json)}")
    print(f"({time.time() - t0:.0f} s in all)")
    aot.check_fits(report)


def _add_run_args(s, resume: bool = True) -> None:
    s.add_argument("--config", help="Python config file defining get_config() (see configs/)")
    s.add_argument("--distributed", action="store_true",
                   help="one process per host: join the others (FA_JAX_COORDINATOR / FA_JAX_NUM_PROCESSES / "
                        "FA_JAX_PROCESS_ID, or the cluster's own detection on TPU pods, SLURM, Open MPI)")
    s.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    if not resume:
        s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. teacher.top_k=128")
        return
    s.add_argument("--force-resume", action="store_true",
                   help="resume although optimisation settings changed (more run.steps, optim.*, loss.*); "
                        "structural changes (models, data, adapter layout, seq_len, batch) are refused regardless")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-4")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fa-jax", description="Foundation adapters in JAX.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("info", help="print the architecture and parameter count of a checkpoint")
    s.add_argument("path", help="Hugging Face model directory or .gguf file")
    s.set_defaults(fn=_info)
    s = sub.add_parser("convert", help="write a checkpoint (HF directory or .gguf) as a Hugging Face directory")
    s.add_argument("path", help="Hugging Face model directory or .gguf file")
    s.add_argument("out", help="output directory (must not exist unless --overwrite)")
    s.add_argument("--dtype", default="float32", type=_dtype_arg,
                   help="storage dtype of the output (float32, bfloat16, float16)")
    s.add_argument("--max-shard-size", default="5GB", type=_shard_size_arg,
                   help="split weights into files of at most this size (e.g. 5GB, 500MB)")
    s.add_argument("--no-tokenizer", action="store_true", help="do not save the tokenizer")
    s.add_argument("--keep-layers", help="write a pruned model: every_other or comma-separated layer indices (the "
                   "student of a keep_layers run, e.g. to load its PEFT adapter in transformers)")
    s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    s.set_defaults(fn=_convert)
    s = sub.add_parser("pretrain", help="pre-train a foundation adapter (KD from a teacher + LM on text)")
    _add_run_args(s)
    s.set_defaults(fn=lambda a: _run_training(a, "pretrain"))
    s = sub.add_parser("teacher-cache", help="run the teacher once over a pretrain config's data and store its "
                       "top-k distributions (then: pretrain teacher.cache=DIR)")
    _add_run_args(s, resume=False)
    s.add_argument("--out", required=True, help="the cache directory (new, or a cache of this config to continue "
                   "or extend to run.steps)")
    s.set_defaults(fn=_teacher_cache)
    s = sub.add_parser("sft", help="fine-tune an adapter downstream (init=foundation:RUN | peft:DIR | random)")
    _add_run_args(s)
    s.set_defaults(fn=lambda a: _run_training(a, "sft"))
    s = sub.add_parser("eval", help="perplexity, teacher agreement and QA scores (ROUGE-L, exact match)")
    s.add_argument("--model", required=True, help="HF directory, .gguf file or embedded:NAME")
    s.add_argument("--adapter", help="PEFT adapter directory or fa_jax run directory (uses its keep_layers)")
    s.add_argument("--keep-layers", help="evaluate a pruned model: every_other or comma-separated layer indices")
    s.add_argument("--teacher", help="teacher model for --agreement")
    s.add_argument("--perplexity", metavar="TEXT", help="held-out text (any data.train source) for perplexity")
    s.add_argument("--agreement", metavar="TEXT", help="held-out text for KL(teacher || model) and top-1 agreement")
    s.add_argument("--qa", metavar="RECORDS", help="JSON Lines {question|prompt, reference, context?}")
    s.add_argument("--with-context", action="store_true", help="QA prompt with the record's context passage")
    s.add_argument("--prompt-format", choices=("auto", "system", "user"), default="auto",
                   help="QA prompts through the model's chat template (RE-Adapt, Appendix B): the instruction as a "
                        "system turn (Llama-3), or everything in one user turn (Gemma, Mistral); auto: system "
                        "where the template takes a system role")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--dtype", default="float32")
    s.add_argument("--out", help="directory for eval_summary.json (and predictions.jsonl, summary.json of --qa)")
    s.set_defaults(fn=_eval)
    s = sub.add_parser("diff", help="RE-Adapter: the difference tuned - base, tensor by tensor")
    s.add_argument("--base", required=True, help="the pretrained model (HF directory)")
    s.add_argument("--tuned", required=True, help="the instruction-tuned model (HF directory, same architecture)")
    s.add_argument("--out", required=True, help="output directory (safetensors with the HF names)")
    s.add_argument("--linear-only", action="store_true", help="keep only the linear layers' matrices")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_diff)
    s = sub.add_parser("truncate", help="LoRE-Adapter: per-matrix truncated SVD of an RE-Adapter, as PEFT LoRA "
                       "(embedding, head and norm deltas kept as modules_to_save)")
    s.add_argument("--delta", required=True, help="an RE-Adapter directory (fa-jax diff) or a PEFT LoRA directory")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--tau", type=float, help="explained-variance threshold in (0, 1], e.g. 0.5")
    g.add_argument("--rank", type=int, help="a fixed rank per matrix")
    s.add_argument("--out", required=True, help="output PEFT directory")
    s.add_argument("--base-config", help="base model directory, when --delta is a PEFT adapter")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_truncate)
    s = sub.add_parser("export", help="a run's latest checkpoint as an adapter directory, or merged (--merged)")
    s.add_argument("run", help="a fa_jax pretrain or sft run directory")
    s.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    s.add_argument("--merged", action="store_true", help="merge the adapter into the student: an HF directory")
    s.add_argument("--dtype", default="float32", help="storage dtype of the merged weights")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_export)
    s = sub.add_parser("compile", help="compile a config for a TPU topology: per-chip HBM, FLOPs, collectives, "
                       "roofline estimate (no TPU needed; pip install -e .[tpu])")
    s.add_argument("--config", help="a pretrain or sft config file (see configs/)")
    s.add_argument("--topology", required=True, help="v5e-8, v6e-8, v4-8, v5p-8, v5e-256, ... or v5e:2x4")
    s.add_argument("--slices", type=int, default=1, help="that many slices joined by the data-center network")
    s.add_argument("--program", choices=("train", "generate"), default="train",
                   help="the training step (default) or generation (prefill + one decode step)")
    s.add_argument("--kind", choices=("pretrain", "sft"), help="default: sft when the config has an init key")
    s.add_argument("--batch", type=int, default=8, help="--program generate: rows")
    s.add_argument("--prompt-len", type=int, default=1024, help="--program generate: prompt tokens per row")
    s.add_argument("--cache-len", type=int, default=2048, help="--program generate: cache slots per row")
    s.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    s.add_argument("--hlo", metavar="DIR", help="also write each program's optimized HLO text into DIR")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.batch_size=32")
    s.set_defaults(fn=_compile)
    s = sub.add_parser("merge", help="partial adaptation: base + sum of scaled adapters, as an HF directory")
    s.add_argument("--base", required=True, help="the base model (HF directory)")
    s.add_argument("--adapter", action="append", metavar="DIR[:SCALE]",
                   help="an RE-Adapter, PEFT LoRA/LoRE directory or fa_jax run, with its scale (default 1)")
    s.add_argument("--scales", metavar="TUNED",
                   help="instead of --adapter: the adapters and per-layer scales learned by fa-jax tune-merge (its "
                        "output directory or scales.json)")
    s.add_argument("--out", required=True, help="output HF directory")
    s.add_argument("--dtype", type=_dtype_arg, help="storage dtype of the output (default: the base's)")
    s.add_argument("--tokenizer", metavar="DIR",
                   help="copy the tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja, "
                        "generation_config.json, ...) from DIR, e.g. the instruct model's directory, so the merged "
                        "model has its chat template (default: the base's)")
    s.add_argument("--as-lora", action="store_true",
                   help="write the sum of the scaled LoRA adapters as one PEFT LoRA (treemath.combine) instead of a "
                        "merged model; with one of --tau, --rank, --budget")
    s.add_argument("--tau", type=float, help="--as-lora: per matrix, the smallest rank explaining this share")
    s.add_argument("--rank", type=int, help="--as-lora: per matrix, at most this rank")
    s.add_argument("--budget", type=_budget_arg,
                   help="--as-lora: one parameter budget over all matrices, a share of the dense parameters (0.02) "
                        "or a number of parameters (5000000); the largest singular values win wherever they are")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_merge)
    s = sub.add_parser("tune-merge", help="learn one merge scale per adapter per layer from probe text "
                                          "(KL to a target model and/or the LM loss), then merge")
    s.add_argument("--base", required=True, help="the base model (HF directory)")
    s.add_argument("--adapter", action="append", required=True, metavar="DIR[:INIT]",
                   help="an adapter as fa-jax merge takes it, with its initial scale (default 0.5); give two or more")
    s.add_argument("--probe", required=True, metavar="FILE", help="text for the KL term (paragraphs)")
    s.add_argument("--target", metavar="MODEL", help="the model to match on the probe text (e.g. the instruct "
                                                      "model; same vocabulary); without it the LM loss alone")
    s.add_argument("--domain", metavar="FILE", help="text for the LM term (default: the probe text)")
    s.add_argument("--kl-weight", type=float, default=1.0)
    s.add_argument("--lm-weight", type=float, help="default: 1 with --domain or without --target, else 0")
    s.add_argument("--steps", type=int, default=100)
    s.add_argument("--lr", type=float, default=0.02, help="Adam learning rate on the scales (cosine to lr/10)")
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--batch-size", type=int, default=4, help="rows per step")
    s.add_argument("--max-rows", type=int, default=64, help="most rows read from each text")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--compute-dtype", type=_dtype_arg, help="dtype of the forward pass (default: float32)")
    s.add_argument("--as-lora", action="store_true", help="write one PEFT LoRA (out/lora) instead of a merged model; "
                                                          "with one of --tau, --rank, --budget")
    s.add_argument("--tau", type=float)
    s.add_argument("--rank", type=int)
    s.add_argument("--budget", type=_budget_arg)
    s.add_argument("--scales-only", action="store_true", help="write scales.json and the plot only")
    s.add_argument("--tokenizer", metavar="DIR", help="the merged model's tokenizer files from DIR (as fa-jax merge)")
    s.add_argument("--out", required=True, help="output directory: scales.json, scales.png, merged/ or lora/")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_tune_merge)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.fn(args)
    except FaJaxError as e:
        print(f"fa-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write (or read) the command did not turn into a FaJaxError: disk full, read-only, ...
        where = f"{e.filename}: " if e.filename is not None else ""
        print(f"fa-jax {args.command}: error: {where}{e.strerror or e}".replace("\n", " "), file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
