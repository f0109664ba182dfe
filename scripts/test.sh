#!/usr/bin/env bash
# The test command: set the machine up (idempotent, cached), lint, run every tier.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -k schema
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
echo
echo "[test] ruff check"
.venv/bin/ruff check .
echo "[test] mypy (strict on the core modules listed in pyproject.toml)"
.venv/bin/mypy
echo "[test] pytest"
exec .venv/bin/python -m pytest -ra --durations=15 "${@:-tests}"
