"""A listing fanned out over prefixes: many listers at once, pages streamed to one consumer.

One listing request returns at most 1,000 objects, so a hundred million objects are 100,000
requests: one after another that is hours, in parallel minutes. Each lister lists one prefix a
level at a time (``/`` as delimiter); the sub-prefixes it finds become work for the others, so
the work spreads as the tree unfolds, and a page reaches the consumer as soon as it is listed.
The queue between them is bounded: listers wait for a slow consumer, so memory stays flat.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

from worker.storage import ObjectInfo

# A level's listing: pages of (objects, sub-prefixes found on that page).
LevelLister = Callable[[str], Iterable[tuple[list[ObjectInfo], list[str]]]]
_PAGES_QUEUED_PER_LISTER = 4
_DONE = object()


def fan_out(list_level: LevelLister, root: str, listers: int) -> Iterator[list[ObjectInfo]]:
    """Every object under ``root``, in pages, listed by ``listers`` threads over its sub-prefixes.

    Raises:
        Exception: The first error of any lister (the others stop).
    """
    work: queue.Queue[str | None] = queue.Queue()
    pages: queue.Queue = queue.Queue(maxsize=max(1, listers) * _PAGES_QUEUED_PER_LISTER)
    stop = threading.Event()
    pending = [1]  # prefixes queued or being listed
    lock = threading.Lock()
    work.put(root)

    def put(item) -> bool:
        while not stop.is_set():
            try:
                pages.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def lister() -> None:
        while not stop.is_set():
            prefix = work.get()
            if prefix is None:
                return
            try:
                for objects, prefixes in list_level(prefix):
                    with lock:
                        pending[0] += len(prefixes)
                    for sub in prefixes:
                        work.put(sub)
                    if objects and not put(objects):
                        return
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                put(exc)
                return
            with lock:
                pending[0] -= 1
                finished = pending[0] == 0
            if finished:
                put(_DONE)

    threads = [threading.Thread(target=lister, name=f"list-{i}", daemon=True) for i in range(max(1, listers))]
    for thread in threads:
        thread.start()
    try:
        while (item := pages.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        for _ in threads:
            work.put(None)
