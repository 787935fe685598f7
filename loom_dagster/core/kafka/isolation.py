"""Kafka group-coordinator requests run in a short-lived child process, so that no librdkafka abort can
kill the process that asked (a Dagster code server evaluating sensors, a run worker deploying, the CLI).

Why a child process: librdkafka (every release up to 2.16.0, the newest confluent-kafka ships) can abort
the whole process with ``rd_kafka_enq_once_del_source_return: Assertion 'eonce->refcnt > 0' failed``
when a broker connection drops during a coordinator-targeted admin request (DescribeConsumerGroups,
ListConsumerGroupOffsets, AlterConsumerGroupOffsets: librdkafka#4605, fix unreleased). An abort cannot
be caught. Two ways out were measured side by side (``bench/broker_restart.py``):

* a pure-Python client for these requests (kafka-python 3, which batches every group into one
  OffsetFetch) was the fastest: a lag fetch of 200 groups in 0.05 s, against 0.17 s for librdkafka in
  this process and 0.34 s in a child (2026-12-06, ``bench/broker_restart.py`` with kafka-python
  installed). But it would be a second client behind every secured cluster, with a second translation of
  librdkafka's security settings (SASL mechanisms and OIDC, PEM strings, keystores) to keep in step, for
  requests a sensor makes once per tick;
* a child process keeps the one client and its config exactly as the jobs use them, for one interpreter
  start plus the ``confluent_kafka`` import per call (0.13-0.17 s measured, per sensor tick or deploy
  check, never per message). Its abort becomes :class:`KafkaClientCrashed` (a ``ConnectionError``:
  "brokers unreachable", retried on the next tick). Chosen: the added cost is small against a 30-s tick,
  and no security setting can behave differently in the sensors than in the jobs.

The request travels on the child's stdin (pickled: it carries the cluster's SASL password, which must
never be in argv) and the answer on its stdout; the child only runs functions registered with
:func:`in_child_process` in the modules of :data:`_MODULES`. Both ends are this package: nothing read
from disk or from a record is unpickled. No Dagster here.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from loom_dagster.core.python_child import run_module
from loom_dagster.core.redact import redact_text

P = ParamSpec("P")
R = TypeVar("R")

_MODULES = frozenset(
    {
        "loom_dagster.core.checks.fence",
        "loom_dagster.core.kafka.offsets",
        "loom_dagster.core.kafka.snapshot",
        "loom_dagster.core.deploy.rewind",
    }
)
"""The only modules a child imports: those whose functions are decorated with :func:`in_child_process`."""

_STARTUP_S = 15.0
"""Added to a call's own timeout before the child is killed: interpreter start and imports, on a busy host."""

IN_CHILD_VARIABLE = "LOOM_DAGSTER_KAFKA_CHILD"
"""Set in the child: calls there run in that process (no grandchild)."""


class KafkaClientCrashed(ConnectionError):
    """The child running a Kafka request died (a librdkafka abort, a kill, or it overran its time)."""


def in_child_process(
    *, on_crash: Callable[..., Any] | None = None, timeout_arg: str = "timeout_s", retries: int = 0
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run the decorated function in a short-lived child process; ``fn.in_process`` runs it here.

    The child's return value or exception comes back as is. When the child dies (abort, signal, or
    over its time: the call's ``timeout_arg`` plus a start-up margin), ``on_crash(reason, *args,
    **kwargs)`` gives the result instead, or, without ``on_crash``, :class:`KafkaClientCrashed` is
    raised with the reason (exit signal and the child's last words, redacted). A read that changes
    nothing may take ``retries``: a crashed child is replaced at once that many times first.

    Example:
        >>> @in_child_process()
        ... def describe(cluster, groups, timeout_s): ...
        >>> callable(describe.in_process)
        True
    """

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            if os.environ.get(IN_CHILD_VARIABLE) == "1":
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            timeout = float(bound.arguments.get(timeout_arg) or 10.0)
            for attempt in range(retries + 1):
                try:
                    return _call_child(fn, args, kwargs, timeout)
                except KafkaClientCrashed as exc:
                    if attempt < retries and "did not answer" not in str(exc):
                        continue
                    if on_crash is None:
                        raise
                    return on_crash(str(exc), *args, **kwargs)
            raise AssertionError("unreachable")

        run.in_process = fn  # type: ignore[attr-defined]
        return run

    return decorate


def _call_child(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], timeout_s: float
) -> Any:
    """Run ``fn(*args, **kwargs)`` in a child; return its value or raise its exception."""
    if fn.__module__ not in _MODULES:
        raise ValueError(
            f"{fn.__module__}.{fn.__qualname__} is not a Kafka call that runs in a child process"
        )
    request = pickle.dumps((fn.__module__, fn.__qualname__, args, kwargs))
    # a crash prints its Python stack (faulthandler), which the error then shows
    env = {IN_CHILD_VARIABLE: "1", "PYTHONFAULTHANDLER": "1"}
    label = f"{fn.__qualname__} (a Kafka client in a child process)"
    try:
        done = run_module(__name__, request, timeout_s=timeout_s + _STARTUP_S, env=env)
    except subprocess.TimeoutExpired as exc:  # subprocess.run killed the child (by its pid)
        raise KafkaClientCrashed(
            f"{label} did not answer within {timeout_s + _STARTUP_S:.0f}s and was killed"
            f"{_last_words(exc.stderr)}"
        ) from None
    if done.returncode == 0 and done.stdout:
        ok, value = pickle.loads(done.stdout)
        if ok:
            return value
        raise value
    raise KafkaClientCrashed(f"{label} {_how_it_died(done.returncode)}{_last_words(done.stderr)}")


def _how_it_died(returncode: int) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        why = (
            " (librdkafka aborted: a broker connection dropped during a coordinator request, librdkafka#4605)"
            if -returncode == signal.SIGABRT
            else ""
        )
        return f"died of {name}{why}; this process is unaffected, the next call starts a fresh client"
    return f"exited {returncode} without an answer"


def _last_words(stderr: bytes | str | None, lines: int = 6) -> str:
    """The child's last stderr lines that are not librdkafka's own log lines (``%3|...``): its assertion,
    or the Python stack ``faulthandler`` printed on a crash; else librdkafka's last line. Redacted."""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else (stderr or "")
    every = [line.rstrip() for line in text.splitlines() if line.strip()]
    said = [line for line in every if not line.startswith("%")] or every[-1:]
    return f": {redact_text(chr(10).join(said[-lines:]))}" if said else ""


def _keep_clients() -> None:
    """Never destroy a Kafka client in the child: destroying one whose requests are still outstanding
    (a request past its timeout on a loaded host) is a known librdkafka crash site, and children were
    seen dying of SIGSEGV under load. The child ends with ``os._exit`` once its answer is out, so a kept
    client costs nothing."""
    from confluent_kafka import admin

    kept: list[Any] = []
    construct = admin.AdminClient.__init__

    def construct_and_keep(self: Any, *args: Any, **kwargs: Any) -> None:
        construct(self, *args, **kwargs)
        kept.append(self)

    admin.AdminClient.__init__ = construct_and_keep  # type: ignore[method-assign]


def _serve() -> int:
    """The child: read one request from stdin, run it, write ``(ok, value)`` to stdout."""
    module_name, qualname, args, kwargs = pickle.loads(sys.stdin.buffer.read())
    if module_name not in _MODULES:
        print(f"refused: {module_name} is not a module of Kafka calls", file=sys.stderr)
        return 2
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    _keep_clients()
    fn = getattr(target, "in_process", None)
    if fn is None:
        print(f"refused: {module_name}.{qualname} does not run in a child process", file=sys.stderr)
        return 2
    try:
        answer: tuple[bool, Any] = (True, fn(*args, **kwargs))
    except Exception as exc:
        answer = (False, exc)
    try:
        payload = pickle.dumps(answer)
        pickle.loads(payload)  # an exception whose class takes other arguments does not unpickle
    except Exception:
        error = answer[1]
        payload = pickle.dumps((False, ConnectionError(redact_text(f"{type(error).__name__}: {error}"))))
    out = sys.stdout.buffer
    out.write(payload)
    out.flush()
    return 0


if __name__ == "__main__":
    code = _serve()
    # librdkafka may block in its destructors while brokers are unreachable: the answer is out, so leave now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
