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
if [ "$#" -gt 0 ]; then
  echo "[test] pytest $*"
  exec .venv/bin/python -m pytest -ra --durations=15 "$@"
fi
# Unit and integration tests mostly wait on their servers (leases, grace periods, restarts): they run
# on three workers, a module per worker (its module-scoped servers stay one). The datapath and the
# labs load both CPUs and time client loops: they run alone, after.
status=0
echo "[test] pytest tests/unit tests/integration (3 workers)"
.venv/bin/python -m pytest -ra --durations=15 -n 3 --dist loadscope tests/unit tests/integration || status=$?
echo "[test] pytest tests/datapath tests/e2e"
.venv/bin/python -m pytest -ra --durations=15 tests/datapath tests/e2e || status=$?
[ "$status" -eq 0 ] && echo "[test] every tier passed" || echo "[test] FAILED (see the summaries above)"
exit "$status"
