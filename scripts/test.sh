#!/usr/bin/env bash
# Set up (scripts/setup.sh: venv, torch, the project), build the cluster tier's control plane, lint
# (ruff check + ruff format --check) and run the whole test suite.
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
# The cluster tier's Kubernetes control plane, built from Go modules (tests/support/control_plane.py):
# about 20 minutes the first time on 2 cores, then cached outside the clone. Built here, not inside a
# test, so that no test's timeout covers the build; a missing Go or module fails the run.
"$VENV/bin/python" -m tests.support.control_plane build
# Lint and format first: style is part of the build (configured in pyproject.toml).
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
exec "$VENV/bin/python" -m pytest -q "$@"
