"""notebooks/batch_inference.ipynb, executed top to bottom with nbclient in a real kernel.

Step 2 runs the pipeline locally for real; steps 3 and 5 submit to the KFP API stand-in
(tests/support/kfp_stand_in.py) through the notebook's KFP_HOST parameter; step 4 (Vertex) has no
endpoint and must say it was skipped.
"""

from __future__ import annotations

import re

import nbformat
import pytest
from nbclient import NotebookClient

from pipelines.dev.sample_images import CORRUPT_NAME
from tests.support import ROOT
from tests.support.kfp_stand_in import KfpApiStandIn

NOTEBOOK = ROOT / "notebooks" / "batch_inference.ipynb"
N_IMAGES = 12


def _outputs(nb, tag: str) -> tuple[str, str]:
    """(stdout text, text/html) of the cell tagged ``tag``."""
    [cell] = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    html = "".join(
        o.get("data", {}).get("text/html", "")
        for o in cell.outputs
        if o.output_type in ("execute_result", "display_data")
    )
    return text, html


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_notebook_runs_locally_and_submits_where_configured(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "commit the notebook without outputs"
    )
    workdir = tmp_path / "work"
    with KfpApiStandIn() as kfp:
        # The kernel inherits this process's environment, which the parameters cell reads.
        for name, value in {
            "KFP_HOST": kfp.url,
            "NOTEBOOK_WORKDIR": str(workdir),
            "NUM_IMAGES": str(N_IMAGES),
            "VERTEX_PROJECT": "",
            "VERTEX_PIPELINE_ROOT": "",
            "IMAGES_URI": "gs://images/coco",
            "RESULTS_ROOT": "gs://results/nightly",
            "SCHEDULE_CRON": "0 2 * * *",
            # The images the notebook says to push and name before Jupyter starts (placeholders are refused).
            "BATCH_INFERENCE_TASK_IMAGE": "us-docker.pkg.dev/my-project/batch-inference/tasks:1.0",
            "BATCH_INFERENCE_WORKER_IMAGE": "us-docker.pkg.dev/my-project/batch-inference/worker:1.0",
        }.items():
            monkeypatch.setenv(name, value)
        # The kernel is this interpreter: jupyter_client runs kernelspec "python" as sys.executable.
        client = NotebookClient(
            nb, kernel_name="python3", timeout=150, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
        )
        client.execute()
        runs, recurring = list(kfp.runs.values()), list(kfp.recurring_runs.values())

    # Step 2: one row per image that decodes; the report rendered.
    text, table = _outputs(nb, "results")
    images = workdir / "images"
    expected = sorted(str(p) for p in images.rglob("*") if p.is_file() and not str(p).endswith(CORRUPT_NAME))
    assert len(expected) == N_IMAGES - 1 and text.strip() == f"{N_IMAGES - 1} rows"
    assert sorted(re.findall(r"<td>(/[^<]+)</td>", table)) == expected
    report = [
        o
        for c in nb.cells
        for o in c.get("outputs", [])
        if "srcdoc=" in o.get("data", {}).get("text/html", "")
    ]
    assert len(report) == 1 and "Batch inference: classification" in report[0]["data"]["text/html"]
    assert "Complete: every image exactly once" in report[0]["data"]["text/html"]

    # Steps 3 and 5 went to KFP with the parameters cell's values; step 4 was skipped.
    text, _ = _outputs(nb, "kfp")
    assert len(runs) == 1 and text.strip() == f"KFP run: {kfp.url}/#/runs/details/{runs[0]['run_id']}"
    assert runs[0]["runtime_config"]["parameters"] == {
        "images_uri": "gs://images/coco",
        "results_root": "gs://results/nightly",
        "incremental": True,
    }
    assert _outputs(nb, "vertex")[0].startswith("skipped: set VERTEX_PROJECT")
    text, _ = _outputs(nb, "schedule")
    assert text.splitlines() == [
        "cron '0 2 * * *' -> KFP '0 0 2 * * *', Vertex '0 2 * * *'",
        f"KFP recurring run: {kfp.url}/#/recurringrun/details/{recurring[0]['recurring_run_id']}",
    ]
    assert recurring[0]["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * *"
