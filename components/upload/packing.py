"""The upload step's packed layout: files into WebDataset tar shards, with an index each and a manifest.

The layout is ``worker.archives.packed``'s. Packing is idempotent and append-only:

- A file whose name, size and CRC32C match the latest member of that name is already packed:
  a rerun on the same source writes nothing at all.
- New and changed files go into new shards, numbered after every shard there; a shard is
  never rewritten (a changed file's old member stays, and the later one wins).
- A shard is written only if absent (a second packer racing for its number takes the next),
  then its index, then the manifest. A shard and index that an interrupted upload wrote but no
  manifest lists yet are adopted, so its files are not packed twice.
- A file that cannot be read is listed in the manifest's ``bad_members`` with the reason (and
  becomes an error row in the worker's results); every other file is still packed.
- Every name is checked before anything is written: a name with ``..``, an absolute path or an
  empty component is refused (``UnsafeMemberError``), so no member can unpack outside its folder.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from worker.archives import packed, tar
from worker.prefetch import prefetch_map
from worker.storage import Storage, folder, is_gcs, open_storage

log = logging.getLogger(__name__)

DEFAULT_SHARD_MB = 256
# Shards being uploaded while the next one is filled: bounds memory to a few shards.
_SHARDS_IN_FLIGHT = 2
_LOG_INTERVAL_S = 10.0


class PackSource(Protocol):
    """A file to pack: its name in the dataset, where to read it (a local path or a URI), its size,
    and its CRC32C where the source already knows it (GCS listings do).
    """

    relpath: str
    location: str
    size: int
    crc32c: str | None


@dataclass
class PackReport:
    """What ``Packer.pack`` did.

    Attributes:
        shards_written: New shards.
        packed: Files written into them.
        skipped: Files already packed unchanged.
        bad: Files that could not be read (listed in the manifest).
        bytes_written: Bytes of the new shards.
        seconds: Wall time.
    """

    shards_written: int = 0
    packed: int = 0
    skipped: int = 0
    bad: int = 0
    bytes_written: int = 0
    seconds: float = 0.0


@dataclass
class _Shard:
    """A shard being filled: its tar bytes so far and its index entries."""

    data: bytearray = field(default_factory=bytearray)
    members: list[packed.IndexEntry] = field(default_factory=list)

    def add(self, name: str, payload: bytes, mtime: float) -> None:
        self.data += tar.member_header(name, len(payload), mtime)
        self.members.append(packed.IndexEntry(name, len(self.data), len(payload), packed.crc32c(payload)))
        self.data += payload
        self.data += tar.padding(len(payload))


class _PackedDataset:
    """What is already packed at a destination: its shards in order, and each name's latest member."""

    def __init__(self, storage: Storage, dataset: str):
        self.storage = storage
        self.dataset = dataset
        self.dir = folder(packed.packed_dir(dataset))
        self._numbering = threading.Lock()  # shards are written by two threads
        listed = {o.uri[len(self.dir) :]: o for o in _listed(storage, self.dir)}
        self.manifest = packed.Manifest()
        if packed.MANIFEST_FILE in listed:
            self.manifest = packed.Manifest.decode(storage.read(self.dir + packed.MANIFEST_FILE))
        numbers = sorted(n for n in map(packed.shard_number, listed) if n is not None)
        self.next_number = (numbers[-1] + 1) if numbers else 0
        in_manifest = {s.shard for s in self.manifest.shards}
        self.shards = list(self.manifest.shards)
        for n in numbers:
            name, index = packed.shard_name(n), packed.index_name(n)
            if name in in_manifest:
                continue
            if index not in listed:
                log.warning("%s%s has no index (an interrupted upload?): it is left unused", self.dir, name)
                continue
            # An interrupted upload wrote this shard and its index but no manifest lists them yet.
            decoded = packed.ShardIndex.decode(storage.read(self.dir + index))
            if decoded.size == listed[name].size:
                log.info("adopting %s%s, written by an earlier upload that did not finish", self.dir, name)
                self.shards.append(packed.ShardRecord(name, index, len(decoded.members), decoded.size))
        self.latest: dict[str, packed.IndexEntry] = {}
        with ThreadPoolExecutor(16) as pool:
            for index in pool.map(
                lambda s: packed.ShardIndex.decode(storage.read(self.dir + s.index)), self.shards
            ):
                self.latest.update((m.name, m) for m in index.members)

    def holds(self, f: PackSource) -> bool:
        """Whether the latest member named like ``f`` has its size and CRC32C."""
        entry = self.latest.get(f.relpath)
        if entry is None or entry.size != f.size:
            return False
        if f.crc32c is None:
            try:
                f.crc32c = packed.crc32c(_read(f))  # only where the cheap size test could not tell
            except OSError:
                return False  # packing it will say why
        return f.crc32c == entry.crc32c

    def write_shard(self, shard: _Shard) -> packed.ShardRecord:
        """Write the shard under the next free number, then its index."""
        data = bytes(shard.data + tar.END_OF_ARCHIVE)
        while True:
            with self._numbering:
                number, self.next_number = self.next_number, self.next_number + 1
            name = packed.shard_name(number)
            if self.storage.write(self.dir + name, data, if_absent=True):
                break
            log.info("%s%s was taken by another upload; trying the next number", self.dir, name)
        index = packed.ShardIndex(name, len(data), packed.crc32c(data), shard.members)
        self.storage.write(self.dir + packed.index_name(number), index.encode(), if_absent=True)
        return packed.ShardRecord(name, packed.index_name(number), len(shard.members), len(data))

    def write_manifest(self, shards: list[packed.ShardRecord], bad: list[packed.BadMember]) -> bool:
        """Write the manifest unless it would say what it says already; True if written."""
        manifest = packed.Manifest(shards, bad)
        uri = self.dir + packed.MANIFEST_FILE
        if (
            self.storage.exists(uri)
            and manifest.encode() == packed.Manifest.decode(self.storage.read(uri)).encode()
        ):
            return False
        self.storage.write(uri, manifest.encode())
        return True


class Packer:
    """Packs files into shards under ``destination``/packed/ (see the module's docstring).

    Made before the source is fetched: it reads what is packed there already, so a missing
    bucket fails before a long download.

    Args:
        destination: The dataset's prefix (gs://, or a local folder).
        shard_mb: A shard is closed before it would pass this many MB (a bigger file gets a shard
            of its own).
        shard_files: And after this many files; 0: no limit.
        workers: Files read at once.
        project: Google Cloud project for the storage client.

    Raises:
        FileNotFoundError: The destination's bucket does not exist.
    """

    def __init__(
        self,
        destination: str,
        *,
        shard_mb: float = DEFAULT_SHARD_MB,
        shard_files: int = 0,
        workers: int = 16,
        project: str | None = None,
    ):
        if shard_mb <= 0 or shard_files < 0:
            raise ValueError(f"shard size must be positive: {shard_mb} MB, {shard_files} files")
        self.limit = int(shard_mb * 1e6)
        self.shard_files = shard_files
        self.workers = max(1, workers)
        self.dataset = _PackedDataset(open_storage(destination, project=project), destination)

    def pack(self, files: Sequence[PackSource]) -> PackReport:
        """Pack what of ``files`` is not packed already.

        Args:
            files: The source's files, each named by its path relative to the source.

        Returns:
            What was written and skipped.

        Raises:
            UnsafeMemberError: A file's name is absolute, has a ``..`` or empty component, a
                backslash or a NUL; nothing has been written.
        """
        started = time.monotonic()
        for f in files:
            packed.check_member_name(f.relpath)
        dataset = self.dataset
        todo = sorted((f for f in files if not dataset.holds(f)), key=lambda f: f.relpath)
        report = PackReport(skipped=len(files) - len(todo))
        log.info(
            "packing %d of %d files into %s (%d already packed)",
            len(todo),
            len(files),
            dataset.dir,
            report.skipped,
        )
        bad: list[packed.BadMember] = []
        progress = _Progress(len(todo))
        with (
            ThreadPoolExecutor(self.workers, thread_name_prefix="pack-read") as readers,
            ThreadPoolExecutor(_SHARDS_IN_FLIGHT, thread_name_prefix="pack-write") as writers,
        ):
            writing: list[Future] = []

            def close(shard: _Shard) -> None:
                while len([w for w in writing if not w.done()]) >= _SHARDS_IN_FLIGHT:
                    next(w for w in writing if not w.done()).result()
                writing.append(writers.submit(dataset.write_shard, shard))

            shard = _Shard()
            for f, payload in prefetch_map(_read_or_error, todo, readers, depth=2 * self.workers):
                if isinstance(payload, OSError):
                    reason = f"{type(payload).__name__}: {payload.strerror or payload}"
                    bad.append(packed.BadMember(f.relpath, reason))
                    log.warning("cannot read %s: %s", f.location, reason)
                    continue
                if shard.members and self._full(shard, f.relpath, len(payload)):
                    close(shard)
                    shard = _Shard()
                shard.add(f.relpath, payload, _mtime(f))
                report.packed += 1
                progress.add(len(payload))
            if shard.members:
                close(shard)
            new = sorted((w.result() for w in writing), key=lambda s: packed.shard_number(s.shard))
        report.shards_written = len(new)
        report.bytes_written = sum(s.size for s in new)
        report.bad = len(bad)
        # Earlier bad files that this source no longer has are kept: nothing says they were fixed.
        names = {f.relpath for f in files}
        kept_bad = [b for b in dataset.manifest.bad if b.name not in names]
        dataset.write_manifest(dataset.shards + new, kept_bad + bad)
        report.seconds = time.monotonic() - started
        progress.done(report)
        return report

    def _full(self, shard: _Shard, name: str, size: int) -> bool:
        """Whether adding a file of ``size`` bytes would take the shard past its limits."""
        entry_bytes = len(tar.member_header(name, size)) + size + len(tar.padding(size))
        return len(shard.data) + entry_bytes + len(tar.END_OF_ARCHIVE) > self.limit or bool(
            self.shard_files and len(shard.members) >= self.shard_files
        )


def _read(f: PackSource) -> bytes:
    if is_gcs(f.location):
        return open_storage(f.location).read(f.location)
    return Path(f.location).read_bytes()


def _read_or_error(f: PackSource) -> tuple[PackSource, bytes | OSError]:
    try:
        return f, _read(f)
    except OSError as exc:  # FileNotFoundError (a GCS object gone) included
        return f, exc


def _mtime(f: PackSource) -> float:
    if is_gcs(f.location):
        return 0
    try:
        return Path(f.location).stat().st_mtime
    except OSError:
        return 0


def _listed(storage: Storage, prefix: str) -> Iterator:
    """The objects under ``prefix``; none for a local folder not made yet (a missing bucket raises)."""
    if is_gcs(prefix) or Path(prefix).is_dir():
        yield from storage.list(prefix)


class _Progress:
    """Logs files/s and MB/s while packing, at most every ``_LOG_INTERVAL_S`` seconds."""

    def __init__(self, total: int):
        self.total, self.files, self.bytes = total, 0, 0
        self.start = self.last = time.monotonic()

    def add(self, nbytes: int) -> None:
        self.files += 1
        self.bytes += nbytes
        if (now := time.monotonic()) - self.last >= _LOG_INTERVAL_S:
            self.last = now
            elapsed = now - self.start
            log.info(
                "packed %d/%d files (%.1f files/s, %.1f MB/s)",
                self.files,
                self.total,
                self.files / elapsed,
                self.bytes / 1e6 / elapsed,
            )

    def done(self, report: PackReport) -> None:
        log.info(
            "packing done: %d files into %d new shard(s) (%.1f MB), %d skipped, %d unreadable, in %.1fs (%.1f files/s)",
            report.packed,
            report.shards_written,
            report.bytes_written / 1e6,
            report.skipped,
            report.bad,
            report.seconds,
            report.packed / max(report.seconds, 1e-9),
        )
