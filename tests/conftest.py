"""Shared fixtures: a real GCS emulator on loopback, a tiny locally built ViT, sample images."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from tests.support.helpers import make_tiny_model
from tests.support.tasks import models, task_images  # noqa: F401  (fixtures of the task tests)

# google-auth probes the GCE metadata server (169.254.169.254) when it looks for credentials,
# e.g. inside google-cloud-aiplatform; tests must send nothing off this machine. Set before any
# test module imports google.auth, which reads these once, and inherited by every subprocess.
os.environ.update(NO_GCE_CHECK="true", GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9")


class Emulator:
    """A running fake-gcs-server; ``new_bucket()`` gives each test a clean bucket."""

    _ids = itertools.count()

    def __init__(self, url: str):
        from google.cloud import storage

        self.url = url
        self.client = storage.Client(project=os.environ["GOOGLE_CLOUD_PROJECT"])

    def new_bucket(self, stem: str = "test") -> str:
        name = f"{stem}-{os.getpid()}-{next(self._ids)}"
        self.client.create_bucket(name)
        return name

    def object_names(self, bucket: str, prefix: str | None = None) -> list[str]:
        return sorted(b.name for b in self.client.list_blobs(bucket, prefix=prefix))


@pytest.fixture(scope="session")
def gcs():
    from pipelines.dev.emulator import gcs_emulator

    with gcs_emulator() as url:
        yield Emulator(url)


@pytest.fixture(params=["local", "gcs"])
def any_prefix(request, tmp_path) -> str:
    """A fresh prefix on local disk; the test runs again with one in a new emulator bucket."""
    if request.param == "local":
        return str(tmp_path / "prefix")
    return f"gs://{request.getfixturevalue('gcs').new_bucket('prefix')}/runs/r1"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny-vit")


@pytest.fixture(scope="session")
def crds_dir(tmp_path_factory) -> Path:
    """The CRDs of Kueue, JobSet, Trainer and the Training Operator, from their Go modules at the
    versions the cluster tier runs (``tests/support/control_plane.py``), one file each by CRD name."""
    from tests.support.control_plane import crd_files

    directory = tmp_path_factory.mktemp("crds")
    for path in crd_files():
        (directory / path.name).symlink_to(path)
    return directory
