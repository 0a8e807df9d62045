"""The packed layout: a dataset's files in WebDataset tar shards, an index per shard, and a manifest.

What the upload step writes (``components.upload.packing``) and the worker plans from::

    DATASET/packed/manifest.json            the shards in order, and the files that could not be packed
    DATASET/packed/shard-000000.tar         files as tar members named by their relative paths
    DATASET/packed/shard-000000.index.json  each member's name, data offset, size and CRC32C

A file's URI is ``DATASET/<relative path>``: the URI it would have had if uploaded loose to
DATASET, so a packed run and a loose run of the same images write the same rows. Shards are
written once and never rewritten: a later upload adds new ones, and where a name is in several
shards, the last one's member is the file (it changed at the source). A shard's index is written
after the shard, and the manifest after both: a run plans from the manifest, so it never sees a
shard that is still being written.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from worker.storage import join

PACKED_DIR = "packed"
MANIFEST_FILE = "manifest.json"
FORMAT = "kfp-batch-inference/packed"
VERSION = 1
SHARD_FILE = re.compile(r"shard-(\d{6,})\.tar")


class UnsafeMemberError(ValueError):
    """A member name that could land outside the folder it is extracted into."""


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def index_name(number: int) -> str:
    return f"shard-{number:06d}.index.json"


def shard_number(name: str) -> int | None:
    """The number of a shard's file name; None for any other name."""
    m = SHARD_FILE.fullmatch(name)
    return int(m.group(1)) if m else None


def packed_dir(dataset_uri: str) -> str:
    return join(dataset_uri, PACKED_DIR)


def manifest_uri(dataset_uri: str) -> str:
    return join(dataset_uri, PACKED_DIR, MANIFEST_FILE)


def member_uri(dataset_uri: str, name: str) -> str:
    """The URI result rows give a member of a packed dataset (see the module's docstring)."""
    return join(dataset_uri, name)


def crc32c(data: bytes | memoryview) -> str:
    """CRC32C as GCS writes it: base64 of the big-endian 4 bytes."""
    import google_crc32c

    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode("ascii")


def file_crc32c(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """``crc32c`` of a file's bytes, read in chunks (a model's weights need not fit in memory)."""
    import google_crc32c

    checksum = google_crc32c.Checksum()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            checksum.update(block)
    return base64.b64encode(checksum.digest()).decode("ascii")


def check_member_name(name: str) -> None:
    """Refuse a name that is not a plain relative path: it could escape where it is unpacked.

    Raises:
        UnsafeMemberError: Empty, absolute (``/x``, or a drive letter), a ``..`` or ``.`` or empty
            component, a backslash or a NUL; the message names it.
    """
    if not name:
        raise UnsafeMemberError("empty member name")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise UnsafeMemberError(f"member name is an absolute path: {name!r}")
    if "\\" in name or "\0" in name:
        raise UnsafeMemberError(f"member name has a backslash or NUL: {name!r}")
    parts = name.split("/")
    if ".." in parts:
        raise UnsafeMemberError(f"member name escapes its folder with '..': {name!r}")
    if any(p in ("", ".") for p in parts):
        raise UnsafeMemberError(f"member name has an empty or '.' component: {name!r}")


class IndexEntry(NamedTuple):
    """One member of a shard: its name, where its data starts, its size and its CRC32C."""

    name: str
    offset: int
    size: int
    crc32c: str


@dataclass
class ShardIndex:
    """A shard's index: the shard's own size and CRC32C, and its members in offset order."""

    shard: str
    size: int
    crc32c: str
    members: list[IndexEntry]

    def encode(self) -> bytes:
        doc = {
            "format": f"{FORMAT}-index",
            "version": VERSION,
            "shard": self.shard,
            "size": self.size,
            "crc32c": self.crc32c,
            "columns": list(IndexEntry._fields),
            "members": [list(m) for m in self.members],
        }
        return (json.dumps(doc, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> ShardIndex:
        doc = json.loads(data)
        _check_format(doc, f"{FORMAT}-index")
        return cls(doc["shard"], int(doc["size"]), doc["crc32c"], [IndexEntry(*m) for m in doc["members"]])


class ShardRecord(NamedTuple):
    """A shard as the manifest lists it."""

    shard: str
    index: str
    members: int
    size: int


class BadMember(NamedTuple):
    """A source file that could not be packed, and why."""

    name: str
    reason: str


@dataclass
class Manifest:
    """The dataset's table of contents: its shards in the order they were written, and its bad files."""

    shards: list[ShardRecord] = field(default_factory=list)
    bad: list[BadMember] = field(default_factory=list)

    def encode(self) -> bytes:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "shards": [s._asdict() for s in self.shards],
            "members": sum(s.members for s in self.shards),
            "bytes": sum(s.size for s in self.shards),
            "bad_members": [b._asdict() for b in self.bad],
        }
        return (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        doc = json.loads(data)
        _check_format(doc, FORMAT)
        return cls(
            [ShardRecord(**s) for s in doc["shards"]], [BadMember(**b) for b in doc.get("bad_members", [])]
        )


def _check_format(doc: dict, expected: str) -> None:
    if doc.get("format") != expected or int(doc.get("version", 0)) > VERSION:
        raise ValueError(
            f"not a {expected} file of version {VERSION} or older "
            f"(format {doc.get('format')!r}, version {doc.get('version')!r})"
        )
