"""Run the numbered scripts exactly as a user does: a subprocess on a free port."""

import asyncio
import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["1_websocket_server.py", "2_websocket_echo.py", "3_websocket_broadcast.py"]
READY = re.compile(r"Listening on (wss?://\S+) \(Ctrl\+C to stop\)")


class Script:
    """A numbered script in a subprocess; both pipes are read all the time."""

    def __init__(self, name, *args, wait_ready=True, env=None, code=None):
        """code: Python that runs the script itself (sys.argv[1] is its path)."""
        self.name = name
        self.lines = []  # (stream, line) in arrival order, stdout and stderr
        self.changed = threading.Condition()
        launcher = ["-c", code] if code else []
        # SCRIPT_PYTHON: run the numbered scripts (only them) on another Python, e.g. 3.9.
        numbered = name[0].isdigit() or name.startswith("recipes/")
        python = (os.environ.get("SCRIPT_PYTHON") if numbered else None) or sys.executable
        self.proc = subprocess.Popen(
            [python, "-u", *launcher, str(ROOT / name), *args],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=env,
        )
        # A pipe nobody reads fills up and freezes the server: read both, always.
        self.readers = [
            threading.Thread(target=self._read, args=(pipe, stream), daemon=True)
            for pipe, stream in ((self.proc.stdout, "stdout"), (self.proc.stderr, "stderr"))
        ]
        for reader in self.readers:
            reader.start()
        self.url = self.wait_for(READY).group(1) if wait_ready else None

    def _read(self, pipe, stream):
        for line in pipe:
            with self.changed:
                self.lines.append((stream, line.rstrip("\n")))
                self.changed.notify_all()
        with self.changed:
            self.lines.append((stream, None))  # end of stream
            self.changed.notify_all()

    @property
    def port(self):
        return int(self.url.rsplit(":", 1)[1])

    def text(self, stream=None):
        with self.changed:
            return "\n".join(
                line for s, line in self.lines if line is not None and stream in (None, s)
            )

    def wait_for(self, pattern, timeout=10, start=0, count=1):
        """Wait until `count` lines from line number `start` on match; return the last match."""
        pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        found, scanned, ended = [], start, 0
        with self.changed:
            while True:
                for _, line in self.lines[scanned:]:
                    if line is None:
                        ended += 1
                    elif match := pattern.search(line):
                        found.append(match)
                scanned = max(scanned, len(self.lines))
                if len(found) >= count:
                    return found[count - 1]
                left = deadline - time.monotonic()
                if ended == 2 or left <= 0:
                    why = "process ended" if ended == 2 else "timed out"
                    raise AssertionError(
                        f"{self.name}: no line matching {pattern.pattern!r} ({why}); "
                        f"output:\n{self.text()}"
                    )
                self.changed.wait(left)

    async def until(self, pattern, timeout=10, start=0, count=1):
        """wait_for() from async code, without blocking the event loop."""
        return await asyncio.to_thread(self.wait_for, pattern, timeout, start, count)

    def mark(self):
        """A line number for wait_for(start=...): only lines logged after now."""
        with self.changed:
            return len(self.lines)

    def stop(self, sig=signal.SIGINT, timeout=15):
        """Send a signal (Ctrl+C by default) and return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout=15):
        """Wait for the process to end and return its exit code."""
        code = self.proc.wait(timeout)
        for reader in self.readers:
            reader.join(5)
        return code


@pytest.fixture
def start():
    """start(name, *args): run a script on a free port and wait for its ready line."""
    started = []

    def start(name, *args, port="0", wait_ready=True, env=None, code=None):
        script = Script(name, "--port", port, *args, wait_ready=wait_ready, env=env, code=code)
        started.append(script)
        return script

    yield start
    for script in started:
        if script.proc.poll() is None:
            script.proc.kill()
            script.proc.wait()


def health(script):
    """GET /health from script 1, as a load balancer would."""
    conn = http.client.HTTPConnection("127.0.0.1", script.port, timeout=10)
    conn.request("GET", "/health")
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/json"
    return json.loads(response.read())


def reset(ws):
    """Drop a client's TCP connection with a reset: no closing handshake at all."""
    sock = ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.transport.abort()


class Listener:
    """A client that reads everything, all the time, and keeps what it got."""

    loop = changed = None  # one asyncio.Condition for all listeners of a test's loop

    def __init__(self, ws):
        self.ws = ws
        self.events = []  # (arrival time, event)
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url, **kwargs):
        if cls.loop is not asyncio.get_running_loop():
            cls.loop, cls.changed = asyncio.get_running_loop(), asyncio.Condition()
        return cls(await client(url, **kwargs))

    async def _read(self):
        try:
            async for message in self.ws:
                self.events.append((time.monotonic(), json.loads(message)))
                async with self.changed:
                    self.changed.notify_all()
        except ConnectionClosed:
            pass
        async with self.changed:
            self.changed.notify_all()

    def of(self, kind):
        return [event for _, event in self.events if event["type"] == kind]

    @classmethod
    async def until(cls, predicate, timeout=30):
        async with asyncio.timeout(timeout), cls.changed:
            await cls.changed.wait_for(predicate)


def client(url, user=None, **kwargs):
    """A websockets client that never goes through a proxy from the environment.

    user=N: the N-th of many people, from a loopback address of its own (all of 127.0.0.0/8
    is loopback), so that the limits per address treat them as different people."""
    if user is not None:
        kwargs["local_addr"] = (f"127.0.{user // 250 + 1}.{user % 250 + 1}", 0)
    kwargs.setdefault("proxy", None)
    kwargs.setdefault("open_timeout", 10)
    return connect(url, **kwargs)


def assert_clean(script):
    """No traceback and no library error anywhere in a script's output."""
    output = script.text()
    assert "Traceback" not in output, output
    assert "connection handler failed" not in output, output
    assert "ERROR" not in output, output


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on a free port, persistence off, in a folder of its own:
    started in the project folder, it would load a dump.rdb left there by another Redis."""

    def __init__(self, binary, folder):
        self.binary, self.port, self.folder = binary, free_port(), str(folder)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.folder,
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ready = threading.Event()

        def read():  # keep draining the pipe, or redis-server blocks on a full one
            for line in self.proc.stdout:
                if "Ready to accept connections" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        assert ready.wait(10), "redis-server did not start"

    def stop(self):
        self.resume()
        self.proc.terminate()
        self.proc.wait(10)

    def pause(self):
        """Freeze it, as a stalled or swapped-out Redis: connections stay open, no answers."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)


def missing(message, required_by):
    """Skip a test whose tool is not installed; fail instead in CI or when required."""
    if os.environ.get("CI") or os.environ.get(required_by) == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def redis_server(tmp_path):
    binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if binary is None:
        missing(
            "no redis-server found: install it (Debian/Ubuntu: apt-get install redis-server, "
            "macOS: brew install redis) or set REDIS_SERVER to its path",
            "REQUIRE_REDIS",
        )
    server = RedisServer(binary, tmp_path)
    yield server
    if server.proc.poll() is None:
        server.stop()


CHROMIUM = [
    os.environ.get("CHROMIUM", ""),
    "/usr/bin/chromium",
    "/usr/bin/chromium-browser",
    "/usr/bin/google-chrome",
    "/snap/bin/chromium",
    "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
    "/Applications/Chromium.app/Contents/MacOS/Chromium",
    shutil.which("chromium") or "",
    shutil.which("google-chrome") or "",
]


@pytest.fixture(scope="module")
def browser():
    """The Chrome or Chromium installed here, driven by Playwright (it downloads nothing)."""
    path = next((path for path in CHROMIUM if path and os.path.exists(path)), None)
    if path is None:
        missing(
            "no Chromium found: install it (Debian/Ubuntu: apt-get install chromium) "
            "or point the CHROMIUM environment variable at a Chrome or Chromium binary",
            "REQUIRE_BROWSER",
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path)
        yield browser
        browser.close()


@pytest.fixture
def open_file(browser):
    """open_file(html, query, viewport=None, before=None, **options): a page opened from
    disk, as a double-click does. before(page), if given, runs before the page loads (to
    pause its clock, say); options go to the browser context (ignore_https_errors=True)."""
    contexts = []

    def open_file(html, query, viewport=None, before=None, **options):
        viewport = viewport or {"width": 900, "height": 700}
        context = browser.new_context(viewport=viewport, **options)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(10_000)  # ms for anything the page must show
        page.problems = []  # console errors and uncaught exceptions
        page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
        page.on("pageerror", lambda e: page.problems.append(str(e)))
        page.sockets = []  # the address of every WebSocket the page opened, oldest first
        page.on("websocket", lambda ws: page.sockets.append(ws.url))
        if before:
            before(page)
        page.goto(f"{(ROOT / html).as_uri()}?{query}")
        return page

    yield open_file
    for context in contexts:
        context.close()
