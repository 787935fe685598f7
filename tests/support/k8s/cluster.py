"""``KubeCluster``: etcd + kube-apiserver + kube-controller-manager + kube-scheduler + KWOK on 127.0.0.1.

Every component is a local process started in its own session and ended by its PID (SIGTERM, wait, SIGKILL);
logs go to ``<workdir>/logs/<component>.log``. TLS material comes from a throwaway CA made with ``cryptography``.
The admin identity is a static token in group ``system:masters``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

K8S_VERSION = "v1.37.2"
REPO_ROOT = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "k8s-build"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kwok")
SERVICE_CIDR = "10.96.0.0/16"
FAKE_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
# KWOK stages used for fake nodes: initialize + lease heartbeat; pods: ready, complete, delete (no chaos).
KWOK_STAGES = (
    "node/fast/node-initialize.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "pod/fast/pod-ready.yaml",
    "pod/fast/pod-complete.yaml",
    "pod/fast/pod-delete.yaml",
)


def default_bin_dir() -> Path:
    """Where ``scripts/k8s-build`` caches the binaries for ``K8S_VERSION``."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = Path(os.environ.get("LOOM_K8S_CACHE") or cache / "loom-dagster" / "k8s")
    return root / K8S_VERSION / "bin"


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file ('' if missing)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def build_binaries(log_path: Path | None = None) -> Path:
    """Run ``scripts/k8s-build`` (a no-op when cached) and return the bin dir; raise with the log tail on failure."""
    log_path = log_path or Path(tempfile.gettempdir()) / f"loom-k8s-build-{os.getuid()}.log"
    with log_path.open("w") as log:
        rc = subprocess.run(
            [str(BUILD_SCRIPT)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        ).returncode
    bin_dir = default_bin_dir()
    missing = [b for b in BINARIES if not (bin_dir / b).exists()]
    if rc != 0 or missing:
        raise RuntimeError(
            f"scripts/k8s-build failed (rc={rc}, missing={missing}); log {log_path}:\n{tail(log_path)}"
        )
    return bin_dir


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- PKI -------------------------------------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    """A certificate for ``key``: a self-signed CA when ``issuer`` is None, else a server cert signed by it."""
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        usage = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
    else:
        usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    builder = builder.add_extension(usage, critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def write_self_signed(dir_: Path, name: str, hosts: list[str]) -> tuple[Path, Path]:
    """A self-signed server cert + key for ``hosts`` (IPs or DNS names) in ``dir_``; returns (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(f"{name}-ca", key)
    cert = _cert(name, key, (ca, key), _sans(hosts))
    cert_path, key_path = dir_ / f"{name}.crt", dir_ / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_pem_key(key))
    return cert_path, key_path


def _sans(hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for h in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


@dataclass
class Pki:
    """Paths of the cluster's TLS and service-account material."""

    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    sa_key: Path
    sa_pub: Path


def make_pki(dir_: Path) -> Pki:
    """A throwaway CA, an apiserver serving cert (SAN 127.0.0.1 + in-cluster names), a service-account key."""
    dir_.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("loom-test-ca", ca_key)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    hosts = [
        "127.0.0.1",
        "10.96.0.1",
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
    ]
    srv = _cert(
        "kube-apiserver", srv_key, (ca, ca_key), _sans(hosts + ["kubernetes.default.svc.cluster.local"])
    )
    sa_key = ec.generate_private_key(ec.SECP256R1())
    pki = Pki(*(dir_ / n for n in ("ca.crt", "ca.key", "apiserver.crt", "apiserver.key", "sa.key", "sa.pub")))
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.ca_key.write_bytes(_pem_key(ca_key))
    pki.server_cert.write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    pki.server_key.write_bytes(_pem_key(srv_key))
    pki.sa_key.write_bytes(_pem_key(sa_key))
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pki


def write_kubeconfig(
    path: Path, server: str, ca_path: Path, token: str, namespace: str | None = None
) -> Path:
    """A kubeconfig with one cluster/user/context using a bearer token."""
    context: dict[str, Any] = {"cluster": "loom-test", "user": "loom-user"}
    if namespace:
        context["namespace"] = namespace
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "loom-test", "cluster": {"server": server, "certificate-authority": str(ca_path)}}
        ],
        "users": [{"name": "loom-user", "user": {"token": token}}],
        "contexts": [{"name": "loom-test", "context": context}],
        "current-context": "loom-test",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)
    return path


# --- processes -------------------------------------------------------------------------------------------

# The reaper: if the test process dies without cleaning up (SIGKILL, `timeout`), end the registered PIDs.
# A PID counts only while its /proc start time still matches, so a reused PID is never signalled.
REAPER_CODE = r"""
import os, signal, sys, time

def start_time(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None

parent, pidfile = int(sys.argv[1]), sys.argv[2]
parent_start = start_time(parent)
while parent_start is not None and start_time(parent) == parent_start:
    time.sleep(0.5)
try:
    with open(pidfile) as f:
        entries = [line.split() for line in f if line.strip()]
except OSError:
    entries = []
alive = lambda: [int(p) for p, st in entries if start_time(int(p)) == st]
for pid in alive():
    os.kill(pid, signal.SIGTERM)
deadline = time.monotonic() + 5
while alive() and time.monotonic() < deadline:
    time.sleep(0.1)
for pid in alive():
    os.kill(pid, signal.SIGKILL)
"""


def proc_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks), or None if the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Reaper:
    """A watchdog process that ends the registered PIDs when this process dies without cleaning up."""

    def __init__(self, pidfile: Path) -> None:
        self.pidfile = pidfile
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.touch()
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", REAPER_CODE, str(os.getpid()), str(pidfile)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def register(self, pid: int) -> None:
        """Have the reaper end ``pid`` if this process dies first."""
        started = proc_start_time(pid)
        if started is not None:
            with self.pidfile.open("a") as f:
                f.write(f"{pid} {started}\n")

    def close(self) -> None:
        """Normal cleanup happened: end the reaper itself by its PID."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)


class Component:
    """One local server process, in its own session, logging to a file; ended by its PID."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path) -> None:
        self.name, self.argv, self.log_path = name, argv, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to this process by PID (if it still runs)."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def failure(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"{self.name} {what} (pid {self.proc.pid}, rc={self.proc.poll()}); {self.log_path}:\n{tail(self.log_path)}"
        )


def stop_components(components: list[Component], grace: float = 5.0) -> None:
    """SIGTERM all, wait up to ``grace`` seconds in total, SIGKILL the rest (all by PID)."""
    for c in components:
        c.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for c in components:
        try:
            c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.signal(signal.SIGKILL)
            c.proc.wait(timeout=10)


# --- the cluster -----------------------------------------------------------------------------------------


class KubeCluster:
    """A local control plane. Use as a context manager; ``start()``/``stop()`` also work."""

    def __init__(
        self,
        bin_dir: Path | None = None,
        workdir: Path | None = None,
        keep: bool | None = None,
        kwok: bool = True,
        start_timeout: float = 60.0,
    ) -> None:
        self.bin_dir = Path(bin_dir or default_bin_dir())
        self.stages_dir = self.bin_dir.parent / "stages"
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="loom-k8s-"))
        self.keep = bool(os.environ.get("LOOM_K8S_KEEP")) if keep is None else keep
        self.kwok = kwok
        self.start_timeout = start_timeout
        self.admin_token = secrets.token_hex(24)
        self.components: list[Component] = []
        self.ports: dict[str, int] = {}
        self.pki: Pki | None = None
        self.start_seconds: float | None = None
        self.timings: dict[str, float] = {}
        self.reaper: Reaper | None = None

    # -- public properties

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def ca_path(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    @property
    def kubeconfig_path(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    def log_path(self, component: str) -> Path:
        return self.workdir / "logs" / f"{component}.log"

    # -- lifecycle

    def __enter__(self) -> KubeCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> KubeCluster:
        """Start every component and wait until the API serves and the controllers work."""
        t0 = time.monotonic()
        self._check_binaries()
        try:
            self._start()
        except BaseException:
            self.keep = True  # leave the logs for the post-mortem
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _start(self) -> None:
        self.ports = {n: free_port() for n in ("etcd", "etcd_peer", "apiserver", "kcm", "scheduler", "kwok")}
        self.pki = make_pki(self.workdir / "pki")
        (self.workdir / "tokens.csv").write_text(
            f'{self.admin_token},loom-admin,loom-admin,"system:masters"\n'
        )
        write_kubeconfig(self.kubeconfig_path, self.server, self.ca_path, self.admin_token)
        self._spawn("etcd", self._etcd_argv())
        self._spawn("kube-apiserver", self._apiserver_argv())
        self._wait("kube-apiserver /readyz", self._apiserver_ready)
        self._spawn("kube-controller-manager", self._kcm_argv())
        self._spawn("kube-scheduler", self._scheduler_argv())
        if self.kwok:
            self._spawn("kwok", self._kwok_argv())
        self._wait("kube-controller-manager (default ServiceAccount)", self._default_sa_exists)
        self._wait("kube-scheduler /healthz", lambda: self._component_healthy("scheduler"))

    def stop(self) -> None:
        """End every component by PID; remove the workdir unless ``keep`` (or LOOM_K8S_KEEP) is set."""
        # Clients first, etcd last: the apiserver then shuts down without storage errors.
        stop_components([c for c in reversed(self.components) if c.name != "etcd"])
        stop_components([c for c in self.components if c.name == "etcd"])
        self.components = []
        if self.reaper is not None:
            self.reaper.close()
            self.reaper = None
        if self._own_workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- argv builders

    def _bin(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _check_binaries(self) -> None:
        missing = [b for b in BINARIES if not (self.bin_dir / b).exists()]
        if missing:
            raise RuntimeError(f"missing {missing} in {self.bin_dir}: run scripts/k8s-build")

    def _etcd_argv(self) -> list[str]:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd_peer']}"
        argv = [
            self._bin("etcd"),
            "--name=loom",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=loom={peer}",
            "--log-level=warn",
        ]
        if _etcd_supports_no_fsync(self._bin("etcd")):
            argv.append("--unsafe-no-fsync")
        return argv

    def _apiserver_argv(self) -> list[str]:
        assert self.pki is not None
        return [
            self._bin("kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.ports['apiserver']}",
            f"--cert-dir={self.workdir / 'pki'}",
            f"--tls-cert-file={self.pki.server_cert}",
            f"--tls-private-key-file={self.pki.server_key}",
            f"--client-ca-file={self.pki.ca}",
            # A front-proxy CA only so the components' delegated authn finds a complete config (no log noise).
            f"--requestheader-client-ca-file={self.pki.ca}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--token-auth-file={self.workdir / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={self.pki.sa_pub}",
            f"--service-account-signing-key-file={self.pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--endpoint-reconciler-type=none",
            # Reach kubelets (the stand-in's log server) by IP: node names do not resolve here.
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--allow-privileged=true",
            "--profiling=false",
        ]

    def _component_common(self, port_name: str) -> list[str]:
        kc = str(self.kubeconfig_path)
        return [
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.ports[port_name]}",
            "--profiling=false",
        ]

    def _kcm_argv(self) -> list[str]:
        assert self.pki is not None
        return [
            self._bin("kube-controller-manager"),
            *self._component_common("kcm"),
            f"--service-account-private-key-file={self.pki.sa_key}",
            f"--root-ca-file={self.pki.ca}",
            "--use-service-account-credentials=false",
        ]

    def _scheduler_argv(self) -> list[str]:
        return [self._bin("kube-scheduler"), *self._component_common("scheduler")]

    def _kwok_argv(self) -> list[str]:
        stages = self.workdir / "kwok-stages.yaml"
        docs = []
        for rel in KWOK_STAGES:
            path = self.stages_dir / rel
            if not path.exists():
                raise RuntimeError(f"KWOK stage {path} missing: rerun scripts/k8s-build")
            docs.append(path.read_text().strip())
        stages.write_text("\n---\n".join(docs) + "\n")
        key, value = FAKE_NODE_ANNOTATION
        return [
            self._bin("kwok"),
            f"--kubeconfig={self.kubeconfig_path}",
            f"--config={stages}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={key}={value}",
            "--node-ip=127.0.0.1",
            f"--server-address=127.0.0.1:{self.ports['kwok']}",
        ]

    def _spawn(self, name: str, argv: list[str]) -> None:
        if self.reaper is None:
            self.reaper = Reaper(self.workdir / "pids")
        component = Component(name, argv, self.log_path(name), self.workdir)
        self.reaper.register(component.proc.pid)
        self.components.append(component)

    # -- readiness

    def _wait(self, what: str, check: Callable[[], bool]) -> None:
        """Poll ``check`` until true; raise with the failing component's log tail on death or timeout."""
        t0 = time.monotonic()
        deadline = t0 + self.start_timeout
        while True:
            for c in self.components:
                if not c.alive():
                    raise c.failure(f"exited while waiting for {what}")
            if check():
                self.timings[what] = round(time.monotonic() - t0, 2)
                return
            if time.monotonic() > deadline:
                culprit = self.components[-1]
                for c in self.components:
                    if c.name in what:
                        culprit = c
                raise culprit.failure(f"not ready after {self.start_timeout:.0f} s waiting for {what}")
            time.sleep(0.05)

    def _get(self, url: str, context: ssl.SSLContext, token: str | None = None) -> int:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, context=context, timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            return e.code
        except (OSError, ssl.SSLError):
            return 0

    def _apiserver_ready(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        return self._get(f"{self.server}/readyz", ctx, self.admin_token) == 200

    def _component_healthy(self, port_name: str) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return self._get(f"https://127.0.0.1:{self.ports[port_name]}/healthz", ctx) == 200

    def _default_sa_exists(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        url = f"{self.server}/api/v1/namespaces/default/serviceaccounts/default"
        return self._get(url, ctx, self.admin_token) == 200

    # -- API helpers

    def api_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` for the admin kubeconfig."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig_path))

    def core(self) -> Any:
        """A ``CoreV1Api`` on a fresh admin client."""
        from kubernetes import client

        return client.CoreV1Api(self.api_client())

    def create_namespace(self, name: str, timeout: float = 15.0) -> str:
        """Create namespace ``name`` and wait for its ``default`` ServiceAccount (pods need it)."""
        from kubernetes import client

        core = self.core()
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        _wait_until(
            lambda: _exists(lambda: core.read_namespaced_service_account("default", name)),
            timeout,
            f"ServiceAccount {name}/default",
        )
        return name

    def delete_namespace(self, name: str) -> None:
        """Delete a namespace (and so everything in it) without waiting; missing is fine."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.core().delete_namespace(name, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise

    def delete_node(self, name: str) -> None:
        """Delete a Node; the controller-manager's pod GC then removes the pods bound to it."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.core().delete_node(name)
        except ApiException as e:
            if e.status != 404:
                raise

    def add_fake_node(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        taints: list[dict[str, str]] | None = None,
        timeout: float = 15.0,
    ) -> None:
        """Register a Node that KWOK manages (pods on it become Ready without running) and wait until Ready."""
        if not self.kwok:
            raise RuntimeError("this KubeCluster was started without KWOK")
        core = self.core()
        key, value = FAKE_NODE_ANNOTATION
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {key: value, "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    **(labels or {}),
                },
            },
            "spec": {"taints": taints or []},
            "status": {
                "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"},
            },
        }
        core.create_node(body)
        try:
            _wait_until(lambda: node_ready(core, name), timeout, f"fake node {name} Ready")
        except TimeoutError as e:
            kwok = next(c for c in self.components if c.name == "kwok")
            raise kwok.failure(f"did not make node {name} Ready in {timeout:.0f} s") from e

    def token_for(self, namespace: str, service_account: str, expiration_seconds: int = 3600) -> str:
        """Create ServiceAccount ``namespace/service_account`` if missing; return a TokenRequest token for it."""
        from kubernetes import client

        core = self.core()
        if not _exists(lambda: core.read_namespaced_service_account(service_account, namespace)):
            sa = client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=service_account))
            core.create_namespaced_service_account(namespace, sa)
        req = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
        )
        resp = core.create_namespaced_service_account_token(service_account, namespace, req)
        return str(resp.status.token)

    def kubeconfig_for_token(self, token: str, path: Path | str, namespace: str | None = None) -> Path:
        """Write a kubeconfig for this cluster that authenticates with ``token``."""
        return write_kubeconfig(Path(path), self.server, self.ca_path, token, namespace)


def node_ready(core: Any, name: str) -> bool:
    """Whether Node ``name`` exists and its Ready condition is True."""
    try:
        node = core.read_node(name)
    except Exception:  # noqa: BLE001 - not there yet
        return False
    return any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))


def _exists(read: Callable[[], object]) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        read()
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


def _wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


_NO_FSYNC: dict[str, bool] = {}


def _etcd_supports_no_fsync(etcd: str) -> bool:
    """Whether this etcd has ``--unsafe-no-fsync`` (3.5+; Debian's 3.4 lacks it)."""
    if etcd not in _NO_FSYNC:
        out = subprocess.run([etcd, "--help"], capture_output=True, text=True, timeout=30)
        _NO_FSYNC[etcd] = "--unsafe-no-fsync" in (out.stdout + out.stderr)
    return _NO_FSYNC[etcd]
