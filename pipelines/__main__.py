"""``python -m pipelines``: compile, dry-run the Kubernetes job, make a model, run locally, submit, schedule.

User errors (a bad option, a missing folder, a failed task) end in a one-line
``error: ...`` and exit status 2; set ``BATCH_INFERENCE_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports kfp and the components only for the command it runs
    from components.images import Images

# Launch parameters that do not shape the Kubernetes job.
_NOT_IN_JOB = {"backend", "local_nproc"}


def _job_inputs() -> dict:
    from pipelines.batch_inference import launch_inputs

    return {name: spec for name, spec in launch_inputs().items() if name not in _NOT_IN_JOB}


def _add_job_options(p: argparse.ArgumentParser) -> None:
    from pipelines.options import add_parameter_options

    add_parameter_options(p, _job_inputs(), defaults=True)
    p.add_argument(
        "--run-id",
        default="dry-run",
        help="the pipeline run id the job name and results prefix derive from (default: %(default)r)",
    )


def _compile(args: argparse.Namespace) -> int:
    from components.images import TEMPLATE, Images
    from pipelines.batch_inference import compile_pipelines
    from pipelines.submit import pushed_images

    template = args.task_image is None and args.image is None and Images() == TEMPLATE
    images = TEMPLATE if template else pushed_images(task_image=args.task_image, worker_image=args.image)
    for path in compile_pipelines(args.out, images):
        print(path)
    print(f"task image (the KFP tasks): {images.task}")
    print(f"worker image (the job's pods, the image parameter's default): {images.worker}")
    if template:
        print(
            "warning: a template: its images are placeholders, which no cluster can pull; "
            "give --task-image and --image to compile a pipeline to run (compiled/README.md)",
            file=sys.stderr,
        )
    return 0


def _render_job(args: argparse.Namespace) -> int:
    from components.images import check_image
    from components.launch.kubernetes.kinds import render_yaml
    from components.launch.launch import KUBERNETES, LaunchRequest

    check_image("--image", args.image)
    values = {name: getattr(args, name) for name in _job_inputs()}
    request = LaunchRequest(run_id=args.run_id, backend=KUBERNETES, local_nproc=1, **values)
    request.validate()
    sys.stdout.write(render_yaml(request.job_manifest()))
    return 0


def _make_model(args: argparse.Namespace) -> int:
    from pipelines.dev.random_model import make_model

    path = make_model(args.out, tiny=args.tiny)
    print(
        f"{path}: {'a tiny' if args.tiny else 'a ViT-B/16'} image classifier with RANDOM weights "
        "(its classes are meaningless); use it as --model"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    from pipelines.dev.local_run import run_local_main

    return run_local_main(args)


def _pipeline_arguments(args: argparse.Namespace) -> dict:
    from pipelines.batch_inference import batch_inference

    return {
        name: getattr(args, name) for name in batch_inference.component_spec.inputs if hasattr(args, name)
    }


def _vertex_target(args: argparse.Namespace) -> tuple[str, str, str]:
    missing = [
        flag
        for flag, value in (
            ("--project", args.project),
            ("--location", args.location),
            ("--pipeline-root", args.pipeline_root),
        )
        if not value
    ]
    if missing:
        raise ValueError(f"--vertex needs {', '.join(missing)}")
    return args.project, args.location, args.pipeline_root


def _images(args: argparse.Namespace) -> Images:
    """The images a submission's pipeline names: the flags, the package's, or the environment's."""
    from pipelines.submit import pushed_images

    return pushed_images(args.package, args.task_image, getattr(args, "image", None))


def _submit(args: argparse.Namespace) -> int:
    from pipelines import submit, vertex

    arguments = _pipeline_arguments(args)
    images = _images(args)
    if args.vertex:
        done = vertex.submit_vertex(
            *_vertex_target(args),
            arguments,
            run_name=args.run_name,
            service_account=args.run_service_account,
            network=args.network,
            package=args.package,
            images=images,
            wait=args.wait,
        )
    else:
        done = submit.submit_kfp(
            args.kfp_host,
            arguments,
            experiment=args.experiment,
            run_name=args.run_name,
            namespace=args.kfp_namespace,
            token=args.kfp_token,
            service_account=args.run_service_account,
            package=args.package,
            images=images,
            ui_host=args.kfp_ui_host,
            wait=args.wait,
            timeout_s=args.timeout,
        )
    print(f"run: {done.url}")
    if done.state:
        print(f"state: {done.state}")
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from pipelines import submit, vertex

    arguments = _pipeline_arguments(args)
    images = _images(args)
    if args.vertex:
        done = vertex.schedule_vertex(
            *_vertex_target(args),
            arguments,
            args.cron,
            name=args.run_name,
            service_account=args.run_service_account,
            network=args.network,
            package=args.package,
            images=images,
        )
    else:
        done = submit.schedule_kfp(
            args.kfp_host,
            arguments,
            args.cron,
            experiment=args.experiment,
            name=args.run_name,
            namespace=args.kfp_namespace,
            token=args.kfp_token,
            service_account=args.run_service_account,
            package=args.package,
            images=images,
            ui_host=args.kfp_ui_host,
        )
    print(f"schedule: {done.url}")
    return 0


def _docs(args: argparse.Namespace) -> int:
    from pipelines.docs import DOC, update

    stale = update(DOC, check=args.check)
    if args.check and stale:
        raise ValueError(f"the parameter table in {DOC} is stale: run `python -m pipelines docs`")
    print(f"{DOC}: {'updated' if stale else 'current'}")
    return 0


def _latest(args: argparse.Namespace) -> int:
    from worker.results import completed_runs, read_manifest

    runs = completed_runs(args.results_root)
    if not runs:
        raise ValueError(f"no complete run under {args.results_root} yet")
    run = runs[-1]
    m = run.marker.get("metrics", {})
    print(
        f"run:      {run.results_uri}",
        f"finished: {run.marker.get('aggregated_at', '?')}",
        f"rows:     {m.get('rows', 0):g} ({m.get('classified', 0):g} classified in this run, "
        f"{m.get('reused', 0):g} reused; {m.get('errors', 0):g} errors, {m.get('changed', 0):g} changed and "
        f"{m.get('deleted', 0):g} deleted since the run before)",
        f"table:    {run.manifest_uri}",
        sep="\n",
    )
    if args.out:
        table = read_manifest(run.manifest_uri)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.suffix == ".parquet":
            table.to_parquet(args.out, index=False)
        else:
            table.to_csv(args.out, index=False)
        print(f"wrote:    {args.out} ({len(table)} rows)")
    return 0


def _add_target_options(p: argparse.ArgumentParser, *, schedule: bool) -> None:
    """Where to submit, how to authenticate, and every pipeline parameter."""
    from pipelines.batch_inference import batch_inference
    from pipelines.options import add_parameter_options

    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--kfp-host",
        metavar="URL",
        help="Kubeflow Pipelines base URL, e.g. http://localhost:8080 "
        "(kubectl port-forward svc/ml-pipeline-ui 8080:80 -n kubeflow)",
    )
    target.add_argument("--vertex", action="store_true", help="Vertex AI Pipelines (needs the vertex extra)")
    kfp = p.add_argument_group("Kubeflow Pipelines")
    kfp.add_argument("--experiment", default="batch-inference", help="experiment (created if missing)")
    kfp.add_argument("--kfp-namespace", help="profile namespace on a multi-user KFP")
    kfp.add_argument(
        "--kfp-token",
        default=os.environ.get("KFP_TOKEN"),
        help="bearer token for an authenticated endpoint (default: $KFP_TOKEN)",
    )
    kfp.add_argument(
        "--kfp-ui-host", metavar="URL", help="UI base URL for the printed link, if not --kfp-host"
    )
    vertex = p.add_argument_group("Vertex AI Pipelines")
    vertex.add_argument(
        "--project",
        default=os.environ.get("GOOGLE_CLOUD_PROJECT"),
        help="GCP project (default: $GOOGLE_CLOUD_PROJECT)",
    )
    vertex.add_argument(
        "--location",
        default=os.environ.get("GOOGLE_CLOUD_REGION"),
        help="Vertex AI region, e.g. us-central1 (default: $GOOGLE_CLOUD_REGION)",
    )
    vertex.add_argument("--pipeline-root", metavar="GS_URI", help="gs:// prefix for the runs' artifacts")
    vertex.add_argument(
        "--network",
        metavar="projects/NUMBER/global/networks/NAME",
        help="VPC network to peer the run's tasks with, so the launch step reaches a GKE control "
        "plane with only a private endpoint (docs/running.md)",
    )
    both = p.add_argument_group("both targets")
    both.add_argument("--run-name", help=f"display name of the {'schedule' if schedule else 'run'}")
    both.add_argument(
        "--run-service-account",
        help="identity the run executes as: a Kubernetes service account on KFP, "
        "a GCP service account email on Vertex",
    )
    both.add_argument(
        "--package",
        type=Path,
        help="a compiled pipeline YAML to send (default: compile the target's flavour now, "
        "with --task-image and --image)",
    )
    _add_task_image_option(both)
    if schedule:
        both.add_argument(
            "--cron",
            required=True,
            help="standard 5-field cron (minute hour day-of-month month day-of-week), e.g. "
            "'0 2 * * *'; KFP gets it with a seconds field added and fires in UTC; "
            "Vertex also takes a 'TZ=Europe/Paris ' prefix",
        )
    else:
        both.add_argument(
            "--wait", action="store_true", help="wait for the run to end; fail unless it succeeds"
        )
        both.add_argument("--timeout", type=int, default=86400, help="seconds --wait waits (KFP)")
    params = p.add_argument_group("pipeline parameters", "left out: the compiled default")
    add_parameter_options(params, dict(batch_inference.component_spec.inputs), defaults=False)


def _add_task_image_option(p) -> None:
    from components.images import TASK_IMAGE_ENV

    p.add_argument(
        "--task-image",
        metavar="IMAGE",
        help="the image the KFP tasks run: the Dockerfile's tasks target, as you pushed it "
        f"(default: ${TASK_IMAGE_ENV})",
    )


def build_parser() -> argparse.ArgumentParser:
    from components.images import WORKER_IMAGE_ENV
    from pipelines.dev.local_run import add_run_arguments

    parser = argparse.ArgumentParser(
        prog="python -m pipelines",
        description="Compile, dry-run, make a model for, run, submit and "
        "schedule the batch_inference pipeline.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "compile",
        help="compile the Kubeflow and Vertex flavours of the pipeline",
        description="Write compiled/batch_inference_kubeflow.yaml (with the kfp-kubernetes "
        "platform document) and compiled/batch_inference_vertex.yaml (one document). "
        "Without --task-image and --image (or their environment variables) it writes the "
        "template that compiled/ holds: its images are placeholders, which submit, schedule and "
        "render-job refuse. Give the images you pushed to compile a pipeline a cluster can run.",
    )
    p.add_argument("--out", type=Path, default=Path("compiled"), help="output folder (default: %(default)s)")
    _add_task_image_option(p)
    p.add_argument(
        "--image",
        metavar="IMAGE",
        help="the image of the job's pods (the image parameter's default): the Dockerfile's worker "
        f"target, as you pushed it (default: ${WORKER_IMAGE_ENV})",
    )
    p.set_defaults(func=_compile)

    p = sub.add_parser(
        "render-job",
        help="print the PyTorchJob a run would create (no cluster needed)",
        description="Print the PyTorchJob YAML the launch step would create for these "
        "pipeline parameters. Needs no cluster.",
    )
    _add_job_options(p)
    p.set_defaults(func=_render_job)

    p = sub.add_parser(
        "make-model",
        help="create a random-weight model locally (offline)",
        description="Create a random-weight image classifier with the architecture of "
        "google/vit-base-patch16-224 (or a tiny ViT), saved with save_pretrained.",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    p.add_argument("--tiny", action="store_true", help="a tiny 32 px ViT for tests instead of ViT-B/16")
    p.set_defaults(func=_make_model)

    p = sub.add_parser(
        "run",
        help="run the whole pipeline locally (--local)",
        description="Run the whole pipeline on this machine through kfp.local, with the "
        "worker under torchrun. The run's folder (under --workdir/runs/) keeps report.html, "
        "results.csv, results.parquet, errors.csv, the worker's run.json and summary/; the last "
        "line printed is `open FOLDER/report.html`.",
    )
    add_run_arguments(p)
    p.set_defaults(func=_run)

    p = sub.add_parser(
        "submit",
        help="start a run on Kubeflow Pipelines or Vertex AI Pipelines",
        description="Start one run of the pipeline and print its URL. Pipeline parameters "
        "not given keep their compiled defaults.",
    )
    _add_target_options(p, schedule=False)
    p.set_defaults(func=_submit)

    p = sub.add_parser(
        "schedule",
        help="schedule recurring runs on Kubeflow Pipelines or Vertex AI",
        description="Create a recurring run (KFP) or a schedule (Vertex) and print its URL. "
        "At most one run of it runs at a time; pair it with --incremental for "
        "nightly runs that classify only what changed.",
    )
    _add_target_options(p, schedule=True)
    p.set_defaults(func=_schedule)

    p = sub.add_parser(
        "latest",
        help="show (and fetch) the latest complete run's results under a results root",
        description="Find the latest run under RESULTS_ROOT whose aggregate succeeded and print "
        "its prefix, counts and results table; --out downloads the table (every "
        "image's latest label, carried-over rows of incremental runs included).",
    )
    p.add_argument(
        "--results-root", required=True, help="the results_root the runs wrote to (gs:// or local)"
    )
    p.add_argument("--out", type=Path, help="write the table here (.csv, or .parquet)")
    p.set_defaults(func=_latest)

    p = sub.add_parser(
        "docs",
        help="regenerate the pipeline-parameter table in docs/running.md",
        description="Rewrite the parameter table of docs/running.md from the pipeline's "
        "parameters, defaults and descriptions.",
    )
    p.add_argument("--check", action="store_true", help="only check; exit 2 when the table is stale")
    p.set_defaults(func=_docs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as exc:
        # RuntimeError covers a failed kfp.local task and a failed worker; their logs are above.
        if os.environ.get("BATCH_INFERENCE_DEBUG"):
            raise
        # kfp.local colours its messages; an error line may be read in a log file.
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
        first_line = message.splitlines()[0] if message else type(exc).__name__
        print(f"error: {first_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
