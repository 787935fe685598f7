"""The real node of the test harness (``tests/support/k8s/node.py``): kubelet + containerd + runc + a CNI bridge +
CoreDNS running real containers from real images (busybox-static, imported without a registry).

Everything is asserted from the API server (pod status, logs, exec) or from the host (PIDs, cgroups, mounts);
nothing is patched. Only one kubelet can run on the machine at a time (it owns the ``kubepods`` cgroups), so the
teardown test closes the session's node itself, checks the machine, and starts it again for whoever comes next;
the session fixture's own teardown verifies the same once more at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.k8s.cluster import KubeCluster
from tests.support.k8s.images import BUSYBOX_IMAGE
from tests.support.k8s.node import (
    NODE_LABEL,
    RealNode,
    cgroup_pids,
    dns_query,
    kubepods_cgroups,
    mounts_under,
    processes_with_arg,
)

pytestmark = pytest.mark.k8s


@pytest.fixture()
def ns(kube_cluster: KubeCluster) -> Iterator[str]:
    """A fresh namespace, deleted after the test (its pods leave the real node)."""
    name = kube_cluster.create_namespace(f"rn-{uuid.uuid4().hex[:8]}")
    yield name
    kube_cluster.delete_namespace(name)


def pod(name: str, command: list[str], restart: str = "Always", **container: Any) -> dict[str, Any]:
    """A busybox pod pinned to the real node."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeSelector": dict([NODE_LABEL]),
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": BUSYBOX_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": command,
                    **container,
                }
            ],
        },
    }


def wait_pod(
    core: Any,
    node: RealNode,
    ns: str,
    name: str,
    check: Callable[[Any], bool],
    what: str,
    timeout: float = 60,
) -> Any:
    """Poll the pod until ``check(pod)`` (it may not exist yet); fail with its status and the node's state."""
    from kubernetes.client.exceptions import ApiException

    deadline = time.monotonic() + timeout
    p = None
    while time.monotonic() < deadline:
        try:
            p = core.read_namespaced_pod(name, ns)
        except ApiException as e:
            if e.status != 404:
                raise
        else:
            if check(p):
                return p
        time.sleep(0.05)
    status = p.status if p is not None else None
    pytest.fail(f"pod {ns}/{name}: not {what} after {timeout:.0f} s; status {status}\n{node.describe()}")


def is_ready(p: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))


def container(p: Any) -> Any:
    statuses = p.status.container_statuses or []
    return statuses[0] if statuses else None


def kubectl(cluster: KubeCluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real kubectl against the cluster (logs and exec go apiserver -> kubelet -> containerd)."""
    argv = [str(cluster.bin_dir / "kubectl"), f"--kubeconfig={cluster.kubeconfig_path}", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_pod_gets_its_own_ip_on_the_bridge_and_is_ready(
    kube_cluster: KubeCluster, k8s_node: RealNode, ns: str
) -> None:
    core = kube_cluster.core()
    node_obj = core.read_node(k8s_node.name)
    assert node_obj.metadata.labels[NODE_LABEL[0]] == NODE_LABEL[1]
    assert {a.type: a.address for a in node_obj.status.addresses}["InternalIP"] == k8s_node.node_ip
    t0 = time.monotonic()
    for name in ("a", "b"):
        core.create_namespaced_pod(ns, pod(name, ["sleep", "3600"]))
    pods = [wait_pod(core, k8s_node, ns, n, is_ready, "Ready") for n in ("a", "b")]
    ready_s = time.monotonic() - t0
    ips = [p.status.pod_ip for p in pods]
    print(f"\n2 pods Ready {ready_s:.2f} s after create; IPs {ips}; node timings {k8s_node.timings}")
    for p in pods:
        assert p.spec.node_name == k8s_node.name
        assert p.status.host_ip == k8s_node.node_ip
        assert p.status.phase == "Running"
        assert container(p).image_id  # a real image, resolved by containerd
    assert len(set(ips)) == 2
    for ip in ips:
        assert ip in [str(h) for h in k8s_node.subnet.hosts()] and ip != k8s_node.host_ip


def test_container_logs_through_the_api(kube_cluster: KubeCluster, k8s_node: RealNode, ns: str) -> None:
    core = kube_cluster.core()
    core.create_namespaced_pod(
        ns, pod("talker", ["sh", "-c", "echo line-one; echo line-two >&2; exec sleep 3600"])
    )
    wait_pod(core, k8s_node, ns, "talker", is_ready, "Ready")
    deadline = time.monotonic() + 20
    lines: list[str] = []
    while time.monotonic() < deadline and not {"line-one", "line-two"} <= set(lines):
        lines = core.read_namespaced_pod_log("talker", ns).splitlines()
        time.sleep(0.1)
    # stdout and stderr reach the log through two pipes: their relative order is not fixed
    assert sorted(lines) == ["line-one", "line-two"], lines
    out = kubectl(kube_cluster, "-n", ns, "logs", "talker")
    assert out.returncode == 0 and "line-one" in out.stdout, out.stderr
    out = kubectl(kube_cluster, "-n", ns, "exec", "talker", "--", "sh", "-c", "echo from-exec; hostname")
    assert out.returncode == 0 and out.stdout.split() == ["from-exec", "talker"], out.stderr


def test_sigkill_of_the_container_process_restarts_it(
    kube_cluster: KubeCluster, k8s_node: RealNode, ns: str
) -> None:
    core = kube_cluster.core()
    core.create_namespaced_pod(ns, pod("victim", ["sleep", "3600"]))
    p = wait_pod(core, k8s_node, ns, "victim", is_ready, "Ready")
    pid = k8s_node.container_pid(container(p).container_id)
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"sleep"
    assert pid in cgroup_pids(kubepods_cgroups())  # the container's process, in kubelet's pod cgroups
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    p = wait_pod(
        core,
        k8s_node,
        ns,
        "victim",
        lambda q: container(q).restart_count == 1 and is_ready(q),
        "restarted and Ready again",
    )
    print(f"\nSIGKILLed pid {pid}: restarted and Ready again in {time.monotonic() - t0:.2f} s")
    last = container(p).last_state.terminated
    assert last is not None and last.exit_code == 137, container(p).last_state
    assert last.reason == "Error"
    assert k8s_node.container_pid(container(p).container_id) != pid


def test_memory_limit_exceeded_is_oomkilled(kube_cluster: KubeCluster, k8s_node: RealNode, ns: str) -> None:
    core = kube_cluster.core()
    # dd reads 64 MiB of zeros into one buffer: more than the 32Mi limit can hold.
    hog = pod(
        "hog",
        ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=4"],
        restart="Never",
        resources={"limits": {"memory": "32Mi"}, "requests": {"memory": "32Mi"}},
    )
    t0 = time.monotonic()
    core.create_namespaced_pod(ns, hog)
    p = wait_pod(core, k8s_node, ns, "hog", lambda q: q.status.phase == "Failed", "Failed")
    term = container(p).state.terminated
    print(f"\nOOMKilled {time.monotonic() - t0:.2f} s after create")
    assert term is not None and term.reason == "OOMKilled" and term.exit_code == 137, container(p).state


def test_missing_image_with_pull_policy_never(kube_cluster: KubeCluster, k8s_node: RealNode, ns: str) -> None:
    core = kube_cluster.core()
    missing = pod("ghost", ["true"])
    missing["spec"]["containers"][0]["image"] = "localhost/loom-no-such-image:1"
    core.create_namespaced_pod(ns, missing)

    def never_pull(q: Any) -> bool:
        c = container(q)
        return bool(c and c.state.waiting and c.state.waiting.reason == "ErrImageNeverPull")

    p = wait_pod(core, k8s_node, ns, "ghost", never_pull, "waiting with ErrImageNeverPull")
    assert "localhost/loom-no-such-image:1" in container(p).state.waiting.message
    assert p.status.phase == "Pending"


def test_termination_message_is_reported(kube_cluster: KubeCluster, k8s_node: RealNode, ns: str) -> None:
    core = kube_cluster.core()
    script = "printf 'config invalid: no brokers' > /dev/termination-log; exit 2"
    core.create_namespaced_pod(ns, pod("quitter", ["sh", "-c", script], restart="Never"))
    p = wait_pod(core, k8s_node, ns, "quitter", lambda q: q.status.phase == "Failed", "Failed")
    term = container(p).state.terminated or container(p).last_state.terminated
    assert term is not None, container(p)
    assert (term.exit_code, term.reason, term.message) == (2, "Error", "config invalid: no brokers")


def test_headless_service_names_resolve_between_statefulset_pods(
    kube_cluster: KubeCluster, k8s_node: RealNode, ns: str
) -> None:
    from kubernetes import client

    core, apps = kube_cluster.core(), client.AppsV1Api(kube_cluster.api_client())
    core.create_namespaced_service(
        ns,
        {
            "metadata": {"name": "web"},
            "spec": {
                "clusterIP": "None",
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 8080}],
            },
        },
    )
    template = pod(
        "web", ["sh", "-c", "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"]
    )
    template["spec"]["containers"][0]["readinessProbe"] = {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
    t0 = time.monotonic()
    statefulset: Any = {
        "metadata": {"name": "web"},
        "spec": {
            "serviceName": "web",
            "replicas": 2,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": template["metadata"], "spec": template["spec"]},
        },
    }
    apps.create_namespaced_stateful_set(ns, statefulset)
    pods = [wait_pod(core, k8s_node, ns, f"web-{i}", is_ready, "Ready") for i in (0, 1)]
    ready_s = time.monotonic() - t0
    fqdn = f"web-1.web.{ns}.svc.cluster.local"
    # From the host, straight to CoreDNS: the name appears once the EndpointSlice has the Ready pod.
    deadline = time.monotonic() + 30
    answer: tuple[int, list[str]] = (-1, [])
    while time.monotonic() < deadline and answer[1] != [pods[1].status.pod_ip]:
        answer = dns_query(k8s_node.dns_ip, fqdn)
        time.sleep(0.1)
    dns_s = time.monotonic() - t0
    assert answer == (0, [pods[1].status.pod_ip]), (answer, k8s_node.describe())
    # From pod 0, through the pod's own resolv.conf (kubelet's clusterDNS).
    out = kubectl(kube_cluster, "-n", ns, "exec", "web-0", "--", "nslookup", fqdn)
    assert out.returncode == 0 and pods[1].status.pod_ip in out.stdout, (out.stdout, out.stderr)
    out = kubectl(
        kube_cluster, "-n", ns, "exec", "web-0", "--", "timeout", "10", "wget", "-qO-", f"http://{fqdn}:8080/"
    )
    assert out.returncode == 0 and out.stdout.strip() == "web-1", (out.stdout, out.stderr)
    # The short name works too (search path <ns>.svc.cluster.local).
    out = kubectl(
        kube_cluster,
        "-n",
        ns,
        "exec",
        "web-0",
        "--",
        "timeout",
        "10",
        "wget",
        "-qO-",
        "http://web-1.web:8080/",
    )
    assert out.returncode == 0 and out.stdout.strip() == "web-1", (out.stdout, out.stderr)
    print(f"\nStatefulSet of 2 Ready in {ready_s:.2f} s; {fqdn} resolved {dns_s:.2f} s after create")


def test_pod_reaches_a_tcp_server_on_the_host(kube_cluster: KubeCluster, k8s_node: RealNode, ns: str) -> None:
    seen: list[str] = []
    with socket.create_server((k8s_node.host_ip, 0)) as server:
        port = server.getsockname()[1]
        server.settimeout(60)

        def serve() -> None:
            try:
                conn, (peer, _) = server.accept()
            except OSError:
                return
            with conn:
                seen.append(peer)
                seen.append(conn.recv(100).decode().strip())
                conn.sendall(b"pong\n")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        core = kube_cluster.core()
        script = f"echo ping | timeout 20 nc {k8s_node.host_ip} {port}"
        core.create_namespaced_pod(ns, pod("caller", ["sh", "-c", script], restart="Never"))
        p = wait_pod(
            core, k8s_node, ns, "caller", lambda q: q.status.phase in ("Succeeded", "Failed"), "finished"
        )
        thread.join(timeout=5)
    assert p.status.phase == "Succeeded", (container(p).state, k8s_node.describe())
    assert core.read_namespaced_pod_log("caller", ns).strip() == "pong"
    assert seen == [p.status.pod_ip, "ping"]  # the pod's own address: no NAT between pod and host


def test_close_leaves_nothing_and_the_node_starts_again(
    kube_cluster: KubeCluster, k8s_node: RealNode, ns: str
) -> None:
    """Close the session's node with pods running on it, check the machine from outside, start it again."""
    core = kube_cluster.core()
    for name in ("left-a", "left-b"):
        core.create_namespaced_pod(ns, pod(name, ["sleep", "3600"]))
    running = [wait_pod(core, k8s_node, ns, n, is_ready, "Ready") for n in ("left-a", "left-b")]
    container_pids = [k8s_node.container_pid(container(p).container_id) for p in running]
    component_pids = [c.proc.pid for c in k8s_node.components]
    socket_path = str(k8s_node.containerd_socket)
    shims = processes_with_arg(socket_path)
    assert shims and kubepods_cgroups()
    dirs = [k8s_node.gen_dir, k8s_node.rundir]
    assert mounts_under(*[d for d in dirs if d is not None])  # rootfs, shm, netns, volumes
    bridge = k8s_node.bridge

    k8s_node.close()  # raises if it finds anything left; checked again from outside here
    print(f"\nclose() took {k8s_node.timings['close']:.2f} s")

    for pid in container_pids + component_pids + shims:
        assert (
            not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()
        )
    assert processes_with_arg(socket_path) == []
    assert kubepods_cgroups() == []
    assert mounts_under(*[d for d in dirs if d is not None]) == []
    assert not Path(f"/sys/class/net/{bridge}").exists()
    assert k8s_node.leftovers() == []
    names = [n.metadata.name for n in core.list_node().items]
    assert k8s_node.name not in names
    left = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={k8s_node.name}").items
    assert left == []

    t0 = time.monotonic()
    k8s_node.start()  # for the tests after this one: same name and label, images imported again
    print(f"node restarted in {time.monotonic() - t0:.2f} s ({k8s_node.timings})")
    core.create_namespaced_pod(ns, pod("after", ["sleep", "3600"]))
    p = wait_pod(core, k8s_node, ns, "after", is_ready, "Ready after the restart")
    assert p.spec.node_name == k8s_node.name
