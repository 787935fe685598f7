"""Connection helpers shared by the sink health readers and the pre-launch table checks.

Every connection is bounded by a timeout; SQL goes through a sync driver (async URLs are mapped to their
sync counterpart, SQLite files open read-only), ClickHouse through clickhouse-connect against the
server (its ``system`` tables), Delta through plain files for local tables and delta-rs' object store
(the sink's ``storage_options``) for remote ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 10.0
_CONNECT_ERRORS = ("unable to open", "could not connect", "connection refused", "timeout", "timed out")
_ASYNC_DRIVERS = {
    "aiosqlite": None,
    "asyncpg": None,
    "psycopg_async": "psycopg",
    "aiomysql": "pymysql",
    "asyncmy": "pymysql",
    "aioodbc": "pyodbc",
    "oracledb_async": "oracledb",
}


def is_connect_error(exc: BaseException) -> bool:
    """Whether *exc* says the database could not be reached (rather than read)."""
    if isinstance(exc, OSError | TimeoutError):
        return True
    text = str(exc).lower()
    return any(s in text for s in _CONNECT_ERRORS)


# -- SQL --------------------------------------------------------------------------------------------


def sync_sqlalchemy_url(url: str) -> str:
    """The URL with a sync driver (``sqlite+aiosqlite`` -> ``sqlite``, ``postgresql+asyncpg`` ->
    ``postgresql``...); SQLite files open read-only, so a missing file is not created."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    backend, _, driver = parsed.drivername.partition("+")
    if driver in _ASYNC_DRIVERS:
        sync = _ASYNC_DRIVERS[driver]
        parsed = parsed.set(drivername=f"{backend}+{sync}" if sync else backend)
    if (
        backend == "sqlite"
        and parsed.database
        and parsed.database != ":memory:"
        and "uri" not in parsed.query
    ):
        path = parsed.database if parsed.database.startswith("file:") else f"file:{parsed.database}"
        parsed = parsed.set(database=path).update_query_dict({"mode": "ro", "uri": "true"})
    return parsed.render_as_string(hide_password=False)


def writable_url(url: str) -> str:
    """A read-only SQLite URL (``sync_sqlalchemy_url``) made read-write-create; others unchanged."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.query.get("mode") == "ro":
        parsed = parsed.update_query_dict({"mode": "rwc"})
    return parsed.render_as_string(hide_password=False)


def sql_connect_args(url: str, timeout_s: float) -> dict[str, Any]:
    """Connect (and, for Postgres/MySQL, statement/read) timeouts for a sync driver."""
    backend = url.split(":", 1)[0].split("+", 1)[0]
    seconds = max(1, int(timeout_s))
    if backend == "sqlite":
        return {"timeout": timeout_s}
    if backend == "postgresql":
        return {"connect_timeout": seconds, "options": f"-c statement_timeout={seconds * 1000}"}
    if backend in ("mysql", "mariadb"):
        return {"connect_timeout": seconds, "read_timeout": seconds}
    return {}


def async_connect_args(url: str, timeout_s: float) -> dict[str, Any]:
    """Connect timeouts for an async driver."""
    driver = url.split(":", 1)[0].partition("+")[2]
    if driver in ("asyncpg", "aiosqlite"):
        return {"timeout": timeout_s}
    if driver in ("psycopg_async", "psycopg", "aiomysql", "asyncmy"):
        return {"connect_timeout": max(1, int(timeout_s))}
    return {}


def sql_engine(url: str, timeout_s: float) -> Any:
    """A sync, pool-less engine for *url* (``sync_sqlalchemy_url``) with its timeouts.

    Raises:
        ModuleNotFoundError: when the sync driver is not installed.
    """
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    return sa.create_engine(url, poolclass=NullPool, connect_args=sql_connect_args(url, timeout_s))


def run_sql(
    url: str,
    work: Callable[[Any], T],
    *,
    timeout_s: float,
    writable: bool = False,
    force_async: bool = False,
) -> T:
    """Run *work(connection)* in a transaction through a sync engine; when the URL's driver is async
    and its sync counterpart is not installed, through the async engine's ``run_sync``."""
    import sqlalchemy as sa

    sync_url = writable_url(sync_sqlalchemy_url(url)) if writable else sync_sqlalchemy_url(url)
    try:
        if force_async:
            raise ModuleNotFoundError("sync driver bypassed", name="")
        engine = sql_engine(sync_url, timeout_s)
    except ModuleNotFoundError:
        if "+" not in sa.engine.make_url(url).drivername:
            raise
        return _run_async(url, work, timeout_s)
    try:
        with engine.begin() as conn:
            return work(conn)
    finally:
        engine.dispose()


def _run_async(url: str, work: Callable[[Any], T], timeout_s: float) -> T:
    """*work* through the async driver (``run_sync``), on a fresh event loop in a worker thread, bounded
    by twice the timeout overall."""
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    async def go() -> T:
        engine = create_async_engine(url, poolclass=NullPool, connect_args=async_connect_args(url, timeout_s))
        try:
            async with engine.begin() as conn:
                return await conn.run_sync(work)
        finally:
            await engine.dispose()

    async def bounded() -> T:
        return await asyncio.wait_for(go(), timeout=2 * timeout_s)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sink-sql-async") as pool:
        return pool.submit(asyncio.run, bounded()).result()


def sql_dialect(url: str) -> Any:
    """The SQLAlchemy dialect of *url* (for DDL text); no connection, no driver import."""
    from sqlalchemy.engine import make_url

    dialect_cls: Any = make_url(url).get_dialect()
    return dialect_cls(paramstyle="named")


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (``None`` for other databases and in-memory SQLite)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:") or "mode=memory" in database:
        return None
    if database.startswith("file:"):
        database = unquote(database[len("file:") :].split("?", 1)[0])
    return Path(database)


# -- ClickHouse -------------------------------------------------------------------------------------


def clickhouse_server_url(url: str) -> str:
    """The sink URL without its database path (the database may not exist; we query ``system``)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "", parts.query, ""))


def clickhouse_client(url: str, timeout_s: float) -> Client:
    """A clickhouse-connect client for the server of sink URL *url*, bounded by *timeout_s*.

    Raises:
        clickhouse_connect.driver.exceptions.OperationalError: (or ``DatabaseError``, ``OSError``)
            when the server cannot be reached.
    """
    import clickhouse_connect

    return clickhouse_connect.get_client(
        dsn=clickhouse_server_url(url),
        connect_timeout=max(1, int(timeout_s)),
        send_receive_timeout=max(1, int(timeout_s)),
        autogenerate_session_id=False,
    )


# -- Delta ------------------------------------------------------------------------------------------


def local_delta_log(uri: str) -> Path | None:
    """``<table>/_delta_log`` for a local path or ``file://`` URI; ``None`` for remote object stores."""
    parts = urlsplit(uri)
    if len(parts.scheme) > 1 and parts.scheme != "file":
        return None
    path = unquote(parts.path) if parts.scheme == "file" else uri
    return Path(path) / "_delta_log"


def delta_storage_options(
    uri: str, options: Mapping[str, str] | tuple[tuple[str, str], ...], timeout_s: float
) -> dict[str, str]:
    """The sink's ``storage_options``, with a request ``timeout`` for remote stores unless it sets one."""
    found = dict(options)
    if local_delta_log(uri) is None:
        found.setdefault("timeout", f"{max(1, int(timeout_s))}s")
    return found
