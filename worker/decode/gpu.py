"""The GPU decoder: batched JPEG decode, Pillow's exact resize and the normalize, into a batch buffer."""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import Executor

import numpy as np
import torch

from worker.decode.cpu import CpuDecoder, DecodedBatch
from worker.decode.jpeg import JPEG_DECODERS, nvjpeg_decodable, photo_like_jpeg
from worker.decode.spec import TORCH_MODE, Preprocess

log = logging.getLogger(__name__)


def resize_like_pillow(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize a float (N,C,H,W) batch of 0..255 values as Pillow resizes a uint8 image.

    Pillow resamples in two passes, horizontal then vertical, rounding to uint8 after
    each. So does this, with the same antialiasing filter: one 2-D float pass differs
    from Pillow's pixels by about a quarter level on average, this by a few hundredths
    (Pillow's fixed-point weights differ in the last bits; the test measures both).
    """
    import torch.nn.functional as F

    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    for step in ((x.shape[-2], size[1]), size):
        x = (
            F.interpolate(x, size=step, mode=mode, antialias=True, align_corners=False)
            .round_()
            .clamp_(0, 255)
        )
    return x


class GpuDecoder:
    """Batched JPEG decode, then Pillow's exact resize + normalize as two Triton kernels per
    input size (``worker.decode.pillow_resize``), written straight into the batch buffer's rows.

    Each calling thread gets its own high-priority CUDA stream, so several decode
    threads overlap with each other and the decode kernels cut ahead of the long
    model kernels instead of queueing behind them.
    """

    def __init__(
        self,
        pre: Preprocess,
        pool: Executor,
        device: torch.device,
        dtype=torch.bfloat16,
        jpeg: str | None = "cuda",
        resize_dtype=torch.float32,
    ):
        """``jpeg``: "cuda" or "hardware" (a key of ``JPEG_DECODERS``), or None for Pillow only.

        Where the model's preprocessing is one the JPEG path can't reproduce exactly
        (``Preprocess.gpu_inexact``), every image goes through Pillow instead, as on a CPU run.
        """
        inexact = pre.gpu_inexact() if jpeg else None
        if inexact:
            log.info(
                "decode: Pillow for every image, since the GPU path can't reproduce %s: %s",
                pre.processor,
                inexact,
            )
        self.jpeg = JPEG_DECODERS[jpeg](device) if jpeg and not inexact else None
        self.pre = pre
        self.cpu = CpuDecoder(pre, pool)
        self.device = device
        self.dtype = dtype
        self.resize_dtype = resize_dtype
        self._local = threading.local()
        # Rescale and normalizations folded into one multiply-add per channel. With a flipped
        # channel order the input's channels are flipped first, so the factors are too.
        mul, add = pre.affine()
        self.channels = [2, 1, 0] if pre.flip_channels else None
        if self.channels:
            mul, add = mul[::-1], add[::-1]
        self.mul = torch.tensor(mul, device=device).view(1, 3, 1, 1).float()
        self.add = torch.tensor(add, device=device).view(1, 3, 1, 1).float()
        self.mode = TORCH_MODE.get(pre.resample, "bilinear")
        self.resize = self._pillow_resize(pre, device)
        warnings.filterwarnings("ignore", message="The given buffer is not writable")

    def _pillow_resize(self, pre: Preprocess, device: torch.device):
        """Pillow's exact resize as Triton kernels, compiled here on a dummy image; None (the
        torch resize instead) where the filter has no fixed-point form or Triton can't run.
        """
        from worker.decode.pillow_resize import FILTERS, PillowResize

        if pre.resample not in FILTERS:
            return None

        resize = PillowResize(pre.resample, self.mul, self.add, pre.resize_hw, pre.crop_window)
        try:
            scratch = torch.empty((1, 3, *pre.output_hw), device=device, dtype=self.dtype)
            resize(
                torch.zeros((1, 3, 480, 640), dtype=torch.uint8, device=device),
                torch.zeros(1, dtype=torch.long, device=device),
                scratch,
            )
        # No Triton (ImportError), no C compiler, a kernel that fails to compile (Triton's own
        # error types): whichever, the torch resize still works, so it is a warning.
        except Exception as exc:
            log.warning(
                "Pillow-exact GPU resize unavailable (%s: %s); using torch's resize", type(exc).__name__, exc
            )
            return None
        return resize

    def warm_up(self, batch_size: int, calls: int = 16) -> None:
        """Decode a few full batches of synthetic photos, from the thread that will decode.

        A process's first nvjpeg batch calls are several times slower than once warm
        (benchmarks/NOTES.md): that is start-up, paid here rather than by the first real
        batches. Both orientations and a larger size grow the library's and the
        allocator's buffers, and prepare the resize (weights, pass order) for those sizes, up front.
        """
        if self.jpeg is None:
            return
        photos = [
            photo_like_jpeg(h, w, seed, quality)
            for seed, (h, w, quality) in enumerate(
                ((480, 640, 95), (640, 480, 95), (960, 1280, 90), (1280, 960, 90))
            )
        ]
        payloads = [photos[i % len(photos)] for i in range(batch_size)]
        scratch = torch.empty((batch_size, 3, *self.pre.output_hw), device=self.device, dtype=self.dtype)
        for _ in range(calls):
            self(payloads, scratch).ready.synchronize()

    @property
    def stream(self) -> torch.cuda.Stream:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            _, highest = torch.cuda.Stream.priority_range()
            stream = self._local.stream = torch.cuda.Stream(device=self.device, priority=highest)
        return stream

    def _to_device(self, values: list[int]) -> torch.Tensor:
        # Pinned + non_blocking: a pageable copy would block this thread until the stream drains.
        return torch.tensor(values, dtype=torch.long).pin_memory().to(self.device, non_blocking=True)

    def _resize_group(self, images: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(images).to(self.resize_dtype)
        h, w = self.pre.resize_hw(x.shape[-2], x.shape[-1])
        x = resize_like_pillow(x, (h, w), self.mode)
        top, left, ch, cw = self.pre.crop_window(h, w)
        return x[:, :, top : top + ch, left : left + cw]

    def __call__(self, payloads: Sequence[bytes], out: torch.Tensor) -> DecodedBatch:
        """Decode into ``out`` (a (B,3,H,W) buffer on the device); returns the rows that are valid."""
        gpu_idx = [i for i, b in enumerate(payloads) if self.jpeg and nvjpeg_decodable(b)]
        gpu_set = set(gpu_idx)
        cpu_idx = [i for i in range(len(payloads)) if i not in gpu_set]
        errors: dict[int, str] = {}
        stream = self.stream
        with torch.cuda.stream(stream):
            decoded, keepalive = (
                self.jpeg.decode([payloads[i] for i in gpu_idx], stream) if gpu_idx else ([], None)
            )
            by_shape: dict[tuple[int, int], list[int]] = {}
            for pos, img in enumerate(decoded):
                if img is None:
                    cpu_idx.append(gpu_idx[pos])
                else:
                    by_shape.setdefault(tuple(img.shape[-2:]), []).append(pos)
            valid = [False] * len(payloads)
            for positions in by_shape.values():
                rows = self._to_device([gpu_idx[p] for p in positions])
                images = [
                    decoded[p] if self.channels is None else decoded[p][self.channels] for p in positions
                ]
                if self.resize is not None:
                    self.resize(torch.stack(images), rows, out)
                else:
                    resized = self._resize_group(images)
                    out.index_copy_(0, rows, (resized.float() * self.mul + self.add).to(self.dtype))
                for p in positions:
                    valid[gpu_idx[p]] = True
            if cpu_idx:
                cpu_idx.sort()
                ok, arrays, errs = self.cpu.decode_arrays([payloads[i] for i in cpu_idx])
                errors.update({cpu_idx[k]: reason for k, reason in errs.items()})
                if arrays:
                    host = torch.from_numpy(np.stack(arrays)).pin_memory()
                    x = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
                    if self.channels is not None:
                        x = x[:, self.channels]
                    rows = self._to_device([cpu_idx[k] for k in ok])
                    out.index_copy_(0, rows, (x * self.mul + self.add).to(self.dtype))
                    for k in ok:
                        valid[cpu_idx[k]] = True
            done = torch.cuda.Event()
            done.record(stream)
        return DecodedBatch(
            out,
            [i for i, v in enumerate(valid) if v],
            errors,
            rows_aligned=True,
            ready=done,
            keepalive=keepalive,
        )
