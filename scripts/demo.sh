#!/usr/bin/env bash
# The embedded default end to end: set up .venv (first run only), fetch English prose (first run only), then run
# the seed's ablation at small scale (fa_jax.ablation): pruned student / + CPT adapter / + CPT+KD adapter / teacher.
#   bash scripts/demo.sh                          # prose from Debian's jargon-text package
#   TEXT=/path/to/file.txt bash scripts/demo.sh   # any English text instead (no apt needed)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"  # also cds to the repository root

if [ -z "${TEXT:-}" ]; then
  TEXT="$(bash scripts/fetch_text.sh)"
fi
# 2 MB pages for XLA's large CPU scratch buffers: far fewer page faults, a faster forward on CPU.
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}"
exec .venv/bin/python scripts/demo.py --text "$TEXT" "$@"
