#!/usr/bin/env bash
# The main job: set the machine up (idempotent, cached), bring up two meshed clusters,
# run the Star Wars failover demo, and keep the lab running until Ctrl-C.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/clustermesh" lab up --demo "$@"
