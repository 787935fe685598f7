"""A deploy bench on the real node: the job image imported, a Kafka broker the pods reach, the bench's
Delta directory as a PersistentVolume (a ``restricted`` namespace refuses hostPath volumes, not claims),
the namespace labelled ``pod-security.kubernetes.io/enforce=restricted``, and the launcher config that
runs flows there from the built image (``docs/kubernetes/Dockerfile``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from tests.support.deploy_env import DeployBench
from tests.support.k8s.cluster import KubeCluster
from tests.support.k8s.env import KubeEnv, kube_bench
from tests.support.k8s.job_image import JobImage
from tests.support.k8s.node import NODE_LABEL

ENFORCE = "pod-security.kubernetes.io/enforce"
DELTA_VOLUME = "delta"
JOB_UID = 10001


def real_node_config(env: KubeEnv, built: JobImage, /, **pod: Any) -> dict[str, Any]:
    """Launcher config for flows on the real node from the *built* image, the bench's Delta dir mounted
    where the config names it; *pod* adds or replaces pod settings (e.g. ``resources``, ``image``)."""
    bench = env.bench
    assert bench is not None
    delta_dir = str(Path(bench.delta_uri).parent)
    return {
        "python": "python",  # the image's venv comes first on its PATH
        "working_dir": "/app",
        "python_path": "/app",
        "drain_timeout_s": 20,
        "pod": {
            "image": built.ref,
            "image_pull_policy": "Never",
            "node_selector": dict([NODE_LABEL]),
            "volumes": [{"name": DELTA_VOLUME, "persistentVolumeClaim": {"claimName": claim_name(env)}}],
            "volume_mounts": [{"name": DELTA_VOLUME, "mountPath": delta_dir}],
            **pod,
        },
    }


def claim_name(env: KubeEnv) -> str:
    return f"{env.namespace}-delta"


@contextmanager
def real_node_bench(
    cluster: KubeCluster, kafka: Any, directory: Path, prefix: str, partitions: int = 3
) -> Iterator[KubeEnv]:
    """A bench in a fresh ``restricted`` namespace whose Delta directory is a PersistentVolume (hostPath,
    writable by the image's user) bound to a claim the pods mount; the volume is deleted after."""
    from kubernetes import client

    with kube_bench(cluster, kafka, directory, prefix) as env:
        bench = env.bench
        assert bench is not None
        if partitions != bench.partitions:
            env.bench = bench = DeployBench(bench.bootstrap, f"{prefix}p{partitions}", directory, partitions)
        core = client.CoreV1Api(cluster.api_client())
        core.patch_namespace(
            env.namespace, {"metadata": {"labels": {ENFORCE: "restricted", f"{ENFORCE}-version": "latest"}}}
        )
        delta_dir = Path(bench.delta_uri).parent
        delta_dir.mkdir(parents=True, exist_ok=True)
        delta_dir.chmod(0o777)  # the job runs as uid 10001; the test reads as root
        volume = claim_name(env)
        core.create_persistent_volume(
            {
                "metadata": {"name": volume},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": "",
                    "hostPath": {"path": str(delta_dir), "type": "Directory"},
                    "claimRef": {"namespace": env.namespace, "name": volume},
                },
            }
        )
        core.create_namespaced_persistent_volume_claim(
            env.namespace,
            {
                "metadata": {"name": volume},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "",
                    "volumeName": volume,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )
        try:
            yield env
        finally:
            try:
                env.resource().deployer().undeploy("ticks", by="test")
            except Exception:
                pass
            core.delete_persistent_volume(volume)


def wait_quiet(bench: DeployBench, settle_s: float = 2.0, timeout_s: float = 60.0) -> None:
    """Wait, producing nothing, until the group's committed offsets stay unchanged for *settle_s*.

    loom flushes a table buffer only when a record arrives, and commits after the flush: once nothing
    arrives and the commits stop moving, every flushed row is committed and the rows still buffered were
    never written, so a kill now repeats nothing in Delta (the buffered rows are read again, written once).
    """
    topic = f"{bench.prefix}.ticks"
    consumer = Consumer({"bootstrap.servers": bench.bootstrap, "group.id": f"{bench.prefix}-ticks"})
    try:
        partitions = [TopicPartition(topic, p) for p in range(bench.partitions)]
        deadline = time.monotonic() + timeout_s
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            committed = [tp.offset for tp in consumer.committed(partitions, timeout=10)]
            if committed != last:
                last, since = committed, time.monotonic()
            elif time.monotonic() - since >= settle_s:
                return
            time.sleep(0.3)
        raise AssertionError(f"the group's commits never settled (last {last})")
    finally:
        consumer.close()
