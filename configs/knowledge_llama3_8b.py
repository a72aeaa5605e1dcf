"""RE-Adapt's knowledge adapter (seed 004): DoRA on the *base* model (Llama-3-8B), language-modelling loss only, on
unlabeled domain text. Merged later with the instruct model's RE-Adapter (or LoRE-Adapter) at partial scales:

    fa-jax pretrain --config configs/knowledge_llama3_8b.py \\
        model.teacher=/ckpt/Meta-Llama-3-8B data.train=/data/domain/*.txt run.steps=STEPS
    fa-jax diff --base /ckpt/Meta-Llama-3-8B --tuned /ckpt/Meta-Llama-3-8B-Instruct --out re_adapter
    fa-jax merge --base /ckpt/Meta-Llama-3-8B --adapter runs/knowledge_llama3_8b:0.5 --adapter re_adapter:0.5 \\
        --tokenizer /ckpt/Meta-Llama-3-8B-Instruct --out merged
    fa-jax eval --model merged --qa questions.jsonl --out runs/eval_merged

With loss.alpha = 0 there is no distillation: `model.teacher` is only the model the adapter trains on (the student
defaults to it). `--tokenizer` gives the merged directory the instruct model's chat template, which `fa-jax eval
--qa` uses for the seed's prompts (Appendix B: a system turn for Llama-3).

From the seed, Appendix A, Table 4 ("Training details"): DoRA on all-linear layers, rank 64, alpha 128, dropout
0.05, batch size 20, AdamW, learning rate 0.0002, linear schedule. Section 5.4: partial adaptation with 0.5 for both
the knowledge adapter and the RE-/LoRE-Adapter "provides robust results across models and datasets", hence the
0.5 / 0.5 merge above (the README shows a sweep over both scales).

Readings taken where the seed is silent or ambiguous:
- Epochs, not steps: Table 4 trains 10 epochs on News Crawl (3 on RetrievalQA); fa_jax counts optimizer steps and
  repeats the data, so set run.steps = ceil(epochs * rows / 20), rows = the corpus's tokens / data.seq_len (the
  packed rows one pass yields). The 2000 below is a placeholder for that number.
- Warm-up: Table 4 names none. The paper trains through Hugging Face (Trainer + PEFT), whose "linear" schedule
  (get_linear_schedule_with_warmup) has no warm-up unless asked, so warmup_steps = 0: 2e-4 at the first step,
  falling linearly to 0 at run.steps (end_lr_fraction 0).
- AdamW's other settings are not given: Trainer's defaults (betas 0.9 / 0.999, weight decay 0, gradient clipping at
  norm 1), which are fa_jax's defaults too.
- Sequence length is not given: 2048 tokens per row (Llama-3-8B reads 8192; News Crawl articles are mostly shorter).
- Batch size 20 is global rows per optimizer step (one A100 in the paper, no accumulation mentioned). The rows split
  over the mesh's data x fsdp devices, so 20 runs on 1, 2, 4 or 5 devices; on 8, use data.batch_size=24 or 16.
"""


def get_config():
    return {
        "model": {"teacher": "/path/to/Meta-Llama-3-8B", "dtype": "bfloat16", "compute_dtype": "bfloat16",
                  "remat": "full"},
        "adapter": {"kind": "dora", "rank": 64, "alpha": 128.0, "dropout": 0.05, "targets": "all-linear"},
        "loss": {"alpha": 0.0, "chunk_size": 256},
        "data": {"train": "/path/to/domain.txt", "seq_len": 2048, "batch_size": 20},
        "optim": {"lr": 2e-4, "warmup_steps": 0, "schedule": "linear", "end_lr_fraction": 0.0, "weight_decay": 0.0},
        "mesh": {"shape": [1, -1, 1]},
        "run": {"steps": 2000, "out_dir": "runs/knowledge_llama3_8b", "log_every": 20, "save_every": 500},
    }
