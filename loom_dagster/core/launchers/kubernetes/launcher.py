"""``KubernetesLauncher``: runs a flow's job as a StatefulSet, its state kept in the cluster.

Lifecycle (the deployer's, the same as for the local launcher): stop = scale to zero and wait until
every pod is gone (SIGTERM -> the runtime drains within the grace period); launch = apply the new
template with ``replicas`` = processes; the health gate waits for ready pods of the new revision; a
failed gate stops the new pods and applies the previous deployment's template again.

Health comes from the API: pod phase, readiness (the runtime's ``/readyz``: connected), restart counts,
waiting reasons (``CrashLoopBackOff``, ``ImagePullBackOff``) and the last termination (exit code,
``OOMKilled``). Kubernetes restarts crashed containers itself (``JobReport.self_healing``); only a job
Kubernetes cannot recover (its StatefulSet deleted out of band) is relaunched by the health sensor.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec

from loom_dagster.core.deploy.launch_records import (
    JobProcess,
    JobReport,
    JobState,
    LaunchedJob,
    LaunchRequest,
)
from loom_dagster.core.deploy.store import DeploymentStore
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.job.status import EXIT_BAD_INPUT, describe_exit_code
from loom_dagster.core.launchers.base import Launcher
from loom_dagster.core.launchers.kubernetes.client import KubeApi, api_error, is_conflict, is_not_found
from loom_dagster.core.launchers.kubernetes.manifests import (
    CONTAINER,
    EVERY_FLOW,
    INSTANCE_LABEL,
    flow_manifests,
    label_selector,
    preflight_pod_manifest,
    selector_labels,
    workload_name,
)
from loom_dagster.core.launchers.kubernetes.settings import KubernetesSettings, PodSettings
from loom_dagster.core.launchers.preflight import failure_detail
from loom_dagster.core.redact import LineRedactor, redact_text

BROKEN_WAITING_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "InvalidImageName",
    }
)
"""Waiting reasons that mean the container will not run without a change (or keeps crashing)."""


class KubernetesLauncher(Launcher):
    """Runs each flow as a StatefulSet in one namespace; records, snapshots and locks in the cluster.

    Built from JSON-safe keyword arguments (:class:`KubernetesSettings`), e.g. a resource's
    ``launcher: kubernetes`` with ``launcher_config: {namespace: streaming, pod: {image: ...}}``.

    Example:
        >>> launcher = KubernetesLauncher(namespace="streaming", pod={"image": "flows:1"})
        >>> launcher.settings.pod_for("orders").image
        'flows:1'
    """

    name = "kubernetes"

    def __init__(self, **config: Any) -> None:
        try:
            self.settings = KubernetesSettings.from_config(config)
        except Exception as exc:  # msgspec.ValidationError: names the field
            raise DeploymentError(f"kubernetes launcher config: {exc}") from exc
        self._api: KubeApi | None = None
        self._observed = threading.local()

    @property
    def api(self) -> KubeApi:
        """The API client, connected on first use (building the launcher needs no cluster)."""
        if self._api is None:
            self._api = KubeApi.connect(self.settings)
        return self._api

    def config(self) -> dict[str, Any]:
        """The keyword arguments that build this launcher again (recorded with each deployment)."""
        return self.settings.to_config()

    def deployment_store(self, state_dir: str | None = None) -> DeploymentStore:
        """Records, config snapshots and the deploy lock in the launcher's namespace."""
        from loom_dagster.core.launchers.kubernetes.store import KubernetesDeploymentStore

        return KubernetesDeploymentStore(self.settings, self.api, state_dir)

    def owns(self, job: LaunchedJob) -> bool:
        """True for a job of this launcher's namespace (the API reaches it from anywhere)."""
        return job.launcher == self.name and job.extra.get("namespace") == self.settings.namespace

    def location(self) -> str:
        """``namespace '<ns>'``."""
        return f"namespace {self.settings.namespace!r}"

    # -- lifecycle ----------------------------------------------------------------------------------

    def manifests(self, request: LaunchRequest, pod: PodSettings | None = None) -> list[dict[str, Any]]:
        """The objects ``launch`` applies for *request* (the config ConfigMap exists already); *pod*
        replaces the flow's pod settings (a recorded job started again as it was)."""
        settings = self.settings
        if pod is not None:
            settings = msgspec.structs.replace(settings, flows={**settings.flows, request.flow_name: pod})
        return flow_manifests(settings, request)

    def launch(self, request: LaunchRequest, log_dir: str) -> LaunchedJob:
        """Apply the flow's env Secret, the Service (multi-process jobs) and the StatefulSet with the new
        template; the job's request comes back with its env values replaced by the Secret's name."""
        return self._apply(request, self.settings.pod_for(request.flow_name))

    def relaunch(self, job: LaunchedJob, log_dir: str) -> LaunchedJob:
        """Apply the recorded job's own template again (its pod settings as recorded, not today's), once
        its seal proves a deploy of this installation recorded them (:meth:`verify_record`)."""
        self.verify_record(job)
        recorded = job.extra.get("pod")
        pod = msgspec.convert(recorded, PodSettings) if recorded else self.settings.pod_for(job.flow_name)
        return self._apply(job.request, pod)

    def verify_record(self, job: LaunchedJob) -> None:
        """Refuse a recorded job whose seal (``store.seal_job``: an HMAC under the installation's key of
        its pod settings and request) does not match: the state ConfigMap was edited, or an older
        version wrote it. ``DeploymentError`` naming what changed; nothing is started."""
        from loom_dagster.core.launchers.kubernetes.store import KubernetesDeploymentStore, check_seal

        check_seal(job, self.settings, KubernetesDeploymentStore(self.settings, self.api))

    def _apply(self, request: LaunchRequest, pod: PodSettings) -> LaunchedJob:
        from loom_dagster.core.launchers.kubernetes.store import seal_job

        request = self._env_in_secret(request)  # the template references it
        name = workload_name(self.settings, request.flow_name)
        generation = 0
        for manifest in self.manifests(request, pod):
            if manifest["kind"] == "Service":
                self._apply_service(manifest)
            elif manifest["kind"] == "NetworkPolicy":
                self._apply_network_policy(manifest)
            elif manifest["kind"] == "StatefulSet":
                generation = self._apply_statefulset(manifest)
        job = LaunchedJob(
            flow_name=request.flow_name,
            launcher=self.name,
            host=f"{self.settings.namespace}/{name}",
            processes=tuple(
                JobProcess(pid=0, start_ticks=0, process_id=i, host=f"{name}-{i}")
                for i in range(request.processes)
            ),
            log_path=f"kubernetes:{self.settings.namespace}/statefulset/{name}",
            started_at=time.time(),
            request=request,
            extra={
                "namespace": self.settings.namespace,
                "statefulset": name,
                "generation": generation,
                "pod": msgspec.to_builtins(pod),
            },
        )
        return seal_job(job)  # a relaunch applies it only with this seal (records grant nothing)

    def _apply_service(self, manifest: dict[str, Any]) -> None:
        name = manifest["metadata"]["name"]
        try:
            self.api.core.create_namespaced_service(self.settings.namespace, manifest)
        except Exception as exc:
            if getattr(exc, "status", None) != 409:
                raise api_error(exc, f"create Service {name!r}") from exc

    def _apply_network_policy(self, manifest: dict[str, Any]) -> None:
        """Create the flow's NetworkPolicy, or replace it (the Bytewax rule depends on the processes)."""
        name, namespace = manifest["metadata"]["name"], self.settings.namespace
        networking = self.api.networking
        try:
            networking.create_namespaced_network_policy(namespace, manifest)
        except Exception as exc:
            if not is_conflict(exc):
                raise api_error(exc, f"create NetworkPolicy {name!r}") from exc
            try:
                networking.replace_namespaced_network_policy(name, namespace, manifest)
            except Exception as exc2:
                raise api_error(exc2, f"replace NetworkPolicy {name!r}") from exc2

    def _apply_statefulset(self, manifest: dict[str, Any]) -> int:
        """Create or replace the StatefulSet; return the generation the gate must see observed."""
        name = manifest["metadata"]["name"]
        namespace = self.settings.namespace
        try:
            current = self.api.apps.read_namespaced_stateful_set(name, namespace)
        except Exception as exc:
            if not is_not_found(exc):
                raise api_error(exc, f"read StatefulSet {name!r}") from exc
            current = None
        try:
            if current is None:
                created = self.api.apps.create_namespaced_stateful_set(namespace, manifest)
            else:
                manifest["metadata"]["resourceVersion"] = current.metadata.resource_version
                created = self.api.apps.replace_namespaced_stateful_set(name, namespace, manifest)
        except Exception as exc:
            raise api_error(exc, f"apply StatefulSet {name!r}") from exc
        return int(created.metadata.generation or 0)

    def stop(self, job: LaunchedJob, timeout_s: float) -> float:
        """Scale to zero (the pods get SIGTERM and drain), wait for every pod to go; past *timeout_s*
        (plus the pods' own grace), delete what is left without grace."""
        started = time.monotonic()
        name = _workload(job)
        if name != workload_name(self.settings, job.flow_name):
            self.verify_record(job)  # a record naming another StatefulSet must prove it was deployed so
        try:
            self.api.apps.patch_namespaced_stateful_set_scale(
                name, self.settings.namespace, {"spec": {"replicas": 0}}
            )
        except Exception as exc:
            if not is_not_found(exc):
                raise api_error(exc, f"scale StatefulSet {name!r} to zero") from exc
        deadline = started + timeout_s + 15
        while time.monotonic() < deadline:
            if not self._pods(job.flow_name):
                return time.monotonic() - started
            time.sleep(0.2)
        for pod in self._pods(job.flow_name):
            try:
                self.api.core.delete_namespaced_pod(
                    pod.metadata.name, self.settings.namespace, grace_period_seconds=0
                )
            except Exception as exc:
                if not is_not_found(exc):
                    raise api_error(exc, f"delete pod {pod.metadata.name!r}") from exc
        while self._pods(job.flow_name):
            if time.monotonic() > deadline + 30:
                raise DeploymentError(f"pods of flow {job.flow_name!r} survived a delete without grace")
            time.sleep(0.2)
        return time.monotonic() - started

    def preflight(self, request: LaunchRequest, timeout_s: float) -> str:
        """Run the new version's preflight in a one-off pod of the NEW template before anything is
        drained: the image pulls, the code imports, compiles and prepares, and the brokers answer from a
        pod. A bad image, an import error, an unschedulable template or *timeout_s* fails the deploy with
        the reason and the pod's log tail; the pod is deleted either way."""
        started = time.monotonic()
        request = self._env_in_secret(request)
        name = f"{workload_name(self.settings, request.flow_name)[:44]}-preflight-{secrets.token_hex(3)}"
        manifest = preflight_pod_manifest(
            self.settings, request, name, timeout_s, connect_timeout_s=min(15.0, timeout_s / 4)
        )
        image = manifest["spec"]["containers"][0]["image"]
        try:
            self.api.core.create_namespaced_pod(self.settings.namespace, manifest)
        except Exception as exc:
            refusal = _pod_security_refusal(exc)
            if refusal:
                raise DeploymentError(
                    f"the namespace {self.settings.namespace!r} refuses the new pod template of flow "
                    f"{request.flow_name!r} (Pod Security admission): {refusal}. Nothing was stopped or "
                    "changed. Remove what weakens the pod from the launcher's pod settings "
                    "(security_context, container_security_context) or deploy to a namespace whose "
                    "pod-security.kubernetes.io/enforce level allows it."
                ) from exc
            raise api_error(exc, f"create the preflight pod of flow {request.flow_name!r}") from exc
        try:
            outcome = self._await_preflight(name, started + timeout_s)
        finally:
            with contextlib.suppress(Exception):  # gone already, or the API is away: it has a deadline
                self.api.core.delete_namespaced_pod(name, self.settings.namespace, grace_period_seconds=0)
        took = time.monotonic() - started
        if outcome is not None:
            raise DeploymentError(
                f"the new version of flow {request.flow_name!r} fails its preflight in pod {name} (image "
                f"{image}) after {took:.1f} s; nothing was stopped or changed: {outcome}"
            )
        return (
            f"pod {name} of the new template (image {image}) imported, compiled and prepared the new "
            f"version and reached its Kafka brokers in {took:.1f} s"
        )

    def _env_in_secret(self, request: LaunchRequest) -> LaunchRequest:
        from loom_dagster.core.launchers.kubernetes.store import env_in_secret

        return env_in_secret(self.api, self.settings, request)

    def _await_preflight(self, name: str, deadline: float) -> str | None:
        """``None`` once the preflight pod succeeds; else why it cannot (read from the real pod status)."""
        last = "it was never scheduled"
        while True:
            try:
                pod = self.api.core.read_namespaced_pod(name, self.settings.namespace)
            except Exception as exc:
                raise api_error(exc, f"read the preflight pod {name!r}") from exc
            verdict, last = _preflight_verdict(pod, last)
            if verdict == "ok":
                return None
            if verdict == "failed":
                return self._with_log(name, last)
            if time.monotonic() >= deadline:
                return self._with_log(name, f"no result before the preflight timeout; {last}")
            time.sleep(0.3)

    def _with_log(self, name: str, reason: str) -> str:
        log = self._pod_log(name, 30)
        return f"{reason}\n--- log of pod {name} (last 30 lines)\n{log}" if log else reason

    # -- observation --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def observation(self) -> Iterator[None]:
        """Within it, reports read one list of the namespace's loom StatefulSets and one of their pods,
        made on first use: two requests a health tick instead of three a flow."""
        outer = getattr(self._observed, "lists", None)
        self._observed.lists = outer or _Listed(self)
        try:
            yield
        finally:
            self._observed.lists = outer

    def _pods(self, flow_name: str) -> list[Any]:
        listed: _Listed | None = getattr(self._observed, "lists", None)
        if listed is not None:
            return listed.pods_of(workload_name(self.settings, flow_name))
        selector = label_selector(selector_labels(self.settings, flow_name))
        try:
            return list(
                self.api.core.list_namespaced_pod(self.settings.namespace, label_selector=selector).items
            )
        except Exception as exc:
            raise api_error(exc, f"list the pods of flow {flow_name!r}") from exc

    def _statefulset(self, name: str) -> Any | None:
        """The StatefulSet *name*; ``None`` when it does not exist."""
        listed: _Listed | None = getattr(self._observed, "lists", None)
        if listed is not None:
            return listed.statefulset(name)
        try:
            return self.api.apps.read_namespaced_stateful_set(name, self.settings.namespace)
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise api_error(exc, f"read StatefulSet {name!r}") from exc

    def report(self, job: LaunchedJob) -> JobReport:
        """The job's state from its StatefulSet and pods (see the module docstring)."""
        name = _workload(job)
        workload = self._statefulset(name)
        if workload is None:
            return JobReport(
                JobState.DEAD,
                f"StatefulSet {self.settings.namespace}/{name} is gone (deleted out of band)",
                0,
            )
        wanted = int(workload.spec.replicas or 0)
        pods = self._pods(job.flow_name)
        running = sum(1 for pod in pods if pod.status.phase == "Running")
        if wanted == 0:
            return JobReport(JobState.DEAD, f"StatefulSet {name} is scaled to zero", running)
        revision = workload.status.update_revision
        observed = (workload.status.observed_generation or 0) >= int(job.extra.get("generation") or 0)
        problems, statuses, ready = [], [], 0
        for pod in sorted(pods, key=lambda p: p.metadata.name):
            pod_ready, problem, status = _pod_health(pod)
            current = pod.metadata.labels.get("controller-revision-hash") == revision
            ready += pod_ready and current
            if problem:
                problems.append(problem)
            if status:
                statuses.append(status)
        if problems and any(s.get("broken") for s in statuses):
            return JobReport(JobState.DEAD, "; ".join(problems), running, tuple(statuses), self_healing=True)
        if observed and ready == wanted:
            return JobReport(JobState.HEALTHY, f"{ready}/{wanted} pod(s) ready", running, tuple(statuses))
        if problems:
            return JobReport(JobState.HUNG, "; ".join(problems), running, tuple(statuses), self_healing=True)
        return JobReport(
            JobState.STARTING, f"{ready}/{wanted} pod(s) ready, {len(pods)} created", running, tuple(statuses)
        )

    def uptime(self, job: LaunchedJob) -> float | None:
        """Seconds since the youngest running container of the job started."""
        starts = []
        for pod in self._pods(job.flow_name):
            for container in pod.status.container_statuses or ():
                running = container.state.running if container.state else None
                if running is not None and running.started_at is not None:
                    starts.append(running.started_at.timestamp())
        return time.time() - max(starts) if starts else None

    def logs(self, job: LaunchedJob, lines: int = 40) -> str:
        """The last *lines* of each pod's log (and of its previous container after a crash), redacted."""
        parts = []
        for pod in sorted(self._pods(job.flow_name), key=lambda p: p.metadata.name):
            restarted = any((c.restart_count or 0) > 0 for c in pod.status.container_statuses or ())
            for previous in (True, False) if restarted else (False,):
                text = self._pod_log(pod.metadata.name, lines, previous)
                if text:
                    label = f"{pod.metadata.name}{' (previous container)' if previous else ''}"
                    parts.append(f"--- {label}\n{text}")
        return "\n".join(parts)

    def _pod_log(self, pod: str, lines: int, previous: bool = False) -> str:
        try:
            text = self.api.core.read_namespaced_pod_log(
                pod, self.settings.namespace, container=CONTAINER, tail_lines=lines, previous=previous
            )
        except Exception:
            return ""  # no log yet, or no kubelet serves it: the termination message still says why
        if not text:
            return ""
        return "\n".join(redact_text(str(text)).splitlines()[-lines:])  # by record: PEM, YAML blocks

    def follow_logs(self, job: LaunchedJob) -> Iterator[str]:
        """Lines pod 0 writes from now on, redacted, until interrupted."""
        name = f"{_workload(job)}-0"
        try:
            response = self.api.core.read_namespaced_pod_log(
                name,
                self.settings.namespace,
                container=CONTAINER,
                follow=True,
                since_seconds=1,
                _preload_content=False,
            )
        except Exception as exc:
            raise api_error(exc, f"follow the log of pod {name!r}") from exc
        redactor, pending = LineRedactor(), ""  # one redactor: a multi-line secret spans lines and chunks
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for raw in response.stream():
            pending += decoder.decode(raw)
            *complete, pending = pending.split("\n")
            for line in complete:
                yield redactor(line)
        if pending:
            yield redactor(pending)


class _Listed:
    """The namespace's loom StatefulSets and pods, each listed once, on first use."""

    def __init__(self, launcher: KubernetesLauncher) -> None:
        self._launcher = launcher
        self._statefulsets: dict[str, Any] | None = None
        self._pods: dict[str, list[Any]] | None = None

    def statefulset(self, name: str) -> Any | None:
        if self._statefulsets is None:
            items = self._list(self._launcher.api.apps.list_namespaced_stateful_set, "StatefulSets")
            self._statefulsets = {item.metadata.name: item for item in items}
        return self._statefulsets.get(name)

    def pods_of(self, workload: str) -> list[Any]:
        if self._pods is None:
            self._pods = {}
            for pod in self._list(self._launcher.api.core.list_namespaced_pod, "pods"):
                self._pods.setdefault((pod.metadata.labels or {}).get(INSTANCE_LABEL, ""), []).append(pod)
        return list(self._pods.get(workload, ()))

    def _list(self, list_namespaced: Any, what: str) -> list[Any]:
        try:
            found = list_namespaced(
                self._launcher.settings.namespace, label_selector=label_selector(EVERY_FLOW)
            )
        except Exception as exc:
            raise api_error(exc, f"list the loom {what}") from exc
        return list(found.items)


def _workload(job: LaunchedJob) -> str:
    return str(job.extra.get("statefulset") or job.host.rpartition("/")[2])


def _pod_health(pod: Any) -> tuple[bool, str | None, dict[str, Any] | None]:
    """(ready, problem, status record) of one pod; the record says how its container last ended."""
    name = pod.metadata.name
    ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ())
    containers = pod.status.container_statuses or ()
    if pod.status.phase in ("Pending", None) and not containers:
        unscheduled = [
            c.message for c in pod.status.conditions or () if c.type == "PodScheduled" and c.status == "False"
        ]
        problem = f"pod {name} is not scheduled: {unscheduled[0]}" if unscheduled else None
        return False, problem, None
    for container in containers:
        waiting = container.state.waiting if container.state else None
        terminated = container.state.terminated if container.state else None
        last = container.last_state.terminated if container.last_state else None
        ended = terminated or last
        restarts = int(container.restart_count or 0)
        status: dict[str, Any] | None = None
        parts = []
        if ended is not None:
            code = int(ended.exit_code) if ended.exit_code is not None else None
            why = ended.reason or "Error"
            meaning = describe_exit_code(code) if code is not None else "no exit code"
            message = redact_text((ended.message or "").strip())
            parts.append(
                f"last exit code {code} ({why}: {meaning})"
                + (f": {message.splitlines()[-1]}" if message else "")
            )
            status = {
                "pod": name,
                "state": "failed",
                "exit_code": code,
                "error": message or f"exit code {code} ({why})",
                "reason": why,
                "restarts": restarts,
            }
        if waiting is not None and waiting.reason in BROKEN_WAITING_REASONS:
            parts.insert(
                0, f"{waiting.reason}" + (f" ({redact_text(waiting.message)})" if waiting.message else "")
            )
            status = {
                **(status or {"pod": name, "state": "waiting"}),
                "broken": True,
                "waiting": waiting.reason,
            }
        if status is not None and status.get("exit_code") == EXIT_BAD_INPUT:
            status["broken"] = True
        if parts or restarts:
            return ready, f"pod {name} restarted {restarts} time(s); " + "; ".join(parts), status
    return ready, None, None


def _preflight_verdict(pod: Any, last: str) -> tuple[str, str]:
    """("ok" | "failed" | "waiting", what the pod says) for a preflight pod (*last*: the previous word)."""
    status = pod.status
    for container in status.container_statuses or ():
        terminated = container.state.terminated if container.state else None
        waiting = container.state.waiting if container.state else None
        if terminated is not None:
            code = int(terminated.exit_code) if terminated.exit_code is not None else None
            if code == 0:
                return "ok", "exit code 0"
            message = failure_detail(terminated.message or "") if terminated.message else ""
            meaning = describe_exit_code(code) if code is not None else "no exit code"
            said = f": {message}" if message else ""
            return "failed", f"exit code {code} ({terminated.reason or 'Error'}: {meaning}){said}"
        if waiting is not None and waiting.reason in BROKEN_WAITING_REASONS:
            detail = f" ({redact_text(waiting.message)})" if waiting.message else ""
            return "failed", f"the container cannot start: {waiting.reason}{detail}"
        if waiting is not None and waiting.reason:
            last = f"its container is waiting: {waiting.reason}"
        elif container.state is not None and container.state.running is not None:
            last = "its container was still running"
    if status.phase == "Succeeded":
        return "ok", "succeeded"
    if status.phase == "Failed":  # e.g. activeDeadlineSeconds: the kubelet killed it
        return "failed", f"the pod failed: {status.reason or ''} {redact_text(status.message or '')}".strip()
    for condition in status.conditions or ():
        if condition.type == "PodScheduled" and condition.status == "False":
            last = f"it is not scheduled ({condition.reason}: {condition.message})"
    return "waiting", last


def _pod_security_refusal(exc: Exception) -> str | None:
    """What Pod Security admission said when it refused a pod (a 403 naming the violated level), else ``None``."""
    if getattr(exc, "status", None) != 403:
        return None
    body = str(getattr(exc, "body", "") or "")
    try:
        message = str(json.loads(body).get("message", ""))
    except ValueError:
        message = body
    return message if "violates PodSecurity" in message else None
