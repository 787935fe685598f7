"""The Kubernetes objects of a flow, as the launcher applies them and ``loom-dagster manifests`` prints
them: pod spec as specified, and no secret in any ConfigMap, annotation or argv (no cluster needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loom_dagster.core.deploy.launch_records import LaunchRequest
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.launchers.kubernetes.launcher import KubernetesLauncher
from loom_dagster.core.launchers.kubernetes.manifests import (
    cluster_addresses,
    dns_name,
    flow_manifests,
    preflight_pod_manifest,
    statefulset_manifest,
    workload_name,
)
from loom_dagster.core.launchers.kubernetes.settings import KubernetesSettings
from loom_dagster.core.launchers.kubernetes.store import checked_texts
from loom_dagster.core.redact import redact_text
from tests.conftest import ticks_config
from tests.support.helpers import run_cli

SETTINGS = KubernetesSettings.from_config(
    dict(
        namespace="streaming",
        pod={
            "image": "registry.example/flows:1.2",
            "service_account": "loom-job",
            "env_from_secrets": ["kafka-credentials"],
            "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
            "node_selector": {"pool": "streaming"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "streaming", "effect": "NoSchedule"}
            ],
            "labels": {"team": "data"},
        },
        flows={"orders_enrichment": {"image": "registry.example/orders:7"}},
        drain_timeout_s=45,
    )
)


def request(flow: str = "orders_enrichment", processes: int = 1) -> LaunchRequest:
    return LaunchRequest(
        flow_name=flow,
        import_path="flows.orders:flow",
        config_files=("/etc/loom/config/loom-orders-enrichment-config-abc/00-base.yaml",),
        environment="production",
        plan_hash="p" * 16,
        config_hash="c" * 16,
        processes=processes,
        run_id="run-1",
        env=(("LOG_LEVEL", "INFO"),),
    )


def test_statefulset_pod_spec_as_specified() -> None:
    sts = statefulset_manifest(SETTINGS, request())
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert sts["metadata"]["namespace"] == "streaming"
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["podManagementPolicy"] == "Parallel"
    assert container["image"] == "registry.example/orders:7"  # the per-flow override
    assert container["command"] == ["python"] and container["args"][:2] == ["-m", "loom_dagster.runtime"]
    assert container["envFrom"] == [{"secretRef": {"name": "kafka-credentials"}}]
    assert container["resources"]["limits"] == {"memory": "1Gi"}
    assert pod["serviceAccountName"] == "loom-job"
    assert pod["nodeSelector"] == {"pool": "streaming"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert pod["terminationGracePeriodSeconds"] >= 45
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": SETTINGS.http_port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": SETTINGS.http_port}
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "loom-dagster" and labels["team"] == "data"
    assert labels["loom-dagster.io/flow"] == dns_name("orders_enrichment", 63)
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["loom-dagster.io/plan-hash"] == "p" * 16
    assert annotations["loom-dagster.io/config-hash"] == "c" * 16
    assert annotations["loom-dagster.io/run-id"] == "run-1"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/etc/loom/config/loom-orders-enrichment-config-abc" in mounts
    assert {"name": "config", "configMap": {"name": "loom-orders-enrichment-config-abc"}} in pod["volumes"]
    args = container["args"]
    assert args[args.index("--config") + 1] == request().config_files[0]
    assert args[args.index("--drain-timeout") + 1] == "45"
    assert "--process-id" not in args  # one process: no cluster


def test_multi_process_job_gets_a_headless_service_and_pod_addresses() -> None:
    objects = flow_manifests(SETTINGS, request(processes=3))
    kinds = [o["kind"] for o in objects]
    assert kinds == ["Service", "StatefulSet"]
    service, sts = objects
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    name = workload_name(SETTINGS, "orders_enrichment")
    addresses = args[args.index("--addresses") + 1].split(",")
    assert addresses == list(cluster_addresses(SETTINGS, "orders_enrichment", 3))
    assert addresses[2].startswith(f"{name}-2.{name}.streaming.svc.")
    assert args[args.index("--process-id") + 1] == "auto"


def test_pods_meet_the_restricted_pod_security_level_by_default() -> None:
    """Non-root, seccomp RuntimeDefault, no privilege escalation, no capabilities, a read-only root with
    emptyDirs for what the job writes, no API token, requests when none are set; each one overridable."""
    plain = KubernetesSettings.from_config({"namespace": "streaming", "pod": {"image": "flows:1"}})
    pod = statefulset_manifest(plain, request())["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }
    assert pod["automountServiceAccountToken"] is False
    assert container["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"}}  # never BestEffort
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert {mounts[name] for name in empty_dirs} == {"/var/run/loom", "/tmp"}
    assert not any("hostPath" in v for v in pod["volumes"])
    assert "networkpolicy" not in [o["kind"].lower() for o in flow_manifests(plain, request())]

    custom = KubernetesSettings.from_config(
        {
            "pod": {
                "security_context": {"runAsUser": 2000, "runAsNonRoot": True},
                "container_security_context": {"readOnlyRootFilesystem": False},
                "automount_service_account_token": True,
            }
        }
    )
    pod = statefulset_manifest(custom, request())["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsUser": 2000,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }  # keys over the defaults, not in place of them
    assert pod["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": False,
    }
    assert pod["automountServiceAccountToken"] is True


def test_network_policy_admits_the_probe_port_from_its_sources_and_bytewax_between_the_flow_pods() -> None:
    observers = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    settings = KubernetesSettings.from_config(
        {"namespace": "streaming", "network_policy": {"probe_from": [observers]}}
    )
    objects = flow_manifests(settings, request(processes=2))
    assert [o["kind"] for o in objects] == ["Service", "NetworkPolicy", "StatefulSet"]
    policy, sts = objects[1], objects[2]
    selector = sts["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["podSelector"] == {"matchLabels": selector}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    probe, bytewax = policy["spec"]["ingress"]
    assert probe == {"ports": [{"protocol": "TCP", "port": settings.http_port}], "from": [observers]}
    assert bytewax == {
        "ports": [{"protocol": "TCP", "port": settings.cluster_port}],
        "from": [{"podSelector": {"matchLabels": selector}}],
    }
    (single,) = [o for o in flow_manifests(settings, request()) if o["kind"] == "NetworkPolicy"]
    assert len(single["spec"]["ingress"]) == 1  # one process: no Bytewax port to open


def test_preflight_pod_is_the_new_template_running_the_preflight() -> None:
    """Same image, env references, mounts, service account and security context as the job's pods;
    the preflight module instead of the runtime; never restarted; a deadline; not a job pod."""
    sts = statefulset_manifest(SETTINGS, request(processes=2))
    job_pod = sts["spec"]["template"]["spec"]
    pod = preflight_pod_manifest(SETTINGS, request(processes=2), "loom-x-preflight-1", 90, 15)
    spec = pod["spec"]
    (container,) = spec["containers"]
    (job,) = job_pod["containers"]
    for key in (
        "image",
        "command",
        "env",
        "envFrom",
        "volumeMounts",
        "workingDir",
        "securityContext",
        "resources",
    ):
        assert container[key] == job[key], key
    for key in ("volumes", "securityContext", "serviceAccountName", "nodeSelector", "tolerations"):
        assert spec[key] == job_pod[key], key
    assert container["args"][:2] == ["-m", "loom_dagster.core.launchers.preflight"]
    args = container["args"]
    assert args[args.index("--processes") + 1] == "2"
    assert args[args.index("--connect-timeout") + 1] == "15"
    assert "--sys-path" not in args  # the image's PYTHONPATH, as for the job
    assert not {"ports", "readinessProbe", "livenessProbe"} & set(container)
    assert spec["restartPolicy"] == "Never" and spec["activeDeadlineSeconds"] == 90
    labels = pod["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "loom-preflight"
    assert not set(sts["spec"]["selector"]["matchLabels"].items()) <= set(labels.items())


def test_names_are_dns_labels_and_stable() -> None:
    for flow in ("orders_enrichment", "Orders.Enrichment", "x" * 90, "a--b"):
        name = workload_name(SETTINGS, flow)
        assert len(name) <= 40 and name == name.lower() and not name.endswith("-")
        assert name == workload_name(SETTINGS, flow)
    assert workload_name(SETTINGS, "a_b") != workload_name(SETTINGS, "a-b")


def test_config_with_a_literal_secret_is_refused_naming_the_line_not_the_value() -> None:
    ok = checked_texts("f", [("00-base.yaml", b"url: http://default:${oc.env:CH_PASSWORD}@ch:8123\n")])
    assert "CH_PASSWORD" in ok["00-base.yaml"]
    with pytest.raises(DeploymentError) as refused:
        checked_texts("f", [("00-base.yaml", b"brokers: b:9092\nsasl_password: hunter2\n")])
    assert "line 2" in str(refused.value) and "hunter2" not in str(refused.value)
    assert "env_from_secrets" in str(refused.value) and "${oc.env:VARIABLE}" in str(refused.value)


def test_bad_launcher_config_names_the_field() -> None:
    with pytest.raises(DeploymentError, match="namespace"):
        KubernetesLauncher(namespace=3)
    with pytest.raises(DeploymentError, match="imag"):
        KubernetesLauncher(pod={"imag": "x"})


def ticks_location(tmp_path: Path, resource: str = "LoomDeployResource()") -> Path:
    """A code location file deploying the ticks flow with *resource* (Python source)."""
    config = ticks_config(
        tmp_path / "config", brokers="127.0.0.1:9", prefix="m", delta_uri=str(tmp_path / "d")
    )
    location = tmp_path / "location.py"
    location.write_text(
        "from loom_dagster import LoomDeployResource, LoomFlowSpec, build_loom_defs\n"
        f"defs = build_loom_defs([LoomFlowSpec('tests.flows.delta_only:ticks_flow', config={str(config)!r}, "
        f"environment='test')], resource={resource})\n"
    )
    return location


def test_manifests_cli_prints_the_objects_without_secrets(tmp_path: Path) -> None:
    location = ticks_location(
        tmp_path,
        "LoomDeployResource(launcher='kubernetes', launcher_config={'namespace': 'streaming', "
        "'pod': {'image': 'flows:9', 'env_from_secrets': ['kafka-credentials']}})",
    )
    done = run_cli(tmp_path / "state", "manifests", "ticks", "-f", str(location))
    assert done.returncode == 0, done.stderr
    objects = list(yaml.safe_load_all(done.stdout))
    assert [o["kind"] for o in objects] == ["ConfigMap", "StatefulSet"]
    config_map, sts = objects
    assert config_map["immutable"] is True and config_map["data"]
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == "flows:9"
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    mounted = volumes["config"]["configMap"]["name"]
    assert mounted == config_map["metadata"]["name"]
    assert redact_text(done.stdout) == done.stdout  # nothing a redactor would mask
    rbac = run_cli(tmp_path / "state", "manifests", "--rbac")
    role = yaml.safe_load(rbac.stdout)
    assert role["kind"] == "Role" and any("statefulsets" in r["resources"] for r in role["rules"])


def test_manifests_cli_unknown_flow_lists_the_known_ones(tmp_path: Path) -> None:
    location = ticks_location(tmp_path)
    done = run_cli(
        tmp_path / "state",
        "manifests",
        "nope",
        "-f",
        str(location),
        "--launcher-config",
        json.dumps({"namespace": "x"}),
    )
    assert done.returncode == 2 and "flow 'nope' is not in code location" in done.stderr
    assert "ticks" in done.stderr


def test_importing_the_launcher_package_does_not_import_the_client() -> None:
    probe = (
        "import loom_dagster.core.launchers, loom_dagster.resource, sys; print('kubernetes' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
