"""The job image of the Kubernetes tests: ``docs/kubernetes/Dockerfile`` built by ``scripts/k8s-image``
(buildah on a Debian base, no Docker, no registry) into a docker-archive tarball.

``job_image()`` runs the script (a no-op printing the cached tarball when nothing changed; 1.5 to 2
minutes cold) and returns the image reference and the tarball. A node takes it with
``ctr -n k8s.io images import <tarball>``, which names it ``JobImage.ref``
(``localhost/loom-dagster-job:<hash12>``: never looked up on a public registry; the tag is the hash of
every input, so the default ``imagePullPolicy`` is ``IfNotPresent`` and nothing is pulled).

The session fixture is registered as ``job_image``; import it into ``tests/conftest.py`` with::

    from tests.support.k8s.job_image import job_image_fixture  # noqa: E402, F401

``extract_rootfs`` and ``run_in_rootfs`` unpack the tarball and run a command in it the way a kubelet
would with a read-only root filesystem: as the image's user, in its working dir with its environment,
``/tmp`` and ``/var/run/loom`` on fresh tmpfs (the pod's emptyDirs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from loom_dagster.core.launchers.kubernetes.settings import DEFAULT_STATUS_DIR
from tests.support.k8s.cluster import REPO_ROOT, tail

IMAGE_SCRIPT = REPO_ROOT / "scripts" / "k8s-image"
BUILD_TIMEOUT_S = 3600.0
STATUS_DIR = DEFAULT_STATUS_DIR
"""The launcher's status emptyDir, mounted on tmpfs by ``run_in_rootfs``."""


@dataclass(frozen=True)
class JobImage:
    """A built job image: ``ref`` for the pod spec (and the name containerd lists after an import),
    ``tarball`` (docker-archive) for the node."""

    ref: str
    tarball: Path


def job_image(log_path: Path | None = None, timeout: float = BUILD_TIMEOUT_S) -> JobImage:
    """Build the job image with ``scripts/k8s-image`` (cached: a no-op when no input changed).

    Raises ``RuntimeError`` with the build log's tail when the script fails, times out, or prints
    no complete tarball.
    """
    log_path = log_path or Path(tempfile.gettempdir()) / f"loom-k8s-image-{os.getuid()}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(IMAGE_SCRIPT), "--print", "both"],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # so a timeout stops buildah and pip too, by our own process group
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(
                f"scripts/k8s-image timed out after {timeout:.0f} s; log {log_path}:\n{tail(log_path)}"
            ) from None
    lines = out.split()
    if proc.returncode != 0 or len(lines) != 2 or not Path(lines[1]).is_file():
        raise RuntimeError(
            f"scripts/k8s-image failed (rc={proc.returncode}, printed {lines!r}); log {log_path}:\n{tail(log_path)}"
        )
    return JobImage(ref=lines[0], tarball=Path(lines[1]))


@pytest.fixture(scope="session", name="job_image")
def job_image_fixture(tmp_path_factory: pytest.TempPathFactory) -> JobImage:
    """The job image for the session (built once; a failed build fails the test with the log tail)."""
    try:
        return job_image(tmp_path_factory.mktemp("k8s-image") / "k8s-image.log")
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


# --- reading the tarball ---------------------------------------------------------------------------------


def read_archive(tarball: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The docker-archive's manifest entry (``Config``, ``RepoTags``, ``Layers``) and the image config."""
    with tarfile.open(tarball) as archive:
        manifest = json.load(_member(archive, "manifest.json"))
        if len(manifest) != 1:
            raise ValueError(f"{tarball}: {len(manifest)} images, expected one")
        config = json.load(_member(archive, manifest[0]["Config"]))
    return manifest[0], config


def layer_names(tarball: Path) -> list[list[str]]:
    """The member names of each layer, bottom first."""
    manifest, _ = read_archive(tarball)
    names = []
    with tarfile.open(tarball) as archive:
        for layer in manifest["Layers"]:
            with tarfile.open(fileobj=_member(archive, layer)) as layer_tar:
                names.append(layer_tar.getnames())
    return names


def extract_rootfs(tarball: Path, dest: Path) -> dict[str, Any]:
    """Unpack the image's layers into *dest* (as root: owners and modes kept), whiteouts applied.

    Returns the image config. Members that would land outside *dest* (through ``..`` or an absolute
    symlink of the image) are refused: tarfile's ``tar`` filter, with the member's own mode kept.
    """
    manifest, config = read_archive(tarball)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    with tarfile.open(tarball) as archive:
        for layer in manifest["Layers"]:
            with tarfile.open(fileobj=_member(archive, layer)) as layer_tar:
                members = []
                for member in layer_tar.getmembers():
                    path = PurePosixPath(member.name)
                    if path.name == ".wh..wh..opq":
                        _clear_dir(root, path.parent)
                    elif path.name.startswith(".wh."):
                        _remove(root, path.parent / path.name[len(".wh.") :])
                    else:
                        members.append(member)
                layer_tar.extractall(root, members=members, numeric_owner=True, filter=_keep_mode)
    return config["config"]


def _member(archive: tarfile.TarFile, name: str) -> Any:
    handle = archive.extractfile(name)
    if handle is None:
        raise ValueError(f"{name} is not a file in the archive")
    return handle


def _keep_mode(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
    checked = tarfile.tar_filter(member, path)
    return checked.replace(mode=member.mode, deep=False)


def _inside(root: Path, relative: PurePosixPath) -> Path | None:
    """``root/relative`` if its parent resolves inside *root* (the last part is not followed)."""
    target = root / relative
    parent = target.parent.resolve()
    if parent != root and root not in parent.parents:
        return None
    return parent / target.name


def _remove(root: Path, relative: PurePosixPath) -> None:
    target = _inside(root, relative)
    if target is None:
        return
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()


def _clear_dir(root: Path, relative: PurePosixPath) -> None:
    target = _inside(root, relative)
    if target is not None and target.is_dir() and not target.is_symlink():
        for child in target.iterdir():
            _remove(root, relative / child.name)


# --- running in it ---------------------------------------------------------------------------------------

_IN_ROOTFS = r"""
set -eu
root=$1; user=$2; workdir=$3; status=$4; shift 4
mount --make-rprivate /
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
mount -t proc proc "$root/proc"
mount -t tmpfs -o mode=0755 tmpfs "$root/dev"
for node in null zero full random urandom tty; do
  touch "$root/dev/$node"
  mount --bind "/dev/$node" "$root/dev/$node"
done
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
if [ -n "$status" ]; then mount -t tmpfs -o mode=0777 tmpfs "$status"; fi
exec chroot --userspec="$user" "$root" /usr/bin/env -i -C "$workdir" "$@"
"""


def run_in_rootfs(
    rootfs: Path,
    config: Mapping[str, Any],
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run *argv* in the unpacked image as a kubelet would with ``readOnlyRootFilesystem``.

    A private mount namespace (and PID namespace) of our own: the root bind-mounted read-only, /proc,
    a minimal /dev, tmpfs on /tmp and /var/run/loom; then ``chroot`` as the image's ``User`` (its group
    from the image's /etc/passwd), in its ``WorkingDir``, with only its ``Env`` (plus *env*). Needs root.
    """
    uid = str(config.get("User") or "0")
    user = uid if ":" in uid else f"{uid}:{_primary_gid(rootfs, uid)}"
    variables = dict(item.split("=", 1) for item in config.get("Env") or [])
    variables.update(env or {})
    status = resolve_in_rootfs(rootfs, STATUS_DIR)
    command = [
        "unshare", "--mount", "--pid", "--fork", "--",
        "sh", "-c", _IN_ROOTFS, "sh", str(rootfs), user, config.get("WorkingDir") or "/",
        str(status) if status is not None and status.is_dir() else "",
        *(f"{key}={value}" for key, value in variables.items()), *argv,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)


def resolve_in_rootfs(rootfs: Path, path: str) -> Path | None:
    """Where *path* of the image is under *rootfs*, following the image's symlinks (an absolute target
    is relative to the image's root, as in a chroot); ``None`` past 40 links."""
    root = rootfs.resolve()
    current = root
    parts = list(PurePosixPath(path).parts[1:])
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / part
        if candidate.is_symlink():
            links += 1
            if links > 40:
                return None
            target = PurePosixPath(os.readlink(candidate))
            parts = list(target.parts[1:] if target.is_absolute() else target.parts) + parts
            if target.is_absolute():
                current = root
            continue
        current = candidate
    return current


def _primary_gid(rootfs: Path, uid: str) -> str:
    for line in (rootfs / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if len(fields) > 3 and (fields[2] == uid or fields[0] == uid):
            return fields[3]
    return uid
