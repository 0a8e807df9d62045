"""The upload step's KFP component, a thin wrapper over :mod:`components.upload`."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Output

from components.images import TASK_IMAGE


@dsl.component(base_image=TASK_IMAGE, install_kfp_package=False)
def upload_images(
    source: str,
    images_uri: str,
    workers: int,
    results_root: str,
    results_prefix: str,
    model: str,
    batch_size: int,
    shard_size: int,
    incremental: bool,
    layout: str,
    shard_mb: int,
    shard_images: int,
    manifest: Output[Artifact],
) -> NamedTuple("Outputs", images_uri=str):
    """Checks the run's parameters, then copies the images under images_uri.

    Objects already there unchanged are skipped; with an empty source nothing is copied.

    Args:
        source: A local directory, an http(s) URL of a zip archive, a gs:// prefix, or empty.
        images_uri: The gs:// prefix to fill (or that already holds the images).
        workers: Parallel transfers.
        results_root: Checked before the upload: where the run's results go.
        results_prefix: Checked before the upload: the run's exact results prefix, if set.
        model: Checked before the upload: the model must load and its preprocessing be reproducible.
        batch_size: Checked before the upload: images per forward pass.
        shard_size: Checked before the upload: images per shard.
        incremental: Whether an input with no images is allowed (nothing new since the last run).
        layout: loose (one object per file) or packed (tar shards, indexes and a manifest).
        shard_mb: Packed: the most MB per shard.
        shard_images: Packed: the most files per shard; 0: no limit.
        manifest: A JSON record of the upload: source, destination, object and byte counts.

    Returns:
        images_uri: The prefix that holds the images, for the next step.
    """
    from components.upload.preflight import check_images_present, check_run
    from components.upload.upload import upload_and_record

    check_run(
        images_uri=images_uri,
        results_root=results_root,
        results_prefix=results_prefix,
        model=model,
        batch_size=batch_size,
        shard_size=shard_size,
        upload_layout=layout,
        packed_shard_mb=shard_mb,
        packed_shard_images=shard_images,
    )
    record = upload_and_record(
        source,
        images_uri,
        workers=workers,
        path=manifest.path,
        layout=layout,
        shard_mb=shard_mb,
        shard_files=shard_images,
    )
    manifest.metadata.update(record)
    if not incremental:
        check_images_present(images_uri)
    return NamedTuple("Outputs", images_uri=str)(images_uri)
