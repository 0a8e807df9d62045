"""Where a run reads and writes, checked in seconds, before any model is fetched or loaded.

``python -m worker`` makes these checks before it even imports torch, naming its flags
(``check_locations``); the pipeline's checks (``components.check.checks``) make the same ones on
the pipeline's parameters, naming those. Each raises ``ValueError`` in one line naming ``name``.
"""

from __future__ import annotations

import os
from pathlib import Path

from worker.archives.listing import holds_images
from worker.config import IMAGE_EXTENSIONS, ConfigError, WorkerConfig, flag_of
from worker.storage import is_gcs, open_storage


def check_input_folder(name: str, uri: str) -> None:
    """A local ``uri`` is an existing directory; a gs:// prefix's bucket is checked by its listing."""
    if is_gcs(uri):
        return
    if not os.path.exists(uri):
        raise ValueError(f"{name} {uri}: no such directory")
    if not os.path.isdir(uri):
        raise ValueError(f"{name} {uri} is a file; give the directory that holds the images")


def check_output_folder(name: str, uri: str) -> None:
    """A local ``uri`` is a directory or can become one: no regular file stands on its path."""
    if is_gcs(uri):
        return
    existing = next((p for p in (Path(uri), *Path(uri).parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"{name} {uri}: {existing} is a file, not a directory")


def check_holds_images(name: str, uri: str, *, project: str | None = None) -> None:
    """At least one image, packed dataset or archive lies under ``uri`` (the listing stops at the first).

    Raises:
        ValueError: There is none, or the folder does not exist.
        FileNotFoundError: The bucket does not exist.
    """
    if not holds_images(open_storage(uri, project=project), uri):
        raise ValueError(
            f"{name} {uri} holds no images ({', '.join(IMAGE_EXTENSIONS)}), packed shards or "
            ".tar/.zip archives: check the prefix"
        )


def check_locations(cfg: WorkerConfig) -> None:
    """The worker's start-up check of ``--input`` and ``--output``.

    An input without a single image is an error, except for an incremental run, whose images may
    all have been deleted since the run before.

    Raises:
        ConfigError: What is wrong, in one line naming the flag.
    """
    checks = [("input", check_input_folder), ("output", check_output_folder)]
    if not cfg.incremental:
        checks.append(("input", lambda flag, uri: check_holds_images(flag, uri, project=cfg.project)))
    for field, check in checks:
        try:
            check(flag_of(field), getattr(cfg, field))
        except ValueError as exc:
            raise ConfigError(str(exc), field) from None
