"""Two people chatting through deploy/up while it is redeployed and one process is killed.

Real Chromium, real nginx, Supervisor, Redis and three broadcast processes. Each page
types a message every 250 ms through a rolling restart (deploy/restart) and a kill -9;
what each person sees must be what they would expect of a chat that was never down.
"""

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import trustme
from conftest import ROOT
from test_deploy import Stack, health, playwright_expect

TYPING = 0.25  # seconds between two messages of one page: 4 a second, under RATE's 5

# Each page types by itself (as a person pressing Enter would: the composer's submit), and
# notes what it typed, every client number it showed, and every status it showed.
TYPIST = """label => {
  const field = document.getElementById("message"), form = document.getElementById("composer");
  window.typed = []; window.refused = 0; window.numbers = new Set(); window.statuses = [];
  const me = document.getElementById("me"), status = document.getElementById("status");
  new MutationObserver(() => numbers.add(me.textContent))
    .observe(me, { childList: true, characterData: true, subtree: true });
  new MutationObserver(() => statuses.push(status.textContent))
    .observe(status, { childList: true, characterData: true, subtree: true });
  window.typist = setInterval(() => {
    if (field.disabled) return refused++;  // the box must stay usable throughout
    const text = `${label} ${typed.length}`;
    field.value = text;
    form.requestSubmit();
    typed.push(text);
  }, INTERVAL);
}""".replace("INTERVAL", str(int(TYPING * 1000)))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    stack = Stack(folder, trustme.CA(), processes=3, RATE="5")  # deploy/up's default
    yield stack
    if stack.script.proc.poll() is None:
        assert stack.stop() == 0


class Elsewhere:
    """An HTTP proxy (CONNECT only) whose connections to nginx come from another address.

    The message rate is per address, and one browser's pages all come from 127.0.0.1: two
    people typing 4 a second each would be 8 a second from one address, over RATE's 5. A
    page whose context uses this proxy reaches nginx from `source`, as a second person would.
    """

    def __init__(self, port, source="127.0.0.2"):
        self.port, self.source, ready = port, source, threading.Event()
        self.thread = threading.Thread(target=asyncio.run, args=(self.serve(ready),), daemon=True)
        self.thread.start()  # its own loop: the main thread's is Playwright's
        assert ready.wait(10)

    async def serve(self, ready):
        self.loop, self.stopped = asyncio.get_running_loop(), asyncio.Event()
        async with await asyncio.start_server(self.tunnel, "127.0.0.1", 0) as server:
            self.address = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            ready.set()
            await self.stopped.wait()

    async def tunnel(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"CONNECT localhost:%d " % self.port):  # nginx only
                raise ConnectionRefusedError
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.port, local_addr=(self.source, 0)
            )
        except (asyncio.IncompleteReadError, OSError):  # a preconnect given up, say
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(source, sink):
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self):
        self.loop.call_soon_threadsafe(self.stopped.set)
        self.thread.join(5)


def messages_on(page):
    """(sender number, text) of every message the page shows, in its order."""
    lines = page.locator("#log .message").all_text_contents()
    said = [re.search(r"#(\d+)(?: \(you\))?: (.*)$", line) for line in lines]
    return [(int(m[1]), m[2]) for m in said]


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_two_people_typing_through_a_redeploy_and_a_kill_9_lose_and_notice_nothing(stack, browser):
    address = f"https://localhost:{stack.port}/3_client_broadcast.html"
    elsewhere = Elsewhere(stack.port)  # page b: another person, at another address
    contexts = [
        browser.new_context(ignore_https_errors=True),
        browser.new_context(ignore_https_errors=True, proxy={"server": elsewhere.address}),
    ]
    try:
        pages = [context.new_page() for context in contexts]
        for page in pages:
            page.goto(address)
            playwright_expect(page.locator("#me")).to_have_text(re.compile(r"^#\d+$"))
        numbers = [int(page.text_content("#me").lstrip("#")) for page in pages]
        for number, source in zip(numbers, ["127.0.0.1", "127.0.0.2"], strict=True):
            stack.script.wait_for(rf"client #{number} connected from {re.escape(source)}$", 10)
        playwright_expect(pages[0].locator("#clients")).to_have_text("2")
        notices = [page.locator("#log .notice").count() for page in pages]  # from here on
        for page, label in zip(pages, "ab", strict=True):
            page.evaluate(TYPIST, label)
        time.sleep(2)

        result = subprocess.run(
            [sys.executable, str(ROOT / "deploy" / "restart")],
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        time.sleep(2)
        # kill -9 a process that has at least one of the pages.
        busy = [port for port in stack.backends if (health(port)[1] or {}).get("clients")]
        assert busy, [health(port) for port in stack.backends]
        name = f"broadcast:broadcast_{busy[0]}"
        victim = int(stack.control("pid", name).stdout.strip())
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(
            lambda: (
                stack.control("pid", name).stdout.strip() not in ("0", str(victim))
                and health(busy[0])[0] == 200
            ),
            30,
            "Supervisor to start it again",
        )
        # Long enough for the others to count the dead process's clients gone (7 s without
        # its heartbeat) and for a "left" to be due (5 s more): none may come, they are back.
        time.sleep(max(0, killed + 7 + 5 + 1 - time.monotonic()))
        for page in pages:
            page.evaluate("clearInterval(typist)")

        typed = [page.evaluate("typed") for page in pages]
        assert all(len(texts) > 20 for texts in typed), typed
        print(f"typed {[len(texts) for texts in typed]} through a restart and a kill -9")
        for page in pages:  # what waits to be sent goes out; then every message is there
            playwright_expect(page.locator("#outbox")).to_be_empty(timeout=30_000)
        total = sum(map(len, typed))
        for page in pages:
            wait_for(lambda page=page: len(messages_on(page)) >= total, 30, "every message")

        logs = [page.text_content("#log") for page in pages]
        for me, page, log, before in zip(numbers, pages, logs, notices, strict=True):
            shown = messages_on(page)
            assert len(shown) == total
            for label, n, texts in zip("ab", numbers, typed, strict=True):
                # Each sender's messages: once each, in its order, under its one number.
                assert [m for m in shown if m[1].startswith(f"{label} ")] == [(n, t) for t in texts]
            assert page.evaluate("refused") == 0  # the box was usable all along
            assert page.evaluate("[...numbers]") in ([f"#{me}"], [])  # never another number
            assert page.text_content("#me") == f"#{me}"
            other = numbers[1 - numbers.index(me)]
            since = page.locator("#log .notice").all_text_contents()[before:]
            assert not [s for s in since if re.search(rf"#{other} (left|joined)", s)], since
            assert "The server stopped" not in log + "".join(page.evaluate("statuses"))
            assert not page.locator("#log .warning, #log .error").count()
            # A rolling restart moves every client at least once: said calmly, and settled.
            assert "The server is restarting (1012). Reconnecting…" in log
            assert re.search(r"Reconnected: (nothing missed|\d+ missed messages?)", log)
        # The killed process's client heard its connection lost, and came back the same.
        assert any("The connection was lost (1006). Reconnecting…" in log for log in logs)
    finally:
        for context in contexts:
            context.close()
        elsewhere.close()
