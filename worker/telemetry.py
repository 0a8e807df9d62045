"""What a rank tells its user: start-up steps, progress (img/s, ETA), where the time went."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata

log = logging.getLogger(__name__)


def process_age() -> float:
    """Seconds since this process started, so that start-up counts the imports before main() too."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            return max(0.0, float(uptime.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0  # not Linux: start-up is then counted from here


class StartupClock:
    """When each start-up step was done, in seconds since the process started."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.started = clock() - process_age()
        self.steps: dict[str, float] = {}

    def since_start(self) -> float:
        return round(self.clock() - self.started, 3)

    def mark(self, step: str) -> float:
        self.steps[step] = self.since_start()
        return self.steps[step]


class Timeline:
    """A rank's progress over time, in bounded size whatever the run's length.

    Each sample is cumulative: seconds since processing began, images done, seconds the GPU was
    busy with the model, seconds spent waiting for input. Cumulative samples downsample exactly (the
    rate between any two kept samples is still right), so when ``max_samples`` are taken every
    other one is dropped and the spacing doubles: a 10-second run and a 10-hour run both end with
    between ``max_samples / 2`` and ``max_samples`` samples, spread over the whole run.
    """

    COLUMNS = ("seconds", "images", "gpu_busy_seconds", "input_wait_seconds")

    def __init__(self, first_interval: float = 0.25, max_samples: int = 128):
        self.interval = first_interval
        self.max_samples = max_samples
        self.samples: list[tuple[float, ...]] = [(0.0, 0, 0.0, 0.0)]

    def observe(self, seconds: float, images: int, gpu_busy: float, input_wait: float) -> None:
        """Record the totals at ``seconds``, when a sample is due."""
        if seconds - self.samples[-1][0] < self.interval:
            return
        self.samples.append((round(seconds, 3), images, round(gpu_busy, 3), round(input_wait, 3)))
        if len(self.samples) >= self.max_samples:
            self.samples = self.samples[::2]
            self.interval *= 2

    def summary(self, seconds: float, images: int, gpu_busy: float, input_wait: float) -> dict:
        """The summary's ``timeline``, ending with the rank's final totals."""
        last = (round(seconds, 3), images, round(gpu_busy, 3), round(input_wait, 3))
        samples = self.samples if self.samples[-1][0] >= last[0] else [*self.samples, last]
        return {"columns": list(self.COLUMNS), "samples": [list(s) for s in samples]}


class Progress:
    """Images done, img/s and ETA, logged at a steady interval and sampled into a ``Timeline``."""

    def __init__(
        self, rank: int, total: int, interval: float, clock=time.monotonic, reads=None, utilization=None
    ):
        self.rank = rank
        self.total = total
        self.interval = interval
        self.clock = clock
        self.reads = reads  # the read stage's counters (worker.storage.reading.ReadStats), if any
        self.utilization = utilization or Utilization(clock=clock)
        self.timeline = Timeline()
        self.start = clock()
        self.last_log = self.start
        self.done = 0
        self.errors = 0

    def update(self, images: int, errors: int) -> None:
        self.done += images
        self.errors += errors
        now = self.clock()
        util = self.utilization
        self.timeline.observe(now - self.start, self.done, util.gpu_seconds, util.input_wait_seconds)
        if now - self.last_log >= self.interval:
            self.last_log = now
            log.info("%s", self.line())

    def timeline_summary(self) -> dict:
        util = self.utilization
        return self.timeline.summary(self.seconds, self.done, util.gpu_seconds, util.input_wait_seconds)

    @property
    def seconds(self) -> float:
        return self.clock() - self.start

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        remaining = max(self.total - self.done, 0)
        eta = f"{remaining / rate:.0f}s" if rate > 0 else "?"
        # With dynamic assignment the total is an estimate (the job's share per rank): a fast
        # rank may pass it, so the percentage stops at 100.
        pct = min(100.0, 100.0 * self.done / self.total) if self.total else 100.0
        return (
            f"rank {self.rank}: {self.done}/{self.total} images ({pct:.1f}%), "
            f"{self.errors} errors, {rate:.1f} img/s, "
            + (f"{self.reads.line()}, " if self.reads else "")
            + f"ETA {eta}"
        )


@dataclass
class Utilization:
    """Where a rank's processing time went: the user's answer to "input-bound or GPU-bound?"."""

    gpu_seconds: float = 0.0  # the batches' GPU work on the model's stream, decode waits excluded
    input_wait_seconds: float = 0.0  # the main loop waiting for the next decoded batch
    clock: Callable[[], float] = time.monotonic

    def waiting(self, items: Iterator) -> Iterator:
        """``items``, adding the time spent waiting for each to ``input_wait_seconds``."""
        while True:
            start = self.clock()
            try:
                item = next(items)
            except StopIteration:
                return
            finally:
                self.input_wait_seconds += self.clock() - start
            yield item

    def shares(self, seconds: float) -> dict[str, float]:
        """The summary's ``gpu_busy`` and ``input_wait``: fractions of ``seconds`` of processing."""

        def share(part: float) -> float:
            return round(part / seconds, 4) if seconds else 0.0

        return {"gpu_busy": share(self.gpu_seconds), "input_wait": share(self.input_wait_seconds)}


def log_done(progress: Progress, shards: int, shares: dict[str, float], on_gpu: bool) -> None:
    busy = f"GPU busy with the model {100 * shares['gpu_busy']:.0f} % of the time, " if on_gpu else ""
    log.info(
        "%s — done: %d shards; %swaiting for input %.0f %%",
        progress.line(),
        shards,
        busy,
        100 * shares["input_wait"],
    )


# The libraries whose versions decide what a run computed and how fast: the report shows them.
REPORTED_LIBRARIES = ("torch", "transformers", "pillow", "torchvision", "nvidia-nvjpeg-cu12")


def library_versions() -> dict[str, str]:
    """Python's and the installed ``REPORTED_LIBRARIES``' versions (those not installed are left out)."""
    versions = {"python": platform.python_version()}
    for name in REPORTED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
