"""The two HTML pages, opened from disk in a real Chromium, against the real scripts."""

import json
import os
import re
import signal
import time

import pytest
from conftest import ROOT, assert_clean, free_port
from websockets.sync.client import connect

playwright = pytest.importorskip("playwright.sync_api")

TIMEOUT = 10_000  # ms for anything the page must show
HOSTILE = '<img src=x onerror="window.__pwned=1">'
WELCOME = {"type": "welcome", "client": 1, "clients": 1, "history": [], "recovered": False}


@pytest.fixture
def open_page(open_file):
    """open_page(html_file, server_url, viewport=None, before=None): see conftest.open_file."""

    def open_page(html, url, viewport=None, before=None):
        return open_file(html, f"url={url}", viewport, before)

    return open_page


def expect(locator):
    return playwright.expect(locator)


playwright.expect.set_options(timeout=TIMEOUT)  # the machine may be busy: as for the page


def paused(page):
    """Fake timers, stopped: the page retries only when the test runs its clock."""
    page.clock.install()
    page.clock.pause_at(time.time() + 1)


def mocked(page):
    """Pause the page's clock and answer its connections in the test: page.routes."""
    paused(page)
    page.routes = []  # one WebSocketRoute per connection the page made, oldest first
    page.route_web_socket(re.compile("^wss?://"), lambda route: page.routes.append(route))


def retry_delays(page, count, close=None):
    """Let the page retry `count` times on its paused clock; return the delays it announced.

    close(page), if given, ends each connection once it is open (a mocked server).
    """
    # Nothing changes while the clock is paused, except through the network: no
    # status can slip by between reading the current one and starting to watch.
    page.evaluate(
        """const box = document.querySelector("#status");
        window.__statuses = [box.textContent];
        new MutationObserver(() => window.__statuses.push(box.textContent))
            .observe(box, {childList: true});"""
    )
    delays = []
    for k in range(1, count + 1):
        if close:
            expect(page.locator("#status")).to_have_attribute("data-state", "open")
            close(page)
        retrying = "window.__statuses.filter(t => t.includes('Retrying'))"
        page.wait_for_function(f"{retrying}.length >= {k}")
        text = page.evaluate(f"{retrying}[{k - 1}]")
        delays.append(float(re.search(r" Retrying in (\d+\.\d) s\.$", text).group(1)))
        page.clock.run_for(round(delays[-1] * 1000) + 100)  # shown rounded to 0.1 s
    return delays


def assert_backoff(delays, grows):
    """Backoff with jitter: retry k waits 50-100% of 2**k s (at most 30), or of 1 s if reset."""
    for k, delay in enumerate(delays):
        full = min(30, 2**k) if grows else 1
        assert full / 2 - 0.05 <= delay <= full + 0.05, delays  # shown rounded to 0.1 s


def log_lines(page, kind=""):
    """The lines of a page's log (of one class, if given), without their times."""
    return [untimed(line) for line in page.locator(f"#log div{kind}").all_text_contents()]


def untimed(line):
    """A log line without the time it starts with: 2:05:13 PM, 14:05:13..."""
    return re.sub(r"^\d{1,2}:\d\d:\d\d(\s?[AP]M)?  ", "", line)


PAGES = [
    ("2_client_echo.html", "2_websocket_echo.py"),
    ("3_client_broadcast.html", "3_websocket_broadcast.py"),
]
# What each page says when the server closes an open connection, with the close reason given.
CLOSE_SENTENCES = [
    (1000, "", "The server closed the connection (1000)."),
    (1001, "", "The server stopped (1001)."),
    (1006, "", "The connection was lost (1006)."),
    (1008, "too slow", "The server closed the connection: too slow (1008)."),
    (1009, "", "The message was too big: the server accepts at most 64 KiB (1009)."),
    (1011, "", "The server had an internal error (1011)."),
    (1012, "", "The server is restarting (1012)."),
    (1013, "", "The server is busy and asks to try again later (1013)."),
    (4000, "bye", 'The connection closed (4000), saying "bye".'),
]


# Both pages, the connection


@pytest.mark.parametrize("html, script_name", PAGES)
def test_page_without_server_says_how_to_start_it_and_retries_slower(open_page, html, script_name):
    url = f"ws://127.0.0.1:{free_port()}"
    page = open_page(html, url, before=paused)
    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "closed")
    expect(status).to_have_text(
        re.compile(
            rf"^Could not connect to the server at {re.escape(url)} \(1006\)\. "
            rf"Start it in a terminal: python {re.escape(script_name)}, or make the address "
            r"above match its ready line\. Retrying in \d+\.\d s\.$"
        )
    )
    expect(status.locator("code")).to_have_text(f"python {script_name}")
    expect(page.locator("#connect")).to_have_text("Stop retrying")  # what it does now
    expect(page.locator("#send")).to_be_disabled()
    expect(page.locator("#message")).to_be_disabled()
    assert_backoff(retry_delays(page, 5), grows=True)
    # The log says it once, not at every retry.
    assert log_lines(page) == [f"Could not connect to the server at {url} (1006)."]


@pytest.mark.parametrize("html", [html for html, _ in PAGES])
def test_page_says_each_close_code_in_plain_words(open_page, html):
    page = open_page(html, "ws://localhost:8765", before=mocked)
    status = page.locator("#status")
    for code, reason, sentence in CLOSE_SENTENCES:
        expect(status).to_have_attribute("data-state", "open")
        page.routes[-1].close(code=code, reason=reason)
        expect(status).to_have_text(re.compile(rf"^{re.escape(sentence)} Retrying in \d+\.\d s\.$"))
        assert log_lines(page)[-1] == sentence
        page.clock.run_for(31_000)  # the longest backoff
    assert len(page.routes) == len(CLOSE_SENTENCES) + 1


@pytest.mark.parametrize(
    "html, welcome, grows",
    [
        ("2_client_echo.html", False, False),  # open is enough for the echo page
        ("3_client_broadcast.html", False, True),  # accepted, then closed before a welcome
        ("3_client_broadcast.html", True, False),
    ],
    ids=["echo", "broadcast-no-welcome", "broadcast-welcome"],
)
def test_backoff_starts_again_only_once_the_server_works(open_page, html, welcome, grows):
    """A server that accepts and closes at once must not make pages retry every second."""

    def close(page):
        if welcome:
            n = len(page.routes)
            page.routes[-1].send(json.dumps(WELCOME | {"client": n}))
            expect(page.locator("#me")).to_have_text(f"#{n}")
        page.routes[-1].close(code=1013)

    page = open_page(html, "ws://localhost:8765", before=mocked)
    assert_backoff(retry_delays(page, 5, close), grows)


def test_echo_page_says_the_server_stopped_and_reconnects_by_itself(start, open_page):
    script = start("2_websocket_echo.py")
    # The page's clock is paused: its retry waits for the test, not for a busy machine to
    # finish stopping the server and hand control back (the status said 1001 for 0.5-1 s).
    page = open_page("2_client_echo.html", script.url, before=paused)
    status = page.locator("#status")
    expect(status).to_have_text(f"Connected to {script.url}.")
    assert script.stop() == 0  # SIGINT, as Ctrl+C
    expect(status).to_have_attribute("data-state", "closed")
    expect(status).to_have_text(re.compile(r"^The server stopped \(1001\)\. Retrying in "))
    again = start("2_websocket_echo.py", port=str(script.port))
    retry_delays(page, 1)  # the page's own retry, once the server is back
    expect(status).to_have_attribute("data-state", "open")
    again.wait_for("client #1 connected")
    connected = f"Connected to {script.url}."
    assert log_lines(page) == [connected, "The server stopped (1001).", connected]
    page.fill("#message", "back again")
    page.press("#message", "Enter")
    expect(page.locator("#log .received")).to_contain_text("back again")


def test_echo_page_says_the_connection_was_lost_when_the_server_dies(start, open_page):
    script = start("2_websocket_echo.py")
    page = open_page("2_client_echo.html", script.url)
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    script.proc.kill()  # no closing handshake at all, as in a crash
    expect(page.locator("#status")).to_contain_text("The connection was lost (1006). Retrying")


def test_echo_page_disconnect_stops_reconnecting(start, open_page):
    script = start("2_websocket_echo.py")
    page = open_page("2_client_echo.html", script.url, before=paused)
    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "open")
    page.click("#connect")
    disconnected = "Disconnected. Press Connect to connect again."
    expect(status).to_have_text(disconnected)
    expect(page.locator("#connect")).to_have_text("Connect")
    expect(page.locator("#send")).to_be_disabled()
    script.wait_for(r"client #1 disconnected: received 1000 \(OK\) user disconnected")
    # A retry would run inside run_for() and change the status before it returns.
    page.clock.run_for(120_000)
    assert status.text_content() == disconnected
    page.click("#connect")  # and Connect connects again
    expect(status).to_have_attribute("data-state", "open")
    script.wait_for("client #2 connected")
    # Disconnect also cancels a retry that is waiting.
    script.stop()
    expect(status).to_contain_text("Retrying in")
    page.click("#connect")
    expect(status).to_have_text(disconnected)
    page.clock.run_for(120_000)
    assert status.text_content() == disconnected
    assert page.problems == []


@pytest.mark.parametrize("html, script_name", PAGES)
def test_enter_in_the_address_field_connects_to_the_typed_address(
    start, open_page, html, script_name
):
    one, two = start(script_name), start(script_name)
    page = open_page(html, one.url)
    status = page.locator("#status")
    expect(status).to_have_text(f"Connected to {one.url}.")
    page.fill("#url", two.url)
    page.press("#url", "Enter")  # connected: it moves to the new address, not off
    expect(status).to_have_text(f"Connected to {two.url}.")
    two.wait_for("client #1 connected")
    one.wait_for("client #1 disconnected")
    expect(page.locator("#connect")).to_have_text("Disconnect")
    page.click("#connect")  # the button still toggles
    expect(page.locator("#connect")).to_have_text("Connect")
    expect(status).to_have_attribute("data-state", "closed")
    page.fill("#url", one.url)
    page.press("#url", "Enter")  # disconnected: it connects
    expect(status).to_have_text(f"Connected to {one.url}.")
    if html == "3_client_broadcast.html":  # the same person: the secret one gave it still holds
        one.wait_for("client #1 connected", count=2)
    else:
        one.wait_for("client #2 connected")
    expect(page.locator("#connect")).to_have_text("Disconnect")
    assert page.problems == []


# The echo page


def test_echo_page_connects_and_echoes_with_round_trip_time(start, open_page):
    script = start("2_websocket_echo.py")
    page = open_page("2_client_echo.html", script.url)
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    expect(page.locator("#send")).to_be_enabled()
    page.fill("#message", "hello from the browser")
    page.press("#message", "Enter")  # Enter sends
    echo = page.locator("#log .received")
    expect(echo).to_have_count(1)
    expect(echo).to_contain_text("hello from the browser")
    expect(echo).to_contain_text(re.compile(r"round trip \d+\.\d ms"))
    page.fill("#message", "bytes")
    page.check("#binary")
    page.click("#send")
    expect(echo.nth(1)).to_contain_text("binary, 5 bytes: bytes")
    script.wait_for("client #1: binary, 5 long")
    assert page.problems == []


def test_echo_page_does_not_send_an_empty_message(start, open_page):
    script = start("2_websocket_echo.py")
    page = open_page("2_client_echo.html", script.url)
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    page.press("#message", "Enter")
    page.click("#send")
    send(page, "something")  # after the empty ones: the server logs it last
    expect(page.locator("#log .received")).to_have_count(1)
    script.wait_for("client #1: text, 9 long")
    assert "0 long" not in script.text()
    assert log_lines(page, ".sent") == ["→ something"]


def test_echo_page_says_a_message_over_64_kib_was_too_big(start, open_page):
    script = start("2_websocket_echo.py", "--quiet")
    page = open_page("2_client_echo.html", script.url)
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    send(page, "x" * 70_000)
    # The log shows the start of a long message and its length, not a wall of x.
    expect(page.locator("#log .sent")).to_have_text(re.compile(r"→ x{300}… \(70000 characters\)$"))
    too_big = "The message was too big: the server accepts at most 64 KiB (1009)."
    expect(page.locator("#log .info").nth(1)).to_have_text(re.compile(f"{re.escape(too_big)}$"))
    script.wait_for(
        r"client #1 disconnected: sent 1009 \(message too big\) "
        r"frame with 70000 bytes exceeds limit of 65536 bytes"
    )
    expect(page.locator("#status")).to_have_attribute("data-state", "open")  # by itself
    script.wait_for("client #2 connected")


# The broadcast page, three windows at once


def open_three(start, open_page, viewport=None, port="0"):
    script = start("3_websocket_broadcast.py", port=port)
    pages = []
    for n in (1, 2, 3):
        page = open_page("3_client_broadcast.html", script.url, viewport)
        expect(page.locator("#me")).to_have_text(f"#{n}")
        pages.append(page)
    for page in pages:
        expect(page.locator("#clients")).to_have_text("3")
    return script, pages


def conversation(page):
    """The messages a page shows, without their times and "(you)" marks."""
    return [line.replace(" (you)", "") for line in log_lines(page, ".message")]


def talk_while_away(away, talker, texts):
    """Disconnect one page while another says texts; return them as the pages show them."""
    away.click("#connect")  # Disconnect
    expect(away.locator("#status")).to_have_attribute("data-state", "closed")
    for text in texts:
        send(talker, text)
    return [f"{talker.locator('#me').text_content()}: {text}" for text in texts]


def send(page, text):
    page.fill("#message", text)
    page.press("#message", "Enter")


def test_broadcast_pages_show_number_and_count_on_join_and_leave(start, open_page):
    _, pages = open_three(start, open_page)
    expect(pages[0].locator("#log")).to_contain_text("Client #3 joined.")
    pages[2].context.close()
    for page in pages[:2]:
        expect(page.locator("#clients")).to_have_text("2")
        expect(page.locator("#log")).to_contain_text("Client #3 left.")
    assert all(page.problems == [] for page in pages[:2])


def test_broadcast_messages_reach_all_pages_in_one_order(start, open_page):
    _, pages = open_three(start, open_page)
    for i, page in enumerate(pages * 2):
        send(page, f"message {i} from page {i % 3 + 1}")
    for page in pages:
        expect(page.locator("#log .message")).to_have_count(6)
    seen = [conversation(page) for page in pages]
    assert seen[0] == seen[1] == seen[2]
    assert seen[0][0] == "#1: message 0 from page 1"
    for n, page in enumerate(pages, 1):
        own = page.locator("#log .message.own")
        expect(own).to_have_count(2)
        expect(own.first.locator(".sender")).to_have_text(f"#{n} (you): ")
    assert all(page.problems == [] for page in pages)


def test_broadcast_hostile_html_is_shown_as_text(start, open_page):
    _, pages = open_three(start, open_page)
    send(pages[1], HOSTILE)
    for page in pages:
        expect(page.locator("#log .message")).to_contain_text(HOSTILE)
        assert page.locator("#log img").count() == 0
        assert page.evaluate("window.__pwned") is None


def test_broadcast_too_long_message_shows_the_error_in_the_sender_only(start, open_page):
    _, pages = open_three(start, open_page)
    message = pages[0].locator("#message")
    expect(message).to_have_attribute("maxlength", "1000")
    message.fill("x" * 1001)
    assert len(message.input_value()) == 1000  # the field stops at the server's limit
    # The server checks anyway: a page changed in the developer tools can send more.
    message.evaluate("field => field.removeAttribute('maxlength')")
    send(pages[0], "x" * 1001)
    expect(pages[0].locator("#log .error")).to_have_text(
        re.compile(r"Not sent: message too long: 1001 characters, the limit is 1000\.$")
    )
    send(pages[0], "short")  # still connected
    for page in pages:
        expect(page.locator("#log .message")).to_contain_text("short")
    for page in pages[1:]:
        assert page.locator("#log .error").count() == 0


def after_separator(page, separator):
    """The messages a page shows under its last separator line."""
    texts = page.locator("#log div").evaluate_all(
        "lines => lines.map(line => [line.className, line.textContent])"
    )
    start = max(i for i, (kind, text) in enumerate(texts) if kind == "separator")
    assert texts[start][1] == separator
    return [untimed(text) for kind, text in texts[start:] if "message" in kind]


def test_broadcast_page_catches_up_after_disconnect_and_reload(start, open_page):
    script = start("3_websocket_broadcast.py")
    talker = open_page("3_client_broadcast.html", script.url)
    expect(talker.locator("#me")).to_have_text("#1")
    room = f"{script.url}/chat?room=blue"  # ?since= must join a path and a query string
    away = open_page("3_client_broadcast.html", room)
    expect(away.locator("#me")).to_have_text("#2")
    send(talker, "Anyone here?")
    expect(away.locator("#log .message")).to_have_count(1)
    missed = talk_while_away(away, talker, [f"missed {n}" for n in range(1, 4)])
    expect(talker.locator("#log .message")).to_have_count(4)
    away.click("#connect")  # Connect: with ?since= the id of "Anyone here?"
    expect(away.locator("#log")).to_contain_text("Connected to", use_inner_text=True)
    expect(away.locator("#log .notice").last).to_contain_text("as client #2.")  # still #2
    assert re.fullmatch(rf"{re.escape(room)}&since=\d+-1", away.sockets[-1]), away.sockets
    expect(away.locator("#log .message")).to_have_count(4)
    assert after_separator(away, "— while you were away —") == missed
    assert conversation(away) == ["#1: Anyone here?", *missed]

    # A reload shows again what the tab showed (sessionStorage keeps it), then what it missed.
    away.click("#connect")
    expect(away.locator("#status")).to_have_attribute("data-state", "closed")
    send(talker, "missed 4")
    send(talker, "missed 5")
    expect(talker.locator("#log .message")).to_have_count(6)
    before = conversation(away)
    away.reload()
    expect(away.locator("#log .notice").last).to_contain_text("as client #2.")  # still #2
    assert re.fullmatch(rf"{re.escape(room)}&since=\d+-4", away.sockets[-1]), away.sockets
    expect(away.locator("#log .message")).to_have_count(6)
    assert conversation(away) == [*before, "#1: missed 4", "#1: missed 5"]  # each once
    assert after_separator(away, "— while you were away —") == ["#1: missed 4", "#1: missed 5"]
    send(away, "Back, and I saw it all")
    expect(talker.locator("#log .message")).to_have_count(7)
    expect(away.locator("#log .message.own")).to_have_text(
        re.compile(r"#2 \(you\): Back, and I saw it all$")
    )
    assert away.locator("#log .warning").count() == 0
    assert not any("resume" in url for url in away.sockets)  # the secret is never in a URL

    # A new window (its own sessionStorage) asks for nothing and gets the recent messages.
    late = open_page("3_client_broadcast.html", script.url)
    expect(late.locator("#me")).to_have_text("#3")
    assert late.sockets == [f"{script.url}/"]
    expect(late.locator("#log .message")).to_have_count(7)
    assert after_separator(late, "— earlier messages —") == conversation(talker)
    assert late.locator("#log .warning").count() == 0
    assert away.problems == talker.problems == late.problems == []


def test_broadcast_page_after_a_restart_has_a_new_number_and_says_what_may_be_missing(
    start, open_page
):
    script = start("3_websocket_broadcast.py")
    page = open_page("3_client_broadcast.html", script.url, before=paused)
    expect(page.locator("#me")).to_have_text("#1")
    send(page, "Before the restart")
    expect(page.locator("#log .message.own")).to_have_count(1)
    assert script.stop() == 0
    status = page.locator("#status")
    expect(status).to_have_text(re.compile(r"^The server stopped \(1001\)\. Retrying in "))
    again = start("3_websocket_broadcast.py", port=str(script.port))
    # The page's clock is paused: another page takes number 1 before it comes back.
    other = open_page("3_client_broadcast.html", again.url)
    expect(other.locator("#me")).to_have_text("#1")
    retry_delays(page, 1)  # now it comes back, asking for what it missed
    expect(page.locator("#me")).to_have_text("#2")
    assert re.fullmatch(rf"{re.escape(script.url)}/\?since=\d+-1", page.sockets[-1]), page.sockets
    expect(page.locator("#log .warning")).to_have_count(1)
    # It never left (the server did): no "since you left", and its new number said once.
    assert log_lines(page, ".warning") == [
        "Some messages may be missing: the server no longer has all of them."
    ]
    send(other, "Hello, I am the new #1")
    send(page, "And I am #2 now")
    expect(page.locator("#log .message")).to_have_count(3)
    assert log_lines(page, ".message") == [
        "#1 (you): Before the restart",  # it was us, then
        "#1: Hello, I am the new #1",  # not us: no stale mark
        "#2 (you): And I am #2 now",
    ]
    assert log_lines(page, ".message.own") == [
        "#1 (you): Before the restart",
        "#2 (you): And I am #2 now",
    ]
    connected = [line for line in log_lines(page) if line.startswith(("Connected", "Reconn"))]
    assert connected == [f"Connected to {script.url} as client #1.", "Reconnected as client #2."]


def test_broadcast_pages_on_two_processes_show_one_conversation(start, open_page, redis_server):
    one = start("3_websocket_broadcast.py", "--redis", redis_server.url)
    two = start("3_websocket_broadcast.py", "--redis", redis_server.url)
    pages = [open_page("3_client_broadcast.html", url) for url in (one.url, two.url)]
    for page in pages:
        expect(page.locator("#status")).to_have_attribute("data-state", "open")
    for page in pages:
        expect(page.locator("#clients")).to_have_text("2")
    send(pages[0], "from the first process")
    expect(pages[1].locator("#log .message")).to_have_count(1)
    send(pages[1], "from the second process")
    for page in pages:
        expect(page.locator("#log .message")).to_have_count(2)
    assert conversation(pages[0]) == conversation(pages[1])

    # The first page goes away while the second talks: it catches up through Redis too.
    away, talker = pages
    missed = talk_while_away(away, talker, [f"while you were away {n}" for n in range(1, 4)])
    expect(talker.locator("#log .message")).to_have_count(5)
    away.click("#connect")
    expect(away.locator("#log .message")).to_have_count(5)
    assert after_separator(away, "— while you were away —") == missed
    assert conversation(away) == conversation(talker)
    assert all(page.problems == [] for page in pages)


# Both pages: how they look


def assert_fits(page, width):
    """Nothing wider than the window, no text spilling out of the status bar or a button."""
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"page is {overflow}px wider than the window"
    for control in ("#url", "#connect", "#message", "#send", "#status", "#log"):
        box = page.locator(control).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, (control, box)
    spilling = page.evaluate(
        """[...document.querySelectorAll("#status, #status *, button, label")]
            .filter(e => e.scrollWidth > e.clientWidth).map(e => e.id || e.textContent)"""
    )
    assert spilling == []
    # A button's label on one line: no taller than one line of text and its padding.
    tall = page.evaluate(
        """[...document.querySelectorAll("button")].filter(b => b.clientHeight >
            1.5 * parseFloat(getComputedStyle(b).lineHeight) + 20).map(b => b.textContent)"""
    )
    assert tall == []


@pytest.mark.parametrize("html, script_name", PAGES)
def test_usable_at_phone_width(start, open_page, html, script_name):
    script = start(script_name)
    page = open_page(html, script.url, viewport={"width": 360, "height": 640})
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    assert_fits(page, 360)
    send(page, "small screen")
    expect(page.locator("#log")).to_contain_text("small screen")
    assert_fits(page, 360)
    script.stop()  # the longest status: how to start the server, and when the page retries
    expect(page.locator("#status")).to_contain_text("Start it in a terminal", timeout=15_000)
    expect(page.locator("#connect")).to_have_text("Stop retrying")
    assert_fits(page, 360)
    page.click("#connect")
    expect(page.locator("#connect")).to_have_text("Connect")
    assert_fits(page, 360)
    # Chromium itself logs each refused connection; nothing else may go wrong.
    assert [p for p in page.problems if "ERR_CONNECTION_REFUSED" not in p] == []


def test_screenshots(start, open_page, tmp_path):
    """The pictures in the README, as a learner sees them; UPDATE_SCREENSHOTS=1 writes docs/."""
    update = os.environ.get("UPDATE_SCREENSHOTS") == "1"
    target = ROOT / "docs" if update else tmp_path
    port = "8765" if update else "0"  # 8765: the address the pages show by default
    window = {"width": 960, "height": 700}

    script = start("2_websocket_echo.py", port=port)
    page = open_page("2_client_echo.html", script.url, window)
    expect(page.locator("#status")).to_have_text(f"Connected to {script.url}.")
    texts = ["Hello, WebSocket!", "Every message comes straight back", "to its sender."]
    received = page.locator("#log .received")
    for count, text in enumerate(texts, 1):  # each echo before the next message, as by hand
        send(page, text)
        expect(received).to_have_count(count)
    for line, text in zip(received.all(), texts, strict=True):
        expect(line).to_have_text(re.compile(rf"  ← {re.escape(text)} \(round trip \d+\.\d ms\)$"))
    expect(received.last).to_be_in_viewport()
    page.screenshot(path=target / "echo.png")
    page.context.close()  # or it would reconnect to the broadcast server on the same port
    assert script.stop() == 0

    script, pages = open_three(start, open_page, window, port)
    lines = [
        (0, "Hi all, I'm in window 1"),
        (1, "Hello from window 2!"),
        (2, "Window 3 here: I see both of you"),
        (1, "Great: one message, every window."),
    ]
    for n, text in lines:
        send(pages[n], text)
        expect(pages[0].locator("#log .message").last).to_contain_text(text)
    shown = pages[1]
    expect(shown.locator("#log .message")).to_have_count(4)
    assert conversation(shown) == [f"#{n + 1}: {text}" for n, text in lines]
    expect(shown.locator("#log .message.own")).to_have_count(2)
    expect(shown.locator("#me")).to_have_text("#2")
    expect(shown.locator("#clients")).to_have_text("3")
    expect(shown.locator("#log .message").last).to_be_in_viewport()
    shown.screenshot(path=target / "broadcast.png")

    for name in ("echo.png", "broadcast.png"):
        png = (target / name).read_bytes()  # the width and height are in the PNG header
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(png[16:20]) == window["width"]
    for page in pages:
        assert page.input_value("#url") == script.url
        assert page.problems == []
    if update:
        assert script.url == "ws://localhost:8765"


# The broadcast page: what a newcomer trips on


def test_a_reloaded_page_shows_what_it_showed_once_and_not_its_former_self_leaving(
    start, open_page
):
    _, (talker, reloaded, _) = open_three(start, open_page)
    for text in ("one", "two", "three"):
        send(talker, text)
    expect(reloaded.locator("#log .message")).to_have_count(3)
    send(reloaded, "mine")
    expect(reloaded.locator("#log .message.own")).to_have_count(1)
    before = log_lines(reloaded, ".message")
    heard = log_lines(talker, ".notice")
    reloaded.reload()
    expect(reloaded.locator("#log .notice").last).to_contain_text("as client #2.")  # itself
    expect(reloaded.locator("#me")).to_have_text("#2")
    expect(reloaded.locator("#clients")).to_have_text("3")
    send(talker, "after the reload")
    expect(reloaded.locator("#log .message")).to_have_count(5)
    assert log_lines(reloaded, ".message") == [*before, "#1: after the reload"]
    talker.wait_for_timeout(6_000)  # past the 5 s a client has to come back
    # Back in time: the others heard nothing, neither "left" nor "joined".
    assert log_lines(talker, ".notice") == heard
    expect(talker.locator("#clients")).to_have_text("3")
    assert "Client #2 left." not in log_lines(reloaded)
    assert reloaded.problems == []


def test_a_window_that_saw_no_message_catches_up_on_everything_it_missed(start, open_page):
    script = start("3_websocket_broadcast.py", "--rate", "0")
    away = open_page("3_client_broadcast.html", script.url)
    expect(away.locator("#me")).to_have_text("#1")
    away.click("#connect")  # it saw nothing at all
    expect(away.locator("#status")).to_have_attribute("data-state", "closed")

    with connect(script.url, proxy=None) as ws:  # another client says 30 things
        for i in range(30):
            ws.send(f"while away {i}")
        for _ in range(30):
            while '"message"' not in ws.recv(timeout=10):
                pass
    away.click("#connect")
    expect(away.locator("#log .message")).to_have_count(30)  # not the newcomer's 20
    assert after_separator(away, "— while you were away —") == [
        f"#2: while away {i}" for i in range(30)
    ]
    assert away.locator("#log .warning").count() == 0


def test_messages_caught_up_show_when_they_were_said(start, open_page):
    script = start("3_websocket_broadcast.py")
    talker = open_page("3_client_broadcast.html", script.url)
    in_an_hour = time.time() + 3600

    def an_hour_ahead(page):  # the page's clock, not the server's: easy to tell apart
        page.clock.install(time=in_an_hour)
        page.clock.pause_at(in_an_hour)

    away = open_page("3_client_broadcast.html", script.url, before=an_hour_ahead)
    expect(away.locator("#me")).to_have_text("#2")
    talk_while_away(away, talker, ["said now"])
    said = talker.locator("#log .message").last.text_content().split("  ")[0]
    away.click("#connect")
    expect(away.locator("#log .message")).to_have_count(1)
    line = away.locator("#log .message").text_content()
    assert line.startswith(f"{said}  "), (line, said)  # when it was said, by the server
    connected = away.locator("#log .notice").last.text_content().split("  ")[0]
    assert connected != said  # and the page's own lines show the page's own time


def test_a_storm_of_arrivals_is_announced_as_a_count(open_page):
    page = open_page("3_client_broadcast.html", "ws://localhost:8765", before=mocked)
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    page.routes[-1].send(json.dumps(WELCOME))
    page.routes[-1].send(json.dumps({"type": "presence", "clients": 38, "joined": 37, "left": []}))
    page.routes[-1].send(json.dumps({"type": "presence", "clients": 36, "joined": [], "left": 2}))
    expect(page.locator("#clients")).to_have_text("36")
    assert log_lines(page, ".notice")[-2:] == ["37 clients joined.", "2 clients left."]
    assert page.problems == []


def test_the_page_ignores_fields_and_types_it_does_not_know(open_page):
    """A newer server may add fields and event types: the page shows what it knows."""
    page = open_page("3_client_broadcast.html", "ws://localhost:8765", before=mocked)
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    newer = {"mood": "<b>happy</b>", "reactions": {"+1": 3}}
    page.routes[-1].send(json.dumps(WELCOME | newer))
    page.routes[-1].send(json.dumps({"type": "reaction", "to": "1-1", "text": "not shown"}))
    message = {"type": "message", "id": "1-1", "client": 2, "text": "hi", "time": 0}
    page.routes[-1].send(json.dumps(message | newer))
    page.routes[-1].send(
        json.dumps({"type": "presence", "clients": 2, "joined": [2], "left": []} | newer)
    )
    expect(page.locator("#clients")).to_have_text("2")
    assert log_lines(page, ".message") == ["#2: hi"]
    assert "not shown" not in page.locator("#log").text_content()
    assert "happy" not in page.locator("#log").text_content()
    assert page.problems == []


# The broadcast page: reconnects nobody has to notice


def test_a_blip_keeps_the_number_and_typing_and_says_what_was_missed(start, open_page):
    script = start("3_websocket_broadcast.py")
    talker = open_page("3_client_broadcast.html", script.url)
    expect(talker.locator("#me")).to_have_text("#1")
    page = open_page("3_client_broadcast.html", script.url, before=paused)
    expect(page.locator("#me")).to_have_text("#2")
    expect(talker.locator("#log")).to_contain_text("Client #2 joined.")  # announced: now blip
    for said in (["said during the blip"], []):
        page.evaluate("socket.close(4000)")  # a blip: the connection ends, unasked
        expect(page.locator("#log .notice").last).to_have_text(
            re.compile(r"The connection closed \(4000\)\. Reconnecting…$")
        )
        expect(page.locator("#message")).to_be_enabled()  # the box stays usable
        send(page, f"typed during blip {len(said)}")
        expect(page.locator("#outbox")).to_have_text(
            f"Waiting to send: typed during blip {len(said)}"
        )
        for text in said:
            send(talker, text)
            expect(talker.locator("#log .message").last).to_contain_text(text)
        page.clock.run_for(1_100)  # the first retry: within a second
        missed = "1 missed message below" if said else "nothing missed"
        expect(page.locator("#log .notice").last).to_have_text(
            re.compile(rf"Reconnected: {missed}\.$")  # the same number: not said again
        )
        expect(page.locator("#me")).to_have_text("#2")
        expect(page.locator("#outbox")).to_be_empty()
    for p in (talker, page):
        expect(p.locator("#log .message")).to_have_count(3)
        assert conversation(p) == [
            "#1: said during the blip",  # said first: ours went once we were back
            "#2: typed during blip 1",
            "#2: typed during blip 0",
        ]
    # The others heard it arrive, once (a quick reconnect is no news; the reload test waits
    # out the grace period to show that no "left" follows either).
    assert [line for line in log_lines(talker) if "#2 " in line] == ["Client #2 joined."]
    assert log_lines(page, ".warning") == [] and page.problems == talker.problems == []


def test_a_restart_says_restarting_and_what_was_typed_meanwhile_goes_once(start, open_page):
    script = start("3_websocket_broadcast.py")
    pages = [open_page("3_client_broadcast.html", script.url) for _ in (1, 2)]
    for page in pages:
        expect(page.locator("#status")).to_have_attribute("data-state", "open")
    assert script.stop(signal.SIGTERM) == 0  # as a service manager does, for a restart
    typed = [f"typed while it restarts {n}" for n in (1, 2)]
    for page in pages:
        expect(page.locator("#log")).to_contain_text(
            "The server is restarting (1012). Reconnecting…"
        )
    for text in typed:
        send(pages[0], text)
    expect(pages[0].locator("#outbox .pending")).to_have_count(2)
    again = start("3_websocket_broadcast.py", port=str(script.port))
    for page in pages:
        expect(page.locator("#log .message")).to_have_count(2, timeout=20_000)
        assert [line.split(": ", 1)[1] for line in log_lines(page, ".message")] == typed
        expect(page.locator("#status")).to_have_attribute("data-state", "open")
        assert "The server stopped" not in page.locator("#log").text_content()
    expect(pages[0].locator("#outbox")).to_be_empty()
    assert_clean(again)


def test_what_was_typed_while_away_goes_at_the_rate_the_server_takes(start, open_page):
    script = start("3_websocket_broadcast.py")  # 5 a second from one address, bursts of 10
    page = open_page("3_client_broadcast.html", script.url)
    expect(page.locator("#me")).to_have_text("#1")
    page.click("#connect")  # Disconnect: a person typing 20 lines, slowly, while away
    expect(page.locator("#status")).to_have_attribute("data-state", "closed")
    typed = [f"typed while away {n}" for n in range(20)]
    for text in typed:
        send(page, text)
    expect(page.locator("#outbox .pending")).to_have_count(20)
    page.click("#connect")  # back: all 20 at once would be over the burst of 10
    expect(page.locator("#log .message")).to_have_count(20, timeout=15_000)
    assert [line.split(": ", 1)[1] for line in log_lines(page, ".message")] == typed
    expect(page.locator("#outbox")).to_be_empty()
    assert log_lines(page, ".error") == [] and page.problems == []
    assert_clean(script)
