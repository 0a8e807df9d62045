"""Model tasks: what a model does with a batch of pixels, and the part rows it writes.

A task is one module here exposing ``load(path, device) -> Task`` and ``check_model(model, ...)``;
``--task`` picks it by name. The rest of the worker (read, decode, infer, commit) is the same for
every task.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the registry itself imports nothing heavy
    import torch

    from worker.decode.spec import Preprocess
    from worker.storage import ObjectInfo

# --task names -> their modules (worker.config.TASK_CHOICES lists the same names without
# importing torch).
TASKS = {"image-classification": "worker.tasks.classification"}


class Task(Protocol):
    """A loaded model, as the worker's stages use it."""

    model: torch.nn.Module
    preprocess: Preprocess
    # The part's header; it holds a "uri" column, by which the rows are sorted.
    columns: tuple[str, ...]
    # The scores the forward reports, as a function of the logits (checks a CUDA graph's outputs).
    scores_of: Callable[[torch.Tensor], torch.Tensor]

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The batch's outputs, one tensor per output with the batch as its first dimension."""

    def rows(self, objects: Sequence[ObjectInfo], outputs: Sequence[list]) -> list[tuple]:
        """One part row per object; ``outputs[j][k]`` is output j of object k, as a Python value."""


def task_module(name: str) -> ModuleType:
    """The module of the task named ``name`` (a key of ``TASKS``)."""
    return importlib.import_module(TASKS[name])
