#!/usr/bin/env bash
# Fresh machine → lint (ruff), type check (mypy) and the whole test suite (pytest).
# Integration tests need Redis, PostgreSQL and MariaDB on 127.0.0.1 (see README); extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
.venv/bin/pip install -q -e ".[test]"
echo "== ruff"; .venv/bin/ruff check src tests bench
echo "== ruff format"; .venv/bin/ruff format --check src tests bench
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/python -m pytest "$@"
