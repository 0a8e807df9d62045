"""Checks a run's parameters in seconds, before anything is uploaded or any GPU is asked for.

Each check raises ``ValueError`` with one line that names the parameter and says what to
set instead. Every entry point makes them before it starts anything: the pipeline's first task
on the server (so a bad run fails before its upload), ``python -m pipelines run --local`` before
the emulator starts, and the launch step, ``render-job``, ``submit`` and ``schedule`` through
``LaunchRequest.validate`` (``check_settings``, which needs no storage). What the worker checks
of its own flags lives in the worker (``worker.config``, ``worker.checks``) and is reused here.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
from collections.abc import Sequence

from components.images import check_image
from components.upload.upload import LAYOUTS
from worker.checks import check_holds_images, check_output_folder
from worker.config import ConfigError, WorkerConfig
from worker.exported import is_exported
from worker.storage import check_uri, is_gcs

# The worker's defaults, which the pipeline's task parameters share.
WORKER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(WorkerConfig)}
LOCAL = "local"
KUBERNETES = "kubernetes"
BACKENDS = (LOCAL, KUBERNETES)
# A Hugging Face hub id: a name, or an owner and a name. Whatever else is not gs:// is a path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def check_settings(
    *,
    images_uri: str,
    results_root: str,
    results_prefix: str,
    model: str,
    batch_size: int,
    shard_size: int,
    upload_layout: str = "loose",
    packed_shard_mb: int = 1,
    packed_shard_images: int = 0,
    backend: str = LOCAL,
    image: str = "",
    **task_parameters,
) -> None:
    """The checks that need no storage, hub or cluster, in milliseconds: render-job and submit make them too.

    Args:
        images_uri: The images' prefix.
        results_root: Where the run's results go (unless ``results_prefix`` is set).
        results_prefix: The run's exact results prefix, or empty.
        model: A hub id, or a gs:// or local model directory.
        batch_size: Images per forward pass.
        shard_size: Images per shard.
        upload_layout: How the upload stores the images.
        packed_shard_mb: The packed layout's most MB per shard.
        packed_shard_images: The packed layout's most images per shard (0: no limit).
        backend: Where the worker runs: on the kubernetes backend everything it reads and writes
            must be reachable from the cluster's pods.
        image: The image of the job's pods (kubernetes backend only): not a placeholder.
        **task_parameters: The pipeline's task parameters (``task_config``'s arguments).

    Raises:
        ValueError: The first problem, on one line naming the parameter.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    check_uri("images_uri", images_uri)
    if upload_layout not in LAYOUTS:
        raise ValueError(f"upload_layout must be one of {', '.join(LAYOUTS)}, got {upload_layout!r}")
    if packed_shard_mb < 1 or packed_shard_images < 0:
        raise ValueError(
            "packed_shard_mb must be at least 1 and packed_shard_images at least 0, "
            f"got {packed_shard_mb} and {packed_shard_images}"
        )
    results_name, results = _results(results_root, results_prefix)
    check_uri(results_name, results)
    if not model or model != model.strip():
        raise ValueError(f"model {model!r}: set it to a hub id or a gs:// or local model directory")
    check_uri("model", model)
    if backend == KUBERNETES:
        # The job's pods share no disk with this machine (or the launcher's pod): they read and
        # write GCS, and fetch the model from GCS or the hub.
        for name, uri in (("images_uri", images_uri), (results_name, results)):
            if not is_gcs(uri):
                raise ValueError(f"{name} must be a gs:// prefix for the kubernetes backend, got {uri!r}")
        if not is_gcs(model) and (os.path.isdir(model) or is_exported(model) or not _HUB_ID.fullmatch(model)):
            raise ValueError(
                f"model {model} is a local path, which the kubernetes backend's pods can't read: "
                "copy the folder to gs:// and give that prefix, or give a hub id"
            )
        check_image("image", image)
        labels_file = task_parameters.get("labels_file", "")
        if labels_file and not is_gcs(labels_file):
            raise ValueError(
                f"labels_file must be a gs:// file for the kubernetes backend, got {labels_file!r}"
            )
    worker_config(images_uri, results, model, batch_size, shard_size, task_parameters)


def task_config(
    task: str = WORKER_DEFAULTS["task"],
    top_k: int = WORKER_DEFAULTS["top_k"],
    labels: Sequence[str] = (),
    labels_file: str = WORKER_DEFAULTS["labels_file"],
    prompt: str = WORKER_DEFAULTS["prompt"],
    normalize: bool = WORKER_DEFAULTS["normalize"],
    embedding_dtype: str = WORKER_DEFAULTS["embedding_dtype"],
) -> dict:
    """The worker's fields for the pipeline's task parameters (``labels`` a list, the flag's JSON array)."""
    return {
        "task": task,
        "top_k": top_k,
        "labels": json.dumps(list(labels), ensure_ascii=False) if labels else "",
        "labels_file": labels_file,
        "prompt": prompt,
        "normalize": normalize,
        "embedding_dtype": embedding_dtype,
    }


def worker_config(
    images_uri: str, results: str, model: str, batch_size: int, shard_size: int, task_parameters: dict
) -> WorkerConfig:
    """The worker's config of these parameters; its own bounds and choices are checked where declared.

    Raises:
        ValueError: A bad parameter, on one line naming it.
    """
    try:
        return WorkerConfig(
            input=images_uri,
            output=results,
            model=model,
            batch_size=batch_size,
            shard_size=shard_size,
            **task_config(**task_parameters),
        )
    except ConfigError as exc:
        raise ValueError(f"{exc.parameter or 'parameter'}: {exc}") from None


def _results(results_root: str, results_prefix: str) -> tuple[str, str]:
    """The parameter that says where the results go, and its value."""
    if results_prefix:
        return "results_prefix", results_prefix
    if not results_root:
        raise ValueError("results_root is empty: set it (or results_prefix) to where results go")
    return "results_root", results_root


def check_run(*, check_model: bool = True, **settings) -> None:
    """``check_settings``, then what this machine can check of the run's output and model.

    Args:
        check_model: Also whether the model can do the task (reads its config files, from GCS
            or the hub); without it, nothing here is slower than a file system call.
        **settings: ``check_settings``' arguments.

    Raises:
        ValueError: The first problem, on one line naming the parameter.
    """
    check_settings(**settings)
    name, results = _results(settings["results_root"], settings["results_prefix"])
    check_output_folder(name, results)
    task_parameters = {k: v for k, v in settings.items() if k in TASK_PARAMETERS}
    cfg = worker_config(
        settings["images_uri"],
        results,
        settings["model"],
        settings["batch_size"],
        settings["shard_size"],
        task_parameters,
    )
    if not check_model:
        return
    try:
        # Last: it reads the model's config files (from GCS or the hub) and imports transformers.
        from worker.tasks import task_class

        task_class(cfg.task).check_model(cfg.model, cfg)
    except ConfigError as exc:
        raise ValueError(f"{exc.parameter or 'parameter'}: {exc}") from None


def check_input(source: str, images_uri: str) -> None:
    """At least one image where the run will find it.

    Under ``source`` when there is one (a folder or a gs:// prefix; what an archive holds is
    known only once it is downloaded), else under ``images_uri``.

    Raises:
        ValueError: There is none, or the folder does not exist.
        FileNotFoundError: The bucket does not exist.
    """
    if source.startswith(("http://", "https://")) or source.lower().endswith(".zip"):
        return
    if source:
        check_holds_images("source", source)
        return
    try:
        check_holds_images("images_uri", images_uri)
    except ValueError as exc:
        raise ValueError(f"{exc}, or set source to upload them") from None


# The pipeline's parameters that configure the task (those of ``task_config``).
TASK_PARAMETERS = tuple(inspect.signature(task_config).parameters)
