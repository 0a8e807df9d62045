"""Tar archives: the bytes of a member's header (for packing), and the members of a tar object.

Shards are POSIX pax tars (what ``tarfile`` writes by default, and what WebDataset reads): a
512-byte header per member, a pax header before it for long or non-ASCII names, the data padded
to 512 bytes, and two zero blocks at the end.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Iterator
from typing import NamedTuple

from worker.storage import Storage

log = logging.getLogger(__name__)

BLOCK = tarfile.BLOCKSIZE
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
# A tar without an index is read in chunks this large to find its headers: small members mean
# every chunk holds headers anyway, and big ones are skipped over by seeking.
SCAN_CHUNK = 16 << 20


def member_header(name: str, size: int, mtime: float = 0) -> bytes:
    """The header block(s) of a regular-file member (a pax header first where the name needs one)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(mtime)
    info.mode = 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")


def padding(size: int) -> bytes:
    """The zeros that pad a member's data of ``size`` bytes to a whole block."""
    return b"\0" * (-size % BLOCK)


class TarMember(NamedTuple):
    """A regular file inside a tar: its name, where its data starts, and its size."""

    name: str
    offset: int
    size: int


def scan(storage: Storage, uri: str, size: int) -> Iterator[TarMember]:
    """Every regular-file member of the tar object ``uri`` (``size`` bytes), in order.

    Only headers are parsed; data is read only where it shares a chunk with headers. A tar cut
    short ends the listing with a warning: a member whose header is there but whose data is not
    is still listed (reading it then fails, so it becomes an error row rather than vanishing).

    Raises:
        tarfile.ReadError: The object is not a tar at all.
    """
    with tarfile.open(fileobj=RangeFile(storage, uri, size), mode="r:") as tar:
        while True:
            try:
                info = tar.next()
            except tarfile.ReadError as exc:
                log.warning(
                    "%s: the tar ends in a damaged or cut-off header (%s); listing what came before", uri, exc
                )
                return
            if info is None:
                return
            if info.isreg():
                yield TarMember(info.name, info.offset_data, info.size)


class RangeFile(io.RawIOBase):
    """A read-only, seekable file over an object, read in ``chunk``-sized ranged requests."""

    def __init__(self, storage: Storage, uri: str, size: int, chunk: int = SCAN_CHUNK):
        super().__init__()
        self.storage, self.uri, self.size, self.chunk = storage, uri, size, chunk
        self.position = 0
        self._start = 0
        self._buffer = memoryview(b"")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, target) -> int:
        want = min(len(target), self.size - self.position)
        if want <= 0:
            return 0
        got = 0
        while got < want:
            at = self.position - self._start
            if not 0 <= at < len(self._buffer):
                self._start = self.position
                self._buffer = memoryview(self.storage.read_range(self.uri, self.position, self.chunk))
                at = 0
                if not self._buffer:
                    break  # the object is shorter than listed
            n = min(want - got, len(self._buffer) - at)
            target[got : got + n] = self._buffer[at : at + n]
            got += n
            self.position += n
        return got
