"""Model tasks: what a model does with a batch of pixels, and the part rows it writes.

A task is a class (``Task``): built from the model's local path, the device and the run's
config, it holds the model and its preprocessing, runs the forward on a batch, turns the
outputs into part rows, and declares those rows' columns (``columns``: names and types,
``worker.schema``), which the aggregate takes as they are. ``--task`` names a built-in one
(``BUILT_IN``) or a class of the user's own as ``package.module:ClassName``, importable where
the worker runs; both are resolved the same way (``task_class``). The rest of the worker
(plan, read, decode, infer, commit) is the same for every task.

Adding a built-in task is one module here (and its name in ``BUILT_IN`` and
``worker.config.TASK_CHOICES``).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from worker.config import BUILT_IN_TASKS, ConfigError

if TYPE_CHECKING:  # the registry itself imports nothing heavy
    import numpy as np
    import torch

    from worker.config import WorkerConfig
    from worker.decode.spec import Preprocess
    from worker.schema import Column
    from worker.storage import ObjectInfo

# --task names -> their classes (worker.config.BUILT_IN_TASKS lists the same names without
# importing torch).
BUILT_IN = {
    "classification": "worker.tasks.classification:Classification",
    "embedding": "worker.tasks.embedding:Embedding",
    "zero-shot": "worker.tasks.zero_shot:ZeroShot",
}
assert tuple(BUILT_IN) == BUILT_IN_TASKS


class Task(Protocol):
    """A loaded model, as the worker's stages use it.

    ``__init__(model_path, device, cfg)`` loads it: ``model_path`` is the model as fetched on
    this node (a local directory, or an exported model's file), ``cfg`` the run's
    ``WorkerConfig`` (for the task's own parameters). On a GPU the worker feeds it bfloat16
    pixels; on a CPU float32.
    """

    model: torch.nn.Module
    preprocess: Preprocess

    @classmethod
    def columns(cls, cfg: WorkerConfig) -> tuple[Column, ...]:
        """The part's header and types; it holds a "uri" column, by which the rows are sorted.
        Known before the model loads: the run record holds it.
        """

    @classmethod
    def check_model(cls, model: str, cfg: WorkerConfig) -> None:
        """In seconds, without loading weights: ConfigError (naming --model or the task's
        parameter) where the model can't do this task.
        """

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The batch's outputs, one tensor per output with the batch as its first dimension."""

    def agrees(self, pixels: torch.Tensor, outputs: Sequence[torch.Tensor]) -> bool:
        """Whether ``outputs`` (of a CUDA graph or compiled forward on ``pixels``) are the eager
        forward's, up to the rounding of fused kernels.
        """

    def rows(self, objects: Sequence[ObjectInfo], outputs: Sequence[np.ndarray]) -> list[tuple]:
        """One part row per object, each cell as text; ``outputs[j]`` is the forward's output j as a
        NumPy array, row k that of ``objects[k]`` (images that failed to decode left out).
        """


def task_class(name: str) -> type[Task]:
    """The class of the task ``name``: a key of ``BUILT_IN``, or ``package.module:ClassName``.

    Raises:
        ConfigError: A user task that can't be imported, or is not a class with the protocol's methods.
    """
    target = BUILT_IN.get(name, name)
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        raise ConfigError(f"--task {name}: can't import {module_name} ({exc})", "task") from exc
    except AttributeError:
        raise ConfigError(f"--task {name}: {module_name} has no {class_name}", "task") from None
    missing = [m for m in ("columns", "check_model", "forward", "agrees", "rows") if not hasattr(cls, m)]
    if not isinstance(cls, type) or missing:
        raise ConfigError(
            f"--task {name} is not a task class: it lacks {', '.join(missing) or 'a class'} "
            "(see docs/tasks.md)",
            "task",
        )
    return cls
