"""Deployment records, config snapshots and the deploy lock, kept in the cluster.

The webserver, the daemon, run pods and the CLI anywhere read one truth:

- ``<workload>-state`` ConfigMap: ``deployment.json`` (the current record) and ``history.jsonl`` (the last
  deployments, newest last), updated with optimistic concurrency (``resourceVersion``);
- ``<workload>-config-<hash>`` ConfigMaps: the config snapshot each deployment runs (immutable, checked
  free of secrets: a literal password belongs in a Secret, referenced as ``${oc.env:VAR}``);
- ``<workload>-deploy`` Lease: held around drain -> launch -> record, renewed while held, taken over
  only once expired (a deploy that died holding it).

Records hold no secret: the launch request names config files and env values already checked.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from loom_dagster.deployments import ConfigFile, Deployment, DeploymentStore, scratch_copy
from loom_dagster.errors import DeploymentError
from loom_dagster.launchers.kubernetes.client import KubeApi, api_error, is_conflict, is_not_found
from loom_dagster.launchers.kubernetes.manifests import (
    FLOW_ANNOTATION,
    config_map_manifest,
    config_map_name,
    config_map_of,
    config_mount,
    flow_labels,
    label_selector,
    workload_name,
)
from loom_dagster.launchers.kubernetes.settings import KubernetesSettings
from loom_dagster.redact import redact_text

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

    def all(self) -> list[Deployment]:
        """Every flow's current record in the namespace (one list request; unreadable ones skipped)."""
        try:
            found = self.api.core.list_namespaced_config_map(
                self.namespace, label_selector=f"{STATE_LABEL}=deployment"
            )
        except Exception as exc:
            raise api_error(exc, "list deployment records") from exc
        records = []
        for item in sorted(found.items, key=lambda i: i.metadata.name):
            try:
                record = _decode(item, item.metadata.name)
            except DeploymentError:
                continue
            if record is not None:
                records.append(record)
        return records

    def current_many(self, flow_names: Iterable[str]) -> dict[str, Deployment | None]:
        """The current record of each flow, from one list request (a sensor tick reads every flow)."""
        by_name = {record.flow_name: record for record in self.all()}
        return {name: by_name.get(name) for name in flow_names}

    def save(self, deployment: Deployment, *, history: bool = True) -> None:
        """Write the current record (and append it to the history), retrying lost races."""
        name = self._state_name(deployment.flow_name)
        encoded = deployment.encode(indent=2).decode()
        for _ in range(10):
            state = self._read_state(deployment.flow_name)
            data = dict(state.data or {}) if state is not None else {}
            data["deployment.json"] = encoded
            if history:
                lines = (data.get("history.jsonl") or "").splitlines()[-(_KEPT_HISTORY - 1) :]
                data["history.jsonl"] = "\n".join([*lines, deployment.encode().decode()]) + "\n"
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
                return
            except Exception as exc:
                if is_conflict(exc):
                    continue  # another writer got there first: read again
                raise api_error(exc, f"record the deployment of flow {deployment.flow_name!r}") from exc
        raise DeploymentError(
            f"could not record the deployment of flow {deployment.flow_name!r}: kept racing"
        )

    def history(self, flow_name: str) -> list[Deployment]:
        """The flow's recorded deployments, oldest first (the last 50)."""
        state = self._read_state(flow_name)
        text = (state.data or {}).get("history.jsonl", "") if state is not None else ""
        return [Deployment.decode(line) for line in text.splitlines() if line]

    def snapshot_config(self, flow_name: str, files: Sequence[ConfigFile], label: str) -> tuple[str, ...]:
        """An immutable ConfigMap holding the config files; returns their paths in the pod.

        Refuses a file holding a literal secret: ConfigMaps are readable by anyone who may read the
        namespace's config, so secrets go to a Secret (``env_from_secrets``) and ``${oc.env:VAR}``.
        """
        texts = checked_texts(flow_name, files)
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
