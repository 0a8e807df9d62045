"""Plan entries for an input whose images lie in archives (``--input-layout``).

- ``packed``: the upload step's layout (``worker.archives.packed``). The manifest names the
  shards; their indexes give every member, so planning reads one small object per shard.
  An image's URI is the one it would have had loose: ``INPUT/<relative path>``.
- ``tar``: WebDataset-style tar shards a user already has, under the input prefix (or the input
  is one tar). They have no index, so each is read once at plan time for its headers.
- ``zip``: zip archives (or the input is one, such as COCO's ``val2017.zip`` uploaded as it is),
  listed from their central directories by two ranged reads each.

For tar and zip an image's URI is ``<archive URI>/<member name>``. Members are images by
extension, as loose objects are; other members are ignored. ``auto`` takes ``packed`` where the
input holds a manifest, an archive where the input names one, archives under the input where it
holds no loose images, and loose images otherwise.

Entries are ordered by archive and offset, so a batch's members are neighbours in one archive.
They come in pages, an archive (or a packed shard's index) at a time, read a bounded number of
archives ahead: a hundred million members are never held at once. Where two entries have one
URI (a name packed again after it changed, a tar that holds a name twice) the one listed last
is the file; the plan keeps it alone (``worker.plan_store.PlanDB.keep_last_per_uri``).
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from worker.archives import packed, tar
from worker.archives import zip as zip_format
from worker.archives.members import DAMAGED, UNPACKED, ZIP
from worker.config import WorkerConfig, is_image
from worker.prefetch import prefetch_map
from worker.storage import Member, ObjectInfo, Storage, folder

log = logging.getLogger(__name__)

LOOSE, PACKED, TAR, ZIP_LAYOUT = "loose", "packed", "tar", "zip"
ARCHIVE_EXTENSIONS = {TAR: ".tar", ZIP_LAYOUT: ".zip"}
# Archives listed at once on rank 0: each listing waits on the network, not on the CPU.
LISTING_THREADS = 16


def list_archived_input(cfg: WorkerConfig, storage: Storage) -> Iterator[list[ObjectInfo]] | None:
    """The input's plan entries, in pages, where its layout is known without listing it; None otherwise.

    None means: list the input (loose images, or with ``auto`` maybe archives, which
    ``archives_in_listing`` then takes).

    Raises:
        FileNotFoundError: ``--input-layout packed`` and there is no manifest, or the manifest
            names an index that is not there.
    """
    layout = cfg.input_layout
    if layout == LOOSE:
        return None
    manifest = packed.manifest_uri(cfg.input)
    if layout in ("auto", PACKED) and storage.exists(manifest):
        return packed_pages(storage, cfg.input)
    if layout == PACKED:
        raise FileNotFoundError(
            f"--input-layout packed: no {manifest} (upload the images with layout packed first)"
        )
    for kind, extension in ARCHIVE_EXTENSIONS.items():
        if layout in ("auto", kind) and cfg.input.lower().endswith(extension):
            info = storage.stat(cfg.input)
            if info is not None:
                return archive_pages(storage, [info], kind)
    if layout in ARCHIVE_EXTENSIONS:
        listed = list(storage.list(folder(cfg.input)))
        return archive_pages(storage, [o for o in listed if _kind_of(o.uri) == layout], layout)
    return None


def holds_images(storage: Storage, uri: str) -> bool:
    """Whether ``uri`` holds anything to classify, found cheaply: a packed manifest, an archive
    named by ``uri``, or an image or archive under it (the listing stops at the first).
    """
    if _kind_of(uri) and storage.stat(uri) is not None:
        return True
    if storage.exists(packed.manifest_uri(uri)):
        return True
    try:
        return any(is_image(o.uri) or _kind_of(o.uri) for o in storage.list(folder(uri)))
    except FileNotFoundError:
        return False


def archives_in_listing(storage: Storage, listed: Sequence[ObjectInfo]) -> Iterator[list[ObjectInfo]]:
    """``auto`` for an input without loose images: the images inside its tar and zip archives, in pages."""
    for kind in ARCHIVE_EXTENSIONS:
        archives = sorted((o for o in listed if _kind_of(o.uri) == kind), key=lambda o: o.uri)
        if archives:
            log.info(
                "the input holds no loose images but %d %s archive(s): reading those", len(archives), kind
            )
            yield from archive_pages(storage, archives, kind)


def is_archive(uri: str) -> bool:
    """Whether ``uri`` names a tar or zip archive (by extension)."""
    return _kind_of(uri) is not None


def _kind_of(uri: str) -> str | None:
    lower = uri.lower()
    return next((k for k, ext in ARCHIVE_EXTENSIONS.items() if lower.endswith(ext)), None)


def packed_pages(storage: Storage, dataset: str) -> Iterator[list[ObjectInfo]]:
    """Every image of a packed dataset, a shard's index at a time.

    The images that could not be read when the dataset was packed come first, each an error
    row, unless a later upload packed the name after all (its member, listed later, wins).

    Raises:
        FileNotFoundError: The manifest names a shard index that is not there.
    """
    manifest_uri = packed.manifest_uri(dataset)
    manifest = packed.Manifest.decode(storage.read(manifest_uri))
    shard_dir = folder(packed.packed_dir(dataset))
    # The shard objects, not their members: one per packed shard of thousands of images.
    listed = {o.uri: o for o in storage.list(shard_dir)}

    def read_index(record: packed.ShardRecord) -> packed.ShardIndex:
        uri = f"{shard_dir}{record.index}"
        try:
            return packed.ShardIndex.decode(storage.read(uri))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{uri}, listed in {manifest_uri}, is missing") from exc

    bad = [
        ObjectInfo(packed.member_uri(dataset, b.name), 0, member=Member(manifest_uri, 0, UNPACKED))
        for b in manifest.bad
        if is_image(b.name)
    ]
    if bad:
        log.warning(
            "%d image(s) could not be read when the dataset was packed (see %s)", len(bad), manifest_uri
        )
        yield bad
    members = 0
    with ThreadPoolExecutor(LISTING_THREADS) as pool:
        indexes = prefetch_map(read_index, manifest.shards, pool, LISTING_THREADS)
        for record, index in zip(manifest.shards, indexes, strict=True):
            uri = f"{shard_dir}{record.shard}"
            info = listed.get(uri)
            if info is None:
                log.warning("%s is missing: its members will be error rows", uri)
            elif info.size != index.size:
                log.warning(
                    "%s is %d bytes but its index says %d: members past its end will be error rows",
                    uri,
                    info.size,
                    index.size,
                )
            generation = info.generation if info else None
            page = [
                ObjectInfo(
                    packed.member_uri(dataset, entry.name),
                    entry.size,
                    generation,
                    entry.crc32c,
                    Member(uri, entry.offset),
                )
                for entry in sorted(index.members, key=lambda e: e.offset)
                if is_image(entry.name)
            ]
            members += len(page)
            if page:
                yield page
    log.info("packed input %s: %d shard(s), %d image member(s)", dataset, len(manifest.shards), members)


def archive_pages(storage: Storage, archives: Sequence[ObjectInfo], kind: str) -> Iterator[list[ObjectInfo]]:
    """The images inside tar or zip archive objects, by archive and offset, an archive at a time."""
    lister = _tar_entries if kind == TAR else _zip_entries
    entries = 0
    with ThreadPoolExecutor(LISTING_THREADS) as pool:
        listed = prefetch_map(
            lambda a: _listed_or_damaged(lister, storage, a), archives, pool, LISTING_THREADS
        )
        for page in listed:
            entries += len(page)
            if page:
                yield page
    log.info("%d image(s) in %d %s archive(s)", entries, len(archives), kind)


def _listed_or_damaged(lister, storage: Storage, archive: ObjectInfo) -> list[ObjectInfo]:
    try:
        return lister(storage, archive)
    except (ValueError, tarfile.TarError, OSError) as exc:
        # Its images are unknown; one error row for the archive says it was not read, and why is logged.
        log.error("%s could not be listed: %s", archive.uri, exc)
        return [ObjectInfo(archive.uri, 0, archive.generation, member=Member(archive.uri, 0, DAMAGED))]


def _tar_entries(storage: Storage, archive: ObjectInfo) -> list[ObjectInfo]:
    members: dict[str, tar.TarMember] = {}
    for m in tar.scan(storage, archive.uri, archive.size):
        name = m.name.removeprefix("./")
        if is_image(name):
            members[name] = m  # a name seen twice: the later member is the file, as tar extracts it
    return [
        ObjectInfo(f"{archive.uri}/{name}", m.size, archive.generation, member=Member(archive.uri, m.offset))
        for name, m in sorted(members.items(), key=lambda kv: kv[1].offset)
    ]


def _zip_entries(storage: Storage, archive: ObjectInfo) -> list[ObjectInfo]:
    return [
        ObjectInfo(
            f"{archive.uri}/{e.name}", e.length, archive.generation, member=Member(archive.uri, e.offset, ZIP)
        )
        for e in zip_format.central_directory(storage, archive.uri, archive.size)
        if is_image(e.name)
    ]
