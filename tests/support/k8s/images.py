"""Container images without a registry: single-layer ``docker save`` tarballs made from local files.

``ctr -n k8s.io images import`` (``RealNode.import_image``) loads them into the node's containerd; pods then use
them with ``imagePullPolicy: Never`` (or ``IfNotPresent``). Two images the harness needs:

- ``pause_image``: the pod sandbox, the static ``pause`` binary ``scripts/k8s-build`` compiles (tagged with
  the name containerd's config pins, ``PAUSE_IMAGE``);
- ``busybox_image``: Debian's ``busybox-static`` with a symlink per applet (``sh``, ``nslookup``, ``wget``,
  ``nc``, ``sleep`` ...), for harness tests that need something to run before the job image exists.

Image names start with ``localhost/`` so that a missing image is never looked up on a public registry.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PAUSE_IMAGE = "localhost/loom-pause:1"
BUSYBOX_IMAGE = "localhost/loom-busybox:1"
BUSYBOX_BINARY = Path("/bin/busybox")  # Debian's busybox-static (installed by scripts/k8s-build)


@dataclass
class ImageSpec:
    """What goes into a one-layer image: files (path in the image -> host file or bytes, mode) and settings."""

    ref: str
    files: dict[str, tuple[Path | bytes, int]] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    dirs: dict[str, int] = field(default_factory=dict)  # path -> mode
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=lambda: ["PATH=/bin:/usr/bin:/sbin:/usr/sbin"])
    workdir: str = "/"
    labels: Mapping[str, str] = field(default_factory=dict)


def _add(tar: tarfile.TarFile, info: tarfile.TarInfo, data: bytes | None = None) -> None:
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def layer_tar(spec: ImageSpec) -> bytes:
    """The uncompressed layer: parent directories first, then files and symlinks, in a stable order."""
    buf = io.BytesIO()
    entries: dict[str, tuple[str, object]] = {}
    for d, dir_mode in spec.dirs.items():
        entries[d.strip("/")] = ("dir", dir_mode)
    for path, (src, mode) in spec.files.items():
        entries[path.strip("/")] = ("file", (src, mode))
    for path, target in spec.symlinks.items():
        entries[path.strip("/")] = ("link", target)
    for path in list(entries):
        parent = Path(path).parent
        while str(parent) not in (".", ""):
            entries.setdefault(str(parent), ("dir", 0o755))
            parent = parent.parent
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries):
            kind, value = entries[path]
            info = tarfile.TarInfo(path)
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, int(value)  # type: ignore[call-overload]
                _add(tar, info)
            elif kind == "link":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, str(value), 0o777
                _add(tar, info)
            else:
                src, mode = value  # type: ignore[misc]
                data = src if isinstance(src, bytes) else Path(src).read_bytes()
                info.size, info.mode = len(data), mode
                _add(tar, info, data)
    return buf.getvalue()


def write_image(spec: ImageSpec, tarball: Path) -> Path:
    """Write ``spec`` as a ``docker save`` archive (manifest.json, config, one layer) to ``tarball``."""
    layer = layer_tar(spec)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    container_config: dict[str, object] = {"Env": spec.env, "WorkingDir": spec.workdir}
    if spec.entrypoint is not None:
        container_config["Entrypoint"] = spec.entrypoint
    if spec.cmd is not None:
        container_config["Cmd"] = spec.cmd
    if spec.labels:
        container_config["Labels"] = dict(spec.labels)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": container_config,
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "tests/support/k8s/images.py"}],
        },
        sort_keys=True,
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_name = diff_id.split(":", 1)[1] + "/layer.tar"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [spec.ref], "Layers": [layer_name]}]).encode()
    tarball.parent.mkdir(parents=True, exist_ok=True)
    tmp = tarball.with_name(tarball.name + ".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((layer_name, layer), (config_name, config), ("manifest.json", manifest)):
            if "/" in name:
                dir_info = tarfile.TarInfo(name.split("/", 1)[0])
                dir_info.type, dir_info.mode = tarfile.DIRTYPE, 0o755
                _add(tar, dir_info)
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            _add(tar, info, data)
    tmp.replace(tarball)
    return tarball


def pause_image(bin_dir: Path, tarball: Path, ref: str = PAUSE_IMAGE) -> Path:
    """The sandbox image: ``/pause`` (static, from ``scripts/k8s-build``) as entrypoint."""
    pause = bin_dir / "pause"
    if not pause.exists():
        raise RuntimeError(f"{pause} missing: run scripts/k8s-build")
    spec = ImageSpec(
        ref,
        files={"pause": (pause, 0o755)},
        entrypoint=["/pause"],
        dirs={"dev": 0o755, "proc": 0o555, "sys": 0o555},
    )
    return write_image(spec, tarball)


def busybox_applets(busybox: Path = BUSYBOX_BINARY) -> list[str]:
    """The applets a busybox binary has (``busybox --list``)."""
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True, timeout=30)
    return [a for a in out.stdout.split() if a and a != "busybox"]


def busybox_image(tarball: Path, ref: str = BUSYBOX_IMAGE, busybox: Path = BUSYBOX_BINARY) -> Path:
    """A small image from Debian's ``busybox-static``: ``/bin/busybox``, one ``/bin/<applet>`` link per applet,
    ``/etc/passwd`` with root and nobody, an empty ``/tmp``; default command ``sh``."""
    if not busybox.exists():
        raise RuntimeError(f"{busybox} missing: install Debian's busybox-static (scripts/k8s-build does)")
    links = {f"bin/{a}": "busybox" for a in busybox_applets(busybox)}
    files: dict[str, tuple[Path | bytes, int]] = {
        "bin/busybox": (busybox, 0o755),
        "etc/passwd": (b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n", 0o644),
        "etc/group": (b"root:x:0:\nnobody:x:65534:\n", 0o644),
    }
    dirs = {"tmp": 0o1777, "root": 0o700, "dev": 0o755, "proc": 0o555, "sys": 0o555, "etc": 0o755}
    spec = ImageSpec(ref, files=files, symlinks=links, dirs=dirs, cmd=["sh"])
    return write_image(spec, tarball)
