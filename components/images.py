"""The container image the pipeline's tasks run in, read once per compile."""

import os

DEFAULT_IMAGE = "ghcr.io/example/kfp-batch-inference:0.1.0"
# Read once at import, so one compile uses one image throughout (and stays deterministic).
IMAGE = os.environ.get("BATCH_INFERENCE_IMAGE", DEFAULT_IMAGE)
