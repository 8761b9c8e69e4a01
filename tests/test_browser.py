"""The two HTML pages, opened from disk in a real Chromium, against the real scripts."""

import os
import re
import shutil

import pytest
from conftest import ROOT, free_port, missing

playwright = pytest.importorskip("playwright.sync_api")

CANDIDATES = [
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
TIMEOUT = 10_000  # ms for anything the page must show
HOSTILE = '<img src=x onerror="window.__pwned=1">'


def find_chromium():
    return next((path for path in CANDIDATES if path and os.path.exists(path)), None)


@pytest.fixture(scope="module")
def browser():
    path = find_chromium()
    if path is None:
        missing(
            "no Chromium found: install it (Debian/Ubuntu: apt-get install chromium) "
            "or point the CHROMIUM environment variable at a Chrome or Chromium binary",
            "REQUIRE_BROWSER",
        )
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """open_page(html_file, server_url): a page opened from disk, as a double-click does."""
    contexts = []

    def open_page(html, url, viewport=None):
        context = browser.new_context(viewport=viewport or {"width": 900, "height": 700})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT)
        page.problems = []  # console errors and uncaught exceptions
        page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
        page.on("pageerror", lambda e: page.problems.append(str(e)))
        page.goto(f"{(ROOT / html).as_uri()}?url={url}")
        return page

    yield open_page
    for context in contexts:
        context.close()


def expect(locator):
    return playwright.expect(locator)


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


def test_echo_page_without_server_says_how_to_start_it_and_retries_slower(open_page):
    page = open_page("2_client_echo.html", f"ws://127.0.0.1:{free_port()}")
    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "closed")
    expect(status).to_contain_text("python 2_websocket_echo.py")
    expect(page.locator("#send")).to_be_disabled()
    expect(page.locator("#message")).to_be_disabled()
    page.evaluate(
        """window.__statuses = [];
        new MutationObserver(() => window.__statuses.push(document.querySelector("#status")
            .textContent)).observe(document.querySelector("#status"), {childList: true});"""
    )
    page.wait_for_function(
        "window.__statuses.filter(t => t.includes('Retrying')).length >= 3", timeout=15_000
    )
    texts = page.evaluate("window.__statuses.filter(t => t.includes('Retrying'))")
    delays = [float(re.search(r"Retrying in ([\d.]+) s", t).group(1)) for t in texts]
    # With jitter the delays are 0.5-1 s, then 1-2 s, then 2-4 s: the third always longer.
    assert delays[2] > delays[0], delays
    assert all("python 2_websocket_echo.py" in t for t in texts)


def test_echo_page_shows_1001_on_stop_and_reconnects_by_itself(start, open_page):
    script = start("2_websocket_echo.py")
    page = open_page("2_client_echo.html", script.url)
    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "open")
    assert script.stop() == 0  # SIGINT, as Ctrl+C
    expect(status).to_have_attribute("data-state", "closed")
    expect(page.locator("#log")).to_contain_text("Disconnected (code 1001)")
    again = start("2_websocket_echo.py", port=str(script.port))
    expect(status).to_have_attribute("data-state", "open", timeout=15_000)
    again.wait_for("client #1 connected")
    page.fill("#message", "back again")
    page.press("#message", "Enter")
    expect(page.locator("#log .received")).to_contain_text("back again")


def test_echo_page_disconnect_stops_reconnecting(start, open_page):
    script = start("2_websocket_echo.py")
    page = open_page("2_client_echo.html", script.url)
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    page.click("#connect")
    expect(page.locator("#status")).to_have_attribute("data-state", "closed")
    expect(page.locator("#status")).to_contain_text("Press Connect")
    expect(page.locator("#connect")).to_have_text("Connect")
    expect(page.locator("#send")).to_be_disabled()
    script.wait_for(r"client #1 disconnected \(code 1000")
    page.wait_for_timeout(2500)  # longer than the first retry delay could be
    assert "client #2" not in script.text()
    page.click("#connect")  # and Connect connects again
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    script.wait_for("client #2 connected")
    assert page.problems == []


# The broadcast page, three windows at once


def open_three(start, open_page, viewport=None):
    script = start("3_websocket_broadcast.py")
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
    lines = page.locator("#log .message").all_text_contents()
    return [line.split("  ", 1)[1].replace(" (you)", "") for line in lines]


def send(page, text):
    page.fill("#message", text)
    page.press("#message", "Enter")


def test_broadcast_pages_show_number_and_count_on_join_and_leave(start, open_page):
    _, pages = open_three(start, open_page)
    expect(pages[0].locator("#log")).to_contain_text("client #3 joined")
    pages[2].context.close()
    for page in pages[:2]:
        expect(page.locator("#clients")).to_have_text("2")
        expect(page.locator("#log")).to_contain_text("client #3 left")
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
    send(pages[0], "x" * 1001)
    expect(pages[0].locator("#log .error")).to_contain_text("message too long: 1001 characters")
    send(pages[0], "short")  # still connected
    for page in pages:
        expect(page.locator("#log .message")).to_contain_text("short")
    for page in pages[1:]:
        assert page.locator("#log .error").count() == 0


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
    assert all(page.problems == [] for page in pages)


# Both pages


@pytest.mark.parametrize(
    "html, script_name",
    [
        ("2_client_echo.html", "2_websocket_echo.py"),
        ("3_client_broadcast.html", "3_websocket_broadcast.py"),
    ],
)
def test_usable_at_phone_width(start, open_page, html, script_name):
    script = start(script_name)
    page = open_page(html, script.url, viewport={"width": 360, "height": 640})
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"page is {overflow}px wider than the phone"
    for control in ("#url", "#connect", "#message", "#send", "#status", "#log"):
        box = page.locator(control).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 360, (control, box)
    send(page, "small screen")
    expect(page.locator("#log")).to_contain_text("small screen")
    assert page.problems == []


def test_screenshots(start, open_page, tmp_path):
    """Pictures for the README; UPDATE_SCREENSHOTS=1 writes them to docs/."""
    target = ROOT / "docs" if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    target.mkdir(exist_ok=True)
    script = start("2_websocket_echo.py")
    page = open_page("2_client_echo.html", script.url, {"width": 720, "height": 560})
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    for text in ["Hello, WebSocket!", "Every message comes straight back", "to its sender."]:
        send(page, text)
    expect(page.locator("#log .received")).to_have_count(3)
    page.screenshot(path=target / "echo.png")

    script, pages = open_three(start, open_page, {"width": 720, "height": 560})
    lines = [
        (0, "Hi all, I'm in window 1"),
        (1, "Hello from window 2!"),
        (2, "Window 3 here: I see both of you"),
        (1, HOSTILE),
    ]
    for n, text in lines:
        send(pages[n], text)
        expect(pages[0].locator("#log .message").last).to_contain_text(text)
    expect(pages[1].locator("#log .message")).to_have_count(4)
    pages[1].screenshot(path=target / "broadcast.png")
    for name in ("echo.png", "broadcast.png"):
        assert (target / name).stat().st_size > 10_000
