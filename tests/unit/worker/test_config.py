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


def test_built_in_tasks_are_the_task_classes():
    from worker.config import BUILT_IN_TASKS
    from worker.tasks import BUILT_IN, task_class

    assert tuple(BUILT_IN) == BUILT_IN_TASKS
    for name in BUILT_IN:
        cls = task_class(name)
        assert cls.__module__ == "worker.tasks." + name.replace("-", "_")


@pytest.mark.parametrize(
    "changes,flag",
    [
        ({"task": "detection"}, "--task"),
        ({"task": "my tasks:Quality"}, "--task"),
        ({"task": "zero-shot"}, "--labels"),
        ({"task": "zero-shot", "labels": "a,b", "labels_file": "l.txt"}, "--labels"),
        ({"top_k": 0}, "--top-k"),
        ({"prompt": "a photo"}, "--prompt"),
        ({"embedding_dtype": "bfloat16"}, "--embedding-dtype"),
        ({"labels_file": "gs://"}, "--labels-file"),
    ],
)
def test_task_parameters_are_checked_in_one_line(changes, flag):
    with pytest.raises(ConfigError) as caught:
        WorkerConfig(input="/i", output="/o", model="m", **changes)
    assert flag in str(caught.value) and "\n" not in str(caught.value)


def test_a_user_task_is_named_by_module_and_class():
    cfg = WorkerConfig(input="/i", output="/o", model="m", task="my_pkg.tasks:Quality")
    assert cfg.task == "my_pkg.tasks:Quality"


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
        task="zero-shot",
        top_k=3,
        labels="a cat,a dog",
        prompt="a photo of {}",
        normalize=True,
        embedding_dtype="float16",
    )
    args = changed.to_args()
    forwarded = {f.name for f in dataclasses.fields(WorkerConfig) if f.metadata["forwarded"]}
    assert {a[2:].replace("-", "_").removeprefix("no_") for a in args if a.startswith("--")} == forwarded - {
        "labels_file"  # given instead of --labels: the round trip of both is the next config's
    }
    from_file = WorkerConfig(input="/i", output="/o", model="m", task="zero-shot", labels_file="labels.txt")
    assert parse_args(from_file.to_args()) == from_file
    assert from_file.labels_file == str(__import__("pathlib").Path("labels.txt").absolute())
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
        "task": "classification",
        "top_k": 1,
        "labels": "",
        "labels_file": "",
        "prompt": "This is a photo of {}.",
        "normalize": False,
        "embedding_dtype": "float32",
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
