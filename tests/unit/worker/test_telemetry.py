"""What a rank reports about where its time went."""

from __future__ import annotations

from worker.telemetry import Utilization


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
