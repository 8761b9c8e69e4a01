"""The pages in Firefox ESR and WebKitGTK (Safari's engine), through WebDriver: the learner's
scenario in each, then what differed between engines (some of it emulated in Chromium)."""

import glob
import os
import re
import shutil
import subprocess
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import trustme
from conftest import ROOT, Script, missing

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture says what is missing; the engines' tests still run
    expect = None

TIMEOUT = 15  # s for anything a page must show; a busy machine is slow, never wrong
MS = TIMEOUT * 1000  # the same, for Playwright
SERVER = 30  # s for a page to come back by itself: its backoff has grown while the server was away
MINIBROWSER = sorted(glob.glob("/usr/lib/*/webkit2gtk-4.1/MiniBrowser"))
OPEN_LINE = re.compile(r"^Open (file://\S+)$")
REQUIRED = "REQUIRE_BROWSER"  # =1: a missing engine fails, as in CI


class Window:
    """One browser window showing one of the pages, with the few things the tests do to it."""

    def __init__(self, browser, handle):
        self.browser, self.handle = browser, handle

    def js(self, script, *args):
        self.browser.switch(self.handle)
        return self.browser.execute(script, args)

    def until(self, script, *args, timeout=TIMEOUT, what=None):
        """Poll script (a function body) until it returns something true; return that."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                state = self.js("return document.querySelector('#status').textContent")
                log = self.js("return document.querySelector('#log').innerText")
                raise AssertionError(f"{self.browser.name}: {what or script}\n{state}\n{log}")
            time.sleep(0.05)  # a polling interval: the deadline above is what waits

    def wait_state(self, state, timeout=TIMEOUT):
        self.until(
            "return document.querySelector('#status').dataset.state === arguments[0]",
            state,
            timeout=timeout,
            what=f"status {state}",
        )

    def lines(self, text):
        """How many lines of the log contain text."""
        return self.js(
            "return [...document.querySelectorAll('#log > *')]"
            ".filter(line => line.textContent.includes(arguments[0])).length",
            text,
        )

    def wait_lines(self, text, count=1, timeout=TIMEOUT):
        self.until(
            "return [...document.querySelectorAll('#log > *')]"
            ".filter(line => line.textContent.includes(arguments[0])).length >= arguments[1]",
            text,
            count,
            timeout=timeout,
            what=f"{count} log line(s) with {text!r}",
        )

    def last_line(self):
        return self.js("return document.querySelector('#log').lastElementChild.textContent")

    def type(self, selector, text):
        """Type into a field as a user does, once it takes typing, Enter at the end."""
        self.until("return !document.querySelector(arguments[0]).disabled", selector, what=selector)
        self.browser.find(selector).send_keys(text + "\ue007")  # U+E007: WebDriver's Enter

    def send(self, text):
        self.type("#message", text)

    def click(self, selector):
        self.browser.switch(self.handle)
        self.browser.find(selector).click()

    def reload(self):
        self.browser.switch(self.handle)
        self.browser.refresh()


class Browser:
    """Firefox through Marionette or WebKitGTK through Selenium, behind one small interface."""

    def __init__(self, name, driver):
        self.name, self.driver = name, driver
        self.first = self.current = self.handles()[0]

    def handles(self):
        return self.driver.window_handles

    def switch(self, handle):
        if handle != self.current:
            if self.name == "firefox":
                self.driver.switch_to_window(handle)
            else:
                self.driver.switch_to.window(handle)
            self.current = handle

    def execute(self, script, args):
        if self.name == "firefox":
            return self.driver.execute_script(script, script_args=list(args))
        return self.driver.execute_script(script, *args)

    def find(self, selector):
        return self.driver.find_element("css selector", selector)

    def refresh(self):
        self.driver.refresh()

    def open(self, html, query):
        """A page from disk, as a double-click opens it, in a window of its own."""
        url = f"{(ROOT / html).as_uri()}?{query}" if query else html
        if self.name == "firefox":
            self.switch(self.driver.open(type="window")["handle"])
            self.driver.navigate(url)
        else:
            self.driver.switch_to.new_window("window")
            self.current = self.driver.current_window_handle
            self.driver.get(url)
        return Window(self, self.current)

    def restart_session(self, capabilities):
        """A new WebDriver session in the same browser, with other capabilities."""
        self.driver.delete_session()
        self.driver.start_session(capabilities)
        self.first = self.current = self.handles()[0]

    def close_windows(self):
        """Close every window but the first and blank it: no page left reconnecting."""
        for handle in self.handles():
            if handle != self.first:
                self.switch(handle)
                self.driver.close()
        self.current = None
        self.switch(self.first)
        Window(self, self.first).js("location.href = 'about:blank'")


def firefox_binary():
    mac = "/Applications/Firefox.app/Contents/MacOS/firefox"
    for path in (os.environ.get("FIREFOX", ""), "firefox-esr", "firefox", mac):
        if path and (found := shutil.which(path)):
            return found
    return None


def start_firefox(profile):
    binary = firefox_binary()
    if binary is None:
        missing(
            "no Firefox found: install it (Debian/Ubuntu: apt-get install firefox-esr) "
            "or point the FIREFOX environment variable at it",
            REQUIRED,
        )
    try:
        from marionette_driver.marionette import Marionette
    except ImportError:
        missing("marionette-driver is not installed: pip install -r requirements-dev.txt", REQUIRED)
    # port=0: a free port, so that two test runs never share a browser. The profile is new
    # and Marionette's own preferences keep Firefox from fetching updates or anything else;
    # in pytest's temporary folder, it is pytest that removes it.
    log = str(profile.parent / f"{profile.name}-gecko.log")  # not gecko.log in the project
    driver = Marionette(bin=binary, port=0, headless=True, profile=str(profile), gecko_log=log)
    driver.start_session({"acceptInsecureCerts": True})  # as if accepted once
    return driver


@pytest.fixture(scope="module")
def firefox(tmp_path_factory):
    driver = start_firefox(tmp_path_factory.mktemp("firefox"))
    yield Browser("firefox", driver)
    driver.cleanup()  # ends the session, Firefox and its profile


@pytest.fixture(scope="module")
def xvfb():
    """A virtual display for WebKitGTK, whose MiniBrowser has no headless mode."""
    if shutil.which("Xvfb") is None:
        missing("no Xvfb found: install it (Debian/Ubuntu: apt-get install xvfb)", REQUIRED)
    read, write = os.pipe()  # Xvfb picks a free display number and writes it here
    proc = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-nolisten", "tcp", "-screen", "0", "1280x1024x24"],
        pass_fds=[write],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    with os.fdopen(read) as pipe:
        display = pipe.readline().strip()
    assert display, "Xvfb did not start"
    yield f":{display}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def webkit(request):
    driver_path = shutil.which("WebKitWebDriver")
    if driver_path is None or not MINIBROWSER:
        missing(
            "no WebKitGTK found: install it (Debian/Ubuntu: apt-get install webkit2gtk-driver)",
            REQUIRED,
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.webkitgtk.options import Options
        from selenium.webdriver.webkitgtk.service import Service
    except ImportError:
        missing("selenium is not installed: pip install -r requirements-dev.txt", REQUIRED)
    display = request.getfixturevalue("xvfb")
    options = Options()
    options.binary_location = MINIBROWSER[0]
    options.add_argument("--automation")
    options.accept_insecure_certs = True  # as if the learner had accepted the certificate once
    service = Service(executable_path=driver_path, env={**os.environ, "DISPLAY": display})
    driver = webdriver.WebKitGTK(options=options, service=service)
    yield Browser("webkit", driver)
    driver.quit()


@pytest.fixture(scope="module", params=["firefox", "webkit"])
def engine(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def windows(engine):
    """The engine; every window a test opened is closed after it."""
    yield engine
    engine.close_windows()


@pytest.fixture(scope="module")
def servers():
    """run(name, *args): a script started once for the whole module, on a free port."""
    started = {}

    def run(name, *args):
        if (name, args) not in started:
            started[name, args] = Script(name, "--port", "0", *args)
        return started[name, args]

    yield run
    for script in started.values():
        script.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A certificate for localhost from a throwaway authority no browser trusts."""
    folder = tmp_path_factory.mktemp("pki")
    issued = trustme.CA().issue_cert("localhost", "127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(folder / "cert.pem")
    issued.private_key_pem.write_to_path(folder / "key.pem")
    return ["--certfile", str(folder / "cert.pem"), "--keyfile", str(folder / "key.pem")]


def round_trips(window):
    return re.findall(r"round trip ([^)]*)\)", window.js("return document.body.innerText"))


# The learner's scenario, in each engine


def test_echo_text_and_binary_with_an_honest_round_trip(windows, servers):
    script = servers("2_websocket_echo.py")
    page = windows.open("2_client_echo.html", f"url={script.url}")
    page.wait_state("open")
    page.send("hello from the engine")
    page.wait_lines("← hello from the engine")
    page.click("#binary")
    page.send("bytes")
    page.wait_lines("← binary, 5 bytes: bytes")
    assert page.lines("hello from the engine") == 2  # sent, then echoed: once each
    # Firefox and WebKit give performance.now() in whole milliseconds: no false decimal.
    step = """let step = Infinity, last = performance.now();
        for (let steps = 0; steps < 5; ) {
            const now = performance.now();
            if (now !== last) [step, last, steps] = [Math.min(step, now - last), now, steps + 1];
        }
        return step;"""
    coarse = page.js(step) >= 0.5  # WebKit: steps of 0.9999999999999964 ms, not 1
    for shown in round_trips(page):
        assert re.fullmatch(r"< 1 ms|\d+ ms" if coarse else r"\d+\.\d ms", shown), shown


def test_echo_a_message_over_the_limit_closes_1009_and_the_page_reconnects(windows, servers):
    script = servers("2_websocket_echo.py", "--quiet")
    page = windows.open("2_client_echo.html", f"url={script.url}")
    page.wait_state("open")
    mark = script.mark()
    page.js("document.querySelector('#message').value = 'x'.repeat(70000)")  # too long to type
    page.click("#send")
    page.wait_lines("(1009)")
    assert "64 KiB" in page.js("return document.querySelector('#log').innerText")  # the limit
    script.wait_for(r"disconnected: sent 1009", start=mark)
    script.wait_for(r"client #\d+ connected", start=mark)  # by itself
    page.wait_state("open")


def test_echo_page_survives_a_restart_and_a_kill(windows):
    script = Script("2_websocket_echo.py", "--port", "0")
    again = None
    try:
        page = windows.open("2_client_echo.html", f"url={script.url}")
        page.wait_state("open")
        assert script.stop() == 0  # Ctrl+C: the page hears 1001
        page.wait_lines("(1001)")
        again = Script("2_websocket_echo.py", "--port", str(script.port))
        again.wait_for(r"client #\d+ connected", timeout=SERVER)  # it came back by itself
        page.wait_state("open")
        page.send("back again")
        page.wait_lines("← back again")
        again.proc.kill()  # kill -9: no closing handshake at all
        page.wait_lines("(1006)")
    finally:
        for process in (script, again):
            if process and process.proc.poll() is None:
                process.proc.kill()
                process.wait()


def test_broadcast_chat_catch_up_reload_and_a_new_window(windows):
    script = Script("3_websocket_broadcast.py", "--port", "0")
    try:
        one = windows.open("3_client_broadcast.html", f"url={script.url}")
        two = windows.open("3_client_broadcast.html", f"url={script.url}")
        script.wait_for(r"client #\d+ connected", count=2)
        said = ["hello from one", "hello from two"]
        one.send(said[0])
        two.send(said[1])
        for window in (one, two):
            for text in said:
                window.wait_lines(text)

        # Disconnect, miss three messages, Connect: they arrive, each once.
        mark = script.mark()
        one.click("#connect")
        script.wait_for("disconnected", start=mark)
        missed = [f"missed {n}" for n in (1, 2, 3)]
        for text in missed:
            two.send(text)
        for text in missed:
            two.wait_lines(text)
        one.click("#connect")
        script.wait_for(r"client #\d+ connected", start=mark)
        said += missed
        for text in said:
            one.wait_lines(text)

        # A reload shows again what the tab showed, then what it missed meanwhile.
        mark = script.mark()
        one.reload()
        script.wait_for(r"client #\d+ connected", start=mark)
        two.send("after the reload")
        said.append("after the reload")
        for text in said:
            one.wait_lines(text)

        # A new window, its own session, gets the recent messages.
        three = windows.open("3_client_broadcast.html", f"url={script.url}")
        for text in said:
            three.wait_lines(text)
        three.send("hello from three")
        said.append("hello from three")
        for window in (one, two, three):
            for text in said:
                window.wait_lines(text)
        for window in (one, two, three):  # every message once in every window, at the end
            assert {text: window.lines(text) for text in said} == dict.fromkeys(said, 1)
    finally:
        script.stop()


def test_secure_token_flow_over_wss(windows, pki):
    script = Script("4_websocket_secure.py", "--port", "0", *pki)
    try:
        address = script.wait_for(OPEN_LINE).group(1)  # the address it prints, token in it
        page = windows.open(address, None)
        page.wait_state("open")
        query = parse_qs(urlsplit(page.js("return location.href")).query)
        assert query == {"url": [script.url]}  # the token out of the address, the server in
        page.send("hello over TLS")
        page.wait_lines("← hello over TLS")
        page.reload()  # the token was read once: a reload asks for it, for the same server
        page.until(
            "const status = document.querySelector('#status');"
            "return status.dataset.state === 'closed' && /token/i.test(status.textContent)",
            what="the page asks for the token",
        )
        assert page.js("return document.querySelector('#url').value") == script.url
        token = parse_qs(urlsplit(address).query)["token"][0]
        page.type("#token", token)
        page.wait_state("open")
        page.send("hello again")
        page.wait_lines("← hello again")
        script.wait_for(r"client #\d+ connected", count=2)
    finally:
        script.stop()


# What differed between engines


PAGES = ["2_client_echo.html", "3_client_broadcast.html", "4_client_secure.html"]


def test_an_untrusted_certificate_is_said_in_plain_words_in_firefox(firefox, pki):
    """Firefox closes with 1015 when it does not trust the certificate (the others say 1006,
    as for a server that is not running: the secure page says what to do in both cases)."""
    script = Script("4_websocket_secure.py", "--port", "0", "--token", "secret", *pki)
    firefox.restart_session({"acceptInsecureCerts": False})  # as before the learner accepts it
    try:
        site = f"https://localhost:{script.port}/"
        for html in PAGES:
            page = firefox.open(html, f"url={script.url}&token=secret")
            page.wait_lines("(1015)")
            assert "certificate" in page.last_line() and site in page.last_line()
            status = page.js("return document.querySelector('#status').textContent")
            assert site in status
        assert "connected" not in script.text()
    finally:
        firefox.close_windows()
        firefox.restart_session({"acceptInsecureCerts": True})
        script.stop()


# The same differences, emulated in Chromium: Playwright changes a page before it runs.


def coarse_clock(offset):
    """performance.now() in steps of a millisecond, as Firefox and WebKit give it: on whole
    numbers, or (WebKit, at times) off them by a fraction."""

    def install(page):
        page.add_init_script(
            "const now = performance.now.bind(performance);"
            f"performance.now = () => Math.floor(now()) + {offset};"
        )

    return install


def chromium_page(start, open_file, html, before, viewport=None):
    """A page in Chromium against its script (demo 4 on ws://, with a token)."""
    if html == "2_client_echo.html":
        script = start("2_websocket_echo.py")
        query = f"url={script.url}"
    else:
        script = start("4_websocket_secure.py", "--token", "secret")
        query = f"url={script.url}&token=secret"
    page = open_file(html, query, viewport, before)
    expect(page.locator("#status")).to_have_attribute("data-state", "open", timeout=MS)
    return script, page


@pytest.mark.parametrize("offset", [0, 0.5], ids=["whole", "off-whole"])
@pytest.mark.parametrize("html", [PAGES[0], PAGES[2]])
def test_a_clock_in_whole_milliseconds_shows_whole_milliseconds(start, open_file, html, offset):
    _, page = chromium_page(start, open_file, html, coarse_clock(offset))
    for n in range(3):
        page.fill("#message", f"tick {n}")
        page.press("#message", "Enter")
        expect(page.locator("#log .received")).to_have_count(n + 1, timeout=MS)
    for line in page.locator("#log .received").all_text_contents():
        assert re.search(r"\(round trip (< 1|[1-9]\d*) ms\)$", line), line


def test_the_secure_page_keeps_its_server_address_where_urlsearchparams_has_no_size(
    start, open_file
):
    def no_size(page):  # as in WebKit 2.38, Safari 16, Firefox 111
        page.add_init_script("delete URLSearchParams.prototype.size;")

    script, page = chromium_page(start, open_file, PAGES[2], no_size)
    assert page.evaluate("new URLSearchParams('a=1').size") is None
    query = parse_qs(urlsplit(page.url).query)
    assert query == {"url": [script.url]}  # the token gone, the server's address kept


@pytest.mark.parametrize("html", [PAGES[0], PAGES[2]])
def test_the_message_placeholder_fits_at_phone_width(start, open_file, html):
    phone = {"width": 360, "height": 640}
    _, page = chromium_page(start, open_file, html, None, phone)
    room, needed = page.evaluate(
        """() => {
            const field = document.querySelector("#message");
            const style = getComputedStyle(field);
            const text = document.createElement("canvas").getContext("2d");
            text.font = style.font;
            const padding = parseFloat(style.paddingLeft) + parseFloat(style.paddingRight);
            return [field.clientWidth - padding, text.measureText(field.placeholder).width];
        }"""
    )
    assert needed <= room, f"the placeholder needs {needed:.0f} px and has {room:.0f}"
