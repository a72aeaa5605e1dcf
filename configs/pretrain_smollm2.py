"""Foundation-adapter pre-training on the embedded model: SmolLM2-135M-Instruct (30 layers) teaches a student made of
every other of its layers (15, frozen) with LoRA r 8 on all linear layers; a = 0.5 (the seed's setting).

    fa-jax pretrain --config configs/pretrain_smollm2.py data.train=data/text/train.txt
"""


def get_config():
    return {
        # remat "full": the student's layers are recomputed in the backward pass; in scripts/bench_kd_step.py on the
        # 2-core CPU this took peak memory from 0.81x to 0.55x of PyTorch eager at the same speed (README)
        "model": {"teacher": "embedded:smollm2-135m-instruct", "student": None, "keep_layers": "every_other",
                  "remat": "full"},
        "adapter": {"rank": 8, "alpha": 16.0, "targets": "all-linear"},
        "loss": {"alpha": 0.5, "temperature": 1.0, "chunk_size": 64},
        "data": {"train": "data/text/train.txt", "seq_len": 256, "batch_size": 4},
        "optim": {"lr": 1e-3, "warmup_steps": 10, "schedule": "cosine"},
        "run": {"steps": 100, "out_dir": "runs/pretrain_smollm2", "log_every": 10, "save_every": 50},
    }
