"""Stage 4 — infer: the task's forward on each decoded batch, kept busy on the GPU.

On a GPU the forward runs on a stream of its own, as a CUDA graph where one checks out
(``worker.cuda_graph``), else eagerly with its blocks paced (``BlockPacer``); results are copied
back without blocking, so the host builds one batch's rows while the GPU computes the next.
Decoded batches live in a ring of fixed-shape device buffers (``BufferRing``).
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.config import ConfigError
from worker.cuda_graph import GraphedForward, fastest_graph
from worker.decode.cpu import DecodedBatch
from worker.read import Batch
from worker.tasks import Task

# On GPU: batches decoded ahead of the model beyond one per decode worker, so that a slow
# decode call is absorbed instead of idling the GPU; and forwards queued on the GPU while
# the host turns the oldest into rows.
DECODE_LOOKAHEAD = 1
GPU_BATCHES_IN_FLIGHT = 1


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no GPU is visible to this process", "device")
        # Ranks beyond the GPU count share GPUs round-robin (several processes per GPU).
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def ring_slots(decode_workers: int) -> int:
    """Decode buffers a GPU run needs: those in use at once (the decode look-ahead, the batch in
    the model and those in flight behind it) and spare ones for the workers' next calls.
    """
    return 2 * decode_workers + DECODE_LOOKAHEAD + GPU_BATCHES_IN_FLIGHT + 3


@dataclass
class Prediction:
    batch: Batch
    decoded: DecodedBatch
    outputs: tuple[torch.Tensor, ...]  # the task's outputs, on the host (pinned on GPU runs)
    ready: object  # a CUDA event, or None on CPU
    started: object = None  # a CUDA event at the start of the batch's GPU work


class BlockPacer:
    """Keeps at most ``depth`` of the model's blocks queued on the GPU ahead of the host.

    A whole forward enqueued at once is tens of milliseconds of kernels at a large batch; the
    JPEG decoders' own kernels (on the libraries' internal streams) queue behind all of it, so
    each decode call waits a forward. Waiting, after each block, for the block ``depth`` back
    bounds that queue to a few blocks; the GPU never idles, since ``depth`` blocks are still
    queued. The blocks are the model's longest ModuleList (the encoder layers or stages of any
    Hugging Face vision model).
    """

    def __init__(self, model, depth: int):
        lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        self.depth = depth
        self.events: collections.deque = collections.deque()
        self.handles = (
            [block.register_forward_hook(self._after_block) for block in max(lists, key=len)]
            if lists and depth > 0
            else []
        )

    def _after_block(self, module, inputs, output) -> None:
        event = torch.cuda.Event()
        event.record()
        self.events.append(event)
        if len(self.events) > self.depth:
            self.events.popleft().synchronize()


class Inference:
    """The task's forward under inference_mode, on CPU or on the GPU's model stream."""

    def __init__(
        self, task: Task, device: torch.device, queued_blocks: int = 0, graph: GraphedForward | None = None
    ):
        self.task = task
        self.device = device
        self.graph = graph
        # A replayed graph runs no hooks, and one launch can't be paced.
        self.pacer = (
            BlockPacer(task.model, queued_blocks) if device.type == "cuda" and graph is None else None
        )

    @torch.inference_mode()
    def __call__(self, decoded: DecodedBatch) -> tuple[tuple[torch.Tensor, ...], object, object]:
        """The outputs, and on GPU the events that bracket the batch's work (else None)."""
        if not decoded.ok:
            return (), None, None
        if self.device.type == "cpu":
            return self.task.forward(decoded.pixels), None, None
        torch.cuda.current_stream().wait_event(decoded.ready)
        started = torch.cuda.Event(enable_timing=True)
        started.record()
        if self.graph is not None and decoded.pixels.shape == self.graph.shape:
            outputs = self.graph(decoded.pixels)
        else:
            outputs = self.task.forward(decoded.pixels)
        # Copy back without blocking; the commit stage waits on the event one batch later,
        # so the GPU is already busy with the next batch while Python builds rows.
        host = tuple(torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in outputs)
        for h, o in zip(host, outputs, strict=True):
            h.copy_(o, non_blocking=True)
        ready = torch.cuda.Event(enable_timing=True)
        ready.record()
        return host, ready, started


@torch.inference_mode()
def warm_up(
    task: Task,
    batch_shape: tuple[int, ...],
    device: torch.device,
    cuda_graph: bool,
    compile_mode: str,
    mark: Callable[[str], object] = lambda step: None,
) -> GraphedForward | None:
    """One forward at the working batch shape: kernel selection and allocator growth happen here,
    not in the first timed batch, and a batch size that doesn't fit fails fast. Then the forward
    as a CUDA graph, compiled where asked, where it checks out (``fastest_graph``). ``mark`` is
    told "first_forward" between the two, so start-up shows warm-up and compilation apart.
    """
    task.forward(torch.zeros(batch_shape, device=device, dtype=torch.bfloat16))
    torch.cuda.synchronize(device)
    mark("first_forward")
    if not cuda_graph:
        return None
    example = torch.randn(
        batch_shape, device=device, dtype=torch.bfloat16, generator=torch.Generator(device).manual_seed(0)
    )
    return fastest_graph(task.forward, task.model, example, compile_mode, agrees=task.agrees)


def model_stream(device: torch.device):
    """A context that runs the model on a CUDA stream of its own, not the legacy default stream.

    Work queued on the legacy default stream is a barrier for every blocking stream and every
    synchronous copy in the process, the JPEG libraries' internal ones included: a decode call
    there waits for all the model's queued kernels.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))  # the weights and warm-up were queued there
    return torch.cuda.stream(stream)


class BufferRing:
    """Fixed-shape device buffers for decoded batches, reused once the model has read them."""

    def __init__(self, size: int, batch_size: int, hw: tuple[int, int], device: torch.device, dtype):
        self.buffers = [torch.empty((batch_size, 3, *hw), device=device, dtype=dtype) for _ in range(size)]
        self.consumed = [None] * size
        self.next = 0
        self.lock = threading.Lock()  # several decode threads acquire slots

    def acquire(self, stream) -> tuple[int, torch.Tensor]:
        with self.lock:
            slot = self.next
            self.next = (self.next + 1) % len(self.buffers)
        if self.consumed[slot] is not None:
            stream.wait_event(self.consumed[slot])  # a device-side wait: the host never blocks here
        return slot, self.buffers[slot]

    def release(self, slot: int) -> None:
        event = torch.cuda.Event()
        event.record()
        self.consumed[slot] = event
