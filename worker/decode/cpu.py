"""The Pillow decoder: the Hugging Face PIL image processor's steps, on a thread pool."""

from __future__ import annotations

import io
import math
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


def upright_rgb(img):
    """The image as ``pipeline("image-classification")`` loads it: EXIF orientation applied, then
    converted to RGB (grayscale and CMYK by Pillow's conversion; an alpha channel is dropped).
    """
    from PIL import ImageOps

    return ImageOps.exif_transpose(img).convert("RGB")


def center_crop(arr: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """HF's ``center_crop`` of an (H, W, C) array: the centered window, zero-padded where the image
    is smaller than the crop (``transformers.image_transforms.center_crop``, step for step).
    """
    h, w = arr.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
        return arr[top : top + ch, left : left + cw]
    new_h, new_w = max(ch, h), max(cw, w)
    padded = np.zeros((new_h, new_w, *arr.shape[2:]), dtype=arr.dtype)
    top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded[top_pad : top_pad + h, left_pad : left_pad + w] = arr
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top) : min(new_h, top + ch), max(0, left) : min(new_w, left + cw)]


def pil_resized(data: bytes, pre: Preprocess) -> np.ndarray:
    """Decode with Pillow, resize and center-crop: uint8 HWC, or raise with a reason."""
    from PIL import Image

    if not data:
        raise ValueError("empty file (0 bytes)")
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = upright_rgb(img)
    if pre.resize is not None:
        h, w = pre.resize_hw(rgb.height, rgb.width)
        rgb = rgb.resize((w, h), resample=pre.resample, reducing_gap=None)
    arr = np.asarray(rgb)
    for ch, cw in pre.crops:
        arr = center_crop(arr, ch, cw)
    return arr


def normalize_numpy(batch_hwc: np.ndarray, pre: Preprocess) -> np.ndarray:
    """(N,H,W,3) uint8 -> (N,3,H,W) float32, with the HF PIL backend's arithmetic and dtypes."""
    if pre.rescale_factor is not None:
        x = (batch_hwc.astype(np.float64) * pre.rescale_factor).astype(np.float32)
        if pre.rescale_offset:
            x -= 1
    else:
        x = batch_hwc.astype(np.float32)
    if pre.mean is not None:
        x = (x - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    if pre.std_again is not None:
        x = (x - np.zeros(3, dtype=np.float32)) / np.asarray(pre.std_again, dtype=np.float32)
    if pre.flip_channels:
        x = x[..., ::-1]
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
