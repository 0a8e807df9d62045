"""The upload step's KFP component, a thin wrapper over :mod:`components.upload.upload`."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Output

from components.images import TASK_IMAGE


@dsl.component(base_image=TASK_IMAGE, install_kfp_package=False)
def upload_images(
    source: str,
    images_uri: str,
    workers: int,
    layout: str,
    shard_mb: int,
    shard_images: int,
    manifest: Output[Artifact],
) -> NamedTuple("Outputs", images_uri=str):
    """Copies a dataset under a gs:// prefix, skipping objects already there unchanged.

    With an empty source nothing is copied: the images are already at images_uri.

    Args:
        source: A local directory, an http(s) URL of a zip archive, a gs:// prefix, or empty.
        images_uri: The gs:// prefix to fill (or that already holds the images).
        workers: Parallel transfers.
        layout: loose (one object per file) or packed (tar shards, indexes and a manifest).
        shard_mb: Packed: the most MB per shard.
        shard_images: Packed: the most files per shard; 0: no limit.
        manifest: A JSON record of the upload: source, destination, object and byte counts.

    Returns:
        images_uri: The prefix that holds the images, for the next step.
    """
    from components.upload.upload import upload_and_record

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
    return NamedTuple("Outputs", images_uri=str)(images_uri)
