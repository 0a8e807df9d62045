"""The two container images of a run.

* The **task image** runs the KFP tasks (check, upload, launch, aggregate): a CPU image with the
  project, kfp and a CPU build of torch (the local backend runs the worker in the launch task).
* The **worker image** runs the worker in the job's pods: the CUDA image, several GB larger.

Both build from the one Dockerfile (targets ``tasks`` and ``worker``). The defaults are
placeholders, which only the committed template ``compiled/`` may name: a pipeline meant for a
cluster is compiled with the images you pushed (``python -m pipelines compile --task-image ...
--image ...``, or the environment variables below), and every path to a cluster refuses them.
"""

import os
from dataclasses import dataclass

PLACEHOLDER_REGISTRY = "ghcr.io/example/"
DEFAULT_TASK_IMAGE = f"{PLACEHOLDER_REGISTRY}kfp-batch-inference-tasks:0.1.0"
DEFAULT_WORKER_IMAGE = f"{PLACEHOLDER_REGISTRY}kfp-batch-inference:0.1.0"
TASK_IMAGE_ENV = "BATCH_INFERENCE_TASK_IMAGE"
WORKER_IMAGE_ENV = "BATCH_INFERENCE_WORKER_IMAGE"
# Read once at import, so one compile uses one pair of images throughout (and stays deterministic).
TASK_IMAGE = os.environ.get(TASK_IMAGE_ENV, DEFAULT_TASK_IMAGE)
WORKER_IMAGE = os.environ.get(WORKER_IMAGE_ENV, DEFAULT_WORKER_IMAGE)


@dataclass(frozen=True)
class Images:
    """The images one compiled pipeline names.

    Attributes:
        task: The image of its KFP tasks.
        worker: The default of its ``image`` parameter: the image of the job's pods.
    """

    task: str = TASK_IMAGE
    worker: str = WORKER_IMAGE


TEMPLATE = Images(DEFAULT_TASK_IMAGE, DEFAULT_WORKER_IMAGE)


def is_placeholder(image: str) -> bool:
    return image.startswith(PLACEHOLDER_REGISTRY)


def check_image(name: str, image: str) -> None:
    """``image`` names an image that can be pulled: not empty, not a placeholder.

    Args:
        name: What to call it in the message: a flag or a pipeline parameter.
        image: The image reference.

    Raises:
        ValueError: In one line naming ``name``.
    """
    if not image or image != image.strip():
        raise ValueError(f"{name} {image!r}: set it to an image reference, e.g. REGISTRY/NAME:TAG")
    if is_placeholder(image):
        raise ValueError(
            f"{name} {image} is a placeholder, not an image you pushed: build the Dockerfile's "
            "tasks and worker targets, push them and give their names (compiled/README.md)"
        )
