"""What a rank reports about where its time went."""

from __future__ import annotations

from worker.telemetry import Progress, Timeline, Utilization, library_versions


def test_utilization_counts_only_the_time_spent_waiting_for_input():
    now = [0.0]
    waits = [3.0, 0.5, 2.0]  # how long each item takes to arrive; the last wait ends the iteration

    def producer():
        for i, wait in enumerate(waits[:-1]):
            now[0] += wait
            yield i
        now[0] += waits[-1]

    utilization = Utilization(clock=lambda: now[0])
    seen = []
    for item in utilization.waiting(producer()):
        now[0] += 10.0  # the consumer's own work is not waiting
        seen.append(item)
    assert seen == [0, 1]
    assert utilization.input_wait_seconds == sum(waits)


def test_a_timeline_stays_bounded_and_spans_the_whole_run():
    timeline = Timeline(first_interval=0.5, max_samples=32)
    # Ten hours at one batch of 100 images a second, the GPU busy 80 % and input wait 10 %.
    for second in range(1, 36_001):
        timeline.observe(float(second), 100 * second, 0.8 * second, 0.1 * second)
    summary = timeline.summary(36_000.5, 3_600_050, 28_800.4, 3_600.05)

    samples = summary["samples"]
    assert summary["columns"] == ["seconds", "images", "gpu_busy_seconds", "input_wait_seconds"]
    assert 16 <= len(samples) <= 33
    assert samples[0] == [0.0, 0, 0.0, 0.0]
    assert samples[-1] == [36_000.5, 3_600_050, 28_800.4, 3_600.05]
    # Evenly spread, not bunched at the start: no gap is more than twice another.
    gaps = [b[0] - a[0] for a, b in zip(samples[:-2], samples[1:-1], strict=True)]
    assert max(gaps) <= 2 * min(gaps)
    # Cumulative samples keep the rates exact between any two of them.
    for a, b in zip(samples[:-2], samples[1:-1], strict=True):
        assert (b[1] - a[1]) / (b[0] - a[0]) == 100.0


def test_a_short_run_still_gets_a_curve():
    timeline = Timeline()
    for tenth in range(1, 31):  # three seconds of batches
        timeline.observe(tenth / 10, 8 * tenth, 0.0, 0.01 * tenth)
    samples = timeline.summary(3.0, 240, 0.0, 0.3)["samples"]
    assert len(samples) >= 8
    assert [s[0] for s in samples] == sorted(s[0] for s in samples)


def test_progress_samples_the_utilization_it_is_given():
    now = [0.0]
    utilization = Utilization(clock=lambda: now[0])
    progress = Progress(0, 100, interval=1e9, clock=lambda: now[0], utilization=utilization)
    for _ in range(10):
        now[0] += 1.0
        utilization.gpu_seconds += 0.5
        utilization.input_wait_seconds += 0.25
        progress.update(10, 1)
    samples = progress.timeline_summary()["samples"]
    assert samples[-1] == [10.0, 100, 5.0, 2.5]
    assert (progress.done, progress.errors) == (100, 10)


def test_library_versions_name_the_installed_libraries():
    import torch

    versions = library_versions()
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"] == torch.__version__
    assert versions["python"].count(".") == 2
