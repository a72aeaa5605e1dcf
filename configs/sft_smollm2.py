"""Downstream fine-tuning on the embedded model: the pruned SmolLM2 student of configs/pretrain_smollm2.py (every
other layer, frozen) with a LoRA r 8 on all linear layers, started from that run's foundation adapter.

    fa-jax sft --config configs/sft_smollm2.py data.train=task.jsonl init=foundation:runs/pretrain_smollm2
    fa-jax sft --config configs/sft_smollm2.py data.train=task.jsonl init=random      # the baseline
"""


def get_config():
    return {
        "init": "foundation:runs/pretrain_smollm2",
        "model": {"student": "embedded:smollm2-135m-instruct", "keep_layers": "every_other", "remat": "full"},
        "adapter": {"rank": 8, "alpha": 16.0, "targets": "all-linear"},
        "loss": {"alpha": 0.0, "chunk_size": 64},
        "data": {"train": "data/sft/train.jsonl", "seq_len": 256, "batch_size": 8, "pack": True},
        "optim": {"lr": 5e-4, "warmup_steps": 5, "schedule": "cosine"},
        "run": {"steps": 100, "out_dir": "runs/sft_smollm2", "log_every": 10, "save_every": 50},
    }
