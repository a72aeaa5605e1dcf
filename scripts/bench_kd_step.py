"""Benchmark of one knowledge-distillation training step: fa_jax against PyTorch + transformers + PEFT.

    .venv/bin/python scripts/bench_kd_step.py [--steps 5] [--rounds 2] [--json out.json]

The step (issue 3, "Performance"): teacher SmolLM2-135M-Instruct (the embedded GGUF), student = every other layer of
it (15 layers, frozen), LoRA r 8 / alpha 16 on all linear layers, batch 4 x 256 tokens, float32,
loss = 0.5 * forward KL (T = 1) + 0.5 * CE, AdamW on the adapters only. Variants:

  fa_jax         the project's own step: fa_jax.train.load_models / init_state / make_loss_fn / make_train_step,
                 jitted with shardings and donation exactly as `fa_jax.train.pretrain` does, on a 1-device mesh.
  torch_eager    LlamaForCausalLM loaded from the GGUF (transformers `gguf_file=`); the student is a deep copy with
                 every other layer deleted; PEFT LoraConfig(r=8, lora_alpha=16, target_modules="all-linear");
                 teacher forward under no_grad; the loss on full [B, T, V] logits; torch.optim.AdamW on LoRA only.
  torch_compile  the same with `torch.compile` of the student forward + loss (teacher stays eager under no_grad).
  fa_jax_scan    fa_jax with model.scan_layers=true (both models' layers under nn.scan, weights stacked).
  fa_jax_baseline  fa_jax as of the git revision --baseline REV (its own copy of this script, from a detached git
                 worktree): before/after figures of a change, measured in the same interleaved run.
  fa_jax_cache   fa_jax with teacher.cache: no teacher is loaded; each step reads the teacher's top-64 float16
                 log-probabilities of its batch from a cache directory (`fa_jax.teacher_cache`, the reader
                 `fa-jax pretrain` uses) and the KD term is the sparse one with a tail bucket. The timed step includes
                 that read and its transfer. The cache is written once, before the rounds, by the live teacher
                 (its time and size are reported; not part of the step).
  fa_jax_int8    fa_jax with teacher.quantize=int8 (the live teacher's weights int8, per-channel scales).

Each variant runs in its own subprocess; the variants are interleaved over --rounds rounds (the order rotates each
round) because this machine's speed drifts. Per variant the first step (compilation) and --warmup more steps are
untimed, then --steps steps are timed. Peak memory is the process's VmHWM (peak resident set) after
`echo 5 > /proc/self/clear_refs` was written once the models were loaded and the batches built, i.e. the peak RSS of
the compile/first step and the training steps, models included ("steady peak": of the timed steps only). Every
subprocess runs with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 and 2 torch threads. The machine is shared: each run
first waits for it to be idle, measures the CPU time other processes took during its timed steps, and is rerun when
that exceeds --max-other-load cores. The fa_jax run also measures this machine's float32 matmul rate, which bounds
how fast any implementation of the step can be. All variants see the same token batches, and the first-step losses
of fa_jax and torch are compared (the LoRA B matrices start at 0, so the first loss is the base student's and does
not depend on the LoRA init).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("fa_jax", "fa_jax_scan", "fa_jax_baseline", "fa_jax_cache", "fa_jax_int8", "torch_eager",
            "torch_compile")
DEFAULT_VARIANTS = ("fa_jax", "torch_eager", "torch_compile")
LABELS = {"fa_jax": "fa_jax (jit)", "fa_jax_scan": "fa_jax scan", "fa_jax_baseline": "fa_jax baseline",
          "fa_jax_cache": "fa_jax cache", "fa_jax_int8": "fa_jax int8", "torch_eager": "torch eager",
          "torch_compile": "torch.compile"}
CACHE_K, CACHE_DTYPE = 64, "float16"
TUNABLES = "glibc.malloc.hugetlb=1"
TEACHER = "embedded:smollm2-135m-instruct"
ALPHA, TEMPERATURE, RANK, LORA_ALPHA, LR = 0.5, 1.0, 8, 16.0, 1e-3
TARGETS = {"tokens_vs_eager": 2.0, "tokens_vs_compile": 1.3, "memory_vs_eager": 0.7, "tokens_cache_vs_live": 1.7}


# ------------------------------------------------------------------------------------------ shared helpers


def make_batches(n: int, batch: int, seq: int, vocab: int, seed: int):
    """n batches of numpy int32 arrays {tokens, labels, mask, segment_ids, positions} [batch, seq]: one document per
    row (segment 1, positions 0..seq-1, every label counted), token ids drawn uniformly from the vocabulary."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        row = rng.integers(3, vocab, size=(batch, seq + 1), dtype=np.int32)
        out.append({"tokens": row[:, :-1].copy(), "labels": row[:, 1:].copy(),
                    "mask": np.ones((batch, seq), np.int32), "segment_ids": np.ones((batch, seq), np.int32),
                    "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()})
    return out


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def reset_peak_memory() -> int:
    """Free what can be freed, then make VmHWM restart from the current RSS. Returns the RSS in kB."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class OtherLoad:
    """Average number of cores that other processes kept busy while the block ran (this machine is shared)."""

    def __enter__(self):
        self.t, self.busy, self.own = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()
        return self

    def __exit__(self, *exc):
        wall = max(time.perf_counter() - self.t, 1e-9)
        self.cores = max(0.0, (busy_cpu_seconds() - self.busy) - (own_cpu_seconds() - self.own)) / wall


def wait_for_idle(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (up to max_wait seconds) until other processes use less than `threshold` cores; returns the wait."""
    t0 = time.perf_counter()
    while True:
        b0 = busy_cpu_seconds()
        time.sleep(2.0)
        load = (busy_cpu_seconds() - b0) / 2.0
        waited = time.perf_counter() - t0
        if load < threshold or waited >= max_wait:
            if waited > 3:
                print(f"  (waited {waited:.0f} s for the machine to be idle; other load now {load:.2f} cores)",
                      flush=True)
            return waited
        time.sleep(8.0)


def clear_peak() -> int:
    """VmHWM so far (kB), then restart it from the current RSS (nothing freed: the next steps run as before)."""
    hwm = _status_kb("VmHWM")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return hwm


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ------------------------------------------------------------------------------------------ fa_jax worker


def matmul_rate(m: int = 1024, k: int = 576, n: int = 1536, seconds: float = 1.5) -> float:
    """GFLOP/s of one jitted float32 matmul of the step's most common shape (tokens x hidden x MLP width): what the
    machine's matmul kernels deliver now, the ceiling for a step that is ~90% matmul FLOPs."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32)
    f = jax.jit(jnp.dot)
    jax.block_until_ready(f(x, w))
    reps, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        jax.block_until_ready(f(x, w))
        reps += 1
    return 2.0 * m * k * n * reps / (time.perf_counter() - t) / 1e9



def bench_config(args, variant: str = "fa_jax"):
    """The run config of the fa_jax variants (configs/pretrain_smollm2.py with the benchmark's setting)."""
    from fa_jax import run_config, train

    config_file = os.path.join(ROOT, "configs", "pretrain_smollm2.py")
    cfg = run_config.load(config_file if os.path.exists(config_file) else None, train.pretrain_defaults())
    overrides = {
        "model": {"teacher": TEACHER, "student": None, "keep_layers": "every_other", "dtype": "float32",
                  "compute_dtype": None},
        "adapter": {"kind": "lora", "rank": RANK, "alpha": LORA_ALPHA, "targets": "all-linear", "dropout": 0.0},
        "loss": {"alpha": ALPHA, "temperature": TEMPERATURE, "divergence": "forward_kl"},
        "data": {"seq_len": args.seq, "batch_size": args.batch},
        "optim": {"lr": LR, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0, "grad_accum": 1},
        "mesh": {"shape": [1, 1, 1]},
        "run": {"steps": 1000},
    }
    if args.chunk_size:
        overrides["loss"]["chunk_size"] = args.chunk_size
    if variant == "fa_jax_scan":
        overrides["model"]["scan_layers"] = True
    if variant == "fa_jax_cache":
        overrides["teacher"] = {"cache": args.cache_dir}
    if variant == "fa_jax_int8":
        overrides["teacher"] = {"quantize": "int8"}
    if args.remat != "config":
        remat = run_config.parse_value(args.remat)
        overrides["model"]["remat"] = {False: "none", True: "full"}.get(remat, remat)
    return run_config.merge(cfg, overrides, "bench_kd_step")


def build_cache(args) -> dict:
    """Write the teacher cache of the benchmark's batches (top CACHE_K tokens, CACHE_DTYPE) to args.cache_dir in
    the format of `fa-jax teacher-cache`, with the live teacher; returns its time and size."""
    import jax
    import numpy as np

    from fa_jax import losses, train
    from fa_jax import sharding as sh
    from fa_jax import teacher_cache as tc
    from fa_jax.io.atomic import write_text
    from fa_jax.models import transformer

    t0 = time.perf_counter()
    cfg = bench_config(args)
    mesh = sh.make_mesh(cfg.mesh.shape)
    rules = sh.DEFAULT_RULES
    teacher_cfg, teacher, _ = train.load_teacher(cfg, mesh, rules)
    vocab = teacher_cfg.vocab_size

    @jax.jit
    def topk(params, tokens):
        h = transformer.hidden_states(teacher_cfg, params, tokens)
        head, vd = transformer.lm_head(teacher_cfg, params)
        return losses.teacher_topk(h, head, vocab=vocab, k=CACHE_K, chunk_size=int(cfg.loss.chunk_size), head_vd=vd)

    batches = make_batches(1 + args.warmup + args.steps, args.batch, args.seq, vocab, args.seed)
    ids_dtype, dtype = tc.ids_dtype(vocab), tc.DTYPES[CACHE_DTYPE]
    buf = {"ids": [], "logp": [], "tail": [], "tokens": []}
    mass = []
    for b in batches:
        out = jax.device_get(topk(teacher, b["tokens"]))
        buf["ids"].append(out.ids.astype(ids_dtype))
        buf["logp"].append(out.logp.astype(dtype))
        buf["tail"].append(out.tail.astype(np.float32))
        buf["tokens"].append(b["tokens"].astype(ids_dtype))
        mass.append(-np.expm1(out.tail))
    rows = os.path.join(args.cache_dir, f"rows-{0:06d}-{args.batch:06d}")
    os.makedirs(rows, exist_ok=True)
    covered = np.array([np.concatenate(mass).sum(), np.concatenate(mass).size])
    tc.write_file(rows, 0, len(batches), buf, {}, covered, np.zeros(20, np.int64))
    meta = dict(tc.identity(cfg, vocab), id="bench", k=CACHE_K, dtype=CACHE_DTYPE, ids_dtype=ids_dtype.name)
    write_text(os.path.join(args.cache_dir, tc.META), json.dumps(meta, default=str))
    size = sum(os.path.getsize(os.path.join(rows, f)) for f in os.listdir(rows))
    return {"build_s": time.perf_counter() - t0, "bytes": size,
            "bytes_per_token": size / (len(batches) * args.batch * args.seq),
            "mean_topk_mass": float(covered[0] / covered[1])}


def bench_fa_jax(args, variant: str = "fa_jax") -> dict:
    import jax
    import numpy as np

    from fa_jax import train
    from fa_jax import sharding as sh
    from fa_jax import teacher_cache as tc
    from fa_jax.metrics import kd_step_flops, peak_flops_per_device
    from fa_jax.models import transformer

    t0 = time.perf_counter()
    cfg = bench_config(args, variant)
    mesh = sh.make_mesh(cfg.mesh.shape)
    rules = tuple(tuple(r) for r in cfg.mesh.rules) if cfg.mesh.rules else sh.DEFAULT_RULES
    teacher_cfg, teacher, student_cfg, student, _ = train.load_models(cfg, mesh, rules)
    teacher_layers = (teacher_cfg or student_cfg).num_hidden_layers
    teacher_params = transformer.count_params(teacher_cfg) if teacher_cfg else 0
    cache = tc.Cache(args.cache_dir) if variant == "fa_jax_cache" else None
    if cache is not None:
        teacher_cfg, teacher, teacher_layers = student_cfg, {}, 0
    state, optimizer, schedule = train.init_state(cfg, student_cfg, mesh, rules)
    batch_sh = sh.batch_sharding(mesh, rules)
    remat = train.remat_setting(cfg)
    loss_fn = train.make_loss_fn(student_cfg, teacher_cfg, cfg.loss, cfg.model.compute_dtype,
                                 float(cfg.adapter.dropout), remat, cache_vocab=cache and cache.vocab)
    step = train.make_train_step(loss_fn, optimizer, schedule, int(cfg.optim.grad_accum), batch_sh)
    step_fn = train.jit_train_step(step, state, student, teacher, mesh, rules)  # the very jit call of `pretrain`
    n = 1 + args.warmup + args.steps
    batches = [{k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in b.items()}
               for b in make_batches(n, args.batch, args.seq, student_cfg.vocab_size, args.seed)]
    jax.block_until_ready((state, batches))
    load_s = time.perf_counter() - t0
    rss_after_load = reset_peak_memory()

    def cached_entries(i):  # what train.CachedBatches adds to a batch: read from disk, then sent to the device
        got = cache.read(i, 0, args.batch)
        return {k: jax.make_array_from_process_local_data(batch_sh, got[key])
                for k, key in zip(tc.KEYS, ("ids", "logp", "tail"))}

    times, first, load = [], None, OtherLoad()
    for i, batch in enumerate(batches):
        if i == 1 + args.warmup:
            peak_first = clear_peak()  # the peak of the compile/first and warm-up steps
            load.__enter__()
        t = time.perf_counter()
        if cache is not None:
            batch = dict(batch, **cached_entries(i))
        state, metrics = step_fn(state, student, teacher, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
        if i == 0:
            first = {k: float(v) for k, v in jax.device_get(metrics).items()}
    load.__exit__()
    dev = jax.devices()[0]
    out = {"load_s": load_s, "first_step_s": times[0], "step_s": times[1 + args.warmup:], "other_load": load.cores,
           "first_loss": first["loss"], "first_kd": first["kd"], "first_lm": first["lm"],
           "rss_after_load_kb": rss_after_load, "peak_rss_kb": max(peak_first, _status_kb("VmHWM")),
           "peak_rss_steady_kb": _status_kb("VmHWM"),
           "platform": dev.platform, "device_kind": dev.device_kind, "jax": jax.__version__,
           "chunk_size": int(cfg.loss.chunk_size), "remat": remat, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "flops_per_step": kd_step_flops(transformer.count_params(student_cfg), teacher_params,
                                           args.batch * args.seq, with_teacher=cache is None),
           "student_layers": student_cfg.num_hidden_layers, "teacher_layers": teacher_layers}
    if teacher_params and cache is None:
        from fa_jax import quant

        out["teacher_weight_bytes"] = quant.param_bytes(teacher)
    out["matmul_gflops"] = matmul_rate()
    peak = peak_flops_per_device(None)
    if peak:
        out["peak_flops"] = peak
    if dev.platform == "gpu":
        stats = dev.memory_stats() or {}
        out["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    return out


# ------------------------------------------------------------------------------------------ torch workers


def bench_torch(args, compiled: bool) -> dict:
    import copy

    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import AutoModelForCausalLM

    from fa_jax.embedded import resolve_model_path

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    path = resolve_model_path(TEACHER)
    teacher = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                   dtype=torch.float32)
    teacher.config.use_cache = False
    teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher)
    student.model.layers = nn.ModuleList(list(student.model.layers)[::2])
    student.config.num_hidden_layers = len(student.model.layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = student.config.layer_types[::2]
    for i, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = i
    student = get_peft_model(student, LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, target_modules="all-linear",
                                                 lora_dropout=0.0))
    teacher.to(device)
    student.to(device).train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

    def student_loss(input_ids, labels, mask, t_logits):
        s_logits = student(input_ids=input_ids, use_cache=False).logits.float()
        ls = F.log_softmax(s_logits / TEMPERATURE, dim=-1)
        lt = F.log_softmax(t_logits.float() / TEMPERATURE, dim=-1)
        m = mask.float()
        n = m.sum().clamp(min=1.0)
        kd = (F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1) * m).sum() / n
        ce = F.cross_entropy(s_logits.flatten(0, 1), labels.masked_fill(mask == 0, -100).flatten(),
                             ignore_index=-100, reduction="sum") / n
        return ALPHA * TEMPERATURE ** 2 * kd + (1 - ALPHA) * ce, kd.detach(), ce.detach()

    loss_fn = torch.compile(student_loss) if compiled else student_loss
    n_steps = 1 + args.warmup + args.steps
    batches = [{k: torch.from_numpy(v).long().to(device) for k, v in b.items()}
               for b in make_batches(n_steps, args.batch, args.seq, teacher.config.vocab_size, args.seed)]
    load_s = time.perf_counter() - t0
    rss_after_load = reset_peak_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times, first, load = [], None, OtherLoad()
    for i, b in enumerate(batches):
        if i == 1 + args.warmup:
            peak_first = clear_peak()  # the peak of the compile/first and warm-up steps
            load.__enter__()
        t = time.perf_counter()
        with torch.no_grad():
            t_logits = teacher(input_ids=b["tokens"], use_cache=False).logits
        loss, kd, ce = loss_fn(b["tokens"], b["labels"], b["mask"], t_logits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == 0:
            first = {"loss": loss.item(), "kd": kd.item(), "lm": ce.item()}
        sync()
        times.append(time.perf_counter() - t)
        del t_logits, loss
    load.__exit__()
    out = {"load_s": load_s, "first_step_s": times[0], "step_s": times[1 + args.warmup:], "other_load": load.cores,
           "first_loss": first["loss"], "first_kd": first["kd"], "first_lm": first["lm"],
           "rss_after_load_kb": rss_after_load, "peak_rss_kb": max(peak_first, _status_kb("VmHWM")),
           "peak_rss_steady_kb": _status_kb("VmHWM"),
           "platform": device.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "trainable_params": sum(p.numel() for p in params)}
    if device.type == "cuda":
        out["device_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def worker(args) -> None:
    if args.worker == "build_cache":
        result = build_cache(args)
    elif args.worker.startswith("fa_jax"):
        result = bench_fa_jax(args, args.worker)
    elif args.worker == "torch_eager":
        result = bench_torch(args, compiled=False)
    else:
        cache = tempfile.mkdtemp(prefix="bench_inductor_")  # a fresh cache: the compile is cold every time
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            result = bench_torch(args, compiled=True)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    result["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")
    with open(args.result, "w") as f:
        json.dump(result, f)


# ------------------------------------------------------------------------------------------ the driver


def run_variant(args, variant: str, round_index: int) -> dict:
    """One subprocess run of a variant; rerun (up to --retries times) when other processes loaded the machine
    during its timed steps by more than --max-other-load cores."""
    for attempt in range(1 + args.retries):
        if args.wait_idle > 0:
            wait_for_idle(args.wait_idle)
        r = _run_once(args, variant, round_index)
        if r["other_load"] <= args.max_other_load:
            break
        if attempt < args.retries:
            print(f"  round {round_index + 1} {LABELS[variant]}: other processes used {r['other_load']:.2f} cores "
                  f"during the timed steps: run again", flush=True)
    r["attempts"] = attempt + 1
    return r


def _run_once(args, variant: str, round_index: int) -> dict:
    root, script, worker_variant = ROOT, os.path.abspath(__file__), variant
    if variant == "fa_jax_baseline":  # the revision's own package and benchmark worker
        root = args.baseline_dir
        script, worker_variant = os.path.join(root, "scripts", "bench_kd_step.py"), "fa_jax"
    env = dict(os.environ, GLIBC_TUNABLES=TUNABLES, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    fd, result = tempfile.mkstemp(prefix=f"bench_{variant}_", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, script, "--worker", worker_variant, "--result", result,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--seq", str(args.seq), "--seed", str(args.seed), "--chunk-size", str(args.chunk_size or 0),
           "--remat", args.remat, "--cache-dir", args.cache_dir or ""]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    try:
        if proc.returncode:
            raise RuntimeError(f"{variant} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                               f"{proc.stderr[-4000:]}")
        with open(result) as f:
            r = json.load(f)
    finally:
        os.unlink(result)
    r["wall_s"] = wall
    r["tokens_per_s"] = args.batch * args.seq * len(r["step_s"]) / sum(r["step_s"])
    print(f"  round {round_index + 1} {LABELS[variant]:<14} {r['tokens_per_s']:7.1f} tokens/s  "
          f"steps {' '.join(f'{s:.2f}' for s in r['step_s'])} s  first step {r['first_step_s']:.1f} s  "
          f"peak RSS {r['peak_rss_kb'] / 2**20:.2f} GiB  other load {r['other_load']:.2f} cores  "
          f"(process {wall:.0f} s)", flush=True)
    return r


def summarize(args, runs: dict) -> dict:
    tokens = args.batch * args.seq
    summary = {}
    for v, rs in runs.items():
        tps = [r["tokens_per_s"] for r in rs]
        summary[v] = {"tokens_per_s_median": statistics.median(tps), "tokens_per_s_rounds": tps,
                      "step_s_median": tokens / statistics.median(tps),
                      "peak_rss_gib_max": max(r["peak_rss_kb"] for r in rs) / 2**20,
                      "peak_rss_gib_rounds": [r["peak_rss_kb"] / 2**20 for r in rs],
                      "peak_rss_steady_gib_max": max(r["peak_rss_steady_kb"] for r in rs) / 2**20,
                      "rss_after_load_gib": statistics.median(r["rss_after_load_kb"] for r in rs) / 2**20,
                      "first_step_s_median": statistics.median(r["first_step_s"] for r in rs),
                      "load_s_median": statistics.median(r["load_s"] for r in rs),
                      "other_load_max": max(r["other_load"] for r in rs),
                      "first_loss": rs[0]["first_loss"], "first_kd": rs[0]["first_kd"],
                      "first_lm": rs[0]["first_lm"]}
        if "device_peak_bytes" in rs[0] and rs[0]["device_peak_bytes"] is not None:
            summary[v]["device_peak_gib"] = max(r["device_peak_bytes"] for r in rs) / 2**30
    return summary


def ratios(summary: dict) -> dict:
    out = {}
    j = summary.get("fa_jax")
    if j and "torch_eager" in summary:
        e = summary["torch_eager"]
        out["tokens_vs_eager"] = j["tokens_per_s_median"] / e["tokens_per_s_median"]
        out["memory_vs_eager"] = j["peak_rss_gib_max"] / e["peak_rss_gib_max"]
        out["steady_memory_vs_eager"] = j["peak_rss_steady_gib_max"] / e["peak_rss_steady_gib_max"]
    if j and "torch_compile" in summary:
        out["tokens_vs_compile"] = j["tokens_per_s_median"] / summary["torch_compile"]["tokens_per_s_median"]
    for other, key in (("fa_jax_baseline", "vs_baseline"), ("fa_jax_scan", "scan_vs_unrolled"),
                       ("fa_jax_cache", "cache_vs_live"), ("fa_jax_int8", "int8_vs_live")):
        o = summary.get(other)
        if j and o:
            num, den = (j, o) if other == "fa_jax_baseline" else (o, j)
            out[f"tokens_{key}"] = num["tokens_per_s_median"] / den["tokens_per_s_median"]
            out[f"memory_{key}"] = num["peak_rss_gib_max"] / den["peak_rss_gib_max"]
            if "torch_eager" in summary:
                eager = summary["torch_eager"]["tokens_per_s_median"]
                out[f"{other}_tokens_vs_eager"] = o["tokens_per_s_median"] / eager
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant and round (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the variants (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (compiling) step")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=0,
                   help="fa_jax loss.chunk_size (0: the value of configs/pretrain_smollm2.py)")
    p.add_argument("--remat", default="config",
                   help="fa_jax model.remat (default: the value of configs/pretrain_smollm2.py, else the default)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated subset of " + ",".join(VARIANTS) + " (default: " + ",".join(DEFAULT_VARIANTS)
                   + ")")
    p.add_argument("--baseline", metavar="REV", help="git revision of the fa_jax_baseline variant (e.g. main~3)")
    p.add_argument("--wait-idle", type=float, default=600, metavar="S",
                   help="before each run wait up to S seconds until other processes use < 0.15 cores (0: never)")
    p.add_argument("--max-other-load", type=float, default=0.2, metavar="CORES",
                   help="rerun a variant whose timed steps shared the machine with more than this load")
    p.add_argument("--retries", type=int, default=2, help="reruns allowed per variant and round (default 2)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--worker", choices=VARIANTS + ("build_cache",), help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants or args.steps < 1 or args.rounds < 1:
        p.error(f"--variants {args.variants!r} / --steps / --rounds: expected a subset of {VARIANTS} and counts >= 1")
    if "fa_jax_baseline" in variants and not args.baseline:
        p.error("the fa_jax_baseline variant needs --baseline REV")
    args.baseline_dir = None
    if "fa_jax_baseline" in variants:
        args.baseline_dir = tempfile.mkdtemp(prefix="bench_baseline_")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", args.baseline_dir, args.baseline],
                       check=True, capture_output=True)
        rev = subprocess.run(["git", "-C", args.baseline_dir, "rev-parse", "--short", "HEAD"], check=True,
                             capture_output=True, text=True).stdout.strip()
        print(f"baseline: {args.baseline} = {rev}, in {args.baseline_dir}")

    start, t_start = datetime.datetime.now().astimezone(), time.perf_counter()
    print(f"KD step benchmark  {start:%Y-%m-%d %H:%M %Z}  host {platform.node()}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}")
    print(f"setting: teacher SmolLM2-135M-Instruct (30 layers, GGUF dequantized to float32), student = every other "
          f"layer (15, frozen), LoRA r {RANK} alpha {LORA_ALPHA:g} all-linear, batch {args.batch} x {args.seq} "
          f"tokens, float32, loss {ALPHA} * forward KL (T={TEMPERATURE:g}) + {1 - ALPHA} * CE, AdamW (lr {LR:g}, "
          f"clip 1.0, wd 0)")
    print(f"method: each variant in its own subprocess with GLIBC_TUNABLES={TUNABLES}, torch.set_num_threads(2); "
          f"{args.rounds} interleaved rounds (order rotates); per run 1 compile/first step + {args.warmup} warm-up "
          f"untimed, {args.steps} timed steps; peak memory = VmHWM after `echo 5 > /proc/self/clear_refs` once "
          f"the models were loaded (peak RSS from there on: compile/first step and training steps, models "
          f"included); each run waits for the machine to be idle and is rerun when other processes used > "
          f"{args.max_other_load} cores during its timed steps", flush=True)

    cache_info = None
    if "fa_jax_cache" in variants:
        args.cache_dir = tempfile.mkdtemp(prefix="bench_teacher_cache_")
        fd, result = tempfile.mkstemp(prefix="bench_cache_", suffix=".json")
        os.close(fd)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "build_cache", "--result",
                               result, "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch",
                               str(args.batch), "--seq", str(args.seq), "--seed", str(args.seed), "--chunk-size",
                               str(args.chunk_size or 0), "--cache-dir", args.cache_dir],
                              env=dict(os.environ, GLIBC_TUNABLES=TUNABLES), capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"writing the teacher cache failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        with open(result) as f:
            cache_info = json.load(f)
        os.unlink(result)
        print(f"teacher cache written: {cache_info['bytes'] / 2**20:.1f} MiB, {cache_info['build_s']:.0f} s",
              flush=True)

    runs = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            runs[v].append(run_variant(args, v, r))

    summary = summarize(args, runs)
    rat = ratios(summary)
    meta = runs.get("fa_jax", [{}])[0]
    tokens = args.batch * args.seq
    print()
    on_gpu = meta.get("platform") == "gpu"
    if meta:
        print(f"fa_jax device: {meta['platform']} ({meta['device_kind']}), jax {meta['jax']}, loss chunk_size "
              f"{meta['chunk_size']}, remat {meta['remat']}, XLA_FLAGS {meta.get('xla_flags') or '(none)'}; "
              f"model FLOPs per step "
              f"{meta['flops_per_step'] / 1e12:.3f} TFLOP")
    tmeta = (runs.get("torch_eager") or runs.get("torch_compile") or [{}])[0]
    if tmeta:
        print(f"torch {tmeta['torch']} on {tmeta['platform']}, {tmeta['threads']} threads, "
              f"{tmeta['trainable_params']:,} trainable LoRA parameters")

    # The same computation? First-step losses on the same batch (LoRA B = 0: the base student's loss).
    check = {}
    if "fa_jax" in summary:
        for tv in ("torch_eager", "torch_compile"):
            if tv in summary:
                a, b = summary["fa_jax"]["first_loss"], summary[tv]["first_loss"]
                check[tv] = abs(a - b) / abs(b)
                print(f"first-step loss on the same batch: fa_jax {a:.6f} (kd {summary['fa_jax']['first_kd']:.6f}, "
                      f"lm {summary['fa_jax']['first_lm']:.6f})  {LABELS[tv]} {b:.6f} (kd {summary[tv]['first_kd']:.6f}"
                      f", lm {summary[tv]['first_lm']:.6f})  relative difference {check[tv]:.1e} "
                      f"[{'OK' if check[tv] <= 1e-3 else 'MISMATCH'} at 1e-3]")

    print()
    head = (f"{'variant':<15}{'tokens/s':>10}{'per round':>20}{'s/step':>8}{'peak RSS GiB':>14}"
            f"{'steady peak':>13}{'after load':>12}{'first step s':>14}{'other load':>12}")
    if on_gpu:
        head += f"{'MFU':>8}{'dev GiB':>9}"
    print(head)
    print("-" * len(head))
    for v in variants:
        s = summary[v]
        line = (f"{LABELS[v]:<15}{s['tokens_per_s_median']:>10.1f}"
                f"{' / '.join(f'{x:.1f}' for x in s['tokens_per_s_rounds']):>20}{s['step_s_median']:>8.2f}"
                f"{s['peak_rss_gib_max']:>14.2f}{s['peak_rss_steady_gib_max']:>13.2f}"
                f"{s['rss_after_load_gib']:>12.2f}{s['first_step_s_median']:>14.1f}{s['other_load_max']:>12.2f}")
        if on_gpu and meta.get("peak_flops"):
            s["mfu"] = s["tokens_per_s_median"] / tokens * meta["flops_per_step"] / meta["peak_flops"]
            line += f"{100 * s['mfu']:>7.1f}%{s.get('device_peak_gib', float('nan')):>9.2f}"
        print(line)
    print("(tokens/s: median over rounds; peak RSS: VmHWM from after loading (compile and first step included), the "
          "largest over rounds; steady peak: VmHWM of the timed steps only; after load: RSS when the peak was reset; "
          "first step: includes the compilation "
          "(torch.compile: cold, fresh inductor cache), excluded from tokens/s; other load: the most cores other "
          "processes used during a run's timed steps)")
    names = {"tokens_vs_eager": "fa_jax / torch eager tokens/s", "tokens_vs_compile": "fa_jax / torch.compile tokens/s",
             "memory_vs_eager": "fa_jax / torch eager peak memory",
             "steady_memory_vs_eager": "  (timed steps only)"}
    for k in ("tokens_vs_eager", "tokens_vs_compile", "memory_vs_eager", "steady_memory_vs_eager"):
        if k == "steady_memory_vs_eager" and k in rat:
            print(f"{names[k]:<34}{rat[k]:6.2f}x")
        elif k in rat:
            ok = rat[k] <= TARGETS[k] if k.startswith("memory") else rat[k] >= TARGETS[k]
            rel = "<=" if k.startswith("memory") else ">="
            print(f"{names[k]:<34}{rat[k]:6.2f}x   target {rel} {TARGETS[k]}x  {'met' if ok else 'MISSED'}")
    if meta and meta.get("matmul_gflops"):
        rates = [r["matmul_gflops"] for r in runs["fa_jax"]]
        mm = statistics.median(rates)
        fa = summary["fa_jax"]["tokens_per_s_median"] / tokens * meta["flops_per_step"] / 1e9
        floor = meta["flops_per_step"] / 1e9 / mm
        print(f"fa_jax runs at {fa:.0f} GFLOP/s of model FLOPs, {100 * fa / mm:.0f}% of this machine's float32 matmul "
              f"rate measured in the same runs ({' / '.join(f'{x:.0f}' for x in rates)} GFLOP/s); at that rate a "
              f"step takes at least {floor:.2f} s, i.e. at most {tokens / floor:.0f} tokens/s for any implementation"
              + (f" = {tokens / floor / summary['torch_eager']['tokens_per_s_median']:.2f}x torch eager"
                 if "torch_eager" in summary else ""))
    for key, text in (("tokens_vs_baseline", "fa_jax / baseline tokens/s"),
                      ("memory_vs_baseline", "fa_jax / baseline peak memory"),
                      ("fa_jax_baseline_tokens_vs_eager", "baseline / torch eager tokens/s"),
                      ("tokens_scan_vs_unrolled", "scan / unrolled tokens/s"),
                      ("memory_scan_vs_unrolled", "scan / unrolled peak memory"),
                      ("fa_jax_scan_tokens_vs_eager", "scan / torch eager tokens/s"),
                      ("tokens_cache_vs_live", "cache / live teacher tokens/s"),
                      ("memory_cache_vs_live", "cache / live teacher peak memory"),
                      ("tokens_int8_vs_live", "int8 / float32 teacher tokens/s"),
                      ("memory_int8_vs_live", "int8 / float32 teacher peak memory")):
        if key in rat:
            target = (f"   target >= {TARGETS[key]}x  {'met' if rat[key] >= TARGETS[key] else 'MISSED'}"
                      if key in TARGETS else "")
            print(f"{text:<34}{rat[key]:6.2f}x{target}")
    if cache_info:
        print(f"teacher cache (top {CACHE_K}, {CACHE_DTYPE}): {cache_info['bytes_per_token']:.1f} bytes per token "
              f"on disk; written in {cache_info['build_s']:.0f} s (teacher load and compile included) for "
              f"{1 + args.warmup + args.steps} batches; the top {CACHE_K} hold "
              f"{100 * cache_info['mean_topk_mass']:.2f}% of the teacher's probability on average (random tokens)")
    weights = {v: runs[v][0].get("teacher_weight_bytes") for v in ("fa_jax", "fa_jax_int8") if v in runs}
    if all(weights.values()) and len(weights) == 2:
        print(f"teacher weights in memory: float32 {weights['fa_jax'] / 2**20:.0f} MiB, int8 "
              f"{weights['fa_jax_int8'] / 2**20:.0f} MiB")
    if args.baseline_dir:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", args.baseline_dir], capture_output=True)
    if args.cache_dir:
        shutil.rmtree(args.cache_dir, ignore_errors=True)
    total = time.perf_counter() - t_start
    print(f"total run time of the benchmark: {total:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": start.isoformat(), "host": platform.node(), "cpu": cpu_name(), "cpus": os.cpu_count(),
                       "glibc_tunables": TUNABLES, "batch": args.batch, "seq": args.seq, "steps": args.steps,
                       "rounds": args.rounds, "warmup": args.warmup, "summary": summary, "ratios": rat,
                       "targets": TARGETS, "loss_check_relative": check, "runs": runs, "total_s": total,
                       "teacher_cache": cache_info}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
