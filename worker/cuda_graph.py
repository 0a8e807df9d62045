"""Stage 4 on GPU: the whole forward (and the task's reduction of it) as one CUDA graph, replayed per batch.

Why: eager, a ViT-B/16 forward is hundreds of kernel launches issued by Python, milliseconds of
host time under the GIL that the readers, the decode threads and the row builder need
too; and while the host waits for the GIL, the GPU runs dry. A replay queues the same
kernels with one call. The batch shape is fixed (the decode ring's buffers are always
``batch_size`` rows), which is what a graph needs. By default the forward is first compiled
by ``torch.compile`` (fused kernels; benchmarks/NOTES.md has the gain) and the compiled
forward is captured.

The graph is only used where it is right and pays: at start-up each candidate's labels are
checked against the eager forward (by the task: ``Task.agrees``) and timed; any failure or a slower graph keeps the
eager forward (with a log line saying why).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger(__name__)


@contextlib.contextmanager
def unpadded_attention_without_mask(model) -> Iterator[None]:
    """While capturing or compiling, give SDPA no mask for full, unpadded bidirectional attention.

    transformers leaves that mask out (so SDPA picks its fused kernels) only when it is not
    tracing, and some versions (5.17) count CUDA stream capture as tracing, as they do
    torch.compile: they build an all-visible mask with a broadcast last dimension, which no
    fused SDPA kernel accepts, and attention falls back to the fp32 math path (a forward
    several times slower). An image classifier never pads, so "no mask" is exactly the eager
    forward's attention. Any other mask request (causal, padded, windowed) is passed through untouched.
    """
    try:
        from transformers import masking_utils
    except ImportError:
        yield
        return
    table = getattr(masking_utils, "ALL_MASK_ATTENTION_FUNCTIONS", None)
    full = getattr(masking_utils, "bidirectional_mask_function", None)
    # An exported program or TorchScript module has no config, and no transformers masks either.
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
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

    def __init__(
        self, forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], model, example: torch.Tensor
    ):
        self.static_input = example.clone()
        # The mask override covers the warm-up too: a compiled forward is traced on its first call.
        with unpadded_attention_without_mask(model):
            # A capture needs the kernels chosen and the allocator warmed on a side stream first.
            side = torch.cuda.Stream(example.device)
            side.wait_stream(torch.cuda.current_stream(example.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    forward(self.static_input)
            torch.cuda.current_stream(example.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_outputs = forward(self.static_input)

    @property
    def shape(self) -> torch.Size:
        return self.static_input.shape

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.static_input.copy_(pixels, non_blocking=True)
        self.graph.replay()
        return self.static_outputs


# --compile choices -> torch.compile modes. Inductor's own CUDA graphs stay off: the worker
# captures the compiled forward into a graph of its own (GraphedForward).
COMPILE_MODES = {"none": None, "default": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def _seconds_per_call(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    fn()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


def same_decisions(
    reference_logits: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    tie: float = 0.1,
    score_tolerance: float = 0.05,
    share: float = 0.99,
    scores_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> bool:
    """Whether a forward's (top-1 score, label) rows make the reference logits' decisions.

    A row agrees when its label's reference logit is within ``tie`` logit standard deviations
    of the top one (so a near-tie decided the other way by a fused kernel's rounding still
    agrees) and its score is within ``score_tolerance`` of the reference's top-1 score
    (``scores_of`` the logits: softmax unless given). A wrong graph (a stale buffer, another
    input) fails both on most rows.
    """
    scores_of = scores_of or (lambda logits: logits.softmax(-1))
    reference = reference_logits.float()
    top = reference.max(-1).values
    chosen = reference.gather(-1, labels.view(-1, 1).to(reference.device)).squeeze(-1)
    near_top = chosen >= top - tie * reference.std(-1)
    close = (
        scores.float().to(reference.device) - scores_of(reference).max(-1).values
    ).abs() <= score_tolerance
    return (near_top & close).float().mean().item() >= share


@torch.inference_mode()
def fastest_graph(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    model,
    example: torch.Tensor,
    compile_mode: str = "none",
    timing_calls: int = 5,
    agrees: Callable[[torch.Tensor, tuple[torch.Tensor, ...]], bool] | None = None,
) -> GraphedForward | None:
    """The fastest right CUDA graph of ``forward(pixels) -> outputs``, or None for eager.

    Candidates: the forward compiled by ``torch.compile`` (``compile_mode``, a key of
    ``COMPILE_MODES``; inductor fuses the norms, residual adds and activations between the
    matmuls), and the forward as it is. Each is captured, checked against the eager forward
    on ``example`` (``agrees(example, outputs)``, the task's check; random pixels are enough to
    catch a wrong graph) and timed. The fastest passing one is kept unless it is >10 % slower
    than the eager forward. A candidate that fails to compile or capture is skipped with a warning.
    """
    if agrees is None:

        def agrees(pixels: torch.Tensor, outputs: tuple[torch.Tensor, ...]) -> bool:
            return same_decisions(model(pixel_values=pixels).logits, *outputs)

    device = example.device
    eager = _seconds_per_call(lambda: forward(example), device, timing_calls)
    candidates: dict[str, Callable[[], Callable]] = {}
    if COMPILE_MODES[compile_mode]:
        # A fresh compile per model: recompiles of one function otherwise pile up towards
        # dynamo's cache limit across runs in one process (the benchmark's).
        torch.compiler.reset()
        candidates[f"compiled ({compile_mode})"] = lambda: torch.compile(
            forward, mode=COMPILE_MODES[compile_mode], dynamic=False
        )
    candidates["as is"] = lambda: forward
    best: tuple[float, str, GraphedForward] | None = None
    for name, make in candidates.items():
        start = time.perf_counter()
        try:
            graphed = GraphedForward(make(), model, example)
        # torch.compile's backends and graph capture fail in many types (dynamo's, inductor's,
        # Triton's, CUDA's RuntimeError): any failure only drops this candidate.
        except Exception as exc:
            log.warning("CUDA graph of the forward %s failed (%s: %s)", name, type(exc).__name__, exc)
            continue
        prepared = time.perf_counter() - start
        if not agrees(example, graphed(example)):
            log.warning(
                "the CUDA graph of the forward %s does not give the eager forward's labels: not used", name
            )
            continue
        seconds = _seconds_per_call(lambda graphed=graphed: graphed(example), device, timing_calls)
        log.info(
            "CUDA graph of the forward %s: %.2f ms a batch (prepared in %.1f s)",
            name,
            1e3 * seconds,
            prepared,
        )
        if best is None or seconds < best[0]:
            best = (seconds, name, graphed)
    if best is None:
        log.warning("no CUDA graph of the forward checked out: the forward runs eagerly")
        return None
    seconds, name, graphed = best
    if seconds > 1.1 * eager:  # a margin, so that timing noise alone never switches paths
        log.warning(
            "the CUDA graph is slower than the eager forward (%.2f vs %.2f ms a batch): the forward runs "
            "eagerly",
            1e3 * seconds,
            1e3 * eager,
        )
        return None
    log.info("forward: the CUDA graph %s, %.2f ms a batch (eager %.2f ms)", name, 1e3 * seconds, 1e3 * eager)
    return graphed
