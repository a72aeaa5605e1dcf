"""The seed's setting: Llama-3.1-8B-Instruct teaches Llama-3.2-1B (frozen) through LoRA on all linear layers,
L = 0.5 * KL(teacher || student) + 0.5 * CE. Ranks 8 / 32 / 64 / 128 were compared; r 64 here, change it with
adapter.rank=8 (and adapter.alpha=16) on the command line.

    fa-jax pretrain --config configs/pretrain_llama31_8b_to_llama32_1b.py \\
        model.teacher=/ckpt/Llama-3.1-8B-Instruct model.student=/ckpt/Llama-3.2-1B data.train=/data/corpus.jsonl

On a TPU pod slice or a multi-GPU host run one process per host (scripts/launch_tpu_pod.sh); the mesh below puts
the batch over data x fsdp and shards both models' weights over fsdp (ZeRO-3 style): the 16 GB bf16 teacher is
2 GB per chip on 8 chips. As it stands the config is the v5e-8 setting; check any target before paying for it:

    fa-jax compile --config configs/pretrain_llama31_8b_to_llama32_1b.py --topology v5e-8

Settings per target (the README's table has what `fa-jax compile` measured for each):
    v5e-8   (8 x 16 GiB)   as is: FSDP over the 8 chips, 64 x 2048 tokens, remat full
    v6e-8   (8 x 32 GiB)   model.remat=mlp           (keeps the MLP's gate/up projections: no MLP recompute)
    v5p-8   (4 x 95 GiB)   model.remat=none          (FSDP over 4 chips, 16 rows each)
    v5e-256 (256 x 16 GiB) mesh.shape=[-1,8,1] data.batch_size=256 model.remat=none
                           (FSDP within each host's 8 chips, data parallel over the 32 hosts, 1 row per chip)
Attention is the Pallas splash kernel on TPU (model.attention=auto). model.scan_layers=true runs the layers under
nn.scan: on v5e-8 it compiled in 102 s instead of 410 s and needs 8.80 GiB per chip instead of 14.56 (README,
"Scanned layers").
"""


def get_config():
    return {
        "model": {"teacher": "/path/to/Llama-3.1-8B-Instruct", "student": "/path/to/Llama-3.2-1B",
                  "dtype": "bfloat16", "compute_dtype": "bfloat16", "remat": "full"},
        "adapter": {"rank": 64, "alpha": 128.0, "targets": "all-linear"},
        # chunk 64: the loss's float32 [rows, chunk, 128256] logits of both models are its largest arrays (0.98 GiB
        # each per chip at 8 rows x 256); fa-jax compile on v5e-8 measured the step's temporaries at 64 vs 256
        "loss": {"alpha": 0.5, "temperature": 1.0, "chunk_size": 64},
        "data": {"train": "/path/to/corpus.jsonl", "seq_len": 2048, "batch_size": 64},
        "optim": {"lr": 2e-4, "warmup_steps": 100, "schedule": "cosine", "clip_norm": 1.0},
        "mesh": {"shape": [1, -1, 1]},
        "run": {"steps": 10000, "out_dir": "runs/pretrain_llama31_8b_to_llama32_1b", "log_every": 20,
                "save_every": 500},
    }
