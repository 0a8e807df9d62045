"""Test helpers: a tiny random ViT and sample images, all built locally (no network)."""

from __future__ import annotations

import io
import random
from pathlib import Path


def make_tiny_model(path: Path, num_labels: int = 10, image_size: int = 32, seed: int = 0) -> Path:
    """A random-weight ViT small enough to run thousands of images a second on one CPU core."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=num_labels,
        id2label={i: f"class_{i}" for i in range(num_labels)},
        label2id={f"class_{i}": i for i in range(num_labels)},
    )
    model = ViTForImageClassification(config).eval()
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB", **save_kwargs) -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    img = Image.new(mode, size)
    bands = len(mode) if mode != "L" else 1
    img.putdata([tuple(rng.randrange(256) for _ in range(bands)) if bands > 1 else rng.randrange(256)
                 for _ in range(size[0] * size[1])])
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
