#!/usr/bin/env bash
# Set up (scripts/setup.sh: venv, torch, the project), lint (ruff check + ruff format --check) and
# run the whole test suite.
#
#   bash scripts/test.sh                 # everything under tests/
#   bash scripts/test.sh -k exactly_once # extra arguments go to pytest
#
# Exits with pytest's status: non-zero on any failure, and 5 when no test ran.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
export VENV

bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
# Lint and format first: style is part of the build (configured in pyproject.toml).
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
exec "$VENV/bin/python" -m pytest -q "$@"
