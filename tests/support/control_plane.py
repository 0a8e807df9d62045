"""A real Kubernetes control plane on loopback, built from Go modules: the cluster tier's fixture.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler, Kueue (with its webhooks and
the ProvisioningRequest admission check live), JobSet, Kubeflow Trainer, the Kubeflow Training
Operator (PyTorchJob) and kwok, which plays the GPU nodes and serves their pods' logs from files.
Everything is built once from its Go module at the versions in :data:`VERSIONS`, through the Go
module proxy, into a cache outside the clone keyed by those versions; every start gets a fresh
etcd, its own CA and free loopback ports, and is stopped by PID.

    python -m tests.support.control_plane build      # build (or find) the binaries
    python -m tests.support.control_plane up DIR     # start one and wait (Ctrl-C stops it)

What it cannot give: containers never run (kwok moves the pods' status: a test ends a pod by
annotating it, see :data:`EXIT_CODE_ANNOTATION`), there is no GKE autoscaler (a test plays it by
setting the ProvisioningRequest's conditions), no GCS, no Workload Identity.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from pipelines.dev.ports import unused_port
from tests.support.tls import Pki, make_pki

# Module versions, as the Go module proxy serves them (``go list -m -versions``). Wanted but not
# served on 2026-12-06: Kueue v0.20 (the proxy serves v0.19.0-v0.19.2), JobSet > v0.12.0.
KUBERNETES = "v1.36.3"
VERSIONS = {
    "go.etcd.io/etcd/server/v3": "v3.6.8",
    "k8s.io/kubernetes": KUBERNETES,
    "sigs.k8s.io/kueue": "v0.19.2",
    "sigs.k8s.io/jobset": "v0.12.0",
    "github.com/kubeflow/trainer/v2": "v2.3.0",
    "github.com/kubeflow/training-operator": "v1.9.4",
    "sigs.k8s.io/kwok": "v0.8.0",
    # The ProvisioningRequest CRD, at the version Kueue v0.19.2's go.mod requires.
    "k8s.io/autoscaler/cluster-autoscaler/apis": "v0.0.0-20240830133931-adfbe7e45277",
}

# binary -> (module, package); the package's module is built at its VERSIONS entry.
BINARIES = {
    "etcd": ("go.etcd.io/etcd/server/v3", None),  # a wrapper main around etcdmain (see _build_etcd)
    "kube-apiserver": ("k8s.io/kubernetes", "k8s.io/kubernetes/cmd/kube-apiserver"),
    "kube-controller-manager": ("k8s.io/kubernetes", "k8s.io/kubernetes/cmd/kube-controller-manager"),
    "kube-scheduler": ("k8s.io/kubernetes", "k8s.io/kubernetes/cmd/kube-scheduler"),
    # The documented `kubectl apply --server-side -k cluster/...`, at the server's version.
    "kubectl": ("k8s.io/kubernetes", "k8s.io/kubernetes/cmd/kubectl"),
    "kueue": ("sigs.k8s.io/kueue", "sigs.k8s.io/kueue/cmd/kueue"),
    "jobset": ("sigs.k8s.io/jobset", "sigs.k8s.io/jobset"),
    "trainer": (
        "github.com/kubeflow/trainer/v2",
        "github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager",
    ),
    "training-operator": (
        "github.com/kubeflow/training-operator",
        "github.com/kubeflow/training-operator/cmd/training-operator.v1",
    ),
    "kwok": ("sigs.k8s.io/kwok", "sigs.k8s.io/kwok/cmd/kwok"),
}

# Kubernetes' staging modules: k8s.io/kubernetes replaces them with local paths, so a module that
# builds its commands must pin each to the release of the same minor (v0.36.3 for v1.36.3).
K8S_STAGING = (
    "api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider "
    "cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api "
    "cri-client cri-streaming csi-translation-lib dynamic-resource-allocation endpointslice externaljwt "
    "kms kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics "
    "mount-utils pod-security-admission sample-apiserver sample-cli-plugin sample-controller streaming"
).split()

CACHE_ROOT = Path(
    os.environ.get("KFP_BI_CONTROL_PLANE_CACHE", Path.home() / ".cache" / "kfp-batch-inference")
)

MACHINE_LOCK = Path("/tmp/kfp-batch-inference-control-plane.lock")
MACHINE_PIDS = Path("/tmp/kfp-batch-inference-control-plane.pids")  # what runs now: "PID BINARY" lines

# What a test sets on a pod to end it: kwok's stage then terminates its container with this exit
# code (0: Succeeded, else Failed with reason Error), and the reason/message annotations, if set.
EXIT_CODE_ANNOTATION = "test.batch-inference.dev/exit-code"
EXIT_REASON_ANNOTATION = "test.batch-inference.dev/exit-reason"
FAKE_NODE_LABEL = "type"
FAKE_NODE_VALUE = "kwok"
GPU_NODE_ACCELERATOR = "nvidia-h200-141gb"

KUEUE_FRAMEWORKS = (
    "batch/job",
    "jobset.x-k8s.io/jobset",
    "trainer.kubeflow.org/trainjob",
    "kubeflow.org/pytorchjob",
)
# Resources whose admission webhooks the fixture registers: the ones the enabled integrations and
# the installed controllers serve (Kueue's manifests also list pods, deployments, Ray, ...).
WEBHOOK_RESOURCES = {
    "jobs",
    "jobsets",
    "trainjobs",
    "trainingruntimes",
    "clustertrainingruntimes",
    "pytorchjobs",
    "pods",
}
KUEUE_OWN_GROUP = "kueue.x-k8s.io"


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def say(message: str) -> None:
    print(f"[control-plane] {message}", file=sys.stderr, flush=True)


# -- building -------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where the binaries of :data:`VERSIONS` live: one folder per set of versions."""
    recipe = {"versions": VERSIONS, "ldflags": {b: _ldflags(b) for b in BINARIES}}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return CACHE_ROOT / f"control-plane-{key}"


class BuildError(RuntimeError):
    """A binary could not be built: the message holds the go command and its output's end."""


def _go(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(["go", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise BuildError(f"`go {' '.join(args)}` (in {cwd}) failed with exit code {proc.returncode}:\n{tail}")
    return proc.stdout


def _go_env() -> dict[str, str]:
    if shutil.which("go") is None:
        raise BuildError("the `go` command is not on PATH: the cluster tier builds its control plane with Go")
    env = dict(os.environ)
    env.setdefault("GOFLAGS", "")
    env["GOFLAGS"] = (env["GOFLAGS"] + " -trimpath -buildvcs=false").strip()
    env["CGO_ENABLED"] = "0"
    return env


@functools.cache
def module_dir(module: str) -> Path:
    """The module's source at its pinned version (downloaded into the module cache if needed)."""
    out = _go(["mod", "download", "-json", f"{module}@{VERSIONS[module]}"], Path.cwd(), _go_env())
    return Path(json.loads(out)["Dir"])


def _wrapper_module(directory: Path, name: str, requires: dict[str, str], replaces: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"module {name}", "", "go 1.26.0", ""]
    lines += [f"require {m} {v}" for m, v in requires.items()]
    lines += [f"replace {m} => {m} {v}" for m, v in replaces.items()]
    (directory / "go.mod").write_text("\n".join(lines) + "\n")


def _ldflags(binary: str) -> str:
    """Stripped; Kubernetes' commands also get the version stamp its release build sets (Kueue and
    the other controllers parse the server's version and refuse ``v0.0.0-master``)."""
    flags = "-s -w"
    if BINARIES[binary][0] == "k8s.io/kubernetes":
        major, minor = KUBERNETES.removeprefix("v").split(".")[:2]
        for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
            flags += (
                f" -X {package}.gitVersion={KUBERNETES} -X {package}.gitMajor={major}"
                f" -X {package}.gitMinor={minor} -X {package}.gitTreeState=clean"
                f" -X {package}.buildDate=2026-01-01T00:00:00Z"
            )
    return flags


def _build_one(binary: str, bin_dir: Path, src_dir: Path, env: dict[str, str]) -> None:
    """Builds one binary inside a small module of its own that requires the pinned version.

    Not ``go install pkg@version``: it asks the proxy for the module's version list (for its
    deprecation notice), which the proxy refuses for some modules it serves (JobSet).
    """
    module, package = BINARIES[binary]
    version = VERSIONS[module]
    wrapper = src_dir / binary
    replaces = {}
    if module == "k8s.io/kubernetes":
        replaces = {f"k8s.io/{m}": "v0." + version.removeprefix("v1.") for m in K8S_STAGING}
    _wrapper_module(wrapper, f"controlplane/{binary}", {module: version}, replaces)
    if package is None:
        # etcd's main module replaces its submodules with local paths: wrap etcdmain instead.
        (wrapper / "main.go").write_text(
            'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\n'
            "func main() { etcdmain.Main(os.Args) }\n"
        )
        package = "."
    partial = bin_dir / f".{binary}.partial"
    _go(["build", "-mod=mod", f"-ldflags={_ldflags(binary)}", "-o", str(partial), package], wrapper, env)
    partial.rename(bin_dir / binary)  # only a whole binary ever has the final name


def build() -> Path:
    """Builds every missing binary (minutes per binary on a cold Go cache); returns their folder.

    Raises:
        BuildError: Go is missing, a module is not served, or a build fails (the error names the
            go command and ends with its output).
    """
    bin_dir = cache_dir() / "bin"
    missing = [b for b in BINARIES if not (bin_dir / b).is_file()]
    if not missing:
        return bin_dir
    bin_dir.mkdir(parents=True, exist_ok=True)
    env = _go_env()
    with open(cache_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; a second waits, then finds the binaries
        for binary in [b for b in BINARIES if not (bin_dir / b).is_file()]:
            started = time.monotonic()
            say(f"building {binary} from {BINARIES[binary][0]}@{VERSIONS[BINARIES[binary][0]]} ...")
            _build_one(binary, bin_dir, cache_dir() / "src", env)
            say(f"built {binary} in {time.monotonic() - started:.0f}s")
    return bin_dir


def crd_files() -> list[Path]:
    """The CRDs the control plane installs, from the controllers' own modules (no build needed)."""
    kueue = module_dir("sigs.k8s.io/kueue") / "config/components/crd/bases"
    trainer = module_dir("github.com/kubeflow/trainer/v2") / "manifests/base/crds"
    operator = module_dir("github.com/kubeflow/training-operator") / "manifests/base/crds"
    return [
        *sorted(kueue.glob("*.yaml")),
        module_dir("sigs.k8s.io/jobset") / "config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml",
        *sorted(trainer.glob("trainer.kubeflow.org_*.yaml")),
        operator / "kubeflow.org_pytorchjobs.yaml",  # the operator runs with --enable-scheme=pytorchjob
        module_dir("k8s.io/autoscaler/cluster-autoscaler/apis")
        / "config/crd/autoscaling.x-k8s.io_provisioningrequests.yaml",
        module_dir("sigs.k8s.io/kwok") / "kustomize/crd/bases/kwok.x-k8s.io_logs.yaml",
    ]


# -- certificates ---------------------------------------------------------------------------------


# -- an admin client --------------------------------------------------------------------------------


class Kube:
    """The tests' own client: any resource by apiVersion and kind, found through discovery.

    It authenticates as cluster admin (a client certificate in ``system:masters``), or as another
    identity with ``token``/``impersonate``; the launcher under test uses its own client
    (:class:`components.launch.kubernetes.api.KubernetesApi`).
    """

    def __init__(self, url: str, pki: Pki, *, token: str | None = None, impersonate: str | None = None):
        self.url, self.pki = url, pki
        self.session = requests.Session()
        # Passed on every call: a session's own verify loses to REQUESTS_CA_BUNDLE in the environment.
        self.verify = str(pki.ca_cert)
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        else:
            self.session.cert = (str(pki.admin_cert), str(pki.admin_key))
            if impersonate:
                self.session.headers["Impersonate-User"] = impersonate
        self._plurals: dict[tuple[str, str], tuple[str, bool]] = {}

    def _resource(self, api_version: str, kind: str) -> tuple[str, bool]:
        """``(plural, namespaced)`` of a kind, from the API's discovery."""
        key = (api_version, kind)
        if key not in self._plurals:
            root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
            listing = self.request("GET", root)
            for r in listing.get("resources", []):
                if "/" not in r["name"]:
                    self._plurals[(api_version, r["kind"])] = (r["name"], r["namespaced"])
            if key not in self._plurals:
                raise KeyError(f"{kind} is not served at {api_version}")
        return self._plurals[key]

    def path(self, api_version: str, kind: str, name: str | None = None, namespace: str | None = None) -> str:
        plural, namespaced = self._resource(api_version, kind)
        root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        ns = f"/namespaces/{namespace}" if namespaced and namespace else ""
        return f"{root}{ns}/{plural}" + (f"/{name}" if name else "")

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        data = None if body is None else (body if isinstance(body, (str, bytes)) else json.dumps(body))
        resp = self.session.request(
            method,
            self.url + path,
            params=params,
            data=data,
            headers={"Content-Type": content_type},
            timeout=30,
            verify=self.verify,
        )
        if not resp.ok:
            raise KubeError(resp.status_code, resp.text.strip()[:2000], method, path)
        return (
            resp.json()
            if resp.content and resp.headers.get("Content-Type", "").startswith("application/json")
            else {}
        )

    def apply(self, obj: dict[str, Any], *, subresource: str = "") -> dict[str, Any]:
        """Server-side apply, as ``kubectl apply --server-side --force-conflicts`` does."""
        meta = obj["metadata"]
        path = self.path(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))
        return self.request(
            "PATCH",
            path + (f"/{subresource}" if subresource else ""),
            params={"fieldManager": "batch-inference-tests", "force": "true"},
            body=obj,
            content_type="application/apply-patch+yaml",
        )

    def create_or_apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Creates the object (cheaper than an apply for large objects), or applies it when it exists."""
        meta = obj["metadata"]
        try:
            return self.request(
                "POST", self.path(obj["apiVersion"], obj["kind"], namespace=meta.get("namespace")), body=obj
            )
        except KubeError as e:
            if e.status != 409:
                raise
        return self.apply(obj)

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        return self.request("GET", self.path(api_version, kind, name, namespace))

    def find(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        try:
            return self.get(api_version, kind, name, namespace)
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    def list(
        self, api_version: str, kind: str, namespace: str | None = None, **params: str
    ) -> list[dict[str, Any]]:
        return self.request("GET", self.path(api_version, kind, namespace=namespace), params=params).get(
            "items", []
        )

    def merge_patch(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None,
        patch: dict[str, Any],
        *,
        subresource: str = "",
    ) -> dict[str, Any]:
        path = self.path(api_version, kind, name, namespace) + (f"/{subresource}" if subresource else "")
        return self.request("PATCH", path, body=patch, content_type="application/merge-patch+json")

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> None:
        with contextlib.suppress(KubeError):
            self.request(
                "DELETE",
                self.path(api_version, kind, name, namespace),
                params={"propagationPolicy": "Background"},
            )

    def token(self, service_account: str, namespace: str, seconds: int = 3600) -> str:
        """A real bound token of the service account (the TokenRequest API)."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": seconds},
        }
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token"
        return self.request("POST", path, body=body)["status"]["token"]

    def can(self, verb: str, resource: str, namespace: str, group: str = "", subresource: str = "") -> bool:
        """Whether this identity may do it: asked of the API server (a SelfSubjectAccessReview)."""
        attrs = {"verb": verb, "resource": resource, "namespace": namespace, "group": group}
        if subresource:
            attrs["subresource"] = subresource
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attrs},
        }
        return bool(
            self.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", body=body)[
                "status"
            ].get("allowed")
        )

    def wait_for(self, what: str, probe: Callable[[], Any], timeout_s: float = 60.0) -> Any:
        """Polls ``probe`` (the server's state, not a clock) until it returns something truthy."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s:g}s for {what}")
            time.sleep(0.2)


class KubeError(Exception):
    def __init__(self, status: int, text: str, method: str, path: str):
        super().__init__(f"{method} {path}: {status} {text}")
        self.status, self.text = status, text


# -- the running control plane ---------------------------------------------------------------------------


def _wait_port(port: int, what: str, proc: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:g}s:\n{_tail(log)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop_leftovers() -> None:
    """Kills, by PID, what a control plane whose process died without stopping it left running.

    Its processes run in sessions of their own (a test's Ctrl-C must not reach etcd first), so
    they outlive a killed test run; the next start, holding the machine lock, ends them.
    """
    if not MACHINE_PIDS.exists():
        return
    for line in MACHINE_PIDS.read_text().splitlines():
        pid, _, binary = line.partition(" ")
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, ValueError):
            continue  # gone already
        if cmdline == binary:  # not a new process that happens to have the PID
            say(f"stopping {Path(binary).name} (pid {pid}) left by a control plane that did not stop")
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    MACHINE_PIDS.write_text("")


@dataclass
class ControlPlane:
    """One running control plane under ``workdir`` (its etcd data, certificates, configs and logs).

    Attributes:
        url: The API server, ``https://127.0.0.1:PORT``.
        pki: Its certificates; ``pki.ca_cert`` verifies every server here.
        admin: A cluster-admin :class:`Kube`.
        kwok_logs: Where pods' log files go (``log_file(pod)``).
    """

    workdir: Path
    bin_dir: Path
    url: str = ""
    pki: Pki | None = None
    admin: Kube | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    kueue_frameworks: tuple[str, ...] = KUEUE_FRAMEWORKS
    _machine_lock: Any = None

    @property
    def kwok_logs(self) -> Path:
        return self.workdir / "pod-logs"

    def log_path(self, component: str) -> Path:
        return self.workdir / "logs" / f"{component}.log"

    # processes -------------------------------------------------------------------------------

    def _spawn(self, component: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.log_path(component)
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab")  # noqa: SIM115 - the child writes to it for its whole life
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            cwd=self.workdir,
        )
        out.close()
        self.processes[component] = proc
        with open(MACHINE_PIDS, "a") as pids:  # written under the machine lock
            pids.write(f"{proc.pid} {args[0]}\n")
        return proc

    def stop_component(self, component: str) -> None:
        proc = self.processes.pop(component, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        """Stops every process, controllers first, etcd last."""
        for component in reversed(list(self.processes)):
            self.stop_component(component)
        if self._machine_lock is not None:
            MACHINE_PIDS.write_text("")
            self._machine_lock.close()
            self._machine_lock = None

    def _lock_machine(self) -> None:
        """One control plane per machine: the Training Operator and Kueue read certificates from
        fixed paths (``/tmp/k8s-webhook-server``, ``/etc/kueue``), which a second one would overwrite."""
        self._machine_lock = open(MACHINE_LOCK, "a")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(self._machine_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another control plane runs on this machine ({MACHINE_LOCK}); waiting for it to stop")
            fcntl.flock(self._machine_lock, fcntl.LOCK_EX)
        _stop_leftovers()

    # start ---------------------------------------------------------------------------------------

    def start(self) -> ControlPlane:
        self._lock_machine()
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kwok_logs.mkdir(exist_ok=True)
        self.pki = make_pki(self.workdir / "pki", extra_dns=("training-operator.kubeflow.svc",))
        for name in (
            "etcd",
            "etcd-peer",
            "apiserver",
            "kwok",
            "kueue",
            "jobset",
            "trainer",
            "training-operator",
        ):
            self.ports[name] = unused_port()
        self._start_etcd()
        self._start_apiserver()
        self.admin = Kube(self.url, self.pki)
        kubeconfig = self._kubeconfig()
        b = self.bin_dir
        self._spawn(
            "kube-controller-manager",
            [
                str(b / "kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                "--secure-port=0",
                "--leader-elect=false",
                f"--service-account-private-key-file={self.pki.sa_key}",
                f"--root-ca-file={self.pki.ca_cert}",
                # nodelifecycle lifts the not-ready taint the API server puts on every new node.
                "--controllers=*,-nodeipam,-cloud-node-lifecycle",
                "--concurrent-gc-syncs=5",
                "--node-monitor-grace-period=3600s",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(b / "kube-scheduler"),
                f"--kubeconfig={kubeconfig}",
                "--secure-port=0",
                "--leader-elect=false",
            ],
        )
        self._install_crds()
        self._start_kwok(kubeconfig)
        self._install_webhooks()
        self._start_controllers(kubeconfig)
        say(f"up in {time.monotonic() - started:.1f}s at {self.url} (workdir {self.workdir})")
        return self

    def _start_etcd(self) -> None:
        port, peer = self.ports["etcd"], self.ports["etcd-peer"]
        proc = self._spawn(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{port}",
                f"--advertise-client-urls=http://127.0.0.1:{port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=default=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        _wait_port(port, "etcd", proc, self.log_path("etcd"))

    def _start_apiserver(self) -> None:
        port = self.ports["apiserver"]
        p = self.pki
        proc = self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--tls-cert-file={p.serving_cert}",
                f"--tls-private-key-file={p.serving_key}",
                f"--client-ca-file={p.ca_cert}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={p.sa_pub}",
                f"--service-account-signing-key-file={p.sa_key}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--endpoint-reconciler-type=none",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                "--allow-privileged=true",
                # kwok's kubelet endpoint (pods' logs) presents the same serving certificate.
                f"--kubelet-certificate-authority={p.ca_cert}",
                f"--kubelet-client-certificate={p.admin_cert}",
                f"--kubelet-client-key={p.admin_key}",
                "--kubelet-preferred-address-types=InternalIP",
            ],
        )
        _wait_port(port, "kube-apiserver", proc, self.log_path("kube-apiserver"))
        self.url = f"https://127.0.0.1:{port}"
        admin = Kube(self.url, p)
        deadline = time.monotonic() + 60
        while True:
            try:
                resp = admin.session.get(self.url + "/readyz", timeout=5, verify=admin.verify)
                if resp.ok:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kube-apiserver is not ready:\n{_tail(self.log_path('kube-apiserver'))}")
            time.sleep(0.2)

    def _kubeconfig(self) -> Path:
        p = self.pki
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "admin",
            "clusters": [
                {"name": "local", "cluster": {"server": self.url, "certificate-authority": str(p.ca_cert)}}
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {"client-certificate": str(p.admin_cert), "client-key": str(p.admin_key)},
                }
            ],
            "contexts": [{"name": "admin", "context": {"cluster": "local", "user": "admin"}}],
        }
        path = self.workdir / "admin.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        return path

    # CRDs and webhooks -----------------------------------------------------------------------------

    def _install_crds(self) -> None:
        assert self.admin is not None
        ca_bundle = base64.b64encode(self.pki.ca_cert.read_bytes()).decode()
        crds = [crd for path in crd_files() for crd in yaml.load_all(path.read_text(), Loader=_LOADER) if crd]
        for crd in crds:
            if crd["spec"]["group"] == KUEUE_OWN_GROUP and len(crd["spec"]["versions"]) > 1:
                # Kueue converts between its served versions itself, as its own kustomize patches set up.
                crd["spec"]["conversion"] = {
                    "strategy": "Webhook",
                    "webhook": {
                        "conversionReviewVersions": ["v1"],
                        "clientConfig": {
                            "url": f"https://127.0.0.1:{self.ports['kueue']}/convert",
                            "caBundle": ca_bundle,
                        },
                    },
                }
        # Created side by side: one at a time, the largest schemas make this the slowest step of the start.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(self.admin.create_or_apply, crds))
        names = [crd["metadata"]["name"] for crd in crds]

        def established() -> bool:
            for name in names:
                crd = self.admin.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", name)
                conds = {c["type"]: c["status"] for c in (crd.get("status") or {}).get("conditions") or []}
                if conds.get("Established") != "True":
                    return False
            return True

        self.admin.wait_for("CRDs established", established)

    def _webhook_configs(self) -> list[dict[str, Any]]:
        sources = {
            "kueue": module_dir("sigs.k8s.io/kueue") / "config/components/webhook/manifests.yaml",
            "jobset": module_dir("sigs.k8s.io/jobset") / "config/components/webhook/manifests.yaml",
            "trainer": module_dir("github.com/kubeflow/trainer/v2") / "manifests/base/webhook/manifests.yaml",
            "training-operator": module_dir("github.com/kubeflow/training-operator")
            / "manifests/base/webhook/manifests.yaml",
        }
        ca_bundle = base64.b64encode(self.pki.ca_cert.read_bytes()).decode()
        configs = []
        for component, path in sources.items():
            for doc in yaml.safe_load_all(path.read_text()):
                if not doc:
                    continue
                kept = []
                for hook in doc.get("webhooks") or []:
                    resources = {r for rule in hook.get("rules") or [] for r in rule.get("resources") or []}
                    groups = {g for rule in hook.get("rules") or [] for g in rule.get("apiGroups") or []}
                    ours = resources <= WEBHOOK_RESOURCES or groups <= {
                        KUEUE_OWN_GROUP,
                        "trainer.kubeflow.org",
                    }
                    if component == "kueue" and "pods" in resources:
                        ours = "pod" in self.kueue_frameworks
                    if not ours:
                        continue
                    hook["clientConfig"] = {
                        "url": f"https://127.0.0.1:{self.ports[component]}{hook['clientConfig']['service']['path']}",
                        "caBundle": ca_bundle,
                    }
                    kept.append(hook)
                if not kept:
                    continue
                doc["webhooks"] = kept
                # The training operator's certificate rotator looks its configuration up by this name.
                doc["metadata"] = {
                    "name": "validator.training-operator.kubeflow.org"
                    if component == "training-operator"
                    else f"{component}-{doc['metadata']['name']}"
                }
                configs.append(doc)
        return configs

    def _install_webhooks(self) -> None:
        for config in self._webhook_configs():
            self.admin.apply(config)

    # kwok ---------------------------------------------------------------------------------------

    def _start_kwok(self, kubeconfig: Path) -> None:
        stages = self.workdir / "kwok-stages.yaml"
        stages.write_text(yaml.safe_dump_all(kwok_stages(), sort_keys=False))
        port = self.ports["kwok"]
        proc = self._spawn(
            "kwok",
            [
                str(self.bin_dir / "kwok"),
                f"--kubeconfig={kubeconfig}",
                f"--config={stages}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-label-selector={FAKE_NODE_LABEL}={FAKE_NODE_VALUE}",
                "--node-ip=127.0.0.1",
                f"--node-port={port}",
                f"--server-address=127.0.0.1:{port}",
                f"--tls-cert-file={self.pki.serving_cert}",
                f"--tls-private-key-file={self.pki.serving_key}",
                "--enable-crds=Logs",
                "--node-lease-duration-seconds=40",
            ],
        )
        _wait_port(port, "kwok", proc, self.log_path("kwok"))

    def kubectl(self, *args: str) -> str:
        """Runs the control plane's own kubectl as cluster admin; its output (raises on failure)."""
        done = subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.workdir / 'admin.kubeconfig'}", *args],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def add_gpu_nodes(self, count: int, gpus: int = 8, prefix: str = "a3u") -> list[str]:
        """Fake A3 Ultra nodes (8 H200 each) as GKE's queued provisioning makes them; returns their names."""
        names = []
        for i in range(count):
            name = f"{prefix}-{i}"
            self.admin.apply(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "labels": {
                            FAKE_NODE_LABEL: FAKE_NODE_VALUE,
                            "kubernetes.io/hostname": name,
                            "cloud.google.com/gke-accelerator": GPU_NODE_ACCELERATOR,
                            "cloud.google.com/gke-queued": "true",
                            "node.kubernetes.io/instance-type": "a3-ultragpu-8g",
                        },
                        "annotations": {"kwok.x-k8s.io/node": "fake"},
                    },
                    "spec": {
                        "taints": [
                            {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
                            {"key": "cloud.google.com/gke-queued", "value": "true", "effect": "NoSchedule"},
                        ]
                    },
                }
            )
            self.admin.merge_patch(
                "v1",
                "Node",
                name,
                None,
                {
                    "status": {
                        "capacity": {
                            "cpu": "224",
                            "memory": "2906Gi",
                            "nvidia.com/gpu": str(gpus),
                            "pods": "110",
                        },
                        "allocatable": {
                            "cpu": "220",
                            "memory": "2800Gi",
                            "nvidia.com/gpu": str(gpus),
                            "pods": "110",
                        },
                    }
                },
                subresource="status",
            )
            names.append(name)

        def ready() -> bool:
            for name in names:
                node = self.admin.get("v1", "Node", name)
                conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
                taints = {t["key"] for t in node["spec"].get("taints") or []}
                if conds.get("Ready") != "True" or "node.kubernetes.io/not-ready" in taints:
                    return False
            return True

        self.admin.wait_for("fake GPU nodes ready and untainted", ready)
        return names

    def serve_pod_log(
        self, namespace: str, pod: str, container: str, log_file: Path, previous: Path | None = None
    ) -> None:
        """kwok serves ``log_file`` (followed as it grows) as the container's log."""
        entry: dict[str, Any] = {"containers": [container], "logsFile": str(log_file), "follow": True}
        if previous is not None:
            entry["previousLogsFile"] = str(previous)
        self.admin.apply(
            {
                "apiVersion": "kwok.x-k8s.io/v1alpha1",
                "kind": "Logs",
                "metadata": {"name": pod, "namespace": namespace},
                "spec": {"logs": [entry]},
            }
        )

    # the controllers ------------------------------------------------------------------------------

    def cert_dir(self, component: str) -> Path:
        return self.workdir / "tmp" / component / "k8s-webhook-server" / "serving-certs"

    def _cert_tmpdir(self, component: str) -> dict[str, str]:
        """``TMPDIR`` of a controller whose webhook server reads ``$TMPDIR/k8s-webhook-server/serving-certs``."""
        certs = self.cert_dir(component)
        tmp = certs.parent.parent
        certs.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.pki.serving_cert, certs / "tls.crt")
        shutil.copy(self.pki.serving_key, certs / "tls.key")
        shutil.copy(self.pki.ca_cert, certs / "ca.crt")
        return {"TMPDIR": str(tmp)}

    def _start_controllers(self, kubeconfig: Path) -> None:
        self.start_kueue()
        self._start_jobset()
        self._start_trainer()
        self._start_training_operator(kubeconfig)

    def _start_configured(
        self,
        component: str,
        config: dict[str, Any],
        flags: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        """Starts a controller-runtime manager from a configuration file: leader election and metrics
        off, health on a free port, its webhook server on its loopback port with the shared certificate.
        """
        tmp = self._cert_tmpdir(component)
        config = {
            **config,
            "leaderElection": {"leaderElect": False},
            "metrics": {"bindAddress": "0"},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{unused_port()}"},
            "webhook": {"port": self.ports[component], "host": "127.0.0.1", **config.get("webhook", {})},
        }
        path = self.workdir / f"{component}-config.yaml"
        path.write_text(yaml.safe_dump(config))
        kubeconfig = self.workdir / "admin.kubeconfig"
        proc = self._spawn(
            component,
            [str(self.bin_dir / component), f"--config={path}", f"--kubeconfig={kubeconfig}", *flags],
            env={**tmp, **(env or {})},
        )
        _wait_port(self.ports[component], f"{component}'s webhook server", proc, self.log_path(component))

    def start_kueue(self, frameworks: tuple[str, ...] | None = None) -> None:
        """(Re)starts Kueue with these integrations (default: as before, at first :data:`KUEUE_FRAMEWORKS`)."""
        if frameworks is not None:
            self.kueue_frameworks = frameworks
        self.stop_component("kueue")
        self.admin.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kueue-system"}})
        # Out of cluster Kueue still reads a metrics certificate from this fixed path, a mounted Secret in a pod.
        metrics_certs = Path("/etc/kueue/metrics/certs")
        metrics_certs.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.pki.serving_cert, metrics_certs / "tls.crt")
        shutil.copy(self.pki.serving_key, metrics_certs / "tls.key")
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": "kueue-system",
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": list(self.kueue_frameworks)},
            # Kueue defaults it to /tmp/..., not $TMPDIR/..., which the Training Operator also uses.
            "webhook": {"certDir": str(self.cert_dir("kueue"))},
        }
        self._start_configured(
            "kueue", config, ("--feature-gates=VisibilityOnDemand=false",), {"POD_NAMESPACE": "kueue-system"}
        )
        self._wait_webhook_ready("kueue")

    def _start_jobset(self) -> None:
        config = {
            "apiVersion": "config.jobset.x-k8s.io/v1alpha1",
            "kind": "Configuration",
            "internalCertManagement": {"enable": False},
        }
        self._start_configured("jobset", config)

    def _start_trainer(self) -> None:
        config = {
            "apiVersion": "config.trainer.kubeflow.org/v1alpha1",
            "kind": "Configuration",
            "certManagement": {"enable": False},
            "statusServer": {"port": unused_port()},
        }
        self._start_configured("trainer", config)

    def _start_training_operator(self, kubeconfig: Path) -> None:
        # Its certificate rotator keeps a valid certificate it finds in its Secret, and its webhook
        # server reads the files at a fixed path that a pod would have mounted from that Secret.
        self.admin.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kubeflow"}})
        p = self.pki
        self.admin.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {"name": "training-operator-webhook-cert", "namespace": "kubeflow"},
                "data": {
                    k: base64.b64encode(f.read_bytes()).decode()
                    for k, f in (
                        ("ca.crt", p.ca_cert),
                        ("ca.key", p.ca_key),
                        ("tls.crt", p.serving_cert),
                        ("tls.key", p.serving_key),
                    )
                },
            }
        )
        certs = Path("/tmp/k8s-webhook-server/serving-certs")
        certs.mkdir(parents=True, exist_ok=True)
        for name, source in (("tls.crt", p.serving_cert), ("tls.key", p.serving_key), ("ca.crt", p.ca_cert)):
            shutil.copy(source, certs / name)
        proc = self._spawn(
            "training-operator",
            [
                str(self.bin_dir / "training-operator"),
                f"--kubeconfig={kubeconfig}",
                "--leader-elect=false",
                f"--webhook-server-port={self.ports['training-operator']}",
                "--metrics-bind-address=0",
                f"--health-probe-bind-address=127.0.0.1:{unused_port()}",
                "--enable-scheme=pytorchjob",
            ],
        )
        _wait_port(
            self.ports["training-operator"],
            "training-operator's webhook server",
            proc,
            self.log_path("training-operator"),
        )

    def _wait_webhook_ready(self, component: str) -> None:
        """Until the component's webhook answers over TLS with our CA (its server starts after its certs)."""
        url = f"https://127.0.0.1:{self.ports[component]}/"
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(url, verify=str(self.pki.ca_cert), timeout=2)
                return
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{component}'s webhook server never answered:\n{_tail(self.log_path(component))}"
                    ) from None
                time.sleep(0.2)


def kwok_stages() -> list[dict[str, Any]]:
    """kwok's stages: nodes come up Ready and keep their Lease; pods run until a test ends them."""
    stage_dir = module_dir("sigs.k8s.io/kwok") / "kustomize/stage"
    stages = [
        yaml.safe_load((stage_dir / "node/fast/node-initialize.yaml").read_text()),
        yaml.safe_load((stage_dir / "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml").read_text()),
    ]
    general = stage_dir / "pod/general"
    for name in (
        "pod-create",
        "pod-init-container-running",
        "pod-init-container-completed",
        "pod-ready",
        "pod-delete",
    ):
        stage = yaml.safe_load((general / f"{name}.yaml").read_text())
        stage["spec"].pop("delay", None)  # at once: the tests, not a timer, decide what happens next
        stages.append(stage)
    stages.append(_pod_exit_stage())
    return stages


def _pod_exit_stage() -> dict[str, Any]:
    """A running pod whose exit-code annotation a test set: its containers terminate with it."""
    code = f'(index .metadata.annotations "{EXIT_CODE_ANNOTATION}")'
    reason = f'(index .metadata.annotations "{EXIT_REASON_ANNOTATION}")'
    template = (
        "{{ $now := Now }}\n{{ $code := " + code + " }}\n{{ $reason := " + reason + " }}\n"
        "containerStatuses:\n"
        "{{ range $index, $item := .spec.containers }}\n"
        "- image: {{ $item.image | Quote }}\n"
        "  name: {{ $item.name | Quote }}\n"
        "  ready: false\n  restartCount: 0\n  started: false\n"
        "  state:\n    terminated:\n"
        "      exitCode: {{ $code }}\n"
        "      finishedAt: {{ $now | Quote }}\n"
        '      reason: {{ if $reason }}{{ $reason | Quote }}{{ else if eq $code "0" }}"Completed"{{ else }}"Error"{{ end }}\n'
        "      startedAt: {{ $now | Quote }}\n"
        "{{ end }}\n"
        'phase: {{ if eq $code "0" }}Succeeded{{ else }}Failed{{ end }}\n'
    )
    return {
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Stage",
        "metadata": {"name": "pod-exit"},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
            "selector": {
                "matchExpressions": [
                    {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"},
                    {"key": ".status.phase", "operator": "In", "values": ["Running"]},
                    {"key": f'.metadata.annotations["{EXIT_CODE_ANNOTATION}"]', "operator": "Exists"},
                ]
            },
            "next": {"statusTemplate": template},
        },
    }


@contextlib.contextmanager
def running(workdir: Path) -> Iterator[ControlPlane]:
    """A control plane started under ``workdir`` (built first if needed), stopped on exit."""
    plane = ControlPlane(workdir, build())
    try:
        yield plane.start()
    finally:
        plane.stop()


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        print(build())
        return 0
    if argv[:1] == ["up"] and len(argv) == 2:
        with running(Path(argv[1]).resolve()) as plane:
            print(
                f"API server {plane.url}; kubeconfig {plane.workdir / 'admin.kubeconfig'}; Ctrl-C stops it",
                flush=True,
            )
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        return 0
    print(__doc__.split("\n\n")[2], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
