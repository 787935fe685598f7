"""Orphan jobs: a running job of a known flow that has no deployment record in this state directory
(or whose record names other pids), e.g. after the state dir was wiped or ``DAGSTER_HOME`` changed,
or when a second Dagster instance on the host deploys the same flow.

Found two ways, merged by host + pid:

- the consumer-group fence on the broker (:mod:`loom_dagster.core.checks.fence`): every member of a flow's
  fence group names its host and pid, on any host; one DescribeGroups round per cluster. For a flow
  whose fence was read, this is the whole answer: it is keyed by the consumer group, where a process
  name is not (a same-named flow of another environment may run on the host with another group);
- the process table of this host, for the other flows (no fence target: Mongo source, no record to
  name the group, a secured cluster in the CLI, or a cluster that did not answer): every
  ``python -m loom_dagster.runtime`` process *of this user* whose ``--flow-name`` is a known flow
  (PID + start time, so a reused PID is never mistaken for it). Another user's runtime is none of
  ours: not listed from the process table, and never stopped from here.

A local process is an orphan only when neither this state dir nor the state dir it was launched
from (its ``--status-file`` lives there) records it: a job another state dir (another Dagster instance)
legitimately runs is not listed by name, since its flow may use another consumer group; when it does
consume the same group, its fence membership reports it. A fence member is an orphan whenever this
state dir does not record it (same group = a real conflict), unless it is a dead process of this host
whose membership is about to expire. A flow whose deploy lock is held (a deploy, restart or stop in
progress) is skipped: its new job runs before it is recorded. Dagster-free.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

import msgspec

from loom_dagster.core import procfs
from loom_dagster.core.checks.fence import FenceMember, fence_group, members_by_group
from loom_dagster.core.deploy.launch_records import JobProcess, LaunchedJob, LaunchRequest, RuntimeProcess
from loom_dagster.core.deploy.store import Deployment, DeploymentStore
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.kafka.cluster import KafkaCluster
from loom_dagster.core.launchers.base import Launcher
from loom_dagster.core.launchers.registry import load_launcher

DEFAULT_TIMEOUT_S = 5.0


class FenceTarget(msgspec.Struct, frozen=True):
    """A Kafka-sourced flow whose fence to look at: its name, consumer group and cluster."""

    flow_name: str
    consumer_group: str
    cluster: KafkaCluster


class Orphan(msgspec.Struct, frozen=True):
    """A running job of a flow that this state directory does not record."""

    flow_name: str
    host: str
    pid: int | None
    found_by: str
    """``fence``, ``process`` or ``fence+process``."""
    consumer_group: str | None = None
    start_ticks: int | None = None
    run_id: str | None = None
    status_file: str | None = None
    client_id: str | None = None
    local: bool = False
    """True when it runs where this launcher reaches (then ``loom-dagster stop`` can stop it here)."""
    owner: str | None = None
    """``uid N`` when it runs on this host as another user (a fence holder): only that user stops it."""

    def stop_hint(self) -> str:
        """How to stop it."""
        if self.pid is None:
            return f"stop the client {self.client_id!r} (it is not a loom-dagster job)"
        if self.owner is not None:
            return f"`kill {self.pid}` on host {self.host} as its owner ({self.owner}; SIGTERM drains it)"
        return (
            f"`loom-dagster stop {self.flow_name}` on host {self.host} (any state dir), or "
            f"`kill {self.pid}` on host {self.host} (SIGTERM drains it)"
        )

    def describe(self, state_dir: Path | None = None) -> str:
        """``orphan job: pid P on host H consumes group G with no deployment record here; stop it with ...``."""
        who = f"pid {self.pid}" if self.pid is not None else f"client {self.client_id!r}"
        group = f"consumes group {self.consumer_group!r}" if self.consumer_group else "runs"
        where = f" ({state_dir})" if state_dir is not None else ""
        owner = _owner(self.status_file, state_dir)
        return (
            f"orphan job: {who} on host {self.host} {group} with no deployment record here{where}"
            f"{owner}; stop it with {self.stop_hint()}"
        )


def _owner(status_file: str | None, state_dir: Path | None) -> str:
    root = _state_dir_of(status_file)
    if root is None:
        return ""
    if state_dir is not None and root.resolve() == Path(state_dir).resolve():
        return " (its files are in this state dir but its record is gone)"
    return f" (launched from state dir {root})"


class OrphanReport(msgspec.Struct, frozen=True):
    """Orphans per flow, and the clusters whose fences could not be read (with why)."""

    orphans: tuple[Orphan, ...] = ()
    unreachable: tuple[str, ...] = ()

    def of(self, flow_name: str) -> list[Orphan]:
        """The orphans of one flow."""
        return [o for o in self.orphans if o.flow_name == flow_name]


def deploy_in_progress(store: DeploymentStore, flow_name: str) -> bool:
    """True while a deploy, restart or stop of the flow holds its lock (its new job is not recorded yet)."""
    return store.lock_held(flow_name)


def _recorded(record: Deployment | None, host: str, pid: int | None) -> bool:
    return record is not None and record.runs_process(host, pid)


def find_orphans(
    store: DeploymentStore,
    *,
    flows: Collection[str] | None = None,
    targets: Sequence[FenceTarget] = (),
    timeout_s: float = DEFAULT_TIMEOUT_S,
    processes: Iterable[RuntimeProcess] | None = None,
    launcher: Launcher | None = None,
    records: Mapping[str, Deployment | None] | None = None,
) -> OrphanReport:
    """Running jobs of known flows that ``store`` does not record (fence holders + local processes).

    ``flows`` are the known flows (``None``: every flow of a local runtime process, every target and
    every record); ``targets`` are the fences to read (one describe per cluster, ``timeout_s`` each);
    ``processes`` replaces the launcher's process scan (``launcher``: the local one by default);
    ``records``, the known flows' current records when the caller has read them already (their keys
    are then the known flows).
    """
    launcher = launcher or load_launcher("local")
    scanned = list(launcher.runtime_processes() if processes is None else processes)
    known = set(records) if records is not None else _known_flows(store, flows, targets, scanned)
    if records is None:
        try:
            records = store.current_many(known)
        except DeploymentError:  # an unreadable record: read them one by one, it names no pid
            records = {name: _current(store, name) for name in known}
    busy = store.locks_held(known)
    groups = {t.flow_name: t.consumer_group for t in targets}
    members, errors = _fence_members(targets, timeout_s)
    fenced = {t.flow_name for t in targets if t.cluster not in errors}
    found: dict[tuple[str, int | None, str], Orphan] = {}
    for proc in scanned:
        name = proc.flow_name
        if name is None or name not in known or name in busy or name in fenced:
            continue
        if _recorded(records[name], proc.host, proc.pid):
            continue
        if _owned_elsewhere(proc, name, store.root, proc.host):
            continue
        found[(proc.host, proc.pid, name)] = Orphan(
            name,
            proc.host,
            proc.pid,
            "process",
            groups.get(name),
            proc.start_ticks,
            proc.run_id,
            proc.status_file,
            local=True,
        )
    for target in targets:
        if target.flow_name in busy or target.flow_name not in known:
            continue
        for member in members.get(fence_group(target.consumer_group), ()):
            orphan = _member_orphan(target, member, records.get(target.flow_name), scanned)
            if orphan is not None:
                _merge(found, orphan)
    orphans = tuple(sorted(found.values(), key=lambda o: (o.flow_name, o.host, o.pid or 0)))
    return OrphanReport(orphans, tuple(f"{c.bootstrap}: {why}" for c, why in errors.items()))


def _current(store: DeploymentStore, flow_name: str) -> Deployment | None:
    try:
        return store.current(flow_name)
    except DeploymentError:  # an unreadable record names no pid
        return None


def _owned_elsewhere(proc: RuntimeProcess, flow_name: str, root: Path, host: str) -> bool:
    """True if the state dir the process was launched from (not ours) records it, or is deploying it."""
    owner = _state_dir_of(proc.status_file)
    if owner is None or owner.resolve() == root.resolve():
        return False
    other = DeploymentStore(owner)
    return _recorded(_current(other, flow_name), host, proc.pid) or deploy_in_progress(other, flow_name)


def _state_dir_of(status_file: str | None) -> Path | None:
    """``<state dir>`` of ``<state dir>/flows/<flow>/<time>/<n>/status-<i>.json`` (``None`` otherwise)."""
    if not status_file:
        return None
    flows = next((p for p in Path(status_file).parents if p.name == "flows"), None)
    return flows.parent if flows is not None else None


def _known_flows(
    store: DeploymentStore,
    flows: Collection[str] | None,
    targets: Sequence[FenceTarget],
    scanned: Sequence[RuntimeProcess],
) -> set[str]:
    if flows is not None:
        return set(flows)
    names = {t.flow_name for t in targets} | {d.flow_name for d in store.all()}
    return names | {p.flow_name for p in scanned if p.flow_name}


def _fence_members(
    targets: Sequence[FenceTarget], timeout_s: float
) -> tuple[dict[str, tuple[FenceMember, ...]], dict[KafkaCluster, str]]:
    by_cluster: dict[KafkaCluster, list[str]] = defaultdict(list)
    for target in targets:
        by_cluster[target.cluster].append(fence_group(target.consumer_group))
    return members_by_group(by_cluster, timeout_s)


def _member_orphan(
    target: FenceTarget, member: FenceMember, record: Deployment | None, scanned: Sequence[RuntimeProcess]
) -> Orphan | None:
    identity = member.identity
    if identity is None:
        address = member.address.lstrip("/")
        return Orphan(
            target.flow_name, address, None, "fence", target.consumer_group, client_id=member.client_id
        )
    if _recorded(record, identity.host, identity.pid) or identity.alive() is False:
        return None  # the recorded job, or a dead one whose membership is expiring
    local = next(
        (p for p in scanned if identity.local and p.pid == identity.pid and p.host == identity.host), None
    )
    owner = procfs.owner(identity.pid) if identity.local and local is None else None
    return Orphan(
        target.flow_name,
        identity.host,
        identity.pid,
        "fence",
        target.consumer_group,
        identity.start_ticks,
        identity.run_id,
        local.status_file if local is not None else None,
        member.client_id,
        # stoppable from here only when it is one of this user's runtime processes (the scan's)
        local=identity.local and local is not None,
        owner=owner.describe() if owner is not None and not owner.is_us() else None,
    )


def _merge(found: dict[tuple[str, int | None, str], Orphan], orphan: Orphan) -> None:
    key = (orphan.host, orphan.pid, orphan.flow_name)
    seen = found.get(key)
    if seen is None:
        found[key] = orphan
        return
    found[key] = msgspec.structs.replace(
        seen,
        found_by="fence+process",
        consumer_group=seen.consumer_group or orphan.consumer_group,
        client_id=orphan.client_id,
        local=seen.local or orphan.local,
    )


def stop_orphans(
    orphans: Iterable[Orphan], timeout_s: float, launcher: Launcher | None = None
) -> list[Orphan]:
    """Stop the local orphans by PID + start time through *launcher* (the local one by default):
    SIGTERM (drain), SIGKILL after ``timeout_s``."""
    stopped = []
    launcher = launcher or load_launcher("local")
    for orphan in orphans:
        if not orphan.local or orphan.pid is None:
            continue
        job = _as_job(orphan, launcher.name)
        if launcher.report(job).alive_processes == 0:
            continue
        launcher.stop(job, timeout_s)
        stopped.append(orphan)
    return stopped


def _as_job(orphan: Orphan, launcher: str) -> LaunchedJob:
    """A launched-job view of an orphan process, for ``Launcher.stop``."""
    assert orphan.pid is not None
    request = LaunchRequest(orphan.flow_name, "", (), "", "", "")
    process = JobProcess(orphan.pid, orphan.start_ticks or 0, status_path=orphan.status_file or "")
    return LaunchedJob(orphan.flow_name, launcher, orphan.host, (process,), "", 0.0, request)
