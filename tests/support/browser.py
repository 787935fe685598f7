"""Headless Chromium driven over the Chrome DevTools Protocol (CDP), for tests that check the rendered UI.

Uses the system browser (Debian's ``/usr/bin/chromium``; no browser download) and ``websocket-client``.
One browser process, one page (the tab headless Chromium opens at start-up), one websocket to it.

    with Chromium() as browser:
        browser.open("http://127.0.0.1:3000/asset-groups")
        browser.wait_for("document.querySelectorAll('svg path').length > 3", timeout=60)
        browser.screenshot(Path("graph.png"))
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import websocket

CHROMIUM = os.environ.get("LOOM_DAGSTER_CHROMIUM", "/usr/bin/chromium")

FLAGS = [
    "--headless=new",
    "--no-sandbox",  # tests run as root in CI containers
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",  # small /dev/shm in containers
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-port=0",
]

PAGE_TEXT = "document.body ? document.body.innerText : ''"

# How much taller the page would need to be for nothing to scroll: the document, or its tallest pane.
SCROLL_OVERFLOW = """(() => {
  let extra = document.documentElement.scrollHeight - window.innerHeight;
  for (const el of document.querySelectorAll('*')) {
    const overflow = getComputedStyle(el).overflowY;
    if ((overflow === 'auto' || overflow === 'scroll') && el.clientHeight > 100) {
      extra = Math.max(extra, el.scrollHeight - el.clientHeight);
    }
  }
  return Math.max(0, Math.ceil(extra));
})()"""
MAX_SCREENSHOT_HEIGHT = 6000


class BrowserError(RuntimeError):
    """The browser failed, or a page script raised."""


class Chromium:
    """A headless Chromium process and a CDP session on its first page."""

    def __init__(
        self,
        executable: str = CHROMIUM,
        window_size: tuple[int, int] = (1600, 1000),
        start_timeout: float = 60.0,
        command_timeout: float = 60.0,
    ) -> None:
        self.executable = executable
        self.window_size = window_size
        self.start_timeout = start_timeout
        self.command_timeout = command_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.profile: Path | None = None
        self.port: int | None = None
        self._ws: websocket.WebSocket | None = None
        self.viewport = window_size
        self._ids = itertools.count(1)
        self.console: list[str] = []  # console errors and uncaught exceptions, for failure messages

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> Chromium:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Launch Chromium in its own session with a fresh profile; connect to its first page."""
        if not Path(self.executable).exists():
            raise BrowserError(f"no Chromium at {self.executable} (set LOOM_DAGSTER_CHROMIUM)")
        self.profile = Path(tempfile.mkdtemp(prefix="loom-chromium-"))
        width, height = self.window_size
        with open(self.profile / "chromium.log", "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [
                    self.executable,
                    *FLAGS,
                    f"--user-data-dir={self.profile / 'profile'}",
                    f"--window-size={width},{height}",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own session and process group: stop() signals just that
            )
        try:
            self.port = self._wait_port()
            self._ws = websocket.create_connection(
                self._page_ws_url(), timeout=self.command_timeout, suppress_origin=True
            )
            self.send("Page.enable")
            self.send("Runtime.enable")
            self.send("Log.enable")
            self.set_viewport(width, height)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Close the websocket, stop the browser by PID (its whole session), remove the profile."""
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._ws.close()
            self._ws = None
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            # Chromium leads its own session (pgid == pid): signal the group, its helpers included.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # helpers that outlived the browser
        if self.profile is not None:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None

    def _log_tail(self) -> str:
        path = self.profile / "chromium.log" if self.profile else None
        if path and path.exists():
            return path.read_text(errors="replace")[-3000:]
        return ""

    def _wait_port(self) -> int:
        assert self.proc is not None and self.profile is not None
        active = self.profile / "profile" / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode}:\n{self._log_tail()}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                lines = active.read_text().splitlines()
                if lines and lines[0].strip():
                    return int(lines[0])
            time.sleep(0.1)
        raise BrowserError(
            f"chromium wrote no DevToolsActivePort in {self.start_timeout}s:\n{self._log_tail()}"
        )

    def _page_ws_url(self) -> str:
        deadline = time.monotonic() + self.start_timeout
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as response:
                targets = json.load(response)
            pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
            if time.monotonic() > deadline:
                raise BrowserError(f"no page target in {targets}")
            time.sleep(0.1)

    # -- protocol ------------------------------------------------------------------------------------

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Send one CDP command; return its ``result`` (events that arrive meanwhile are noted)."""
        if self._ws is None:
            raise BrowserError("browser not started")
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + (timeout or self.command_timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"CDP {method} got no answer in {timeout or self.command_timeout}s")
            self._ws.settimeout(remaining)
            try:
                message = json.loads(self._ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            if message.get("id") == msg_id:
                if "error" in message:
                    raise BrowserError(f"CDP {method}: {message['error']}")
                return message.get("result", {})
            self._note_event(message)

    def _note_event(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        text = None
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            text = f"{params['entry'].get('text')} {params['entry'].get('url', '')}"
        if text:
            self.console.append(str(text)[:500])
            del self.console[:-50]

    # -- page ----------------------------------------------------------------------------------------

    def open(self, url: str, timeout: float = 60.0) -> None:
        """Navigate to *url* and wait until the document has loaded (the app may still be fetching)."""
        result = self.send("Page.navigate", {"url": url}, timeout=timeout)
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url}: {result['errorText']}")
        self.wait_for("document.readyState === 'complete'", timeout=timeout, what=f"{url} to load")

    def evaluate(self, expression: str, timeout: float | None = None) -> Any:
        """Evaluate a JS expression in the page (promises awaited); return its JSON value."""
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            description = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JS error in {expression[:200]!r}: {description}")
        return result.get("result", {}).get("value")

    def wait_for(
        self, predicate: str, timeout: float = 60.0, interval: float = 0.25, what: str | None = None
    ) -> Any:
        """Poll the JS expression *predicate* until it is truthy; return its value.

        On timeout, raise ``TimeoutError`` with the page's URL, its visible text and console errors.
        """
        deadline = time.monotonic() + timeout
        last_error: BrowserError | None = None
        while True:
            try:
                value = self.evaluate(predicate)
                if value:
                    return value
            except BrowserError as exc:  # the page may be mid-navigation
                last_error = exc
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"waited {timeout}s for {what or predicate!r}"
                    + (f" (last error: {last_error})" if last_error else "")
                    + "\n"
                    + self.describe()
                )
            time.sleep(interval)

    def wait_stable(self, expression: str, quiet: float = 2.0, timeout: float = 60.0) -> Any:
        """Wait until the JSON value of *expression* stays the same for *quiet* seconds (render settled)."""
        deadline = time.monotonic() + timeout
        last: Any = object()
        since = time.monotonic()
        while True:
            value = self.evaluate(expression)
            now = time.monotonic()
            if value != last:
                last, since = value, now
            elif now - since >= quiet:
                return value
            if now > deadline:
                return value  # settled enough: callers assert on what they need
            time.sleep(0.25)

    def text(self) -> str:
        """The page's visible text."""
        return str(self.evaluate(PAGE_TEXT) or "")

    def describe(self, max_chars: int = 4000) -> str:
        """URL, visible text and console errors: for failure messages."""
        try:
            url = self.evaluate("location.href")
            text = self.text()
        except BrowserError as exc:
            url, text = "?", f"(page text unavailable: {exc})"
        errors = "\n".join(self.console[-10:]) or "(none)"
        return f"page: {url}\n--- page text ---\n{text[:max_chars]}\n--- console errors ---\n{errors}"

    def click(self, selector: str, timeout: float = 30.0) -> None:
        """Click the centre of the first element matching the CSS *selector* (a real mouse event)."""
        box = self.wait_for(
            f"""(() => {{
                const el = document.querySelector({json.dumps(selector)});
                if (!el) return null;
                el.scrollIntoView({{block: 'center', inline: 'center'}});
                const r = el.getBoundingClientRect();
                return r.width && r.height ? {{x: r.x + r.width / 2, y: r.y + r.height / 2}} : null;
            }})()""",
            timeout=timeout,
            what=f"{selector} to be visible",
        )
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": box["x"], "y": box["y"]})
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1},
            )

    def set_viewport(self, width: int, height: int) -> None:
        """Resize the page's viewport (CSS pixels); the app sees a window of that size."""
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": int(width), "height": int(height), "deviceScaleFactor": 1, "mobile": False},
        )
        self.viewport = (int(width), int(height))

    def add_init_script(self, source: str) -> None:
        """Run *source* in every document this page loads from now on, before the page's own scripts."""
        self.send("Page.addScriptToEvaluateOnNewDocument", {"source": source})

    def press(self, key: str, code: str, key_code: int, alt: bool = False, shift: bool = False) -> None:
        """Press and release one key (e.g. ``press("e", "KeyE", 69, alt=True)`` for Alt+E)."""
        modifiers = (1 if alt else 0) | (8 if shift else 0)
        for kind in ("rawKeyDown", "keyUp"):
            self.send(
                "Input.dispatchKeyEvent",
                {
                    "type": kind,
                    "key": key,
                    "code": code,
                    "windowsVirtualKeyCode": key_code,
                    "modifiers": modifiers,
                },
            )

    def screenshot(self, path: Path, full_page: bool = False, settle: float = 1.0) -> Path:
        """Save a PNG of the viewport to *path*.

        ``full_page``: single-page apps scroll inside their own panes, so the document is never taller
        than the window; grow the viewport until no pane scrolls any more, capture, then restore it.
        """
        restore = self.viewport
        if full_page:
            width, height = self.viewport
            for _ in range(4):  # a taller window can re-flow panes: grow until nothing scrolls
                overflow = int(self.evaluate(SCROLL_OVERFLOW) or 0)
                if overflow <= 0 or height >= MAX_SCREENSHOT_HEIGHT:
                    break
                height = min(height + overflow, MAX_SCREENSHOT_HEIGHT)
                self.set_viewport(width, height)
                self.wait_stable(SCROLL_OVERFLOW, quiet=settle, timeout=15)
        try:
            data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        finally:
            if self.viewport != restore:
                self.set_viewport(*restore)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
