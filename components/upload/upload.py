"""upload_dataset: put a dataset under a gs:// prefix, idempotently and in parallel.

The source is a local directory, an http(s) URL of a zip archive (for example COCO's
``val2017.zip``), a local ``.zip`` file, or another gs:// prefix. Every regular file is
copied with its relative path kept; the worker decides later which files are images.

A rerun is cheap: the destination is listed once, and an object whose size and CRC32C
already match the source is skipped, so only new or changed files travel.

With ``layout="packed"`` the files go into WebDataset tar shards instead, with an index per
shard and a manifest (``components.upload.packing``), so a run reads them with a few large
requests rather than one per image.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from components.upload.packing import DEFAULT_SHARD_MB, Packer, PackReport
from worker.storage import Storage, folder, is_gcs, open_storage

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# Uploads run in batches so that progress can be logged between them; a batch is
# bounded by bytes too, so a dataset of huge files still reports now and then.
_BATCH_FILES_PER_WORKER = 16
_BATCH_MAX_BYTES = 1 << 30
_LOG_INTERVAL_S = 10.0
LOOSE, PACKED = "loose", "packed"
LAYOUTS = (LOOSE, PACKED)


@dataclass
class UploadReport:
    """What ``upload_dataset`` did.

    Attributes:
        destination: The gs:// prefix the files now live under.
        uploaded: Objects (packed: files) written in this run.
        skipped: Objects (files) already present with the same size and CRC32C.
        bytes_uploaded: Bytes written in this run.
        total_objects: Regular files in the source.
        total_bytes: Bytes in the source.
        layout: ``loose`` or ``packed``.
        shards_written: Packed: new shards.
        unreadable: Packed: files that could not be read (listed in the manifest).
    """

    destination: str
    uploaded: int
    skipped: int
    bytes_uploaded: int
    total_objects: int
    total_bytes: int
    layout: str = "loose"
    shards_written: int = 0
    unreadable: int = 0


class UnsafeArchiveError(ValueError):
    """A zip entry that would land outside the extraction folder, or is a link."""


@dataclass
class _SourceFile:
    """One file to put at ``<destination>/<relpath>``.

    ``location`` is a local path or a gs:// URI. ``crc32c`` is the base64 big-endian
    checksum GCS reports; it is filled lazily for local files, because it is only
    needed where a destination object of the same size exists.
    """

    relpath: str
    location: str
    size: int
    crc32c: str | None = None


def upload_dataset(
    source: str,
    destination: str,
    *,
    workers: int = 16,
    project: str | None = None,
    layout: str = LOOSE,
    shard_mb: float = DEFAULT_SHARD_MB,
    shard_files: int = 0,
) -> UploadReport:
    """Copy every regular file of ``source`` under the gs:// prefix ``destination``.

    Args:
        source: A local directory, a local ``.zip`` file, an http(s) URL of a zip
            archive, or a gs:// prefix.
        destination: A gs:// prefix; its bucket must exist.
        workers: Parallel transfers.
        project: Google Cloud project for the storage client; the environment's by default.
        layout: ``loose``: one object per file, at ``destination/<relative path>``; ``packed``:
            the files in tar shards with indexes and a manifest under ``destination/packed/``
            (``components.upload.packing``), read by the worker with few requests.
        shard_mb: Packed: the most MB per shard.
        shard_files: Packed: the most files per shard; 0: no limit.

    Returns:
        The counts of uploaded and skipped objects and bytes.

    Raises:
        FileNotFoundError: The source, or the destination or source bucket, does not exist.
        UnsafeArchiveError: A zip entry is absolute, contains ``..`` or is a symlink.
        UnsafeMemberError: Packed: a file's name would be an unsafe tar member name.
        ValueError: The destination is not a gs:// URI, the layout is unknown, or the source is
            not a zip archive.
        OSError: The zip archive could not be downloaded.
        RuntimeError: Some transfers failed; the message names the first few.
    """
    if not is_gcs(destination):
        raise ValueError(f"destination must be a gs:// prefix, got {destination!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    dest = _Destination(destination, open_storage(destination, project=project))
    # The destination is listed first: it fails fast on a missing bucket, before a
    # long download, and needs only object-list permission (unlike a bucket GET).
    packer = None
    if layout == PACKED:
        packer = Packer(
            destination, shard_mb=shard_mb, shard_files=shard_files, workers=workers, project=project
        )
    existing = dest.existing() if packer is None else {}
    workers = max(1, workers)
    with contextlib.ExitStack() as stack:
        if is_gcs(source):
            files = _gcs_files(dest.storage, source)
            run_batch = _copier(dest, workers)
        else:
            root = Path(source)
            is_url = source.startswith(("http://", "https://"))
            if is_url or (root.is_file() and zipfile.is_zipfile(root)):
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="upload-dataset-")))
                archive = download(source, tmp / "archive.zip") if is_url else root
                if not zipfile.is_zipfile(archive):
                    raise ValueError(f"not a zip archive: {source}")
                root = tmp / "files"
                extract_zip(archive, root)
                if is_url:
                    archive.unlink()  # Halves the peak disk use for big archives.
            elif not root.is_dir():
                raise FileNotFoundError(f"source is neither a directory nor a zip file: {source}")
            files = _local_files(root)
            run_batch = _uploader(dest, workers)
        if packer is not None:
            return _packed_report(dest.uri, files, packer.pack(files))
        return _transfer(files, existing, dest, workers, run_batch, label=source)


def _packed_report(destination: str, files: Sequence[_SourceFile], packed: PackReport) -> UploadReport:
    return UploadReport(
        destination=destination,
        uploaded=packed.packed,
        skipped=packed.skipped,
        bytes_uploaded=packed.bytes_written,
        total_objects=len(files),
        total_bytes=sum(f.size for f in files),
        layout=PACKED,
        shards_written=packed.shards_written,
        unreadable=packed.bad,
    )


def download(url: str, target: Path, *, timeout: float = 60.0) -> Path:
    """Stream ``url`` into the file ``target`` without holding it in memory.

    Args:
        url: An http(s) URL.
        target: The local file to write.
        timeout: Seconds to wait for the connection and for each read.

    Returns:
        ``target``.

    Raises:
        OSError: The server refused or could not be reached; the message names the URL.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(target, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            progress = _Progress(f"downloading {url}", total_files=1, total_bytes=total)
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                progress.add(0, len(chunk))
            progress.add(1, 0)
            progress.done()
    except urllib.error.URLError as exc:
        # urllib's own message ("HTTP Error 404: Not Found") does not say which URL.
        raise OSError(f"cannot download {url}: {exc}") from exc
    return target


def extract_zip(archive: Path, target: Path) -> list[Path]:
    """Extract the regular files of a zip archive below ``target``, refusing unsafe entries.

    Every entry is checked before anything is written, so a bad archive leaves no
    partial extraction behind. Directory entries are skipped (folders come from the
    file paths).

    Args:
        archive: The zip file.
        target: The folder to extract into; created if missing.

    Returns:
        The extracted files.

    Raises:
        UnsafeArchiveError: An entry has an absolute path, a ``..`` component or a
            drive letter, or is a symbolic link; the message names the entry.
    """
    target = Path(target)
    with zipfile.ZipFile(archive) as zf:
        entries = [info for info in zf.infolist() if not info.is_dir()]
        for info in entries:
            _check_entry(info)
        target.mkdir(parents=True, exist_ok=True)
        root = target.resolve()
        written = []
        for info in entries:
            dest = root.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
            # Belt and braces: the name check above should make this impossible, but a
            # pre-existing symlinked folder inside the target could still redirect it.
            if not dest.resolve().is_relative_to(root):
                raise UnsafeArchiveError(f"zip entry escapes the extraction folder: {info.filename!r}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
            written.append(dest)
    return written


def _check_entry(info: zipfile.ZipInfo) -> None:
    name = info.filename
    # Zip tools on Windows may write backslashes; treat them as separators so that
    # "..\\evil" cannot slip through a '/'-only check.
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"zip entry has an absolute path: {name!r}")
    if ".." in parts:
        raise UnsafeArchiveError(f"zip entry escapes the extraction folder: {name!r}")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UnsafeArchiveError(f"zip entry is a symbolic link: {name!r}")


def _local_files(root: Path) -> list[_SourceFile]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            # Regular files only: a symlink could point anywhere on the machine.
            if not stat.S_ISREG(st.st_mode):
                log.info("skipping %s: not a regular file", path)
                continue
            files.append(_SourceFile(path.relative_to(root).as_posix(), str(path), st.st_size))
    return files


def _file_crc32c(path: str) -> str:
    import google_crc32c

    checksum = google_crc32c.Checksum()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode("ascii")


class _Destination:
    """The folder that files are written under, and the storage that holds it."""

    def __init__(self, uri: str, storage: Storage):
        self.uri = uri
        self.storage = storage
        # A prefix names a folder, so ``imgs`` must not match ``imgs2/``.
        self.folder = folder(uri)

    def uri_of(self, relpath: str) -> str:
        return self.folder + relpath

    def existing(self) -> dict[str, tuple[int, str | None]]:
        """Relpath -> (size, crc32c) of every object already there, from one listing."""
        return {o.uri[len(self.folder) :]: (o.size, o.crc32c) for o in self.storage.list(self.folder)}


def _gcs_files(storage: Storage, source: str) -> list[_SourceFile]:
    prefix = folder(source)
    return [
        _SourceFile(o.uri[len(prefix) :], o.uri, o.size, o.crc32c)
        for o in storage.list(prefix)
        if not o.uri.endswith("/")  # Folder placeholders made by the console.
    ]


def _uploader(dest: _Destination, workers: int) -> Callable[[Sequence[_SourceFile]], list]:
    def upload_batch(batch: Sequence[_SourceFile]) -> list:
        return dest.storage.upload_files(
            [(f.location, dest.uri_of(f.relpath)) for f in batch], workers=workers
        )

    return upload_batch


def _copier(dest: _Destination, workers: int) -> Callable[[Sequence[_SourceFile]], list]:
    def copy_batch(batch: Sequence[_SourceFile]) -> list:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(dest.storage.copy, f.location, dest.uri_of(f.relpath)) for f in batch]
        return [fut.exception() for fut in futures]

    return copy_batch


def _unchanged(f: _SourceFile, existing: dict[str, tuple[int, str | None]]) -> bool:
    size, crc32c = existing.get(f.relpath, (-1, None))
    if size != f.size or not crc32c:
        return False
    if f.crc32c is None:
        # Only read the file when the cheap size test could not tell them apart.
        f.crc32c = _file_crc32c(f.location)
    return f.crc32c == crc32c


def _transfer(
    files: list[_SourceFile],
    existing: dict[str, tuple[int, str | None]],
    dest: _Destination,
    workers: int,
    run_batch: Callable[[Sequence[_SourceFile]], list],
    *,
    label: str,
) -> UploadReport:
    """Skip what is already there, move the rest in batches, and fail on any error."""
    todo = [f for f in files if not _unchanged(f, existing)]
    total_bytes = sum(f.size for f in files)
    todo_bytes = sum(f.size for f in todo)
    log.info(
        "%s -> %s: %d files (%.1f MB), %d to transfer, %d already present",
        label,
        dest.uri,
        len(files),
        total_bytes / 1e6,
        len(todo),
        len(files) - len(todo),
    )
    progress = _Progress(f"{label} -> {dest.uri}", total_files=len(todo), total_bytes=todo_bytes)
    failures: list[tuple[str, BaseException]] = []
    for batch in _batches(todo, workers * _BATCH_FILES_PER_WORKER, _BATCH_MAX_BYTES):
        results = run_batch(batch)
        failures += [
            (f.relpath, r) for f, r in zip(batch, results, strict=False) if isinstance(r, BaseException)
        ]
        progress.add(len(batch), sum(f.size for f in batch))
    progress.done()
    if failures:
        first = "; ".join(f"{name}: {exc}" for name, exc in failures[:3])
        raise RuntimeError(
            f"{len(failures)} of {len(todo)} transfers to {dest.uri} failed: {first}"
        ) from failures[0][1]
    return UploadReport(
        destination=dest.uri,
        uploaded=len(todo),
        skipped=len(files) - len(todo),
        bytes_uploaded=todo_bytes,
        total_objects=len(files),
        total_bytes=total_bytes,
    )


def _batches(files: Sequence[_SourceFile], max_files: int, max_bytes: int) -> Iterable[list[_SourceFile]]:
    batch: list[_SourceFile] = []
    size = 0
    for f in files:
        if batch and (len(batch) >= max_files or size + f.size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(f)
        size += f.size
    if batch:
        yield batch


class _Progress:
    """Logs files/s and MB/s at most every ``_LOG_INTERVAL_S`` seconds, and once at the end."""

    def __init__(self, label: str, *, total_files: int, total_bytes: int):
        self.label = label
        self.total_files = total_files
        self.total_bytes = total_bytes
        self.files = 0
        self.bytes = 0
        self.start = self.last = time.monotonic()
        self._lock = threading.Lock()

    def add(self, files: int, nbytes: int) -> None:
        with self._lock:
            self.files += files
            self.bytes += nbytes
            now = time.monotonic()
            if now - self.last >= _LOG_INTERVAL_S:
                self.last = now
                self._log("progress")

    def done(self) -> None:
        self._log("done")

    def _log(self, what: str) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        log.info(
            "%s %s: %d/%d files, %.1f/%.1f MB in %.1fs (%.1f files/s, %.2f MB/s)",
            self.label,
            what,
            self.files,
            self.total_files,
            self.bytes / 1e6,
            self.total_bytes / 1e6,
            elapsed,
            self.files / elapsed,
            self.bytes / 1e6 / elapsed,
        )


def upload_and_record(
    source: str,
    destination: str,
    *,
    workers: int,
    path: str,
    layout: str = LOOSE,
    shard_mb: float = DEFAULT_SHARD_MB,
    shard_files: int = 0,
) -> dict:
    """Upload ``source`` to ``destination`` (nothing when ``source`` is empty) and record it.

    Args:
        source: As for :func:`upload_dataset`, or empty: the images are already there.
        destination: The gs:// prefix.
        workers: Parallel transfers.
        path: Local file for the JSON record (the upload step's manifest artifact).
        layout: ``loose`` or ``packed`` (see :func:`upload_dataset`).
        shard_mb: Packed: the most MB per shard.
        shard_files: Packed: the most files per shard; 0: no limit.

    Returns:
        The record: source, destination, and the counts of :class:`UploadReport`.
    """
    record: dict = {"source": source, "destination": destination, "upload_skipped": not source}
    if source:
        report = upload_dataset(
            source, destination, workers=workers, layout=layout, shard_mb=shard_mb, shard_files=shard_files
        )
        record.update(dataclasses.asdict(report))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record
