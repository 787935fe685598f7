"""Process identity and liveness from ``/proc``: a PID plus its start time survives PID reuse; the
boot id tells a record written before a reboot (start times restart at 0) from a current one; the
owner uids tell our processes from another user's."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec


class ProcStat(msgspec.Struct, frozen=True):
    """The fields of ``/proc/<pid>/stat`` we use."""

    pid: int
    state: str
    pgid: int
    session: int
    start_ticks: int


def read_stat(pid: int) -> ProcStat | None:
    """Parse ``/proc/<pid>/stat``; ``None`` when the process does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after the last ')'.
    rest = raw[raw.rindex(")") + 2 :].split()
    return ProcStat(
        pid=pid, state=rest[0], pgid=int(rest[2]), session=int(rest[3]), start_ticks=int(rest[19])
    )


def start_ticks(pid: int) -> int | None:
    """Start time of *pid* in clock ticks since boot (field 22), or ``None`` when gone."""
    stat = read_stat(pid)
    return stat.start_ticks if stat else None


def is_alive(pid: int, expected_start_ticks: int | None = None) -> bool:
    """Whether *pid* runs and is the same process (same start time); zombies count as dead."""
    stat = read_stat(pid)
    if stat is None or stat.state in ("Z", "X", "x"):
        return False
    return expected_start_ticks is None or stat.start_ticks == expected_start_ticks


def uptime_seconds(pid: int) -> float | None:
    """Seconds since *pid* started, from its start ticks and the system uptime."""
    stat = read_stat(pid)
    if stat is None:
        return None
    try:
        boot_uptime = float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return None
    return max(0.0, boot_uptime - stat.start_ticks / os.sysconf("SC_CLK_TCK"))


class Owner(msgspec.Struct, frozen=True):
    """The real and effective uid of a process (``/proc/<pid>/status``, line ``Uid:``)."""

    real: int
    effective: int

    def is_us(self) -> bool:
        """True when the process runs as this process's user (real and effective uid)."""
        return self.real == os.getuid() and self.effective == os.geteuid()

    def describe(self) -> str:
        """``uid 65534`` (``uid 0/1000`` when real and effective differ)."""
        if self.real == self.effective:
            return f"uid {self.real}"
        return f"uid {self.real}/{self.effective} (real/effective)"


def owner(pid: int) -> Owner | None:
    """Who *pid* runs as, or ``None`` when gone or unreadable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (OSError, ProcessLookupError):
        return None
    for line in text.splitlines():
        if line.startswith("Uid:"):
            fields = line.split()[1:]
            if len(fields) >= 2 and fields[0].isdigit() and fields[1].isdigit():
                return Owner(int(fields[0]), int(fields[1]))
    return None


def boot_id() -> str | None:
    """This boot's id (``/proc/sys/kernel/random/boot_id``), or ``None`` where the kernel has none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def cmdline(pid: int) -> list[str]:
    """The argv of *pid* (empty when gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
