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
- ``<workload>-deploy`` Lease: held around drain -> launch -> record (:class:`LeaseLock`: renewed by
  read-check-replace while held, taken over only once expired; a holder that lost it stops before its
  next change and never launches).

Records hold no secret: the launch request names config files (checked free of literal secrets, as YAML)
and the env Secret. Records grant nothing: what a relaunch applies (pod settings, request) is sealed with
an HMAC under the installation's key (:func:`seal_job`) and checked before any restart or rollback.
"""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import msgspec
import yaml

from loom_dagster.core.deploy.launch_records import LaunchedJob, LaunchRequest
from loom_dagster.core.deploy.store import (
    HASH_KEY_VARIABLE,
    ConfigFile,
    DeployLock,
    DeployLockLost,
    Deployment,
    DeploymentStore,
    UnreadableRecord,
    history_records,
    installation_key,
    keyed_digest,
    scratch_copy,
)
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.launchers.kubernetes.client import KubeApi, api_error, is_conflict, is_not_found
from loom_dagster.core.launchers.kubernetes.manifests import (
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
from loom_dagster.core.launchers.kubernetes.settings import LEASE_SECONDS, KubernetesSettings
from loom_dagster.core.redact import is_secret_key, redact_text, secret_shape

_log = logging.getLogger(__name__)

STATE_LABEL = "loom-dagster.io/state"
_KEPT_HISTORY = 50
_KEPT_SNAPSHOTS = 10


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
        any more are deleted. Under the flow's lock, only while it is still held (``ensure_held``)."""
        self.ensure_held(deployment.flow_name, "record the deployment")
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
    def lock(self, flow_name: str, holder: str) -> Iterator[DeployLock]:
        """Hold the flow's deploy Lease (:class:`LeaseLock`: renewed while held, its loss detected); fail
        at once, naming the holder, while another holds it. On leaving, the Lease is deleted only if this
        holder still holds it."""
        identity = f"{holder} (pid {os.getpid()} on {socket.gethostname()}, lock {secrets.token_hex(3)})"
        held = LeaseLock(self, flow_name, self._lease_name(flow_name), identity, holder)
        held.acquire()
        try:
            with self.holding(held):
                yield held
        finally:
            held.release()


class LeaseLock(DeployLock):
    """A flow's deploy lock held as a ``coordination.k8s.io`` Lease, honestly.

    Renewal is a read-check-replace, every third of the lease (``lease_seconds``) and at each
    ``ensure_held``: read the Lease, check that it still names this holder and carries the
    ``resourceVersion`` of this holder's last write, then replace it with that ``resourceVersion`` (a
    concurrent write fails it). A Lease someone else holds is never written or deleted. The lock is
    *lost* when another holder (or anyone) changed the Lease, when it was deleted, or when no renewal
    succeeded for a whole lease since the last one (others may take it over from then on): from then,
    ``ensure_held`` raises :class:`DeployLockLost`, naming the flow, the new holder if known, the steps
    done under the lock and the one not done.

    Example:
        >>> with store.lock("orders", holder="run 1") as held:  # doctest: +SKIP
        ...     held.ensure_held("launch the new version")
    """

    def __init__(
        self, store: KubernetesDeploymentStore, flow_name: str, name: str, identity: str, holder: str
    ) -> None:
        super().__init__(flow_name, holder)
        self.store = store
        self.name = name
        self.identity = identity
        self.duration = store.settings.lease_seconds
        self.timeout = max(1.0, self.duration / 3)
        """Seconds a Lease request may take: a hung connection never holds a renewal past the lease."""
        self._mutex = threading.Lock()
        self._version: str | None = None  # the resourceVersion of this holder's last write
        self._renewed = 0.0  # time.monotonic() before the last successful write was sent
        self._lost: str | None = None
        self._taker: str | None = None
        self._error: str | None = None  # the last failed renewal's error, while within the lease
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._run, daemon=True, name=f"renew {name}")

    @property
    def where(self) -> str:
        """``Lease <namespace>/<name>``."""
        return f"Lease {self.store.namespace}/{self.name}"

    @property
    def lost(self) -> str | None:
        """Why this holder no longer holds the Lease (``None``: held)."""
        with self._mutex:
            self._check_deadline()
            return self._lost

    def acquire(self) -> None:
        """Create the Lease, or take it over once expired (its holder died mid-deploy); start renewing.
        ``DeploymentError`` naming the holder while another holds it."""
        api, namespace = self.store.api.coordination, self.store.namespace
        sent = time.monotonic()
        body = self._body(acquired=_now())
        try:
            created = api.create_namespaced_lease(namespace, body)
        except Exception as exc:
            if not is_conflict(exc):
                raise api_error(
                    exc, f"take the deploy lock ({self.where}) of flow {self.flow_name!r}"
                ) from exc
            created = self._take_over(body)
        self._version = created.metadata.resource_version
        self._renewed = sent
        self._renewer.start()

    def _take_over(self, body: dict[str, Any]) -> Any:
        api, namespace, flow = self.store.api.coordination, self.store.namespace, self.flow_name
        try:
            held = api.read_namespaced_lease(self.name, namespace)
        except Exception as exc:
            raise api_error(exc, f"read the deploy lock ({self.where}) of flow {flow!r}") from exc
        if not _expired(held):
            raise DeploymentError(
                f"flow {flow!r} is being deployed or stopped by {held.spec.holder_identity}; this "
                "request changed nothing. Wait for it to finish, then materialize again if needed."
            )
        body["metadata"]["resourceVersion"] = held.metadata.resource_version
        try:  # expired: its holder died mid-deploy (or lost it, and stops before its next change)
            return api.replace_namespaced_lease(self.name, namespace, body)
        except Exception as exc:
            if is_conflict(exc):
                raise DeploymentError(
                    f"flow {flow!r}: another deploy took over its expired lock ({self.where}) first; this "
                    "request changed nothing. Materialize again if needed."
                ) from exc
            raise api_error(
                exc, f"take over the expired deploy lock ({self.where}) of flow {flow!r}"
            ) from exc

    def _body(self, acquired: str, version: str | None = None) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "name": self.name,
            "namespace": self.store.namespace,
            "labels": flow_labels(self.store.settings, self.flow_name),
        }
        if version is not None:
            metadata["resourceVersion"] = version
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration,
            "acquireTime": acquired,
            "renewTime": _now(),
        }
        return {"metadata": metadata, "spec": spec}

    def _run(self) -> None:
        while not self._stop.wait(self.duration / 3):
            if not self.renew():
                return

    def renew(self) -> bool:
        """One read-check-replace of the Lease; ``True`` while this holder still holds it (a failed
        request within the lease keeps it held: nobody may take it over before it expires)."""
        api, namespace = self.store.api.coordination, self.store.namespace
        with self._mutex:
            if self._lost is not None:
                return False
            sent = time.monotonic()
            try:
                current = api.read_namespaced_lease(self.name, namespace, _request_timeout=self.timeout)
            except Exception as exc:
                if is_not_found(exc):
                    return self._lose("the Lease was deleted by someone else")
                return self._failed(exc)
            holder = current.spec.holder_identity
            if holder != self.identity:
                return self._lose(
                    f"it is now held by {holder or 'nobody (its holder was cleared)'}", taker=holder
                )
            if current.metadata.resource_version != self._version:
                return self._lose(
                    f"the Lease was changed by someone else (resourceVersion "
                    f"{current.metadata.resource_version}, this holder wrote {self._version})"
                )
            acquired = current.spec.acquire_time
            body = self._body(_format(acquired) if acquired else _now(), version=self._version)
            try:
                replaced = api.replace_namespaced_lease(
                    self.name, namespace, body, _request_timeout=self.timeout
                )
            except Exception as exc:
                if is_conflict(exc):
                    return self._lose(
                        "the Lease changed while it was being renewed (a resourceVersion conflict)"
                    )
                return self._failed(exc)
            self._version = replaced.metadata.resource_version
            self._renewed = sent
            self._error = None
            return True

    def _failed(self, exc: Exception) -> bool:
        """A renewal that did not reach the API (or was refused): held until the lease runs out."""
        self._error = str(api_error(exc, "renew the Lease"))
        _log.debug("flow %r: %s", self.flow_name, self._error)
        return self._check_deadline()

    def _check_deadline(self) -> bool:
        """Lose the lock once a whole lease passed since the last renewal; ``True`` while held."""
        if self._lost is None and time.monotonic() - self._renewed >= self.duration:
            why = f" (last error: {self._error})" if self._error else ""
            self._lose(
                f"it was not renewed for {time.monotonic() - self._renewed:.1f}s, a whole lease "
                f"({self.duration}s){why}: another deploy may have taken it over since"
            )
        return self._lost is None

    def _lose(self, why: str, taker: str | None = None) -> bool:
        self._lost, self._taker = why, taker
        _log.warning("flow %r: deploy lock (%s) lost: %s", self.flow_name, self.where, why)
        return False

    def ensure_held(self, step: str) -> None:
        """Renew now (one read-check-replace); :class:`DeployLockLost` before *step* if the lock is lost."""
        if not self.renew():
            raise DeployLockLost(self._lost_message(step))
        self.steps.append(step)

    def _lost_message(self, step: str) -> str:
        why, taker = self._lost, self._taker
        if taker is None:  # lost by the deadline: who holds it now, if the API answers
            try:
                current = self.store.api.coordination.read_namespaced_lease(
                    self.name, self.store.namespace, _request_timeout=self.timeout
                )
                other = current.spec.holder_identity
                if other and other != self.identity:
                    why = f"{why}; it is now held by {other}"
            except Exception:
                pass
        done = "; ".join(self.steps) if self.steps else "nothing"
        return (
            f"flow {self.flow_name!r}: {self.holder} lost the flow's deploy lock ({self.where}): {why}. "
            f"It stopped before it would {step}. Done under the lock before: {done}. Not done: {step}, nor "
            "anything after it: this request never launches or records anything more (what runs is up "
            "to the lock's holder now). Materialize again if needed once that one finished."
        )

    def release(self) -> None:
        """Stop renewing; delete the Lease only if this holder still holds it (read-check-delete with
        its ``resourceVersion``): a Lease another holder took over is never touched."""
        self._stop.set()
        if self._renewer.is_alive():
            self._renewer.join(timeout=10)
        api, namespace = self.store.api.coordination, self.store.namespace
        with self._mutex:
            try:
                current = api.read_namespaced_lease(self.name, namespace, _request_timeout=self.timeout)
                if current.spec.holder_identity != self.identity:
                    return
                api.delete_namespaced_lease(
                    self.name,
                    namespace,
                    _request_timeout=self.timeout,
                    body={"preconditions": {"resourceVersion": current.metadata.resource_version}},
                )
            except Exception:  # gone already, taken over meanwhile, or unreachable: it expires on its own
                pass


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


# --------------------------------------------------------------------------------------------------
# Records grant nothing: the seal of what a relaunch applies
# --------------------------------------------------------------------------------------------------

SEAL = "seal"
"""``LaunchedJob.extra`` key of a Kubernetes job's seal (see :func:`seal_job`)."""
_SEAL_CONTEXT = b"loom-dagster kubernetes job record, seal v1\0"


def seal_job(job: LaunchedJob) -> LaunchedJob:
    """*job* with its seal: HMACs, under the installation's key (``keyed_digest``: the config-hash key,
    kept in the cluster as Secret ``loom-dagster-config-hash-key``), of everything a relaunch of it
    applies (:func:`sealed_fields`): one over all of it, and one per field (only to say, when the record
    was edited, which field and from what).

    Why: a restart by the health sensor, a rollback and a rewind start the job the state ConfigMap
    records (its image, service account, env, volumes, the Secret its env comes from, its command),
    and whoever may write ConfigMaps in the namespace may edit that record. Only a deploy from a
    process holding the installation's key can seal it, so :func:`check_seal` refuses a record anyone
    else edited (or an unsealed one, written by an older version) before anything is started.
    """
    fields = sealed_fields(job)
    seal = {
        "v": 1,
        "mac": _mac(fields),
        "fields": {key: _field_mac(job.flow_name, key, value) for key, value in fields.items()},
    }
    return msgspec.structs.replace(job, extra={**job.extra, SEAL: seal})


def sealed_fields(job: LaunchedJob) -> dict[str, Any]:
    """What a relaunch of *job* applies, by field, those at their default left out: its flow, namespace
    and StatefulSet, its recorded pod settings (``pod.<field>``) and its launch request
    (``request.<field>``; the env by name only: its values are in the Secret ``env_ref`` names)."""
    fields: dict[str, Any] = {"flow_name": job.flow_name}
    for key in ("namespace", "statefulset"):
        if job.extra.get(key) is not None:
            fields[key] = job.extra[key]
    pod = job.extra.get("pod")
    if isinstance(pod, dict):
        fields.update({f"pod.{key}": value for key, value in pod.items() if value is not None})
    elif pod is not None:
        fields["pod"] = pod
    request = msgspec.to_builtins(job.request)
    request["env"] = [name for name, _ in job.request.env]
    for field in msgspec.structs.fields(LaunchRequest):
        value = request.get(field.name)
        if field.default is msgspec.NODEFAULT or msgspec.to_builtins(field.default) != value:
            fields[f"request.{field.name}"] = value
    return fields


def check_seal(job: LaunchedJob, settings: KubernetesSettings, store: KubernetesDeploymentStore) -> None:
    """Refuse (``DeploymentError``: nothing was started) to relaunch a recorded *job* whose seal does not
    prove that a deploy from this installation recorded exactly what it says (:func:`seal_job`),
    naming what was changed (``image 'a' -> 'b'`` where the original is known: this launcher's own
    setting), or that it has no seal."""
    flow = job.flow_name
    where = f"ConfigMap {store._state_name(flow)} of namespace {store.namespace!r}"
    seal = job.extra.get(SEAL)
    if not isinstance(seal, dict) or not isinstance(seal.get("mac"), str):
        raise DeploymentError(
            f"the record of flow {flow!r} ({where}) carries no seal: an older loom-dagster version wrote "
            "it (or its seal was removed), so its pod settings (image, service account, env, ...) cannot "
            "be told from ones edited there by anyone who may write ConfigMaps; nothing was started. "
            "Redeploy by materializing the flow."
        )
    fields = sealed_fields(job)
    if hmac.compare_digest(_mac(fields), seal["mac"]):
        return
    store.check_hash_key()  # another key than the installation's: say that, not "edited"
    signed = seal.get("fields")
    signed = signed if isinstance(signed, dict) else {}
    changes = _changes(job, fields, signed, settings)
    raise DeploymentError(
        f"the record of flow {flow!r} ({where}) was changed outside loom-dagster: {'; '.join(changes)}; "
        "nothing was started. Redeploy by materializing the flow."
    )


def _changes(
    job: LaunchedJob, fields: dict[str, Any], signed: dict[str, Any], settings: KubernetesSettings
) -> list[str]:
    """What differs from the sealed record, field by field, from its original where that is known."""
    flow = job.flow_name
    known = {f"pod.{k}": v for k, v in msgspec.to_builtins(settings.pod_for(flow)).items()}
    known.update(namespace=settings.namespace, statefulset=workload_name(settings, flow), flow_name=flow)
    changes = []
    for key in sorted(set(fields) | set(signed)):
        mac = signed.get(key)
        original = known.get(key)
        proven = isinstance(mac, str) and original is not None and _field_mac(flow, key, original) == mac
        if key not in signed:
            changes.append(f"{_label(key)} {_shown(fields[key])} added")
        elif key not in fields:
            changes.append(f"{_label(key)} {_shown(original) + ' ' if proven else ''}removed")
        elif not hmac.compare_digest(_field_mac(flow, key, fields[key]), str(mac)):
            was = f"{_shown(original)} -> " if proven else "changed to "
            changes.append(f"{_label(key)} {was}{_shown(fields[key])}")
    return changes or ["its fields were put together from other records"]


def _label(key: str) -> str:
    group, _, name = key.partition(".")
    if group == "pod" and name:
        return name.replace("_", " ")
    return f"request {name}" if group == "request" else key.replace("_", " ")


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else msgspec.json.encode(value).decode()
    text = redact_text(text)
    return text if len(text) <= 120 else text[:117] + "..."


def _mac(fields: dict[str, Any]) -> str:
    return keyed_digest(_SEAL_CONTEXT + msgspec.json.encode(fields, order="sorted"), 64)


def _field_mac(flow_name: str, key: str, value: Any) -> str:
    data = msgspec.json.encode([flow_name, key, value], order="sorted")
    return keyed_digest(_SEAL_CONTEXT + b"field\0" + data, 16)


def _decode(config_map: Any, what: str) -> Deployment | None:
    text = (config_map.data or {}).get("deployment.json")
    if not text:
        return None
    try:
        return Deployment.decode(text)
    except ValueError as exc:
        raise DeploymentError(f"deployment record of {what!r} in the cluster is unreadable: {exc}") from exc


def checked_texts(flow_name: str, files: Sequence[ConfigFile]) -> dict[str, str]:
    """The config snapshot's texts by file name, each checked free of literal secrets (:func:`_text`)."""
    return {name: _text(flow_name, name, data) for name, data in files}


def _text(flow_name: str, name: str, data: bytes) -> str:
    """A config file's text, refused when it holds a literal secret, named by file, key path and line,
    never shown. The YAML is parsed and every scalar checked with its key path: a literal under a
    secret-named key (``password``, ``sasl.password``, ``api_key``: anything but a reference,
    ``${oc.env:VAR}`` or ``${other.key}``), a secret-shaped value under any key (``redact.secret_shape``:
    a URL with a password, a PEM block, a JAAS password, a bearer or random-looking token), a literal
    inside another resolver (``${oc.decode:'...'}``) alike; every line is checked as text too (a
    comment). A file that is not YAML cannot be checked, so it is refused."""
    refused = (
        f"config file {name!r} of flow {flow_name!r}",
        "Nothing was deployed.",
    )
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise DeploymentError(f"{refused[0]} is not UTF-8 text ({exc.reason}); {refused[1]}") from None
    found = {
        line: f"line {line} (at {path}, {what})" for line, path, what in _yaml_findings(refused[0], text)
    }
    for number, line in enumerate(text.splitlines(), start=1):
        if number not in found and _holds_secret(line):
            found[number] = f"line {number}"
    if found:
        raise DeploymentError(
            f"{refused[0]} holds a literal secret at {', '.join(found[line] for line in sorted(found))}; "
            "a ConfigMap is no place for it. Put the value in a Kubernetes Secret, list the Secret in the launcher's "
            "pod.env_from_secrets, and write the value as ${oc.env:VARIABLE} in the config. "
            f"{refused[1]}"
        )
    return text


_REFERENCE = re.compile(
    r"\$\{(?:oc\.)?env:[ \t]*[A-Za-z_][A-Za-z0-9_]*[ \t]*(?:,[ \t]*(?:null|''|\"\")?[ \t]*)?\}"
    r"|\$\{\.*[A-Za-z_][\w\-]*(?:\.[\w\-]+|\[\d+\])*\}"
)
"""A reference to a value held elsewhere: an environment variable (``${oc.env:PASSWORD}``, without a
literal default) or another config key (``${kafka.password}``); any other interpolation
(``${oc.decode:'...'}``, ``${oc.env:X,literal}``) holds a literal, checked as one."""
_REFERENCED = "interpolated"


def _yaml_findings(what: str, text: str) -> list[tuple[int, str, str]]:
    """(line, key path, what kind of secret) for each scalar of the YAML *text* holding a secret;
    ``DeploymentError`` when *text* is not YAML."""
    try:
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise DeploymentError(
            f"{what} is not valid YAML ({where}{problem}): it cannot be checked for secrets, so it is "
            "refused (it would not load either). Nothing was deployed."
        ) from None
    found: list[tuple[int, str, str]] = []
    seen: set[int] = set()

    def walk(node: yaml.Node | None, path: str, secret_key: bool) -> None:
        if node is None or id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
                walk(value, f"{path}.{name}" if path else name, is_secret_key(name))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, f"{path}[{index}]", secret_key)
        elif isinstance(node, yaml.ScalarNode):
            kind = _scalar_secret(node, secret_key)
            if kind is not None:
                found.append((node.start_mark.line + 1, path or "(the document)", kind))

    for document in documents:
        walk(document, "", False)
    return found


def _scalar_secret(node: yaml.ScalarNode, secret_key: bool) -> str | None:
    """What secret a YAML scalar holds (under a secret-named key: any literal), or ``None``."""
    value = str(node.value)
    if node.tag in ("tag:yaml.org,2002:null", "tag:yaml.org,2002:bool") or not value.strip():
        return None  # absent, or a switch (``sasl.password_required: false``): no secret
    if secret_key and _REFERENCE.sub("", value).strip():
        return "a literal value under a key naming a secret"
    return secret_shape(_REFERENCE.sub(_REFERENCED, value), reference=_REFERENCED)


def _holds_secret(line: str) -> bool:
    """True when redaction would mask something in *line* other than a reference (:data:`_REFERENCE`)."""
    line = _REFERENCE.sub(_REFERENCED, line)
    return redact_text(line).replace("***", _REFERENCED) != line


def _now() -> str:
    return _format(dt.datetime.now(dt.UTC))


def _format(moment: dt.datetime) -> str:
    """A Lease's MicroTime."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
