"""Test helpers: a tiny random ViT and sample images, all built locally (no network)."""

from __future__ import annotations

import io
import random
from pathlib import Path


def make_tiny_model(path: Path) -> Path:
    """A random-weight ViT small enough to run thousands of images a second on one CPU core."""
    from pipelines.dev.random_model import make_model

    return make_model(path, tiny=True)


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB", **save_kwargs) -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    img = Image.new(mode, size)
    bands = len(mode) if mode != "L" else 1
    img.putdata(
        [
            tuple(rng.randrange(256) for _ in range(bands)) if bands > 1 else rng.randrange(256)
            for _ in range(size[0] * size[1])
        ]
    )
    buf = io.BytesIO()
    img.save(buf, format=save_kwargs.pop("format", "JPEG"), **save_kwargs)
    return buf.getvalue()


def write_images(root: Path, n: int, subdirs: int = 3) -> list[Path]:
    """n small JPEGs spread over a few nested folders."""
    paths = []
    for i in range(n):
        path = root / f"d{i % subdirs}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(i))
        paths.append(path)
    return paths


def upload_images(client, bucket: str, prefix: str, n: int) -> list[str]:
    """n small JPEGs uploaded to gs://bucket/prefix/..., returns their URIs."""
    b = client.bucket(bucket)
    uris = []
    for i in range(n):
        name = f"{prefix.strip('/')}/d{i % 3}/img_{i:05d}.jpg"
        b.blob(name).upload_from_string(jpeg_bytes(i), content_type="image/jpeg")
        uris.append(f"gs://{bucket}/{name}")
    return uris
