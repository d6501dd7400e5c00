#!/usr/bin/env bash
# Fresh machine → the main job end to end on embedded defaults (no servers needed).
# Creates .venv, installs recloop, then runs `recloop demo` (extra arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
.venv/bin/pip install -q -e .
exec .venv/bin/recloop demo "$@"
