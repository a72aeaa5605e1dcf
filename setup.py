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
    # what fa_jax imports at run time, with the oldest version of each that has the APIs it calls
    install_requires=[
        "jax>=0.7.1",  # jax.set_mesh (sharding.mesh_context)
        "flax>=0.10",  # Linen modules, nn.scan / nn.remat lifting, nn.with_logical_partitioning
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "etils",  # epath: orbax's paths (checkpoint.py)
        "numpy",
        "transformers>=4.46",  # tokenizers and chat templates only; fa_jax owns the model code
        "datasets",
        "pyarrow",  # parquet and JSON record files (data.py)
        "gguf>=0.10",
        "tqdm",
        "matplotlib",
        "tensorboardX",  # TensorBoard event files without TensorFlow
        "rouge-score",  # ROUGE-L of fa_jax.evaluate (fa-jax eval)
    ],
    extras_require={
        # torch first and pinned: 2.13.0 is the local CPU wheel (see README, "Developing").
        "test": ["pytest", "torch==2.13.0", "lm-eval", "peft", "safetensors",
                 "nbclient", "nbformat", "ipykernel"],  # nbclient & co.: tests/test_notebook.py runs the quickstart
        "eval": ["lm-eval"],  # fa_jax.lm_eval_bridge: lm-evaluation-harness tasks on fa_jax models
        "tfds": ["tensorflow-datasets"],
        # `fa-jax compile`: the TPU compiler (libtpu, the version jax[tpu] pins for the installed jax) compiles for
        # TPU topologies on a machine without TPUs; on a TPU VM the same extra runs the programs
        "tpu": ["jax[tpu]"],
    },
    entry_points={"console_scripts": ["fa-jax=fa_jax.cli:main"]},
)
