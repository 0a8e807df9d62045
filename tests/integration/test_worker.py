"""The worker under real torchrun (gloo), on local folders and on the GCS emulator."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.helpers import jpeg_bytes, upload_images, write_images
from tests.support.worker_harness import assert_exactly_once, read_results, run_worker

pytestmark = pytest.mark.slow

SIZES = (1, 999, 1001)


@pytest.fixture(scope="module")
def local_sets(tmp_path_factory) -> dict[int, tuple[Path, list[str]]]:
    sets = {}
    for n in SIZES:
        root = tmp_path_factory.mktemp(f"images{n}")
        sets[n] = (root, [str(p) for p in write_images(root, n)])
    return sets


@pytest.fixture(scope="module")
def gcs_sets(gcs) -> dict[int, tuple[str, str, list[str]]]:
    sets = {}
    for n in SIZES:
        bucket = gcs.new_bucket(f"in{n}")
        sets[n] = (bucket, f"gs://{bucket}/data", upload_images(gcs.client, bucket, "data", n))
    return sets


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", SIZES)
def test_local_exactly_once(local_sets, tiny_model, tmp_path, n, world):
    root, uris = local_sets[n]
    out = tmp_path / "out"
    run_worker(str(root), str(out), str(tiny_model), world, "--shard-size", "100", "--batch-size", "32")
    parts, errors = assert_exactly_once(str(out), uris)
    assert len(parts) == n and not errors
    summaries = [json.loads(p.read_text()) for p in sorted((out / "summary").glob("rank-*.json"))]
    assert [s["rank"] for s in summaries] == list(range(world))
    assert sum(s["images"] for s in summaries) == n
    for s in summaries:  # start-up steps, timed from process start, in the order they happen
        steps = s["setup_done_at"]
        order = [
            "imports",
            "process_group",
            "model_fetched",
            "model_loaded",
            "warmed_up",
            "plan_shared",
            "decoder_ready",
        ]
        if s["images"]:  # the first batch's rows: the end of start-up as the report draws it
            order.append("first_batch")
        assert [steps[k] for k in order] == sorted(steps.values()) and steps["imports"] > 0
        assert steps["plan_shared"] == s["setup_seconds"]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", SIZES)
def test_gcs_exactly_once(gcs, gcs_sets, tiny_model, n, world):
    bucket, input_uri, uris = gcs_sets[n]
    output = f"gs://{bucket}/results/w{world}"
    run_worker(
        input_uri,
        output,
        str(tiny_model),
        world,
        "--shard-size",
        "100",
        "--batch-size",
        "32",
        "--list-processes",
        "2",
    )
    parts, errors = assert_exactly_once(output, uris)
    assert len(parts) == n and not errors
    # Nothing but the inputs and OUTPUT: no DataFlux composites left behind, nothing written elsewhere.
    strays = [
        name
        for name in gcs.object_names(bucket)
        if not name.startswith(("data/", f"results/w{world}/", "results/"))
    ]
    assert strays == []


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_an_input_without_images_is_refused_before_the_model(gcs, tmp_path, where):
    if where == "local":
        input_uri = str(tmp_path / "empty")
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("not an image\n")
    else:
        input_uri = f"gs://{gcs.new_bucket('empty')}/data"
    proc = subprocess.run(
        # No such model: had it been fetched or loaded first, the error would name --model.
        [sys.executable, "-m", "worker", "--input", input_uri, "--output", str(tmp_path / "out")]
        + ["--model", str(tmp_path / "no-such-model")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"python -m worker: error: --input {input_uri} holds no images")
    assert not (tmp_path / "out").exists()


def test_dynamic_assignment_covers_every_shard_once(local_sets, tiny_model, tmp_path):
    root, uris = local_sets[1001]
    out = tmp_path / "out"
    run_worker(str(root), str(out), str(tiny_model), 3, "--assignment", "dynamic", "--shard-size", "50")
    parts, _ = assert_exactly_once(str(out), uris)
    assert len(parts) == 1001
    shards = sum(json.loads(p.read_text())["shards"] for p in (out / "summary").glob("rank-*.json"))
    assert shards == 21


def test_resume_after_kill_keeps_committed_parts(local_sets, tiny_model, tmp_path):
    root, uris = local_sets[999]
    out = tmp_path / "out"
    killed = run_worker(
        str(root),
        str(out),
        str(tiny_model),
        2,
        "--shard-size",
        "100",
        "--batch-size",
        "25",
        env={"WORKER_FAULT_KILL_AFTER_SHARDS": "2"},
        check=False,
    )
    assert killed.returncode != 0
    before = {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in (out / "parts").glob("*.csv")
    }
    assert 2 <= len(before) < 10, "the kill must land after some, but not all, shards committed"
    # A kill can land mid-write; plant such a leftover so the rerun's cleanup is always exercised.
    (out / "parts" / ".part-00009.csv.interrupted.tmp").write_bytes(b"image_id,classification\nhalf")

    rerun = run_worker(str(root), str(out), str(tiny_model), 2, "--shard-size", "100", "--batch-size", "25")
    assert "resuming" in rerun.stdout
    parts, _ = assert_exactly_once(str(out), uris)
    assert len(parts) == 999
    after = {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in (out / "parts").glob("*.csv")
    }
    assert len(after) == 10
    for name, state in before.items():
        assert after[name] == state, f"{name} was rewritten by the rerun"
    assert not list(out.rglob("*.tmp")), "no temp files may be left behind"


def _bad_inputs() -> dict[str, bytes]:
    from PIL import Image

    def png() -> bytes:
        buf = io.BytesIO()
        Image.new("RGBA", (20, 20), (10, 200, 30, 128)).save(buf, format="PNG")
        return buf.getvalue()

    good = jpeg_bytes(1)
    return {
        "corrupt.jpg": good[: len(good) // 3] + b"\x00garbage",
        "zero.jpg": b"",
        "picture.png": png(),
        "cmyk.jpg": jpeg_bytes(2, mode="CMYK"),
        "gray.jpg": jpeg_bytes(3, mode="L"),
        "progressive.jpg": jpeg_bytes(4, progressive=True),
        "readme.txt": b"not an image",
        "with space/a b.jpg": jpeg_bytes(5),
        "ünïcødé/日本語.JPEG": jpeg_bytes(6),
        "nested/deeper/still/deep.webp": _webp(),
    }


def _webp() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (25, 17), (200, 10, 30)).save(buf, format="WEBP")
    return buf.getvalue()


EXPECTED_ERRORS = {"corrupt.jpg", "zero.jpg"}


def _check_bad_inputs(output: str, uris: dict[str, str]):
    image_uris = [u for name, u in uris.items() if not name.endswith(".txt")]
    parts, errors = assert_exactly_once(output, image_uris)
    errored = {name for name, u in uris.items() if u in {e["uri"] for e in errors}}
    assert errored == EXPECTED_ERRORS
    assert all(e["reason"] for e in errors)
    reasons = {e["uri"].rsplit("/", 1)[-1]: e["reason"] for e in errors}
    assert "empty" in reasons["zero.jpg"]
    ids = {r["image_id"] for r in parts}
    assert {"a b", "日本語", "deep", "cmyk", "gray", "picture", "progressive"} <= ids


def test_bad_inputs_local(tiny_model, tmp_path):
    root = tmp_path / "in"
    uris = {}
    for name, data in _bad_inputs().items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        uris[name] = str(path)
    out = tmp_path / "out"
    run_worker(str(root), str(out), str(tiny_model), 2, "--shard-size", "3", "--batch-size", "2")
    _check_bad_inputs(str(out), uris)


def test_bad_inputs_gcs(gcs, tiny_model):
    bucket = gcs.new_bucket("bad")
    uris = {}
    for name, data in _bad_inputs().items():
        gcs.client.bucket(bucket).blob(f"in/{name}").upload_from_string(data)
        uris[name] = f"gs://{bucket}/in/{name}"
    output = f"gs://{bucket}/out"
    # Composed reads here (the other gs:// runs use the native reader): the same rows, no composite left.
    run_worker(
        f"gs://{bucket}/in",
        output,
        str(tiny_model),
        1,
        "--shard-size",
        "4",
        "--list-processes",
        "2",
        "--compose",
    )
    _check_bad_inputs(output, uris)
    assert gcs.object_names(bucket, "dataflux-composed-objects/") == []


def test_missing_bucket_is_named(tiny_model, gcs, tmp_path):
    proc = run_worker("gs://no-such-bucket-xyz/data", str(tmp_path / "out"), str(tiny_model), 1, check=False)
    assert proc.returncode != 0
    assert "gs://no-such-bucket-xyz" in proc.stdout + proc.stderr


def test_predictions_match_per_image_reference(tiny_model, tmp_path):
    """Every label equals that of plain Pillow + the model's image processor + the model in fp32."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    root = tmp_path / "in"
    paths = write_images(root, 60)
    for i, mode in enumerate(("L", "CMYK", "RGB")):
        p = root / f"mode_{mode}.jpg"
        p.write_bytes(jpeg_bytes(500 + i, size=(57 + 13 * i, 41), mode=mode))
        paths.append(p)
    for i, size in enumerate([(300, 200), (16, 90), (224, 224)]):
        p = root / f"size_{i}.png"
        img = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
        img.save(p)
        paths.append(p)
    out = tmp_path / "out"
    run_worker(str(root), str(out), str(tiny_model), 2, "--shard-size", "16", "--batch-size", "7")
    _, parts, errors = read_results(str(out))
    assert not errors and len(parts) == len(paths)

    processor = AutoImageProcessor.from_pretrained(tiny_model)
    model = AutoModelForImageClassification.from_pretrained(tiny_model).eval()
    got = {r["uri"]: (int(r["label_index"]), float(r["score"])) for r in parts}
    with torch.inference_mode():
        for p in paths:
            pixels = processor(images=Image.open(p).convert("RGB"), return_tensors="pt")["pixel_values"]
            probs = model(pixel_values=pixels).logits.softmax(-1)[0]
            label, score = got[str(p)]
            assert label == int(probs.argmax()), p.name
            assert score == pytest.approx(float(probs.max()), abs=1e-4)
