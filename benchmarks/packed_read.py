"""The packed read stage alone against a native ceiling: ``python -m benchmarks.packed_read``.

In one run, on any machine: generates JPEGs (``benchmarks.classifier``), packs them into
fake-gcs-server (memory backend, loopback) with ``upload_dataset(layout="packed")``, then, directly
and through a proxy that adds each ``--delays`` ms to every request (``tests.support.gcs_proxy``):

- **native**: obstore ``get_range_async`` over the same shard objects, ``--native-range-mb``
  ranges, ``--native-in-flight`` at once: what the emulator and the client can deliver;
- **read stage**: the worker's read stage over the packed plan (``worker.read.open_reader`` with
  ``archived=True``, ``read_batches`` at ``--batch-size``), no decode and no model.

It prints the median MB/s of ``--repeats`` alternated passes of each, the read stage over native, and requests per image.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.classifier import bench_images
from pipelines.dev.emulator import gcs_emulator
from tests.support.gcs_proxy import Faults, GcsProxy
from worker.archives.packed import packed_dir
from worker.config import parse_args
from worker.plan import list_input, make_shards
from worker.read import PlanInMemory, batches, open_reader, read_batches, read_settings
from worker.storage import open_storage, split_uri
from worker.storage.gcs_ranges import RangeReader
from worker.storage.gcs_reader import EMULATOR_HOST as EMULATOR_HOST_ENV

log = logging.getLogger("benchmarks.packed_read")
BUCKET = "packed-read-bench"


def native_ceiling(shards: list[tuple[str, int]], range_bytes: int, in_flight: int) -> tuple[float, int]:
    """Seconds and bytes for obstore to read every shard in ``range_bytes`` pieces, ``in_flight`` at once."""
    reader = RangeReader(retry_deadline=60)
    pieces = [
        (uri, at, min(range_bytes, size - at)) for uri, size in shards for at in range(0, size, range_bytes)
    ]

    async def read_all() -> int:
        import obstore

        queue = list(reversed(pieces))
        total = 0

        async def worker() -> None:
            nonlocal total
            while queue:
                uri, at, length = queue.pop()
                bucket, name = split_uri(uri)
                got = await obstore.get_range_async(reader._store(bucket), name, start=at, length=length)
                total += len(memoryview(got))

        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return total

    start = time.perf_counter()
    nbytes = asyncio.run(read_all())
    return time.perf_counter() - start, nbytes


def read_stage(prefix: str, label: str, batch_size: int, extra: list[str]) -> tuple[float, int, int, int]:
    """Seconds, bytes, requests and images of the worker's read stage over the packed plan."""
    # A backend of its own per label (its obstore stores bind the emulator address once).
    project = ["--project", f"bench-{label}"]
    cfg = parse_args(["--input", prefix, "--output", "/unused", "--model", "/unused", *project, *extra])
    plan = list_input(cfg).sorted()
    settings = read_settings(cfg, 1)
    reader = open_reader(cfg, settings, archived=True)
    start = time.perf_counter()
    images = 0
    try:
        for batch in read_batches(
            reader,
            batches(PlanInMemory(plan, 4 * batch_size), make_shards(len(plan), 4 * batch_size), batch_size),
            settings,
        ):
            images += sum(not isinstance(p, Exception) for p in batch.payloads)
    finally:
        reader.close()
    seconds = time.perf_counter() - start
    return seconds, reader.stats.bytes, reader.stats.requests, images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.packed_read",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", type=int, default=6144)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-mb", type=int, default=64, help="the packed layout's shard size")
    p.add_argument("--delays", default="0,50", help="ms added per request through the proxy")
    p.add_argument("--native-range-mb", type=float, default=8)
    p.add_argument("--native-in-flight", type=int, default=8)
    p.add_argument("--worker-args", default="", help="extra worker options for the read stage")
    p.add_argument("--repeats", type=int, default=5, help="passes of each, alternated; medians printed")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from components.upload.upload import upload_dataset

    work = Path(args.workdir or tempfile.mkdtemp(prefix="packed-read-"))
    paths = bench_images(work / "images", args.images)
    prefix = f"gs://{BUCKET}/dataset"
    rows = []
    with gcs_emulator(buckets=(BUCKET,)) as emulator:
        upload_dataset(str(work / "images"), prefix, layout="packed", shard_mb=args.shard_mb, workers=4)
        storage = open_storage(prefix)
        shards = [(o.uri, o.size) for o in storage.list(packed_dir(prefix)) if o.uri.endswith(".tar")]
        log.info("%d images in %d shards, %.0f MB", len(paths), len(shards), sum(s for _, s in shards) / 1e6)
        settings = [("direct", 0, emulator)]
        settings += [(f"proxy {d} ms", d, None) for d in (int(x) for x in args.delays.split(","))]
        for name, delay, url in settings:
            proxy = None if url else GcsProxy(emulator, Faults(delay=delay / 1e3)).__enter__()
            os.environ[EMULATOR_HOST_ENV] = url or proxy.url
            try:
                natives, stages = [], []
                for _ in range(args.repeats):  # alternated, so load from elsewhere hits both alike
                    n_sec, n_bytes = native_ceiling(
                        shards, int(args.native_range_mb * (1 << 20)), args.native_in_flight
                    )
                    r_sec, r_bytes, requests, images = read_stage(
                        prefix, name.replace(" ", "-"), args.batch_size, args.worker_args.split()
                    )
                    natives.append(n_bytes / n_sec / 1e6)
                    stages.append(r_bytes / r_sec / 1e6)
            finally:
                os.environ[EMULATOR_HOST_ENV] = emulator
                if proxy is not None:
                    proxy.__exit__(None, None, None)
            native, stage = statistics.median(natives), statistics.median(stages)
            rows.append(
                (
                    name,
                    f"{native:,.0f}",
                    f"{stage:,.0f}",
                    f"{stage / native:.2f}",
                    f"{requests / images:.4f}",
                    f"{images:,}",
                )
            )
            log.info("%s: native %.0f MB/s, read stage %.0f MB/s", name, native, stage)
    print(
        f"\n{len(paths):,} JPEGs, {args.repeats} passes, {len(shards)} shards of <= {args.shard_mb} MB, batch {args.batch_size}, "
        f"native {args.native_in_flight} x {args.native_range_mb} MiB, worker args: {args.worker_args or '-'}"
    )
    print("\n| path | native MB/s | read stage MB/s | read stage / native | requests / image | images |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
