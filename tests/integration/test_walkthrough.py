"""The documents' commands, as a user pastes them: they exist, name no placeholder image, and work.

Every ``python -m pipelines`` command in a code block of the README and ``docs/`` must name a
subcommand and flags the CLI has. The walk-through (``docs/cluster.md``) is then followed with
its own variables (its ``export`` lines) up to the calls that need a cluster: ``compile`` with
the images it pushed, ``render-job`` for each job kind, ``submit`` to the stand-ins of the
Kubeflow Pipelines and Vertex AI APIs.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from components.images import DEFAULT_TASK_IMAGE, DEFAULT_WORKER_IMAGE
from components.launch.kubernetes.kinds import JOB_KINDS
from pipelines.__main__ import _pipeline_arguments, _vertex_target, build_parser, main
from tests.support import ROOT
from tests.support.kfp_stand_in import KfpApiStandIn

WALKTHROUGH = ROOT / "docs" / "cluster.md"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDERS = (DEFAULT_TASK_IMAGE, DEFAULT_WORKER_IMAGE, "ghcr.io/example")


def code_blocks(path: Path) -> list[str]:
    """The shell code blocks of a Markdown file, continuation lines joined."""
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", path.read_text(), flags=re.S)
    return [re.sub(r"\\\n\s*", " ", block) for block in blocks]


def pipelines_commands(path: Path) -> list[str]:
    """Each ``python -m pipelines ...`` line of the file's code blocks, its comment and ``&`` cut."""
    commands = []
    for block in code_blocks(path):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("python -m pipelines"):
                commands.append(re.sub(r"\s+#.*$", "", line).rstrip(" &"))
    return commands


def _variables(path: Path) -> dict[str, str]:
    """The walk-through's ``export NAME=value`` lines, each value expanded with those before it."""
    values: dict[str, str] = {}
    for block in code_blocks(path):
        for name, value in re.findall(r"^export (\w+)=(\S+)", block, flags=re.M):
            values[name] = _expand(value, values)
    return values


def _expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], text)


def _argv(command: str, values: dict[str, str]) -> list[str]:
    return shlex.split(_expand(command, values))[3:]  # after "python -m pipelines"


def _flags(parser, argv: list[str]) -> tuple[str | None, list[str]]:
    """The subcommand of ``argv`` if the CLI has it, and the flags of ``argv`` it does not know."""
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    if not argv or argv[0] not in sub.choices:
        return None, []
    known = sub.choices[argv[0]]._option_string_actions
    return argv[0], [a.split("=")[0] for a in argv[1:] if a.startswith("--") and a.split("=")[0] not in known]


def test_the_walkthrough_documents_each_step_it_is_checked_for():
    commands = pipelines_commands(WALKTHROUGH)
    for step in ("compile", "render-job", "submit --kfp-host", "submit --vertex", "latest"):
        assert any(c.startswith(f"python -m pipelines {step}") for c in commands), step
    text = WALKTHROUGH.read_text()
    for fact in ("gcloud artifacts repositories create", "docker push", "defaultPipelineRoot=gs://",
                 "gcloud storage buckets create", "roles/iam.serviceAccountUser", "--nodes 1", "## Teardown"):  # fmt: skip
        assert fact in text, fact


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_documented_command_exists_and_names_no_placeholder_image(document):
    parser = build_parser()
    problems = []
    for block in code_blocks(document):
        if any(p in block for p in PLACEHOLDERS):
            problems.append(f"a placeholder image ({', '.join(PLACEHOLDERS)}) in: {block.strip()[:80]}")
    for command in pipelines_commands(document):
        argv = shlex.split(command)[3:]
        if argv in (["--help"], ["-h"]):
            continue
        name, unknown = _flags(parser, argv)
        if name is None:
            problems.append(f"no such command: {command}")
        elif unknown:
            problems.append(f"`{name}` has no {', '.join(unknown)}: {command}")
    assert problems == [], "\n".join(problems)


@pytest.fixture(scope="module")
def walkthrough() -> tuple[dict[str, str], dict[str, list[str]]]:
    """The walk-through's variables, and its commands by subcommand (``submit`` split by target)."""
    values = _variables(WALKTHROUGH)
    by_step: dict[str, list[str]] = {}
    for command in pipelines_commands(WALKTHROUGH):
        argv = _argv(command, values)
        step = argv[0] + (" --vertex" if "--vertex" in argv else "")
        by_step.setdefault(step, []).append(command)
    return values, by_step


def test_compile_names_the_images_the_walkthrough_pushed(walkthrough, tmp_path):
    values, by_step = walkthrough
    [command] = by_step["compile"]
    argv = _argv(command, values)
    argv[argv.index("--out") + 1] = str(tmp_path / "compiled-mine")

    assert main(argv) == 0

    for flavour in ("kubeflow", "vertex"):
        text = (tmp_path / "compiled-mine" / f"batch_inference_{flavour}.yaml").read_text()
        assert values["TASK_IMAGE"] in text and values["WORKER_IMAGE"] in text
        assert not any(p in text for p in PLACEHOLDERS)


@pytest.mark.parametrize("kind", sorted(JOB_KINDS))
def test_render_job_renders_each_job_kind_with_the_pushed_image(walkthrough, kind, capsys):
    values, by_step = walkthrough
    for command in by_step["render-job"]:
        assert main(_argv(command, values | {"JOB_KIND": kind})) == 0
        [job] = list(yaml.safe_load_all(capsys.readouterr().out))
        assert job["kind"].lower() == kind
        images = re.findall(r"image: (\S+)", yaml.safe_dump(job))
        assert images and set(images) == {values["WORKER_IMAGE"]}
        assert values["MODEL"] in yaml.safe_dump(job)


def test_the_kfp_submissions_reach_the_api_with_the_pushed_images(walkthrough, capsys):
    values, by_step = walkthrough
    assert len(by_step["submit"]) >= 2  # the smoke test and the full run
    with KfpApiStandIn() as kfp:
        for command in by_step["submit"]:
            argv = _argv(command, values)
            argv[argv.index("--kfp-host") + 1] = kfp.url
            assert main(argv) == 0, capsys.readouterr().err
        created = kfp.calls("POST", "/runs")
    assert len(created) == len(by_step["submit"])
    smoke = created[0].body
    parameters = smoke["runtime_config"]["parameters"]
    assert parameters["nodes"] == 1 and parameters["model"] == values["MODEL"]
    assert parameters["image"] == values["WORKER_IMAGE"]
    spec = yaml.safe_dump(smoke["pipeline_spec"])
    assert values["TASK_IMAGE"] in spec and not any(p in spec for p in PLACEHOLDERS)
    assert "state: SUCCEEDED" in capsys.readouterr().out


def test_the_vertex_submission_reaches_the_api_as_its_service_account(walkthrough, gcs):
    aiplatform = pytest.importorskip("google.cloud.aiplatform")
    from google.auth.credentials import AnonymousCredentials

    from pipelines.vertex import submit_vertex
    from tests.support.vertex_stand_in import VertexApiStandIn

    values, by_step = walkthrough
    [command] = by_step["submit --vertex"]
    # The pipeline root's bucket lives in the GCS emulator.
    values = values | {"RESULTS_BUCKET": gcs.new_bucket("walkthrough-results")}
    args = build_parser().parse_args(_argv(command, values))
    with VertexApiStandIn() as vertex:
        aiplatform.init(api_endpoint=vertex.url, api_transport="rest")
        try:
            from pipelines.__main__ import _images

            run = submit_vertex(
                *_vertex_target(args),
                _pipeline_arguments(args),
                run_name=args.run_name,
                service_account=args.run_service_account,
                network=args.network,
                images=_images(args),
                wait=args.wait,
                credentials=AnonymousCredentials(),
            )
        finally:
            aiplatform.initializer.global_config._api_endpoint = None
            aiplatform.initializer.global_config._api_transport = None
        [job] = vertex.jobs.values()
    assert run.state == "SUCCEEDED"
    assert job["serviceAccount"] == values["VERTEX_SA"]
    assert job["runtimeConfig"]["gcsOutputDirectory"] == f"gs://{values['RESULTS_BUCKET']}/pipeline-root"
    parameters = job["runtimeConfig"]["parameterValues"]
    assert parameters["gke_cluster"] == values["CLUSTER"] and parameters["image"] == values["WORKER_IMAGE"]
    spec = yaml.safe_dump(job["pipelineSpec"])
    assert values["TASK_IMAGE"] in spec and not any(p in spec for p in PLACEHOLDERS)


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_reaches_its_file_and_heading(document):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        path, _, anchor = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(target)
    assert broken == []
