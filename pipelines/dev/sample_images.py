"""A synthetic image set for local runs: varied sizes and formats, and one corrupt file.

The corrupt file is deliberate: it shows how the pipeline reports an image it cannot
decode (an error row in the results, counted in the metrics) instead of crashing.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

CORRUPT_NAME = "corrupt/not_really_an_image.jpg"
# Enough variety to exercise resizing (tiny, wide, tall, large) without slowing a CPU run.
SIZES = [(64, 48), (640, 480), (480, 640), (320, 320), (1024, 256), (200, 150), (96, 128)]


@dataclass(frozen=True)
class SampleSet:
    root: Path
    images: list[Path]  # every file written, the corrupt one included
    corrupt: Path


def _image_bytes(rng: random.Random, size: tuple[int, int], fmt: str) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        x1, y1 = x0 + rng.randrange(1, size[0]), y0 + rng.randrange(1, size[1])
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_sample_images(root: str | Path, n: int = 64, *, seed: int = 0) -> SampleSet:
    """Write ``n`` images under ``root``: JPEGs of varied sizes, every fifth a PNG, one corrupt.

    Args:
        root: Directory to fill (nested folders are created under it).
        n: How many files in total, the corrupt one included; at least 1.
        seed: The same seed writes the same bytes.

    Returns:
        The files written.
    """
    if n < 1:
        raise ValueError("the sample set needs at least one image")
    root = Path(root)
    rng = random.Random(seed)
    paths = []
    for i in range(n - 1):
        fmt = "PNG" if i % 5 == 4 else "JPEG"
        path = root / f"set{i % 3}" / f"sample_{i:05d}.{'png' if fmt == 'PNG' else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_image_bytes(rng, SIZES[i % len(SIZES)], fmt))
        paths.append(path)
    corrupt = root / CORRUPT_NAME
    corrupt.parent.mkdir(parents=True, exist_ok=True)
    # A JPEG start-of-image marker followed by garbage: the extension and magic look right.
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.randrange(256) for _ in range(512)))
    paths.append(corrupt)
    return SampleSet(root, paths, corrupt)
