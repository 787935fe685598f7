"""``KubeletStandIn``: a test stand-in for the kubelet that runs pod commands as local processes.

It registers a Ready Node (heartbeating its Lease and Ready condition), watches the pods bound to it and, for
each container, runs ``command + args`` on this machine with the container's env and mounted files, reporting
phase, readiness, exit codes and restarts back through the API. It also serves container logs over HTTPS on the
node's kubelet port, so ``read_namespaced_pod_log`` works through the apiserver.

How a container maps onto this machine:

- Volumes (ConfigMap, Secret, projected, downwardAPI, emptyDir, PVC as a plain dir) are written under
  ``<workdir>/<ns>_<pod>_<uid8>/volumes/<volume>``; each volumeMount's ``mountPath`` becomes a symlink under the
  container's root ``.../root/<container><mountPath>``. Occurrences of a mountPath inside command, args, env
  values and workingDir are rewritten to that local path, and ``LOOM_K8S_MOUNT_ROOT`` holds the container root,
  so a program can also prefix absolute paths itself.
- ``command[0]`` of ``python``/``python3``/``python3.N`` runs as the ``python`` given (e.g. the test venv's).
- Env: a small allow-list of this process's env (PATH, HOME, LANG, ...), ``extra_env``, HOSTNAME=<pod name>,
  KUBERNETES_SERVICE_HOST/PORT pointing at the real apiserver, then envFrom and env (with ``$(VAR)`` expansion).
  ``status.podIP``/``status.hostIP`` are 127.0.0.1, so pods on this node share ports: use replicas=1 per
  stand-in node, or an ``env_hook``/``port_hook`` to move ports.
- Not supported: images (the image is ignored), init containers, ephemeral containers, resource limits.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.k8s.cluster import K8S_VERSION, Reaper, free_port, write_self_signed

ENV_ALLOWLIST = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME", "SHELL")
PYTHON_NAMES = re.compile(r"python(3(\.\d+)?)?")
VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
EnvHook = Callable[[dict[str, Any], str], dict[str, str]]
PortHook = Callable[[dict[str, Any], int], int]


def now_iso() -> str:
    """Current UTC time in Kubernetes' RFC 3339 form."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    """Current UTC time as a MicroTime (Leases)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ConfigError(Exception):
    """A container's env or volumes cannot be built yet (missing ConfigMap/Secret/key)."""


# --- raw API access (dicts in Kubernetes' own camelCase, no model conversion) ------------------------------


def raw(call: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Call a generated API method without model conversion; raise ApiException on a non-2xx status."""
    from kubernetes.client.exceptions import ApiException

    resp = call(*args, _preload_content=False, **kwargs)
    data = resp.data
    if not 200 <= resp.status < 300:
        raise ApiException(status=resp.status, reason=data.decode(errors="replace")[:500])
    return json.loads(data) if data else {}


def api_status(exc: BaseException) -> int | None:
    """The HTTP status of an ApiException (None for other errors)."""
    return getattr(exc, "status", None)


# --- per-container and per-pod state ---------------------------------------------------------------------


@dataclass
class ProbeState:
    """Counters of one probe of one running container."""

    next_at: float = 0.0
    successes: int = 0
    failures: int = 0
    passed: bool = False


@dataclass
class ContainerRun:
    """One container of a pod: its current process and what to report about it."""

    name: str
    spec: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    started_mono: float = 0.0
    restart_count: int = 0
    attempts: int = 0
    ready: bool = False
    done: bool = False  # terminated for good (restartPolicy says no restart)
    terminated: dict[str, Any] | None = None  # latest termination
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    backoff_until: float = 0.0
    backoff: float = 0.0
    kill_at: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    mounts: dict[str, str] = field(default_factory=dict)
    probes: dict[str, ProbeState] = field(default_factory=dict)


@dataclass
class PodRun:
    """One pod (by uid) on this node."""

    uid: str
    namespace: str
    name: str
    pod: dict[str, Any]
    dir: Path
    containers: dict[str, ContainerRun]
    start_time: str = field(default_factory=now_iso)
    deleting: bool = False
    gone: bool = False  # removed from the API (no final delete needed)
    kill_at: float = 0.0
    pushed: dict[str, Any] | None = None
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)
    finished: bool = False


# --- the stand-in ----------------------------------------------------------------------------------------


class KubeletStandIn:
    """Registers Node ``node_name`` and runs the pods bound to it as local processes (see module docstring)."""

    def __init__(
        self,
        cluster_api_client: Any,
        node_name: str,
        workdir: Path | str,
        python: str | None = None,
        extra_env: dict[str, str] | None = None,
        *,
        labels: dict[str, str] | None = None,
        env_hook: EnvHook | None = None,
        port_hook: PortHook | None = None,
        backoff_initial: float = 1.0,
        backoff_max: float = 10.0,
        heartbeat_interval: float = 5.0,
        probe_period_cap: float | None = None,
    ) -> None:
        import sys

        from kubernetes import client

        self.api = cluster_api_client
        self.core = client.CoreV1Api(cluster_api_client)
        self.coordination = client.CoordinationV1Api(cluster_api_client)
        self.node_name = node_name
        self.workdir = Path(workdir)
        self.python = python or sys.executable
        self.extra_env = dict(extra_env or {})
        self.labels = dict(labels or {})
        self.env_hook, self.port_hook = env_hook, port_hook
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self.heartbeat_interval = heartbeat_interval
        self.probe_period_cap = probe_period_cap
        self.api_host = urlsplit(cluster_api_client.configuration.host)
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._latest: dict[str, dict[str, Any] | None] = {}
        self._runs: dict[str, PodRun] = {}
        self._history: list[PodRun] = []
        self._done: set[str] = set()  # uids finished here: later events about them are ignored
        self._watch_resp: Any = None
        self._threads: list[threading.Thread] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self._next_heartbeat = 0.0
        self._started_iso = now_iso()
        self.log_port = 0
        self.errors: list[str] = []
        self._reaper: Reaper | None = None

    # -- lifecycle

    def __enter__(self) -> KubeletStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> KubeletStandIn:
        """Serve logs, register the Node + Lease, start the watch and sync threads."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._reaper = Reaper(self.workdir / "pids")
        self._start_log_server()
        self._register_node()
        self._renew_lease()
        self._next_heartbeat = time.monotonic() + self.heartbeat_interval
        self._wait_schedulable()
        for name, target in (("watch", self._watch_loop), ("sync", self._sync_loop)):
            t = threading.Thread(target=target, name=f"kubelet-{self.node_name}-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, delete_node: bool = True) -> None:
        """End every container process by PID, stop the threads and the log server; delete the Node."""
        self._stop.set()
        self._wake.set()
        resp = self._watch_resp
        if resp is not None:
            _shutdown(resp)
        for t in self._threads:
            t.join(timeout=10)
        self._threads = []
        with self._lock:
            runs = list(self._runs.values())
        procs = [c.proc for r in runs for c in r.containers.values() if c.proc is not None]
        kill_all(procs, grace=2.0)
        if self._reaper is not None:
            self._reaper.close()
            self._reaper = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if delete_node:
            try:
                self.core.delete_node(self.node_name)
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass

    # -- lookups for tests

    def _find(self, pod_name: str, namespace: str | None) -> PodRun | None:
        """The newest run of pod ``pod_name`` (current or finished)."""
        with self._lock:
            runs = [*self._history, *self._runs.values()]
        for run in reversed(runs):
            if run.name == pod_name and namespace in (None, run.namespace):
                return run
        return None

    def pod_dir(self, pod_name: str, namespace: str | None = None) -> Path | None:
        run = self._find(pod_name, namespace)
        return run.dir if run else None

    def pid(self, pod_name: str, namespace: str | None = None, container: str | None = None) -> int | None:
        """PID of the running process of a pod's container (first container by default)."""
        run = self._find(pod_name, namespace)
        if run is None:
            return None
        cr = run.containers.get(container) if container else next(iter(run.containers.values()), None)
        return cr.proc.pid if cr and cr.proc and cr.proc.poll() is None else None

    def log_path(
        self, pod_name: str, namespace: str | None = None, container: str | None = None, previous: bool = False
    ) -> Path | None:
        """The log file of a container's current (or previous) attempt."""
        run = self._find(pod_name, namespace)
        if run is None:
            return None
        cr = run.containers.get(container) if container else next(iter(run.containers.values()), None)
        if cr is None or cr.attempts == 0:
            return None
        attempt = cr.attempts - (2 if previous else 1)
        return run.dir / "logs" / f"{cr.name}-{attempt}.log" if attempt >= 0 else None

    def logs(
        self, pod_name: str, namespace: str | None = None, container: str | None = None, previous: bool = False
    ) -> str:
        """Text of a container's current (or previous) log ('' if none yet)."""
        path = self.log_path(pod_name, namespace, container, previous)
        return path.read_text(errors="replace") if path and path.exists() else ""

    def describe(self) -> str:
        """A debugging summary: every pod run here, its containers' states, and recent stand-in errors."""
        with self._lock:
            runs = [*self._history, *self._runs.values()]
        lines = [f"stand-in {self.node_name} (workdir {self.workdir}):"]
        for run in runs:
            lines.append(f"  pod {run.namespace}/{run.name} uid={run.uid[:8]} deleting={run.deleting} dir={run.dir}")
            for cr in run.containers.values():
                pid = cr.proc.pid if cr.proc else None
                lines.append(f"    {cr.name}: pid={pid} attempts={cr.attempts} restarts={cr.restart_count} "
                             f"ready={cr.ready} waiting={cr.waiting} terminated={cr.terminated}")
        lines += [f"  error: {e}" for e in self.errors[-10:]]
        return "\n".join(lines)

    # -- node registration and heartbeat

    def _node_status(self) -> dict[str, Any]:
        resources = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"}
        return {
            "capacity": resources,
            "allocatable": resources,
            "conditions": self._node_conditions(),
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_port}},
            "nodeInfo": {
                "machineID": "loom-standin", "systemUUID": "loom-standin", "bootID": "loom-standin",
                "kernelVersion": os.uname().release, "osImage": "loom kubelet stand-in",
                "containerRuntimeVersion": "standin://1", "kubeletVersion": K8S_VERSION,
                "kubeProxyVersion": K8S_VERSION, "operatingSystem": "linux", "architecture": "amd64",
            },
        }

    def _node_conditions(self) -> list[dict[str, str]]:
        now = now_iso()
        conds = [
            ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID"),
            ("Ready", "True", "KubeletReady"),
        ]
        return [
            {"type": t, "status": s, "reason": r, "message": "loom kubelet stand-in",
             "lastHeartbeatTime": now, "lastTransitionTime": self._started_iso}
            for t, s, r in conds
        ]

    def _register_node(self) -> None:
        labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "loom.test/kubelet": "stand-in",
            **self.labels,
        }
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node_name, "labels": labels},
                "status": self._node_status()}
        try:
            raw(self.core.create_node, body)
        except Exception as e:
            if api_status(e) != 409:
                raise
            raw(self.core.patch_node, self.node_name, {"metadata": {"labels": labels}})
        raw(self.core.patch_node_status, self.node_name, {"status": self._node_status()})

    def _wait_schedulable(self, timeout: float = 15.0) -> None:
        """Wait until the Node is Ready and carries no NoSchedule/NoExecute taint of the node controller."""
        deadline = time.monotonic() + timeout
        while True:
            node = raw(self.core.read_node, self.node_name)
            conds = node.get("status", {}).get("conditions") or []
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conds)
            taints = [t for t in node.get("spec", {}).get("taints") or [] if t["key"].startswith("node.kubernetes.io/")]
            if ready and not taints:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {self.node_name} not schedulable after {timeout:.0f} s: {taints or conds}")
            time.sleep(0.05)

    def _renew_lease(self) -> None:
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": 40, "renewTime": micro_now()}
        try:
            raw(self.coordination.patch_namespaced_lease, self.node_name, "kube-node-lease", {"spec": spec})
        except Exception as e:
            if api_status(e) != 404:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.node_name, "namespace": "kube-node-lease"}, "spec": spec}
            raw(self.coordination.create_namespaced_lease, "kube-node-lease", body)

    def _heartbeat(self) -> None:
        if time.monotonic() < self._next_heartbeat:
            return
        self._next_heartbeat = time.monotonic() + self.heartbeat_interval
        try:
            self._renew_lease()
            raw(self.core.patch_node_status, self.node_name, {"status": {"conditions": self._node_conditions()}})
        except Exception as e:  # noqa: BLE001 - keep going; recorded for debugging
            self._error(f"heartbeat: {e}")

    def _error(self, msg: str) -> None:
        self.errors.append(msg)
        del self.errors[:-50]

    # -- watch

    def _watch_loop(self) -> None:
        """List + watch pods bound to this node; hand each change to the sync thread."""
        from kubernetes.watch.watch import iter_resp_lines

        selector = f"spec.nodeName={self.node_name}"
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self._relist(selector)
                self._watch_resp = self.core.list_pod_for_all_namespaces(
                    field_selector=selector, watch=True, resource_version=rv, allow_watch_bookmarks=True,
                    timeout_seconds=300, _preload_content=False,
                )
                if self._watch_resp.status != 200:
                    rv = None
                    continue
                for line in iter_resp_lines(self._watch_resp):
                    rv = self._on_event(json.loads(line), rv)
                    if rv is None or self._stop.is_set():
                        break
            except Exception as e:  # noqa: BLE001 - reconnect after any stream error
                if not self._stop.is_set():
                    self._error(f"watch: {e}")
                    time.sleep(0.5)
                rv = None
            finally:
                stream, self._watch_resp = self._watch_resp, None
                if stream is not None:
                    _shutdown(stream)

    def _relist(self, selector: str) -> str:
        listing = raw(self.core.list_pod_for_all_namespaces, field_selector=selector)
        pods = {p["metadata"]["uid"]: p for p in listing.get("items", [])}
        with self._lock:
            for uid in list(self._latest):
                if uid not in pods:
                    self._latest[uid] = None
            self._latest.update({uid: p for uid, p in pods.items() if uid not in self._done})
        self._wake.set()
        return str(listing["metadata"]["resourceVersion"])

    def _on_event(self, event: dict[str, Any], rv: str | None) -> str | None:
        """Apply one watch event; return the new resourceVersion (None: relist)."""
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            return None
        meta = obj.get("metadata", {})
        if kind != "BOOKMARK":
            with self._lock:
                if meta["uid"] not in self._done:
                    self._latest[meta["uid"]] = None if kind == "DELETED" else obj
            self._wake.set()
        return meta.get("resourceVersion") or rv

    # -- sync loop

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.1)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._heartbeat()
            with self._lock:
                latest = dict(self._latest)
            for uid, pod in latest.items():
                try:
                    self._sync_pod(uid, pod)
                except Exception as e:  # noqa: BLE001 - one bad pod must not stop the others
                    self._error(f"sync {uid}: {type(e).__name__}: {e}")

    def _sync_pod(self, uid: str, pod: dict[str, Any] | None) -> None:
        run = self._runs.get(uid)
        if run is None:
            if pod is None or pod["metadata"].get("deletionTimestamp") and not self._has_started(pod):
                self._forget(uid, pod)
                return
            run = self._new_run(pod)
        if pod is None:
            run.gone = True
        else:
            run.pod = pod
        if run.gone or run.pod["metadata"].get("deletionTimestamp"):
            self._terminate(run)
            return
        for c in run.pod["spec"]["containers"]:
            self._sync_container(run, run.containers[c["name"]])
        self._push_status(run)

    def _has_started(self, pod: dict[str, Any]) -> bool:
        return bool(pod.get("status", {}).get("containerStatuses"))

    def _forget(self, uid: str, pod: dict[str, Any] | None) -> None:
        """A pod deleted before it ever ran here: finalize it and drop it."""
        with self._lock:
            self._latest.pop(uid, None)
            self._done.add(uid)
        if pod is not None:
            self._finalize_delete(pod["metadata"]["namespace"], pod["metadata"]["name"], uid)

    def _new_run(self, pod: dict[str, Any]) -> PodRun:
        meta = pod["metadata"]
        pod_dir = self.workdir / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        (pod_dir / "logs").mkdir(parents=True, exist_ok=True)
        containers = {c["name"]: ContainerRun(c["name"], c) for c in pod["spec"]["containers"]}
        run = PodRun(meta["uid"], meta["namespace"], meta["name"], pod, pod_dir, containers)
        with self._lock:
            self._runs[run.uid] = run
        return run

    # -- containers

    def _sync_container(self, run: PodRun, cr: ContainerRun) -> None:
        now = time.monotonic()
        if cr.proc is not None and cr.proc.poll() is not None:
            self._on_exit(run, cr)
        if cr.proc is None and not cr.done and now >= cr.backoff_until:
            self._start_container(run, cr)
        if cr.proc is not None:
            if cr.kill_at is not None and now >= cr.kill_at:
                signal_proc(cr.proc, signal.SIGKILL)
            elif cr.kill_at is None:
                self._run_probes(run, cr)

    def _on_exit(self, run: PodRun, cr: ContainerRun) -> None:
        assert cr.proc is not None
        code = exit_code(cr.proc.returncode)
        cr.terminated = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": cr.started_at,
            "finishedAt": now_iso(),
            "containerID": f"standin://{cr.proc.pid}",
        }
        ran_for = time.monotonic() - cr.started_mono
        cr.proc, cr.ready, cr.kill_at, cr.probes = None, False, None, {}
        policy = run.pod["spec"].get("restartPolicy", "Always")
        if policy == "Never" or (policy == "OnFailure" and code == 0):
            cr.done, cr.waiting = True, None
            return
        cr.backoff = self.backoff_initial if ran_for > 10 * self.backoff_max or not cr.backoff else min(
            cr.backoff * 2, self.backoff_max)
        cr.backoff_until = time.monotonic() + cr.backoff
        cr.waiting = ("CrashLoopBackOff", f"back-off {cr.backoff:g}s restarting failed container={cr.name}")

    def _start_container(self, run: PodRun, cr: ContainerRun) -> None:
        try:
            self._materialize_volumes(run)
            cr.mounts = self._mount(run, cr)
            cr.env = self._container_env(run, cr)
            argv, cwd = self._argv(run, cr)
            argv = with_pod_hostname(argv, run.pod["metadata"]["name"])
        except ConfigError as e:
            cr.waiting = ("CreateContainerConfigError", str(e))
            cr.backoff_until = time.monotonic() + 1.0
            return
        log_path = run.dir / "logs" / f"{cr.name}-{cr.attempts}.log"
        with log_path.open("ab") as log:
            try:
                cr.proc = subprocess.Popen(
                    argv, env=cr.env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as e:
                log.write(f"stand-in: cannot start {argv!r}: {e}\n".encode())
                cr.waiting = ("RunContainerError", str(e))
                cr.backoff_until = time.monotonic() + 1.0
                return
        if self._reaper is not None:
            self._reaper.register(cr.proc.pid)
        if cr.attempts > 0:
            cr.restart_count += 1
        cr.attempts += 1
        cr.started_at, cr.started_mono, cr.waiting = now_iso(), time.monotonic(), None
        cr.ready = not (cr.spec.get("readinessProbe") or cr.spec.get("startupProbe"))

    def _argv(self, run: PodRun, cr: ContainerRun) -> tuple[list[str], str]:
        spec = cr.spec
        if not spec.get("command"):
            raise ConfigError(f"container {cr.name}: the stand-in needs an explicit command (images are ignored)")
        argv = [self._rewrite(cr, expand_vars(a, cr.env)) for a in [*spec["command"], *spec.get("args", [])]]
        if PYTHON_NAMES.fullmatch(os.path.basename(argv[0])):
            argv[0] = self.python
        root = run.dir / "root" / cr.name
        cwd = Path(self._rewrite(cr, spec["workingDir"])) if spec.get("workingDir") else root
        if not cwd.exists():
            cwd = root / str(spec.get("workingDir", "")).lstrip("/")
            cwd.mkdir(parents=True, exist_ok=True)
        return argv, str(cwd)

    # -- env

    def _container_env(self, run: PodRun, cr: ContainerRun) -> dict[str, str]:
        pod = run.pod
        base = {k: os.environ[k] for k in ENV_ALLOWLIST if k in os.environ}
        base.update(self.extra_env)
        base.update({
            "HOSTNAME": run.name,
            "KUBERNETES_SERVICE_HOST": self.api_host.hostname or "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.api_host.port or 443),
            "LOOM_K8S_MOUNT_ROOT": str(run.dir / "root" / cr.name),
            "LOOM_K8S_POD_DIR": str(run.dir),
        })
        env = dict(base)
        ns = run.namespace
        for src in cr.spec.get("envFrom", []):
            prefix = src.get("prefix", "")
            ref = src.get("configMapRef") or src.get("secretRef") or {}
            data = self._object_data("secret" if "secretRef" in src else "configmap", ns, ref["name"],
                                     ref.get("optional", False))
            env.update({prefix + k: v for k, v in data.items()})
        for item in cr.spec.get("env", []):
            if "valueFrom" in item:
                value = self._value_from(pod, item["valueFrom"])
                if value is None:
                    continue
            else:
                value = expand_vars(item.get("value", ""), env)
            env[item["name"]] = value
        if self.env_hook is not None:
            env.update(self.env_hook(pod, cr.name))
        # Only the container's own values get mount paths rewritten, never this machine's PATH & co.
        return {k: v if base.get(k) == v else self._rewrite(cr, v) for k, v in env.items()}

    def _value_from(self, pod: dict[str, Any], source: dict[str, Any]) -> str | None:
        ns = pod["metadata"]["namespace"]
        for kind, key in (("secret", "secretKeyRef"), ("configmap", "configMapKeyRef")):
            if key in source:
                ref = source[key]
                data = self._object_data(kind, ns, ref["name"], ref.get("optional", False))
                if ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    raise ConfigError(f"key {ref['key']!r} not in {kind} {ns}/{ref['name']}")
                return data[ref["key"]]
        if "fieldRef" in source:
            return field_value(pod, source["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in source:
            return "0"
        return None

    def _object_data(self, kind: str, ns: str, name: str, optional: bool) -> dict[str, str]:
        """A ConfigMap's or Secret's data as text (Secret values decoded); {} when missing and optional."""
        read = self.core.read_namespaced_secret if kind == "secret" else self.core.read_namespaced_config_map
        try:
            obj = raw(read, name, ns)
        except Exception as e:
            if api_status(e) == 404:
                if optional:
                    return {}
                raise ConfigError(f"{kind} {ns}/{name} not found") from e
            raise
        if kind == "secret":
            return {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
        return {**(obj.get("data") or {}), **{k: base64.b64decode(v).decode(errors="replace")
                                              for k, v in (obj.get("binaryData") or {}).items()}}

    def _object_bytes(self, kind: str, ns: str, name: str, optional: bool) -> dict[str, bytes]:
        """A ConfigMap's or Secret's data as bytes (for volume files)."""
        return {k: v.encode() for k, v in self._object_data(kind, ns, name, optional).items()}

    # -- volumes and mounts

    def _materialize_volumes(self, run: PodRun) -> None:
        """(Re)write every volume of the pod under ``<pod dir>/volumes``."""
        for vol in run.pod["spec"].get("volumes", []):
            target = run.dir / "volumes" / vol["name"]
            if "emptyDir" in vol:
                target.mkdir(parents=True, exist_ok=True)
            elif "persistentVolumeClaim" in vol:
                claim = self.workdir / "pvc" / run.namespace / vol["persistentVolumeClaim"]["claimName"]
                claim.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.symlink_to(claim, target_is_directory=True)
            elif "hostPath" in vol:
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.symlink_to(vol["hostPath"]["path"])
            else:
                write_files(target, self._volume_files(run, vol))

    def _volume_files(self, run: PodRun, vol: dict[str, Any]) -> dict[str, bytes]:
        """Files (relative path -> content) of a ConfigMap/Secret/projected/downwardAPI volume."""
        if "configMap" in vol:
            return self._keyed_files("configmap", run.namespace, vol["configMap"])
        if "secret" in vol:
            src = {**vol["secret"], "name": vol["secret"]["secretName"]}
            return self._keyed_files("secret", run.namespace, src)
        if "downwardAPI" in vol:
            return self._downward_files(run.pod, vol["downwardAPI"].get("items", []))
        if "projected" in vol:
            files: dict[str, bytes] = {}
            for source in vol["projected"].get("sources", []):
                files.update(self._projected_files(run, source))
            return files
        return {}

    def _keyed_files(self, kind: str, ns: str, src: dict[str, Any]) -> dict[str, bytes]:
        data = self._object_bytes(kind, ns, src["name"], src.get("optional", False))
        items = src.get("items")
        if not items:
            return data
        out = {}
        for item in items:
            if item["key"] not in data:
                if src.get("optional"):
                    continue
                raise ConfigError(f"key {item['key']!r} not in {kind} {ns}/{src['name']}")
            out[item["path"]] = data[item["key"]]
        return out

    def _downward_files(self, pod: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, bytes]:
        return {i["path"]: (field_value(pod, i["fieldRef"]["fieldPath"]) or "").encode()
                for i in items if "fieldRef" in i}

    def _projected_files(self, run: PodRun, source: dict[str, Any]) -> dict[str, bytes]:
        if "configMap" in source:
            return self._keyed_files("configmap", run.namespace, source["configMap"])
        if "secret" in source:
            return self._keyed_files("secret", run.namespace, source["secret"])
        if "downwardAPI" in source:
            return self._downward_files(run.pod, source["downwardAPI"].get("items", []))
        if "serviceAccountToken" in source:
            sat = source["serviceAccountToken"]
            return {sat["path"]: self._sa_token(run, sat).encode()}
        return {}

    def _sa_token(self, run: PodRun, sat: dict[str, Any]) -> str:
        sa = run.pod["spec"].get("serviceAccountName") or "default"
        spec: dict[str, Any] = {
            "audiences": [sat["audience"]] if sat.get("audience") else [],
            "expirationSeconds": sat.get("expirationSeconds", 3600),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": run.name, "uid": run.uid},
        }
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        try:
            out = raw(self.core.create_namespaced_service_account_token, sa, run.namespace, body)
        except Exception as e:  # noqa: BLE001 - surfaces as a waiting reason, retried
            raise ConfigError(f"token for ServiceAccount {run.namespace}/{sa}: {e}") from e
        return str(out["status"]["token"])

    def _mount(self, run: PodRun, cr: ContainerRun) -> dict[str, str]:
        """Symlink each volumeMount under the container root; return mountPath -> local path."""
        root = run.dir / "root" / cr.name
        mounts: dict[str, str] = {}
        for m in cr.spec.get("volumeMounts", []):
            source = run.dir / "volumes" / m["name"]
            if m.get("subPath"):
                source = source / m["subPath"]
            link = root / m["mountPath"].lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                if link.is_symlink():
                    link.unlink()
                else:
                    shutil.rmtree(link)
            link.symlink_to(source)
            mounts[m["mountPath"].rstrip("/") or "/"] = str(link)
        return mounts

    def _rewrite(self, cr: ContainerRun, text: str) -> str:
        """Replace mountPath prefixes in ``text`` with their local paths (longest first, path boundaries only)."""
        if not cr.mounts or not text:
            return text
        alternatives = "|".join(re.escape(p) for p in sorted(cr.mounts, key=len, reverse=True))
        pattern = re.compile(rf"(?<![\w.\-/])({alternatives})(?=$|/|[^\w.\-])")
        return pattern.sub(lambda m: cr.mounts[m.group(1)], text)

    # -- probes

    def _run_probes(self, run: PodRun, cr: ContainerRun) -> None:
        startup = cr.spec.get("startupProbe")
        if startup and not cr.probes.get("startup", ProbeState()).passed:
            self._probe_step(run, cr, "startup", startup)
            return
        for kind in ("liveness", "readiness"):
            spec = cr.spec.get(f"{kind}Probe")
            if spec:
                self._probe_step(run, cr, kind, spec)

    def _probe_step(self, run: PodRun, cr: ContainerRun, kind: str, spec: dict[str, Any]) -> None:
        state = cr.probes.setdefault(kind, ProbeState(next_at=cr.started_mono + spec.get("initialDelaySeconds", 0)))
        now = time.monotonic()
        if now < state.next_at:
            return
        period = float(spec.get("periodSeconds", 10))
        if self.probe_period_cap is not None:
            period = min(period, self.probe_period_cap)
        state.next_at = now + period
        if self._probe(run, cr, spec):
            state.failures, state.successes = 0, state.successes + 1
            threshold = spec.get("successThreshold", 1) if kind == "readiness" else 1
            state.passed = state.passed or state.successes >= threshold
        else:
            state.successes, state.failures = 0, state.failures + 1
            if state.failures >= spec.get("failureThreshold", 3):
                state.passed = False
                if kind != "readiness":
                    self._kill_container(run, cr)
        if kind == "readiness":
            cr.ready = state.passed
        elif kind == "startup" and state.passed:
            cr.ready = not cr.spec.get("readinessProbe")

    def _kill_container(self, run: PodRun, cr: ContainerRun) -> None:
        """Liveness/startup failure: SIGTERM now, SIGKILL after the grace period; the restart follows."""
        assert cr.proc is not None
        grace = run.pod["spec"].get("terminationGracePeriodSeconds", 30)
        signal_proc(cr.proc, signal.SIGTERM)
        cr.kill_at = time.monotonic() + grace
        cr.ready = False

    def _probe(self, run: PodRun, cr: ContainerRun, spec: dict[str, Any]) -> bool:
        timeout = float(spec.get("timeoutSeconds", 1))
        if "httpGet" in spec:
            return self._http_probe(run, cr, spec["httpGet"], timeout)
        if "tcpSocket" in spec:
            port = self._port(run, cr, spec["tcpSocket"]["port"])
            try:
                socket.create_connection((spec["tcpSocket"].get("host") or "127.0.0.1", port), timeout).close()
                return True
            except OSError:
                return False
        if "exec" in spec:
            argv = [self._rewrite(cr, a) for a in spec["exec"]["command"]]
            if PYTHON_NAMES.fullmatch(os.path.basename(argv[0])):
                argv[0] = self.python
            try:
                return subprocess.run(argv, env=cr.env, capture_output=True, timeout=timeout).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                return False
        return True  # grpc and unknown probe kinds: assume healthy

    def _http_probe(self, run: PodRun, cr: ContainerRun, get: dict[str, Any], timeout: float) -> bool:
        port = self._port(run, cr, get["port"])
        scheme = str(get.get("scheme", "HTTP")).lower()
        path = get.get("path", "/")
        if not path.startswith("/"):
            path = "/" + path
        url = f"{scheme}://{get.get('host') or '127.0.0.1'}:{port}{path}"
        headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
        ctx = ssl._create_unverified_context() if scheme == "https" else None  # noqa: S323 - kubelet skips TLS checks too
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout,
                                        context=ctx) as resp:
                return 200 <= resp.status < 400
        except urllib.error.HTTPError as e:
            return 200 <= e.code < 400
        except (OSError, ValueError):
            return False

    def _port(self, run: PodRun, cr: ContainerRun, port: int | str) -> int:
        """A probe's port: a number, or a container port's name; then ``port_hook``."""
        if isinstance(port, str) and not port.isdigit():
            named = [p["containerPort"] for p in cr.spec.get("ports", []) if p.get("name") == port]
            number = named[0] if named else 0
        else:
            number = int(port)
        return self.port_hook(run.pod, number) if self.port_hook else number

    # -- termination

    def _terminate(self, run: PodRun) -> None:
        """Graceful stop for a deleted pod: SIGTERM, SIGKILL after the grace period, then delete it for good."""
        now = time.monotonic()
        if not run.deleting:
            run.deleting = True
            meta, spec = run.pod["metadata"], run.pod["spec"]
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = spec.get("terminationGracePeriodSeconds", 30)
            run.kill_at = now + (0 if run.gone else float(grace))
            for cr in run.containers.values():
                cr.backoff_until, cr.done, cr.ready = float("inf"), True, False
                if cr.proc is not None:
                    signal_proc(cr.proc, signal.SIGTERM)
        running = [cr for cr in run.containers.values() if cr.proc is not None]
        for cr in running:
            if cr.proc is not None and cr.proc.poll() is not None:
                self._on_exit(run, cr)
                cr.done, cr.waiting = True, None
            elif cr.proc is not None and now >= run.kill_at:
                signal_proc(cr.proc, signal.SIGKILL)
        if any(cr.proc is not None for cr in run.containers.values()):
            return
        if not run.gone:
            self._push_status(run)
            self._finalize_delete(run.namespace, run.name, run.uid)
        with self._lock:
            self._runs.pop(run.uid, None)
            self._latest.pop(run.uid, None)
            self._done.add(run.uid)
            self._history.append(run)
        run.finished = True

    def _finalize_delete(self, ns: str, name: str, uid: str) -> None:
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        try:
            raw(self.core.delete_namespaced_pod, name, ns, grace_period_seconds=0, body=body)
        except Exception as e:
            if api_status(e) not in (404, 409):
                raise

    # -- status

    def _push_status(self, run: PodRun) -> None:
        status = self._pod_status(run)
        if status == run.pushed:
            return
        try:
            raw(self.core.patch_namespaced_pod_status, run.name, run.namespace, {"status": status})
            run.pushed = status
        except Exception as e:
            if api_status(e) != 404:
                raise

    def _pod_status(self, run: PodRun) -> dict[str, Any]:
        crs = [run.containers[c["name"]] for c in run.pod["spec"]["containers"]]
        phase = pod_phase(crs)
        ready = phase == "Running" and all(cr.ready for cr in crs) and not run.deleting
        conds = {
            "PodReadyToStartContainers": "True",
            "Initialized": "True",
            "ContainersReady": str(ready),
            "Ready": str(ready),
            "PodScheduled": "True",
        }
        return {
            "phase": phase,
            "conditions": [self._condition(run, t, s) for t, s in conds.items()],
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": run.start_time,
            "containerStatuses": [container_status(cr) for cr in crs],
        }

    def _condition(self, run: PodRun, ctype: str, status: str) -> dict[str, str]:
        prev = run.transitions.get(ctype)
        if prev is None or prev[0] != status:
            prev = run.transitions[ctype] = (status, now_iso())
        return {"type": ctype, "status": status, "lastTransitionTime": prev[1]}

    # -- log server

    def _start_log_server(self) -> None:
        """Serve ``/containerLogs/<ns>/<pod>/<container>`` over HTTPS (the apiserver skips kubelet TLS checks)."""
        cert, key = write_self_signed(self.workdir, "kubelet", ["127.0.0.1", "localhost"])
        standin = self

        class Handler(LogHandler):
            kubelet = standin

        self.log_port = free_port()
        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.log_port), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        server.daemon_threads = True
        self._server = server
        t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                             name=f"kubelet-{self.node_name}-logs")
        t.start()


class LogHandler(http.server.BaseHTTPRequestHandler):
    """The kubelet's container-log endpoint: tailLines, limitBytes, previous and follow."""

    kubelet: KubeletStandIn

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        parts = urlsplit(self.path)
        segs = parts.path.strip("/").split("/")
        if segs == ["healthz"]:
            return self._reply(200, b"ok")
        if len(segs) != 4 or segs[0] != "containerLogs":
            return self._reply(404, b"not found")
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        ns, pod, container = segs[1:]
        previous = q.get("previous") == "true"
        path = self.kubelet.log_path(pod, ns, container, previous)
        if path is None or not path.exists():
            return self._reply(404, f"no logs for {ns}/{pod}/{container}".encode())
        data = select_log(path.read_bytes(), q.get("tailLines"), q.get("limitBytes"))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(data)
        if q.get("follow") == "true" and not previous:
            self._follow(path, pod, ns, container, path.stat().st_size)

    def _follow(self, path: Path, pod: str, ns: str, container: str, offset: int) -> None:
        """Stream appended bytes until the container's process ends (or the client goes away)."""
        try:
            while True:
                running = self.kubelet.pid(pod, ns, container) is not None
                with path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                if chunk:
                    offset += len(chunk)
                    self.wfile.write(chunk)
                    self.wfile.flush()
                elif not running or self.kubelet.log_path(pod, ns, container) != path:
                    return
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            return

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


# --- helpers ---------------------------------------------------------------------------------------------


def select_log(data: bytes, tail_lines: str | None, limit_bytes: str | None) -> bytes:
    """Apply ``tailLines`` then ``limitBytes`` like the kubelet does."""
    if tail_lines is not None:
        n = int(tail_lines)
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[-n:]) if n > 0 else b""
    if limit_bytes is not None:
        data = data[: int(limit_bytes)]
    return data


def container_status(cr: ContainerRun) -> dict[str, Any]:
    """A ContainerStatus for ``cr``."""
    if cr.proc is not None:
        state: dict[str, Any] = {"running": {"startedAt": cr.started_at}}
    elif cr.done and cr.terminated:
        state = {"terminated": cr.terminated}
    else:
        reason, message = cr.waiting or ("ContainerCreating", "")
        state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
    last = {"terminated": cr.terminated} if cr.terminated and "terminated" not in state else {}
    return {
        "name": cr.name,
        "image": cr.spec.get("image", ""),
        "imageID": "",
        "containerID": f"standin://{cr.proc.pid}" if cr.proc is not None else "",
        "ready": cr.ready and cr.proc is not None,
        "started": cr.proc is not None,
        "restartCount": cr.restart_count,
        "state": state,
        "lastState": last,
    }


def pod_phase(crs: list[ContainerRun]) -> str:
    """Pending until every container started once; Succeeded/Failed when all are done for good."""
    if crs and all(cr.done for cr in crs):
        return "Succeeded" if all((cr.terminated or {}).get("exitCode") == 0 for cr in crs) else "Failed"
    if all(cr.attempts > 0 for cr in crs):
        return "Running"
    return "Pending"


def field_value(pod: dict[str, Any], path: str) -> str | None:
    """A downward-API fieldPath of ``pod`` (pod and host IPs are 127.0.0.1)."""
    meta, spec = pod["metadata"], pod["spec"]
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": "127.0.0.1",
        "status.podIPs": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
    }
    if path in simple:
        return simple[path]
    m = re.fullmatch(r"metadata\.(labels|annotations)(?:\['(.+)'\])?", path)
    if m:
        values = meta.get(m.group(1)) or {}
        if m.group(2) is not None:
            return values.get(m.group(2))
        return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
    return None


def expand_vars(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined names are replaced, ``$$`` is a literal ``$``."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return VAR_REF.sub(sub, text)


def write_files(target: Path, files: dict[str, bytes]) -> None:
    """Replace directory ``target`` with exactly ``files`` (written to a temp dir, then swapped in)."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, content in files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def with_pod_hostname(argv: list[str], hostname: str) -> list[str]:
    """*argv* run in a UTS namespace of its own whose host name is the pod's, as in a real pod (a job
    names its host in what it reports, e.g. its consumer-group fence). ``unshare`` and ``sh`` exec in
    place, so the PID is the program's. Needs root; without it the machine's host name shows through."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        return argv
    return [unshare, "--uts", "sh", "-c", 'hostname "$1" && shift && exec "$@"', "sh", hostname, *argv]


def exit_code(returncode: int) -> int:
    """A container exit code: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def signal_proc(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the process group we started (its id is the process's PID)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(proc.pid, sig)


def kill_all(procs: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM each process group by PID, wait up to ``grace`` s in total, then SIGKILL."""
    for p in procs:
        signal_proc(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_proc(p, signal.SIGKILL)
            p.wait(timeout=10)


def _shutdown(resp: Any) -> None:
    """Interrupt a streaming urllib3 response from another thread."""
    for name in ("shutdown", "close", "release_conn"):
        try:
            getattr(resp, name)()
        except Exception:  # noqa: BLE001 - best effort
            pass
