"""Checks a run's parameters in seconds, before anything is uploaded or any GPU is asked for.

Each check raises ``ValueError`` with one line that names the parameter and says what to
set instead. The CLI (``python -m pipelines run --local``) runs them before a run starts, and
the pipeline's first task runs them on the server, so a bad run fails before its upload.
"""

from __future__ import annotations

import re

from components.upload.upload import LAYOUTS
from worker.archives.listing import holds_images
from worker.config import IMAGE_EXTENSIONS, ConfigError, WorkerConfig
from worker.storage import is_gcs, open_storage, split_uri

# GCS bucket names: 3-63 characters of lowercase letters, digits, '-', '_' and '.', starting
# and ending with a letter or digit.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")


def check_uri(name: str, uri: str, *, local_ok: bool = True) -> None:
    """``uri`` is a well-formed gs:// prefix (or, with ``local_ok``, a local path).

    Raises:
        ValueError: Empty, another scheme, no or a malformed bucket, or surrounding blanks.
    """
    if not uri:
        raise ValueError(f"{name} is empty: set it to a gs://bucket/prefix")
    if uri != uri.strip():
        raise ValueError(f"{name} {uri!r} has leading or trailing blanks")
    if is_gcs(uri):
        try:
            bucket, _ = split_uri(uri)
        except ValueError:
            bucket = ""
        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"{name} {uri!r} does not name a valid GCS bucket: gs://BUCKET/prefix")
    elif "://" in uri or uri.startswith("gs:"):
        raise ValueError(f"{name} {uri!r} is not a gs://bucket/prefix")
    elif not local_ok:
        raise ValueError(f"{name} must be a gs://bucket/prefix, got {uri!r}")


def check_run(
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
) -> None:
    """Check the parameters that would otherwise fail a run only after its upload.

    Args:
        images_uri: The images' prefix.
        results_root: Where the run's results go (unless ``results_prefix`` is set).
        results_prefix: The run's exact results prefix, or empty.
        model: A hub id, or a gs:// or local model directory: it must hold an image
            classifier whose preprocessing the worker reproduces.
        batch_size: Images per forward pass.
        shard_size: Images per shard.
        upload_layout: How the upload stores the images.
        packed_shard_mb: The packed layout's most MB per shard.
        packed_shard_images: The packed layout's most images per shard (0: no limit).

    Raises:
        ValueError: The first problem, on one line naming the parameter.
    """
    check_uri("images_uri", images_uri)
    if upload_layout not in LAYOUTS:
        raise ValueError(f"upload_layout must be one of {', '.join(LAYOUTS)}, got {upload_layout!r}")
    if packed_shard_mb < 1 or packed_shard_images < 0:
        raise ValueError(
            "packed_shard_mb must be at least 1 and packed_shard_images at least 0, "
            f"got {packed_shard_mb} and {packed_shard_images}"
        )
    if results_prefix:
        check_uri("results_prefix", results_prefix)
    elif not results_root:
        raise ValueError("results_root is empty: set it (or results_prefix) to where results go")
    else:
        check_uri("results_root", results_root)
    if not model or model != model.strip():
        raise ValueError(f"model {model!r}: set it to a hub id or a gs:// or local model directory")
    try:
        # The worker's own bounds and choices, checked where they are declared.
        WorkerConfig(
            input=images_uri,
            output=results_prefix or results_root,
            model=model,
            batch_size=batch_size,
            shard_size=shard_size,
        )
        # Last: it reads the model's config files (from GCS or the hub) and imports transformers.
        from worker.tasks.classification import check_model

        check_model(model)
    except ConfigError as exc:
        raise ValueError(f"{exc.parameter or 'parameter'}: {exc}") from None


def check_images_present(images_uri: str) -> None:
    """At least one image (or archive of images) lies under ``images_uri`` (it stops listing at the first).

    Raises:
        ValueError: There is none (or the folder or bucket does not exist).
    """
    if not holds_images(open_storage(images_uri), images_uri):
        raise ValueError(
            f"images_uri {images_uri} holds no images ({', '.join(IMAGE_EXTENSIONS)}), packed shards "
            "or .tar/.zip archives: check the prefix, or set source to upload them"
        )


def check_input(source: str, images_uri: str) -> None:
    """At least one image where the run will find it.

    Under ``source`` when there is one (a folder or a gs:// prefix; what an archive holds is
    known only once it is downloaded), else under ``images_uri``.

    Raises:
        ValueError: There is none.
    """
    if source.startswith(("http://", "https://")) or source.lower().endswith(".zip"):
        return
    check_images_present(source or images_uri)
