"""kfp.local with the KFP v2 launcher's artifact rules, so a local run fails where a server would.

On a Kubeflow cluster every task runs under the KFP v2 launcher
(``backend/src/v2/component/launcher_v2.go``), which kfp.local does not imitate:

1. **Inputs are downloaded.** ``downloadArtifacts`` copies every input artifact, a whole
   prefix if that is what it points at, to the task's local disk before the task starts. An
   artifact that points at a million images is a million downloads into one pod.
2. **Outputs stay in the pipeline root.** ``uploadOutputArtifacts`` maps each output
   artifact's URI to a key of the run's bucket and fails the task ("does not have expected
   bucket prefix") for a URI a component pointed elsewhere, after the task did its work.

``launcher_rules()`` applies both to every task kfp.local runs: before a task, each input
artifact must be on local disk (kfp.local keeps artifacts under its local pipeline root) and
at most ``max_input_bytes`` in size, whatever it points at (a gs:// prefix is measured by
listing it, as the launcher would download it); after a task, each output artifact's URI must
lie under the pipeline root. A violation fails the task, is printed in the task's log and is
kept in ``LauncherRules.violations``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from worker.storage import is_gcs, open_storage

# "A few MB": a manifest, a job record, a report. Anything bigger is data passed by value.
MAX_INPUT_ARTIFACT_BYTES = 4 * 1024 * 1024


@dataclass
class LauncherRules:
    """The rules of one local run, and what broke them.

    Attributes:
        pipeline_root: kfp.local's pipeline root; every output artifact must lie under it.
        max_input_bytes: The largest input artifact a task may be given.
        violations: One line per broken rule, in the order found.
    """

    pipeline_root: str
    max_input_bytes: int = MAX_INPUT_ARTIFACT_BYTES
    violations: list[str] = field(default_factory=list)

    def check_inputs(self, task: str, executor_input: dict) -> list[str]:
        """What the launcher's download of the task's input artifacts would run into."""
        problems = []
        for name, artifact in _artifacts(executor_input.get("inputs", {})):
            uri = artifact.get("uri", "")
            if is_gcs(uri):
                size = _prefix_bytes(uri)
                where = f"{uri} (the launcher downloads it into the task's pod)"
            elif os.path.exists(uri):
                size = _local_bytes(Path(uri))
                where = uri
            else:
                problems.append(f"task {task}: input artifact {name!r} at {uri!r} cannot be materialised")
                continue
            if size > self.max_input_bytes:
                problems.append(
                    f"task {task}: input artifact {name!r} is {size:,} bytes, over the "
                    f"{self.max_input_bytes:,} an input artifact may have: {where}; pass big data by reference"
                )
        return problems

    def check_outputs(self, task: str, executor_input: dict) -> list[str]:
        """Output artifacts whose URI the launcher could not map into the pipeline root."""
        outputs = executor_input.get("outputs", {})
        written = _read_json(outputs.get("outputFile", ""))
        # The component's executor output overrides the URIs it was given, where it set any.
        declared = dict(_artifacts(outputs)) | dict(_artifacts(written))
        root = os.path.abspath(self.pipeline_root).rstrip("/") + "/"
        return [
            f"task {task}: output artifact {name!r} URI {artifact.get('uri', '')!r} does not have "
            f"expected bucket prefix {root!r} (the launcher fails the task after it ran)"
            for name, artifact in declared.items()
            if is_gcs(artifact.get("uri", ""))
            or not os.path.abspath(artifact.get("uri", "")).startswith(root)
        ]


@contextlib.contextmanager
def launcher_rules(
    pipeline_root: str | Path, max_input_bytes: int = MAX_INPUT_ARTIFACT_BYTES
) -> Iterator[LauncherRules]:
    """Within the ``with`` block, kfp.local's subprocess runner applies the launcher's rules.

    Args:
        pipeline_root: The pipeline root given to ``kfp.local.init``.
        max_input_bytes: The largest input artifact a task may take.

    Yields:
        The rules, whose ``violations`` fill as tasks run.
    """
    from kfp.local import status, subprocess_task_handler

    rules = LauncherRules(str(pipeline_root), max_input_bytes)
    plain = subprocess_task_handler.SubprocessTaskHandler

    class RuledTaskHandler(plain):
        def run(self) -> status.Status:
            executor_input = _executor_input(self.full_command)
            # kfp.local writes each task's executor output into the task's own folder.
            task = Path(executor_input.get("outputs", {}).get("outputFile", "?/?")).parent.name
            problems = rules.check_inputs(task, executor_input)
            result = status.Status.FAILURE
            if not problems:
                result = super().run()
                if result == status.Status.SUCCESS:
                    problems = rules.check_outputs(task, executor_input)
            for line in problems:
                print(f"KFP launcher rule broken: {line}", flush=True)
            rules.violations.extend(problems)
            return status.Status.FAILURE if problems else result

    # kfp.local looks its task handler up at each task, so swapping the class is enough.
    subprocess_task_handler.SubprocessTaskHandler = RuledTaskHandler
    try:
        yield rules
    finally:
        subprocess_task_handler.SubprocessTaskHandler = plain


def _executor_input(command: list[str]) -> dict:
    """The ``--executor_input`` JSON of a lightweight component's command line."""
    for flag, value in zip(command, command[1:], strict=False):
        if flag == "--executor_input":
            return json.loads(value)
    raise ValueError("not a lightweight component's command: no --executor_input")


def _artifacts(section: dict) -> Iterator[tuple[str, dict]]:
    for name, entry in (section.get("artifacts") or {}).items():
        for artifact in entry.get("artifacts", []):
            yield name, artifact


def _read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _local_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _prefix_bytes(uri: str) -> int:
    try:
        return sum(o.size for o in open_storage(uri).list(uri))
    except FileNotFoundError:
        return 0
