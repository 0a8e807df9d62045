"""Archives a user already has, read in place under real torchrun from the GCS emulator.

WebDataset-style tar shards under a prefix and one zip object: every image is classified exactly
once, its row named ``<archive URI>/<member>`` and equal to the row of the same bytes read loose;
members that are not images are ignored, a corrupt member is an error row naming its URI, and a
run killed after its first part resumes without classifying anything twice.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from components.upload.upload import upload_dataset
from tests.support.helpers import jpeg_bytes, write_images
from tests.support.worker_harness import read_results, run_worker

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FLAGS = ("--shard-size", "4", "--batch-size", "4", "--device", "cpu")
TAR_SHARDS = 3
# Bytes that are named like an image but are not one: a JPEG's start, cut off.
NOT_A_JPEG = jpeg_bytes(99)[:40]


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        folders = sorted({str(Path(n).parent) for n in members} - {"."})
        for name in folders:  # directory members, as `tar cf` writes them
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _zip(members: dict[str, bytes], stored: set[str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo("photos/"), b"")  # a folder entry
        for name, data in members.items():
            method = zipfile.ZIP_STORED if name in stored else zipfile.ZIP_DEFLATED
            archive.writestr(name, data, compress_type=method)
    return buffer.getvalue()


def _flip_a_data_byte(archive: bytes, name: str) -> bytes:
    """The zip with one byte of a stored member's data flipped: its CRC-32 no longer matches."""
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        info = z.getinfo(name)
    header = 30 + len(info.filename.encode()) + len(info.extra)  # the local header's fixed part: 30 bytes
    at = info.header_offset + header + info.file_size // 2
    data = bytearray(archive)
    data[at] ^= 0xFF
    return bytes(data)


@pytest.fixture(scope="module")
def dataset(gcs, tmp_path_factory, tiny_model) -> dict:
    """20 images loose, in 3 tar shards and in one zip; the loose run's rows by image name."""
    bucket = gcs.new_bucket("archives")
    src = tmp_path_factory.mktemp("src")
    images = {p.relative_to(src).as_posix(): p.read_bytes() for p in write_images(src, 20)}
    loose = f"gs://{bucket}/loose"
    upload_dataset(str(src), loose)
    out = str(tmp_path_factory.mktemp("loose") / "out")
    run_worker(loose, out, str(tiny_model), 2, *FLAGS, "--input-layout", "loose", "--no-compose")
    _, rows, errors = read_results(out)
    assert not errors and len(rows) == len(images)
    by_name = {r["uri"].removeprefix(f"{loose}/"): r for r in rows}

    bucket_ = gcs.client.bucket(bucket)
    names = sorted(images)
    expected: dict[str, dict] = {"tar": {}, "zip": {}}  # expected URI -> image name (None: corrupt)
    for k in range(TAR_SHARDS):
        members: dict[str, bytes] = {}
        for name in names[k::TAR_SHARDS]:
            stem = name.rsplit(".", 1)[0]
            # WebDataset's sample = members sharing a stem; "./" as `tar cf . ` writes it, in one shard.
            member = f"./{name}" if k == 1 else name
            members[member] = images[name]
            members[f"{stem}.json"] = b'{"source": "test"}'
            members[f"{stem}.cls"] = b"3"
            expected["tar"][f"gs://{bucket}/tars/shard-{k:06d}.tar/{name}"] = name
        if k == 2:
            members["d1/broken.jpg"] = NOT_A_JPEG
            expected["tar"][f"gs://{bucket}/tars/shard-{k:06d}.tar/d1/broken.jpg"] = None
        bucket_.blob(f"tars/shard-{k:06d}.tar").upload_from_string(_tar(members))

    zip_uri = f"gs://{bucket}/zips/photos.zip"
    members = {f"photos/{name}": images[name] for name in names}
    members["photos/nested/deeper/img_00099.jpg"] = jpeg_bytes(99)
    members["photos/labels.json"] = b"{}"
    stored = {f"photos/{name}" for name in names[:6]} | {"photos/nested/deeper/img_00099.jpg"}
    archive = _flip_a_data_byte(_zip(members, stored), "photos/nested/deeper/img_00099.jpg")
    bucket_.blob("zips/photos.zip").upload_from_string(archive)
    expected["zip"] = {f"{zip_uri}/photos/{name}": name for name in names}
    expected["zip"][f"{zip_uri}/photos/nested/deeper/img_00099.jpg"] = None
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        methods = {i.compress_type for i in z.infolist() if not i.is_dir()}
    assert methods == {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
    return {
        "bucket": bucket,
        "rows": by_name,
        "expected": expected,
        "auto": {"tar": f"gs://{bucket}/tars", "zip": zip_uri},
        "explicit": {"tar": f"gs://{bucket}/tars", "zip": f"gs://{bucket}/zips"},
    }


def _exactly_once(output: str, expected: dict[str, str | None]) -> tuple[list[dict], dict[str, str]]:
    planned, parts, errors = read_results(output)
    assert sorted(planned) == sorted(expected), "the plan holds every image member once, and only those"
    seen = Counter(r["uri"] for r in parts) + Counter(r["uri"] for r in errors)
    assert seen == Counter(list(expected)), "every planned image once, in a part or an error file"
    return parts, {r["uri"]: r["reason"] for r in errors}


def _check_rows(dataset: dict, kind: str, output: str) -> None:
    expected = dataset["expected"][kind]
    parts, reasons = _exactly_once(output, expected)
    corrupt = [uri for uri, name in expected.items() if name is None]
    assert sorted(reasons) == corrupt, "the corrupt member, and only it, is an error row naming its URI"
    if kind == "zip":
        assert "CRC-32" in reasons[corrupt[0]]
    # CPU, fp32, the same bytes: each row is the loose row of that image but for the URI.
    for row in parts:
        loose = dataset["rows"][expected[row["uri"]]]
        assert {**row, "uri": None} == {**loose, "uri": None}, row["uri"]


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archives_found_by_auto_give_the_loose_rows_and_an_error_row_per_corrupt_member(
    dataset, tiny_model, tmp_path, kind
):
    out = str(tmp_path / "out")
    proc = run_worker(dataset["auto"][kind], out, str(tiny_model), 2, *FLAGS)
    assert f"{kind} archive(s)" in proc.stdout + proc.stderr
    _check_rows(dataset, kind, out)


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_resume_after_a_kill(dataset, tiny_model, tmp_path, kind):
    out = tmp_path / "out"
    args = (dataset["explicit"][kind], str(out), str(tiny_model), 2, *FLAGS, "--input-layout", kind)
    killed = run_worker(*args, env={"WORKER_FAULT_KILL_AFTER_SHARDS": "1"}, check=False)
    assert killed.returncode != 0
    before = {p.name: p.read_bytes() for p in (out / "parts").glob("*.csv")}
    assert 1 <= len(before) < 6
    rerun = run_worker(*args)
    assert "resuming" in rerun.stdout
    _check_rows(dataset, kind, str(out))
    assert all((out / "parts" / name).read_bytes() == data for name, data in before.items())
