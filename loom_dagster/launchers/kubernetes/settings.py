"""What the Kubernetes launcher needs to know about the cluster and the job's pods (no client here).

Every field is JSON-safe: the settings are the launcher's ``config()``, recorded with each deployment
so the CLI and the health sensor build the same launcher again. Secrets are never settings: pods get
them through ``env_from_secrets`` (``envFrom`` of the user's Secrets), resolved by the kubelet.
"""

from __future__ import annotations

from typing import Any

import msgspec

DEFAULT_IMAGE = "loom-dagster-job:latest"
DEFAULT_HTTP_PORT = 8080
DEFAULT_CLUSTER_PORT = 2101
DEFAULT_CONFIG_ROOT = "/etc/loom/config"
DEFAULT_STATUS_DIR = "/var/run/loom"


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

    def over(self, base: PodSettings) -> PodSettings:
        """These settings where set, *base*'s elsewhere."""
        fields = {name: getattr(self, name) for name in self.__struct_fields__}
        return msgspec.structs.replace(base, **{k: v for k, v in fields.items() if v is not None})


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
