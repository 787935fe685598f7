"""Deployment records, config snapshots and the deploy lock, kept in the cluster.

The webserver, the daemon, run pods and the CLI anywhere read one truth:

- ``<workload>-state`` ConfigMap: ``deployment.json`` (the current record) and ``history.jsonl`` (the last
  deployments, newest last), updated with optimistic concurrency (``resourceVersion``);
- ``<workload>-config-<hash>`` ConfigMaps: the config snapshot each deployment runs (immutable, checked
  free of secrets: a literal password belongs in a Secret, referenced as ``${oc.env:VAR}``);
- ``<workload>-env-<id>`` Secrets: the flow's ``env`` values (one immutable Secret per distinct env,
  named by a keyed digest), referenced by the pods (``secretKeyRef``); the records keep the names and
  ``env_ref = "Secret/<name>"``, never a value; those no record references are deleted on each record;
- ``loom-dagster-config-hash-key`` Secret: the installation's config-hash key, created by the first
  deploy; a process hashing with another key is refused (set ``LOOM_DAGSTER_CONFIG_HASH_KEY`` from it
  in every Dagster pod);
- ``<workload>-deploy`` Lease: held around drain -> launch -> record, renewed while held, taken over
  only once expired (a deploy that died holding it).

Records hold no secret: the launch request names config files (checked free of literal secrets) and
the env Secret.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import re
import socket
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import msgspec

from loom_dagster.deployments import (
    HASH_KEY_VARIABLE,
    ConfigFile,
    Deployment,
    DeploymentStore,
    UnreadableRecord,
    history_records,
    installation_key,
    scratch_copy,
)
from loom_dagster.errors import DeploymentError
from loom_dagster.launchers.base import LaunchRequest
from loom_dagster.launchers.kubernetes.client import KubeApi, api_error, is_conflict, is_not_found
from loom_dagster.launchers.kubernetes.manifests import (
    ENV_LABEL,
    FLOW_ANNOTATION,
    HASH_KEY_SECRET,
    MANAGED_BY,
    SECRET_REF,
    config_map_manifest,
    config_map_name,
    config_map_of,
    config_mount,
    env_secret_manifest,
    env_secret_name,
    flow_labels,
    label_selector,
    workload_name,
)
from loom_dagster.launchers.kubernetes.settings import KubernetesSettings
from loom_dagster.redact import redact_text

_log = logging.getLogger(__name__)

STATE_LABEL = "loom-dagster.io/state"
_KEPT_HISTORY = 50
_KEPT_SNAPSHOTS = 10
LEASE_SECONDS = 120
"""A held lock is renewed every third of this; one not renewed for this long is taken over."""


class KubernetesDeploymentStore(DeploymentStore):
    """Deployment records of the flows of one namespace, in ConfigMaps and Leases.

    Example:
        >>> store = KubernetesDeploymentStore(KubernetesSettings(namespace="flows"), api)  # doctest: +SKIP
    """

    def __init__(self, settings: KubernetesSettings, api: KubeApi, state_dir: str | None = None) -> None:
        super().__init__(state_dir)
        self.settings = settings
        self.api = api
        self._key_checked = False

    @property
    def namespace(self) -> str:
        """The namespace the records live in."""
        return self.settings.namespace

    def location(self) -> str:
        """``namespace '<ns>' of <server>``."""
        return f"namespace {self.namespace!r} of {self.api.server}"

    def _state_name(self, flow_name: str) -> str:
        return f"{workload_name(self.settings, flow_name)}-state"

    def _read_state(self, flow_name: str) -> Any | None:
        try:
            return self.api.core.read_namespaced_config_map(self._state_name(flow_name), self.namespace)
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise api_error(exc, f"read the deployment record of flow {flow_name!r}") from exc

    def current(self, flow_name: str) -> Deployment | None:
        """The flow's current record, or ``None``."""
        state = self._read_state(flow_name)
        return _decode(state, flow_name) if state is not None else None

    def scan(self) -> tuple[list[Deployment], list[UnreadableRecord]]:
        """Every flow's current record in the namespace, and those that cannot be read (one list request)."""
        try:
            found = self.api.core.list_namespaced_config_map(
                self.namespace, label_selector=f"{STATE_LABEL}=deployment"
            )
        except Exception as exc:
            raise api_error(exc, "list deployment records") from exc
        records = []
        unreadable = []
        for item in sorted(found.items, key=lambda i: i.metadata.name):
            try:
                record = _decode(item, item.metadata.name)
            except DeploymentError as exc:
                flow = (item.metadata.annotations or {}).get(FLOW_ANNOTATION) or item.metadata.name
                where = f"ConfigMap {self.namespace}/{item.metadata.name} (deployment.json)"
                unreadable.append(UnreadableRecord(flow, where, str(exc.__cause__ or exc)))
                continue
            if record is not None:
                records.append(record)
        return records, unreadable

    def current_many(self, flow_names: Iterable[str]) -> dict[str, Deployment | None]:
        """The current record of each flow, from one list request (a sensor tick reads every flow)."""
        by_name = {record.flow_name: record for record in self.all()}
        return {name: by_name.get(name) for name in flow_names}

    def save(self, deployment: Deployment, *, history: bool = True) -> None:
        """Write the current record (and append it to the history, the last 50 kept), retrying lost
        races. Env values go to the flow's env Secret (the record keeps names and the Secret's name),
        also those of history entries written by an older version; env Secrets no record references
        any more are deleted."""
        name = self._state_name(deployment.flow_name)
        stored = self._in_secret(deployment)
        encoded = stored.encode(indent=2).decode()
        for _ in range(10):
            state = self._read_state(deployment.flow_name)
            data = dict(state.data or {}) if state is not None else {}
            data["deployment.json"] = encoded
            if history:
                kept = history_records(data.get("history.jsonl") or "", warn=False)[-(_KEPT_HISTORY - 1) :]
                lines = [self._in_secret(record).encode().decode() for record in kept]
                data["history.jsonl"] = "\n".join([*lines, stored.encode().decode()]) + "\n"
            body = {
                "metadata": {
                    "name": name,
                    "namespace": self.namespace,
                    "labels": {**flow_labels(self.settings, deployment.flow_name), STATE_LABEL: "deployment"},
                    "annotations": {FLOW_ANNOTATION: deployment.flow_name},
                },
                "data": data,
            }
            try:
                if state is None:
                    self.api.core.create_namespaced_config_map(self.namespace, body)
                else:
                    body["metadata"]["resourceVersion"] = state.metadata.resource_version
                    self.api.core.replace_namespaced_config_map(name, self.namespace, body)
                self._prune_env_secrets(deployment.flow_name, data)
                return
            except Exception as exc:
                if is_conflict(exc):
                    continue  # another writer got there first: read again
                raise api_error(exc, f"record the deployment of flow {deployment.flow_name!r}") from exc
        raise DeploymentError(
            f"could not record the deployment of flow {deployment.flow_name!r}: kept racing"
        )

    def history(self, flow_name: str) -> list[Deployment]:
        """The flow's recorded deployments, oldest first (the last 50; an unreadable line skipped with
        a warning)."""
        state = self._read_state(flow_name)
        text = (state.data or {}).get("history.jsonl", "") if state is not None else ""
        return history_records(text, warn=True, where=f"ConfigMap {self._state_name(flow_name)}")

    def _in_secret(self, deployment: Deployment) -> Deployment:
        """*deployment* as recorded: its env values in the flow's env Secret."""
        request = env_in_secret(self.api, self.settings, deployment.job.request)
        return deployment if request is deployment.job.request else deployment.with_request(request)

    def _prune_env_secrets(self, flow_name: str, data: dict[str, str]) -> None:
        """Delete the flow's env Secrets no record in *data* (current, history) references."""
        records = history_records(data.get("history.jsonl") or "", warn=False)
        current = data.get("deployment.json")
        if current:
            try:
                records.append(Deployment.decode(current))
            except ValueError:
                return  # cannot tell what is referenced: keep everything
        used = sorted(
            r.job.request.env_ref.rsplit("-", 1)[-1]
            for r in records
            if r.job.request.env_ref.startswith(SECRET_REF)
        )
        selector = f"{label_selector(flow_labels(self.settings, flow_name))},{ENV_LABEL}"
        if used:
            selector += f",{ENV_LABEL} notin ({','.join(dict.fromkeys(used))})"
        try:
            self.api.core.delete_collection_namespaced_secret(self.namespace, label_selector=selector)
        except Exception as exc:  # housekeeping: never fail a record over it
            _log.debug("could not prune the env Secrets of flow %r: %s", flow_name, exc)

    def check_hash_key(self) -> None:
        """Make sure this process hashes configs with the installation's key kept in the cluster (the
        ``loom-dagster-config-hash-key`` Secret, created from this process's key when absent): config
        hashes name ConfigMaps and are compared by the redeploy schedule, so every process of one
        installation must share the key. ``DeploymentError`` saying how, when it does not."""
        if self._key_checked:
            return
        key = installation_key()
        try:
            secret = self.api.core.read_namespaced_secret(HASH_KEY_SECRET, self.namespace)
        except Exception as exc:
            if not is_not_found(exc):
                raise api_error(exc, f"read the config-hash key (Secret {HASH_KEY_SECRET!r})") from exc
            secret = None
        if secret is None:
            body = {
                "metadata": {
                    "name": HASH_KEY_SECRET,
                    "namespace": self.namespace,
                    "labels": {"app.kubernetes.io/managed-by": MANAGED_BY},
                },
                "type": "Opaque",
                "stringData": {"key": key.decode()},
            }
            try:
                self.api.core.create_namespaced_secret(self.namespace, body)
                self._key_checked = True
                return
            except Exception as exc:
                if not is_conflict(exc):
                    raise api_error(exc, f"create the config-hash key (Secret {HASH_KEY_SECRET!r})") from exc
                secret = self.api.core.read_namespaced_secret(HASH_KEY_SECRET, self.namespace)
        stored = base64.b64decode((secret.data or {}).get("key") or b"")
        if stored.strip() != key:
            raise DeploymentError(
                f"this process hashes configs with another key than the installation's, kept in Secret "
                f"{HASH_KEY_SECRET!r} of namespace {self.namespace!r}: config hashes (ConfigMap names, "
                "annotations, the redeploy schedule's comparison) would differ between processes. Set "
                f"${HASH_KEY_VARIABLE} from that Secret (key 'key') in every Dagster pod (code server, "
                "daemon, run workers) and where the CLI runs. Nothing was deployed."
            )
        self._key_checked = True

    def snapshot_config(self, flow_name: str, files: Sequence[ConfigFile], label: str) -> tuple[str, ...]:
        """An immutable ConfigMap holding the config files; returns their paths in the pod.

        Refuses a file holding a literal secret: ConfigMaps are readable by anyone who may read the
        namespace's config, so secrets go to a Secret (``env_from_secrets``) and ``${oc.env:VAR}``.
        """
        texts = checked_texts(flow_name, files)
        self.check_hash_key()
        name = config_map_name(self.settings, flow_name, label)
        manifest = config_map_manifest(self.settings, flow_name, name, texts, label)
        try:
            self.api.core.create_namespaced_config_map(self.namespace, manifest)
        except Exception as exc:
            if not is_conflict(exc):
                raise api_error(exc, f"create the config snapshot ConfigMap {name!r}") from exc
            existing = self.api.core.read_namespaced_config_map(name, self.namespace)
            if dict(existing.data or {}) != texts:  # same hash prefix, other content: never reuse it
                raise DeploymentError(
                    f"ConfigMap {name!r} already holds a different config for flow {flow_name!r}; "
                    "delete it and deploy again"
                ) from exc
        self._prune_config_maps(flow_name, keep_name=name)
        return tuple(f"{config_mount(name)}/{file}" for file in texts)

    @contextmanager
    def readable_config(self, flow_name: str, files: Sequence[str]) -> Iterator[tuple[str, ...]]:
        """The snapshot's ConfigMap written to a private scratch directory, in the files' order."""
        name = config_map_of(files)
        if name is None:
            yield tuple(files)
            return
        try:
            data = self.api.core.read_namespaced_config_map(name, self.namespace).data or {}
        except Exception as exc:
            raise api_error(exc, f"read the config snapshot {name!r} of flow {flow_name!r}") from exc
        missing = [path for path in files if path.rsplit("/", 1)[-1] not in data]
        if missing:
            raise DeploymentError(f"config snapshot {name!r} of flow {flow_name!r} has no {missing[0]!r}")
        entries = [(path.rsplit("/", 1)[-1], data[path.rsplit("/", 1)[-1]].encode()) for path in files]
        with scratch_copy(entries) as paths:
            yield paths

    def _prune_config_maps(self, flow_name: str, keep_name: str) -> None:
        """Drop old snapshots beyond the last ten, never one a recorded deployment still runs."""
        prefix = f"{workload_name(self.settings, flow_name)}-config-"
        try:
            items = self.api.core.list_namespaced_config_map(
                self.namespace,
                label_selector=label_selector(flow_labels(self.settings, flow_name)),
            ).items
        except Exception:
            return  # pruning is housekeeping: never fail a deploy over it
        in_use = {keep_name}
        for record in [*self.history(flow_name)[-_KEPT_SNAPSHOTS:], self.current(flow_name)]:
            for path in record.job.request.config_files if record is not None else ():
                in_use.add(path.rsplit("/", 2)[-2])
        snapshots = sorted(
            (i for i in items if i.metadata.name.startswith(prefix)),
            key=lambda i: i.metadata.creation_timestamp or dt.datetime.min.replace(tzinfo=dt.UTC),
        )
        for item in snapshots[:-_KEPT_SNAPSHOTS]:
            if item.metadata.name not in in_use:
                try:
                    self.api.core.delete_namespaced_config_map(item.metadata.name, self.namespace)
                except Exception:
                    continue

    def lock_held(self, flow_name: str) -> bool:
        """True while the flow's deploy Lease is held and not expired."""
        try:
            held = self.api.coordination.read_namespaced_lease(self._lease_name(flow_name), self.namespace)
        except Exception:
            return False
        return not _expired(held)

    def locks_held(self, flow_names: Iterable[str]) -> set[str]:
        """Those of *flow_names* whose deploy Lease is held: one list of the namespace's Leases (a
        Role without ``list leases`` falls back to one read per flow)."""
        wanted = {self._lease_name(name): name for name in flow_names}
        try:
            leases = self.api.coordination.list_namespaced_lease(self.namespace).items
        except Exception:
            return super().locks_held(wanted.values())
        return {
            wanted[lease.metadata.name]
            for lease in leases
            if lease.metadata.name in wanted and not _expired(lease)
        }

    def _lease_name(self, flow_name: str) -> str:
        return f"{workload_name(self.settings, flow_name)}-deploy"

    @contextmanager
    def lock(self, flow_name: str, holder: str) -> Iterator[None]:
        """Hold the flow's deploy Lease; fail at once, naming the holder, while another holds it."""
        name = self._lease_name(flow_name)
        identity = f"{holder} (pid {os.getpid()} on {socket.gethostname()})"
        lease = self._acquire(flow_name, name, identity)
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(name, lease, stop), daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join(timeout=5)
            self._release(name, identity)

    def _release(self, name: str, identity: str) -> None:
        """Delete the Lease if this holder still holds it (one taken over after expiry is not ours)."""
        try:
            held = self.api.coordination.read_namespaced_lease(name, self.namespace)
            if held.spec.holder_identity != identity:
                return
            self.api.coordination.delete_namespaced_lease(
                name,
                self.namespace,
                body={"preconditions": {"resourceVersion": held.metadata.resource_version}},
            )
        except Exception:  # gone already, or unreachable: it expires on its own
            pass

    def _acquire(self, flow_name: str, name: str, identity: str) -> dict[str, Any]:
        now = _now()
        body: dict[str, Any] = {
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": flow_labels(self.settings, flow_name),
            },
            "spec": {
                "holderIdentity": identity,
                "leaseDurationSeconds": LEASE_SECONDS,
                "acquireTime": now,
                "renewTime": now,
            },
        }
        try:
            self.api.coordination.create_namespaced_lease(self.namespace, body)
            return body
        except Exception as exc:
            if not is_conflict(exc):
                raise api_error(exc, f"take the deploy lock (Lease {name!r}) of flow {flow_name!r}") from exc
        held = self.api.coordination.read_namespaced_lease(name, self.namespace)
        if not _expired(held):
            raise DeploymentError(
                f"flow {flow_name!r} is being deployed or stopped by {held.spec.holder_identity}; this "
                "request changed nothing. Wait for it to finish, then materialize again if needed."
            )
        body["metadata"]["resourceVersion"] = held.metadata.resource_version
        try:  # expired: its holder died mid-deploy
            self.api.coordination.replace_namespaced_lease(name, self.namespace, body)
        except Exception as exc:
            raise DeploymentError(
                f"flow {flow_name!r}: another deploy took over its expired lock first; materialize again"
            ) from exc
        return body

    def _renew(self, name: str, lease: dict[str, Any], stop: threading.Event) -> None:
        while not stop.wait(LEASE_SECONDS / 3):
            try:
                self.api.coordination.patch_namespaced_lease(
                    name, self.namespace, {"spec": {"renewTime": _now()}}
                )
            except Exception:
                continue


def _expired(lease: Any) -> bool:
    renewed = lease.spec.renew_time or lease.spec.acquire_time
    duration = lease.spec.lease_duration_seconds or LEASE_SECONDS
    return renewed is None or (dt.datetime.now(dt.UTC) - renewed).total_seconds() >= duration


def env_in_secret(api: KubeApi, settings: KubernetesSettings, request: LaunchRequest) -> LaunchRequest:
    """*request* with its env values moved to the flow's env Secret (created when absent: it is named by
    a keyed digest of the values, so an existing one holds them): names and ``Secret/<name>`` remain."""
    if not request.env or request.env_ref.startswith(SECRET_REF):
        return request
    if request.env_ref:
        request.job_env()  # a reference this store cannot follow: refused, naming it
    name = env_secret_name(settings, request.flow_name, request.env)
    manifest = env_secret_manifest(settings, request.flow_name, name, request.env)
    try:
        api.core.create_namespaced_secret(settings.namespace, manifest)
    except Exception as exc:
        if not is_conflict(exc):
            raise api_error(exc, f"create the env Secret {name!r} of flow {request.flow_name!r}") from exc
    names = tuple((key, "") for key, _ in request.env)
    return msgspec.structs.replace(request, env=names, env_ref=SECRET_REF + name)


def _decode(config_map: Any, what: str) -> Deployment | None:
    text = (config_map.data or {}).get("deployment.json")
    if not text:
        return None
    try:
        return Deployment.decode(text)
    except ValueError as exc:
        raise DeploymentError(f"deployment record of {what!r} in the cluster is unreadable: {exc}") from exc


def checked_texts(flow_name: str, files: Sequence[ConfigFile]) -> dict[str, str]:
    """The config snapshot's texts by file name, each checked free of literal secrets."""
    return {name: _text(flow_name, name, data) for name, data in files}


def _text(flow_name: str, name: str, data: bytes) -> str:
    """A config file's text, refused when it holds a literal secret (named by line, never shown)."""
    text = data.decode()
    leaks = [str(number) for number, line in enumerate(text.splitlines(), start=1) if _holds_secret(line)]
    if leaks:
        raise DeploymentError(
            f"config file {name!r} of flow {flow_name!r} holds a secret (line {', '.join(leaks)}); a "
            "ConfigMap is no place for it. Put the value in a Kubernetes Secret, list the Secret in the "
            "launcher's pod.env_from_secrets, and write the value as ${oc.env:VARIABLE} in the config. "
            "Nothing was deployed."
        )
    return text


_INTERPOLATION = re.compile(r"\$\{[^{}]*\}")
"""An omegaconf interpolation (``${oc.env:PASSWORD}``): a reference to a secret, not one."""


def _holds_secret(line: str) -> bool:
    """True when redaction would mask something in *line* other than an interpolation."""
    placeholder = "interpolated"
    line = _INTERPOLATION.sub(placeholder, line)
    return redact_text(line).replace("***", placeholder) != line


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
