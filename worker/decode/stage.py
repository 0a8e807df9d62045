"""The decode stage as the worker runs it: a read batch in, a decoded batch (and its errors) out."""

from __future__ import annotations

import logging
from concurrent.futures import Executor

import torch

from worker.cores import usable_cores
from worker.decode.cpu import CpuDecoder, DecodedBatch
from worker.decode.gpu import GpuDecoder
from worker.decode.spec import Preprocess
from worker.infer import BufferRing, ring_slots
from worker.read import Batch
from worker.storage import ReadError

log = logging.getLogger(__name__)


def default_decode_threads(local_world_size: int) -> int:
    """One Pillow thread per CPU core available to this rank."""
    return max(1, usable_cores() // max(1, local_world_size))


class DecodeStage:
    """Decodes read batches with Pillow (CPU runs) or on the GPU into a ring of batch buffers.

    On a GPU run even Pillow-decoded images are normalized on the GPU: shipping uint8 is 4x
    fewer bytes than float32, and the CPU is the scarcer resource there. ``jpeg`` names the
    GPU's JPEG decoder (``worker.decode.jpeg.JPEG_DECODERS``), or None for Pillow only.
    """

    def __init__(
        self,
        pre: Preprocess,
        device: torch.device,
        batch_size: int,
        pil_pool: Executor,
        decode_pool: Executor,
        decode_workers: int,
        jpeg: str | None,
    ):
        self.ring: BufferRing | None = None
        if device.type != "cuda":
            self.cpu = CpuDecoder(pre, pil_pool)
            return
        self.gpu = GpuDecoder(pre, pil_pool, device, jpeg=jpeg)
        log.info(
            "decode: %s", f"JPEG on {self.gpu.jpeg.name} + Pillow fallback" if self.gpu.jpeg else "Pillow"
        )
        self.ring = BufferRing(ring_slots(decode_workers), batch_size, pre.output_hw, device, torch.bfloat16)
        # Warmed from a decode thread: the decoder's per-thread state is made where it is used.
        decode_pool.submit(torch.inference_mode()(self.gpu.warm_up), batch_size).result()

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> tuple[Batch, DecodedBatch]:
        read_errors = {i: str(p) for i, p in enumerate(batch.payloads) if isinstance(p, ReadError)}
        payloads = [b"" if isinstance(p, ReadError) else p for p in batch.payloads]
        if self.ring is not None:
            slot, buffer = self.ring.acquire(self.gpu.stream)
            decoded = self.gpu(payloads, buffer)
            decoded.slot = slot
        else:
            decoded = self.cpu(payloads)
        decoded.errors.update(read_errors)
        return batch, decoded

    def release(self, decoded: DecodedBatch) -> None:
        """The model has read this batch's buffer (queued on the current stream): it may be reused."""
        if decoded.slot is not None:
            self.ring.release(decoded.slot)
