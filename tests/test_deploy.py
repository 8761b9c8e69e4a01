"""deploy/: nginx, Supervisor, Redis and the broadcast processes, as deploy/up runs them.

Real nginx, real Supervisor, real redis-server, real Chromium; every port is a free one on
127.0.0.1 and every run has its own RUN_DIR, so a stack the user runs is never touched.
"""

import asyncio
import base64
import hashlib
import json
import os
import pty
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import pytest
import trustme
from conftest import ROOT, Script, assert_clean, free_port, missing
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

PROCESSES = 2


def free_ports(count):
    """`count` consecutive free ports on 127.0.0.1 (one per broadcast process)."""
    for _ in range(100):
        first = random.randrange(20_000, 60_000)
        try:
            for port in range(first, first + count):
                socket.create_server(("127.0.0.1", port)).close()
            return first
        except OSError:
            continue
    raise RuntimeError("no free ports")


class Stack:
    """deploy/up in a subprocess, with ports, certificate and RUN_DIR of its own.

    processes: how many broadcast processes. settings: more of deploy/up's environment
    (MAX_CLIENTS="15", say). start=False: only the environment, for a test that runs
    deploy/up itself."""

    def __init__(self, folder, certificate=None, start=True, processes=PROCESSES, **settings):
        for program in ("nginx", "redis-server"):
            if not shutil.which(program):
                missing(f"deploy/ needs {program}: apt-get install {program}", "REQUIRE_DEPLOY")
        self.port, self.backend, self.redis = free_port(), free_ports(processes), free_port()
        self.cafile, self.run_dir = folder / "ca.pem", folder / "run"
        self.certfile, self.keyfile = folder / "cert.pem", folder / "key.pem"
        if certificate:  # a throwaway certificate authority, trusted by the test's clients
            certificate.cert_pem.write_to_path(self.cafile)
            issued = certificate.issue_cert("localhost", "127.0.0.1")
            issued.cert_chain_pems[0].write_to_path(self.certfile)
            issued.private_key_pem.write_to_path(self.keyfile)
        self.env = {
            **os.environ,
            "PORT": str(self.port),
            "PROCESSES": str(processes),
            "BACKEND_PORT": str(self.backend),
            "REDIS_PORT": str(self.redis),
            "RUN_DIR": str(self.run_dir),
            "CERTFILE": str(self.certfile),
            "KEYFILE": str(self.keyfile),
            "RATE": "100",  # the talker says 20 a second, more than a person may
            **settings,
        }
        self.url = f"wss://localhost:{self.port}/ws"
        self.ready = rf"^Listening on {re.escape(self.url)} \(Ctrl\+C to stop\)$"
        self.backends = list(range(self.backend, self.backend + processes))
        if not start:
            return
        self.script = Script("deploy/up", wait_ready=False, env=self.env)
        try:
            self.script.wait_for(self.ready, 60)
        except AssertionError:
            self.stop()  # nothing left running, whatever went wrong
            raise

    def context(self):
        return ssl.create_default_context(cafile=self.cafile if self.cafile.exists() else None)

    def client(self, path="/ws", source=None, **kwargs):
        """A wss:// client through nginx; source: the loopback address it connects from
        (127.0.0.0/8 is all loopback), so that each user of a test has an address of its own."""
        kwargs.setdefault("ssl", self.context())
        kwargs.setdefault("open_timeout", 20)
        if source:
            kwargs["local_addr"] = (source, 0)  # passed on to loop.create_connection()
        return connect(f"wss://localhost:{self.port}{path}", proxy=None, **kwargs)

    def control(self, *args):
        """supervisorctl, as deploy/restart runs it."""
        config = str(ROOT / "deploy" / "supervisord.conf")
        command = [sys.executable, "-m", "supervisor.supervisorctl", "-c", config, *args]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)

    def processes(self):
        """Every process deploy/up started, Supervisor's children included."""
        up = psutil.Process(self.script.proc.pid)
        return up.children(recursive=True)

    def stop(self):
        return self.script.stop(timeout=40)


def health(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:  # refused: down, or not listening yet
        return None, None


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("stack"), trustme.CA())
    yield stack
    if stack.script.proc.poll() is None:
        assert stack.stop() == 0


async def wait_until(predicate, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class Reader:
    """A client that, like the page, reconnects whenever its connection ends, with ?since=."""

    def __init__(self, stack, number):
        self.stack, self.texts, self.welcomes, self.closes = stack, [], [], []
        self.last = None  # the id of the last message seen
        self.source = f"127.0.1.{number}"  # a user of its own: nginx limits each address
        self.task = asyncio.create_task(self.run())

    async def run(self):
        while True:
            path = "/ws" if self.last is None else f"/ws?since={self.last}"
            try:
                async with self.stack.client(path, self.source) as ws:
                    try:
                        async for frame in ws:
                            self.receive(json.loads(frame))
                    finally:  # 1001: the server stopped; 1006: it was killed
                        self.closes.append(ws.close_code)
            except (OSError, ConnectionClosed, InvalidStatus, TimeoutError):
                pass  # a refused or broken attempt: try again, as the page does
            await asyncio.sleep(random.uniform(0.05, 0.3))

    def receive(self, event):
        if event["type"] == "welcome":
            self.welcomes.append(event)
            events = event["history"] if self.welcomes[1:] else []
            self.last = event["latest"]
        elif event["type"] == "message":
            events = [event]
            self.last = event["id"]
        else:
            return
        self.texts += [e["text"] for e in events if e["text"].startswith("talk ")]


class Talker:
    """20 messages a second; a message is said once the talker reads it back. If the
    connection ends first, it catches up and sends it again only if it was never said."""

    def __init__(self, stack):
        self.stack, self.said, self.stopping, self.log = stack, [], False, []
        self.task = asyncio.create_task(self.run())

    async def run(self):
        last, n = None, 0
        while not self.stopping:
            path = "/ws" if last is None else f"/ws?since={last}"
            try:
                async with self.stack.client(path) as ws:
                    welcome = json.loads(await ws.recv())
                    last = welcome["latest"]
                    self.said += [m["text"] for m in welcome["history"] if m["text"] == f"talk {n}"]
                    n = len(self.said)
                    while not self.stopping:
                        await ws.send(f"talk {n}")
                        while True:  # until it comes back
                            event = json.loads(await asyncio.wait_for(ws.recv(), 10))
                            if event["type"] == "message":
                                last = event["id"]
                                if event["text"] == f"talk {n}":
                                    break
                        self.said.append(f"talk {n}")
                        n += 1
                        await asyncio.sleep(0.05)
            except (OSError, ConnectionClosed, InvalidStatus, TimeoutError) as exc:
                self.log.append((time.monotonic(), repr(exc), n))
                await asyncio.sleep(0.1)

    async def stop(self):
        self.stopping = True
        await asyncio.wait_for(self.task, 15)


def everyone_got_everything_once(readers, talker):
    expected = talker.said
    for reader in readers:
        assert reader.texts == expected, (len(reader.texts), len(expected))


# The stack, one command up and one Ctrl+C down


async def test_up_makes_a_certificate_serves_the_page_and_ctrl_c_leaves_nothing(tmp_path):
    stack = Stack(tmp_path)  # no certificate: deploy/up makes one with demo 4's openssl line
    try:
        assert stack.certfile.exists() and stack.keyfile.exists()
        assert "Making a self-signed certificate" in stack.script.text()
        context = ssl.create_default_context(cafile=stack.certfile)  # self-signed: its own CA
        page = urllib.request.urlopen(
            f"https://localhost:{stack.port}/3_client_broadcast.html", context=context
        )
        assert page.status == 200 and b"WebSocket broadcast" in page.read()
        for secret in ("key.pem", "cert.pem", "README.md", "deploy/up", "3_websocket_broadcast.py"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"https://localhost:{stack.port}/{secret}", context=context)
            assert refused.value.code == 404, secret
        async with connect(stack.url, ssl=context, proxy=None) as ws:
            assert json.loads(await ws.recv())["type"] == "welcome"
        started = stack.processes()
        commands = [" ".join(p.cmdline()) for p in started]
        for part in ("supervisor.supervisord", "nginx: master", "redis-server"):
            assert sum(part in command for command in commands) == 1, (part, commands)
        assert sum("3_websocket_broadcast.py" in command for command in commands) == PROCESSES
    finally:
        code = stack.stop()  # SIGINT, as Ctrl+C
    assert code == 0
    assert stack.script.text("stdout").splitlines()[-1] == "Stack stopped. Goodbye!"
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for port in (stack.port, stack.redis, *stack.backends):  # free at once
        socket.create_server(("127.0.0.1", port)).close()


async def test_sigterm_stops_the_stack_too(tmp_path):
    stack = Stack(tmp_path, trustme.CA())
    started = stack.processes()
    assert stack.script.stop(signal.SIGTERM, timeout=40) == 0
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_up_on_a_python_older_than_3_11_says_so_in_one_sentence():
    older = "import runpy, sys; sys.version_info = (3, 10, 12); runpy.run_path(sys.argv[1])"
    up = Script("deploy/up", wait_ready=False, code=older)
    assert up.wait() == 1
    assert (
        up.text("stderr")
        == "deploy/up needs Python 3.11 or newer, like the scripts it runs; this is 3.10."
    )
    assert up.text("stdout") == ""


# Anywhere a service manager runs it: its output on a file, a socket or a terminal


class Detached:
    """deploy/up with its output (stdout and stderr) on a file (deploy/up > file 2>&1), a
    socket (systemd's journal), or a terminal; read() is everything written so far."""

    def __init__(self, stack, kind, folder):
        up = [sys.executable, str(ROOT / "deploy" / "up")]
        self.kind, self.chunks, self.file = kind, [], folder / "out.txt"
        if kind == "file":
            theirs = mine = open(self.file, "wb")  # noqa: SIM115 (closed below)
        elif kind == "socket":
            mine, theirs = socket.socketpair()
        else:
            mine, theirs = (os.fdopen(fd, "rb", buffering=0) for fd in pty.openpty())
        self.proc = subprocess.Popen(
            up, cwd=ROOT, env=stack.env, stdin=subprocess.DEVNULL, stdout=theirs, stderr=theirs
        )
        theirs.close()
        if kind != "file":
            threading.Thread(target=self._collect, args=(mine,), daemon=True).start()

    def _collect(self, mine):
        receive = mine.recv if self.kind == "socket" else mine.read
        while True:
            try:
                data = receive(65536)
            except OSError:  # a terminal whose other side closed: EIO
                data = b""
            if not data:
                return
            self.chunks.append(data)

    def read(self):
        data = self.file.read_bytes() if self.kind == "file" else b"".join(self.chunks)
        return data.decode(errors="replace").replace("\r\n", "\n")  # a terminal's newlines

    def wait_for(self, pattern, timeout):
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.read(), re.MULTILINE):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in deploy/up's output:\n{self.read()}")
            time.sleep(0.1)  # a file cannot be waited on: read it again


@pytest.mark.parametrize("kind", ["file", "socket", "terminal"])
async def test_up_with_its_output_on_a_file_a_socket_or_a_terminal(tmp_path, kind):
    stack = Stack(tmp_path, trustme.CA(), start=False)
    up = Detached(stack, kind, tmp_path)
    try:
        up.wait_for(stack.ready, 60)
        async with stack.client() as ws:  # it really serves
            assert json.loads(await ws.recv())["type"] == "welcome"
    finally:
        up.proc.send_signal(signal.SIGTERM)  # as systemd stops it
        code = up.proc.wait(40)
    up.wait_for(r"^Stack stopped\. Goodbye!$", 5)
    assert code == 0, up.read()
    lines = up.read().splitlines()
    assert lines[-1] == "Stack stopped. Goodbye!"
    # Every line whole, the program's name first: none written over another (as with
    # /dev/stdout on a file), none lost (as with ENXIO on a socket).
    for port in stack.backends:
        said = f"broadcast_{port} | Listening on ws://127.0.0.1:{port} (Ctrl+C to stop)"
        assert lines.count(said) == 1, up.read()
        assert lines.count(f"broadcast_{port} | Server stopped. Goodbye!") == 1, up.read()
    assert [line for line in lines if line.startswith("redis ") and "Ready to accept" in line]
    assert [line for line in lines if re.search(r"^supervisord +\| .* stopped: redis ", line)]
    assert "spawnerr" not in up.read() and "FATAL" not in up.read()
    for port in (stack.port, stack.redis, *stack.backends):  # free at once
        socket.create_server(("127.0.0.1", port)).close()


async def test_a_stack_whose_programs_all_fail_exits_1_with_one_sentence(tmp_path):
    broken = tmp_path / "bin"  # nginx and redis-server that fail at once, as a broken
    broken.mkdir()  # installation would; the broadcasts then fail too, with no Redis
    for program in ("nginx", "redis-server"):
        (broken / program).write_text(
            f'#!/bin/sh\necho "{program}: simulated failure" >&2\nexit 3\n'
        )
        (broken / program).chmod(0o755)
    stack = Stack(tmp_path, start=False, PATH=f"{broken}{os.pathsep}{os.environ['PATH']}")
    t0 = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "up")],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    took = time.monotonic() - t0
    assert result.returncode == 1, result.stdout + result.stderr
    sentence = result.stderr.strip()
    assert "\n" not in sentence, sentence  # one sentence, no traceback
    assert sentence.startswith("Supervisor gave up on ") and sentence.endswith("the stack."), (
        sentence
    )
    # It names which, and why: each failing program's own last words.
    for program in ("redis", "nginx"):  # every one that failed, not only the first
        assert re.search(
            rf'{program} \(it exited at once, each time, saying "{program}(-server)?: simulated',
            sentence,
        ), sentence
    assert "Listening on" not in result.stdout
    assert took < 60, took  # Supervisor's 3 retries: a few seconds, not forever
    for port in (stack.port, stack.redis, *stack.backends):
        socket.create_server(("127.0.0.1", port)).close()
    leftovers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(stack.run_dir) in " ".join(p.info["cmdline"] or [])
    ]
    assert not leftovers, leftovers


# Behind the proxy


async def test_through_the_proxy_the_real_address_is_logged_and_origin_null_refused(stack):
    async with stack.client() as ws:
        number = json.loads(await ws.recv())["client"]
    # nginx saw 127.0.0.1: the processes log that address (X-Real-IP), not nginx's port.
    stack.script.wait_for(rf"client #{number} connected from 127\.0\.0\.1$")
    with pytest.raises(InvalidStatus) as refused:
        async with stack.client(origin="null"):
            pass
    assert refused.value.response.status_code == 403  # any site's sandboxed frame
    async with stack.client(origin=f"https://localhost:{stack.port}") as ws:  # the page's own
        assert json.loads(await ws.recv())["type"] == "welcome"


async def test_one_address_over_its_limit_leaves_every_honest_attempt_from_another_welcomed(
    tmp_path,
):
    # 15 clients a process, 30 in all: one address alone could fill both but for nginx's
    # limit of 20 a client address (MAX_PER_ADDRESS's default), which leaves 10 for others.
    stack = Stack(tmp_path, trustme.CA(), MAX_CLIENTS="15")
    held, refused = [], []
    try:
        commands = [" ".join(p.cmdline()) for p in stack.processes()]
        assert sum("--max-clients 15" in command for command in commands) == PROCESSES

        async def attempt(source, keep):
            try:
                ws = await stack.client(source=source)
            except InvalidStatus as refusal:
                refused.append((refusal.response.status_code, refusal.response.body))
                return False
            welcome = json.loads(await ws.recv())
            assert welcome["type"] == "welcome"
            if keep:
                held.append(ws)
            else:
                await ws.close()
            return True

        # 127.0.0.2 asks for 40 at once and keeps what it gets, answering pings.
        await asyncio.gather(*(attempt("127.0.0.2", keep=True) for _ in range(40)))
        assert len(held) == 20, (len(held), refused)
        assert {status for status, _ in refused} == {429}, refused
        assert any(b"Too many connections from your address" in body for _, body in refused)

        async def flood():  # and keeps asking, all the time
            while True:
                await attempt("127.0.0.2", keep=True)
                await asyncio.sleep(0.02)

        flooding = asyncio.create_task(flood())
        try:
            honest = [await attempt("127.0.0.3", keep=False) for _ in range(20)]
        finally:
            flooding.cancel()
        assert honest == [True] * 20, refused[-5:]
        assert len(held) == 20  # the flood got nothing more
    finally:
        for ws in held:
            await ws.close()
        assert stack.stop() == 0


def test_nginx_drops_a_silent_socket_and_a_half_sent_header_in_seconds(stack):
    # nginx's defaults would hold each of these for 60 s: client_header_timeout is 10 s.
    silent = socket.create_connection(("127.0.0.1", stack.port))  # no TLS hello at all
    context = stack.context()
    idle = context.wrap_socket(
        socket.create_connection(("127.0.0.1", stack.port)), server_hostname="localhost"
    )
    half = context.wrap_socket(
        socket.create_connection(("127.0.0.1", stack.port)), server_hostname="localhost"
    )
    half.sendall(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n")  # never ends
    t0 = time.monotonic()
    for sock in (silent, idle, half):
        sock.settimeout(30)
        with sock:
            try:
                data = sock.recv(1000)
            except (ConnectionResetError, ssl.SSLError):  # reset_timedout_connection: an RST
                data = b""
            assert data == b"" or data.startswith(b"HTTP/1.1 408"), data
    took = time.monotonic() - t0
    assert took < 15, took
    print(f"silent, idle TLS and half-sent header sockets dropped after {took:.1f} s")


async def test_health_is_503_while_redis_is_stopped_and_200_after(stack):
    assert [health(port)[0] for port in stack.backends] == [200, 200]
    assert "stopped" in stack.control("stop", "redis").stdout
    try:
        await wait_until(
            lambda: [health(port)[0] for port in stack.backends] == [503, 503], what="503"
        )
        with pytest.raises(InvalidStatus) as refused:  # nginx tried both: both are away
            async with stack.client():
                pass
        assert refused.value.response.status_code in (502, 503)
    finally:
        assert "started" in stack.control("start", "redis").stdout
    await wait_until(
        lambda: [health(port)[0] for port in stack.backends] == [200, 200], 30, "200 again"
    )


async def test_a_rolling_restart_under_traffic_loses_and_duplicates_nothing(stack):
    readers = [Reader(stack, n) for n in range(1, 101)]
    await wait_until(lambda: all(r.welcomes for r in readers), 60, "100 welcomes")
    talker = Talker(stack)
    await wait_until(lambda: len(talker.said) >= 20, what="traffic")
    t0 = time.monotonic()
    restart = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "deploy" / "restart"),
        env=stack.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = (await asyncio.wait_for(restart.communicate(), 120))[0].decode()
    took = time.monotonic() - t0
    assert restart.returncode == 0, output
    assert re.search(rf"Restarted {PROCESSES} processes in [\d.]+ s\.", output), output
    said = len(talker.said)
    try:
        await wait_until(lambda: len(talker.said) >= said + 20, what="traffic after the restart")
    except AssertionError:
        raise AssertionError(f"{talker.log[-20:]}\n{stack.script.text()[-4000:]}") from None
    await talker.stop()
    await wait_until(lambda: all(len(r.texts) >= len(talker.said) for r in readers), 30, "all")
    print(f"rolling restart of {PROCESSES} processes: {took:.1f} s, {len(talker.said)} messages")
    everyone_got_everything_once(readers, talker)
    # Every reader was on one of the two processes: each was moved once, or twice.
    assert all(1 <= r.closes.count(1012) <= 2 for r in readers), [r.closes for r in readers]
    for reader in readers:  # each came back to a process that still had it all
        assert all(w["recovered"] for w in reader.welcomes[1:]), reader.welcomes
    for r in readers:
        r.task.cancel()


async def test_kill_9_of_one_process_supervisor_restarts_it_and_its_clients_catch_up(stack):
    readers = [Reader(stack, n) for n in range(1, 21)]
    await wait_until(lambda: all(r.welcomes for r in readers), 60, "welcomes")
    talker = Talker(stack)
    await wait_until(lambda: len(talker.said) >= 10, what="traffic")
    victim = stack.control("pid", f"broadcast:broadcast_{stack.backends[0]}").stdout.strip()
    os.kill(int(victim), signal.SIGKILL)
    await wait_until(lambda: any(1006 in r.closes for r in readers), what="the victim's clients")
    await wait_until(lambda: health(stack.backends[0])[0] == 200, 30, "Supervisor restarts it")
    new = stack.control("pid", f"broadcast:broadcast_{stack.backends[0]}").stdout.strip()
    assert new != victim
    said = len(talker.said)
    await wait_until(lambda: len(talker.said) >= said + 10, what="traffic after the kill")
    await talker.stop()
    await wait_until(lambda: all(len(r.texts) >= len(talker.said) for r in readers), 30, "all")
    everyone_got_everything_once(readers, talker)
    moved = [r for r in readers if 1006 in r.closes]
    assert moved and all(w["recovered"] for r in moved for w in r.welcomes[1:])
    for r in readers:
        r.task.cancel()


def test_the_page_through_the_proxy_survives_a_rolling_restart(stack, browser):
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 900, "height": 700})

    def said_on(page):  # this test's messages, as a page shows them
        lines = page.locator("#log .message").all_text_contents()
        return [line.split(": ", 1)[1] for line in lines if ": page " in line]

    try:
        pages = []
        for _ in (1, 2):
            page = context.new_page()
            page.goto(f"https://localhost:{stack.port}/3_client_broadcast.html")
            playwright_expect(page.locator("#status")).to_have_attribute("data-state", "open")
            pages.append(page)
        assert pages[0].input_value("#url") == f"wss://localhost:{stack.port}/ws"  # same origin
        talker, watcher = pages
        said = [f"page before {n}" for n in range(3)]
        for text in said:
            send(talker, text)
        playwright_expect(watcher.locator("#log .message").last).to_contain_text(said[-1])
        result = subprocess.run(
            [sys.executable, str(ROOT / "deploy" / "restart")],
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        for page in pages:  # each heard 1012 and came back by itself, through nginx
            playwright_expect(page.locator("#log")).to_contain_text(
                "The server is restarting (1012)."
            )
            playwright_expect(page.locator("#status")).to_have_attribute(
                "data-state", "open", timeout=30_000
            )
        for text in [f"page after {n}" for n in range(3)]:
            said.append(text)
            send(talker, text)
        for page in pages:
            playwright_expect(page.locator("#log .message").last).to_contain_text(said[-1])
            assert said_on(page) == said  # no gap, no duplicate
            assert page.locator("#log .warning").count() == 0
    finally:
        context.close()


def test_the_page_allows_only_its_own_script_style_and_back_end(stack, browser):
    address = f"https://localhost:{stack.port}/3_client_broadcast.html"
    with urllib.request.urlopen(address, context=stack.context()) as response:
        html, headers = response.read().decode(), response.headers
    assert headers["X-Frame-Options"] == "DENY"
    policy = dict(
        part.strip().split(" ", 1) for part in headers["Content-Security-Policy"].split(";")
    )
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    assert policy["connect-src"] == stack.url  # wss://localhost:PORT/ws, nothing else

    def hashes(tag):  # of the page as served: deploy/up took them from the same file
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
        assert blocks, tag
        return {
            f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
            for b in blocks
        }

    assert set(policy["script-src"].split()) == hashes("script")
    assert set(policy["style-src"].split()) == hashes("style")

    context = browser.new_context(ignore_https_errors=True)
    # Every violation the page reports, and every console line: none may be about the policy.
    context.add_init_script(
        "window.violations = [];"
        "addEventListener('securitypolicyviolation', e => violations.push(e.violatedDirective));"
    )
    try:
        page, console = context.new_page(), []
        page.on("console", lambda message: console.append(message.text))
        page.goto(address)
        playwright_expect(page.locator("#status")).to_have_attribute("data-state", "open")
        send(page, "page under its policy")
        playwright_expect(page.locator("#log .message").last).to_contain_text("under its policy")
        assert page.evaluate("document.querySelector('style').sheet !== null")  # not blocked
        assert page.evaluate("violations") == [], console
        assert not [line for line in console if "Content Security Policy" in line], console
        # ?url= may not point the real page at another server: the policy refuses it.
        elsewhere = f"wss://127.0.0.1:{stack.port}/ws"
        page.goto(f"{address}?url={elsewhere}")
        page.wait_for_function("violations.includes('connect-src')")
        assert page.locator("#status").get_attribute("data-state") != "open"
    finally:
        context.close()


def send(page, text):
    page.fill("#message", text)
    page.press("#message", "Enter")


def playwright_expect(locator):
    from playwright.sync_api import expect

    return expect(locator)


def test_the_stack_logs_no_traceback(stack):
    assert_clean(stack.script)
