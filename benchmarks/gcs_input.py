"""The gs:// input path: ``python -m benchmarks.gcs_input`` on a GPU machine (``--device cpu`` anywhere).

In one run it starts fake-gcs-server (memory backend) on loopback, uploads COCO-like JPEGs, and,
through a proxy that adds 0 / 20 / 50 ms to every request (``tests/support/gcs_proxy.py``, several
processes on one port), prints:

- the native client's ceiling on that emulator: obstore under asyncio, 64 and 512 requests in
  flight, in this process (and at 0 ms straight to the emulator, without the proxy),
- google-cloud-storage's rate in threads and in processes (the alternative the reader was chosen
  against),
- the worker's read stage (``worker.read.read_batches``) with the native reader and with
  ``--compose``,
- the worker end to end on the device from gs://, with GPU busy and the host's busy cores
  (``/proc/stat`` sampled over the processing window), against the same worker on local disk,
- peak host RSS of one rank with 10 k and with 1 M planned images.

The memory rows need no million uploads: the plan file is written beforehand (the worker reuses
a plan it finds, as on a resume) and every shard but the first few is marked committed, so both
runs decode, hold and share the whole plan and then read the same real objects; the listing
itself is not part of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.classifier import bench_images
from pipelines.dev.emulator import gcs_emulator
from pipelines.dev.ports import unused_port
from pipelines.dev.random_model import make_model

log = logging.getLogger("benchmarks.gcs_input")

BUCKET = "bench-images"
PREFIX = "img"
ROOT = Path(__file__).resolve().parents[1]


class CpuSampler:
    """The host's busy cores over time, from /proc/stat, sampled in a thread."""

    def __init__(self, interval: float = 0.2):
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    @staticmethod
    def _busy_seconds() -> float:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.samples.append((time.monotonic(), self._busy_seconds()))

    def __enter__(self) -> CpuSampler:
        self.samples.append((time.monotonic(), self._busy_seconds()))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), self._busy_seconds()))

    def cores(self, start: float | None = None, end: float | None = None) -> float:
        """Mean busy cores between ``start`` and ``end`` (default: the whole sampling)."""
        window = [
            s for s in self.samples if (start is None or s[0] >= start) and (end is None or s[0] <= end)
        ]
        if len(window) < 2:
            return float("nan")
        (t0, b0), (t1, b1) = window[0], window[-1]
        return (b1 - b0) / (t1 - t0)


@contextmanager
def proxy(upstream: str, delay_ms: float, processes: int):
    """``processes`` proxy processes sharing one port, adding ``delay_ms`` to every request."""
    port = unused_port()
    cmd = [sys.executable, "-m", "tests.support.gcs_proxy", "--upstream", upstream, "--port", str(port)]
    procs = [
        subprocess.Popen([*cmd, "--delay", str(delay_ms / 1e3)], cwd=ROOT, stdin=subprocess.DEVNULL)
        for _ in range(processes)
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the proxy did not start") from None
                time.sleep(0.05)  # polling a server's readiness
        yield url
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


@contextmanager
def storage_at(url: str):
    """Point every GCS client made inside the block at ``url`` (the emulator or a proxy)."""
    from worker import storage

    previous = os.environ["STORAGE_EMULATOR_HOST"]
    os.environ["STORAGE_EMULATOR_HOST"] = url
    storage.register(storage.GCS, "worker.storage.gcs:GCSStorage")  # drops backends made before
    try:
        yield
    finally:
        os.environ["STORAGE_EMULATOR_HOST"] = previous
        storage.register(storage.GCS, "worker.storage.gcs:GCSStorage")


def upload(paths: list[Path], data: Path) -> list[tuple[str, int]]:
    from google.cloud import storage
    from google.cloud.storage import transfer_manager

    bucket = storage.Client().create_bucket(BUCKET)
    names = [f"{PREFIX}/{p.relative_to(data).as_posix()}" for p in paths]
    results = transfer_manager.upload_many(
        [(str(p), bucket.blob(n)) for p, n in zip(paths, names, strict=True)], max_workers=32
    )
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise RuntimeError(f"{len(failed)} uploads failed: {failed[0]}")
    return [(n, p.stat().st_size) for p, n in zip(paths, names, strict=True)]


def native_rate(emulator: str, objects: list[tuple[str, int]], concurrency: int) -> float:
    """Objects/s of obstore under asyncio with ``concurrency`` GETs in flight (the ceiling)."""
    import obstore
    from obstore.store import GCSStore

    from worker.storage.gcs_reader import emulator_credentials, emulator_store_options

    credentials = emulator_credentials(emulator)
    store = GCSStore(BUCKET, **emulator_store_options(emulator, credentials))

    async def read_all() -> int:
        slots = asyncio.Semaphore(concurrency)

        async def one(name: str) -> int:
            async with slots:
                result = await obstore.get_async(store, name)
                return len(await result.bytes_async())

        return sum(await asyncio.gather(*(one(n) for n, _ in objects)))

    start = time.perf_counter()
    total = asyncio.run(read_all())
    seconds = time.perf_counter() - start
    os.unlink(credentials)
    assert total == sum(s for _, s in objects)
    return len(objects) / seconds


def _gcs_read(names: list[str]) -> int:
    from google.cloud import storage

    bucket = storage.Client().bucket(BUCKET)
    return sum(len(bucket.blob(n).download_as_bytes()) for n in names)


def gcs_threads_rate(objects: list[tuple[str, int]], threads: int, processes: int = 0) -> float:
    """Objects/s of google-cloud-storage: ``threads`` threads (a client each), or ``processes``
    processes of ``threads`` threads each.
    """
    names = [n for n, _ in objects]
    workers = threads * max(1, processes)
    chunks = [names[i::workers] for i in range(workers)]
    if processes:
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(gcs_threads_rate_part, [[[]]] * processes))  # started and imported, untimed
            start = time.perf_counter()
            total = sum(pool.map(gcs_threads_rate_part, [chunks[i::processes] for i in range(processes)]))
            seconds = time.perf_counter() - start
    else:
        with ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            total = sum(pool.map(_gcs_read, chunks))
            seconds = time.perf_counter() - start
    assert total == sum(s for _, s in objects)
    return len(objects) / seconds


def gcs_threads_rate_part(chunks: list[list[str]]) -> int:
    with ThreadPoolExecutor(len(chunks)) as pool:
        return sum(pool.map(_gcs_read, chunks))


def worker_config(input_uri: str, output: Path, model: Path, args, **overrides):
    from worker.config import WorkerConfig

    return WorkerConfig(
        input=input_uri,
        output=str(output),
        model=str(model),
        device=args.device,
        batch_size=args.batch_size,
        shard_size=4 * args.batch_size,
        log_interval=5.0,
        list_processes=4,
        compile=args.compile,
        **overrides,
    )


def read_stage_rate(objects: list[tuple[str, int]], args, model: Path, **overrides) -> dict:
    """Objects/s of the worker's read stage alone, with its default settings."""
    from worker.plan import make_shards
    from worker.read import PlanInMemory, batches, open_reader, read_batches, read_settings
    from worker.storage import ObjectInfo, ReadError

    cfg = worker_config(f"gs://{BUCKET}/{PREFIX}", Path("/unused"), model, args, **overrides)
    plan = [ObjectInfo(f"gs://{BUCKET}/{n}", s) for n, s in objects]
    settings = read_settings(cfg, 1)
    reader = open_reader(cfg, settings)
    errors = 0
    with CpuSampler() as cpu:
        start = time.perf_counter()
        try:
            shards = make_shards(len(plan), cfg.shard_size)
            work = batches(PlanInMemory(plan, cfg.shard_size), shards, args.batch_size)
            for batch in read_batches(reader, work, settings):
                errors += sum(isinstance(p, ReadError) for p in batch.payloads)
        finally:
            reader.close()
        seconds = time.perf_counter() - start
    assert errors == 0, f"{errors} read errors"
    return {
        "rate": len(plan) / seconds,
        "cores": cpu.cores(),
        "requests_per_image": reader.stats.requests / len(plan),
    }


def end_to_end(input_uri: str, output: Path, model: Path, args, **overrides) -> dict:
    from worker.run import run

    shutil.rmtree(output, ignore_errors=True)
    with CpuSampler() as cpu:
        summary = run(worker_config(input_uri, output, model, args, **overrides))
        end = time.monotonic()
    return {
        "rate": summary["images_per_second"],
        "gpu_busy": summary["gpu_busy"],
        "cores": cpu.cores(end - summary["seconds"], end),
        "requests_per_image": summary.get("requests_per_image"),
    }


def peak_rss(planned: int, objects: list[tuple[str, int]], model: Path, work: Path, args) -> float:
    """Peak RSS (MiB) of a one-rank worker whose plan holds ``planned`` images, of which only the
    shards holding the uploaded objects are left to do.
    """
    from worker.plan_store import write_table
    from worker.results import PART_COLUMNS, PARTS_DIR, PLAN_DIR, encode_rows, part_name
    from worker.storage import ObjectInfo

    out = work / f"memory-{planned}"
    shutil.rmtree(out, ignore_errors=True)
    (out / PARTS_DIR).mkdir(parents=True)
    shard = 1024
    real = [ObjectInfo(f"gs://{BUCKET}/{n}", s) for n, s in objects]
    # Objects that do not exist, sorting after the real ones: their shards are committed already.
    fake = [
        ObjectInfo(f"gs://{BUCKET}/{PREFIX}~planned/{i:08d}.jpg", 70_000) for i in range(planned - len(real))
    ]
    write_table(str(out / PLAN_DIR), [real + fake], shard)
    for index in range(math.ceil(len(real) / shard), math.ceil(planned / shard)):
        (out / PARTS_DIR / part_name(index)).write_bytes(encode_rows(PART_COLUMNS, []))
    cmd = [sys.executable, "-m", "worker", "--input", f"gs://{BUCKET}/{PREFIX}", "--output", str(out)]
    cmd += ["--model", str(model), "--device", args.device, "--batch-size", str(args.batch_size)]
    cmd += ["--shard-size", str(shard), "--compile", "none", "--log-interval", "30"]
    with open(out / "worker.log", "w+") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # the rank's own peak (its reader child is smaller)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            log_file.seek(0)
            raise RuntimeError(f"worker failed:\n{log_file.read()[-3000:]}")
    return usage.ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gcs_input", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8192)
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on cuda, 32 on cpu")
    p.add_argument("--latencies", default="0,20,50", help="ms added to every request, comma-separated")
    p.add_argument("--proxy-processes", type=int, default=4)
    p.add_argument("--compile", default="default", help="the worker's --compile for the end-to-end runs")
    p.add_argument("--memory-plans", default="10000,1000000", help="planned images of the memory rows")
    p.add_argument("--compare-images", type=int, default=2048, help="objects of the slower clients' rows")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    args.batch_size = args.batch_size or (256 if args.device == "cuda" else 32)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gcs-input-"))
    paths = bench_images(work / "images", args.images)
    model = make_model(work / "model", tiny=args.device != "cuda")
    figures: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    figures |= {"cores": os.cpu_count(), "images": len(paths), "batch_size": args.batch_size}
    figures["mean_kb"] = sum(p.stat().st_size for p in paths) / len(paths) / 1e3
    rows: list[tuple[str, str, float, str]] = []

    def row(name: str, latency: str, value: float, extra: str = "") -> None:
        rows.append((name, latency, value, extra))
        figures[f"{name} @ {latency}"] = value
        print(f"{name:<46} {latency:>6} {value:>9.0f}  {extra}", flush=True)

    local = end_to_end(str(work / "images"), work / "out-local", model, args)
    row(
        "worker end to end, local disk (img/s)",
        "-",
        local["rate"],
        f"GPU busy {local['gpu_busy']:.0%}; host {local['cores']:.1f} cores busy",
    )
    with gcs_emulator() as emulator:
        objects = upload(paths, work / "images")
        few = objects[: args.compare_images]
        direct = max(native_rate(emulator, objects, c) for c in (64, 512))
        row("native obstore ceiling, no proxy", "0 ms", direct)
        stage = read_stage_rate(objects, args, model)
        row("worker read stage, no proxy", "0 ms", stage["rate"], f"{stage['rate'] / direct:.2f} of ceiling")
        e2e = end_to_end(f"gs://{BUCKET}/{PREFIX}", work / "out-gcs", model, args)
        row(
            "worker end to end from gs://, no proxy",
            "0 ms",
            e2e["rate"],
            f"{e2e['rate'] / min(local['rate'], direct):.2f} of min(local, ceiling); "
            f"GPU busy {e2e['gpu_busy']:.0%}; host {e2e['cores']:.1f} cores busy",
        )
        for latency in [float(x) for x in args.latencies.split(",")]:
            tag = f"{latency:.0f} ms"
            with proxy(emulator, latency, args.proxy_processes) as url, storage_at(url):
                ceiling = max(native_rate(url, objects, c) for c in (64, 512))
                figures[f"ceiling @ {tag}"] = ceiling
                row("native obstore ceiling (obj/s)", tag, ceiling)
                row("google-cloud-storage, 32 threads", tag, gcs_threads_rate(few, 32))
                row("google-cloud-storage, 8 processes x 8 threads", tag, gcs_threads_rate(few, 8, 8))
                stage = read_stage_rate(objects, args, model)
                row(
                    "worker read stage (obj/s)",
                    tag,
                    stage["rate"],
                    f"{stage['rate'] / ceiling:.2f} of ceiling",
                )
                fixed = read_stage_rate(objects, args, model, read_concurrency=64)
                row("worker read stage, 64 in flight", tag, fixed["rate"], f"{fixed['rate'] / ceiling:.2f}")
                composed = read_stage_rate(few, args, model, compose=True)
                row("worker read stage --compose", tag, composed["rate"], f"{composed['rate'] / ceiling:.2f}")
                e2e = end_to_end(f"gs://{BUCKET}/{PREFIX}", work / "out-gcs", model, args)
                target = min(local["rate"], ceiling)
                row(
                    "worker end to end from gs:// (img/s)",
                    tag,
                    e2e["rate"],
                    f"{e2e['rate'] / target:.2f} of min(local, ceiling); GPU busy {e2e['gpu_busy']:.0%}; "
                    f"host {e2e['cores']:.1f} cores busy; {e2e['requests_per_image']:.2f} requests/image",
                )
        for planned in [int(x) for x in args.memory_plans.split(",")]:
            row(
                f"peak RSS of a rank, {planned} planned (MiB)",
                "0 ms",
                peak_rss(planned, objects, model, work, args),
            )
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
