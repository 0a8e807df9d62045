"""``python -m pipelines render-job --job-kind K``: the manifest each kind would create, strictly valid offline.

The printed YAML is checked against the real CRD of its kind (from its Go module, ``tests/support/control_plane.py``: PyTorchJob 1.9,
TrainJob of Trainer v2.3.0, JobSet v0.12.0, unknown fields rejected) and its pods against
Kubernetes' own strict schemas; for a TrainJob, the pod is its runtime's merged with its
trainer and runtime patches.
"""

from __future__ import annotations

import pytest
import yaml

from components.launch.kubernetes.kinds import JOB_KINDS
from pipelines.__main__ import main
from tests.support.job_pods import pod_templates
from tests.support.schemas import (
    assert_valid_for_crd,
    assert_valid_for_kubernetes,
    crd_schema,
    pod_template_resource,
)

CRDS = {
    "PyTorchJob": ("kubeflow.org_pytorchjobs.yaml", "v1"),
    "TrainJob": ("trainer.kubeflow.org_trainjobs.yaml", "v1alpha1"),
    "JobSet": ("jobset.x-k8s.io_jobsets.yaml", "v1alpha2"),
}
ARGS = ["--images-uri", "gs://bkt/images", "--results-root", "gs://bkt/results", "--run-id", "run-123"]
ARGS += ["--image", "registry.example/kfp-batch-inference:1.0"]


def render(capsys, *args: str) -> dict:
    assert main(["render-job", *ARGS, *args]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("job_kind", JOB_KINDS)
@pytest.mark.parametrize(
    "options", [[], ["--nodes", "16", "--no-rdma", "--queue", ""]], ids=["defaults", "no-rdma-no-queue"]
)
def test_render_job_prints_a_manifest_valid_for_its_crd_and_kubernetes(capsys, crds_dir, job_kind, options):
    manifest = render(capsys, "--job-kind", job_kind, *options)
    assert_valid_for_crd(manifest, crd_schema(crds_dir, *CRDS[manifest["kind"]]))
    for template in pod_templates(manifest):
        assert_valid_for_kubernetes(pod_template_resource(template))
        (container,) = template["spec"]["containers"]
        assert "--input gs://bkt/images --output gs://bkt/results/run-123" in container["command"][-1]


def test_each_kind_is_its_own_resource(capsys):
    kinds = {render(capsys, "--job-kind", job_kind)["kind"] for job_kind in JOB_KINDS}
    assert kinds == set(CRDS)


def test_an_unknown_kind_is_refused_with_one_line_naming_it(capsys):
    try:
        code = main(["render-job", *ARGS, "--job-kind", "mpijob"])
    except SystemExit as exit:  # argparse's refusal of a choice
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "mpijob" in err[-1]
