"""Readers and writers: Hugging Face directories, GGUF files, PEFT adapters, safetensors."""
