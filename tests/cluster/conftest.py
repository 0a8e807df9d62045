"""The cluster tier: the launcher and cluster/ against a real control plane (tests/support/control_plane.py).

One control plane serves the whole session: built from Go modules on the first run (minutes,
then cached outside the clone), started fresh in a temporary folder (seconds), with every overlay
of cluster/ applied as the docs say (``kubectl apply --server-side -k``) and four fake A3 Ultra nodes (8 GPUs each) from
kwok. Tests tell their jobs apart by run id; each leaves no job behind.
"""

from __future__ import annotations

import itertools

import pytest

from components.launch.kubernetes.api import KubernetesApi
from components.launch.kubernetes.kinds import JOB_KINDS
from tests.support import ROOT
from tests.support.control_plane import ControlPlane, Kube, build
from tests.support.gke_player import LAUNCHER_SA, NAMESPACE, Gke

GPU_NODES = 4
_run_ids = itertools.count()


@pytest.fixture(scope="session")
def plane(tmp_path_factory) -> ControlPlane:
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"), build())
    try:
        plane.start()
        for kind in JOB_KINDS:  # as cluster/README.md says to, with kubectl at the server's version
            plane.kubectl("apply", "--server-side", "-k", str(ROOT / "cluster" / "overlays" / kind))
        plane.add_gpu_nodes(GPU_NODES)
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def admin(plane) -> Kube:
    return plane.admin


@pytest.fixture(scope="session")
def gke(plane, admin) -> Gke:
    return Gke(plane, admin)


@pytest.fixture(scope="session")
def launcher_token(admin) -> str:
    """A real token of the launcher's service account (what the KFP task's pod mounts)."""
    return admin.token(LAUNCHER_SA, NAMESPACE)


@pytest.fixture
def launcher_api(plane, launcher_token) -> KubernetesApi:
    """The launcher's own client, authenticated as the overlay's service account, verifying with the CA."""
    return KubernetesApi(plane.url, token=launcher_token, verify=str(plane.pki.ca_cert))


@pytest.fixture
def run_id(request) -> str:
    return (
        f"r{next(_run_ids)}-{request.node.name[:20].lower().replace('_', '-').replace('[', '-').strip('-]')}"
    )
