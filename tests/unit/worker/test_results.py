"""The results-prefix contract: the part names and the run's fingerprint."""

from __future__ import annotations

import pytest

from worker.results import (
    FINGERPRINT_KEYS,
    MixedResultsError,
    check_parts,
    differences,
    fingerprint_of,
    parse_part,
    part_name,
    plan_digest,
    sealed,
)


def test_part_names_round_trip_and_temp_files_are_not_parts():
    fingerprint = "0123456789abcdef"
    names = [part_name(i, fingerprint) for i in (0, 7, 99999, 123456)]
    assert [parse_part(n) for n in names] == [(i, fingerprint) for i in (0, 7, 99999, 123456)]
    assert parse_part("part-00003.csv") == (3, None), "an older worker's part is still a part"
    assert (
        parse_part(".part-00001-0123456789abcdef.csv.abc.tmp") is None and parse_part("rank-0.json") is None
    )


def _record(**changes) -> dict:
    record = {key: None for key in FINGERPRINT_KEYS}
    record.update(input="gs://in/a", model="org/model", model_revision="hub:" + "a" * 40, shard_size=1024)
    record.update(plan_sha256=plan_digest(b"plan"), listed=3)
    return record | changes


def test_the_fingerprint_covers_exactly_the_fingerprint_keys():
    base = fingerprint_of(_record())
    assert fingerprint_of(_record(listed=4)) == base, "counts are facts, not what the rows depend on"
    for key in FINGERPRINT_KEYS:
        assert fingerprint_of(_record(**{key: "other"})) != base, key
    assert sealed(_record())["fingerprint"] == base and len(base) == 16
    with pytest.raises(ValueError, match="model_revision"):
        sealed({k: v for k, v in _record().items() if k != "model_revision"})


def test_differences_name_each_changed_key_in_one_line_and_skip_unknown_ones():
    recorded, current = _record(), _record(input="gs://in/b", shard_size=512, plan_sha256=plan_digest(b"x"))
    line = differences(recorded, current)
    assert "\n" not in line
    assert "input was gs://in/a, now gs://in/b" in line and "shard_size was 1024, now 512" in line
    assert f"plan_sha256 was {plan_digest(b'plan')[:12]}..., now {plan_digest(b'x')[:12]}..." in line
    planned_by_launcher = {k: v for k, v in recorded.items() if k != "device"}
    assert differences(planned_by_launcher, {"input": "gs://in/a", "device": "cuda"}) == ""
    assert differences({}, current) == ""


def test_check_parts_names_the_parts_of_another_run():
    record = sealed(_record())
    ours = f"gs://b/out/parts/{part_name(0, record['fingerprint'])}"
    others = [f"gs://b/out/parts/{part_name(1, '00000000ffffffff')}", "gs://b/out/parts/part-00002.csv"]
    check_parts("gs://b/out", record, record["plan_sha256"], [ours])
    with pytest.raises(
        MixedResultsError, match=r"2 part\(s\).*part-00001-00000000ffffffff\.csv.*part-00002\.csv"
    ):
        check_parts("gs://b/out", record, record["plan_sha256"], [ours, *others])
    with pytest.raises(MixedResultsError, match="is not the plan"):
        check_parts("gs://b/out", record, plan_digest(b"another plan"), [ours])
    with pytest.raises(MixedResultsError, match="was edited"):
        check_parts("gs://b/out", {**record, "model": "other"}, record["plan_sha256"], [ours])
    unsealed = _record()  # planned by the launcher, no job ran: fine until a part claims it
    check_parts("gs://b/out", unsealed, unsealed["plan_sha256"], [])
    with pytest.raises(MixedResultsError, match="no worker has sealed"):
        check_parts("gs://b/out", unsealed, unsealed["plan_sha256"], [ours])


def test_encoded_rows_are_csv_writers_bytes():
    import base64
    import csv
    import io

    from worker.results import encode_rows

    header = ("image_id", "cell", "uri")
    rows = [
        ("a", base64.b64encode(bytes(range(256))).decode(), "gs://b/a.jpg"),
        ("a,b", 'say "x"', "line\nbreak"),
        ("", "carriage\rreturn", "NA"),
        (1, 2.5, None),
        ("é ünï", " lead", '"'),
        ("only",),
        ("",),
    ]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    assert encode_rows(header, rows) == buf.getvalue().encode("utf-8")


def test_a_record_sealed_before_the_task_parameters_keeps_its_fingerprint():
    import hashlib
    import json

    from worker.results import fingerprint_of

    older_keys = ("input", "model", "task", "shard_size", "device", "decode", "gpu_jpeg", "incremental")
    older = {k: f"value of {k}" for k in (*older_keys, "model_revision", "base", "plan_sha256")}
    canonical = json.dumps(older, sort_keys=True, separators=(",", ":"))
    assert fingerprint_of(older) == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert fingerprint_of({**older, "top_k": 1}) != fingerprint_of(older)
