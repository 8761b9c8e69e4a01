"""What all three scripts promise: start-up, shutdown, origins, limits, mistakes."""

import asyncio
import contextlib
import http.client
import os
import re
import signal
import socket
import struct
import time

import pytest
from conftest import SCRIPTS, Script, assert_clean, client, reset
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus
from websockets.frames import CloseCode
from wire import frame, handshake

pytestmark = pytest.mark.parametrize("name", SCRIPTS)
TIMESTAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "


async def test_ready_line_gives_the_real_url(start, name):
    script = start(name)
    assert re.fullmatch(r"ws://localhost:\d+", script.url)
    assert script.port != 0
    async with client(script.url) as ws:
        assert ws.state.name == "OPEN"


async def test_logs_connection_and_disconnection_with_number_address_and_why(start, name):
    script = start(name)
    async with client(script.url), client(script.url):
        line = await script.until(r"client #2 connected from 127\.0\.0\.1(:\d+)?")
        assert re.match(TIMESTAMP, line.string), line.string
    await script.until(r"client #1 disconnected.*: received 1000 \(OK\); then sent 1000 \(OK\)$")
    await script.until(r"client #2 disconnected.*: received 1000 \(OK\); then sent 1000 \(OK\)$")


# Ctrl+C stops it: 1001, going away. SIGTERM comes from a service manager, mostly to restart
# it (a deploy): 1012, service restart, which tells clients to come back.
CODES = {signal.SIGINT: CloseCode.GOING_AWAY, signal.SIGTERM: CloseCode.SERVICE_RESTART}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_ctrl_c_closes_clients_with_1001_sigterm_with_1012_and_exits_0(start, name, sig):
    script = start(name)
    async with client(script.url) as ws:
        await script.until("connected from")
        script.proc.send_signal(sig)
        with pytest.raises(ConnectionClosed):
            while True:  # skip the welcome, if any
                await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == CODES[sig]
    assert await asyncio.to_thread(script.wait) == 0
    assert "Goodbye" in script.text("stdout")
    assert_clean(script)


async def test_restarts_on_the_same_port_at_once(start, name):
    first = start(name)
    async with client(first.url) as ws:
        await first.until("connected from")
        # stop() blocks: in a thread, so that this client can answer the close meanwhile.
        assert await asyncio.to_thread(first.stop) == 0
        await ws.wait_closed()
    second = start(name, port=str(first.port))
    assert second.url == first.url
    async with client(second.url) as ws:
        assert ws.state.name == "OPEN"


def test_port_in_use_is_one_clear_sentence(start, name):
    first = start(name)
    second = start(name, port=str(first.port), wait_ready=False)
    assert second.wait() not in (0, None)
    error = second.text("stderr")
    assert error == (
        f"Cannot listen on localhost port {first.port}: it is already in use. Another demo "
        f"still running? Stop it with Ctrl+C, or use --port {first.port + 1}."
    ), error
    assert "Traceback" not in second.text()


def test_help_explains_every_flag(name):
    helper = Script(name, "--help", wait_ready=False)
    assert helper.wait() == 0
    for flag in ("--host", "--port", "--allow-origin", "--max-clients"):
        assert flag in helper.text("stdout")


@pytest.mark.parametrize(
    "flags, error",
    [
        (["--port", "99999"], "--port must be a number from 0 to 65535, not 99999"),
        (["--port", "-1"], "--port must be a number from 0 to 65535, not -1"),
        (["--port", "http"], "argument --port: invalid int value: 'http'"),
        (["--max-clients", "0"], "--max-clients must be at least 1, not 0"),
    ],
)
def test_a_bad_flag_is_one_sentence_that_names_it(name, flags, error):
    script = Script(name, *flags, wait_ready=False)
    assert script.wait() == 2
    assert script.text("stderr").splitlines()[-1].endswith(error), script.text()
    assert "Traceback" not in script.text()
    if "--max-clients" in flags:
        assert "--port" not in script.text("stderr").splitlines()[-1]


def test_an_unknown_host_is_one_sentence(name):
    script = Script(name, "--host", "no-such-host.invalid", "--port", "0", wait_ready=False)
    assert script.wait() == 1
    error = script.text("stderr").splitlines()[-1]
    assert error.startswith("Cannot listen on no-such-host.invalid port 0: "), script.text()
    assert "Traceback" not in script.text()


@pytest.mark.parametrize(
    "origin",
    [
        None,
        "null",
        "http://localhost",
        "http://localhost:3000",
        "https://localhost:8443",
        "http://127.0.0.1:8000",
        "http://[::1]:5500",
    ],
)
async def test_accepts_local_and_file_origins(start, name, origin):
    script = start(name)
    async with client(script.url, origin=origin) as ws:
        assert ws.state.name == "OPEN"


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "http://localhost.evil.example",
        "http://127.0.0.1.evil.example:80",
        "file://",
        "http://localhost:80/path",
    ],
)
async def test_refuses_foreign_origins_with_403_and_says_how_to_allow(start, name, origin):
    script = start(name)
    with pytest.raises(InvalidStatus) as refused:
        async with client(script.url, origin=origin):
            pass
    assert refused.value.response.status_code == 403
    line = await script.until("refused origin")
    assert repr(origin) in line.string and "--allow-origin" in line.string


async def test_allow_origin_flag_accepts_that_origin(start, name):
    script = start(name, "--allow-origin", "https://example.com")
    async with client(script.url, origin="https://example.com") as ws:
        assert ws.state.name == "OPEN"
    with pytest.raises(InvalidStatus):
        async with client(script.url, origin="https://example.org"):
            pass


async def test_two_origin_headers_are_refused(start, name):
    script = start(name)
    headers = [("Origin", "null"), ("Origin", "https://evil.example")]
    with pytest.raises(InvalidStatus) as refused:
        async with client(script.url, additional_headers=headers):
            pass
    assert refused.value.response.status_code in (400, 403)  # websockets says 400: malformed


async def test_message_over_64_kib_closes_with_1009_and_the_log_says_why(start, name):
    script = start(name)
    async with client(script.url, max_size=None) as ws:
        await ws.send("x" * 70_000)
        with pytest.raises(ConnectionClosedError):
            while True:
                await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == CloseCode.MESSAGE_TOO_BIG
    await script.until(
        r"client #1 disconnected.*: sent 1009 \(message too big\) "
        r"frame with 70000 bytes exceeds limit of 65536 bytes"
    )
    assert_clean(script)


async def test_a_client_that_vanishes_is_removed_quietly(start, name):
    script = start(name)
    ws = await client(script.url)
    await script.until("connected from")
    reset(ws)
    await script.until(r"client #1 disconnected.*: no close frame received or sent$")
    async with client(script.url) as ws:
        await script.until(r"client #2 connected")
    assert_clean(script)


async def test_non_loopback_host_refuses_origin_null_unless_allowed(start, name):
    """On a network, "null" is also any web site's sandboxed frame, not only a file."""
    script = start(name, "--host", "0.0.0.0")
    with pytest.raises(InvalidStatus) as refused:
        async with client(script.url.replace("0.0.0.0", "127.0.0.1"), origin="null"):
            pass
    assert refused.value.response.status_code == 403
    await script.until(r"refused origin 'null'; to allow it: --allow-origin 'null'")
    allowed = start(name, "--host", "0.0.0.0", "--allow-origin", "null")
    async with client(allowed.url.replace("0.0.0.0", "127.0.0.1"), origin="null") as ws:
        assert ws.state.name == "OPEN"


async def test_non_loopback_host_prints_a_warning(start, name):
    script = start(name, "--host", "0.0.0.0")
    # stderr is read by its own thread: the warning may come in after the ready line.
    await script.until("Warning: on 0.0.0.0 other machines can connect.")
    local = start(name)
    assert await asyncio.to_thread(local.stop) == 0  # all its output, read to the end
    assert "other machines" not in local.text()


async def test_max_clients_refuses_the_next_with_503_then_accepts_again(start, name):
    script = start(name, "--max-clients", "2")
    async with client(script.url) as one, client(script.url):
        with pytest.raises(InvalidStatus) as refused:
            async with client(script.url):
                pass
        assert refused.value.response.status_code == 503
        await script.until(r"refused a client: server full \(--max-clients 2\)")
        assert await asyncio.to_thread(plain_http_status, script) in (200, 426)  # not refused
        await one.close()
        await script.until(r"client #1 disconnected")
        async with client(script.url) as three:
            assert three.state.name == "OPEN"


def plain_http_status(script, path="/"):
    conn = http.client.HTTPConnection("127.0.0.1", script.port, timeout=10)
    conn.request("GET", path)
    return conn.getresponse().status


def test_plain_http_request_gets_an_http_answer(start, name):
    script = start(name)
    assert plain_http_status(script) == 426  # Upgrade Required: this is a WebSocket server
    assert_clean(script)


async def test_a_message_and_a_close_in_one_write_leave_no_traceback(start, name):
    """What a closing browser tab does: the answer to the message meets a closed connection."""
    script = start(name)

    def message_then_close():
        sock, _ = handshake(script.port)
        # A message and a close in one write: the answer (an echo, or the broadcast
        # server's error event for a binary message) finds the connection closing.
        sock.sendall(frame(0x2, b"hello") + frame(0x8, struct.pack("!H", 1001)))
        while sock.recv(65536):  # until the server closes the TCP connection
            pass
        sock.close()

    for _ in range(20):
        await asyncio.to_thread(message_then_close)
    await script.until(r"client #20 disconnected")
    assert_clean(script)


# localhost resolves to both ::1 and 127.0.0.1 in the stock hosts files of Debian and
# macOS; this machine's lists only 127.0.0.1, so the script is shown such a resolver.
BOTH_FAMILIES = """
import socket
_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    if host == "localhost":
        return _getaddrinfo("::1", *args, **kwargs) + _getaddrinfo("127.0.0.1", *args, **kwargs)
    return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
"""


async def test_port_0_gives_one_port_for_ipv4_and_ipv6(start, name, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BOTH_FAMILIES)
    script = start(name, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert script.url.startswith("ws://localhost:")
    for address in ("127.0.0.1", "[::1]"):  # whichever a client picks, it finds the server
        async with client(f"ws://{address}:{script.port}") as ws:
            assert ws.state.name == "OPEN"
    await script.until("client #2 connected from ::1")


# Started with Ctrl+C ignored, as a shell does for `python script.py &`, or as nohup does.
IGNORING_SIGINT = """
import runpy, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""


async def test_sigint_stops_the_script_even_if_the_shell_ignored_it(start, name):
    script = start(name, code=IGNORING_SIGINT)
    async with client(script.url) as ws:
        await script.until("connected from")
        script.proc.send_signal(signal.SIGINT)
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == CloseCode.GOING_AWAY
    assert await asyncio.to_thread(script.wait) == 0
    assert_clean(script)


def flood_without_reading(port):
    """A client that sends and never reads: what the server sends back fills its socket,
    and the server's close() then waits on drain() with no limit."""
    sock, _ = handshake(port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(2)
    with contextlib.suppress(OSError):  # until the server stops reading from it too
        for _ in range(300):  # 18 MB: more than the kernel buffers on both sides
            sock.sendall(frame(0x1, b"x" * 60_000))
    return sock


@pytest.mark.parametrize("twice", [False, True], ids=["ctrl-c", "ctrl-c-twice"])
async def test_ctrl_c_stops_in_time_with_a_client_that_does_not_read(start, name, twice):
    script = start(name, "--quiet") if name.startswith("2_") else start(name)
    sock = await asyncio.to_thread(flood_without_reading, script.port)
    async with client(script.url) as watcher:  # tells the test when the shutdown begins
        t0 = time.monotonic()
        script.proc.send_signal(signal.SIGINT)
        if twice:  # a second Ctrl+C during the shutdown: stop now, without a traceback
            await watcher.wait_closed()
            script.proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(script.wait, 15) == 0
    took = time.monotonic() - t0
    sock.close()
    assert took < (3 if twice else 5 + 3), took  # TIMEOUT is 5 s
    assert "Goodbye" in script.text("stdout")
    assert_clean(script)
