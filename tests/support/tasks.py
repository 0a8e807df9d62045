"""The task tests' fixtures: tiny image-text models and backbones saved with their real
processors, a few images, and a CPU worker run over them."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from tests.support.helpers import jpeg_bytes
from worker.config import WorkerConfig
from worker.run import run
from worker.schema import decode_vector


@pytest.fixture(scope="session")
def task_images(tmp_path_factory) -> list[Path]:
    """Images of several sizes, a grayscale one and a PNG with alpha, as pipelines would get them."""
    from PIL import Image

    root = tmp_path_factory.mktemp("task-images")
    rgba = io.BytesIO()
    Image.frombytes("RGBA", (37, 29), bytes(range(256)) * 17).save(rgba, format="PNG")
    files = {f"img{i}.jpg": jpeg_bytes(i, size=(40 + 3 * i, 30 + 5 * i)) for i in range(6)}
    files.update({"gray.jpg": jpeg_bytes(9, size=(33, 33), mode="L"), "alpha.png": rgba.getvalue()})
    for name, data in files.items():
        (root / name).write_bytes(data)
    return sorted(root.iterdir())


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """``models(name)``: the model directory, built on first use (clip, siglip, vit, dinov2)."""
    from pipelines.dev.random_models import make_backbone, make_clip, make_siglip

    root, built = tmp_path_factory.mktemp("task-models"), {}
    makers = {
        "clip": lambda p: make_clip(p),
        "siglip": lambda p: make_siglip(p),
        "vit": lambda p: make_backbone(p, "vit"),
        "dinov2": lambda p: make_backbone(p, "dinov2"),
    }

    def get(name: str) -> Path:
        if name not in built:
            built[name] = makers[name](root / name)
        return built[name]

    return get


def run_task(images: list[Path], model: Path | str, out: Path, **settings) -> dict[str, dict]:
    """Run the worker (on CPU unless ``device`` says) over the images' folder; its part rows by
    uri (vectors decoded).
    """
    settings = {"device": "cpu", "batch_size": 3, **settings}
    cfg = WorkerConfig(input=str(images[0].parent), output=str(out), model=str(model), **settings)
    run(cfg)
    rows = [r for part in sorted((out / "parts").glob("*.csv")) for r in csv.DictReader(part.open())]
    for row in rows:
        if "embedding" in row:
            row["embedding"] = decode_vector(row["embedding"], f"vector<{cfg.embedding_dtype}>")
    return {r["uri"]: r for r in rows}
