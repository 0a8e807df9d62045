"""The Pillow decoder: the Hugging Face PIL image processor's steps, on a thread pool."""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch

from worker.decode.spec import Preprocess


@dataclass
class DecodedBatch:
    """Pixels for the images that decoded; ``ok`` indexes them within the batch.

    Pillow batches hold only the ok rows (row k is image ok[k]); GPU batches are a
    fixed-shape buffer where row i is image i (``rows_aligned``), and ``ready`` is
    the CUDA event the compute stream waits on before reading it.
    """

    pixels: torch.Tensor
    ok: list[int]
    errors: dict[int, str]
    rows_aligned: bool = False
    ready: object = None
    slot: int | None = None
    # Decoder-owned device memory the batch's queued kernels still read; dropped once they ran.
    keepalive: object = None


def _to_rgb(img):
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Blend transparency onto white, as the Hugging Face processors do.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def pil_resized(data: bytes, pre: Preprocess) -> np.ndarray:
    """Decode with Pillow and resize (and crop): uint8 HWC, or raise with a reason."""
    from PIL import Image

    if not data:
        raise ValueError("empty file (0 bytes)")
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = _to_rgb(img)
    h, w = pre.resize_hw(rgb.height, rgb.width)
    rgb = rgb.resize((w, h), resample=pre.resample, reducing_gap=None)
    arr = np.asarray(rgb)
    if pre.crop:
        top, left = pre.crop_box(h, w)
        ch, cw = pre.crop
        arr = arr[top : top + ch, left : left + cw]
    return arr


def normalize_numpy(batch_hwc: np.ndarray, pre: Preprocess) -> np.ndarray:
    """(N,H,W,3) uint8 -> (N,3,H,W) float32, with the HF processor's arithmetic."""
    x = batch_hwc.astype(np.float64)
    if pre.rescale_factor is not None:
        x = x * pre.rescale_factor
    x = x.astype(np.float32)
    if pre.mean is not None:
        x = (x - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _describe(exc: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "undecodable image: not a format Pillow recognises (corrupt or not an image)"
    return f"undecodable image: {type(exc).__name__}: {exc}"


class CpuDecoder:
    """Pillow decode in a thread pool (Pillow releases the GIL while decoding and resizing)."""

    def __init__(self, pre: Preprocess, pool: Executor):
        self.pre = pre
        self.pool = pool

    def decode_arrays(self, payloads: Sequence[bytes]) -> tuple[list[int], list[np.ndarray], dict[int, str]]:
        def one(data: bytes):
            try:
                return pil_resized(data, self.pre), None
            # Pillow's plugins raise many types on corrupt input (OSError, SyntaxError, struct.error,
            # DecompressionBombError...): whichever it is, the image becomes an error row, not a crash.
            except Exception as exc:
                return None, _describe(exc)

        ok, arrays, errors = [], [], {}
        for i, (arr, err) in enumerate(self.pool.map(one, payloads)):
            if err is None:
                ok.append(i)
                arrays.append(arr)
            else:
                errors[i] = err
        return ok, arrays, errors

    def __call__(self, payloads: Sequence[bytes]) -> DecodedBatch:
        ok, arrays, errors = self.decode_arrays(payloads)
        h, w = self.pre.output_hw
        if arrays:
            pixels = torch.from_numpy(normalize_numpy(np.stack(arrays), self.pre))
        else:
            pixels = torch.empty((0, 3, h, w), dtype=torch.float32)
        return DecodedBatch(pixels, ok, errors)
