#!/usr/bin/env bash
# The main job: set the machine up (idempotent, cached), then bring the lab up.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/clustermesh" lab up "$@"
