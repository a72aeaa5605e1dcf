#!/usr/bin/env bash
# Set up .venv (if needed) and run the default test suite. Extra arguments go to pytest.
# Slow tests are marked `slow` and skipped here; run them with: bash scripts/test.sh -m slow
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
exec .venv/bin/python -m pytest -q --durations=25 "$@"
