"""The whole pipeline on this machine: kfp.local runs each component as a subprocess.

``run_pipeline_locally`` is the library call (tests and notebooks use it);
``run_local_main`` is ``python -m pipelines run --local``: it prepares a model and
images, optionally serves the GCS emulator, runs the pipeline with the ``local``
backend (torchrun on this machine) and says where everything went.

Two data modes:

* **GCS emulator** (default): the images are uploaded to a fake-gcs-server on loopback,
  so the upload, the worker's DataFlux reads and the aggregate all talk the GCS API.
  Its storage lives in memory: the worker's raw results are gone when the command
  ends, so what is worth opening is copied out first (``keep_outputs``).
* **Local paths** (``--results-root PATH``): no GCS; the worker reads the image folder
  directly and the upload is skipped (its destination must be gs://).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.check.checks import TASK_PARAMETERS, check_input, check_run
from components.launch.launch import LOCAL
from components.launch.local import pythonpath_with_project
from pipelines.dev.emulator import gcs_emulator
from pipelines.dev.launcher_rules import launcher_rules
from pipelines.options import add_parameter_options
from worker.config import DEFAULT_BATCH_SIZE, DEFAULT_MODEL
from worker.results import RUN_FILE, SUMMARY_DIR, SUMMARY_FILE
from worker.storage import folder, is_gcs, join, open_storage, split_uri

EMULATOR_IMAGES_URI = "gs://batch-inference-images/images"
EMULATOR_RESULTS_ROOT = "gs://batch-inference-results/runs"
DEFAULT_WORKDIR = Path(".local-runs")
# The pipeline parameters that mean something on this machine; the others shape the GKE job.
LOCAL_PARAMETERS = (
    "results_prefix",
    "incremental",
    "upload_workers",
    "upload_layout",
    "packed_shard_mb",
    "packed_shard_images",
    "batch_size",
    "shard_size",
    "device",
    "extra_worker_args",
    "local_nproc",
    "timeout_seconds",
    *TASK_PARAMETERS,
)
# Where a local run's defaults differ from a cluster run's: a sample set of a few dozen
# images spreads over two ranks in small shards, and the worker runs on this machine's CPU.
LOCAL_DEFAULTS = {"local_nproc": 2, "shard_size": 16, "batch_size": DEFAULT_BATCH_SIZE["cpu"]}


@dataclass(frozen=True)
class LocalRun:
    """Where a local run put its outputs."""

    results_uri: str  # the worker's raw output prefix (plan, parts, errors, summaries)
    results_csv: str
    results_parquet: str
    errors_csv: str
    report_html: str
    job: dict[str, Any]  # the launch step's job record
    metrics: dict[str, Any]
    pipeline_root: str


def run_pipeline_locally(
    *,
    pipeline_root: str | Path,
    images_uri: str,
    results_root: str,
    model: str,
    package: str | Path | None = None,
    **params: Any,
) -> LocalRun:
    """Run the batch_inference pipeline through kfp.local with the local backend.

    Every task runs under the KFP launcher's artifact rules (``pipelines.dev.launcher_rules``),
    so a run that passes here passes them on a Kubeflow server too.

    Args:
        pipeline_root: Local folder for kfp.local's task outputs (the CSV, Parquet and HTML).
        images_uri: The images' prefix: gs:// (the emulator or GCS) or a local folder.
        results_root: Where the worker writes, as ``<results_root>/<run id>``.
        model: A hub id or a model directory.
        package: A compiled pipeline YAML to run (``compiled/batch_inference_*.yaml``) instead of
            the pipeline as this checkout defines it.
        **params: Any other pipeline parameter (source, local_nproc, batch_size, shard_size,
            device, ...); left out, the pipeline's default.

    Returns:
        The outputs' locations and the metrics.

    Raises:
        RuntimeError: A task failed (kfp.local has printed its log), or broke a launcher rule
            (the message says which).
    """
    import kfp.local
    from kfp import components

    from pipelines.batch_inference import batch_inference

    pipeline = components.load_component_from_file(str(package)) if package else batch_inference
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    with _project_on_pythonpath(), warnings.catch_warnings(), launcher_rules(pipeline_root) as rules:
        # kfp.local warns that the project's image is not a "python" image and that display
        # names and resources mean nothing locally; both are expected here.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        try:
            task = pipeline(
                images_uri=images_uri, results_root=results_root, model=model, backend=LOCAL, **params
            )
        except RuntimeError as exc:
            if rules.violations:
                raise RuntimeError(f"KFP launcher rule broken: {rules.violations[0]}") from exc
            raise
    out = task.outputs
    return LocalRun(
        results_uri=out["results_uri"],
        results_csv=out["results_csv"].path,
        results_parquet=out["results_parquet"].path,
        errors_csv=out["errors_csv"].path,
        report_html=out["report"].path,
        job=json.loads(Path(out["job"].path).read_text()),
        metrics=dict(out["metrics"].metadata),
        pipeline_root=str(pipeline_root),
    )


def keep_outputs(run: LocalRun, run_folder: Path) -> dict[str, Path]:
    """Copy what is worth opening of a local run into ``run_folder``, where it outlives the GCS
    emulator: the aggregate's files under names that say what they are (kfp.local names them
    after the outputs, without extensions), and the worker's run record and per-rank summaries.

    Returns:
        The copies, by what they hold.
    """
    kept = {
        "report": run_folder / "report.html",
        "results CSV": run_folder / "results.csv",
        "results Parquet": run_folder / "results.parquet",
        "errors CSV": run_folder / "errors.csv",
        "run record": run_folder / RUN_FILE,
        "rank summaries": run_folder / SUMMARY_DIR,
    }
    run_folder.mkdir(parents=True, exist_ok=True)
    for name, artifact in (
        ("report", run.report_html),
        ("results CSV", run.results_csv),
        ("results Parquet", run.results_parquet),
        ("errors CSV", run.errors_csv),
    ):
        shutil.copyfile(artifact, kept[name])
    storage = open_storage(run.results_uri)
    record = join(run.results_uri, RUN_FILE)
    if storage.exists(record):
        kept["run record"].write_bytes(storage.read(record))
    summaries = folder(join(run.results_uri, SUMMARY_DIR))
    kept["rank summaries"].mkdir(exist_ok=True)
    try:
        listed = list(storage.list(summaries))
    except FileNotFoundError:  # an incremental run that found nothing new started no worker
        listed = []
    for obj in listed:
        name = obj.uri[len(summaries) :]
        if SUMMARY_FILE.fullmatch(name):
            (kept["rank summaries"] / name).write_bytes(storage.read(obj.uri))
    return kept


@contextlib.contextmanager
def _project_on_pythonpath() -> Iterator[None]:
    """The components import this project's packages; kfp.local starts them from this
    interpreter, which finds them through PYTHONPATH whatever the current directory.
    """
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = pythonpath_with_project(previous)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m pipelines run``."""
    p.add_argument(
        "--local",
        action="store_true",
        required=True,
        help="run the whole pipeline on this machine through kfp.local, with the local backend",
    )
    p.add_argument(
        "--source",
        help="a folder of images (default: a generated sample set), or with the "
        "emulator also an http(s) URL of a zip to upload",
    )
    p.add_argument(
        "--num-images",
        type=int,
        default=64,
        help="size of the generated sample set (one file of it is deliberately corrupt; default: %(default)s)",
    )
    p.add_argument(
        "--model",
        help=f"hub id or model directory (default: {DEFAULT_MODEL}, or "
        "when the hub is unreachable a local random-weight model of its architecture)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--gcs-emulator",
        action="store_true",
        help="(the default) data goes through a GCS emulator on loopback",
    )
    mode.add_argument(
        "--results-root",
        help="no emulator: the worker writes under this local path or gs:// "
        "prefix, and reads --images-uri (default: the images folder)",
    )
    p.add_argument(
        "--images-uri",
        help="where the images are (or are uploaded to); default: "
        f"{EMULATOR_IMAGES_URI} with the emulator, else the images folder",
    )
    params = p.add_argument_group(
        "pipeline parameters", "as in a submitted run (python -m pipelines submit --help), for this machine"
    )
    add_parameter_options(params, _local_inputs(), defaults=True, overrides=LOCAL_DEFAULTS)
    p.add_argument(
        "--package",
        type=Path,
        help="run this compiled pipeline YAML (e.g. compiled/batch_inference_kubeflow.yaml) "
        "instead of the pipeline as defined in pipelines/batch_inference.py",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="folder for sample images, the random model and each run's pipeline root (default: %(default)s)",
    )


def _local_inputs() -> dict:
    from pipelines.batch_inference import batch_inference

    inputs = batch_inference.component_spec.inputs
    return {name: inputs[name] for name in LOCAL_PARAMETERS}


def _resolve_model(model: str | None, workdir: Path) -> str:
    from pipelines.dev import random_model as model_factory

    if model:
        return model
    if model_factory.hub_model_cached(model_factory.DEFAULT_MODEL) or model_factory.hub_reachable():
        return model_factory.DEFAULT_MODEL
    path = model_factory.cached_random_model(workdir / "models")
    print(
        f"The Hugging Face hub is unreachable: using {path}, a RANDOM-WEIGHT model with the "
        f"architecture of {model_factory.DEFAULT_MODEL}; its classes are meaningless.",
        flush=True,
    )
    return str(path)


def _sample_images_folder(workdir: Path, n: int) -> Path:
    return workdir / f"sample-images-{n}"


def _make_sample_images(workdir: Path, n: int) -> Path:
    from pipelines.dev.sample_images import make_sample_images

    root = _sample_images_folder(workdir, n)
    if not root.is_dir():  # deterministic content: a folder of the same size can be reused
        staging = workdir / f".sample-images-{n}-{os.getpid()}"
        make_sample_images(staging, n)
        staging.rename(root)
    return root


def run_local_main(args: argparse.Namespace) -> int:
    """``python -m pipelines run --local``: prepare, run, and print where the outputs are."""
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    folder_source = bool(args.source) and "://" not in args.source
    if folder_source and not Path(args.source).is_dir():
        raise ValueError(f"--source {args.source}: no such folder")
    # Absolute, because the worker runs wherever kfp.local starts it.
    source = (
        str(Path(args.source).resolve())
        if folder_source
        else args.source or str(_sample_images_folder(workdir, args.num_images))
    )
    use_emulator = not args.results_root
    if use_emulator:
        images_uri, results_root = args.images_uri or EMULATOR_IMAGES_URI, EMULATOR_RESULTS_ROOT
        upload = source
    else:
        results_root = args.results_root
        # Without GCS the worker reads the folder itself; a gs:// --images-uri gets the upload.
        images_uri = args.images_uri or source
        upload = source if is_gcs(images_uri) and images_uri != source else ""
    for name, uri in (("--images-uri", images_uri), ("--results-root", results_root)):
        if use_emulator and not is_gcs(uri):
            raise ValueError(f"{name} must be gs:// with the GCS emulator, got {uri}")
    if not upload and "://" in images_uri and not is_gcs(images_uri):
        raise ValueError(
            f"the worker reads a folder or gs:// prefix, not {images_uri}: use --source to upload it"
        )
    # The checks the upload task makes first, made here before the emulator even starts: the
    # parameters before anything slow (finding or making a model, generating images), the model
    # once it is known.
    settings = {
        "images_uri": images_uri,
        "results_root": results_root,
        "results_prefix": args.results_prefix,
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "upload_layout": args.upload_layout,
        "packed_shard_mb": args.packed_shard_mb,
        "packed_shard_images": args.packed_shard_images,
        **{name: getattr(args, name) for name in TASK_PARAMETERS},
    }
    check_run(model=args.model or DEFAULT_MODEL, check_model=False, **settings)
    model = _resolve_model(args.model, workdir)
    check_run(model=model, **settings)
    if not args.source:
        _make_sample_images(workdir, args.num_images)
    if not args.incremental:
        check_input(upload, images_uri)
    pipeline_root = workdir / "runs" / time.strftime("%Y%m%d-%H%M%S")
    print(f"images: {images_uri}" + (f" (uploaded from {upload})" if upload else ""), flush=True)
    if use_emulator:
        serve = gcs_emulator(tuple(dict.fromkeys(split_uri(uri)[0] for uri in (images_uri, results_root))))
    else:
        serve = contextlib.nullcontext()
    with serve:
        run = run_pipeline_locally(
            pipeline_root=pipeline_root,
            images_uri=images_uri,
            results_root=results_root,
            source=upload,
            model=model,
            package=args.package,
            **{name: getattr(args, name) for name in _local_inputs()},
        )
        kept = keep_outputs(run, pipeline_root)
    # KFP stores every metric as a float: 20.0 images reads better as 20.
    metrics = " ".join(f"{k}={v:g}" for k, v in sorted(run.metrics.items()))
    print(
        f"\nbatch inference finished: {pipeline_root}",
        f"  results CSV:     {kept['results CSV']}",
        f"  results Parquet: {kept['results Parquet']}",
        f"  errors CSV:      {kept['errors CSV']}",
        f"  HTML report:     {kept['report']}",
        f"  run record:      {kept['run record']} and {kept['rank summaries']}/ (one per rank)",
        f"  metrics:         {metrics}",
        f"  raw results:     {run.results_uri}"
        + (" (in the GCS emulator: gone now that it has stopped)" if use_emulator else ""),
        f"open {kept['report']}",
        sep="\n",
    )
    return 0
