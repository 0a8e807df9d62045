"""``python -m pipelines``: compile, dry-run the PyTorchJob, make a model, run locally.

User errors (a bad option, a missing folder, a failed task) end in a one-line
``error: ...`` and exit status 2; set ``BATCH_INFERENCE_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

# argparse types of the pipeline's parameter types (kfp's InputSpec.type).
_ARG_TYPES = {"String": str, "Integer": int, "Boolean": bool}
# Launch parameters that do not shape the PyTorchJob.
_NOT_IN_JOB = {"backend", "local_nproc"}


def _job_inputs() -> dict:
    from pipelines.batch_inference import launch_inputs

    return {name: spec for name, spec in launch_inputs().items() if name not in _NOT_IN_JOB}


def _add_job_options(p: argparse.ArgumentParser) -> None:
    # The pipeline is the one place where parameters get defaults and descriptions.
    for name, spec in _job_inputs().items():
        kind = _ARG_TYPES[spec.type]
        help_text = " ".join((spec.description or "").split()).replace("%", "%%") + " (default: %(default)r)"
        if kind is bool:
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction,
                           default=spec.default, help=help_text)
        else:
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=spec.default,
                           help=help_text)
    p.add_argument("--run-id", default="dry-run",
                   help="the pipeline run id the job name and results prefix derive from (default: %(default)r)")


def _compile(args: argparse.Namespace) -> int:
    from pipelines.batch_inference import compile_pipelines

    for path in compile_pipelines(args.out):
        print(path)
    return 0


def _render_job(args: argparse.Namespace) -> int:
    from components.launch import KUBERNETES, LaunchRequest
    from components.pytorchjob import render_yaml

    values = {name: getattr(args, name) for name in _job_inputs()}
    request = LaunchRequest(run_id=args.run_id, backend=KUBERNETES, local_nproc=1, **values)
    request.validate()
    sys.stdout.write(render_yaml(request.job_config()))
    return 0


def _make_model(args: argparse.Namespace) -> int:
    from pipelines.model_factory import make_model

    path = make_model(args.out, tiny=args.tiny)
    print(f"{path}: {'a tiny' if args.tiny else 'a ViT-B/16'} image classifier with RANDOM weights "
          "(its classes are meaningless); use it as --model")
    return 0


def _run(args: argparse.Namespace) -> int:
    from pipelines.local_run import run_local_main

    return run_local_main(args)


def build_parser() -> argparse.ArgumentParser:
    from pipelines.local_run import add_run_arguments

    parser = argparse.ArgumentParser(prog="python -m pipelines",
                                     description="Compile, dry-run, make a model for, and run the "
                                                 "batch_inference pipeline.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="compile the Kubeflow and Vertex flavours of the pipeline",
                       description="Write compiled/batch_inference_kubeflow.yaml (with the kfp-kubernetes "
                                   "platform document) and compiled/batch_inference_vertex.yaml (one document).")
    p.add_argument("--out", type=Path, default=Path("compiled"), help="output folder (default: %(default)s)")
    p.set_defaults(func=_compile)

    p = sub.add_parser("render-job", help="print the PyTorchJob a run would create (no cluster needed)",
                       description="Print the PyTorchJob YAML the launch step would create for these "
                                   "pipeline parameters. Needs no cluster.")
    _add_job_options(p)
    p.set_defaults(func=_render_job)

    p = sub.add_parser("make-model", help="create a random-weight model locally (offline)",
                       description="Create a random-weight image classifier with the architecture of "
                                   "google/vit-base-patch16-224 (or a tiny ViT), saved with save_pretrained.")
    p.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    p.add_argument("--tiny", action="store_true", help="a tiny 32 px ViT for tests instead of ViT-B/16")
    p.set_defaults(func=_make_model)

    p = sub.add_parser("run", help="run the whole pipeline locally (--local)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Run the whole pipeline on this machine through kfp.local, with the "
                                   "worker under torchrun, and print where the results and report are.")
    add_run_arguments(p)
    p.set_defaults(func=_run)
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
