"""The worker's whole configuration: one dataclass; the command line is derived from its fields.

Each field's ``metadata`` (``_option``) holds its help, choices, lower bound and whether the
results depend on it (``fingerprint``: see ``worker.fingerprint``). ``build_parser`` turns the
fields into flags (``batch_size`` -> ``--batch-size``, a bool -> ``--x/--no-x``) and
``WorkerConfig.validate`` checks the same choices and bounds: each is written once, here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from worker.storage import absolute, check_uri, is_gcs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def is_image(name: str) -> bool:
    """Whether a URI or member name is an image the worker plans (by extension)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


# worker.cuda_graph.COMPILE_MODES' keys; kept here so that parsing a config never imports torch.
COMPILE_CHOICES = ("none", "default", "max-autotune")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
# The layouts worker.archives.listing plans from (loose objects, or images inside archives).
INPUT_LAYOUTS = ("auto", "loose", "packed", "tar", "zip")
# worker.tasks.BUILT_IN's keys, for the same reason; any other --task is a user's class.
BUILT_IN_TASKS = ("classification", "embedding", "zero-shot")
USER_TASK = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
DEFAULT_PROMPT = "This is a photo of {}."  # transformers' zero-shot-image-classification pipeline's
EMBEDDING_DTYPES = ("float32", "float16")

# The model a pipeline run classifies with unless told otherwise (and the architecture the
# dev-only random-weight models copy).
DEFAULT_MODEL = "google/vit-base-patch16-224"

# Images per forward pass when --batch-size is not given, by the device the rank runs on: on a
# GPU large enough to keep it busy between the host's launches, on a CPU small enough that
# progress shows on a laptop. The pipeline and `run --local` leave the batch size to this.
DEFAULT_BATCH_SIZE = {"cuda": 256, "cpu": 32}

PROG = "python -m worker"


class ConfigError(ValueError):
    """A bad worker parameter; the message is one line naming the flag.

    ``parameter`` is the ``WorkerConfig`` field at fault (None for an unknown flag), so a
    caller that names things differently (the pipeline's parameters) can say which of its own.
    """

    def __init__(self, message: str, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter


def _option(
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    forwarded: bool = True,
    fingerprint: bool = False,
) -> dict[str, Any]:
    """A field's command-line metadata.

    Args:
        help: The flag's help text (its default is appended by ``build_parser``).
        choices: The values the field accepts.
        minimum: The smallest value a number accepts.
        forwarded: Whether ``to_args`` passes the field on; False for what only means something
            on the machine that parsed it.
        fingerprint: Whether the results depend on the field, so that a rerun into the same
            OUTPUT must have the same value (it is part of the run's fingerprint).
    """
    return {
        "help": help,
        "choices": choices,
        "minimum": minimum,
        "forwarded": forwarded,
        "fingerprint": fingerprint,
    }


def flag_of(name: str) -> str:
    """The command-line flag of a ``WorkerConfig`` field."""
    return "--" + name.replace("_", "-")


def _default_model_cache() -> str:
    return os.environ.get(
        "BATCH_INFERENCE_MODEL_CACHE",
        os.path.join(os.path.expanduser("~"), ".cache", "batch-inference", "models"),
    )


@dataclass
class WorkerConfig:
    input: str = field(
        metadata=_option(
            "gs://bucket/prefix or a local directory holding the images "
            f"({', '.join(IMAGE_EXTENSIONS)}); other files are ignored",
            fingerprint=True,
        )
    )
    output: str = field(
        metadata=_option(
            "gs://bucket/prefix or a local directory for run.json, plan/, parts/, errors/ "
            "and summary/ (and inventory/ with --incremental); nothing is written anywhere else"
        )
    )
    model: str = field(
        metadata=_option(
            "a Hugging Face hub id, a local directory, or a gs:// directory holding a "
            "save_pretrained() model for --task and its image processor config; or a torch.export "
            "(.pt2) or TorchScript (.pt, .ts) file, local or gs://, with preprocess.json (and "
            "optionally labels.txt) beside it",
            fingerprint=True,
        )
    )
    input_layout: str = field(
        default="auto",
        metadata=_option(
            "how INPUT holds its images: loose (one object each); packed (the tar shards, indexes and "
            "manifest that the upload step's packed layout writes under INPUT/packed/); tar "
            "(WebDataset-style .tar shards under INPUT, or INPUT is one); zip (.zip archives under "
            "INPUT, or INPUT is one, read in place); auto: packed where INPUT/packed/manifest.json "
            "exists, the archive INPUT names, the archives under INPUT where it holds no loose "
            "images, else loose",
            choices=INPUT_LAYOUTS,
        ),
    )
    task: str = field(
        default="classification",
        metadata=_option(
            "classification (a classifier's labels), embedding (image features, as transformers' "
            "image-feature-extraction gives them), zero-shot (CLIP/SigLIP labels from --labels), or "
            "package.module:ClassName, a task class of your own (docs/tasks.md)",
            fingerprint=True,
        ),
    )
    top_k: int = field(
        default=1,
        metadata=_option(
            "classification, zero-shot: the k best labels per image (beyond 1 also as list columns "
            "top_labels, top_label_indices, top_scores)",
            minimum=1,
            fingerprint=True,
        ),
    )
    labels: str = field(
        default="",
        metadata=_option("zero-shot: the labels, comma-separated or a JSON array", fingerprint=True),
    )
    labels_file: str = field(
        default="",
        metadata=_option("zero-shot: a text file (local or gs://), one label a line", fingerprint=True),
    )
    prompt: str = field(
        default=DEFAULT_PROMPT, metadata=_option("zero-shot: each label's text, at {}", fingerprint=True)
    )
    normalize: bool = field(
        default=False, metadata=_option("embedding: scale each vector to unit L2 norm", fingerprint=True)
    )
    embedding_dtype: str = field(
        default="float32",
        metadata=_option("embedding: the vectors' type", choices=EMBEDDING_DTYPES, fingerprint=True),
    )
    batch_size: int | None = field(
        default=None,
        metadata=_option(
            "images per forward pass; unset: "
            + ", ".join(f"{n} on {device}" for device, n in DEFAULT_BATCH_SIZE.items()),
            minimum=1,
        ),
    )
    shard_size: int = field(
        default=1024,
        metadata=_option(
            "images per shard: the unit of assignment, commit and resume", minimum=1, fingerprint=True
        ),
    )
    device: str = field(
        default="auto",
        metadata=_option(
            "auto picks cuda when a GPU is visible (bf16 + SDPA), else cpu (fp32)",
            choices=DEVICE_CHOICES,
            fingerprint=True,
        ),
    )
    assignment: str = field(
        default="static",
        metadata=_option(
            "static: shard i goes to rank i mod world (deterministic); dynamic: ranks claim the "
            "next shard from a shared counter, so fast ranks take more (best balance)",
            choices=("static", "dynamic"),
        ),
    )
    decode: str = field(
        default="auto",
        metadata=_option(
            "gpu: batched JPEG decode + resize on the GPU (Pillow fallback for what it can't read); "
            "cpu: Pillow only; auto: gpu on cuda where the model's preprocessing allows it, cpu otherwise",
            choices=("auto", "cpu", "gpu"),
            fingerprint=True,
        ),
    )
    gpu_jpeg: str = field(
        default="cuda",
        metadata=_option(
            "where GPU decode runs: cuda = nvjpeg on CUDA cores (torchvision, any GPU); hardware = the "
            "GPU's JPEG engines (A100/H100/H200, needs the hardware-jpeg extra: nvidia-nvimgcodec), "
            "pixel-identical to Pillow's decode (benchmarks/NOTES.md compares the two)",
            choices=("cuda", "hardware"),
            fingerprint=True,
        ),
    )
    read_threads: int = field(
        default=4,
        metadata=_option(
            "threads reading local files, GCS composites with --compose, or the ranged reads of archive "
            "members (packed shards, tar, zip), ahead of compute",
            minimum=1,
        ),
    )
    read_rate: float = field(
        default=10000.0,
        metadata=_option("GCS reads per second a rank should sustain (rate x latency in flight)", minimum=1),
    )
    read_latency: float = field(
        default=0.05,
        metadata=_option("seconds one GCS read is planned to take (rate x latency in flight)", minimum=0.001),
    )
    read_concurrency: int = field(
        default=0,
        metadata=_option("GCS requests in flight per rank (0: --read-rate x --read-latency)", minimum=0),
    )
    read_ahead_mb: float = field(
        default=256.0,
        metadata=_option("most MiB of images read ahead of compute per rank (bounds memory)", minimum=1),
    )
    bucket_read_limit: float = field(
        default=0.0,
        metadata=_option(
            "most GCS read requests per second to one bucket from the whole job, shared evenly by "
            "the ranks (a new bucket starts at about 5,000 reads/s and ramps up); 0: no limit",
            minimum=0,
        ),
    )
    retry_deadline: float = field(
        default=300.0,
        metadata=_option(
            "seconds a GCS request failing with 429, 5xx or a dropped connection is retried", minimum=0
        ),
    )
    decode_threads: int = field(
        default=0,
        metadata=_option("threads for Pillow decode (0: one per CPU core available to this rank)", minimum=0),
    )
    decode_workers: int = field(
        default=1,
        metadata=_option(
            "batches decoded concurrently on GPU runs, each thread on its own high-priority CUDA stream "
            "(torchvision's nvjpeg decoder serializes its calls, so more workers mostly add GIL contention)",
            minimum=1,
        ),
    )
    prefetch_batches: int = field(
        default=8,
        metadata=_option("batches read ahead of compute at least (within --read-ahead-mb)", minimum=1),
    )
    queued_blocks: int = field(
        default=2,
        metadata=_option(
            "on GPU, the most model blocks (encoder layers) queued ahead of the host, so the JPEG "
            "decoder's kernels never wait behind a whole forward; 0: no limit",
            minimum=0,
        ),
    )
    cuda_graph: bool = field(
        default=True,
        metadata=_option(
            "on GPU, replay the forward as one CUDA graph (checked against the eager forward's logits "
            "and speed at start-up; the eager forward where it fails either); --queued-blocks then "
            "does not apply"
        ),
    )
    compile: str = field(
        default="default",
        metadata=_option(
            "with --cuda-graph, first compile the forward with torch.compile (fused kernels, at the cost "
            "of start-up time; max-autotune searches longer); the compiled graph is used only where it "
            "gives the eager forward's labels and is the faster graph",
            choices=COMPILE_CHOICES,
        ),
    )
    list_processes: int = field(
        default=8,
        metadata=_option(
            "how widely the input is listed: on GCS 4 threads per process, fanned out over its prefixes; "
            "on local disk, processes that split its folders",
            minimum=1,
        ),
    )
    compose: bool = field(
        default=False,
        metadata=_option(
            "read GCS objects as server-side composites of 32 (3 requests per 32 images instead of 32, "
            "but it needs create and delete permission on the input bucket and counts against its "
            "write quota; the temporary composites under dataflux-composed-objects/ at the bucket "
            "root are deleted after use); off: one GET per image from the native reader process, "
            "which never writes to the input bucket"
        ),
    )
    project: str | None = field(
        default=None, metadata=_option("GCP project for GCS clients (unset: from the environment)")
    )
    log_interval: float = field(default=10.0, metadata=_option("seconds between progress lines", minimum=0))
    incremental: bool = field(
        default=False,
        metadata=_option(
            "classify only images that are new or changed (by GCS generation) since the latest "
            "complete run among OUTPUT's sibling folders with the same input and model; the "
            "aggregate carries that run's rows over for the rest (needs a gs:// input)",
            fingerprint=True,
        ),
    )
    overwrite: bool = field(
        default=False,
        metadata=_option(
            "if OUTPUT holds results made from another input, model (or model revision), plan or "
            "settings, delete them and start over instead of refusing to run; results of this same "
            "run are resumed as usual, so a retried job keeps its committed shards"
        ),
    )
    model_cache: str = field(
        default_factory=_default_model_cache,
        metadata=_option(
            "where this machine caches gs:// models (unset: $BATCH_INFERENCE_MODEL_CACHE, else "
            "~/.cache/batch-inference/models)",
            forwarded=False,
        ),
    )

    def __post_init__(self) -> None:
        self.validate()  # first: a malformed gs:// URI must not pass for a relative local path
        # Plans and result rows carry absolute local paths, whatever the working directory.
        self.input = absolute(self.input)
        self.output = absolute(self.output)
        if self.labels_file:
            self.labels_file = absolute(self.labels_file)

    def validate(self) -> None:
        """Check every scalar parameter against its field's choices and bounds.

        Paths are only checked for their form (given, and a gs:// URI with a bucket); what is
        there is the worker's start-up check (``worker.checks.check_locations``), and whether
        the model is one it can run is the task's (``worker.tasks.classification.check_model``).

        Raises:
            ConfigError: The first bad parameter, in one line naming its flag.
        """
        for f in dataclasses.fields(self):
            value, flag = getattr(self, f.name), flag_of(f.name)
            if f.name in ("input", "output", "model") or (f.name == "labels_file" and value):
                if not value:
                    raise ConfigError(f"{flag} is empty: {f.metadata['help']}", f.name)
                try:
                    check_uri(flag, value)  # a hub id passes as a local path would
                except ValueError as exc:
                    raise ConfigError(str(exc), f.name) from None
            choices, minimum = f.metadata.get("choices"), f.metadata.get("minimum")
            if choices and value not in choices:
                raise ConfigError(f"{flag} must be one of {', '.join(choices)}, got {value!r}", f.name)
            if minimum is not None and value is not None and value < minimum:
                raise ConfigError(f"{flag} must be at least {minimum}, got {value}", f.name)
        if self.task not in BUILT_IN_TASKS and not USER_TASK.fullmatch(self.task):
            raise ConfigError(
                f"--task must be one of {', '.join(BUILT_IN_TASKS)} or package.module:ClassName, "
                f"got {self.task!r}",
                "task",
            )
        if "{}" not in self.prompt:
            raise ConfigError(f"--prompt must hold {{}} where the label goes, got {self.prompt!r}", "prompt")
        if (self.task == "zero-shot") != bool(self.labels or self.labels_file) or (
            self.labels and self.labels_file
        ):
            raise ConfigError(
                "--task zero-shot takes either --labels or --labels-file, other tasks neither", "labels"
            )
        if self.decode == "gpu" and self.device == "cpu":
            raise ConfigError("--decode gpu needs --device cuda or auto", "decode")
        if self.incremental and not is_gcs(self.input):
            raise ConfigError(
                "--incremental needs a gs:// --input: changes are found by GCS object generation",
                "incremental",
            )

    def fingerprint_settings(self, device_type: str | None) -> dict[str, Any]:
        """The settings the results depend on (the fields marked ``fingerprint``), with ``device``
        as the device type the job resolved "auto" to; left out where that is not known yet.
        """
        settings = {name: getattr(self, name) for name in FINGERPRINTED}
        if device_type is None:
            del settings["device"]
        else:
            settings["device"] = device_type
        return settings

    def batch_size_on(self, device_type: str) -> int:
        """The batch size on ``device_type`` ("cuda" or "cpu"): the one given, else that device's default."""
        return self.batch_size or DEFAULT_BATCH_SIZE[device_type]

    def to_args(self) -> list[str]:
        """The command-line arguments that rebuild this config (used by the launchers)."""
        defaults = {f.name: _default_of(f) for f in dataclasses.fields(self)}
        args = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            required = defaults[f.name] is dataclasses.MISSING
            if not f.metadata["forwarded"] or (not required and value == defaults[f.name]):
                continue
            flag = flag_of(f.name)
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
            else:
                args += [flag, str(value)]
        return args


# The fields whose values the results depend on, in field order.
FINGERPRINTED = tuple(f.name for f in dataclasses.fields(WorkerConfig) if f.metadata["fingerprint"])


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are ``ConfigError``s, not a usage dump and SystemExit."""

    def error(self, message: str) -> typing.NoReturn:
        named = re.match(r"argument (--[\w-]+)", message)
        parameter = named.group(1)[2:].replace("-", "_") if named else None
        raise ConfigError(f"{message} (see {self.prog} --help)", parameter)


def build_parser() -> argparse.ArgumentParser:
    """The worker's command line, one flag per ``WorkerConfig`` field.

    Flags left out stay out of the parsed namespace (``argparse.SUPPRESS``), so the dataclass's
    own defaults apply: argparse never holds a default of its own.
    """
    p = _Parser(
        prog=PROG,
        description=(
            "Classify every image under INPUT exactly once and write CSV parts under OUTPUT. "
            "Run it directly for one process, or as `torchrun --nproc_per_node=K -m worker ...` "
            "for K ranks (inside a PyTorchJob torchrun reads the PET_* environment). "
            "A rerun with the same OUTPUT resumes: committed shards are skipped; one made from "
            "another input, model or settings is refused (see --overwrite)."
        ),
        argument_default=argparse.SUPPRESS,
    )
    hints = typing.get_type_hints(WorkerConfig)
    for f in dataclasses.fields(WorkerConfig):
        meta, default = f.metadata, _default_of(f)
        kwargs: dict[str, Any] = {"dest": f.name}
        shown = default not in (dataclasses.MISSING, None) and f.default_factory is dataclasses.MISSING
        text = f"{meta['help']} (default: {default})" if shown else meta["help"]
        kwargs["help"] = text.replace("%", "%%")  # argparse formats help with %
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=kind, metavar=f.name.upper())
            if meta["choices"]:
                kwargs.update(choices=meta["choices"], metavar=None)
        p.add_argument(flag_of(f.name), **kwargs)
    return p


def parse_args(argv: list[str] | None = None) -> WorkerConfig:
    """The config of a worker command line.

    Raises:
        ConfigError: An unknown or malformed flag, a missing required one, or a bad value.
    """
    return WorkerConfig(**vars(build_parser().parse_args(argv)))
