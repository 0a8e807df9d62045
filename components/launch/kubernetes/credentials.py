"""Where the launcher's API client gets its endpoint and bearer token.

Two cases: a KFP task running inside the cluster (the pod's service account) and a task
outside it, e.g. on Vertex AI Pipelines (the caller's Google identity on a GKE cluster). Both
hand the client a token provider, not a token: GKE tokens expire hourly and in-cluster tokens
rotate, while a run can wait a day for capacity.
"""

from __future__ import annotations

import base64
import os
import tempfile
import threading
from typing import Any

import requests

from components.launch.kubernetes.api import KubernetesApi

IN_CLUSTER_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
GKE_API = "https://container.googleapis.com/v1"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def in_cluster_api(sa_dir: str = IN_CLUSTER_DIR, **kwargs: Any) -> KubernetesApi:
    """A client with the credentials of the pod's service account (a KFP task in the cluster).

    The token file is re-read per request because the kubelet rotates projected tokens.

    Args:
        sa_dir: Where the service account token and CA are mounted.
        **kwargs: Passed to :class:`KubernetesApi`.

    Raises:
        RuntimeError: Not running in a pod (no service host or token).
    """
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    token_path = os.path.join(sa_dir, "token")
    if not host or not os.path.exists(token_path):
        raise RuntimeError(
            f"not running in a Kubernetes pod: KUBERNETES_SERVICE_HOST or {token_path} is missing"
        )
    if ":" in host:  # an IPv6 service address needs brackets in a URL
        host = f"[{host}]"

    def read_token() -> str:
        with open(token_path) as f:
            return f.read().strip()

    return KubernetesApi(
        f"https://{host}:{port}", token_provider=read_token, verify=os.path.join(sa_dir, "ca.crt"), **kwargs
    )


def gke_api(
    project: str, location: str, cluster: str, *, credentials: Any = None, **kwargs: Any
) -> KubernetesApi:
    """A client for a GKE cluster from outside it (a Vertex AI Pipelines task).

    The endpoint and CA come from the GKE API (``google-cloud-container`` when installed,
    else its REST endpoint); the bearer token is the caller's Google identity, which GKE
    maps to Kubernetes RBAC. Needs ``container.clusters.get`` on the cluster.

    Args:
        project: GCP project id.
        location: Cluster region or zone.
        cluster: Cluster name.
        credentials: google-auth credentials; default ``google.auth.default()``.
        **kwargs: Passed to :class:`KubernetesApi`.
    """
    import google.auth
    import google.auth.transport.requests

    if credentials is None:
        credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
    auth_request = google.auth.transport.requests.Request()
    lock = threading.Lock()

    def fresh_token() -> str:
        with lock:
            if not credentials.valid:
                credentials.refresh(auth_request)
            return credentials.token

    name = f"projects/{project}/locations/{location}/clusters/{cluster}"
    try:
        from google.cloud import container_v1
    except ImportError:
        container_v1 = None
    if container_v1 is not None:
        got = container_v1.ClusterManagerClient(credentials=credentials).get_cluster(name=name)
        endpoint, ca_b64 = got.endpoint, got.master_auth.cluster_ca_certificate
    else:
        resp = requests.get(
            f"{GKE_API}/{name}", timeout=30, headers={"Authorization": f"Bearer {fresh_token()}"}
        )
        if not resp.ok:
            raise RuntimeError(f"GKE API: cannot get cluster {name}: {resp.status_code} {resp.text[:300]}")
        body = resp.json()
        endpoint, ca_b64 = body["endpoint"], body["masterAuth"]["clusterCaCertificate"]
    # requests wants a CA bundle path, not bytes.
    with tempfile.NamedTemporaryFile("wb", prefix="gke-ca-", suffix=".crt", delete=False) as ca_file:
        ca_file.write(base64.b64decode(ca_b64))
    return KubernetesApi(f"https://{endpoint}", token_provider=fresh_token, verify=ca_file.name, **kwargs)
