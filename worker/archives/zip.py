"""Zip archives read in place: the central directory by ranged reads, each member from its local record.

A zip ends with its central directory: one entry per member with its name, sizes, CRC-32 and
where its local file header is. Two ranged reads (the tail, then the directory) list every
member of, say, COCO's ``val2017.zip`` without reading its 800 MB. A member's bytes are then its
*local record*, from its local header to the next member's: the header (whose extra field may
differ from the directory's, so the data's offset is only known once it is read), the data,
stored or deflated, and an optional data descriptor. ZIP64 archives (over 4 GB or 65,535
members) are read too.
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

from worker.storage import Storage

_EOCD = struct.Struct("<IHHHHIIH")  # end of central directory record
_EOCD_SIG = 0x06054B50
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_ZIP64_LOCATOR_SIG = 0x07064B50
_ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")
_ZIP64_EOCD_SIG = 0x06064B50
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_CENTRAL_SIG = 0x02014B50
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_LOCAL_SIG = 0x04034B50
_DESCRIPTOR_SIG = 0x08074B50
_ZIP64_EXTRA = 0x0001
_MAX_COMMENT = 0xFFFF
_ENCRYPTED = 0x1
_HAS_DESCRIPTOR = 0x8
_UTF8 = 0x800
STORED, DEFLATED = 0, 8


class ZipEntry(NamedTuple):
    """A file in the zip: its name, where its local record starts, and the record's length
    (up to the next record, or to the central directory).
    """

    name: str
    offset: int
    length: int


def central_directory(storage: Storage, uri: str, size: int) -> list[ZipEntry]:
    """Every file (not folder) of the zip object ``uri`` of ``size`` bytes, in the order of their records.

    Raises:
        ValueError: The object is not a zip, or its directory is damaged; the message says where.
    """
    tail_start = max(0, size - (_EOCD.size + _MAX_COMMENT + _ZIP64_LOCATOR.size))
    tail = bytes(storage.read_range(uri, tail_start, size - tail_start))
    at = tail.rfind(struct.pack("<I", _EOCD_SIG))
    if at < 0 or len(tail) - at < _EOCD.size:
        raise ValueError(f"{uri} is not a zip archive (no end-of-central-directory record)")
    _, _, _, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    locator_at = at - _ZIP64_LOCATOR.size
    if locator_at >= 0 and struct.unpack_from("<I", tail, locator_at)[0] == _ZIP64_LOCATOR_SIG:
        eocd64_offset = _ZIP64_LOCATOR.unpack_from(tail, locator_at)[2]
        record = bytes(storage.read_range(uri, eocd64_offset, _ZIP64_EOCD.size))
        fields = _ZIP64_EOCD.unpack_from(record) if len(record) == _ZIP64_EOCD.size else None
        if fields is None or fields[0] != _ZIP64_EOCD_SIG:
            raise ValueError(f"{uri}: damaged ZIP64 end-of-central-directory record")
        count, cd_size, cd_offset = fields[7], fields[8], fields[9]
    directory = bytes(storage.read_range(uri, cd_offset, cd_size))
    if len(directory) != cd_size:
        raise ValueError(f"{uri}: the central directory runs past the end of the object (truncated?)")
    entries = sorted(_entries(directory, count, uri), key=lambda e: e[1])
    ends = [offset for _, offset in entries[1:]] + [cd_offset]
    return [
        ZipEntry(name, offset, end - offset)
        for (name, offset), end in zip(entries, ends, strict=True)
        if not name.endswith("/")
    ]


def _entries(directory: bytes, count: int, uri: str) -> list[tuple[str, int]]:
    """(name, local header offset) of every entry of the central directory."""
    out = []
    pos = 0
    for _ in range(count):
        if pos + _CENTRAL.size > len(directory):
            raise ValueError(f"{uri}: the central directory ends after {len(out)} of {count} entries")
        fields = _CENTRAL.unpack_from(directory, pos)
        if fields[0] != _CENTRAL_SIG:
            raise ValueError(f"{uri}: damaged central directory entry at byte {pos} of it")
        flags, csize, usize = fields[3], fields[8], fields[9]
        name_len, extra_len, comment_len, offset = fields[10], fields[11], fields[12], fields[16]
        start = pos + _CENTRAL.size
        name = directory[start : start + name_len].decode("utf-8" if flags & _UTF8 else "cp437")
        extra = directory[start + name_len : start + name_len + extra_len]
        _, _, offset = _zip64_sizes(extra, usize, csize, offset)
        out.append((name, offset))
        pos = start + name_len + extra_len + comment_len
    return out


def _zip64_sizes(extra: bytes, usize: int, csize: int, offset: int | None = None) -> tuple:
    """Sizes (and offset) from a ZIP64 extra field, for those whose 32-bit field is saturated."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == _ZIP64_EXTRA:
            values = iter(struct.unpack_from(f"<{length // 8}Q", extra, pos + 4))
            if usize == 0xFFFFFFFF:
                usize = next(values)
            if csize == 0xFFFFFFFF:
                csize = next(values)
            if offset == 0xFFFFFFFF:
                offset = next(values)
            break
        pos += 4 + length
    return usize, csize, offset


def extract(record: bytes | memoryview) -> bytes:
    """A member's file bytes from its local record, checked against its CRC-32.

    Raises:
        ValueError: The record is damaged or cut short, encrypted, compressed by a method other
            than stored or deflate, or its CRC-32 does not match.
    """
    if len(record) < _LOCAL.size or struct.unpack_from("<I", record)[0] != _LOCAL_SIG:
        raise ValueError("no zip local file header where the directory says")
    _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len = _LOCAL.unpack_from(record)
    if flags & _ENCRYPTED:
        raise ValueError("the zip member is encrypted")
    start = _LOCAL.size + name_len + extra_len
    extra = bytes(record[_LOCAL.size + name_len : start])
    usize, csize, _ = _zip64_sizes(extra, usize, csize)
    if method == DEFLATED:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        data = inflater.decompress(record[start:])
        if not inflater.eof:
            raise ValueError("the zip member's deflate stream is cut short (archive truncated?)")
        if flags & _HAS_DESCRIPTOR:
            crc = _descriptor_crc(inflater.unused_data)
    elif method == STORED:
        if flags & _HAS_DESCRIPTOR:  # streamed: sizes and CRC-32 come after the data
            data, crc = _stored_before_descriptor(record[start:])
        else:
            data = bytes(record[start : start + csize])
            if len(data) != csize:
                raise ValueError("the zip member's data is cut short (archive truncated?)")
    else:
        raise ValueError(f"zip compression method {method} is not supported (only stored and deflate)")
    if zlib.crc32(data) != crc:
        raise ValueError("the zip member's CRC-32 does not match its data (corrupt member)")
    return data


# A data descriptor's layouts: with or without its signature, 32- or 64-bit (ZIP64) sizes.
_DESCRIPTORS = (("<IIII", True), ("<IIQQ", True), ("<III", False), ("<IQQ", False))


def _stored_before_descriptor(rest: bytes | memoryview) -> tuple[bytes, int]:
    """A stored member's data and CRC-32 where its local header has no sizes (a streamed zip).

    The record runs from the data to the next record, so the descriptor is its last bytes: the
    layout whose compressed size equals the bytes before it is the one written.
    """
    for layout, signed in _DESCRIPTORS:
        n = struct.calcsize(layout)
        if len(rest) < n:
            continue
        fields = struct.unpack_from(layout, rest, len(rest) - n)
        if signed:
            if fields[0] != _DESCRIPTOR_SIG:
                continue
            fields = fields[1:]
        crc, csize = fields[0], fields[1]
        if csize == len(rest) - n:
            return bytes(rest[:csize]), crc
    raise ValueError("the stored zip member's data descriptor is missing or damaged (archive truncated?)")


def _descriptor_crc(after_data: bytes) -> int:
    if len(after_data) >= 8 and struct.unpack_from("<I", after_data)[0] == _DESCRIPTOR_SIG:
        return struct.unpack_from("<I", after_data, 4)[0]
    if len(after_data) >= 4:
        return struct.unpack_from("<I", after_data)[0]
    raise ValueError("the zip member's data descriptor is missing (archive truncated?)")
