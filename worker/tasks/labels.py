"""What the label tasks (classification, zero-shot) share: their columns, top-k and rows.

Both write the best label as ``classification``, its index and score, and with ``--top-k``
above 1 the k best as list columns (``top_labels``, ``top_label_indices``, ``top_scores``,
best first), which pandas, pyarrow and DuckDB read as lists, no strings to parse.
Ties are ordered as transformers' pipelines order them: by score, then by label index.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np
import torch

from worker.config import ConfigError, WorkerConfig
from worker.cuda_graph import same_decisions
from worker.results import image_id
from worker.schema import encode_list, label_columns  # noqa: F401  (the label tasks' columns)
from worker.storage import ObjectInfo, open_storage


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (scores, label indices) of each row, in float32, ties by the lower index.

    A stable descending sort keeps equal scores in label order, as the pipelines' sorted() does.
    """
    k = min(k, scores.shape[-1])
    values, indices = scores.float().sort(dim=-1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def label_rows(
    objects: Sequence[ObjectInfo], outputs: Sequence[np.ndarray], label_names: Sequence[str], k: int
) -> list[tuple]:
    """Part rows (``label_columns(k)``) from the outputs ``(top scores, top label indices)``."""
    scores, labels = (o.reshape(len(objects), -1).tolist() for o in outputs)
    rows = []
    for obj, top_scores, top_labels in zip(objects, scores, labels, strict=True):
        row = [image_id(obj.uri), label_names[top_labels[0]], top_labels[0], f"{top_scores[0]:.6f}"]
        if k > 1:
            row += [
                encode_list([label_names[i] for i in top_labels]),
                encode_list(top_labels),
                encode_list([float(f"{s:.7g}") for s in top_scores]),
            ]
        rows.append((*row, obj.uri))
    return rows


def labels_agree(
    reference_logits: torch.Tensor,
    outputs: Sequence[torch.Tensor],
    scores_of: Callable[[torch.Tensor], torch.Tensor],
) -> bool:
    """Whether a graph's (top scores, top indices) make the reference logits' top-1 decisions."""
    scores, labels = outputs
    return same_decisions(reference_logits, scores[:, 0], labels[:, 0], scores_of=scores_of)


def read_labels(cfg: WorkerConfig) -> list[str]:
    """The candidate labels of ``--labels`` or ``--labels-file`` (one per line, blank lines skipped).

    Raises:
        ConfigError: The file can't be read, or there are no labels, or a label repeats.
    """
    if cfg.labels_file:
        try:
            text = open_storage(cfg.labels_file, project=cfg.project).read(cfg.labels_file).decode("utf-8")
        except (FileNotFoundError, IsADirectoryError):
            raise ConfigError(f"--labels-file {cfg.labels_file}: no such file", "labels_file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--labels-file {cfg.labels_file} is not UTF-8 text", "labels_file") from None
        labels, flag = [line.strip() for line in text.splitlines()], "labels_file"
    elif cfg.labels.lstrip().startswith("["):
        try:
            labels = json.loads(cfg.labels)
        except ValueError as exc:
            raise ConfigError(f"--labels is not a valid JSON array: {exc}", "labels") from None
        if not all(isinstance(label, str) for label in labels):
            raise ConfigError("--labels: a JSON array of strings, please", "labels")
        labels, flag = [label.strip() for label in labels], "labels"
    else:
        labels, flag = [label.strip() for label in cfg.labels.split(",")], "labels"
    labels = [label for label in labels if label]
    if not labels:
        raise ConfigError(f"--{flag.replace('_', '-')}: no labels given", flag)
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(f"--{flag.replace('_', '-')}: labels repeat: {', '.join(repeated[:5])}", flag)
    return labels
