"""The listing fanned out over prefixes: every object once, from many listers, in bounded memory."""

from __future__ import annotations

import threading

import pytest

from worker.storage import ObjectInfo, open_storage
from worker.storage.fan_out import fan_out
from worker.storage.gcs import COMPOSITES


def _tree(depth: int, fan: int, per_level: int):
    """A synthetic tree: each prefix holds ``per_level`` objects in two pages and ``fan`` sub-prefixes."""
    listed_by: dict[str, set[str]] = {}

    def level(prefix: str):
        listed_by.setdefault(prefix, set()).add(threading.current_thread().name)
        subs = [f"{prefix}p{i}/" for i in range(fan)] if prefix.count("/") < depth else []
        objects = [ObjectInfo(f"{prefix}o{i}.jpg", i) for i in range(per_level)]
        half = len(objects) // 2
        yield objects[:half], subs[:1]
        yield objects[half:], subs[1:]

    return level, listed_by


def test_fan_out_lists_every_object_once_across_listers():
    level, listed_by = _tree(depth=3, fan=3, per_level=4)
    uris = [o.uri for page in fan_out(level, "", listers=6) for o in page]
    prefixes = 1 + 3 + 9 + 27
    assert len(uris) == len(set(uris)) == prefixes * 4
    assert len(listed_by) == prefixes and all(len(names) == 1 for names in listed_by.values())
    assert len({n for names in listed_by.values() for n in names}) > 1, "the work spread over listers"


def test_a_listers_error_reaches_the_consumer_and_an_abandoned_listing_stops():
    def failing(prefix: str):
        yield [ObjectInfo(prefix + "a.jpg", 1)], ["deeper/"]
        if prefix:
            raise PermissionError("403 on deeper/")

    with pytest.raises(PermissionError, match="403"):
        list(fan_out(failing, "", listers=2))
    level, listed_by = _tree(depth=6, fan=4, per_level=10)
    pages = fan_out(level, "", listers=4)
    next(pages)
    pages.close()
    for thread in [t for t in threading.enumerate() if t.name.startswith("list-")]:
        thread.join(timeout=10)
        assert not thread.is_alive()
    # The listers stopped instead of listing the other thousands of prefixes.
    assert len(listed_by) < 100 < sum(4**d for d in range(7))


def test_gcs_listing_fans_out_over_nested_and_awkward_prefixes(gcs):
    bucket = gcs.new_bucket("fanout")
    names = [f"d{i % 4}/e{i % 3}/{i:03d}.jpg" for i in range(60)]
    names += ["top.jpg", "/lead.jpg", "a//double.jpg", "a/../up.jpg", "deep/" * 8 + "x.jpg"]
    names += [f"{COMPOSITES}tmp", f"d0/{COMPOSITES}kept.jpg", "placeholder/"]
    b = gcs.client.bucket(bucket)
    for name in names:
        b.blob(name).upload_from_string(b"x" * (len(name) % 7))
    storage = open_storage(f"gs://{bucket}/x")
    pages = list(storage.list_pages(f"gs://{bucket}/", parallelism=2))
    listed = sorted(o for page in pages for o in page)
    # The bucket's composites folder and folder placeholders are not data; everything else is,
    # with its size and generation, as the plain listing gives them.
    assert listed == sorted(storage.list(f"gs://{bucket}/"))
    assert {o.uri.split("/", 3)[3] for o in listed} == set(names) - {f"{COMPOSITES}tmp", "placeholder/"}
    assert all(o.generation for o in listed)
