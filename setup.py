"""fa_jax: foundation adapters in JAX. See README.md."""
from setuptools import find_packages, setup

setup(
    name="fa_jax",
    version="0.1.0",
    description="Foundation adapters (LoRA & co.) pre-trained with knowledge distillation, in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fa_jax", "fa_jax.*"]),
    install_requires=[
        "jax>=0.4.35",
        "flax",
        "optax",
        "orbax-checkpoint",
        "numpy",
        "ml_dtypes",
        "transformers>=4.46",  # tokenizers and chat templates only; fa_jax owns the model code
        "tokenizers",
        "datasets",
        "safetensors",
        "gguf>=0.10",
        "tqdm",
        "matplotlib",
        "tensorboardX",  # TensorBoard event files without TensorFlow
        "rouge-score",  # ROUGE-L of fa_jax.evaluate (fa-jax eval)
    ],
    extras_require={
        # torch first and pinned: 2.13.0 is the local CPU wheel (see README, "Developing").
        "test": ["pytest", "torch==2.13.0", "lm-eval", "peft", "chex",
                 "nbclient", "nbformat", "ipykernel"],  # nbclient & co.: tests/test_notebook.py runs the quickstart
        "eval": ["lm-eval"],  # fa_jax.lm_eval_bridge: lm-evaluation-harness tasks on fa_jax models
        "tfds": ["tensorflow-datasets"],
        # `fa-jax compile`: the TPU compiler (libtpu, the version jax[tpu] pins for the installed jax) compiles for
        # TPU topologies on a machine without TPUs; on a TPU VM the same extra runs the programs
        "tpu": ["jax[tpu]"],
    },
    entry_points={"console_scripts": ["fa-jax=fa_jax.cli:main"]},
)
