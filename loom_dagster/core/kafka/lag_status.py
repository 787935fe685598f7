"""Lag statuses (Burrow's, plus loom's STARTING) and how bad each is. No Dagster here."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class LagSeverity(StrEnum):
    """How bad a status is: OK passes, WARN and ERROR fail the check with that severity."""

    OK = "ok"
    WARN = "warn"
    ERROR = "error"


class LagStatus(StrEnum):
    """Status of a partition or a flow (a flow takes the worst of its partitions and the lag thresholds).

    * ``OK``: lag is zero, or the consumer is keeping up (lag not growing while it commits).
    * ``STARTING``: no committed offset yet on a partition with data, within the starting window of a
      fresh deployment (loom commits only after the first table flush); lag = end - the offset the job
      started from. Passes.
    * ``WARN``: the consumer commits but lag grew between every pair of samples of the window
      (falling behind), or the flow's total lag is at least ``warn_lag``.
    * ``ERR``: the flow's total lag is at least ``error_lag``.
    * ``STALL``: the committed offset did not move over the window while new messages arrived.
    * ``STOP``: the committed offset did not move over the window, with messages left to consume and no
      new data arriving (the consumer is gone; nothing to wake it).
    * ``REWIND``: the committed offset went backwards within the window (offset reset, replay).
    * ``NO_COMMITS``: the group has no committed offset on a partition that holds data (not started yet,
      or still none once the starting window of the deployment is over).
    * ``UNAVAILABLE``: the cluster answered but not for this partition (leader election, authorization).
    * ``MISSING_TOPIC``: a source topic does not exist (deleted, or not created yet).
    * ``UNREACHABLE``: no broker of the cluster answered within ``request_timeout_s``.
    """

    OK = "OK"
    STARTING = "STARTING"
    WARN = "WARN"
    NO_COMMITS = "NO_COMMITS"
    REWIND = "REWIND"
    UNAVAILABLE = "UNAVAILABLE"
    ERR = "ERR"
    STALL = "STALL"
    STOP = "STOP"
    MISSING_TOPIC = "MISSING_TOPIC"
    UNREACHABLE = "UNREACHABLE"

    @property
    def rank(self) -> int:
        """Order used to pick the worst status (declaration order)."""
        return _RANKS[self]

    @property
    def severity(self) -> LagSeverity:
        """OK, WARN (worth a look) or ERROR (the flow is not consuming, or cannot be checked)."""
        if self in (LagStatus.OK, LagStatus.STARTING):
            return LagSeverity.OK
        if self in (LagStatus.WARN, LagStatus.NO_COMMITS, LagStatus.REWIND, LagStatus.UNAVAILABLE):
            return LagSeverity.WARN
        return LagSeverity.ERROR


_RANKS = {status: i for i, status in enumerate(LagStatus)}


def worst(statuses: Iterable[LagStatus]) -> LagStatus:
    """The worst of *statuses* (``OK`` when empty)."""
    return max(statuses, key=lambda s: s.rank, default=LagStatus.OK)
