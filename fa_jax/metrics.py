"""Training metrics: a JSONL file, TensorBoard event files, a progress bar, and PNG curves at the end.

Only process 0 writes; every process may call the methods.
"""
from __future__ import annotations

import json
import os

import jax
from tqdm.auto import tqdm

from fa_jax.io.atomic import write_text

# Dense bf16 peak FLOP/s per device, for the model-FLOPs-utilisation estimate (vendor figures, no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "V100": 125e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def peak_flops_per_device(override: float | None = None) -> float | None:
    if override:
        return float(override)
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None  # CPUs and unknown devices: MFU is not reported


def kd_step_flops(student_params: int, teacher_params: int, tokens: int, with_teacher: bool = True) -> float:
    """Model FLOPs of one KD step, matmul terms only: the frozen student runs forward (2N) and backward to its
    activations (2N; no weight gradients), the teacher forward only (2N); adapter FLOPs are negligible."""
    return tokens * (4.0 * student_params + (2.0 * teacher_params if with_teacher else 0.0))


class MetricsLogger:
    def __init__(self, out_dir: str, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 desc: str = "train"):
        self.out_dir = out_dir
        self.main = jax.process_index() == 0
        self.history: list[dict] = []
        self.tb = None
        if self.main:
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, "metrics.jsonl")
            # A resumed run replays the steps after its checkpoint: their old records go, the earlier ones stay
            # (and are plotted with the new ones).
            self.history = [r for r in read_history(out_dir) if r.get("step", 0) <= start_step]
            if os.path.exists(path):
                write_text(path, "".join(json.dumps(r) + "\n" for r in self.history))
            self.jsonl = open(path, "a")
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter  # lazy: 2 s to import, only with run.tensorboard

                    self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
                except ImportError:
                    self.tb = None
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", disable=not self.main,
                        dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self.history.append(record)
        if not self.main:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, step)
        shown = {k: record[k] for k in ("loss", "kd", "lm", "agreement", "tokens_per_s") if k in record}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self, plot_keys=("loss", "kd", "lm")) -> str | None:
        self.bar.close()
        if not self.main:
            return None
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        return plot_curves(self.history, os.path.join(self.out_dir, "loss_curve.png"), plot_keys)


def read_history(out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by a kill mid-write
                continue
    return [r for r in out if isinstance(r, dict)]


def plot_curves(history: list[dict], path: str, keys=("loss", "kd", "lm"), title: str = "training") -> str | None:
    """One PNG with a line per metric against the step; None when there is nothing to plot."""
    rows = [r for r in history if any(k in r for k in keys)]
    if not rows:
        return None
    import matplotlib  # lazy: about a second to import, needed for the plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        if pts:
            ax.plot(*zip(*pts), label=k, marker="." if len(pts) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
