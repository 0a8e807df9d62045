"""The worker: plan -> read -> decode -> infer -> commit, one rank of a torchrun job."""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from worker import dist
from worker.commit import CommitQueue, Committer, ShardResult, discard_interrupted_writes
from worker.config import ConfigError, WorkerConfig
from worker.decode.stage import DecodeStage, default_decode_threads
from worker.fingerprint import OutputGuard, model_revision
from worker.infer import (
    DECODE_LOOKAHEAD,
    GPU_BATCHES_IN_FLIGHT,
    Inference,
    Prediction,
    model_stream,
    resolve_device,
    warm_up,
)
from worker.model_files import fetch_model_once_per_node
from worker.plan import Shard, Shards, make_shards, static_assignment
from worker.plan_store import PlanReader, TableIndex
from worker.prefetch import prefetch_map
from worker.read import batches, open_reader, read_batches, read_settings
from worker.results import PLAN_DIR
from worker.schema import check_schema
from worker.storage import join
from worker.tasks import Task, task_class
from worker.telemetry import Progress, StartupClock, Utilization, library_versions, log_done

log = logging.getLogger(__name__)

# Fault injection for resume tests: SIGKILL this rank after it commits N shards.
FAULT_KILL_AFTER_SHARDS = "WORKER_FAULT_KILL_AFTER_SHARDS"


def import_model_code_in_background() -> threading.Thread:
    """Transformers takes seconds to import; do it while the process group forms, not after.

    Join the thread before touching transformers: its lazy module is not safe to import
    from two threads at once.
    """

    def load() -> None:
        importlib.import_module("transformers.models.auto.modeling_auto")  # AutoModelFor...'s home

    thread = threading.Thread(target=load, name="import-transformers", daemon=True)
    thread.start()
    return thread


class Worker:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.startup = StartupClock()
        self.startup.mark("imports")
        self.importing_model_code = import_model_code_in_background()
        self.device = resolve_device(cfg.device)
        self.on_gpu = self.device.type == "cuda"
        if cfg.decode == "gpu" and not self.on_gpu:
            raise ConfigError("--decode gpu: no GPU is visible to this process", "decode")
        self.batch_size = cfg.batch_size_on(self.device.type)
        self.topo = dist.init(self.device.type)
        self.startup.mark("process_group")
        self.model_fetched: Future[str] | None = None  # rank 0: where load_task found the model
        self.planning: Future | None = None  # rank 0's planning thread
        # The task's part columns: they are known before its model loads (the run record holds them).
        self.columns = task_class(cfg.task).columns(cfg)
        try:
            check_schema(self.columns)
        except ValueError as exc:
            raise ConfigError(f"--task {cfg.task}: {exc}", "task") from None
        self.uri_column = [c.name for c in self.columns].index("uri")

    # Stage 1
    def start_planning(self) -> Future | None:
        """Rank 0 lists the input in a background thread, while every rank loads the model:
        on a large local dataset the listing takes seconds that would otherwise be start-up.
        The thread seals the run's record once the model is fetched (``worker.fingerprint``).
        """
        if self.topo.rank != 0:
            return None
        guard = OutputGuard(self.cfg, self.device.type, self.columns)
        guard.check_settings()  # another run's results in OUTPUT stop the job before the model loads
        self.model_fetched = Future()
        pool = ThreadPoolExecutor(1, thread_name_prefix="plan")

        def plan_on_rank0() -> tuple[bytes, str, list[int]]:
            discard_interrupted_writes(self.cfg.output, self.cfg.project)
            # Hashed once, when first needed: an incremental plan needs it to choose its base.
            revision = functools.cache(lambda: model_revision(self.model_fetched.result()))
            plan = guard.plan(revision)
            fingerprint, committed = guard.seal(plan, revision())
            return plan.index_bytes, fingerprint, sorted(committed)

        self.planning = pool.submit(plan_on_rank0)
        pool.shutdown(wait=False)
        return self.planning

    def finish_planning(self, planning: Future | None) -> tuple[PlanReader, str, Shards, set[int]]:
        """Every rank's view of the plan: its index (what rank 0 broadcasts, a few hundred bytes
        per piece of 64k images, never the images) and the shards already committed.
        """
        index_bytes, fingerprint, committed = self.topo.broadcast(planning.result() if planning else None)
        index = TableIndex.decode(index_bytes)
        plan = PlanReader(join(self.cfg.output, PLAN_DIR), index, project=self.cfg.project)
        committed = set(committed)
        shards = make_shards(index.images, index.shard_size)
        if committed:
            log.info("resuming: %d of %d shards are already committed", len(committed), len(shards))
        return plan, fingerprint, shards, committed

    def my_shards(self, shards: Shards, committed: set[int]) -> tuple[Iterator[Shard], int]:
        """This rank's shards, and an estimate of its image count (exact for static assignment)."""
        if self.cfg.assignment == "static":
            mine = static_assignment(shards, self.topo.rank, self.topo.world_size)
            expected = sum(len(s) for s in mine if s.index not in committed)
            return (s for s in mine if s.index not in committed), expected
        todo = sum(len(s) for s in shards if s.index not in committed)
        claimed = (shards[i] for i in self.topo.claim_shards(len(shards)) if i not in committed)
        return claimed, -(-todo // self.topo.world_size)

    # Stage 4's model, ready on the device
    def load_task(self) -> tuple[Task, object]:
        cfg, startup = self.cfg, self.startup
        model_path = fetch_model_once_per_node(cfg.model, self.topo, cfg.model_cache, cfg.project)
        if self.model_fetched is not None:
            self.model_fetched.set_result(model_path)
        startup.mark("model_fetched")
        task = task_class(cfg.task)(model_path, self.device, cfg)
        startup.mark("model_loaded")
        if self.planning is not None and self.planning.done():
            self.planning.result()  # a refusal to add to OUTPUT stops the job before the GPU warm-up
        graph = None
        if self.device.type == "cuda":
            shape = (self.batch_size, 3, *task.preprocess.output_hw)
            graph = warm_up(task, shape, self.device, cfg.cuda_graph, cfg.compile, mark=startup.mark)
        startup.mark("warmed_up")
        return task, graph

    def run(self) -> dict:
        cfg, topo, on_gpu = self.cfg, self.topo, self.on_gpu
        # Seconds, before anything is planned, written or fetched: a model this worker can't run
        # stops it here.
        self.importing_model_code.join()
        task_class(cfg.task).check_model(cfg.model, cfg, decode=cfg.decode if on_gpu else "cpu")
        planning = self.start_planning()
        try:
            task, graph = self.load_task()
        except BaseException:
            if self.model_fetched is not None:
                self.model_fetched.cancel()  # the planning thread waits for it
            raise
        plan, fingerprint, shards, committed = self.finish_planning(planning)
        work, expected = self.my_shards(shards, committed)
        setup_seconds = self.startup.mark("plan_shared")

        decode_threads = cfg.decode_threads or default_decode_threads(topo.local_world_size)
        # Pillow batches are decoded by the pil pool already; extra batch-level workers pay off on GPU.
        decode_workers = cfg.decode_workers if on_gpu else 1
        committer = Committer(cfg.output, fingerprint, cfg.project, columns=[c.name for c in self.columns])
        kill_after = int(os.environ.get(FAULT_KILL_AFTER_SHARDS, "0"))
        infer = Inference(task, self.device, cfg.queued_blocks, graph)
        self.utilization = Utilization()

        with (
            model_stream(self.device),
            contextlib.ExitStack() as stack,
            ThreadPoolExecutor(decode_threads, thread_name_prefix="pil") as pil_pool,
            ThreadPoolExecutor(decode_workers, thread_name_prefix="decode") as decode_pool,
            CommitQueue(committer, self.uri_column, kill_after=kill_after) as commits,
        ):
            jpeg = cfg.gpu_jpeg if cfg.decode in ("auto", "gpu") else None
            decode = DecodeStage(
                task.preprocess, self.device, self.batch_size, pil_pool, decode_pool, decode_workers, jpeg
            )
            self.startup.mark("decoder_ready")
            settings = read_settings(cfg, topo.world_size)
            archived = plan.index.archived
            reader = stack.enter_context(contextlib.closing(open_reader(cfg, settings, archived=archived)))
            progress = Progress(
                topo.rank, expected, cfg.log_interval, reads=reader.stats, utilization=self.utilization
            )
            read = read_batches(reader, batches(plan, work, self.batch_size), settings)
            decoded_batches = prefetch_map(decode, read, decode_pool, depth=decode_workers + DECODE_LOOKAHEAD)
            pending: collections.deque[Prediction] = collections.deque()
            results: dict[int, ShardResult] = {}
            # On GPU one batch stays in flight, so the host builds rows while the GPU computes.
            in_flight = GPU_BATCHES_IN_FLIGHT if on_gpu else 0
            for batch, decoded in self.utilization.waiting(decoded_batches):
                outputs, ready, started = infer(decoded)
                decode.release(decoded)
                pending.append(Prediction(batch, decoded, outputs, ready, started))
                while len(pending) > in_flight:
                    self._collect(pending.popleft(), task, results, commits, progress)
            while pending:
                self._collect(pending.popleft(), task, results, commits, progress)
            shards_done = commits.close()

        shares = self.utilization.shares(progress.seconds)
        summary = {
            "rank": topo.rank,
            "world_size": topo.world_size,
            "device": self.device.type,
            "batch_size": self.batch_size,
            "images": progress.done,
            "errors": progress.errors,
            "shards": shards_done,
            "seconds": round(progress.seconds, 3),
            "setup_seconds": setup_seconds,
            # Seconds since the process started at which each start-up step was done; planning
            # overlaps the model load, so "plan_shared" shows only what the model load did not hide.
            "setup_done_at": self.startup.steps,
            "images_per_second": round(progress.rate, 2),
            # Shares of the processing time: GPU busy with the model (low: the input can't keep
            # up, or the host can't queue the work fast enough) and the loop waiting for decode.
            **shares,
            **reader.stats.summary(progress.done),
            # Cumulative samples over the processing time, for the report's curves (bounded size).
            "timeline": progress.timeline_summary(),
            "versions": library_versions(),
        }
        committer.write_summary(topo.rank, summary)
        log_done(progress, shards_done, shares, on_gpu)
        return summary

    # Stage 5
    def _collect(
        self,
        pred: Prediction,
        task: Task,
        results: dict[int, ShardResult],
        commits: CommitQueue,
        progress: Progress,
    ) -> None:
        """Turn one batch's outputs into rows; hand the shard to the commit thread at its last batch."""
        if pred.ready is not None:
            pred.ready.synchronize()
            self.utilization.gpu_seconds += pred.started.elapsed_time(pred.ready) / 1e3
        batch, decoded = pred.batch, pred.decoded
        result = results.setdefault(batch.shard.index, ShardResult())
        if decoded.ok:
            # GPU batches keep row i for image i; Pillow batches hold only the decoded images.
            rows = decoded.ok if decoded.rows_aligned else list(range(len(decoded.ok)))
            # NumPy, not Python lists: an embedding batch is 100,000s of floats.
            outputs = [o.numpy()[rows] for o in pred.outputs]
            result.rows += task.rows([batch.objects[i] for i in decoded.ok], outputs)
        for i, reason in sorted(decoded.errors.items()):
            result.errors.append((batch.objects[i].uri, reason))
        if "first_batch" not in self.startup.steps:
            self.startup.mark("first_batch")
        progress.update(len(batch.objects), len(decoded.errors))
        if batch.last_in_shard:
            commits.submit(batch.shard.index, results.pop(batch.shard.index))


def run(cfg: WorkerConfig) -> dict:
    worker = Worker(cfg)
    try:
        return worker.run()
    finally:
        dist.shutdown(worker.topo)
