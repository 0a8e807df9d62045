"""The local filesystem backend. Writes are atomic: a temp file in the target folder, then a rename."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from worker.storage import BatchReader, ObjectInfo, ReadError, ReadSettings, ReadStats, StorageOptions
from worker.storage.reading import ThreadedReader

log = logging.getLogger(__name__)


class LocalStorage:
    """Local files under the same interface as GCS objects (no generations or checksums)."""

    def __init__(self, options: StorageOptions | None = None):
        self.options = options or StorageOptions()

    def list(self, prefix_uri: str) -> Iterator[ObjectInfo]:
        root = Path(prefix_uri)
        if root.is_file():
            yield ObjectInfo(str(root), root.stat().st_size)
            return
        if not root.is_dir():
            raise FileNotFoundError(f"input directory does not exist: {prefix_uri}")
        yield from self._walk(str(root))

    def _walk(self, folder: str) -> Iterator[ObjectInfo]:
        # scandir's entries know their type without a stat call: one syscall per file, not three.
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(entry.path)
            elif entry.is_file():
                yield ObjectInfo(entry.path, entry.stat().st_size)

    def list_pages(self, prefix_uri: str, parallelism: int = 8) -> Iterator[list[ObjectInfo]]:
        """The tree's files with their sizes, in pages, listed by several processes. Unordered.

        The cost is one stat() per file; threads would take turns on the GIL, so the
        folders are split between processes instead (spawned, since the caller may already
        run CUDA and other threads), each handing back one folder's files at a time.
        """
        root = Path(prefix_uri)
        tasks = _split_tree(str(root), parts=4 * parallelism) if parallelism > 1 and root.is_dir() else []
        if len(tasks) <= 1:
            yield from _pages(self.list(prefix_uri))
            return
        context = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(min(parallelism, len(tasks)), mp_context=context) as pool:
                for uris, sizes in pool.map(_list_folder, tasks):
                    yield list(map(ObjectInfo, uris, sizes))
        except BrokenProcessPool:
            # A spawned child re-imports __main__, which fails for a script read from stdin.
            log.warning("parallel listing of %s failed; listing it in this process", prefix_uri)
            yield from _pages(self.list(prefix_uri))

    def download(self, uri: str, path: str) -> None:
        shutil.copyfile(uri, path)

    def read(self, uri: str, *, offset: int = 0, length: int | None = None) -> bytes:
        if not offset and length is None:
            return Path(uri).read_bytes()
        with open(uri, "rb") as fh:
            fh.seek(offset)
            return fh.read(-1 if length is None else length)

    def read_range(self, uri: str, offset: int, length: int) -> bytes:
        fd = os.open(uri, os.O_RDONLY)
        try:
            chunks = []
            while length > 0 and (chunk := os.pread(fd, length, offset)):
                chunks.append(chunk)
                offset += len(chunk)
                length -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def read_many(self, objects: Sequence[ObjectInfo]) -> list[bytes | ReadError]:
        out: list[bytes | ReadError] = []
        for obj in objects:
            try:
                out.append(self.read(obj.uri))
            except OSError as exc:
                out.append(ReadError(f"read failed: {exc.strerror or exc}"))
        return out

    def reader(self, settings: ReadSettings, stats: ReadStats) -> BatchReader:
        return ThreadedReader(self.read_many, settings.threads, stats)

    def write(self, uri: str, data: bytes, *, if_absent: bool = False) -> bool:
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if if_absent:
                # link() fails if the target exists, so two writers can never both win.
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    return False
                return True
            os.replace(tmp, target)
            return True
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def exists(self, uri: str) -> bool:
        return Path(uri).exists()

    def delete(self, uri: str) -> bool:
        try:
            os.unlink(uri)
        except FileNotFoundError:
            return False
        return True

    def stat(self, uri: str) -> ObjectInfo | None:
        try:
            return ObjectInfo(uri, Path(uri).stat().st_size)
        except FileNotFoundError:
            return None

    def copy(self, source_uri: str, target_uri: str) -> None:
        target = Path(target_uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(source_uri, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def upload_files(self, pairs: Sequence[tuple[str, str]], *, workers: int) -> list[BaseException | None]:
        def one(pair: tuple[str, str]) -> BaseException | None:
            try:
                self.copy(*pair)
            except OSError as exc:
                return exc
            return None

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return list(pool.map(one, pairs))

    def discard_interrupted_writes(self, prefix_uri: str) -> int:
        """Remove the temp files of writes a killed process never finished; returns how many.

        Only safe while nothing else writes under the prefix, e.g. before a run's ranks start.
        """
        root = Path(prefix_uri)
        if not root.is_dir():
            return 0
        stale = [p for p in root.rglob(".*.tmp") if p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)


def _split_tree(root: str, parts: int, max_depth: int = 4) -> list[tuple[str, bool]]:
    """(folder, recursive) tasks covering the tree once: a folder is opened up, its own files
    becoming a non-recursive task, until there are ``parts`` recursive tasks or no deeper folders.
    """
    tasks = [(root, True)]
    for _ in range(max_depth):
        recursive = [folder for folder, deep in tasks if deep]
        if len(recursive) >= parts:
            break
        opened = []
        for folder, deep in tasks:
            opened.append((folder, False))
            if deep:
                with os.scandir(folder) as it:
                    opened.extend(
                        (e.path, True)
                        for e in sorted(it, key=lambda e: e.path)
                        if e.is_dir(follow_symlinks=False)
                    )
        if len(opened) == len(tasks):
            break  # no folder had subfolders left to open
        tasks = opened
    return tasks


def _list_folder(task: tuple[str, bool]) -> tuple[list[str], list[int]]:
    """One task of ``_split_tree``, as two columns (cheap to send back between processes)."""
    folder, recursive = task
    uris: list[str] = []
    sizes: list[int] = []
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        stack.append(entry.path)
                elif entry.is_file():
                    uris.append(entry.path)
                    sizes.append(entry.stat().st_size)
    return uris, sizes


_PAGE = 10_000


def _pages(objects: Iterator[ObjectInfo]) -> Iterator[list[ObjectInfo]]:
    page: list[ObjectInfo] = []
    for o in objects:
        page.append(o)
        if len(page) == _PAGE:
            yield page
            page = []
    if page:
        yield page
