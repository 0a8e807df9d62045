"""The worker's config and the command line derived from it."""

from __future__ import annotations

import dataclasses

import pytest

from worker.config import DEFAULT_BATCH_SIZE, ConfigError, WorkerConfig, build_parser, flag_of, parse_args


def test_gpu_flags_round_trip_and_validate(tmp_path):
    cfg = parse_args(
        [
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "o"),
            "--model",
            "m",
            "--gpu-jpeg",
            "hardware",
            "--queued-blocks",
            "0",
        ]
    )
    assert (cfg.gpu_jpeg, cfg.queued_blocks) == ("hardware", 0)
    assert parse_args(cfg.to_args()) == cfg
    with pytest.raises(ValueError, match="--gpu-jpeg"):
        WorkerConfig(input=str(tmp_path), output=str(tmp_path), model="m", gpu_jpeg="auto")
    with pytest.raises(ValueError, match="--queued-blocks"):
        WorkerConfig(input=str(tmp_path), output=str(tmp_path), model="m", queued_blocks=-1)


def test_compile_choices_are_the_compile_modes():
    from worker.config import COMPILE_CHOICES
    from worker.cuda_graph import COMPILE_MODES

    assert tuple(COMPILE_MODES) == COMPILE_CHOICES
    with pytest.raises(ValueError, match="--compile"):
        WorkerConfig(input="in", output="out", model="m", compile="fast")
    assert (
        parse_args(["--input", "i", "--output", "o", "--model", "m", "--compile", "none"]).compile == "none"
    )


def test_task_choices_are_the_tasks():
    from worker.config import TASK_CHOICES
    from worker.tasks import TASKS, task_module

    assert tuple(TASKS) == TASK_CHOICES
    for name in TASKS:
        assert task_module(name).NAME == name


REQUIRED = ["--input", "/data/in", "--output", "/data/out", "--model", "m"]


def test_cli_defaults_are_the_dataclass_defaults():
    parsed = parse_args(REQUIRED)
    built = WorkerConfig(input="/data/in", output="/data/out", model="m")
    assert parsed == built
    for f in dataclasses.fields(WorkerConfig):
        if f.default is not dataclasses.MISSING:
            assert getattr(parsed, f.name) == f.default, f.name
    # argparse holds no default of its own: a flag left out is absent from its namespace.
    assert set(vars(build_parser().parse_args(REQUIRED))) == {"input", "output", "model"}
    assert WorkerConfig(input="/data/in", output="/data/out", model="m").to_args() == REQUIRED


def test_every_field_is_a_flag_and_round_trips(tmp_path):
    changed = WorkerConfig(
        input="gs://bkt/in",
        output=str(tmp_path / "o"),
        model="gs://bkt/model",
        input_layout="packed",
        batch_size=7,
        shard_size=9,
        device="cpu",
        assignment="dynamic",
        decode="cpu",
        gpu_jpeg="hardware",
        read_threads=2,
        read_rate=2000.0,
        read_latency=0.02,
        read_concurrency=17,
        read_ahead_mb=64.0,
        bucket_read_limit=1000.0,
        retry_deadline=30.0,
        decode_threads=3,
        decode_workers=2,
        prefetch_batches=1,
        queued_blocks=0,
        cuda_graph=False,
        compile="none",
        list_processes=1,
        compose=True,
        project="p",
        log_interval=0.5,
        incremental=True,
        overwrite=True,
    )
    args = changed.to_args()
    forwarded = {f.name for f in dataclasses.fields(WorkerConfig) if f.metadata["forwarded"]}
    assert {a[2:].replace("-", "_").removeprefix("no_") for a in args if a.startswith("--")} == forwarded - {
        "task"
    }
    assert "--model-cache" not in args  # a path on the launcher's machine means nothing on the job's
    assert parse_args(args) == changed
    help_text = build_parser().format_help()
    for f in dataclasses.fields(WorkerConfig):
        assert flag_of(f.name) in help_text


def test_fingerprint_settings_are_the_marked_fields_with_the_resolved_device():
    cfg = WorkerConfig(input="/i", output="/o", model="m", device="auto", shard_size=9)
    settings = cfg.fingerprint_settings("cuda")
    assert settings == {
        "input": "/i",
        "model": "m",
        "task": "image-classification",
        "shard_size": 9,
        "device": "cuda",
        "decode": "auto",
        "gpu_jpeg": "cuda",
        "incremental": False,
    }
    assert "device" not in cfg.fingerprint_settings(None)  # the launcher: no device resolved yet


def test_batch_size_defaults_per_device():
    cfg = WorkerConfig(input="/i", output="/o", model="m")
    assert cfg.batch_size is None
    assert {d: cfg.batch_size_on(d) for d in DEFAULT_BATCH_SIZE} == DEFAULT_BATCH_SIZE
    assert WorkerConfig(input="/i", output="/o", model="m", batch_size=5).batch_size_on("cuda") == 5


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "x"], "--batch-size"),
        (["--shard-size", "-1"], "--shard-size"),
        (["--device", "tpu"], "--device"),
        (["--decode-workers", "0"], "--decode-workers"),
        (["--log-interval", "-1"], "--log-interval"),
        (["--incremental"], "--incremental"),
        (["--frobnicate"], "--frobnicate"),
        (["--model", ""], "--model"),
    ],
)
def test_bad_flags_are_one_line_config_errors_naming_the_flag(argv, flag):
    with pytest.raises(ConfigError) as caught:
        parse_args(REQUIRED + argv)
    message = str(caught.value)
    assert flag in message and "\n" not in message
    if flag != "--frobnicate":
        assert caught.value.parameter == flag[2:].replace("-", "_")


def test_missing_flags_are_named():
    with pytest.raises(ConfigError, match="--output, --model"):
        parse_args(["--input", "/i"])
