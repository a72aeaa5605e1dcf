"""Tiny random Hugging Face checkpoints built with transformers (PyTorch, CPU), and comparison helpers."""
from __future__ import annotations

import numpy as np
import torch
import transformers

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**TINY, tie_word_embeddings=False,
                                              rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}),
    # Llama 3.1/3.2 style: llama3 rope scaling, tied embeddings (as in SmolLM2 and Llama-3.2-1B)
    "llama3": lambda: transformers.LlamaConfig(**TINY, tie_word_embeddings=True, rope_parameters={
        "rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=5, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=False),
    "gemma": lambda: transformers.GemmaConfig(**{**TINY, "head_dim": 16}, tie_word_embeddings=True),
}


def make_hf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = FAMILIES[family]()
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms and biases away from their init so that mistakes in them show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf_model(family: str, path, seed: int = 0):
    model = make_hf_model(family, seed)
    model.save_pretrained(str(path))
    return model


def hf_logits(model, tokens, mask=None, positions=None):
    with torch.no_grad():
        kw = {}
        if mask is not None:
            kw["attention_mask"] = torch.tensor(np.asarray(mask))
        if positions is not None:
            kw["position_ids"] = torch.tensor(np.asarray(positions))
        return model(input_ids=torch.tensor(np.asarray(tokens)), **kw).logits.float().numpy()


def save_tiny_tokenizer(path, vocab_size: int = 256):
    """A word-level tokenizer with at most `vocab_size` ids (fits the tiny models), saved as a transformers
    PreTrainedTokenizerFast into `path` (next to a tiny model, so fa_jax.load_tokenizer finds it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = ("the a of and to in is was that it for on with as by at be this from or an are which but not his "
             "had have her they you one all were we there been has their more when will would who so no if out "
             "what up about into than them can only other new some time could these two may then do first any "
             "my now such like our over man me even most made after also did many before must through back "
             "years where much your way well down should because each just those people how too little state "
             "good very make world still own see men work long get here between both life being under never day "
             "same another know while last might us great old year off come since against go came right used take "
             "three hacker program system computer word text line user code data file time name").split()
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator([" ".join(words)] * 2, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(str(path))
    return fast


def write_corpus(path, n_docs: int = 40, seed: int = 0, max_words: int = 60):
    """A plain-text corpus of `n_docs` paragraphs of the tiny tokenizer's words."""
    rng = np.random.RandomState(seed)
    tok_words = "the a of and to in is was that it for on with as by hacker program system computer".split()
    paras = [" ".join(rng.choice(tok_words, rng.randint(3, max_words))) + "." for _ in range(n_docs)]
    with open(path, "w") as f:
        f.write("\n\n".join(paras) + "\n")
    return str(path)


def left_padded(seed=0, B=2, T=9):
    """Random tokens [B, T] of the tiny vocabulary and a mask with row 1 left-padded by 3."""
    rng = np.random.RandomState(seed)
    toks = rng.randint(3, 256, (B, T))
    mask = np.ones((B, T), np.int32)
    mask[1, :3] = 0
    return toks, mask
