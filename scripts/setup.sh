#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the project into it.
#
#   bash scripts/setup.sh        # scripts/test.sh and scripts/demo.sh call this first
#
# Steps, each skipped when already done:
#   1. pick a Python >= 3.10 and < 3.13 (gcs-torch-dataflux needs < 3.13), preferring 3.11;
#   2. create the venv (default .venv; override with VENV=PATH);
#   3. install torch FIRST, pinned (TORCH_SPEC, default torch==2.13.0). On the project's
#      machines that release lies on local disk as a CPU build; letting the project's
#      "torch>=2.11" pull torch instead would download a multi-GB CUDA build;
#   4. pip install -e '.[test]' (the test extra also holds the GCS emulator the demo uses);
#   5. Debian's Chromium, for the test that renders the HTML report in a real browser: installed
#      with apt-get when missing and this runs as root (elsewhere it says how, and that test skips).
# Environment: PYTHON=/path/to/python picks the interpreter; TORCH_SPEC='torch==X' another torch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
STAMP="$VENV/.kfp-batch-inference-setup"

say() { printf '[setup] %s\n' "$*" >&2; }

# Step 5, first: it does not depend on the venv, and the early exit below must not skip it.
ensure_chromium() {
    if command -v chromium >/dev/null 2>&1 || [[ -x /usr/bin/chromium ]]; then
        return 0
    fi
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing Debian's chromium (the report's browser test renders with it)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null \
            || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive \
                 apt-get install -y --no-install-recommends chromium >/dev/null; }
    else
        say "no chromium: install it (sudo apt-get install chromium) or the report's browser test skips"
    fi
}
ensure_chromium

# Exit 0 when "$1" runs and is a Python in [3.10, 3.13) with venv support.
python_ok() {
    "$1" - <<'PY' >/dev/null 2>&1
import sys, venv, ensurepip  # noqa: F401 - venv and ensurepip must exist to build a venv
sys.exit(0 if (3, 10) <= sys.version_info[:2] < (3, 13) else 1)
PY
}

pick_python() {
    local candidate
    if [[ -n "${PYTHON:-}" ]]; then
        python_ok "$PYTHON" || { say "PYTHON=$PYTHON is not a usable Python >= 3.10, < 3.13"; return 1; }
        echo "$PYTHON"; return 0
    fi
    # 3.11 first: the CPU torch build on local disk is for CPython 3.11.
    for candidate in python3.11 python3.12 python3.10 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
            echo "$candidate"; return 0
        fi
    done
    say "no Python >= 3.10 and < 3.13 found (tried python3.11, python3.12, python3.10, python3); set PYTHON=..."
    return 1
}

if [[ -x "$VENV/bin/python" ]]; then
    if ! python_ok "$VENV/bin/python"; then
        say "$VENV exists but its Python is not >= 3.10, < 3.13 (or is broken): remove it and rerun"
        exit 1
    fi
    say "reusing $VENV ($("$VENV/bin/python" --version 2>&1))"
else
    PY="$(pick_python)"
    say "creating $VENV with $PY ($("$PY" --version 2>&1))"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# A venv left half-made by an interrupted run may lack pip.
"$VPY" -m pip --version >/dev/null 2>&1 || "$VPY" -m ensurepip --upgrade >/dev/null
PIP=("$VPY" -m pip install --quiet --progress-bar off)

# What the stamp records: a change to any of these reinstalls.
want_stamp="$(cat "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]] \
        && (cd / && "$VPY" -c "import torch, kfp, pytest, worker, components, pipelines") >/dev/null 2>&1; then
    say "up to date: $VPY (torch $("$VPY" -c 'import torch; print(torch.__version__)'))"
    exit 0
fi
rm -f "$STAMP"

# Torch first. An installed torch that already meets the project's floor (>= 2.11) is kept,
# whatever its build, so a venv with a GPU build or a torchvision pair is not downgraded.
if "$VPY" - <<'PY' >/dev/null 2>&1
import re, torch
major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
raise SystemExit(0 if (major, minor) >= (2, 11) else 1)
PY
then
    say "keeping torch $("$VPY" -c 'import torch; print(torch.__version__)')"
else
    say "installing $TORCH_SPEC"
    "${PIP[@]}" "$TORCH_SPEC"
fi

say "installing the project: pip install -e '.[test]' (a few minutes on a fresh machine)"
"${PIP[@]}" -e "$ROOT[test]"

"$VPY" -c "import torch; print('[setup] torch', torch.__version__, '- cuda' if torch.cuda.is_available() else '- cpu')" >&2
echo "$want_stamp" > "$STAMP"
say "ready: $VPY"
