"""The Kubernetes objects of one flow's job, as plain dicts (what ``kubectl apply`` would take).

Per flow: a StatefulSet (one pod per Bytewax process), a headless Service when the job has more than one
process (the pods' stable DNS names are the cluster's addresses), a ConfigMap per config snapshot
(the loom config files the deployment runs, mounted read-only) and a Secret per distinct ``env`` of the
flow (``LoomFlowSpec.env``: the pod template references its keys, never holds a value). No client here:
the same functions serve the launcher and ``loom-dagster manifests``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import msgspec

from loom_dagster.core.deploy.launch_records import LaunchRequest
from loom_dagster.core.deploy.store import keyed_digest
from loom_dagster.core.launchers.kubernetes.settings import (
    DEFAULT_CONFIG_ROOT,
    DEFAULT_REQUESTS,
    DEFAULT_STATUS_DIR,
    DEFAULT_TMP_DIR,
    KubernetesSettings,
)
from loom_dagster.core.launchers.preflight import preflight_args

MANAGED_BY = "loom-dagster"
FLOW_LABEL = "loom-dagster.io/flow"
INSTANCE_LABEL = "app.kubernetes.io/instance"
"""The label naming a flow's workload (its StatefulSet); its pods carry it too."""
EVERY_FLOW = {"app.kubernetes.io/managed-by": MANAGED_BY, "app.kubernetes.io/name": "loom-flow"}
"""The labels every flow's objects carry (a selector for all of a namespace's flows)."""
FLOW_ANNOTATION = "loom-dagster.io/flow-name"
PLAN_HASH_ANNOTATION = "loom-dagster.io/plan-hash"
CONFIG_HASH_ANNOTATION = "loom-dagster.io/config-hash"
RUN_ID_ANNOTATION = "loom-dagster.io/run-id"
ENV_LABEL = "loom-dagster.io/env"
"""The label of a flow's env Secret: the keyed digest of its values (pruning selects by it)."""
SECRET_REF = "Secret/"
"""``LaunchRequest.env_ref`` prefix of an env kept in a Secret: ``Secret/<name>``."""
HASH_KEY_SECRET = "loom-dagster-config-hash-key"
"""The Secret holding the installation's config-hash key (``key``): every Dagster pod's
``LOOM_DAGSTER_CONFIG_HASH_KEY``."""
CONTAINER = "job"
_MAX_NAME = 40  # StatefulSet names longer than 52 break the controller-revision-hash label


def dns_name(text: str, limit: int = _MAX_NAME) -> str:
    """*text* as a DNS-1123 label: lowercase, ``-`` for anything else, a short hash when changed.

    Example:
        >>> dns_name("orders-enrich")
        'orders-enrich'
        >>> dns_name("Orders_Enrich")
        'orders-enrich-01e05713'
    """
    cleaned = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "flow"
    if cleaned == text and len(cleaned) <= limit:
        return cleaned
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{cleaned[: limit - 9].rstrip('-')}-{digest}"


def workload_name(settings: KubernetesSettings, flow_name: str) -> str:
    """The StatefulSet (and Service) name of a flow."""
    return dns_name(settings.name_prefix + flow_name)


def selector_labels(settings: KubernetesSettings, flow_name: str) -> dict[str, str]:
    """The labels that select a flow's pods (stable across deployments)."""
    return {**EVERY_FLOW, INSTANCE_LABEL: workload_name(settings, flow_name)}


def label_selector(labels: dict[str, str]) -> str:
    """``k=v,k=v``: the API's label selector for *labels*."""
    return ",".join(f"{k}={v}" for k, v in labels.items())


def flow_labels(settings: KubernetesSettings, flow_name: str) -> dict[str, str]:
    """Every object's labels: the selector labels plus the flow's name as a label value."""
    return {**selector_labels(settings, flow_name), FLOW_LABEL: dns_name(flow_name, 63)}


def config_map_name(settings: KubernetesSettings, flow_name: str, label: str) -> str:
    """The ConfigMap holding one config snapshot (*label*: the config hash prefix)."""
    return f"{workload_name(settings, flow_name)}-config-{dns_name(label, 16)}"


def config_mount(config_map: str) -> str:
    """Where a config snapshot's ConfigMap is mounted in the pod."""
    return f"{DEFAULT_CONFIG_ROOT}/{config_map}"


def config_map_of(config_files: Sequence[str]) -> str | None:
    """The ConfigMap a request's config files live in (their mount directory's name), if any."""
    parents = {path.rsplit("/", 2)[-2] for path in config_files if path.startswith(DEFAULT_CONFIG_ROOT + "/")}
    return parents.pop() if len(parents) == 1 else None


def config_map_manifest(
    settings: KubernetesSettings, flow_name: str, name: str, files: dict[str, str], config_hash: str
) -> dict[str, Any]:
    """A config snapshot: file name -> text (checked free of secrets by the caller). Immutable."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": flow_labels(settings, flow_name),
            "annotations": {FLOW_ANNOTATION: flow_name, CONFIG_HASH_ANNOTATION: config_hash},
        },
        "immutable": True,
        "data": dict(files),
    }


def env_id(env: Sequence[tuple[str, str]]) -> str:
    """A keyed digest of env values (10 hex): the same env gets the same Secret; it reveals nothing."""
    return keyed_digest(msgspec.json.encode(dict(env), order="sorted"), 10)


def env_secret_name(settings: KubernetesSettings, flow_name: str, env: Sequence[tuple[str, str]]) -> str:
    """The Secret holding a flow's env values."""
    return f"{workload_name(settings, flow_name)}-env-{env_id(env)}"


def env_secret_of(settings: KubernetesSettings, request: LaunchRequest) -> str | None:
    """The Secret *request*'s env is (or, with its values still in it, will be) kept in; ``None``
    without env."""
    if request.env_ref.startswith(SECRET_REF):
        return request.env_ref[len(SECRET_REF) :]
    if request.env and not request.env_ref:
        return env_secret_name(settings, request.flow_name, request.env)
    return None


def env_secret_manifest(
    settings: KubernetesSettings, flow_name: str, name: str, env: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """The immutable Secret of a flow's env values (created by the launcher, never printed)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": {**flow_labels(settings, flow_name), ENV_LABEL: name.rsplit("-", 1)[-1]},
            "annotations": {FLOW_ANNOTATION: flow_name},
        },
        "type": "Opaque",
        "immutable": True,
        "stringData": dict(env),
    }


def service_manifest(settings: KubernetesSettings, flow_name: str) -> dict[str, Any]:
    """The headless Service that gives each pod of a multi-process job a stable DNS name."""
    name = workload_name(settings, flow_name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": flow_labels(settings, flow_name),
            "annotations": {FLOW_ANNOTATION: flow_name},
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # peers must find each other before they are ready
            "selector": selector_labels(settings, flow_name),
            "ports": [{"name": "bytewax", "port": settings.cluster_port}],
        },
    }


def cluster_addresses(settings: KubernetesSettings, flow_name: str, processes: int) -> tuple[str, ...]:
    """The Bytewax cluster's addresses: every pod's DNS name under the headless Service."""
    if processes <= 1:
        return ()
    name = workload_name(settings, flow_name)
    domain = f"{name}.{settings.namespace}.svc.{settings.cluster_domain}"
    return tuple(f"{name}-{ordinal}.{domain}:{settings.cluster_port}" for ordinal in range(processes))


def job_args(settings: KubernetesSettings, request: LaunchRequest) -> list[str]:
    """The runtime's arguments: import path, mounted config files, environment; never a secret."""
    args = ["-m", "loom_dagster.runtime", "--import-path", request.import_path]
    for config in request.config_files:
        args += ["--config", config]
    args += ["--environment", request.environment, "--status-file", f"{DEFAULT_STATUS_DIR}/status.json"]
    args += [
        "--flow-name",
        request.flow_name,
        "--http-port",
        str(settings.http_port),
        "--http-host",
        "0.0.0.0",
    ]
    args += ["--drain-timeout", f"{settings.drain_timeout_s:g}"]
    args += ["--live-timeout", f"{settings.heartbeat_timeout_s:g}"]  # /livez: heartbeats and polls
    if request.run_id:
        args += ["--run-id", request.run_id]
    if request.processes > 1 or request.workers_per_process > 1:
        args += ["--workers-per-process", str(request.workers_per_process)]
    addresses = cluster_addresses(settings, request.flow_name, request.processes)
    if addresses:
        args += ["--process-id", "auto", "--addresses", ",".join(addresses)]
    return args


POD_SECURITY_CONTEXT: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
"""The pod's default ``securityContext``: what the ``restricted`` Pod Security level requires of a pod."""
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
}
"""The container's default ``securityContext``: ``restricted`` plus a read-only root (the job writes only
to its emptyDirs: the status dir and ``/tmp``)."""


def pod_annotations(request: LaunchRequest) -> dict[str, str]:
    """What a flow's objects say about the deployment: flow name, plan and config hashes, run id."""
    return {
        FLOW_ANNOTATION: request.flow_name,
        PLAN_HASH_ANNOTATION: request.plan_hash,
        CONFIG_HASH_ANNOTATION: request.config_hash,
        **({RUN_ID_ANNOTATION: request.run_id} if request.run_id else {}),
    }


def job_container(settings: KubernetesSettings, request: LaunchRequest) -> dict[str, Any]:
    """The job's container: the runtime with its probes, env by Secret reference, the hardened context.

    The flow's env reaches the container by reference to its Secret (``secretKeyRef``), never by value.
    """
    pod = settings.pod_for(request.flow_name)
    secret = env_secret_of(settings, request)
    env: dict[str, dict[str, Any]] = {
        key: {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for key, _ in request.env
    }
    for key, value in {**(pod.env or {}), "PYTHONPATH": settings.python_path}.items():
        env[key] = {"name": key, "value": value}
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": pod.image,
        "command": [settings.python],
        "args": job_args(settings, request),
        "workingDir": settings.working_dir,
        "env": [env[key] for key in sorted(env)],
        "ports": [{"name": "http", "containerPort": settings.http_port}]
        + ([{"name": "bytewax", "containerPort": settings.cluster_port}] if request.processes > 1 else []),
        "readinessProbe": _probe("/readyz", settings.http_port, period=2, failures=3),
        "livenessProbe": _probe("/livez", settings.http_port, period=10, failures=3),
        "volumeMounts": [
            {"name": "status", "mountPath": DEFAULT_STATUS_DIR},
            {"name": "tmp", "mountPath": DEFAULT_TMP_DIR},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": pod.resources if pod.resources else {"requests": dict(DEFAULT_REQUESTS)},
        "securityContext": {**CONTAINER_SECURITY_CONTEXT, **(pod.container_security_context or {})},
    }
    if pod.image_pull_policy:
        container["imagePullPolicy"] = pod.image_pull_policy
    if pod.env_from_secrets:
        container["envFrom"] = [{"secretRef": {"name": secret}} for secret in pod.env_from_secrets]
    config_map = config_map_of(request.config_files)
    if config_map:
        mount = {"name": "config", "mountPath": config_mount(config_map), "readOnly": True}
        container["volumeMounts"].append(mount)
    container["volumeMounts"].extend(pod.volume_mounts or ())
    return container


def pod_spec(
    settings: KubernetesSettings, request: LaunchRequest, container: dict[str, Any]
) -> dict[str, Any]:
    """The pod around *container*: its volumes, security context, service account and placement.

    Shared by the StatefulSet and the preflight pod, so the preflight runs what the job will run.
    """
    pod = settings.pod_for(request.flow_name)
    config_map = config_map_of(request.config_files)
    volumes: list[dict[str, Any]] = [{"name": "status", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]
    if config_map:
        volumes.append({"name": "config", "configMap": {"name": config_map}})
    volumes.extend(pod.volumes or ())
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        # SIGTERM -> the runtime drains and commits within drain_timeout_s; then the kubelet kills
        "terminationGracePeriodSeconds": int(settings.drain_timeout_s) + 10,
        "restartPolicy": "Always",
        "securityContext": {**POD_SECURITY_CONTEXT, **(pod.security_context or {})},
        "automountServiceAccountToken": bool(pod.automount_service_account_token),
    }
    if pod.service_account:
        spec["serviceAccountName"] = pod.service_account
    if pod.node_selector:
        spec["nodeSelector"] = pod.node_selector
    if pod.tolerations:
        spec["tolerations"] = list(pod.tolerations)
    return spec


def statefulset_manifest(settings: KubernetesSettings, request: LaunchRequest) -> dict[str, Any]:
    """The flow's StatefulSet: ``replicas`` = the job's processes, started together (``Parallel``).

    Annotations carry the plan hash, config hash and run id; the pod's grace period covers the drain.
    """
    flow = request.flow_name
    pod = settings.pod_for(flow)
    name = workload_name(settings, flow)
    annotations = pod_annotations(request)
    labels = {**(pod.labels or {}), **flow_labels(settings, flow)}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {
            "serviceName": name,
            "replicas": request.processes,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector_labels(settings, flow)},
            "template": {
                "metadata": {"labels": labels, "annotations": {**(pod.annotations or {}), **annotations}},
                "spec": pod_spec(settings, request, job_container(settings, request)),
            },
        },
    }


PREFLIGHT_NAME = "loom-preflight"
"""``app.kubernetes.io/name`` of preflight pods: never selected as a flow's job pods (those are ``loom-flow``)."""


def preflight_pod_manifest(
    settings: KubernetesSettings,
    request: LaunchRequest,
    name: str,
    timeout_s: float,
    connect_timeout_s: float,
) -> dict[str, Any]:
    """A one-off pod of the NEW template (image, env, mounts, service account, security context) that
    runs the preflight module instead of the runtime: import, compile, prepare, reach the brokers.

    No probes, no ports, never restarted, killed by the kubelet past *timeout_s* (``activeDeadlineSeconds``).
    """
    flow = request.flow_name
    container = job_container(settings, request)
    container["args"] = preflight_args(request, sys_path=False, connect_timeout_s=connect_timeout_s)
    for key in ("ports", "readinessProbe", "livenessProbe"):
        container.pop(key, None)
    spec = pod_spec(settings, request, container)
    spec.update(
        restartPolicy="Never",
        activeDeadlineSeconds=max(1, int(timeout_s)),
        terminationGracePeriodSeconds=0,
    )
    pod = settings.pod_for(flow)
    labels = {
        **(pod.labels or {}),
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/name": PREFLIGHT_NAME,
        FLOW_LABEL: dns_name(flow, 63),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": labels,
            "annotations": {**(pod.annotations or {}), **pod_annotations(request)},
        },
        "spec": spec,
    }


def network_policy_manifest(settings: KubernetesSettings, flow_name: str, processes: int) -> dict[str, Any]:
    """The flow's ingress NetworkPolicy (``network_policy`` set): the probe port from the configured
    peers, the Bytewax port from the flow's own pods; everything else into its pods is refused."""
    assert settings.network_policy is not None
    selector = selector_labels(settings, flow_name)
    rules: list[dict[str, Any]] = [
        {
            "ports": [{"protocol": "TCP", "port": settings.http_port}],
            "from": list(settings.network_policy.probe_from),
        }
    ]
    if processes > 1:
        rules.append(
            {
                "ports": [{"protocol": "TCP", "port": settings.cluster_port}],
                "from": [{"podSelector": {"matchLabels": selector}}],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": workload_name(settings, flow_name),
            "namespace": settings.namespace,
            "labels": flow_labels(settings, flow_name),
            "annotations": {FLOW_ANNOTATION: flow_name},
        },
        "spec": {"podSelector": {"matchLabels": selector}, "policyTypes": ["Ingress"], "ingress": rules},
    }


def _probe(path: str, port: int, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 2,
    }


def flow_manifests(
    settings: KubernetesSettings, request: LaunchRequest, config_files: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Every object a deploy of *request* applies, in apply order (``loom-dagster manifests``)."""
    objects: list[dict[str, Any]] = []
    config_map = config_map_of(request.config_files)
    if config_files is not None and config_map:
        objects.append(
            config_map_manifest(settings, request.flow_name, config_map, config_files, request.config_hash)
        )
    if request.processes > 1:
        objects.append(service_manifest(settings, request.flow_name))
    if settings.network_policy is not None:
        objects.append(network_policy_manifest(settings, request.flow_name, request.processes))
    objects.append(statefulset_manifest(settings, request))
    return objects
