"""Pillow's uint8 resize, bit for bit, on the GPU: two Triton kernels per batch of same-size images.

Pillow resamples in two passes (horizontal, then vertical), each with fixed-point weights
(22 fraction bits) and a clip to uint8 after the pass. ``resample_coefficients`` computes the
weights exactly as Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` do, so the
kernels reproduce ``Image.resize`` exactly rather than approximately.

Why kernels of our own: the torch version (cast to float32, two antialiased interpolations,
rounding and clamping, normalize, scatter) made a dozen passes over full-size float images, the
largest GPU cost of the JPEG path beside the model (benchmarks/NOTES.md). Here the first pass
reads the decoded uint8 image once and writes uint8; the second also crops, normalizes and
writes the model's dtype straight into the batch buffer's rows.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2

# Pillow's resample codes, as stored in preprocessor_config.json.
LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING = 1, 2, 3, 4, 5


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


# Pillow's hamming filter uses float literals (0.54f, 0.46f).
_F32_054, _F32_046 = float(np.float32(0.54)), float(np.float32(0.46))


def _hamming(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x *= math.pi
    return math.sin(x) / x * (_F32_054 + _F32_046 * math.cos(x))


FILTERS = {
    BILINEAR: (_bilinear, 1.0),
    BICUBIC: (_bicubic, 2.0),
    LANCZOS: (_lanczos, 3.0),
    BOX: (_box, 0.5),
    HAMMING: (_hamming, 1.0),
}


def resample_coefficients(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's per-output-pixel first input index and fixed-point weights for one axis.

    Returns ``(first, weights)``: int32 arrays of shape (out,) and (out, taps); taps past a
    pixel's window are 0. Follows Resample.c: double-precision filter weights normalized to
    sum 1, then rounded half away from zero to 22 fraction bits.
    """
    fn, support = FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    taps = int(math.ceil(support)) * 2 + 1
    first = np.zeros(out_size, dtype=np.int32)
    weights = np.zeros((out_size, taps), dtype=np.int32)
    inv = 1.0 / filterscale
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [fn((x + xmin - center + 0.5) * inv) for x in range(xmax)]
        total = sum(w)
        if total != 0.0:
            w = [v / total for v in w]
        weights[xx, :xmax] = [
            int(-0.5 + v * (1 << PRECISION_BITS)) if v < 0 else int(0.5 + v * (1 << PRECISION_BITS))
            for v in w
        ]
        first[xx] = xmin
    return first, weights


def resample_pass(pixels: np.ndarray, first: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One Pillow pass along the last axis, in numpy: the CPU reference for the kernels."""
    taps = np.minimum(first[:, None] + np.arange(weights.shape[1]), pixels.shape[-1] - 1)
    acc = (pixels.astype(np.int64)[..., taps] * weights).sum(-1) + (1 << (PRECISION_BITS - 1))
    return np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)


@functools.cache
def vertical_first(height: int, width: int, out_height: int, out_width: int, resample: int) -> bool:
    """Which pass the installed Pillow runs first for this size change.

    Pillow has always resized horizontally first, except that since 2026 (python-pillow/Pillow
    #9549) it goes vertically first when the height shrinks much more than the width, and the
    two orders round differently. So ask Pillow itself, once per size: resize a noise image and
    see which order reproduces it.
    """
    from PIL import Image

    noise = np.random.default_rng(height * 7919 + width).integers(0, 256, (height, width), dtype=np.uint8)
    want = np.asarray(
        Image.fromarray(noise).resize((out_width, out_height), resample=resample, reducing_gap=None)
    )
    hfirst, hweights = resample_coefficients(width, out_width, resample)
    vfirst, vweights = resample_coefficients(height, out_height, resample)
    across = resample_pass(resample_pass(noise, hfirst, hweights).T, vfirst, vweights).T
    if np.array_equal(across, want):
        return False
    down = resample_pass(resample_pass(noise.T, vfirst, vweights).T, hfirst, hweights)
    if np.array_equal(down, want):
        return True
    raise RuntimeError(
        f"neither pass order reproduces this Pillow's resize of {width}x{height} to {out_width}x{out_height}"
    )


def _kernels():
    """The Triton kernels; imported on first use, since only the GPU path needs Triton."""
    from worker.decode import pillow_resize_kernels

    return pillow_resize_kernels.horizontal, pillow_resize_kernels.vertical


class PillowResize:
    """Resize (+ center crop) + normalize a uint8 (N,3,H,W) batch into rows of a batch buffer.

    ``resized_hw(h, w)`` gives the resized size of an input, ``crop(rh, rw)`` the window
    (top, left, height, width) kept from it. Weights are built once per input size and kept
    on the device.
    """

    BLOCK = 256

    def __init__(self, resample: int, mul: torch.Tensor, add: torch.Tensor, resized_hw, crop):
        if resample not in FILTERS:
            raise ValueError(f"resample {resample} has no fixed-point filter here (Pillow uses another path)")
        self.resample = resample
        self.mul = mul.reshape(3).float().contiguous()
        self.add = add.reshape(3).float().contiguous()
        self.resized_hw = resized_hw
        self.crop = crop
        self._tables: dict[tuple, tuple] = {}

    def _table(self, in_size: int, out_size: int, start: int, length: int, device) -> tuple:
        key = (in_size, out_size, start, length, str(device))
        if key not in self._tables:
            first, weights = resample_coefficients(in_size, out_size, self.resample)
            self._tables[key] = (
                torch.from_numpy(first[start : start + length].copy()).to(device),
                torch.from_numpy(weights[start : start + length].copy()).to(device),
                weights.shape[1],
            )
        return self._tables[key]

    def __call__(self, images: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
        """``images``: uint8 (N,3,H,W), any strides; ``rows``: int64 (N,) rows of ``out`` to fill."""
        horizontal, vertical = _kernels()
        n, _, h, w = images.shape
        rh, rw = self.resized_hw(h, w)
        top, left, ch, cw = self.crop(rh, rw)
        device = images.device
        cols = self._table(w, rw, left, cw, device)
        lines = self._table(h, rh, top, ch, device)
        final = (out, out.stride(0), out.stride(1), out.stride(2), rows, self.mul, self.add)
        grid_cols = -(-cw // self.BLOCK)
        if vertical_first(h, w, rh, rw, self.resample):
            mid = torch.empty((n, 3, ch, w), dtype=torch.uint8, device=device)
            vertical[(n * 3 * ch, -(-w // self.BLOCK))](
                images,
                *images.stride(),
                *lines,
                w,
                ch,
                mid,
                *mid.stride()[:3],
                rows,
                self.mul,
                self.add,
                FINAL=False,
                BLOCK=self.BLOCK,
            )
            horizontal[(n * 3 * ch, grid_cols)](
                mid, *mid.stride(), *cols, cw, ch, *final, FINAL=True, BLOCK=self.BLOCK
            )
        else:
            mid = torch.empty((n, 3, h, cw), dtype=torch.uint8, device=device)
            horizontal[(n * 3 * h, grid_cols)](
                images,
                *images.stride(),
                *cols,
                cw,
                h,
                mid,
                *mid.stride()[:3],
                rows,
                self.mul,
                self.add,
                FINAL=False,
                BLOCK=self.BLOCK,
            )
            vertical[(n * 3 * ch, grid_cols)](
                mid, *mid.stride(), *lines, cw, ch, *final, FINAL=True, BLOCK=self.BLOCK
            )
