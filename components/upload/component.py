"""The upload step's KFP component, a thin wrapper over :func:`components.upload.upload.upload_dataset`."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def upload_images(source: str, destination: str, workers: int, dataset: Output[Dataset]):
    """Copies a dataset under a gs:// prefix, skipping objects already there unchanged.

    With an empty source nothing is copied: the images are already at the destination.

    Args:
        source: A local directory, an http(s) URL of a zip archive, a gs:// prefix, or empty.
        destination: The gs:// prefix to fill (or that already holds the images).
        workers: Parallel transfers.
        dataset: Points at the destination; metadata has the upload's object and byte counts.
    """
    dataset.uri = destination
    dataset.metadata["upload_skipped"] = not source
    if source:
        from components.upload.upload import upload_dataset

        report = upload_dataset(source, destination, workers=workers)
        dataset.uri = report.destination
        dataset.metadata.update(
            uploaded=report.uploaded,
            skipped=report.skipped,
            objects=report.total_objects,
            bytes=report.total_bytes,
        )
