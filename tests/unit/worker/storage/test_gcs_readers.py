"""The GCS batch readers against the real emulator, through the latency-and-fault proxy.

The native reader process must keep a bounded window of requests in flight, retry 429/5xx and
dropped connections and count them; composed reads must never leave a temporary composite.
"""

from __future__ import annotations

import pytest

from tests.support.gcs_proxy import Faults, GcsProxy
from tests.support.helpers import jpeg_bytes
from worker.plan import Shard
from worker.read import Batch, read_batches
from worker.storage import ObjectInfo, ReadError, ReadSettings, ReadStats, StorageOptions
from worker.storage.gcs import COMPOSITES, GCSStorage
from worker.storage.gcs_reader import GCSReader


@pytest.fixture(scope="module")
def images(gcs) -> tuple[str, dict[str, bytes]]:
    bucket = gcs.new_bucket("readers")
    payloads = {f"img/{i:03d}.jpg": jpeg_bytes(i) for i in range(96)}
    b = gcs.client.bucket(bucket)
    for name, data in payloads.items():
        b.blob(name).upload_from_string(data)
    return bucket, payloads


@pytest.fixture()
def through(gcs, monkeypatch):
    """Route both GCS clients through a proxy with the given faults; yields the proxy."""

    def start(faults: Faults) -> GcsProxy:
        proxy = GcsProxy(gcs.url, faults).__enter__()
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        started.append(proxy)
        return proxy

    started: list[GcsProxy] = []
    yield start
    for proxy in started:
        proxy.__exit__(None, None, None)


def _objects(bucket: str, payloads: dict[str, bytes]) -> list[ObjectInfo]:
    return [ObjectInfo(f"gs://{bucket}/{name}", len(data)) for name, data in sorted(payloads.items())]


def _read_all(reader, objects: list[ObjectInfo], settings: ReadSettings, batch_size: int) -> list:
    shard = Shard(0, 0, len(objects))
    work = [
        Batch(shard, objects[i : i + batch_size], i + batch_size >= len(objects))
        for i in range(0, len(objects), batch_size)
    ]
    return [
        bytes(p) if not isinstance(p, ReadError) else p
        for b in read_batches(reader, work, settings)
        for p in b.payloads
    ]


def _check(objects: list[ObjectInfo], got: list, payloads: dict[str, bytes]) -> None:
    assert [p for p in got if isinstance(p, ReadError)] == []
    assert got == [payloads[o.uri.split("/", 3)[3]] for o in objects]


def _read_everything(images, settings: ReadSettings, batch_size: int) -> ReadStats:
    """Read every image with the native reader in batches, check each one's bytes, return the counts."""
    bucket, payloads = images
    objects = _objects(bucket, payloads)
    reader = GCSReader(settings, ReadStats())
    try:
        got = _read_all(reader, objects, settings, batch_size)
    finally:
        reader.close()
    _check(objects, got, payloads)
    return reader.stats


def test_requests_in_flight_are_bounded_by_the_concurrency(images, through):
    proxy = through(Faults(delay=0.02))
    settings = ReadSettings(concurrency=5, read_ahead_bytes=1 << 30)
    stats = _read_everything(images, settings, batch_size=16)
    # 96 reads of 20 ms each, never more than 5 at once, and the window keeps all 5 busy.
    assert proxy.counters.peak_reads_in_flight == 5
    assert stats.requests == 96 and stats.retries == 0


def test_the_read_ahead_bytes_bound_the_window(images, through):
    proxy = through(Faults(delay=0.02))
    # Plenty of request slots, but no more than one batch of planned bytes ahead.
    settings = ReadSettings(concurrency=64, read_ahead_bytes=1, batches_ahead=8)
    _read_everything(images, settings, batch_size=8)
    assert proxy.counters.peak_reads_in_flight == 8


def test_429_5xx_and_dropped_connections_are_retried_and_counted(images, through):
    proxy = through(Faults(unavailable=0.1, throttled=0.05, dropped=0.05, seed=3))
    settings = ReadSettings(concurrency=8, retry_deadline=60)
    stats = _read_everything(images, settings, batch_size=32)
    injected = sum(proxy.counters.injected.values())
    assert injected > 0 and all(proxy.counters.injected.values())
    assert stats.retries == injected
    assert stats.requests == proxy.counters.reads == 96 + injected


def test_a_missing_object_is_a_read_error_not_a_retry(images, gcs):
    bucket, payloads = images
    objects = _objects(bucket, payloads)[:3] + [ObjectInfo(f"gs://{bucket}/img/none.jpg", 10)]
    settings = ReadSettings(concurrency=4)
    reader = GCSReader(settings, ReadStats())
    try:
        got = reader.submit(objects).result()
    finally:
        reader.close()
    assert [bytes(p) for p in got[:3]] == [payloads[o.uri.split("/", 3)[3]] for o in objects[:3]]
    assert isinstance(got[3], ReadError) and "not found" in str(got[3]).lower()
    assert reader.stats.retries == 0


def test_composed_reads_give_each_object_its_bytes_in_3_requests_per_32(images, gcs):
    bucket, payloads = images
    objects = _objects(bucket, payloads)
    settings = ReadSettings(threads=2)
    reader = GCSStorage(StorageOptions(compose=True)).reader(settings, ReadStats())
    try:
        got = _read_all(reader, objects, settings, batch_size=64)
    finally:
        reader.close()
    _check(objects, got, payloads)
    assert reader.stats.requests == 3 * 3  # 96 objects: 3 composites of 32
    assert gcs.object_names(bucket, COMPOSITES) == []


@pytest.mark.parametrize("failure", ["source deleted after planning", "composite download refused"])
def test_failed_composite_reads_leave_no_temporary_objects(gcs, through, failure):
    bucket = gcs.new_bucket("compose-fail")
    payloads = {f"x/{i:02d}.jpg": jpeg_bytes(200 + i) for i in range(40)}
    b = gcs.client.bucket(bucket)
    for name, data in payloads.items():
        b.blob(name).upload_from_string(data)
    objects = _objects(bucket, payloads)
    if failure == "source deleted after planning":
        b.blob("x/03.jpg").delete()  # the emulator then fails the compose with a 500
    else:
        through(Faults(unavailable=1.0))  # every download answers 503: the composite's and each object's
    settings = ReadSettings(threads=2, retry_deadline=0.3)
    reader = GCSStorage(StorageOptions(compose=True)).reader(settings, ReadStats())
    try:
        got = _read_all(reader, objects, settings, batch_size=40)
    finally:
        reader.close()
    assert gcs.object_names(bucket, COMPOSITES) == []
    if failure == "source deleted after planning":
        for obj, data in zip(objects, got, strict=True):
            name = obj.uri.split("/", 3)[3]
            assert isinstance(data, ReadError) if name == "x/03.jpg" else data == payloads[name]
    else:
        assert all(isinstance(p, ReadError) for p in got)


AWKWARD = ["a/../up.jpg", "/lead.jpg", "a//double.jpg", "a/./dot.jpg", "trail/", "ctl\x01.jpg"]


def test_native_can_name_only_what_object_store_paths_express():
    from worker.storage.gcs_reader import native_can_name

    assert all(native_can_name(n) for n in ["a/b.jpg", "a/..b.jpg", "sp ace/ü.jpg", "x/%2F.jpg", "a\\b"])
    assert not any(native_can_name(n) for n in AWKWARD)


def test_names_obstore_cannot_express_are_read_through_the_json_api_without_retries(gcs):
    bucket = gcs.new_bucket("awkward")
    payloads = {name: f"bytes of {name!r}".encode() for name in [*AWKWARD, "plain/ok.jpg"]}
    for name, data in payloads.items():
        gcs.client.bucket(bucket).blob(name).upload_from_string(data)
    objects = _objects(bucket, payloads) + [ObjectInfo(f"gs://{bucket}/gone/../x.jpg", 3)]
    reader = GCSReader(ReadSettings(concurrency=4, retry_deadline=30), ReadStats())
    try:
        got = reader.submit(objects).result()
    finally:
        reader.close()
    assert [bytes(p) for p in got[:-1]] == [payloads[o.uri.split("/", 3)[3]] for o in objects[:-1]]
    assert isinstance(got[-1], ReadError) and "not found" in str(got[-1])
    assert reader.stats.retries == 0 and reader.stats.requests == len(objects)
