"""What the Kubernetes launcher needs to know about the cluster and the job's pods (no client here).

Every field is JSON-safe: the settings are the launcher's ``config()``, recorded with each deployment
so the CLI and the health sensor build the same launcher again. Secrets are never settings: pods get
them through ``env_from_secrets`` (``envFrom`` of the user's Secrets), resolved by the kubelet; a
``pod.env`` variable with a secret's name or a secret-shaped value (``redact.secret_shape``: a URL with a
password, a PEM key, a JAAS password, a random-looking token) is refused when the settings are built.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from loom_dagster.core.redact import is_secret_name, secret_shape

DEFAULT_IMAGE = "loom-dagster-job:latest"
DEFAULT_HTTP_PORT = 8080
DEFAULT_CLUSTER_PORT = 2101
DEFAULT_CONFIG_ROOT = "/etc/loom/config"
DEFAULT_STATUS_DIR = "/var/run/loom"
LEASE_SECONDS = 30
"""The deploy lock's default Lease duration (``lease_seconds``)."""
DEFAULT_TMP_DIR = "/tmp"
DEFAULT_REQUESTS = {"cpu": "100m", "memory": "256Mi"}
"""Requests when a flow sets no ``resources``: a pod that is never BestEffort (first to be evicted)."""


class PodSettings(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """The parts of a flow's pod template a user may set globally or override per flow.

    Example:
        >>> PodSettings(image="registry.example/flows:1.4").image
        'registry.example/flows:1.4'
    """

    image: str | None = None
    image_pull_policy: str | None = None
    service_account: str | None = None
    env_from_secrets: tuple[str, ...] | None = None
    env: dict[str, str] | None = None
    resources: dict[str, Any] | None = None
    node_selector: dict[str, str] | None = None
    tolerations: tuple[dict[str, Any], ...] | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    security_context: dict[str, Any] | None = None
    """Keys over the pod's default ``securityContext`` (the ``restricted`` level's: non-root, seccomp)."""
    container_security_context: dict[str, Any] | None = None
    """Keys over the container's default ``securityContext`` (no privilege escalation, no capabilities,
    read-only root filesystem)."""
    automount_service_account_token: bool | None = None
    """Mount the service account's API token in the pod (default: no; the job never calls the API)."""
    volumes: tuple[dict[str, Any], ...] | None = None
    """Extra pod volumes (e.g. a PersistentVolumeClaim holding Delta tables, a CA bundle ConfigMap)."""
    volume_mounts: tuple[dict[str, Any], ...] | None = None
    """Where the job's container mounts ``volumes`` (``{"name": ..., "mountPath": ...}``)."""

    def __post_init__(self) -> None:
        for name, value in (self.env or {}).items():
            problem = pod_env_problem(name, value)
            if problem is not None:
                raise ValueError(problem)

    def over(self, base: PodSettings) -> PodSettings:
        """These settings where set, *base*'s elsewhere."""
        fields = {name: getattr(self, name) for name in self.__struct_fields__}
        return msgspec.structs.replace(base, **{k: v for k, v in fields.items() if v is not None})


class NetworkPolicySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An ingress NetworkPolicy per flow: the probe/metrics port from ``probe_from`` only (NetworkPolicy
    peers: ``podSelector`` / ``namespaceSelector`` / ``ipBlock``), the Bytewax port from the flow's own pods.

    Example:
        >>> NetworkPolicySettings(probe_from=({"namespaceSelector": {"matchLabels": {"team": "obs"}}},)).probe_from[0]
        {'namespaceSelector': {'matchLabels': {'team': 'obs'}}}
    """

    probe_from: tuple[dict[str, Any], ...] = ()


class KubernetesSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where and how flows run on Kubernetes.

    ``python`` and ``working_dir`` / ``python_path`` describe the job image: the runtime command is
    ``<python> -m loom_dagster.runtime ...`` run in ``working_dir`` with ``PYTHONPATH=python_path``
    (the flow code's root in the image). ``flows`` overrides pod settings per flow name.

    Example:
        >>> KubernetesSettings(namespace="streaming").namespace
        'streaming'
    """

    namespace: str = "default"
    kubeconfig: str | None = None
    context: str | None = None
    in_cluster: bool | None = None
    pod: PodSettings = PodSettings()
    flows: dict[str, PodSettings] = {}
    python: str = "python"
    working_dir: str = "/app"
    python_path: str = "/app"
    http_port: int = DEFAULT_HTTP_PORT
    cluster_port: int = DEFAULT_CLUSTER_PORT
    drain_timeout_s: float = 30.0
    heartbeat_timeout_s: float = 30.0
    name_prefix: str = "loom-"
    cluster_domain: str = "cluster.local"
    lease_seconds: Annotated[int, msgspec.Meta(ge=2)] = LEASE_SECONDS
    """The deploy lock's Lease duration: renewed every third of it while held; a holder that could not
    renew it for this long has lost it (and stops before its next change); then another may take it."""
    network_policy: NetworkPolicySettings | None = None

    def pod_for(self, flow_name: str) -> PodSettings:
        """The pod settings of *flow_name*: its override over the global ones, with defaults filled."""
        chosen = self.flows.get(flow_name, PodSettings()).over(self.pod)
        if chosen.image is None:
            chosen = msgspec.structs.replace(chosen, image=DEFAULT_IMAGE)
        return chosen

    def to_config(self) -> dict[str, Any]:
        """The JSON-safe keyword arguments that build these settings again."""
        return msgspec.to_builtins(self)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KubernetesSettings:
        """Settings from keyword arguments (a resource's ``launcher_config``), or a clear error."""
        return msgspec.convert(config, type=cls)


def pod_env_problem(name: str, value: str) -> str | None:
    """Why ``pod.env`` *name* = *value* must not be a plain setting (``None``: it may): a secret's name
    (``DB_PASSWORD``, ``CH_PW``, ``API_TOKEN``, ``SIGNING_KEY``) or a secret-shaped value. Its value goes
    in the clear into the StatefulSet, the recorded launcher config and the state ConfigMap.

    Example:
        >>> pod_env_problem("LOG_LEVEL", "INFO") is None
        True
        >>> pod_env_problem("KAFKA_PASS", "x")[:47]
        "pod.env 'KAFKA_PASS' is named like a secret and"
    """
    if is_secret_name(name):
        what = "is named like a secret and"
    else:
        shape = secret_shape(value) if isinstance(value, str) else None
        if shape is None:
            return None
        what = f"holds {shape}, and"
    return (
        f"pod.env {name!r} {what} pod.env values are written in the clear into the StatefulSet, the "
        "recorded launcher config and the state ConfigMap. Put it in a Kubernetes Secret and list the "
        "Secret in pod.env_from_secrets (or pass it as the flow's env=, kept in a Secret by the launcher)"
    )
