"""The seed's setting: Llama-3.1-8B-Instruct teaches Llama-3.2-1B (frozen) through LoRA on all linear layers,
L = 0.5 * KL(teacher || student) + 0.5 * CE. Ranks 8 / 32 / 64 / 128 were compared; r 64 here, change it with
adapter.rank=8 (and adapter.alpha=16) on the command line.

    fa-jax pretrain --config configs/pretrain_llama31_8b_to_llama32_1b.py \\
        model.teacher=/ckpt/Llama-3.1-8B-Instruct model.student=/ckpt/Llama-3.2-1B data.train=/data/corpus.jsonl

On a TPU pod slice or a multi-GPU host run one process per host (scripts/launch_tpu_pod.sh); the mesh below puts
the batch over data x fsdp and shards both models' weights over fsdp (ZeRO-3 style).
"""


def get_config():
    return {
        "model": {"teacher": "/path/to/Llama-3.1-8B-Instruct", "student": "/path/to/Llama-3.2-1B",
                  "dtype": "bfloat16", "compute_dtype": "bfloat16", "remat": True},
        "adapter": {"rank": 64, "alpha": 128.0, "targets": "all-linear"},
        "loss": {"alpha": 0.5, "temperature": 1.0, "chunk_size": 256},
        "data": {"train": "/path/to/corpus.jsonl", "seq_len": 2048, "batch_size": 64},
        "optim": {"lr": 2e-4, "warmup_steps": 100, "schedule": "cosine", "clip_norm": 1.0},
        "mesh": {"shape": [1, -1, 1]},
        "run": {"steps": 10000, "out_dir": "runs/pretrain_llama31_8b_to_llama32_1b", "log_every": 20,
                "save_every": 500},
    }
