"""scripts/kueue_integration.py: one framework added to Kueue's live configuration, nothing else changed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import yaml

from scripts.kueue_integration import frameworks, with_framework
from tests.support import ROOT

# The layout of Kueue 0.19's controller_manager_config.yaml: the Kubeflow v1 jobs listed but
# commented out (kubernetes-sigs/kueue PR #12606), other settings and commented examples around.
KUEUE_0_19 = """\
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
health:
  healthProbeBindAddress: :8081
metrics:
  bindAddress: :8443
webhook:
  port: 9443
leaderElection:
  leaderElect: true
  resourceName: c1f6bfd2.kueue.x-k8s.io
clientConnection:
  qps: 50
  burst: 100
#manageJobsWithoutQueueName: true
integrations:
  frameworks:
  - "batch/job"
  - "kubeflow.org/mpijob"
  - "ray.io/rayjob"
  - "jobset.x-k8s.io/jobset"
  - "trainer.kubeflow.org/trainjob"
#  - "kubeflow.org/paddlejob"
#  - "kubeflow.org/pytorchjob"
#  - "kubeflow.org/tfjob"
  - "workload.codeflare.dev/appwrapper"
#  - "pod"
#  externalFrameworks:
#  - "Foo.v1.example.com"
#fairSharing:
#  enable: true
"""


def test_a_commented_out_framework_is_uncommented_in_place_and_nothing_else_changes():
    edited = with_framework(KUEUE_0_19, "kubeflow.org/pytorchjob")
    before, after = KUEUE_0_19.splitlines(), edited.splitlines()
    changed = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert changed == [('#  - "kubeflow.org/pytorchjob"', '  - "kubeflow.org/pytorchjob"')]
    assert "kubeflow.org/pytorchjob" in frameworks(edited) and "kubeflow.org/tfjob" not in frameworks(edited)


def test_a_framework_not_listed_is_appended_to_the_live_list():
    edited = with_framework(KUEUE_0_19, "leaderworkerset.x-k8s.io/leaderworkerset")
    assert frameworks(edited) == [*frameworks(KUEUE_0_19), "leaderworkerset.x-k8s.io/leaderworkerset"]
    assert yaml.safe_load(edited)["health"] == yaml.safe_load(KUEUE_0_19)["health"]
    assert len(edited.splitlines()) == len(KUEUE_0_19.splitlines()) + 1


def test_an_enabled_framework_changes_nothing_and_a_document_without_the_list_is_refused():
    assert with_framework(KUEUE_0_19, "trainer.kubeflow.org/trainjob") == KUEUE_0_19
    with pytest.raises(ValueError, match="no integrations.frameworks list"):
        with_framework(
            "apiVersion: config.kueue.x-k8s.io/v1beta2\nkind: Configuration\n", "jobset.x-k8s.io/jobset"
        )


def test_the_command_edits_the_live_config_map_then_restarts_kueue(tmp_path):
    # A stand-in kubectl on PATH: it serves the ConfigMap and records what it is asked to do.
    state = tmp_path / "configmap.json"
    state.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": "kueue-manager-config",
                    "namespace": "kueue-system",
                    "resourceVersion": "41",
                },
                "data": {"controller_manager_config.yaml": KUEUE_0_19},
            }
        )
    )
    calls = tmp_path / "calls.jsonl"
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(
        f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
body = sys.stdin.read() if "replace" in args else None
open({str(calls)!r}, "a").write(json.dumps({{"args": args, "body": body}}) + "\\n")
if "get" in args:
    print(open({str(state)!r}).read())
"""
    )
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    script = [sys.executable, str(ROOT / "scripts" / "kueue_integration.py")]

    check = subprocess.run(
        [*script, "--check", "kubeflow.org/pytorchjob"], env=env, capture_output=True, text=True
    )
    done = subprocess.run(
        [*script, "kubeflow.org/pytorchjob"], env=env, capture_output=True, text=True, check=True
    )

    assert check.returncode == 1 and "NOT enabled" in check.stdout
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    verbs = [next(a for a in c["args"] if a in ("get", "replace", "rollout")) for c in recorded]
    assert verbs == ["get", "get", "replace", "rollout", "rollout"]
    replaced = json.loads(recorded[2]["body"])
    assert replaced["metadata"]["resourceVersion"] == "41"  # a concurrent change makes the replace fail
    assert replaced["data"]["controller_manager_config.yaml"] == with_framework(
        KUEUE_0_19, "kubeflow.org/pytorchjob"
    )
    assert recorded[3]["args"][-2:] == ["restart", "deployment/kueue-controller-manager"]
    assert "enabled kubeflow.org/pytorchjob" in done.stdout
