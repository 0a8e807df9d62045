"""The two container images of a run, read once per compile.

* The **task image** runs the three KFP tasks (upload, launch, aggregate): a CPU image with the
  project, kfp and a CPU build of torch (the local backend runs the worker in the launch task).
* The **worker image** runs the worker in the job's pods: the CUDA image, several GB larger.

Both build from the one Dockerfile (targets ``tasks`` and ``worker``).
"""

import os

DEFAULT_TASK_IMAGE = "ghcr.io/example/kfp-batch-inference-tasks:0.1.0"
DEFAULT_WORKER_IMAGE = "ghcr.io/example/kfp-batch-inference:0.1.0"
# Read once at import, so one compile uses one pair of images throughout (and stays deterministic).
TASK_IMAGE = os.environ.get("BATCH_INFERENCE_TASK_IMAGE", DEFAULT_TASK_IMAGE)
WORKER_IMAGE = os.environ.get("BATCH_INFERENCE_WORKER_IMAGE", DEFAULT_WORKER_IMAGE)
