"""Stage 4 on GPU: the whole forward (and top-1) as one CUDA graph, replayed per batch.

Why: eager, a ViT-B/16 forward is ~300 kernel launches issued by Python, a few ms of
host time under the GIL that the readers, the decode threads and the row builder need
too; and while the host waits for the GIL, the GPU runs dry. A replay queues the same
kernels with one call. The batch shape is fixed (the decode ring's buffers are always
``batch_size`` rows), which is what a graph needs.

The graph is only used where it is right and pays: at start-up its labels are checked
against the eager forward's and both are timed; any failure or a slower graph keeps the
eager forward (with a log line saying why).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Iterator

import torch

log = logging.getLogger(__name__)


@contextlib.contextmanager
def unpadded_attention_without_mask(model) -> Iterator[None]:
    """While capturing, give SDPA no mask for full, unpadded bidirectional attention.

    transformers leaves that mask out (so SDPA picks its fused kernels) only when it is not
    tracing, and some versions (5.17) count CUDA stream capture as tracing: they build an
    all-visible mask with a broadcast last dimension, which no fused SDPA kernel accepts,
    and attention falls back to the fp32 math path (a 3x slower forward on an H100). An
    image classifier never pads, so "no mask" is exactly the eager forward's attention.
    Any other mask request (causal, padded, windowed) is passed through untouched.
    """
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    table = getattr(masking_utils, "ALL_MASK_ATTENTION_FUNCTIONS", None)
    full = getattr(masking_utils, "bidirectional_mask_function", None)
    impl = getattr(model.config, "_attn_implementation", None)
    if table is None or full is None or impl not in table:
        yield
        return
    original = table[impl]

    def mask(*args, **kwargs):
        unpadded = kwargs.get("attention_mask") is None and kwargs.get("local_size") is None
        if not args and unpadded and kwargs.get("mask_function") is full:
            return None
        return original(*args, **kwargs)

    had_local = impl in getattr(table, "_local_mapping", {})
    table[impl] = mask
    try:
        yield
    finally:
        if had_local:
            table[impl] = original
        else:
            del table[impl]


class GraphedForward:
    """``forward(pixels)`` captured for one input shape; call it with a tensor of that shape.

    The returned tensors are the graph's own outputs: the next call overwrites them, so
    copy them (the worker copies to pinned host memory on the same stream) before then.
    """

    def __init__(self, forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], model,
                 example: torch.Tensor):
        self.static_input = example.clone()
        # A capture needs the kernels chosen and the allocator warmed on a side stream first.
        side = torch.cuda.Stream(example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                forward(self.static_input)
        torch.cuda.current_stream(example.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with unpadded_attention_without_mask(model), torch.cuda.graph(self.graph):
            self.static_outputs = forward(self.static_input)

    @property
    def shape(self) -> torch.Size:
        return self.static_input.shape

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.static_input.copy_(pixels, non_blocking=True)
        self.graph.replay()
        return self.static_outputs


def _seconds_per_call(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    fn()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


@torch.inference_mode()
def graph_if_faster(forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], model,
                    example: torch.Tensor, timing_calls: int = 5) -> GraphedForward | None:
    """The forward as a CUDA graph if it gives the eager forward's labels and is not >10 % slower; else None.

    ``forward(pixels) -> (scores, labels)``. The check runs on ``example`` (random pixels
    are enough: a wrong graph, e.g. one reading a stale buffer, changes the labels).
    """
    device = example.device
    try:
        graphed = GraphedForward(forward, model, example)
    except Exception as exc:  # noqa: BLE001 - any capture failure leaves the eager forward, which works
        log.warning("CUDA graph capture failed (%s: %s): the forward runs eagerly", type(exc).__name__, exc)
        return None
    _, eager_labels = forward(example)
    _, graph_labels = graphed(example)
    agree = (eager_labels == graph_labels).float().mean().item()
    if agree < 0.99:
        log.warning("the CUDA graph's labels agree with the eager forward's on only %.1f %%: the forward runs "
                    "eagerly", 100 * agree)
        return None
    eager = _seconds_per_call(lambda: forward(example), device, timing_calls)
    replay = _seconds_per_call(lambda: graphed(example), device, timing_calls)
    if replay > 1.1 * eager:  # a margin, so that timing noise alone never switches paths
        log.warning("the CUDA graph is slower than the eager forward (%.2f vs %.2f ms a batch): the forward runs "
                    "eagerly", 1e3 * replay, 1e3 * eager)
        return None
    log.info("forward as a CUDA graph: %.2f ms a batch (eager %.2f ms)", 1e3 * replay, 1e3 * eager)
    return graphed
