"""The README's Python example runs as written (on a tiny checkpoint), so it cannot rot."""
import os
import re

from helpers import save_hf_model

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_python_example(tmp_path):
    save_hf_model("llama3", tmp_path / "model")
    code = re.search(r"## In Python\n\n```python\n(.*?)```", open(README).read(), re.S).group(1)
    assert len(code.splitlines()) <= 22
    code = code.replace("path/to/hf_dir", str(tmp_path / "model")).replace('"out/', f'"{tmp_path}/out/')
    exec(compile(code, "README.md", "exec"), {})
    assert os.path.exists(tmp_path / "out" / "adapter" / "adapter_config.json")
    assert os.path.exists(tmp_path / "out" / "merged" / "model.safetensors")
