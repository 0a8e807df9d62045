"""The local backend: listing (serial and parallel) and cleanup after interrupted writes."""

from __future__ import annotations

import os

from worker.storage import ObjectInfo
from worker.storage.local import LocalStorage


def test_local_listing_finds_nested_files_with_sizes_and_skips_symlinked_folders(tmp_path):
    root = tmp_path / "in"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"1")
    (root / "b" / "c.jpg").write_bytes(b"22")
    (root / "b" / "deep" / "d.jpg").write_bytes(b"333")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "e.jpg").write_bytes(b"4444")
    os.symlink(outside, root / "b" / "link")  # a loop or a foreign tree must not be walked
    os.symlink(root / "a.jpg", root / "z.jpg")  # a symlinked file is an input like any other

    listed = sorted(LocalStorage().list(str(root)))
    assert listed == [
        ObjectInfo(str(root / "a.jpg"), 1),
        ObjectInfo(str(root / "b" / "c.jpg"), 2),
        ObjectInfo(str(root / "b" / "deep" / "d.jpg"), 3),
        ObjectInfo(str(root / "z.jpg"), 1),
    ]


def test_interrupted_local_writes_are_discarded_and_finished_ones_kept(tmp_path):
    storage = LocalStorage()
    storage.write(str(tmp_path / "parts" / "part-00000.csv"), b"done")
    (tmp_path / "parts" / ".part-00001.csv.abc123.tmp").write_bytes(b"half")
    (tmp_path / "summary").mkdir()
    (tmp_path / "summary" / ".rank-0.json.x.tmp").write_bytes(b"{")
    assert storage.discard_interrupted_writes(str(tmp_path)) == 2
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "parts/part-00000.csv"
    ]
    assert storage.discard_interrupted_writes(str(tmp_path / "missing")) == 0


def test_parallel_local_listing_matches_the_serial_one(tmp_path, caplog):
    root = tmp_path / "in"
    expected = []
    for i in range(40):
        folder = root / f"d{i % 5}" / f"e{i % 3}" / ("f" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i}.jpg"
        path.write_bytes(b"x" * i)
        expected.append(ObjectInfo(str(path), i))
    (root / "top.jpg").write_bytes(b"top")
    expected.append(ObjectInfo(str(root / "top.jpg"), 3))
    os.symlink(root / "d0", root / "d9-link")

    storage = LocalStorage()
    assert sorted(storage.list(str(root))) == sorted(expected)
    with caplog.at_level("WARNING"):
        pages = list(storage.list_pages(str(root), parallelism=3))
    listed = [o for page in pages for o in page]
    assert len(pages) > 1, "streamed a folder at a time, not as one list"
    assert sorted(listed) == sorted(expected)  # every file once: no folder listed twice or skipped
    assert "failed" not in caplog.text, "the processes must do the listing, not the serial fallback"
