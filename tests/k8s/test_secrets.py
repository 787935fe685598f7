"""Secrets never in Kubernetes objects: config files checked as YAML (every scalar with its key path),
``loom-dagster manifests`` printing no secret of ``env=``, config files or ``pod.env``, and a read-only Role
(``manifests --rbac --read-only``) under which ``status`` and ``logs`` run, on a real control plane, and
nothing can be created, patched or deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.launchers.kubernetes.store import checked_texts
from loom_dagster.core.redact import redact_text
from loom_dagster.dev.kafka import KafkaBroker
from tests.conftest import ticks_config
from tests.support.helpers import ROOT, run_cli
from tests.support.k8s.cluster import KubeCluster
from tests.support.k8s.env import KubeEnv, kwok_bench

MARK = "Mk" + uuid.uuid4().hex[:6] + "7q"
PEM_BODY = f"MIIEvQIBADANBgkqhkiG9w0BAQEFAASC{MARK}"

# --------------------------------------------------------------------------------------------------
# Config files: parsed, every scalar checked with its key path
# --------------------------------------------------------------------------------------------------

REFUSED = [
    ("next line", f"kafka:\n  password:\n    {MARK}\n", 3, "kafka.password"),
    ("flow mapping", f"kafka: {{brokers: [b:9092], password: {MARK}}}\n", 1, "kafka.password"),
    ("dotted key", f"kafka:\n  consumer:\n    sasl.password: '{MARK}'\n", 3, "kafka.consumer.sasl.password"),
    ("list item", f"auth:\n  api_key:\n    - {MARK}\n", 3, "auth.api_key[0]"),
    (
        "block PEM",
        f"tls:\n  material: |\n    -----BEGIN PRIVATE KEY-----\n    {PEM_BODY}\n    -----END PRIVATE KEY-----\n",
        2,
        "tls.material",
    ),
    ("oc.decode literal", f"db:\n  dsn: \"${{oc.decode:'{MARK}'}}\"\n", 2, "db.dsn"),
    ("oc.env default", f"db:\n  pw: ${{oc.env:DB_PW,{MARK}}}\n", 2, "db.pw"),
    ("URL password", f"sink:\n  url: http://default:{MARK}@ch:8123/db\n", 2, "sink.url"),
    (
        "JAAS",
        'kafka:\n  options: "org.apache.kafka.common.security.plain.PlainLoginModule required '
        f"username='u' password='{MARK}';\"\n",
        2,
        "kafka.options",
    ),
    ("token", "headers:\n  x-api: Zx8Qm2LpV7rT4nWc9KdB3fHsQ1vY6uEa\n", 2, "headers.x-api"),
]


@pytest.mark.parametrize(("text", "line", "path"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_a_config_secret_is_refused_naming_file_key_and_line_never_the_value(
    text: str, line: int, path: str
) -> None:
    with pytest.raises(DeploymentError) as refused:
        checked_texts("orders", [("00-base.yaml", text.encode())])
    message = str(refused.value)
    assert "config file '00-base.yaml' of flow 'orders' holds a literal secret" in message, message
    assert f"line {line} (at {path}, " in message, message
    assert "env_from_secrets" in message and "Nothing was deployed" in message
    assert MARK not in message and "Zx8Qm2" not in message
    assert redact_text(message) == message


def test_references_and_ordinary_values_pass() -> None:
    text = (
        "kafka:\n"
        "  sasl.password: ${oc.env:KAFKA_PASSWORD}\n"
        "  password: ${oc.env:KAFKA_PASSWORD,}\n"
        "  brokers: [broker-1.kafka.svc:9093]\n"
        "sink:\n"
        "  url: http://default:${oc.env:CH_PASSWORD}@ch:8123/db\n"
        "  table_password: ${kafka.password}\n"
        "  options: {key: id, auth: null, token_refresh: false}\n"
        "notes: the password policy is strict\n"
    )
    assert checked_texts("orders", [("00-base.yaml", text.encode())]) == {"00-base.yaml": text}


def test_a_comment_with_a_secret_is_refused_too() -> None:
    with pytest.raises(DeploymentError, match=r"holds a literal secret at line 2; a ConfigMap"):
        checked_texts("orders", [("00-base.yaml", f"a: 1\n# old password: {MARK}\n".encode())])


def test_unparsable_yaml_is_refused_clearly() -> None:
    with pytest.raises(DeploymentError) as refused:
        checked_texts("orders", [("00-base.yaml", f"a: [1, 2\npassword: {MARK}\n".encode())])
    message = str(refused.value)
    assert "config file '00-base.yaml' of flow 'orders' is not valid YAML (line 2: " in message, message
    assert "cannot be checked for secrets, so it is refused" in message and MARK not in message


# --------------------------------------------------------------------------------------------------
# loom-dagster manifests prints no secret
# --------------------------------------------------------------------------------------------------


def location(
    tmp_path: Path, env: dict[str, str], extra_config: str = "", pod_env: dict[str, str] | None = None
) -> Path:
    config = ticks_config(
        tmp_path / "config", brokers="127.0.0.1:9", prefix="m", delta_uri=str(tmp_path / "d")
    )
    base = config / "base.yaml"
    base.write_text(base.read_text() + extra_config)
    launcher_config = {
        "namespace": "streaming",
        "pod": {"image": "flows:9", **({"env": pod_env} if pod_env else {})},
    }
    path = tmp_path / "location.py"
    path.write_text(
        "from loom_dagster import LoomDeployResource, LoomFlowSpec, build_loom_defs\n"
        f"defs = build_loom_defs([LoomFlowSpec('tests.flows.delta_only:ticks_flow', config={str(config)!r}, "
        f"environment='test', env={env!r})], resource=LoomDeployResource(launcher='kubernetes', "
        f"launcher_config={launcher_config!r}))\n"
    )
    return path


def test_manifests_print_no_secret_of_env(tmp_path: Path) -> None:
    path = location(tmp_path, {"DB_PASSWORD": f"pw-{MARK}", "KAFKA_SASL_JAAS": f"password='{MARK}'"})
    done = run_cli(tmp_path / "state", "manifests", "ticks", "-f", str(path))
    assert done.returncode == 0, done.stderr
    assert MARK not in done.stdout and MARK not in done.stderr
    assert redact_text(done.stdout) == done.stdout
    objects = list(yaml.safe_load_all(done.stdout))
    (sts,) = [o for o in objects if o["kind"] == "StatefulSet"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert (
        "value" not in env["DB_PASSWORD"]
        and env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "DB_PASSWORD"
    )
    assert all(o["kind"] != "Secret" for o in objects)  # the env Secret is the launcher's, never printed


def test_manifests_refuse_a_config_secret_and_a_pod_env_secret_without_printing_them(tmp_path: Path) -> None:
    secret_config = f"app:\n  db: {{password: {MARK}}}\n"
    done = run_cli(tmp_path / "state", "manifests", "ticks", "-f", str(location(tmp_path, {}, secret_config)))
    assert done.returncode == 2 and done.stdout == ""
    assert "holds a literal secret at line" in done.stderr and "(at app.db.password, " in done.stderr, (
        done.stderr
    )
    assert MARK not in done.stderr

    pod_env = {"DATABASE_URL": f"postgresql://app:{MARK}@db/shop"}
    done = run_cli(
        tmp_path / "state", "manifests", "ticks", "-f", str(location(tmp_path, {}, pod_env=pod_env))
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "pod.env 'DATABASE_URL' holds a URL with a password" in done.stderr, done.stderr
    assert "env_from_secrets" in done.stderr and MARK not in done.stderr


def test_the_read_only_role_grants_reads_only() -> None:
    done = subprocess.run(
        [str(Path(sys.executable).with_name("loom-dagster")), "manifests", "--rbac", "--read-only"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    role = yaml.safe_load(done.stdout)
    assert role["kind"] == "Role" and role["metadata"]["name"] == "loom-dagster-read-only"
    verbs = {verb for rule in role["rules"] for verb in rule["verbs"]}
    assert verbs == {"get", "list", "watch"}
    assert not any("secrets" in rule["resources"] for rule in role["rules"])


# --------------------------------------------------------------------------------------------------
# The read-only Role on a real control plane
# --------------------------------------------------------------------------------------------------

VIEWER = "loom-viewer"
ALLOWED = [
    ("apps", "statefulsets", "", v) for v in ("get", "list", "watch")
] + [
    ("", resource, "", v) for resource in ("pods", "configmaps") for v in ("get", "list", "watch")
] + [("coordination.k8s.io", "leases", "", v) for v in ("get", "list", "watch")] + [("", "pods", "log", "get")]  # fmt: skip
DENIED = [
    ("", "configmaps", "", "create"),
    ("", "configmaps", "", "update"),
    ("", "configmaps", "", "patch"),
    ("", "configmaps", "", "delete"),
    ("apps", "statefulsets", "", "patch"),
    ("apps", "statefulsets", "", "update"),
    ("apps", "statefulsets", "", "create"),
    ("apps", "statefulsets", "scale", "patch"),
    ("", "pods", "", "create"),
    ("", "pods", "", "delete"),
    ("", "secrets", "", "get"),
    ("", "secrets", "", "list"),
    ("", "secrets", "", "create"),
    ("coordination.k8s.io", "leases", "", "create"),
    ("coordination.k8s.io", "leases", "", "update"),
    ("coordination.k8s.io", "leases", "", "delete"),
]


@pytest.fixture()
def kube_env(
    kube_cluster: KubeCluster, kafka: KafkaBroker, tmp_path: Path, topic_prefix: str
) -> Iterator[KubeEnv]:
    with kwok_bench(kube_cluster, kafka, tmp_path, topic_prefix) as env:
        yield env


def viewer_kubeconfig(env: KubeEnv, directory: Path) -> Path:
    """A service account bound to exactly the shipped read-only Role; its kubeconfig."""
    from kubernetes import client

    from loom_dagster.cli.manifests import rbac_role

    rbac = client.RbacAuthorizationV1Api(env.cluster.api_client())
    role = yaml.safe_load(rbac_role(read_only=True))
    rbac.create_namespaced_role(env.namespace, role)
    token = env.cluster.token_for(env.namespace, VIEWER)
    rbac.create_namespaced_role_binding(
        env.namespace,
        {
            "metadata": {"name": VIEWER},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": role["metadata"]["name"],
            },
            "subjects": [{"kind": "ServiceAccount", "name": VIEWER, "namespace": env.namespace}],
        },
    )
    return env.cluster.kubeconfig_for_token(token, directory / "viewer.kubeconfig", env.namespace)


def allowed(env: KubeEnv, group: str, resource: str, subresource: str, verb: str) -> bool:
    """The API server's own answer (SubjectAccessReview) for the viewer service account."""
    from kubernetes import client

    review = client.AuthorizationV1Api(env.cluster.api_client()).create_subject_access_review(
        {
            "spec": {
                "user": f"system:serviceaccount:{env.namespace}:{VIEWER}",
                "resourceAttributes": {
                    "namespace": env.namespace,
                    "group": group,
                    "resource": resource,
                    "subresource": subresource,
                    "verb": verb,
                },
            }
        }
    )
    return bool(review.status.allowed)


def viewer_cli(env: KubeEnv, kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``loom-dagster`` as the operator runs it: their kubeconfig ($KUBECONFIG), the namespace."""
    assert env.bench is not None
    config = json.dumps({"namespace": env.namespace})
    return subprocess.run(
        [str(Path(sys.executable).with_name("loom-dagster")), "--state-dir", str(env.bench.state_dir)]
        + ["--launcher", "kubernetes", "--launcher-config", config, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
    )


@pytest.mark.k8s
@pytest.mark.kafka
@pytest.mark.slow
def test_a_read_only_service_account_runs_status_and_logs_and_changes_nothing(
    kube_env: KubeEnv, tmp_path: Path
) -> None:
    env = kube_env
    apps, core = env.admin()
    # the deployer's launcher config names its kubeconfig (the launcher's Role, which may stop flows), so
    # every record does; the operator's CLI must use the operator's own credentials all the same
    launcher_config = env.launcher_config()
    assert Path(launcher_config["kubeconfig"]).exists()
    assert env.bench is not None
    resource = env.bench.resource(
        launcher="kubernetes", launcher_config=launcher_config, health_timeout_s=30, preflight=False
    )
    with dg.instance_for_test() as instance:
        assert env.bench.materialize(instance, resource=resource, DB_PASSWORD=f"pw-{MARK}").success
    viewer = viewer_kubeconfig(env, tmp_path)
    for group, resource_name, sub, verb in ALLOWED:
        assert allowed(env, group, resource_name, sub, verb), (resource_name, sub, verb)
    for group, resource_name, sub, verb in DENIED:
        assert not allowed(env, group, resource_name, sub, verb), (resource_name, sub, verb)

    status = viewer_cli(env, viewer, "status", "--json", "--no-lag")
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)
    assert row["flow"] == "ticks" and row["health"] == "healthy", row
    logs = viewer_cli(env, viewer, "logs", "ticks", "-n", "5")
    assert logs.returncode == 0, logs.stderr
    assert MARK not in status.stdout + logs.stdout + status.stderr + logs.stderr

    # and nothing changes under it: the CLI's stop, and the API itself, are forbidden
    before = apps.read_namespaced_stateful_set("loom-ticks", env.namespace)
    stop = viewer_cli(env, viewer, "stop", "ticks")
    assert stop.returncode == 2 and "403" in stop.stderr and "leases" in stop.stderr, stop.stderr
    assert apps.read_namespaced_stateful_set("loom-ticks", env.namespace).metadata.resource_version == (
        before.metadata.resource_version
    )
    from kubernetes import client, config

    api = config.new_client_from_config(str(viewer))
    forbidden: list[Any] = [
        lambda: client.CoreV1Api(api).create_namespaced_config_map(
            env.namespace, {"metadata": {"name": "x"}}
        ),
        lambda: client.AppsV1Api(api).patch_namespaced_stateful_set_scale(
            "loom-ticks", env.namespace, {"spec": {"replicas": 0}}
        ),
        lambda: client.CoreV1Api(api).patch_namespaced_config_map(
            "loom-ticks-state", env.namespace, {"data": {"deployment.json": "{}"}}
        ),
        lambda: client.CoreV1Api(api).list_namespaced_secret(env.namespace),
    ]
    for attempt in forbidden:
        with pytest.raises(client.ApiException) as refused:
            attempt()
        assert refused.value.status == 403
    record = json.loads(
        core.read_namespaced_config_map("loom-ticks-state", env.namespace).data["deployment.json"]
    )
    assert record["stopped_at"] is None and record["flow_name"] == "ticks"
