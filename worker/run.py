"""The worker: plan -> read -> decode -> infer -> commit, one rank of a torchrun job."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from worker import dist
from worker.commit import Committer, Progress, ShardResult
from worker.config import WorkerConfig
from worker.cuda_graph import GraphedForward, fastest_graph
from worker.decode import CpuDecoder, DecodedBatch, GpuDecoder, Preprocess
from worker.model import fetch_model_once_per_node, load_model, load_preprocessor_config
from worker.plan import PlanColumns, Shard, load_or_create_plan, make_shards, static_assignment
from worker.read import Batch, batches, prefetch_map, read_batches
from worker.results import image_id
from worker.storage import ReadError, open_storage

log = logging.getLogger(__name__)

# Fault injection for resume tests: SIGKILL this rank after it commits N shards.
FAULT_KILL_AFTER_SHARDS = "WORKER_FAULT_KILL_AFTER_SHARDS"

# On GPU: batches decoded ahead of the model beyond one per decode worker, so that a slow
# decode call is absorbed instead of idling the GPU; and forwards queued on the GPU while
# the host turns the oldest into rows.
DECODE_LOOKAHEAD = 1
GPU_BATCHES_IN_FLIGHT = 1


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but no GPU is visible")
        # Ranks beyond the GPU count share GPUs round-robin (several processes per GPU).
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def default_decode_threads(local_world_size: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


@dataclass
class Prediction:
    batch: Batch
    decoded: DecodedBatch
    scores: torch.Tensor
    labels: torch.Tensor
    ready: object  # a CUDA event, or None on CPU
    started: object = None  # a CUDA event at the start of the batch's GPU work


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


def top1(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(pixel_values=pixels).logits
    return logits.float().softmax(-1).max(-1)


class BlockPacer:
    """Keeps at most ``depth`` of the model's blocks queued on the GPU ahead of the host.

    A whole forward enqueued at once is ~25 ms of kernels at batch 256 on an H100; the
    JPEG decoders' own kernels (on the libraries' internal streams) queue behind all of
    it, so each decode call waits a forward. Waiting, after each block, for the block
    ``depth`` back bounds that queue to a few blocks; the GPU never idles, since
    ``depth`` blocks are still queued. The blocks are the model's longest ModuleList
    (the encoder layers or stages of any Hugging Face vision model).
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
    """Stage 4: the model under inference_mode; top-1 label and its softmax score."""

    def __init__(
        self, model, device: torch.device, queued_blocks: int = 0, graph: GraphedForward | None = None
    ):
        self.model = model
        self.device = device
        self.graph = graph
        # A replayed graph runs no hooks, and one launch can't be paced.
        self.pacer = BlockPacer(model, queued_blocks) if device.type == "cuda" and graph is None else None

    @torch.inference_mode()
    def __call__(self, decoded: DecodedBatch) -> tuple[torch.Tensor, torch.Tensor, object, object]:
        """Scores, labels, and on GPU the events that bracket the batch's work (else None)."""
        if not decoded.ok:
            return torch.empty(0), torch.empty(0, dtype=torch.long), None, None
        if self.device.type == "cpu":
            scores, labels = top1(self.model, decoded.pixels)
            return scores, labels, None, None
        torch.cuda.current_stream().wait_event(decoded.ready)
        started = torch.cuda.Event(enable_timing=True)
        started.record()
        if self.graph is not None and decoded.pixels.shape == self.graph.shape:
            scores, labels = self.graph(decoded.pixels)
        else:
            scores, labels = top1(self.model, decoded.pixels)
        # Copy back without blocking; the commit stage waits on the event one batch later,
        # so the GPU is already busy with the next batch while Python builds rows.
        scores_host = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
        labels_host = torch.empty(labels.shape, dtype=labels.dtype, pin_memory=True)
        scores_host.copy_(scores, non_blocking=True)
        labels_host.copy_(labels, non_blocking=True)
        ready = torch.cuda.Event(enable_timing=True)
        ready.record()
        return scores_host, labels_host, ready, started


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


def process_age() -> float:
    """Seconds since this process started, so that start-up counts the imports before main() too."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            return max(0.0, float(uptime.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0  # not Linux: start-up is then counted from here


def import_model_code_in_background() -> threading.Thread:
    """Transformers takes seconds to import; do it while the process group forms, not after.

    Join the thread before touching transformers: its lazy module is not safe to import
    from two threads at once.
    """

    def load() -> None:
        from transformers import AutoModelForImageClassification  # noqa: F401

    thread = threading.Thread(target=load, name="import-transformers", daemon=True)
    thread.start()
    return thread


class Worker:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.started = time.monotonic() - process_age()
        self.startup: dict[str, float] = {"imports": self._since_start()}
        self.importing_model_code = import_model_code_in_background()
        self.device = resolve_device(cfg.device)
        self.topo = dist.init(self.device.type)
        self.startup["process_group"] = self._since_start()

    def _since_start(self) -> float:
        return round(time.monotonic() - self.started, 3)

    # Stage 1
    def start_planning(self) -> Future | None:
        """Rank 0 lists the input in a background thread, while every rank loads the model:
        on a large local dataset the listing takes seconds that would otherwise be start-up.
        """
        if self.topo.rank != 0:
            return None
        pool = ThreadPoolExecutor(1, thread_name_prefix="plan")
        committer = Committer(self.cfg.output, self.cfg.project)

        def plan_on_rank0() -> tuple[PlanColumns, set[int]]:
            committer.discard_interrupted_writes()
            return PlanColumns.of(load_or_create_plan(self.cfg)), committer.committed_shards()

        planning = pool.submit(plan_on_rank0)
        pool.shutdown(wait=False)
        return planning

    def finish_planning(self, planning: Future | None) -> tuple[PlanColumns, list[Shard], set[int]]:
        plan, committed = self.topo.broadcast(planning.result() if planning else None)
        shards = make_shards(len(plan), self.cfg.shard_size)
        if committed:
            log.info("resuming: %d of %d shards are already committed", len(committed), len(shards))
        return plan, shards, committed

    def my_shards(self, shards: list[Shard], committed: set[int]) -> tuple[Iterator[Shard], int]:
        """This rank's shards, and an estimate of its image count (exact for static assignment)."""
        if self.cfg.assignment == "static":
            mine = [
                s
                for s in static_assignment(shards, self.topo.rank, self.topo.world_size)
                if s.index not in committed
            ]
            return iter(mine), sum(len(s) for s in mine)
        todo = sum(len(s) for s in shards if s.index not in committed)
        claimed = (shards[i] for i in self.topo.claim_shards(len(shards)) if i not in committed)
        return claimed, -(-todo // self.topo.world_size)

    def run(self) -> dict:
        cfg, topo = self.cfg, self.topo
        startup = self.startup
        planning = self.start_planning()
        self.importing_model_code.join()
        model_path = fetch_model_once_per_node(cfg.model, topo, cfg.model_cache, cfg.project)
        startup["model_fetched"] = self._since_start()
        model, label_names = load_model(model_path, self.device)
        pre = Preprocess.from_config(load_preprocessor_config(model_path))
        startup["model_loaded"] = self._since_start()
        graph = None
        if self.device.type == "cuda":
            graph = self._warm_up(model, pre)
        startup["warmed_up"] = self._since_start()
        plan, shards, committed = self.finish_planning(planning)
        work, expected = self.my_shards(shards, committed)
        setup_seconds = time.monotonic() - self.started
        startup["plan_shared"] = round(setup_seconds, 3)

        decode_threads = cfg.decode_threads or default_decode_threads(topo.local_world_size)
        # Pillow batches are decoded by the pil pool already; extra batch-level workers pay off on GPU.
        decode_workers = cfg.decode_workers if self.device.type == "cuda" else 1
        if cfg.decode == "gpu" and self.device.type != "cuda":
            raise RuntimeError("--decode gpu needs --device cuda")
        committer = Committer(cfg.output, cfg.project)
        infer = Inference(model, self.device, cfg.queued_blocks, graph)
        self.utilization = Utilization()
        kill_after = int(os.environ.get(FAULT_KILL_AFTER_SHARDS, "0"))
        shards_done = 0

        with (
            model_stream(self.device),
            ThreadPoolExecutor(cfg.read_threads, thread_name_prefix="read") as read_pool,
            ThreadPoolExecutor(decode_threads, thread_name_prefix="pil") as pil_pool,
            ThreadPoolExecutor(decode_workers, thread_name_prefix="decode") as decode_pool,
        ):
            decode = self._decode_stage(pre, pil_pool, decode_pool)
            startup["decoder_ready"] = self._since_start()
            progress = Progress(topo.rank, expected, cfg.log_interval)
            storage = open_storage(cfg.input, project=cfg.project, compose=cfg.compose)
            read = read_batches(storage, batches(plan, work, cfg.batch_size), read_pool, cfg.prefetch_batches)
            pending: collections.deque[Prediction] = collections.deque()
            results: dict[int, ShardResult] = {}
            # On GPU one batch stays in flight, so the host builds rows while the GPU computes.
            in_flight = GPU_BATCHES_IN_FLIGHT if self.device.type == "cuda" else 0

            decoded_batches = prefetch_map(decode, read, decode_pool, depth=decode_workers + DECODE_LOOKAHEAD)
            for batch, decoded in self.utilization.waiting(decoded_batches):
                scores, labels, ready, started = infer(decoded)
                if decoded.slot is not None:
                    self.ring.release(decoded.slot)
                pending.append(Prediction(batch, decoded, scores, labels, ready, started))
                while len(pending) > in_flight:
                    if self._collect(pending.popleft(), results, label_names, committer, progress):
                        shards_done += 1
                        if kill_after and shards_done >= kill_after:
                            os.kill(os.getpid(), signal.SIGKILL)
            while pending:
                if self._collect(pending.popleft(), results, label_names, committer, progress):
                    shards_done += 1

        summary = {
            "rank": topo.rank,
            "world_size": topo.world_size,
            "device": self.device.type,
            "images": progress.done,
            "errors": progress.errors,
            "shards": shards_done,
            "seconds": round(progress.seconds, 3),
            "setup_seconds": round(setup_seconds, 3),
            # Seconds since the process started at which each start-up step was done; planning
            # overlaps the model load, so "plan_shared" shows only what the model load did not hide.
            "setup_done_at": startup,
            "images_per_second": round(progress.rate, 2),
            # Shares of the processing time: GPU busy with the model (low: the input can't keep
            # up, or the host can't queue the work fast enough) and the loop waiting for decode.
            **self.utilization.shares(progress.seconds),
        }
        committer.write_summary(topo.rank, summary)
        busy = (
            f"GPU busy with the model {100 * summary['gpu_busy']:.0f} % of the time, "
            if self.device.type == "cuda"
            else ""
        )
        log.info(
            "%s — done: %d shards; %swaiting for input %.0f %%",
            progress.line(),
            shards_done,
            busy,
            100 * summary["input_wait"],
        )
        return summary

    @torch.inference_mode()
    def _warm_up(self, model, pre: Preprocess) -> GraphedForward | None:
        """One forward at the working batch shape: kernel selection and allocator growth happen
        here, not in the first timed batch, and a batch size that doesn't fit fails fast.
        Then the forward as a CUDA graph, compiled where asked, where it checks out (``fastest_graph``).
        """
        shape = (self.cfg.batch_size, 3, *pre.output_hw)
        top1(model, torch.zeros(shape, device=self.device, dtype=torch.bfloat16))
        torch.cuda.synchronize(self.device)
        if not self.cfg.cuda_graph:
            return None
        example = torch.randn(
            shape,
            device=self.device,
            dtype=torch.bfloat16,
            generator=torch.Generator(self.device).manual_seed(0),
        )
        return fastest_graph(lambda pixels: top1(model, pixels), model, example, self.cfg.compile)

    def _decode_stage(self, pre: Preprocess, pil_pool, decode_pool):
        """Stage 3 as a function of a read batch; runs in its own thread, one batch ahead.

        On a GPU run even Pillow-decoded images are normalized on the GPU: shipping uint8
        is 4x fewer bytes than float32, and the CPU is the scarcer resource there.
        """
        cfg = self.cfg
        use_gpu = self.device.type == "cuda"
        if use_gpu:
            gpu = GpuDecoder(
                pre, pil_pool, self.device, jpeg=cfg.gpu_jpeg if cfg.decode in ("auto", "gpu") else None
            )
            log.info("decode: %s", f"JPEG on {gpu.jpeg.name} + Pillow fallback" if gpu.jpeg else "Pillow")
            # Slots in use at once: the decode look-ahead (one per worker and DECODE_LOOKAHEAD), the
            # batch in the model and those in flight behind it; spare ones for the workers' next calls.
            slots = 2 * cfg.decode_workers + DECODE_LOOKAHEAD + GPU_BATCHES_IN_FLIGHT + 3
            self.ring = BufferRing(slots, cfg.batch_size, pre.output_hw, self.device, torch.bfloat16)
            decode_pool.submit(torch.inference_mode()(gpu.warm_up), cfg.batch_size).result()
        else:
            cpu = CpuDecoder(pre, pil_pool)

        @torch.inference_mode()
        def decode(batch: Batch) -> tuple[Batch, DecodedBatch]:
            read_errors = {i: str(p) for i, p in enumerate(batch.payloads) if isinstance(p, ReadError)}
            payloads = [b"" if isinstance(p, ReadError) else p for p in batch.payloads]
            if use_gpu:
                slot, buffer = self.ring.acquire(gpu.stream)
                decoded = gpu(payloads, buffer)
                decoded.slot = slot
            else:
                decoded = cpu(payloads)
            decoded.errors.update(read_errors)
            return batch, decoded

        return decode

    def _collect(
        self,
        pred: Prediction,
        results: dict[int, ShardResult],
        label_names: list[str],
        committer: Committer,
        progress: Progress,
    ) -> bool:
        """Turn one batch's predictions into rows; commit the shard at its last batch."""
        if pred.ready is not None:
            pred.ready.synchronize()
            self.utilization.gpu_seconds += pred.started.elapsed_time(pred.ready) / 1e3
        batch, decoded = pred.batch, pred.decoded
        result = results.setdefault(batch.shard.index, ShardResult())
        scores = pred.scores.tolist()
        labels = pred.labels.tolist()
        for k, i in enumerate(decoded.ok):
            row = i if decoded.rows_aligned else k
            obj = batch.objects[i]
            result.rows.append(
                (image_id(obj.uri), label_names[labels[row]], labels[row], f"{scores[row]:.6f}", obj.uri)
            )
        for i, reason in sorted(decoded.errors.items()):
            result.errors.append((batch.objects[i].uri, reason))
        progress.update(len(batch.objects), len(decoded.errors))
        if not batch.last_in_shard:
            return False
        result.rows.sort(key=lambda r: r[4])
        result.errors.sort()
        committer.commit(batch.shard.index, results.pop(batch.shard.index))
        return True


def run(cfg: WorkerConfig) -> dict:
    worker = Worker(cfg)
    try:
        return worker.run()
    finally:
        dist.shutdown(worker.topo)
