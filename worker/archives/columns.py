"""Where a plan's images lie inside archives, in compact columns (``worker.plan.PlanColumns`` holds one).

A million members as ``Member`` tuples and base64 strings would be ~200 MB of Python objects to
pickle and broadcast to every rank; as columns they are ~25 MB: each archive's URI once, and per
member the archive's index, the offset, the format's index and the CRC32C as integers.
"""

from __future__ import annotations

import base64
from array import array

from worker.archives.members import DAMAGED, TAR, UNPACKED, ZIP
from worker.storage import Member, ObjectInfo

FORMATS = (TAR, ZIP, UNPACKED, DAMAGED)
_NONE = -1  # no CRC32C (CRC32C values are 0..2**32-1)


def _crc_to_int(crc32c: str | None) -> int:
    return _NONE if crc32c is None else int.from_bytes(base64.b64decode(crc32c), "big")


def _int_to_crc(value: int) -> str | None:
    return None if value == _NONE else base64.b64encode(value.to_bytes(4, "big")).decode("ascii")


class MemberColumns:
    """The ``member`` and ``crc32c`` of each plan entry, every entry being an archive member."""

    def __init__(self) -> None:
        self.archives: list[str] = []
        self._archive_index: dict[str, int] = {}
        self.archive_of = array("l")
        self.offsets = array("q")
        self.formats = bytearray()
        self.crc32cs = array("q")

    def append(self, o: ObjectInfo) -> None:
        archive = self._archive_index.get(o.member.archive)
        if archive is None:
            archive = self._archive_index[o.member.archive] = len(self.archives)
            self.archives.append(o.member.archive)
        self.archive_of.append(archive)
        self.offsets.append(o.member.offset)
        self.formats.append(FORMATS.index(o.member.format))
        self.crc32cs.append(_crc_to_int(o.crc32c))

    def get(self, i: int) -> dict:
        """Entry ``i``'s ``crc32c`` and ``member`` (``ObjectInfo`` fields)."""
        member = Member(self.archives[self.archive_of[i]], self.offsets[i], FORMATS[self.formats[i]])
        return {"crc32c": _int_to_crc(self.crc32cs[i]), "member": member}

    def __len__(self) -> int:
        return len(self.offsets)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MemberColumns) and all(
            getattr(self, k) == getattr(other, k)
            for k in ("archives", "archive_of", "offsets", "formats", "crc32cs")
        )

    def __getstate__(self) -> dict:
        # The lookup table is only needed while appending; the broadcast leaves it out.
        return {k: v for k, v in self.__dict__.items() if k != "_archive_index"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._archive_index = {a: i for i, a in enumerate(self.archives)}
