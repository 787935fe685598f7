"""``RealNode``: a real Kubernetes node for the test control plane: kubelet + containerd + runc + a CNI bridge +
CoreDNS, all local processes, so that pods run as real containers from real images.

What runs (binaries from ``scripts/k8s-build``; runc and the CNI plugins from Debian), each start in a fresh
``<workdir>/run<N>``::

    containerd   --config run<N>/containerd/config.toml   root under run<N>/containerd, state + sockets in <rundir>
    coredns      -conf run<N>/coredns/Corefile            on <bridge gateway>:53, cluster.local from the apiserver
    kubelet      --config run<N>/kubelet/config.yaml      root-dir, cert-dir, pod logs, volume plugins in run<N>

``<rundir>`` is a short directory (``/run/loom-node-XXXX``, linked as ``run<N>/run``) because unix socket paths
are limited to 108 bytes and containerd's shim sockets are ``<rundir>/s/<64 hex>``. Logs: ``run<N>/logs``.

Networking: a Linux bridge of its own (``loombr<N>``, 10.244.<N>.0/24, gateway 10.244.<N>.1 on the host) made
before containerd starts, used by the CNI ``bridge`` plugin with ``host-local`` IPAM: each pod gets its own
10.244.<N>.x address; no masquerade. CoreDNS listens on the gateway address and kubelet's ``clusterDNS`` points
there, so pods resolve ``<svc>.<ns>.svc.cluster.local`` and, for a headless Service,
``<pod hostname>.<svc>.<ns>.svc.cluster.local`` (StatefulSet pods); other names get NXDOMAIN (nothing is
forwarded off the machine). There is no kube-proxy: ClusterIPs resolve but do not route; use headless Services or
pod IPs. The apiserver listens on 127.0.0.1 only, so pods cannot reach it.

Host services: a pod reaches this machine at ``node.host_ip`` (the bridge gateway, kept across a restart of the
same ``RealNode``). A host service for pods must listen on that address (or on 0.0.0.0), not on 127.0.0.1, and
bind it after the node started (the address exists only while the node runs); a Kafka broker must also advertise
``host_ip`` on that listener. Pods also reach the node IP (``node.node_ip``, the machine's interface address),
but listening there exposes the service beyond this machine.

Only one ``RealNode`` (one kubelet) can run on a machine at a time, as kubelet owns the ``kubepods`` cgroups: a
machine-wide lock (``/run/loom-dagster-real-node.lock``) is held from ``start()`` to the end of ``close()``, and a
second node, in any process, fails at once. ``close()`` tears down in order: cordon, delete the node's pods
through the API, stop kubelet, kill what is left in the pod cgroups, stop containerd and CoreDNS, kill leftover
shims (found by the containerd socket on their command line), unmount everything under its dirs, remove the
``kubepods`` cgroups and the bridge, restore the kernel settings kubelet changes (``kernel.panic`` ...), remove
the iptables chains kubelet makes when iptables is installed (KUBE-FIREWALL ...), its ``/var/log/containers``
links, and delete the Node; then it verifies that nothing is left and raises ``RuntimeError`` naming what is.
Every process is started in its own session and ended by its PID (SIGTERM, wait, SIGKILL); a watchdog ends
kubelet, containerd and CoreDNS if the test process dies, and ``/run/loom-dagster-real-node.json`` records what
the node made, so that the next ``start()`` removes what a killed test process left (containers, shims, mounts,
cgroups, bridge, settings). A node can be started again after ``close()`` (same name and addresses, fresh
state, the images given to ``import_image`` imported again).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.support.k8s.cluster import (
    BINARIES,
    BUILD_SCRIPT,
    Component,
    KubeCluster,
    Reaper,
    default_bin_dir,
    free_port,
    node_ready,
    proc_start_time,
    stop_components,
    tail,
)
from tests.support.k8s.images import PAUSE_IMAGE, pause_image

NODE_BINARIES = ("kubelet", "containerd", "containerd-shim-runc-v2", "ctr", "coredns", "pause")
RUNC = Path("/usr/sbin/runc")
CNI_BIN_DIR = Path("/usr/lib/cni")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTAINER_LOG_LINKS = Path("/var/log/containers")  # kubelet links every container log here (not configurable)
CNI_CACHE = Path("/var/lib/cni")  # libcni's result cache inside containerd (not configurable)
KUBELET_DEVICE_PLUGINS = Path(
    "/var/lib/kubelet/device-plugins"
)  # kubelet's kubelet.sock (not under --root-dir)
NODE_LABEL = ("loom-test/node", "real")
# One RealNode per machine: held (flock) from start() to the end of close(). The state file names what the running
# node made on the machine, so that the next start() can remove it if its process died without closing.
MACHINE_LOCK = Path("/run/loom-dagster-real-node.lock")
MACHINE_STATE = Path("/run/loom-dagster-real-node.json")
CLUSTER_DOMAIN = "cluster.local"
# Kernel settings kubelet changes at start-up (protectKernelDefaults false): restored by close().
KUBELET_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)


def build_node_binaries(log_path: Path | None = None) -> Path:
    """Run ``scripts/k8s-build`` (a no-op when cached) and return the bin dir; raise with the log tail when it
    fails or leaves a node binary missing."""
    log_path = log_path or Path(tempfile.gettempdir()) / f"loom-k8s-build-{os.getuid()}.log"
    with log_path.open("w") as log:
        rc = subprocess.run(
            [str(BUILD_SCRIPT)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        ).returncode
    bin_dir = default_bin_dir()
    missing = [b for b in (*BINARIES, *NODE_BINARIES) if not (bin_dir / b).exists()]
    if rc != 0 or missing:
        raise RuntimeError(
            f"scripts/k8s-build failed (rc={rc}, missing={missing}); log {log_path}:\n{tail(log_path)}"
        )
    return bin_dir


def machine_ip() -> str:
    """The machine's own interface address (the source of its default route): kubelet refuses loopback."""
    out = subprocess.run(["ip", "-4", "route", "get", "1"], capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"\bsrc (\d+\.\d+\.\d+\.\d+)", out)
    if not m:
        raise RuntimeError(f"cannot find this machine's IPv4 address from 'ip -4 route get 1': {out!r}")
    return m.group(1)


def dns_query(
    server: str, name: str, qtype: int = 1, timeout: float = 2.0, port: int = 53
) -> tuple[int, list[str]]:
    """One DNS query over UDP: (rcode, A-record addresses) for ``name`` (qtype 1 = A). Raises OSError on timeout."""
    qid = random.randrange(1 << 16)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, (server, port))
        data = s.recv(4096)
    rid, flags, qd, an = struct.unpack("!HHHH", data[:8])
    if rid != qid:
        raise OSError("DNS answer for another query")
    off = 12
    for _ in range(qd):
        off = _skip_name(data, off) + 4
    addrs = []
    for _ in range(an):
        off = _skip_name(data, off)
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", data[off : off + 10])
        off += 10
        if rtype == 1 and rdlen == 4:
            addrs.append(socket.inet_ntoa(data[off : off + 4]))
        off += rdlen
    return flags & 0xF, addrs


def _skip_name(data: bytes, off: int) -> int:
    while True:
        n = data[off]
        if n == 0:
            return off + 1
        if n & 0xC0 == 0xC0:
            return off + 2
        off += n + 1


IPTABLES_NFT_TABLES = {
    f"{family} {table}" for family in ("ip", "ip6") for table in ("filter", "nat", "mangle")
}


def iptables_chains() -> dict[tuple[str, str], set[str]]:
    """``{(iptables-save or ip6tables-save, table): {KUBE-* chains}}`` on this machine, plus ``("nft", "tables")``:
    the nftables tables iptables-nft makes (``ip filter``, ``ip6 nat`` ...) that exist. Empty without iptables."""
    found: dict[tuple[str, str], set[str]] = {}
    for save in ("iptables-save", "ip6tables-save"):
        if shutil.which(save) is None:
            continue
        out = subprocess.run([save], capture_output=True, text=True, timeout=30).stdout
        table = ""
        for line in out.splitlines():
            if line.startswith("*"):
                table = line[1:]
                found.setdefault((save, table), set())
            elif line.startswith(":KUBE-"):
                found[(save, table)].add(line[1:].split()[0])
    if shutil.which("nft") is not None:
        out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=30).stdout
        tables = {
            line.removeprefix("table ").strip() for line in out.splitlines() if line.startswith("table ")
        }
        found[("nft", "tables")] = tables & IPTABLES_NFT_TABLES
    return found


def remove_iptables_chains(before: dict[tuple[str, str], set[str]]) -> None:
    """Remove the KUBE-* chains (and the rules jumping to them) that were not there in ``before``: kubelet makes
    KUBE-IPTABLES-HINT, KUBE-KUBELET-CANARY and KUBE-FIREWALL (with a rule in INPUT and OUTPUT) when iptables
    is installed, and never removes them. Then delete the tables iptables-nft made for them, when left empty."""
    for (save, table), chains in iptables_chains().items():
        new = chains - before.get((save, table), set())
        if not new or save == "nft":
            continue
        cmd = save.replace("-save", "")
        out = subprocess.run([save, "-t", table], capture_output=True, text=True, timeout=30).stdout
        for line in out.splitlines():
            if not line.startswith("-A "):
                continue
            rule = shlex.split(line)
            owner, target = rule[1], rule[rule.index("-j") + 1] if "-j" in rule else ""
            if target in new and owner not in new:
                subprocess.run([cmd, "-t", table, "-D", *rule[1:]], capture_output=True, timeout=30)
        for chain in sorted(new):
            subprocess.run([cmd, "-t", table, "-F", chain], capture_output=True, timeout=30)
        for chain in sorted(new):
            subprocess.run([cmd, "-t", table, "-X", chain], capture_output=True, timeout=30)
    tables = iptables_chains().get(("nft", "tables"), set()) - before.get(("nft", "tables"), set())
    for family_table in sorted(tables):
        family, table = family_table.split()
        listing = subprocess.run(
            ["nft", "-j", "list", "table", family, table], capture_output=True, text=True, timeout=30
        ).stdout
        if listing and not any("rule" in item for item in json.loads(listing).get("nftables", [])):
            subprocess.run(["nft", "delete", "table", family, table], capture_output=True, timeout=30)


def mounts_under(*roots: Path) -> list[str]:
    """Mount points at or below any of ``roots`` (from /proc/self/mountinfo), deepest first."""
    prefixes = [str(r.resolve()) for r in roots]
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == p or point.startswith(p + "/") for p in prefixes):
            found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


def kubepods_cgroups() -> list[Path]:
    """Every ``kubepods*`` cgroup directory in every cgroup hierarchy, children before parents (cgroups that
    vanish while it looks, as pods go away, are skipped)."""
    found: list[Path] = []
    try:
        hierarchies = [h for h in CGROUP_ROOT.iterdir() if h.is_dir()]
    except OSError:
        return found
    for hierarchy in hierarchies:
        try:
            tops = [t for t in hierarchy.iterdir() if t.name.startswith("kubepods")]
        except OSError:
            continue
        for top in tops:
            for dirpath, _dirs, _files in os.walk(top):  # os.walk ignores directories that vanish
                found.append(Path(dirpath))
    return sorted(found, key=lambda p: -len(p.parts))


def cgroup_pids(dirs: list[Path]) -> set[int]:
    """The processes in the given cgroups."""
    pids: set[int] = set()
    for d in dirs:
        try:
            pids.update(int(x) for x in (d / "cgroup.procs").read_text().split())
        except (OSError, ValueError):
            pass
    return pids


def processes_with_arg(arg: str) -> list[int]:
    """PIDs whose command line has ``arg`` as one of its arguments (e.g. a containerd socket path)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arg.encode() in argv:
            out.append(int(entry.name))
    return out


def kill_pids(pids: set[int] | list[int], grace: float = 5.0) -> None:
    """SIGTERM the given PIDs (each checked against its /proc start time), wait, SIGKILL the rest."""
    started = {p: proc_start_time(p) for p in pids}
    alive = lambda: [p for p, st in started.items() if st is not None and proc_start_time(p) == st]  # noqa: E731
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for p in alive():
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)


class RealNode:
    """A real node (kubelet + containerd + CNI bridge + CoreDNS) registered with ``cluster``.

    Use as a context manager, or ``start()`` and ``close()``. Pods land on it with a nodeSelector on its label
    (``loom-test/node: real`` by default, or ``kubernetes.io/hostname: <name>``) and use images imported with
    ``import_image`` (``imagePullPolicy: Never``/``IfNotPresent``: there is no registry).
    """

    def __init__(
        self,
        cluster: KubeCluster,
        workdir: Path,
        *,
        name: str = "loom-real",
        bin_dir: Path | None = None,
        labels: dict[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.cluster = cluster
        self.workdir = Path(workdir)
        self.name = name
        self.bin_dir = Path(bin_dir or default_bin_dir())
        self.labels = labels if labels is not None else dict([NODE_LABEL])
        self.start_timeout = start_timeout
        self.components: list[Component] = []
        self.timings: dict[str, float] = {}
        self.node_ip = ""
        self.subnet = ipaddress.ip_network("10.244.0.0/24")
        self.bridge = ""
        self.rundir: Path | None = None
        self.ports: dict[str, int] = {}
        self.started = False
        self._reaper: Reaper | None = None
        self._sysctls: dict[str, str] = {}
        self._iptables: dict[tuple[str, str], set[str]] | None = None
        self._created_paths: list[Path] = []
        self._generation = 0
        self._imported: list[
            Path
        ] = []  # imported again by a restart (each start has a fresh containerd root)
        self._lock_fd: int | None = None

    # -- addresses and paths

    @property
    def host_ip(self) -> str:
        """The address pods reach this machine at (the bridge gateway): bind host services for pods here."""
        return str(self.subnet.network_address + 1)

    @property
    def dns_ip(self) -> str:
        """Where CoreDNS answers (kubelet's clusterDNS): the bridge gateway."""
        return self.host_ip

    @property
    def gen_dir(self) -> Path:
        """This start's directory (``<workdir>/run<N>``): a restarted node never reuses a previous state."""
        return self.workdir / f"run{self._generation}"

    @property
    def containerd_socket(self) -> Path:
        assert self.rundir is not None, "node not started"
        return self.rundir / "containerd.sock"

    @property
    def kubelet_root(self) -> Path:
        return self.gen_dir / "kubelet" / "root"

    @property
    def pod_logs_dir(self) -> Path:
        return self.gen_dir / "kubelet" / "pod-logs"

    @property
    def network_name(self) -> str:
        return f"loom-{self.bridge}"

    def log_path(self, component: str) -> Path:
        return self.gen_dir / "logs" / f"{component}.log"

    # -- lifecycle

    def __enter__(self) -> RealNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> RealNode:
        """Start containerd, CoreDNS and kubelet; return when the Node is Ready and labelled."""
        if self.started:
            raise RuntimeError("node already started")
        self.timings = {}
        self._check_prerequisites()
        self._lock()
        try:
            self._recover_stale()
            busy = cgroup_pids(kubepods_cgroups())
            if busy:
                raise RuntimeError(
                    f"kubepods cgroups hold processes {sorted(busy)[:20]}: a kubelet that is not a RealNode runs on "
                    "this machine; only one kubelet can run at a time"
                )
            # Empty kubepods cgroups (of a kubelet killed long ago) are harmless to remove; kubelet would reuse them.
            self._remove_cgroups()
        except BaseException:
            self._unlock()
            raise
        self._generation += 1
        t0 = time.monotonic()
        self.started = True
        try:
            self._start()
        except BaseException as e:
            detail = self.describe()
            try:
                self.close()
            except Exception as close_error:  # noqa: BLE001 - report both
                raise RuntimeError(
                    f"node start failed ({e}) and so did its teardown: {close_error}\n{detail}"
                ) from e
            raise RuntimeError(f"node start failed: {e}\n{detail}") from e
        self.timings["start"] = round(time.monotonic() - t0, 2)
        return self

    def _check_prerequisites(self) -> None:
        missing = [b for b in NODE_BINARIES if not (self.bin_dir / b).exists()]
        missing += [
            str(p) for p in (RUNC, CNI_BIN_DIR / "bridge", CNI_BIN_DIR / "host-local") if not p.exists()
        ]
        if missing:
            raise RuntimeError(
                f"missing {missing}: run scripts/k8s-build (it installs runc and the CNI plugins)"
            )

    def _lock(self) -> None:
        fd = os.open(MACHINE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children (O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                holder = json.loads(MACHINE_STATE.read_text()).get("owner_pid")
            except (OSError, ValueError):
                holder = "unknown"
            raise RuntimeError(
                f"another RealNode runs on this machine (process {holder}, lock {MACHINE_LOCK}): only one kubelet "
                "can run at a time"
            ) from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _state(self) -> dict[str, Any]:
        return {
            "owner_pid": os.getpid(),
            "name": self.name,
            "workdir": str(self.workdir),
            "generation": self._generation,
            "rundir": str(self.rundir) if self.rundir else None,
            "bridge": self.bridge,
            "sysctls": self._sysctls,
            "iptables": [
                [save, table, sorted(chains)] for (save, table), chains in (self._iptables or {}).items()
            ],
            "created_paths": [str(p) for p in self._created_paths],
            "components": [[c.name, c.proc.pid, proc_start_time(c.proc.pid)] for c in self.components],
        }

    def _write_state(self) -> None:
        tmp = MACHINE_STATE.with_name(MACHINE_STATE.name + ".tmp")
        tmp.write_text(json.dumps(self._state(), indent=1))
        tmp.replace(MACHINE_STATE)

    def _recover_stale(self) -> None:
        """Remove what a RealNode whose process died without ``close()`` left (as its state file names it)."""
        try:
            state = json.loads(MACHINE_STATE.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            MACHINE_STATE.unlink(missing_ok=True)
            return
        t0 = time.monotonic()
        ghost = RealNode(self.cluster, Path(state["workdir"]), name=state["name"], bin_dir=self.bin_dir)
        ghost._generation = state["generation"]
        ghost.rundir = Path(state["rundir"]) if state["rundir"] else None
        ghost.bridge = state["bridge"]
        ghost._sysctls = state["sysctls"]
        ghost._iptables = {(save, table): set(chains) for save, table, chains in state["iptables"]}
        ghost._created_paths = [Path(p) for p in state["created_paths"]]
        kill_pids({pid for _name, pid, started in state["components"] if proc_start_time(pid) == started})
        problems: list[str] = []
        ghost._teardown_host(problems)
        leftovers = ghost.leftovers(api=False)
        if problems or leftovers:
            raise RuntimeError(
                f"a previous RealNode (process {state['owner_pid']}) died without closing, and what it left could "
                f"not be removed: {'; '.join(problems + leftovers)} (state {MACHINE_STATE})"
            )
        if ghost.rundir is not None:
            shutil.rmtree(ghost.rundir, ignore_errors=True)
        MACHINE_STATE.unlink(missing_ok=True)
        self.timings["recovered_stale_node"] = round(time.monotonic() - t0, 2)

    def _start(self) -> None:
        self.gen_dir.mkdir(parents=True, exist_ok=True)
        self.rundir = Path(
            tempfile.mkdtemp(prefix="loom-node-", dir="/run" if os.access("/run", os.W_OK) else None)
        )
        link = self.gen_dir / "run"
        link.unlink(missing_ok=True)
        link.symlink_to(self.rundir)
        self._reaper = Reaper(self.gen_dir / "pids")
        self.node_ip = machine_ip()
        self._remember_host_paths()
        self._write_state()
        self._make_bridge()
        self._sysctls = {k: _read_sysctl(k) for k in KUBELET_SYSCTLS}
        self._iptables = iptables_chains()
        self._write_state()
        self.ports = {"kubelet": free_port(), "kubelet_healthz": free_port()}

        t = time.monotonic()
        self._spawn(
            "containerd",
            [str(self.bin_dir / "containerd"), "--config", str(self._containerd_config())],
            env={"PATH": f"{self.bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"},
        )
        self._wait(
            "containerd", lambda: self.containerd_socket.exists() and self.ctr("version").returncode == 0
        )
        self.timings["containerd"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        self._import(pause_image(self.bin_dir, self.gen_dir / "images" / "pause.tar"))
        for tarball in self._imported:
            self._import(tarball)
        self.timings["image_import"] = round(time.monotonic() - t, 2)

        t = time.monotonic()
        self._spawn("coredns", [str(self.bin_dir / "coredns"), "-conf", str(self._corefile())])
        self._wait("coredns", self._dns_works)
        self.timings["coredns"] = round(time.monotonic() - t, 2)

        t = time.monotonic()
        self._spawn("kubelet", self._kubelet_argv())
        core = self.cluster.core()
        self._wait("kubelet (Node Ready)", lambda: node_ready(core, self.name))
        self.timings["node_ready"] = round(time.monotonic() - t, 2)
        # kubelet registered it with the labels (--node-labels); make sure, and make it schedulable again after
        # a restart (close() cordons it).
        core.patch_node(self.name, {"metadata": {"labels": self.labels}, "spec": {"unschedulable": False}})

    def _remember_host_paths(self) -> None:
        """Host paths kubelet or containerd create outside our dirs: removed by close() if we created them."""
        candidates = (CONTAINER_LOG_LINKS, CNI_CACHE, KUBELET_DEVICE_PLUGINS.parent)
        self._created_paths = [p for p in candidates if not p.exists()]

    def _make_bridge(self) -> None:
        used = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, timeout=10).stdout
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=10).stdout
        free = [n for n in range(10, 250) if f"10.244.{n}." not in used and f"loombr{n}:" not in links]
        if not free:
            raise RuntimeError("no free 10.244.N.0/24 subnet for the node's bridge")
        previous = int(self.bridge[len("loombr") :]) if self.bridge else -1
        n = previous if previous in free else random.choice(free)  # a restart keeps its addresses
        self.subnet = ipaddress.ip_network(f"10.244.{n}.0/24")
        self.bridge = f"loombr{n}"
        # A fixed MAC: a bridge with a kernel-chosen one takes the lowest MAC of its ports, so it changes as pods
        # come and go, and pods that cached the gateway's old MAC lose their packets to it (DNS, host services).
        mac = f"02:4c:4f:4f:{n:02x}:01"
        for argv in (
            ["ip", "link", "add", "name", self.bridge, "address", mac, "type", "bridge"],
            ["ip", "addr", "add", f"{self.host_ip}/{self.subnet.prefixlen}", "dev", self.bridge],
            ["ip", "link", "set", self.bridge, "up"],
        ):
            subprocess.run(argv, check=True, capture_output=True, timeout=10)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Component:
        log = self.log_path(name)
        component = _Process(name, argv, log, self.gen_dir, {**os.environ, **(env or {})})
        assert self._reaper is not None
        self._reaper.register(component.proc.pid)
        self.components.append(component)
        self._write_state()
        return component

    def _wait(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            for c in self.components:
                if not c.alive():
                    raise c.failure(f"exited while waiting for {what}")
            if check():
                return
            if time.monotonic() > deadline:
                culprit = next((c for c in self.components if c.name in what), self.components[-1])
                raise culprit.failure(f"not ready after {self.start_timeout:.0f} s waiting for {what}")
            time.sleep(0.1)

    def _dns_works(self) -> bool:
        try:
            rcode, addrs = dns_query(self.dns_ip, f"kubernetes.default.svc.{CLUSTER_DOMAIN}", timeout=1.0)
        except OSError:
            return False
        return rcode == 0 and bool(addrs)

    # -- configuration files

    def _containerd_config(self) -> Path:
        assert self.rundir is not None
        d = self.gen_dir / "containerd"
        (d / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0",
            "name": self.network_name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": str(self.subnet), "gateway": self.host_ip}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(d / "cni" / "ipam"),
                    },
                }
            ],
        }
        (d / "cni" / "net.d" / "10-loom.conflist").write_text(json.dumps(conflist, indent=2))
        run = self.rundir
        cri_runtime = "plugins.'io.containerd.cri.v1.runtime'"
        runc = f"{cri_runtime}.containerd.runtimes.runc"
        config = f"""version = 3
root = '{d / "root"}'
state = '{run / "state"}'
imports = []
disabled_plugins = ['io.containerd.nri.v1.nri', 'io.containerd.snapshotter.v1.blockfile',
  'io.containerd.snapshotter.v1.erofs', 'io.containerd.differ.v1.erofs', 'io.containerd.tracing.processor.v1.otlp',
  'io.containerd.internal.v1.tracing']

[grpc]
  address = '{run / "containerd.sock"}'

[ttrpc]
  address = '{run / "containerd.sock.ttrpc"}'

[debug]
  level = 'info'

[plugins."io.containerd.internal.v1.opt"]
  path = '{d / "opt"}'

[plugins."io.containerd.shim.v1.manager"]
  socket_dir = '{run / "s"}'

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '{PAUSE_IMAGE}'

[{cri_runtime}]
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  cdi_spec_dirs = []
  [{cri_runtime}.containerd]
    default_runtime_name = 'runc'
  [{runc}]
    runtime_type = 'io.containerd.runc.v2'
    runtime_path = '{self.bin_dir / "containerd-shim-runc-v2"}'
    disable_pause_image_pull = true
  [{runc}.options]
    BinaryName = '{RUNC}'
    Root = '{run / "runc"}'
    SystemdCgroup = false
  [{cri_runtime}.cni]
    bin_dirs = ['{CNI_BIN_DIR}']
    conf_dir = '{d / "cni" / "net.d"}'
    max_conf_num = 1
    use_internal_loopback = true

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'
  stream_server_port = '0'
"""
        path = d / "config.toml"
        path.write_text(config)
        return path

    def _corefile(self) -> Path:
        d = self.gen_dir / "coredns"
        d.mkdir(parents=True, exist_ok=True)
        kubeconfig = self.cluster.kubeconfig_path
        corefile = f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{
    bind {self.dns_ip}
    errors
    log
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} loom-test
        pods insecure
        ttl 5
    }}
}}
.:53 {{
    bind {self.dns_ip}
    errors
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"""
        path = d / "Corefile"
        path.write_text(corefile)
        return path

    def _kubelet_argv(self) -> list[str]:
        d = self.gen_dir / "kubelet"
        for sub in ("root", "certs", "pod-logs", "volume-plugins"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "resolv.conf").write_text("")  # pods get no search domains or resolvers of this machine
        sock = f"unix://{self.containerd_socket}"
        config: dict[str, Any] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.node_ip,
            "port": self.ports["kubelet"],
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.ports["kubelet_healthz"],
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            "containerRuntimeEndpoint": sock,
            "imageServiceEndpoint": sock,
            "clusterDNS": [self.dns_ip],
            "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(d / "resolv.conf"),
            "podLogsDir": str(self.pod_logs_dir),
            "volumePluginDir": str(d / "volume-plugins"),
            "staticPodPath": "",
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
                "imagefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "nodeStatusUpdateFrequency": "5s",
            "syncFrequency": "10s",
            "fileCheckFrequency": "10s",
            "runtimeRequestTimeout": "2m",
            "maxPods": 60,
        }
        path = d / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return [
            str(self.bin_dir / "kubelet"),
            f"--config={path}",
            f"--kubeconfig={self.cluster.kubeconfig_path}",
            f"--root-dir={d / 'root'}",
            f"--cert-dir={d / 'certs'}",
            f"--hostname-override={self.name}",
            f"--node-ip={self.node_ip}",
            "--node-labels=" + ",".join(f"{k}={v}" for k, v in self.labels.items()),
            "--v=2",
        ]

    # -- images and containers

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address <socket> --namespace k8s.io *args`` (the namespace kubelet's images live in)."""
        argv = [
            str(self.bin_dir / "ctr"),
            "--address",
            str(self.containerd_socket),
            "--namespace",
            "k8s.io",
            *args,
        ]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def import_image(self, tarball: Path | str) -> list[str]:
        """Import a ``docker save`` or OCI archive into containerd's k8s.io namespace (unpacked for overlayfs);
        return the image names it added. A restarted node imports it again (keep the file)."""
        names = self._import(Path(tarball))
        if Path(tarball) not in self._imported:
            self._imported.append(Path(tarball))
        return names

    def _import(self, tarball: Path) -> list[str]:
        before = set(self.images())
        out = self.ctr("images", "import", "--platform", "linux/amd64", str(tarball))
        if out.returncode != 0:
            raise RuntimeError(
                f"ctr images import {tarball} failed (rc={out.returncode}): {out.stderr.strip()}"
            )
        return sorted(set(self.images()) - before)

    def images(self) -> list[str]:
        """The image names containerd holds for kubelet (``ctr -n k8s.io images ls -q``), digests left out."""
        out = self.ctr("images", "ls", "-q")
        if out.returncode != 0:
            raise RuntimeError(f"ctr images ls failed: {out.stderr.strip()}")
        return sorted(n for n in out.stdout.split() if not n.startswith("sha256:") and "@sha256:" not in n)

    def container_pid(self, container_id: str) -> int:
        """The host PID of a running container's main process; ``container_id`` as in the pod status
        (``containerd://<id>``) or bare."""
        cid = container_id.split("://", 1)[-1]
        out = self.ctr("tasks", "ls")
        for line in out.stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3 and parts[0] == cid:
                return int(parts[1])
        raise RuntimeError(f"no running task {cid} in containerd: {out.stdout.strip()} {out.stderr.strip()}")

    # -- diagnostics

    def describe(self) -> str:
        """Node conditions, the pods on the node and the tails of the component logs (for failure messages)."""
        lines = [
            f"RealNode {self.name}: node IP {self.node_ip}, bridge {self.bridge} {self.subnet}, dir {self.gen_dir}"
        ]
        try:
            core = self.cluster.core()
            node = core.read_node(self.name)
            for c in node.status.conditions or []:
                lines.append(f"  condition {c.type}={c.status} {c.reason}: {c.message}")
            pods = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.name}").items
            for p in pods:
                states = []
                for cs in p.status.container_statuses or []:
                    st = cs.state
                    now = (
                        (st.waiting and f"waiting {st.waiting.reason}")
                        or (st.running and "running")
                        or (st.terminated and f"terminated {st.terminated.reason} {st.terminated.exit_code}")
                    )
                    states.append(f"{cs.name}:{now} restarts={cs.restart_count}")
                lines.append(
                    f"  pod {p.metadata.namespace}/{p.metadata.name} {p.status.phase} {p.status.pod_ip} "
                    + " ".join(states)
                )
        except Exception as e:  # noqa: BLE001 - a diagnostic must not raise
            lines.append(f"  (node not readable from the API: {e})")
        for c in self.components:
            state = "running" if c.alive() else f"exited rc={c.proc.returncode}"
            lines.append(f"--- {c.name} (pid {c.proc.pid}, {state}) {c.log_path}:\n{tail(c.log_path, 25)}")
        return "\n".join(lines)

    # -- teardown

    def close(self) -> None:
        """Tear down in order and verify nothing is left; raise ``RuntimeError`` naming any leftover."""
        if not self.started:
            return
        t0 = time.monotonic()
        problems: list[str] = []

        def step(what: str, fn: Callable[[], None]) -> None:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - go on tearing down, report at the end
                problems.append(f"{what}: {e}")

        kubelet = next((c for c in self.components if c.name == "kubelet"), None)
        if kubelet is not None and kubelet.alive():
            step("delete the node's pods", self._drain)
        step(
            "stop kubelet", lambda: stop_components([c for c in self.components if c.name == "kubelet"], 15.0)
        )
        self._teardown_host(problems)
        step("delete the Node", self._delete_node)
        self.components = []
        if self._reaper is not None:
            self._reaper.close()
            self._reaper = None
        leftovers = self.leftovers()
        if not problems and not leftovers:
            if self.rundir is not None:
                (self.gen_dir / "run").unlink(missing_ok=True)
                shutil.rmtree(self.rundir, ignore_errors=True)
            MACHINE_STATE.unlink(missing_ok=True)  # else the next start() tries again
        self._unlock()
        self.started = False
        self.timings["close"] = round(time.monotonic() - t0, 2)
        if problems or leftovers:
            raise RuntimeError(
                f"RealNode {self.name} teardown left things behind: "
                + "; ".join(problems + leftovers)
                + f" (logs under {self.gen_dir / 'logs'})"
            )

    def _teardown_host(self, problems: list[str]) -> None:
        """Everything after kubelet stopped: containers, containerd, CoreDNS, shims, mounts, cgroups, the bridge,
        the kernel settings, kubelet's iptables chains and host files."""

        def step(what: str, fn: Callable[[], None]) -> None:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - go on tearing down, report at the end
                problems.append(f"{what}: {e}")

        step("kill containers", lambda: kill_pids(cgroup_pids(kubepods_cgroups()), grace=2.0))
        shims = self._shim_pids()
        step(
            "stop containerd and coredns",
            lambda: stop_components(
                [c for c in self.components if c.name in ("containerd", "coredns")], 10.0
            ),
        )
        step("kill shims", lambda: kill_pids(set(shims) | set(self._shim_pids()), grace=3.0))
        step("unmount", self._unmount)
        step("remove cgroups", self._remove_cgroups)
        step("delete the bridge", self._delete_bridge)
        step("restore sysctls", self._restore_sysctls)
        if self._iptables is not None:
            before = self._iptables
            step("remove kubelet's iptables chains", lambda: remove_iptables_chains(before))
        step("remove host files", self._remove_host_files)

    def _drain(self) -> None:
        from kubernetes.client.exceptions import ApiException

        core = self.cluster.core()
        core.patch_node(self.name, {"spec": {"unschedulable": True}})
        selector = f"spec.nodeName={self.name}"

        def on_node() -> list[Any]:
            return list(core.list_pod_for_all_namespaces(field_selector=selector).items)

        for p in on_node():
            try:
                core.delete_namespaced_pod(p.metadata.name, p.metadata.namespace, grace_period_seconds=1)
            except ApiException as e:
                if e.status != 404:
                    raise
        deadline = time.monotonic() + 30
        while on_node() and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in on_node():  # kubelet did not confirm in time: remove them from the API
            try:
                core.delete_namespaced_pod(p.metadata.name, p.metadata.namespace, grace_period_seconds=0)
            except ApiException as e:
                if e.status != 404:
                    raise

    def _shim_pids(self) -> list[int]:
        if self.rundir is None:
            return []
        return processes_with_arg(str(self.containerd_socket))

    def _unmount(self) -> None:
        roots = [self.gen_dir] + ([self.rundir] if self.rundir else [])
        for point in mounts_under(*roots):
            if subprocess.run(["umount", point], capture_output=True, timeout=30).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)

    def _remove_cgroups(self) -> None:
        for _ in range(50):
            left = []
            for d in kubepods_cgroups():
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    left.append(d)
            if not left:
                return
            time.sleep(0.1)

    def _delete_bridge(self) -> None:
        if self.bridge and Path(f"/sys/class/net/{self.bridge}").exists():
            subprocess.run(["ip", "link", "del", self.bridge], check=True, capture_output=True, timeout=10)

    def _restore_sysctls(self) -> None:
        for key, value in self._sysctls.items():
            if _read_sysctl(key) != value:
                Path("/proc/sys", key).write_text(value)

    def _remove_host_files(self) -> None:
        logs = str(self.pod_logs_dir)
        if CONTAINER_LOG_LINKS.is_dir():
            for link in CONTAINER_LOG_LINKS.iterdir():
                if link.is_symlink() and os.readlink(link).startswith(logs):
                    link.unlink()
        (KUBELET_DEVICE_PLUGINS / "kubelet.sock").unlink(
            missing_ok=True
        )  # only one kubelet runs: it was ours
        results = CNI_CACHE / "results"
        if results.is_dir() and self.bridge:
            for f in results.glob(f"{self.network_name}-*"):
                f.unlink()
        for p in self._created_paths:
            if p.is_dir():
                # only when empty of anything else (another engineer's runtime may use it by then)
                for sub in sorted(p.rglob("*"), key=lambda q: -len(q.parts)):
                    if sub.is_dir() and not any(sub.iterdir()):
                        sub.rmdir()
                if not any(p.iterdir()):
                    p.rmdir()

    def _delete_node(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.cluster.core().delete_node(self.name)
        except ApiException as e:
            if e.status != 404:
                raise

    def leftovers(self, api: bool = True) -> list[str]:
        """What this node left on the machine or in the API (empty when the teardown was complete)."""
        found = []
        alive = [f"{c.name} pid {c.proc.pid}" for c in self.components if c.alive()]
        if alive:
            found.append(f"processes still running: {alive}")
        shims = self._shim_pids()
        if shims:
            found.append(f"containerd shims still running: {shims}")
        cgroups = kubepods_cgroups()
        if cgroups:
            found.append(
                f"kubepods cgroups: {[str(c) for c in cgroups[-3:]]}, pids {sorted(cgroup_pids(cgroups))}"
            )
        mounts = mounts_under(*([self.gen_dir] + ([self.rundir] if self.rundir else [])))
        if mounts:
            found.append(f"mounts: {mounts[:10]}")
        if self.bridge and Path(f"/sys/class/net/{self.bridge}").exists():
            found.append(f"bridge {self.bridge}")
        if CONTAINER_LOG_LINKS.is_dir():
            logs = str(self.pod_logs_dir)
            links = [
                p.name
                for p in CONTAINER_LOG_LINKS.iterdir()
                if p.is_symlink() and os.readlink(p).startswith(logs)
            ]
            if links:
                found.append(f"{CONTAINER_LOG_LINKS} links: {links[:5]}")
        if (KUBELET_DEVICE_PLUGINS / "kubelet.sock").exists():
            found.append(f"{KUBELET_DEVICE_PLUGINS / 'kubelet.sock'}")
        if self._iptables is not None:
            new = {k: sorted(v - self._iptables.get(k, set())) for k, v in iptables_chains().items()}
            new = {k: v for k, v in new.items() if v}
            if new:
                found.append(f"iptables chains or nftables tables: {new}")
        changed = {k: (v, _read_sysctl(k)) for k, v in self._sysctls.items() if _read_sysctl(k) != v}
        if changed:
            found.append(f"sysctls not restored (was, now): {changed}")
        if api:
            try:
                self.cluster.core().read_node(self.name)
                found.append(f"Node {self.name} still in the API")
            except Exception:  # noqa: BLE001 - 404 (or no API): nothing left there
                pass
        return found


class _Process(Component):
    """A ``Component`` (own session, log file, ended by PID) with an environment of its own."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path, env: dict[str, str]) -> None:
        self.name, self.argv, self.log_path = name, argv, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )


def _read_sysctl(key: str) -> str:
    return Path("/proc/sys", key).read_text().strip()
