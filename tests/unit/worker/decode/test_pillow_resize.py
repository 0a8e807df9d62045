"""The GPU path's resize kernels against Pillow itself: the same uint8 pixels, bit for bit.

The Triton kernels run on the CPU in Triton's interpreter, so no GPU is needed here; on a GPU
the same kernel source is compiled (benchmarks/NOTES.md has the on-device comparison).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels module is first imported

import numpy as np
import pytest
import torch
from PIL import Image

from worker.decode.pillow_resize import (
    BICUBIC,
    BILINEAR,
    BOX,
    HAMMING,
    LANCZOS,
    PillowResize,
    resample_coefficients,
    resample_pass,
    vertical_first,
)
from worker.decode.spec import Preprocess

pytest.importorskip("triton")

RNG = np.random.default_rng(7)


def pillow(image: np.ndarray, size_hw: tuple[int, int], resample: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize(size_hw[::-1], resample=resample, reducing_gap=None))


@pytest.mark.parametrize("resample", [BILINEAR, BICUBIC, LANCZOS, BOX, HAMMING])
@pytest.mark.parametrize("in_size,out_size", [(640, 224), (480, 224), (20, 24), (97, 31)])
def test_one_axis_weights_reproduce_pillow(resample, in_size, out_size):
    row = RNG.integers(0, 256, (3, in_size), dtype=np.uint8)
    first, weights = resample_coefficients(in_size, out_size, resample)
    assert weights.sum(1).min() > 0
    assert np.array_equal(resample_pass(row, first, weights), pillow(row, (3, out_size), resample))


def test_pass_order_follows_the_installed_pillow():
    # A case where the two orders round differently: which one matches depends on Pillow's version.
    h, w, oh, ow = 30, 20, 24, 24
    image = RNG.integers(0, 256, (h, w), dtype=np.uint8)
    want = pillow(image, (oh, ow), BILINEAR)
    hfirst, hweights = resample_coefficients(w, ow, BILINEAR)
    vfirst, vweights = resample_coefficients(h, oh, BILINEAR)
    across_then_down = resample_pass(resample_pass(image, hfirst, hweights).T, vfirst, vweights).T
    down_then_across = resample_pass(resample_pass(image.T, vfirst, vweights).T, hfirst, hweights)
    assert not np.array_equal(across_then_down, down_then_across)
    chosen = down_then_across if vertical_first(h, w, oh, ow, BILINEAR) else across_then_down
    assert np.array_equal(chosen, want)


@pytest.mark.parametrize(
    "h,w,oh,ow,resample,crop",
    [
        (48, 64, 24, 24, BILINEAR, None),  # landscape, both axes shrink
        (30, 20, 24, 24, BILINEAR, None),  # one axis grows, the other shrinks
        (40, 30, 32, 24, BICUBIC, (4, 2, 20, 18)),  # shortest-edge style resize, then a center crop
    ],
)
def test_kernels_write_pillow_pixels_into_the_right_rows(h, w, oh, ow, resample, crop):
    images = RNG.integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    want = np.stack([pillow(im, (oh, ow), resample) for im in images])
    if crop:
        top, left, ch, cw = crop
        want = want[:, top : top + ch, left : left + cw]
    out = torch.full((5, 3, *want.shape[1:3]), -1.0)
    rows = torch.tensor([4, 0, 2])
    resize = PillowResize(
        resample,
        torch.ones(3),
        torch.zeros(3),
        lambda *_: (oh, ow),
        (lambda *_: crop) if crop else (lambda rh, rw: (0, 0, rh, rw)),
    )
    # Decoders hand over channel-first views of channel-last images: strides, not copies.
    resize(torch.from_numpy(images).permute(0, 3, 1, 2), rows, out)
    assert np.array_equal(out[rows].permute(0, 2, 3, 1).numpy(), want.astype(np.float32))
    assert (out[[1, 3]] == -1).all(), "rows not named must stay untouched"


def test_kernels_normalize_like_the_image_processor():
    from transformers import ViTImageProcessorPil

    pre = Preprocess.from_processor(
        ViTImageProcessorPil(
            size={"height": 8, "width": 8},
            resample=BILINEAR,
            image_mean=[0.5, 0.4, 0.3],
            image_std=[0.2, 0.25, 0.5],
        )
    )
    image = RNG.integers(0, 256, (1, 12, 16, 3), dtype=np.uint8)
    mean, std = torch.tensor(pre.mean), torch.tensor(pre.std)
    resize = PillowResize(
        pre.resample, pre.rescale_factor / std, -mean / std, pre.resize_hw, lambda rh, rw: (0, 0, rh, rw)
    )
    out = torch.empty((1, 3, 8, 8))
    resize(torch.from_numpy(image).permute(0, 3, 1, 2), torch.tensor([0]), out)
    pixels = torch.from_numpy(pillow(image[0], (8, 8), BILINEAR).copy()).permute(2, 0, 1).double()
    want = ((pixels * pre.rescale_factor).float() - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    torch.testing.assert_close(out[0], want, atol=1e-5, rtol=0)
