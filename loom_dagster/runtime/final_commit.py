"""Commit the offsets that became durable during the shutdown drain ("final commit").

Measured with loom 9 / bytewax 0.21 (``at_least_once``): on SIGINT bytewax closes the Kafka
source partitions (final offset commit) *before* the sink partitions, whose ``close`` flushes
the table buffers (``flush_on_shutdown``). The records of that last flush complete in loom's
commit tracker after the source consumer is gone, so their offsets are never committed and a
restart writes them again (duplicates in Delta and in every output topic).

After a clean drain no worker runs any more, so this module reads each tracker's watermark and,
where it advanced past what the source committed, commits it with a fresh consumer of the same
group (loom's sources commit the same way: ``assign`` mode, no group membership). Everything
below the watermark completed in every branch, so the commit cannot skip an unwritten record.
It never moves a group offset backwards: an offset already ahead (a newer job) is left alone.

This reads loom internals (``KafkaCommitTracker._partitions``); if they move, it does nothing.
"""

from __future__ import annotations

import functools
import importlib
import logging
import weakref
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("loom_dagster.runtime")
_TRACKER_MODULE = "loom.streaming.bytewax._commit_tracker"
_MARK = "__loom_dagster_registry__"
_TRACKERS: weakref.WeakSet[Any] = weakref.WeakSet()
COMMIT_TIMEOUT_S = 10.0


def install_tracker_registry() -> bool:
    """Remember every ``KafkaCommitTracker`` built in this process; False if loom changed."""
    try:
        cls = importlib.import_module(_TRACKER_MODULE).KafkaCommitTracker
    except (ImportError, AttributeError):
        return False
    init = cls.__init__
    if hasattr(init, _MARK):
        return True

    @functools.wraps(init)
    def registering_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        _TRACKERS.add(self)

    setattr(registering_init, _MARK, True)
    cls.__init__ = registering_init
    return True


def uncommitted_offsets() -> dict[tuple[str, int], int]:
    """Per partition, the watermark that advanced since the partition's last commit."""
    offsets: dict[tuple[str, int], int] = {}
    for tracker in list(_TRACKERS):
        try:
            with tracker._lock:
                for key, state in tracker._partitions.items():
                    offset = state.committable_offset() if state.dirty else None
                    if offset is not None:
                        offsets[key] = max(offset, offsets.get(key, offset))
        except AttributeError:
            return {}
    return offsets


def consumer_config(runner: Any) -> dict[str, Any] | None:
    """The confluent consumer config of the runner's Kafka source (``None`` if not Kafka)."""
    settings = getattr(getattr(getattr(runner, "_plan", None), "source", None), "settings", None)
    to_config = getattr(settings, "to_confluent_config", None)
    if to_config is None:
        return None
    config = dict(to_config())
    return config if config.get("group.id") else None


def commit_offsets(
    config: Mapping[str, Any], offsets: Mapping[tuple[str, int], int]
) -> dict[tuple[str, int], int]:
    """Commit ``offsets`` for the group of ``config`` where they are ahead; return what was committed."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({**config, "enable.auto.commit": False})
    try:
        wanted = [TopicPartition(topic, partition) for topic, partition in offsets]
        current = {
            (tp.topic, tp.partition): tp.offset for tp in consumer.committed(wanted, timeout=COMMIT_TIMEOUT_S)
        }
        ahead = {key: value for key, value in offsets.items() if value > current.get(key, -1)}
        if ahead:
            consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in ahead.items()], asynchronous=False
            )
        return ahead
    finally:
        consumer.close()


def final_commit(runner: Any) -> dict[tuple[str, int], int]:
    """Commit what the drain made durable; log and swallow failures (at worst: duplicates)."""
    offsets = uncommitted_offsets()
    config = consumer_config(runner)
    if not offsets or config is None:
        return {}
    try:
        done = commit_offsets(config, offsets)
    except Exception as exc:  # the drain is over; a failed commit only means replay
        log.warning("final offset commit failed (records will be replayed on restart): %s", exc)
        return {}
    if done:
        listed = ", ".join(f"{t}:{p}@{o}" for (t, p), o in sorted(done.items()))
        log.info("committed offsets made durable by the shutdown flush: %s", listed)
    return done
