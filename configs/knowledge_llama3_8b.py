"""RE-Adapt's knowledge adapter: continued pre-training of a LoRA on the *base* model (Llama-3-8B) with the
language-modelling loss only, on unlabeled domain text. Merged later with the instruct model's RE-Adapter:

    fa-jax pretrain --config configs/knowledge_llama3_8b.py \\
        model.teacher=/ckpt/Meta-Llama-3-8B data.train=/data/domain/*.txt
    fa-jax diff --base /ckpt/Meta-Llama-3-8B --tuned /ckpt/Meta-Llama-3-8B-Instruct --out re_adapter
    fa-jax merge --base /ckpt/Meta-Llama-3-8B --adapter runs/knowledge_llama3_8b:1.0 --adapter re_adapter:0.5 \\
        --out merged

With loss.alpha = 0 there is no distillation: `model.teacher` is only the model the adapter trains on (the student
defaults to it). The seed trains these adapters with DoRA; LoRA r 64 is used here.
"""


def get_config():
    return {
        "model": {"teacher": "/path/to/Meta-Llama-3-8B", "dtype": "bfloat16", "compute_dtype": "bfloat16",
                  "remat": "full"},
        "adapter": {"rank": 64, "alpha": 128.0, "targets": "all-linear"},
        "loss": {"alpha": 0.0, "chunk_size": 256},
        "data": {"train": "/path/to/domain.txt", "seq_len": 2048, "batch_size": 32},
        "optim": {"lr": 2e-4, "warmup_steps": 50, "schedule": "cosine"},
        "mesh": {"shape": [1, -1, 1]},
        "run": {"steps": 2000, "out_dir": "runs/knowledge_llama3_8b", "log_every": 20, "save_every": 500},
    }
