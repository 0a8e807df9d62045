"""Stage 1's guard on real results prefixes, local and on the GCS emulator (no torchrun)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.helpers import write_images
from worker.commit import Committer, ShardResult
from worker.config import WorkerConfig
from worker.fingerprint import OutputGuard, RunMismatch, model_revision
from worker.results import (
    MARKER,
    PLAN_DIR,
    PLAN_FILE,
    RUN_FILE,
    fingerprint_of,
    part_name,
    piece_name,
    read_run_record,
)
from worker.storage import join, open_storage, write_text

RESULT = ShardResult(rows=[("x", "cat", 0, 0.5, "/in/x.jpg")], errors=[("/in/y.jpg", "empty file")])


@pytest.fixture
def out(any_prefix) -> str:
    return any_prefix


@pytest.fixture
def images(tmp_path) -> Path:
    write_images(tmp_path / "in", 5)
    return tmp_path / "in"


def _model(path: Path, weights: bytes = b"weights v1") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "vit"}')
    (path / "model.safetensors").write_bytes(weights)
    return path


def _config(images: Path, out: str, model: Path, **overrides) -> WorkerConfig:
    fields = {"input": str(images), "output": out, "model": str(model), "shard_size": 2, "list_processes": 1}
    return WorkerConfig(**{**fields, **overrides})


def _start(cfg: WorkerConfig, model_path: Path, device: str = "cpu") -> tuple[str, set[int]]:
    """What rank 0 does before any rank reads an image."""
    guard = OutputGuard(cfg, device)
    guard.check_settings()
    return guard.seal(guard.plan(), model_revision(str(model_path)))


def _listing(out: str) -> dict[str, bytes]:
    storage = open_storage(out)
    return {o.uri: storage.read(o.uri) for o in storage.list(out.rstrip("/") + "/")}


def test_a_fresh_output_is_sealed_and_a_rerun_resumes_it(images, out, tmp_path):
    model = _model(tmp_path / "model")
    fingerprint, committed = _start(_config(images, out, model), model)
    assert committed == set()
    record = read_run_record(out)
    assert record["fingerprint"] == fingerprint == fingerprint_of(record)
    assert record["input"] == str(images) and record["model"] == str(model) and record["device"] == "cpu"
    assert record["model_revision"] == model_revision(str(model)) and record["shard_size"] == 2
    Committer(out, fingerprint).commit(1, RESULT)
    before = _listing(out)

    assert _start(_config(images, out, model), model) == (fingerprint, {1})
    assert _listing(out) == before, "a resume rewrites nothing"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("input", "input was "),
        ("model", "model was "),
        ("shard_size", "shard_size was 2, now 3"),
        ("device", "device was cpu, now cuda"),
        ("decode", "decode was auto, now cpu"),
    ],
)
def test_another_runs_settings_are_refused_at_once_and_nothing_is_touched(
    images, out, tmp_path, change, expected
):
    model = _model(tmp_path / "model")
    fingerprint, _ = _start(_config(images, out, model), model)
    Committer(out, fingerprint).commit(0, RESULT)
    before = _listing(out)
    other_images = tmp_path / "other-in"
    other_images.mkdir()
    overrides = {"shard_size": {"shard_size": 3}, "decode": {"decode": "cpu"}}.get(change, {})
    cfg = _config(
        other_images if change == "input" else images,
        out,
        _model(tmp_path / "model-b") if change == "model" else model,
        **overrides,
    )

    with pytest.raises(RunMismatch, match=expected) as refused:
        OutputGuard(cfg, "cuda" if change == "device" else "cpu").check_settings()
    message = str(refused.value)
    assert "\n" not in message and "--overwrite" in message and out in message
    assert _listing(out) == before


def test_another_model_revision_is_refused_when_the_record_is_sealed(images, out, tmp_path):
    model = _model(tmp_path / "model")
    fingerprint, _ = _start(_config(images, out, model), model)
    Committer(out, fingerprint).commit(0, RESULT)
    _model(model, weights=b"weights v2, same file names")  # retrained in place

    with pytest.raises(RunMismatch, match=r"model_revision was sha256:[0-9a-f]{12}\.\.\., now sha256:"):
        _start(_config(images, out, model), model)


def test_another_plan_is_refused(images, out, tmp_path):
    model = _model(tmp_path / "model")
    fingerprint, _ = _start(_config(images, out, model), model)
    Committer(out, fingerprint).commit(0, RESULT)
    open_storage(out).delete(join(out, PLAN_FILE))
    write_images(images / "new", 1)  # the input changed since the plan was made

    with pytest.raises(RunMismatch, match=r"plan_sha256 was [0-9a-f]{12}\.\.\., now .*listing changed"):
        _start(_config(images, out, model), model)


def test_an_attempt_that_committed_nothing_is_replaced_without_overwrite(images, out, tmp_path):
    first, second = _model(tmp_path / "a"), _model(tmp_path / "b", b"other weights")
    # The first attempt planned, then its model failed to load: nothing was sealed or committed.
    OutputGuard(_config(images, out, first), "cpu").plan()
    assert read_run_record(out)["model"] == str(first)

    fingerprint, committed = _start(_config(images, out, second), second)
    record = read_run_record(out)
    assert record["model"] == str(second) and record["fingerprint"] == fingerprint and committed == set()

    # Sealed but never committed: replaced as well.
    third = _model(tmp_path / "c", b"third weights")
    _start(_config(images, out, third), third)
    assert read_run_record(out)["model"] == str(third)


def test_overwrite_deletes_only_another_runs_results(images, out, tmp_path):
    model = _model(tmp_path / "model")
    fingerprint, _ = _start(_config(images, out, model), model)
    committer = Committer(out, fingerprint)
    committer.commit(0, RESULT)
    committer.write_summary(0, {"rank": 0})
    write_text(join(out, MARKER), "{}")
    write_text(join(out, "notes.txt"), "the user's own file")
    other = _model(tmp_path / "other", b"other weights")

    new_fingerprint, committed = _start(_config(images, out, other, overwrite=True), other)

    left = sorted(u[len(out) + 1 :] for u in _listing(out))
    assert left == ["notes.txt", PLAN_FILE, f"{PLAN_DIR}/{piece_name(0)}", RUN_FILE]
    assert committed == set() and new_fingerprint != fingerprint
    assert read_run_record(out)["model"] == str(other)


def test_overwrite_with_the_same_run_resumes_it(images, out, tmp_path):
    model = _model(tmp_path / "model")
    fingerprint, _ = _start(_config(images, out, model), model)
    Committer(out, fingerprint).commit(2, RESULT)

    assert _start(_config(images, out, model, overwrite=True), model) == (fingerprint, {2})


def test_parts_of_another_plan_are_never_counted(images, out, tmp_path):
    """Another input's parts and no plan: the fresh plan must not skip their shard numbers."""
    model = _model(tmp_path / "model")
    foreign = join(out, "parts", part_name(0, "00000000ffffffff"))
    write_text(foreign, "image_id,classification,label_index,score,uri\n")

    with pytest.raises(RunMismatch, match=f"parts of another run: {foreign}"):
        _start(_config(images, out, model), model)

    _, committed = _start(_config(images, out, model, overwrite=True), model)
    assert committed == set() and not open_storage(out).exists(foreign)


def test_model_revision_is_the_hub_commit_or_the_files_digest(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = _model(tmp_path / "models--org--m" / "snapshots" / commit)
    assert model_revision(str(snapshot)) == f"hub:{commit}"

    local = _model(tmp_path / "local")
    revision = model_revision(str(local))
    (local / ".git").mkdir()
    (local / ".git" / "HEAD").write_text("ref: refs/heads/main")
    assert model_revision(str(local)) == revision, "hidden files are not the model"
    (local / "config.json").write_text(json.dumps({"model_type": "vit", "num_labels": 3}))
    assert model_revision(str(local)) != revision


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ({"task": "classification"}, {"task": "embedding"}, "task was classification, now embedding"),
        ({"top_k": 1}, {"top_k": 5}, "top_k was 1, now 5"),
        (
            {"task": "zero-shot", "labels": "cat,dog"},
            {"task": "zero-shot", "labels": "cat,cow"},
            "labels was cat,dog",
        ),
        (
            {"task": "zero-shot", "labels": "cat"},
            {"task": "zero-shot", "labels": "cat", "prompt": "a {}"},
            "prompt was This is a photo of {}., now a {}",
        ),
        ({"task": "embedding"}, {"task": "embedding", "embedding_dtype": "float16"}, "embedding_dtype was"),
    ],
)
def test_the_task_and_its_parameters_are_part_of_the_fingerprint(
    images, out, tmp_path, first, second, expected
):
    model = _model(tmp_path / "model")
    fingerprint, _ = _start(_config(images, out, model, **first), model)
    Committer(out, fingerprint).commit(0, RESULT)
    with pytest.raises(RunMismatch, match=expected):
        OutputGuard(_config(images, out, model, **second), "cpu").check_settings()


def test_a_labels_file_rewritten_in_place_is_another_run(images, out, tmp_path):
    model = _model(tmp_path / "model")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    cfg = _config(images, out, model, task="zero-shot", labels_file=str(labels))
    fingerprint, _ = _start(cfg, model)
    Committer(out, fingerprint).commit(0, RESULT)
    assert _start(cfg, model) == (fingerprint, {0})  # the same file: a resume
    labels.write_text("cat\ncow\n")
    with pytest.raises(RunMismatch, match=r"labels_file was .*labels.txt sha256:[0-9a-f]+, now .*sha256:"):
        OutputGuard(cfg, "cpu").check_settings()


def test_the_record_holds_the_tasks_columns(images, out, tmp_path):
    from worker.results import columns_of, read_run_record
    from worker.schema import label_columns

    model = _model(tmp_path / "model")
    guard = OutputGuard(_config(images, out, model, top_k=3), "cpu", label_columns(3))
    guard.check_settings()
    guard.seal(guard.plan(), model_revision(str(model)))
    assert columns_of(read_run_record(out)) == label_columns(3)
