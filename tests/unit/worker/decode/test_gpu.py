"""The GPU decoder's torch resize (used where Triton can't run), against Pillow, on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from worker.decode.gpu import resize_like_pillow


def _photo_like(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC)).astype(np.int16)
    return np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(480, 640), (640, 480), (97, 301)])
@pytest.mark.parametrize("mode,resample", [("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)])
def test_resize_like_pillow_matches_pillow(shape, mode, resample):
    img = _photo_like(*shape, seed=sum(shape))
    expected = np.asarray(Image.fromarray(img).resize((224, 224), resample, reducing_gap=None)).astype(
        np.float64
    )
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    got = resize_like_pillow(x, (224, 224), mode)[0].permute(1, 2, 0).numpy()
    diff = np.abs(got - expected)
    one_pass = (
        torch.nn.functional.interpolate(x, size=(224, 224), mode=mode, antialias=True, align_corners=False)[0]
        .permute(1, 2, 0)
        .numpy()
    )
    # Off by one level on a few pixels at most (Pillow's fixed-point weights), where a
    # single float pass is off on average by a quarter level.
    assert diff.max() <= 1
    assert diff.mean() < 0.03
    assert np.abs(one_pass - expected).mean() > 5 * diff.mean()
