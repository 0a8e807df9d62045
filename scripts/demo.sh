#!/usr/bin/env bash
# Set up (scripts/setup.sh: venv, torch, the project) and run the main job: the whole
# batch_inference pipeline (upload -> launch -> aggregate) on this machine through kfp.local,
# with the GCS emulator on loopback and the worker under torchrun.
#
#   bash scripts/demo.sh                       # 64 generated images, 2 worker processes
#   bash scripts/demo.sh --num-images 256      # extra arguments go to `python -m pipelines run --local`
#   bash scripts/demo.sh --source DIR          # your own folder of images
#
# With no hub access the model is a locally created random-weight ViT-B/16 (the architecture
# of google/vit-base-patch16-224): its classes are meaningless, its speed is real.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
export VENV

bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pipelines run --local "$@"
