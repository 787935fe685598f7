"""The job image: docs/kubernetes/Dockerfile built by scripts/k8s-image, asserted from the built tarball.

Its config (non-root numeric user, the runtime as entrypoint, the venv first on PATH, the launcher's
layout), its layers (loom-dagster, the test flows at their import path), that nothing of the build host
(credentials, proxy CA, pip config, resolv.conf) got in, and that it runs: the tarball is unpacked and
the entrypoint and an import probe run in it as uid 10001 with a read-only root, tmpfs on /tmp and
/var/run/loom (the pod's emptyDirs), as a kubelet would run it with ``readOnlyRootFilesystem``.
Needs root (unpacking with owners, mount namespaces, chroot), like the build itself.
"""

from __future__ import annotations

import base64
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loom_dagster.core.launchers.kubernetes.settings import KubernetesSettings
from tests.support.k8s.cluster import REPO_ROOT
from tests.support.k8s.job_image import (
    JobImage,
    extract_rootfs,
    job_image_fixture,  # noqa: F401  (the session fixture `job_image`)
    layer_names,
    read_archive,
    run_in_rootfs,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a cold build is minutes, not seconds

RUNTIME = ["python", "-m", "loom_dagster.runtime"]
VENV_BIN = "/opt/venv/bin"
USER = "10001"
FLOW_FILES = sorted(p.name for p in (REPO_ROOT / "tests" / "flows").glob("*.py"))
MUST_HAVE = {
    "loom-dagster", "loom-kernel", "bytewax", "confluent-kafka", "deltalake", "polars", "pyarrow", "msgspec",
    "sqlalchemy", "aiosqlite", "clickhouse-connect", "prometheus-client", "pyyaml", "kubernetes",
}  # fmt: skip
NOT_IN_A_JOB = {
    "pytest",
    "ruff",
    "mypy",
    "hypothesis",
    "chdb",
    "dagster",
    "dagster-webserver",
    "dagster-dg-cli",
}
FROM_ENSUREPIP = {"pip", "setuptools"}  # the base python's own, not the test venv's
IMPORTS = [
    "loom", "loom.streaming", "loom.streaming.bytewax", "bytewax", "confluent_kafka", "confluent_kafka.admin",
    "deltalake", "polars", "pyarrow", "sqlalchemy", "aiosqlite", "clickhouse_connect", "msgspec", "yaml",
    "prometheus_client", "loom_dagster.runtime", "loom_dagster.runtime.args", "loom_dagster.runtime.job",
    "loom_dagster.runtime.build", "loom_dagster.runtime.http_server", "loom_dagster.runtime.final_commit",
    "loom_dagster.core.flows.loading", "loom_dagster.core.checks.fence",
]  # fmt: skip
FLOW_PATHS = [
    "tests.flows.delta_only:ticks_flow",
    "tests.flows.shapes:make_flow",
    "tests.flows.sql_rows:readings_flow",
]


@pytest.fixture(scope="module")
def archive(job_image: JobImage) -> tuple[dict[str, Any], dict[str, Any]]:
    """The docker-archive's manifest entry and the image config."""
    return read_archive(job_image.tarball)


@pytest.fixture(scope="module")
def rootfs(
    job_image: JobImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The image unpacked (owners kept, whiteouts applied) and its config, on a tmpfs of our own: ~1 GiB
    unpacked in seconds and gone at once (deleting it from disk takes half a minute)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("unpacking and running the image needs root and unshare (as the real node does)")
    dest = tmp_path_factory.mktemp("job-image") / "rootfs"
    dest.mkdir()
    on_tmpfs = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g,mode=0755", "tmpfs", str(dest)]).returncode
        == 0
    )
    try:
        config = extract_rootfs(job_image.tarball, dest)
        yield dest, config
    finally:
        if on_tmpfs:
            subprocess.run(["umount", "--lazy", str(dest)], check=False)
        else:
            shutil.rmtree(dest, ignore_errors=True)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _env(config: dict[str, Any]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in config.get("Env") or [])


def test_config_runs_the_runtime_as_a_numeric_non_root_user(
    job_image: JobImage, archive: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    manifest, image = archive
    config = image["config"]
    settings = KubernetesSettings()
    assert config["User"] == USER  # numeric: the kubelet can verify runAsNonRoot
    assert config["Entrypoint"] == RUNTIME
    assert config["WorkingDir"] == settings.working_dir
    env = _env(config)
    assert env["PATH"].split(":")[0] == VENV_BIN  # the launcher's command `python` is the venv's
    assert settings.python == "python"
    assert env["PYTHONPATH"] == settings.python_path
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"] == "/tmp"  # an emptyDir in the pod: the root filesystem may be read-only
    assert set(config["ExposedPorts"]) == {f"{settings.http_port}/tcp", f"{settings.cluster_port}/tcp"}
    assert not [key for key in env if re.search(r"(?i)secret|token|passw|credential|_key\b|pip_|proxy", key)]
    assert manifest["RepoTags"] == [job_image.ref]  # what `ctr images import` names it
    assert re.fullmatch(r"localhost/loom-dagster-job:[0-9a-f]{12}", job_image.ref)
    assert job_image.tarball.name == f"loom-dagster-job-{job_image.ref.rsplit(':', 1)[1]}.tar"


def test_layers_hold_loom_dagster_and_the_test_flows_at_their_import_path(job_image: JobImage) -> None:
    names = {name for layer in layer_names(job_image.tarball) for name in layer}
    site = {
        re.sub(r"^(opt/venv/lib/python3\.\d+/site-packages)/.*", r"\1", n)
        for n in names
        if "site-packages/" in n
    }
    assert len(site) == 1, site
    packages = site.pop()
    assert f"{packages}/loom_dagster/runtime/__main__.py" in names
    assert f"{packages}/loom_dagster/core/launchers/kubernetes/rbac.yaml" in names  # package data too
    assert "app/tests/__init__.py" in names
    for flow in FLOW_FILES:  # `tests.flows.<module>:<flow>` under PYTHONPATH=/app, compiled at build time
        assert f"app/tests/flows/{flow}" in names
        assert f"app/tests/flows/__pycache__/{flow[:-3]}.cpython-311.pyc" in names
    assert not [n for n in names if n.startswith("app/") and not n.startswith("app/tests")], (
        "only the flows in /app"
    )
    tests_package = {
        "app/tests/__init__.py",
        "app/tests/__pycache__",
        "app/tests/__pycache__/__init__.cpython-311.pyc",
    }
    beside_flows = {n for n in names if n.startswith("app/tests/") and not n.startswith("app/tests/flows")}
    assert beside_flows <= tests_package, "no test module but the flows"


def _build_secrets() -> dict[str, bytes]:
    """Secret-looking values of the build environment: credential env vars, credentials in the usual
    files, and the host's own CA certificates (a TLS-intercepting proxy's: build time only)."""
    found: dict[str, bytes] = {}
    for key, value in os.environ.items():
        secret_name = re.search(r"(?i)secret|token|passw|credential|api_?key|access_?key|private|auth", key)
        if secret_name and len(value) >= 8 and not value.startswith("/"):  # a path is no secret
            found[f"${key}"] = value.encode()
    home = Path.home()
    credential = re.compile(
        r"(?i)(?:password|passwd|token|secret|auth)\s*[=:]?\s*\"?([^\s\",]{8,})|://[^/\s:@]+:([^@\s/]{4,})@"
    )
    for path in [
        home / ".netrc", home / ".pypirc", home / ".git-credentials", home / ".docker" / "config.json",
        home / ".config" / "pip" / "pip.conf", home / ".pip" / "pip.conf", Path("/etc/pip.conf"),
    ]:  # fmt: skip
        if path.is_file():
            for match in credential.finditer(path.read_text(errors="replace")):
                found[f"{path} credential"] = (match.group(1) or match.group(2)).encode()
    for cert in Path("/usr/local/share/ca-certificates").glob("**/*.crt"):
        body = re.search(
            r"-----BEGIN CERTIFICATE-----\s+(.*?)-----END", cert.read_text(errors="replace"), re.S
        )
        if body:
            der = base64.b64decode("".join(body.group(1).split()))
            found[f"host CA {cert.name} (PEM)"] = base64.b64encode(der)[64:128]
            found[f"host CA {cert.name} (DER)"] = der[-64:]
    return found


def test_no_build_secrets_in_the_image(rootfs: tuple[Path, dict[str, Any]]) -> None:
    root, config = rootfs
    secrets = _build_secrets()
    pattern = re.compile(b"|".join(re.escape(value) for value in secrets.values()) or b"(?!)")
    private_key = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\r?\n(?:[A-Za-z0-9+/]{64}\r?\n){2,}")
    credential_files = {".netrc", ".pypirc", ".git-credentials", "pip.conf", "pip.ini", ".dockercfg"}
    hits: list[str] = []
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = Path(directory, name)
            relative = "/" + str(path.relative_to(root))
            if name in credential_files or relative.endswith("/.docker/config.json"):
                hits.append(f"{relative}: a credential file")
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
            match = pattern.search(data)
            if match:
                label = next(k for k, v in secrets.items() if v == match.group(0))
                hits.append(f"{relative}: {label}")
            if not data.startswith(b"\x7fELF") and private_key.search(data):  # libraries carry self-test keys
                hits.append(f"{relative}: a PEM private key")
    assert not hits, hits
    for leftover in ["root/.cache", "tmp/wheels", "mnt", "run/loom-build"]:
        assert not (root / leftover).exists() or not any((root / leftover).iterdir()), leftover
    # the build host's network identity: mmdebstrap copies them in, the base recipe empties them
    assert (root / "etc/resolv.conf").read_bytes() == b""
    assert (root / "etc/hostname").read_bytes() == b""


def test_the_entrypoint_runs_as_10001_on_a_read_only_root(rootfs: tuple[Path, dict[str, Any]]) -> None:
    root, config = rootfs
    done = run_in_rootfs(root, config, [*config["Entrypoint"], "--help"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--import-path" in done.stdout and "--status-file" in done.stdout


PROBE = textwrap.dedent(
    """
    import errno, importlib, importlib.metadata as md, importlib.util, json, os, pkgutil, sys
    imports, flow_paths = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    out = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "cwd": os.getcwd(),
           "executable": sys.executable, "prefix": sys.prefix, "home": os.path.expanduser("~"),
           "root_read_only": bool(os.statvfs("/").f_flag & os.ST_RDONLY), "not_writable": {}, "writable": {}}
    for module in imports:
        importlib.import_module(module)
    import tests.flows
    for info in pkgutil.iter_modules(tests.flows.__path__, "tests.flows."):
        importlib.import_module(info.name)
    from loom_dagster.core.flows.loading import import_flow
    out["flows"] = {path: type(import_flow(path)).__name__ for path in flow_paths}
    for directory in ["/", "/app", "/app/tests/flows", "/opt/venv", sys.prefix + "/lib", "/etc", "/usr"]:
        try:
            open(os.path.join(directory, "probe-write"), "w").close()
            out["not_writable"][directory] = "WROTE"
        except OSError as e:
            out["not_writable"][directory] = errno.errorcode[e.errno]
    for directory in ["/tmp", "/var/run/loom"]:
        path = os.path.join(directory, "probe-write")
        with open(path, "w") as f:
            f.write("ok")
        out["writable"][directory] = os.path.getsize(path) == 2
    stale, missing, checked = [], [], 0
    for name, module in list(sys.modules.items()):
        source = getattr(module, "__file__", None) or ""
        if not source.endswith(".py") or not source.startswith(("/app/", "/opt/venv/")):
            continue
        checked += 1
        cached = importlib.util.cache_from_source(source)
        if not os.path.exists(cached):
            missing.append(source)
            continue
        with open(cached, "rb") as f:
            header = f.read(16)
        st = os.stat(source)
        flags = int.from_bytes(header[4:8], "little")
        if flags == 0 and (int.from_bytes(header[8:12], "little") != int(st.st_mtime) & 0xFFFFFFFF
                           or int.from_bytes(header[12:16], "little") != st.st_size & 0xFFFFFFFF):
            stale.append(source)
    out["bytecode"] = {"checked": checked, "missing": missing, "stale": stale}
    out["dists"] = {d.metadata["Name"]: d.version for d in md.distributions()}
    print(json.dumps(out))
    """
)


def test_the_image_imports_the_runtime_and_flows_read_only_with_the_test_venvs_versions(
    rootfs: tuple[Path, dict[str, Any]],
) -> None:
    root, config = rootfs
    done = run_in_rootfs(root, config, ["python", "-c", PROBE, json.dumps(IMPORTS), json.dumps(FLOW_PATHS)])
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert (probe["uid"], probe["gid"], probe["groups"]) == (10001, 10001, [10001])
    assert probe["cwd"] == "/app" and probe["home"] == "/tmp"
    assert probe["prefix"] == "/opt/venv" and probe["executable"] == f"{VENV_BIN}/python"
    assert probe["root_read_only"]
    assert probe["not_writable"] == dict.fromkeys(probe["not_writable"], "EROFS")
    assert probe["writable"] == {"/tmp": True, "/var/run/loom": True}
    assert probe["flows"] == dict.fromkeys(FLOW_PATHS, "StreamFlow")
    # compiled at build time and still valid: nothing to write (or recompile) at start-up
    bytecode = probe["bytecode"]
    assert bytecode["checked"] > 500 and not bytecode["missing"] and not bytecode["stale"], bytecode
    # the pod runs what the tests run: the image's distributions at the test venv's versions
    image = {_canonical(name): version for name, version in probe["dists"].items()}
    assert MUST_HAVE <= set(image), MUST_HAVE - set(image)
    assert not NOT_IN_A_JOB & set(image)
    venv = {_canonical(d.metadata["Name"]): d.version for d in md.distributions()}
    differ = {n: (v, venv.get(n)) for n, v in image.items() if n not in FROM_ENSUREPIP and venv.get(n) != v}
    assert not differ, differ
