"""A real ClickHouse engine (chdb) behind a small ClickHouse-compatible HTTP front.

What this is, plainly:

* The engine is REAL ClickHouse: `chdb <https://pypi.org/project/chdb/>`_ embeds the
  ClickHouse server code in-process (MergeTree, ``system.parts``, SQL dialect, error
  codes, Native format -- all the real thing). Data lives in ``data_dir``.
* The HTTP front is OURS: a ``ThreadingHTTPServer`` that speaks only the subset of
  ClickHouse's HTTP interface that ``clickhouse-connect`` (the client used by loom's
  ClickHouse sink) needs: ``/ping``; queries in the body or in the ``query`` URL
  parameter; ``INSERT ... FORMAT <fmt>`` followed by the data (Native blocks included);
  request bodies compressed with ``Content-Encoding`` lz4 / zstd / gzip / deflate (br if
  ``brotli`` is installed) and chunked transfer encoding; the ``database`` parameter,
  ``param_*`` query parameters and ClickHouse settings passed as URL parameters;
  ``X-ClickHouse-*`` reply headers; errors as HTTP 500 (401 for a wrong password) with
  a ``Code: N. DB::Exception: ...`` body and the ``X-ClickHouse-Exception-Code`` header.
  Responses are never compressed (``Accept-Encoding`` is ignored, which the HTTP
  contract allows). No access control: any user is accepted, and a password is only
  checked when one is configured. Multipart/form bodies, ``decompress=1`` (ClickHouse's
  internal block compression) and real HTTP sessions are not supported: ``session_id``
  is ignored and every request runs on the one shared engine session.

It exists so tests and the example can run a genuine ClickHouse engine without a server
package (Debian's ``clickhouse-server`` is 18.x, too old). It is a development tool, not
a production server: queries are serialized on one embedded engine.

chdb embeds one engine per process: all servers of a process share one lock, and two
servers with different ``data_dir`` cannot run at the same time in one process.

Use it from Python::

    with ChdbHttpServer(Path("/tmp/ch")) as ch:
        client = clickhouse_connect.get_client(host="127.0.0.1", port=ch.port)

or from a shell (foreground, prints the URL, stops on SIGTERM/SIGINT)::

    python -m loom_dagster.dev.clickhouse serve --data-dir .clickhouse --port 8123
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import io
import json
import re
import shutil
import signal
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

__all__ = ["ChdbHttpServer", "ClickHouseError", "decode_body", "main", "split_insert"]

# chdb embeds ONE engine per process, so every server of the process shares this lock.
_ENGINE_LOCK = threading.RLock()

# URL parameters that are HTTP transport options, not engine settings (ignored or handled here).
_TRANSPORT_PARAMS = frozenset(
    {
        "query", "database", "user", "password", "quota_key", "query_id", "default_format",
        "session_id", "session_timeout", "session_check", "compress", "decompress",
        "buffer_size", "wait_end_of_query", "client_protocol_version", "role", "readonly",
        "enable_http_compression", "send_progress_in_http_headers",
        "cancel_http_readonly_queries_on_client_close", "http_headers_progress_interval_ms",
    }
)  # fmt: skip
_SETTING_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Head of an ``INSERT ... FORMAT <fmt>`` whose data follows; the data starts after the
# first newline (or after the blanks) following the format name, as in ClickHouse.
_INSERT_RE = re.compile(
    rb"\s*(INSERT\s+INTO\s+(?:TABLE\s+)?[^\s(]+(?:\s*\([^)]*\))?(?:\s+SETTINGS\s+[^\n]*?)?)"
    rb"\s+FORMAT\s+(\w+)[ \t\f]*(?:\r?\n)?",
    re.IGNORECASE | re.DOTALL,
)
_INSERT_HEAD_LIMIT = 1 << 20
_TRAILING_FORMAT_RE = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
_USE_RE = re.compile(r"^\s*USE\s", re.IGNORECASE)
_CODE_RE = re.compile(r"Code:\s*(\d+)\.")
_STD_EXCEPTION = 1001
_AUTHENTICATION_FAILED = 516
_CONTENT_TYPES = {
    "native": "application/octet-stream",
    "rowbinary": "application/octet-stream",
    "arrow": "application/octet-stream",
    "arrowstream": "application/octet-stream",
    "parquet": "application/octet-stream",
    "json": "application/json; charset=UTF-8",
    "jsoncompact": "application/json; charset=UTF-8",
    "jsoneachrow": "application/x-ndjson; charset=UTF-8",
    "csv": "text/csv; charset=UTF-8; header=absent",
    "csvwithnames": "text/csv; charset=UTF-8; header=present",
}


class ClickHouseError(Exception):
    """An error to send back as ``Code: N. DB::Exception: ...``."""

    def __init__(self, code: int, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.code = code
        self.status = status

    @classmethod
    def from_engine(cls, exc: Exception) -> ClickHouseError:
        """Wrap a chdb exception, keeping its ``Code: N. DB::Exception`` text."""
        text = str(exc)
        match = _CODE_RE.search(text)
        if match is None:
            return cls(_STD_EXCEPTION, f"Code: {_STD_EXCEPTION}. DB::Exception: {text}")
        return cls(int(match.group(1)), text[match.start() :])

    @property
    def body(self) -> bytes:
        """The reply body, as ClickHouse writes it."""
        return (str(self).rstrip("\n") + "\n").encode()


@dataclass
class _Outcome:
    """What the engine produced for one request."""

    body: bytes
    fmt: str
    summary: dict[str, str] = field(default_factory=dict)


# ── request body decoding ───────────────────────────────────────────────────────────


def _lz4_frames(data: bytes) -> bytes:
    """Decompress concatenated LZ4 frames (clickhouse-connect sends one per block)."""
    import lz4.frame

    out = bytearray()
    rest = data
    while rest:
        decompressor = lz4.frame.LZ4FrameDecompressor()
        out += decompressor.decompress(rest)
        if not decompressor.eof:
            raise ValueError("truncated lz4 frame")
        rest = decompressor.unused_data
    return bytes(out)


def _zstd_frames(data: bytes) -> bytes:
    """Decompress concatenated zstd frames."""
    import zstandard

    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    return bytes(reader.read())


def _zlib_members(data: bytes, wbits: int) -> bytes:
    """Decompress concatenated gzip members / zlib streams."""
    out = bytearray()
    rest = data
    while rest:
        decompressor = zlib.decompressobj(wbits)
        out += decompressor.decompress(rest) + decompressor.flush()
        rest = decompressor.unused_data
    return bytes(out)


def _brotli(data: bytes) -> bytes:
    """Decompress a brotli body (only if the ``brotli`` package is installed)."""
    import brotli  # type: ignore[import-not-found]

    return bytes(brotli.decompress(data))


_DECODERS: dict[str, Callable[[bytes], bytes]] = {
    "lz4": _lz4_frames,
    "zstd": _zstd_frames,
    "gzip": lambda data: _zlib_members(data, 16 + zlib.MAX_WBITS),
    "x-gzip": lambda data: _zlib_members(data, 16 + zlib.MAX_WBITS),
    "deflate": lambda data: _zlib_members(data, zlib.MAX_WBITS),
    "br": _brotli,
}


def decode_body(data: bytes, content_encoding: str | None) -> bytes:
    """Undo ``Content-Encoding`` on a request body."""
    encoding = (content_encoding or "").strip().lower()
    if not encoding or encoding == "identity" or not data:
        return data
    decoder = _DECODERS.get(encoding)
    if decoder is None:
        raise ClickHouseError(
            1, f"Code: 1. DB::Exception: Unknown Content-Encoding: {encoding}. (UNSUPPORTED_METHOD)"
        )
    try:
        return decoder(data)
    except Exception as exc:  # noqa: BLE001 - any codec failure is a bad request body
        raise ClickHouseError(
            432, f"Code: 432. DB::Exception: Cannot decompress {encoding} body: {exc}. (UNKNOWN_CODEC)"
        ) from exc


def split_insert(statement: bytes) -> tuple[str, str, bytes] | None:
    """Split ``INSERT INTO t (cols) FORMAT F\\n<data>`` into (insert, format, data)."""
    match = _INSERT_RE.match(statement[:_INSERT_HEAD_LIMIT])
    if match is None:
        return None
    head = match.group(1).decode("utf-8", errors="replace")
    return head, match.group(2).decode("ascii"), statement[match.end() :]


def _quote_setting(value: str) -> str:
    """Render a URL setting value as a ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ── the engine ──────────────────────────────────────────────────────────────────────


class _ChdbEngine:
    """One chdb session; every call is serialized on the process-wide engine lock."""

    def __init__(self, path: Path) -> None:
        from chdb import session as chdb_session

        with _ENGINE_LOCK:
            try:
                self._session: Any = chdb_session.Session(str(path))
            except Exception as exc:
                raise RuntimeError(
                    f"cannot open chdb at {path}: {exc} (chdb runs one engine per process; "
                    "stop the other ChdbHttpServer first)"
                ) from exc
            version, tz = (
                self._session.query("SELECT version(), timezone()", "TabSeparated").bytes().split(b"\t")
            )
        self._database: str | None = None
        self._settings: dict[str, str] = {}
        self.version = version.decode()
        self.timezone = tz.decode().strip()

    def close(self) -> None:
        """Close the session, releasing the process-wide engine."""
        with _ENGINE_LOCK:
            self._session.close()

    def query(
        self, sql: str, fmt: str, database: str, settings: Mapping[str, str], params: Mapping[str, str]
    ) -> _Outcome:
        """Run one statement; ``fmt`` applies when the SQL has no FORMAT clause."""
        match = _TRAILING_FORMAT_RE.search(sql)
        reply_fmt = match.group(1) if match else fmt
        with _ENGINE_LOCK:
            self._prepare(database, settings)
            started = time.perf_counter()
            try:
                result = self._session.query(sql, fmt, params=dict(params) or None)
            except Exception as exc:
                raise ClickHouseError.from_engine(exc) from exc
            finally:
                if _USE_RE.match(sql):
                    self._database = None
        summary = _summary(
            read_rows=result.rows_read(),
            read_bytes=result.bytes_read(),
            written_rows=result.rows_written(),
            written_bytes=result.bytes_written(),
            elapsed=time.perf_counter() - started,
        )
        return _Outcome(result.bytes(), reply_fmt, summary)

    def insert(
        self, head: str, fmt: str, data: bytes, database: str, settings: Mapping[str, str]
    ) -> _Outcome:
        """Stream ``data`` (encoded as ``fmt``) into ``INSERT INTO t (cols)``."""
        with _ENGINE_LOCK:
            self._prepare(database, settings)
            started = time.perf_counter()
            try:
                inserter = self._session.send_insert(head, fmt)
            except Exception as exc:
                raise ClickHouseError.from_engine(exc) from exc
            try:
                if data:
                    inserter.append(data)
                result = inserter.finish()
            except Exception as exc:
                with contextlib.suppress(Exception):
                    inserter.cancel()  # frees the session for the next statement
                raise ClickHouseError.from_engine(exc) from exc
        summary = _summary(
            written_rows=result.rows_written,
            written_bytes=result.bytes_written,
            result_rows=result.rows_written,
            elapsed=time.perf_counter() - started,
        )
        return _Outcome(b"", fmt, summary)

    def _prepare(self, database: str, settings: Mapping[str, str]) -> None:
        """Switch the session to this request's database and settings (lock held)."""
        if database != self._database:
            self._run(f"USE {_quote_identifier(database)}")
            self._database = database
        for name in [n for n in self._settings if n not in settings]:
            self._run(f"SET {name} = DEFAULT")
            del self._settings[name]
        for name, value in settings.items():
            if self._settings.get(name) != value:
                self._run(f"SET {name} = {_quote_setting(value)}")
                self._settings[name] = value

    def _run(self, sql: str) -> None:
        try:
            self._session.query(sql, "TabSeparated")
        except Exception as exc:
            raise ClickHouseError.from_engine(exc) from exc


def _quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def _summary(
    *,
    read_rows: int = 0,
    read_bytes: int = 0,
    written_rows: int = 0,
    written_bytes: int = 0,
    result_rows: int = 0,
    elapsed: float = 0.0,
) -> dict[str, str]:
    """An ``X-ClickHouse-Summary`` dict (ClickHouse sends every number as a string)."""
    return {
        "read_rows": str(read_rows),
        "read_bytes": str(read_bytes),
        "written_rows": str(written_rows),
        "written_bytes": str(written_bytes),
        "total_rows_to_read": str(read_rows),
        "result_rows": str(result_rows),
        "result_bytes": str(written_bytes if result_rows else 0),
        "elapsed_ns": str(int(elapsed * 1e9)),
    }


# ── HTTP front ──────────────────────────────────────────────────────────────────────


@dataclass
class _Request:
    """The parts of an HTTP request the front looks at."""

    params: dict[str, str]
    headers: Mapping[str, str]  # lower-case names
    body: bytes


class _Handler(BaseHTTPRequestHandler):
    """Maps ClickHouse HTTP requests onto the chdb engine."""

    protocol_version = "HTTP/1.1"
    server_version = "ChdbHttpFront"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.server.front.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        path, params = self._target()
        if path in ("/ping", "/replicas_status") or (path == "/" and "query" not in params):
            self._reply(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
            return
        self._handle(_Request(params, self._lower_headers(), b""))

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        _, params = self._target()
        try:
            body = self._read_body()
        except (ValueError, OSError) as exc:
            self.close_connection = True
            self._send_error(ClickHouseError(1001, f"Code: 1001. DB::Exception: bad request body: {exc}"))
            return
        self._handle(_Request(params, self._lower_headers(), body))

    def _lower_headers(self) -> dict[str, str]:
        return {name.lower(): value for name, value in self.headers.items()}

    def _target(self) -> tuple[str, dict[str, str]]:
        parts = urlsplit(self.path)
        return parts.path or "/", dict(parse_qsl(parts.query, keep_blank_values=True))

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size_line = self.rfile.readline(65537)
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline(3)  # CRLF after the chunk

    def _handle(self, request: _Request) -> None:
        query_id = request.params.get("query_id") or str(uuid.uuid4())
        try:
            outcome = self.server.front.execute(request)
        except ClickHouseError as exc:
            self._send_error(exc, query_id)
            return
        except Exception as exc:  # noqa: BLE001 - report, never kill the connection thread
            self._send_error(ClickHouseError.from_engine(exc), query_id)
            return
        headers = {
            "Content-Type": _CONTENT_TYPES.get(
                outcome.fmt.lower(), "text/tab-separated-values; charset=UTF-8"
            ),
            "X-ClickHouse-Format": outcome.fmt,
            "X-ClickHouse-Summary": json.dumps(outcome.summary, separators=(",", ":")),
        }
        self._reply(200, outcome.body, headers, query_id)

    def _send_error(self, exc: ClickHouseError, query_id: str = "") -> None:
        headers = {
            "Content-Type": "text/plain; charset=UTF-8",
            "X-ClickHouse-Exception-Code": str(exc.code),
        }
        self._reply(exc.status, exc.body, headers, query_id)

    def _reply(self, status: int, body: bytes, headers: Mapping[str, str], query_id: str = "") -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if query_id:
            self.send_header("X-ClickHouse-Query-Id", query_id)
        self.send_header("X-ClickHouse-Timezone", self.server.front.timezone)
        self.send_header("X-ClickHouse-Server-Display-Name", "chdb")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its :class:`ChdbHttpServer`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], front: ChdbHttpServer) -> None:
        self.front = front
        super().__init__(address, _Handler)


class ChdbHttpServer:
    """A real ClickHouse engine (chdb) served over the ClickHouse HTTP interface subset.

    Args:
        data_dir: where chdb keeps its data; ``None`` uses a temporary directory that
            ``stop()`` deletes.
        host: address to bind.
        port: port to bind; ``0`` picks a free one (see :attr:`port`).
        password: when set, requests must authenticate with it (any user name).
        verbose: log every request to stderr.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        password: str | None = None,
        verbose: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.host = host
        self.password = password
        self.verbose = verbose
        self._requested_port = port
        self._tmp_dir: Path | None = None
        self._engine: _ChdbEngine | None = None
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> ChdbHttpServer:
        """Open the engine and serve HTTP from a background thread."""
        if self._httpd is not None:
            return self
        path = self.data_dir
        if path is None:
            self._tmp_dir = path = Path(tempfile.mkdtemp(prefix="chdb-http-"))
        path.mkdir(parents=True, exist_ok=True)
        self._engine = _ChdbEngine(path)
        try:
            self._httpd = _Server((self.host, self._requested_port), self)
        except Exception:
            self._close_engine()
            raise
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="chdb-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the engine and delete a temporary data directory."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._close_engine()

    def _close_engine(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    def __enter__(self) -> ChdbHttpServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- addresses --------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (after ``start()``)."""
        if self._httpd is None:
            raise RuntimeError("ChdbHttpServer is not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8123``."""
        return f"http://{self.host}:{self.port}"

    def dsn(self, database: str = "default", user: str = "default") -> str:
        """A ``clickhouse://`` DSN for ``clickhouse_connect.get_client(dsn=...)`` (loom's sink)."""
        return f"clickhouse://{user}:{self.password or ''}@{self.host}:{self.port}/{database}"

    @property
    def timezone(self) -> str:
        """The engine's server time zone."""
        return self._engine.timezone if self._engine is not None else "UTC"

    @property
    def version(self) -> str:
        """The ClickHouse version of the embedded engine."""
        if self._engine is None:
            raise RuntimeError("ChdbHttpServer is not started")
        return self._engine.version

    # -- request execution ------------------------------------------------------------

    def execute(self, request: _Request) -> _Outcome:
        """Run one HTTP request against the engine."""
        engine = self._engine
        if engine is None:
            raise ClickHouseError(210, "Code: 210. DB::Exception: server is stopping. (NETWORK_ERROR)")
        self._authenticate(request)
        params = request.params
        if params.get("decompress", "0") not in ("", "0"):
            raise ClickHouseError(
                1, "Code: 1. DB::Exception: decompress=1 is not supported by this front. (UNSUPPORTED_METHOD)"
            )
        if "multipart/form-data" in (request.headers.get("content-type") or ""):
            raise ClickHouseError(
                1,
                "Code: 1. DB::Exception: multipart bodies are not supported by this front. (UNSUPPORTED_METHOD)",
            )
        body = decode_body(request.body, request.headers.get("content-encoding"))
        query = params.get("query", "")
        statement = (query + "\n").encode() + body if query else body
        if not statement.strip():
            raise ClickHouseError(62, "Code: 62. DB::Exception: Empty query. (SYNTAX_ERROR)")
        database = params.get("database") or "default"
        settings = _settings_from(params)
        insert = split_insert(statement)
        if insert is not None:
            head, fmt, data = insert
            return engine.insert(head, fmt, data, database, settings)
        sql = statement.decode("utf-8", errors="replace")
        fmt = params.get("default_format") or "TabSeparated"
        return engine.query(sql, fmt, database, settings, _query_params_from(params))

    def _authenticate(self, request: _Request) -> None:
        """Check the password when one is configured (any user name is accepted)."""
        if self.password is None:
            return
        user, password = _credentials(request)
        if password != self.password:
            raise ClickHouseError(
                _AUTHENTICATION_FAILED,
                f"Code: 516. DB::Exception: {user}: Authentication failed: password is incorrect, "
                "or there is no user with such name. (AUTHENTICATION_FAILED)",
                status=401,
            )


def _settings_from(params: Mapping[str, str]) -> dict[str, str]:
    """URL parameters that are engine settings (transport options and ``param_*`` excluded)."""
    return {
        name: value
        for name, value in params.items()
        if name not in _TRANSPORT_PARAMS
        and not name.startswith(("param_", "http_"))
        and _SETTING_NAME_RE.match(name)
    }


def _query_params_from(params: Mapping[str, str]) -> dict[str, str]:
    """``param_x=v`` URL parameters as chdb query parameters ``{x: v}``."""
    return {name[len("param_") :]: value for name, value in params.items() if name.startswith("param_")}


def _credentials(request: _Request) -> tuple[str, str]:
    """(user, password) from Basic auth, X-ClickHouse-* headers or URL parameters."""
    auth = request.headers.get("authorization") or ""
    if auth.lower().startswith("basic "):
        try:
            user, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
            return user, password
        except (binascii.Error, UnicodeDecodeError):
            return "", ""
    if request.headers.get("x-clickhouse-user") is not None:
        return request.headers.get("x-clickhouse-user", ""), request.headers.get("x-clickhouse-key", "")
    return request.params.get("user", "default"), request.params.get("password", "")


# ── CLI ─────────────────────────────────────────────────────────────────────────────


def _serve(args: argparse.Namespace) -> int:
    """Run a server in the foreground until SIGTERM/SIGINT."""
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server = ChdbHttpServer(
        Path(args.data_dir) if args.data_dir else None,
        host=args.host,
        port=args.port,
        password=args.password,
        verbose=args.verbose,
    )
    server.start()
    try:
        print(server.url, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m loom_dagster.dev.clickhouse serve --data-dir DIR --port P``."""
    parser = argparse.ArgumentParser(
        prog="python -m loom_dagster.dev.clickhouse",
        description="A real ClickHouse engine (chdb) behind a ClickHouse HTTP front.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a chdb engine over ClickHouse HTTP (foreground)")
    serve.add_argument("--data-dir", default=None, help="data directory (default: a temporary one)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8123, help="0 picks a free port (default 8123)")
    serve.add_argument("--password", default=None, help="require this password (default: accept any)")
    serve.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return _serve(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
