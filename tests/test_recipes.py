"""Every recipe of docs/recipes.md is a real file, started and talked to here."""

import ast
import asyncio
import itertools
import re
import runpy
import signal
import subprocess
import sys
from urllib.parse import quote

import pytest
from conftest import ROOT, Listener, assert_clean
from websockets.frames import CloseCode

MARKER = "# --- Start-up, flags and safety checks:"
RECIPES = ["recipes/nickname.py", "recipes/dashboard.py"]
PAGE = (ROOT / "docs" / "recipes.md").read_text()


def message_promise(event):
    """What the README's protocol table promises of a message event; more fields may come."""
    assert event["type"] == "message"
    assert isinstance(event["id"], str) and isinstance(event["text"], str)
    assert isinstance(event["client"], int) and isinstance(event["time"], int)


async def names_heard(speakers, hearers):
    """Each speaker says something; return, for each hearer, {(client, text): name}."""
    await Listener.until(lambda: all(h.of("welcome") for h in speakers + hearers))
    for n, speaker in enumerate(speakers):
        await speaker.ws.send(f"hello {n}")
    count = len(speakers)
    await Listener.until(lambda: all(len(h.of("message")) >= count for h in hearers))
    for hearer in hearers:
        for event in hearer.of("message"):
            message_promise(event)
    return [{(e["client"], e["text"]): e["name"] for e in h.of("message")} for h in hearers]


def number(listener):
    return listener.of("welcome")[0]["client"]


async def test_nickname_puts_the_name_on_every_message(start):
    script = start("recipes/nickname.py")
    # Stripped, at most 30 characters, plain text as it was typed (the page uses textContent).
    names = {"Ada": "Ada", " <b>Bob</b> ": "<b>Bob</b>", "x" * 40: "x" * 30, None: "anonymous"}
    people, expected = [], {}
    for n, (given, name) in enumerate(names.items()):
        query = "" if given is None else f"?name={quote(given)}"
        person = await Listener.connect(f"{script.url}/{query}", user=n + 1)
        await Listener.until(lambda person=person: person.of("welcome"))
        people.append(person)
        expected[(number(person), f"hello {n}")] = name
    heard = await names_heard(people, people)
    assert all(h == expected for h in heard), heard
    newcomer = await Listener.connect(script.url, user=len(people) + 1)  # and in the history
    await Listener.until(lambda: newcomer.of("welcome"))
    history = newcomer.of("welcome")[0]["history"]
    assert {(m["client"], m["text"]): m["name"] for m in history} == expected
    assert_clean(script)


async def test_nickname_goes_through_redis_to_the_other_process(start, redis_server, monkeypatch):
    monkeypatch.delenv("SCRIPT_PYTHON", raising=False)  # --redis needs 3.11, and says so
    one = start("recipes/nickname.py", "--redis", redis_server.url)
    two = start("recipes/nickname.py", "--redis", redis_server.url)
    ada = await Listener.connect(f"{one.url}/?name=Ada", user=1)
    bob = await Listener.connect(f"{two.url}/?name=Bob", user=2)
    heard = await names_heard([ada, bob], [ada, bob])
    expected = {(number(ada), "hello 0"): "Ada", (number(bob), "hello 1"): "Bob"}
    assert heard == [expected, expected]
    newcomer = await Listener.connect(two.url, user=3)  # and in the history, from the stream
    await Listener.until(lambda: newcomer.of("welcome"))
    assert sorted(m["name"] for m in newcomer.of("welcome")[0]["history"]) == ["Ada", "Bob"]
    for script in (one, two):
        assert_clean(script)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_dashboard_pushes_unasked_every_second_and_stops_cleanly(start, sig):
    script = start("recipes/dashboard.py")
    watcher = await Listener.connect(script.url, user=1)
    await Listener.until(lambda: len(watcher.of("load")) >= 2, timeout=10)  # sending nothing
    assert watcher.events[0][1]["type"] == "welcome" and number(watcher) == 1
    loads = watcher.of("load")
    for event in loads:
        assert isinstance(event["load"], float) and event["load"] >= 0  # Linux and macOS
        assert isinstance(event["time"], int) and event["clients"] == 1
    gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(loads)]
    assert all(900 <= gap <= 3000 for gap in gaps), gaps  # --every 1: a second apart
    await watcher.ws.send("anyone there?")  # it is read, and answered
    await Listener.until(lambda: watcher.of("error"))
    assert watcher.of("error")[0]["reason"] == "this feed only speaks"
    script.proc.send_signal(sig)
    assert await asyncio.to_thread(script.wait, 10) == 0
    await asyncio.wait_for(watcher.task, 10)
    # Ctrl+C: 1001, going away; SIGTERM, from a service manager: 1012, service restart.
    restart = sig == signal.SIGTERM
    assert watcher.ws.close_code == (CloseCode.SERVICE_RESTART if restart else CloseCode.GOING_AWAY)
    assert "Server stopped. Goodbye!" in script.text("stdout")
    assert_clean(script)


# Windows: no os.getloadavg(), no add_signal_handler(); Ctrl+C arrives otherwise.
AS_ON_WINDOWS = """
import asyncio, os, runpy, sys
def add_signal_handler(self, sig, callback, *args):
    raise NotImplementedError
asyncio.SelectorEventLoop.add_signal_handler = add_signal_handler
del os.getloadavg
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""
# A reading that fails twice, then works: as a database that is away for a moment.
FAILING_TWICE = """
import os, runpy, sys
real, calls = os.getloadavg, []
def getloadavg():
    calls.append(None)
    if len(calls) <= 2:
        raise OSError("load average unobtainable")
    return real()
os.getloadavg = getloadavg
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""


async def test_dashboard_on_windows_pushes_no_load_and_stops_on_ctrl_c(start):
    script = start("recipes/dashboard.py", "--every", "0.2", code=AS_ON_WINDOWS)
    watcher = await Listener.connect(script.url, user=1)
    await Listener.until(lambda: len(watcher.of("load")) >= 2, timeout=10)
    assert all(event["load"] is None for event in watcher.of("load"))
    script.proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(script.wait, 10) == 0
    await asyncio.wait_for(watcher.task, 10)
    assert watcher.ws.close_code == CloseCode.GOING_AWAY
    assert_clean(script)


async def test_dashboard_goes_on_after_a_reading_fails(start):
    script = start("recipes/dashboard.py", "--every", "0.2", code=FAILING_TWICE)
    watcher = await Listener.connect(script.url, user=1)
    await Listener.until(lambda: len(watcher.of("load")) >= 2, timeout=10)
    assert all(isinstance(event["load"], float) for event in watcher.of("load"))
    said = re.findall(
        r"no reading this time: OSError\('load average unobtainable'\)", script.text()
    )
    assert len(said) == 1, script.text()  # two failures, one line: once every 10 s at most
    assert await asyncio.to_thread(script.stop) == 0
    assert_clean(script)


def test_dashboard_every_must_be_a_sensible_number(start):
    script = start("recipes/dashboard.py", "--every", "0", wait_ready=False)
    assert script.wait(10) == 2
    assert "--every: must be from 0.1 to 3600 seconds, not 0" in script.text()


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_recipe_changes_nothing_below_the_marker(recipe):
    """A copy that keeps the start-up: the same lines as script 3's, byte for byte."""
    theirs = (ROOT / "3_websocket_broadcast.py").read_text()
    mine = (ROOT / recipe).read_text()
    assert mine[mine.index(MARKER) :] == theirs[theirs.index(MARKER) :]


def test_every_excerpt_on_the_page_is_in_the_function_it_names():
    excerpts = re.findall(
        r"^From `(recipes/\w+\.py)`, in `(\w+)\(\)`:\n\n```python\n(.*?)```", PAGE, re.M | re.S
    )
    assert len(excerpts) == PAGE.count("```python"), "each Python block says where it is from"
    assert len(excerpts) >= 5
    for path, name, code in excerpts:
        shown = function_text((ROOT / path).read_text(), name)
        assert code in shown, f"docs/recipes.md shows {name}() of {path} otherwise"


def function_text(source, name):
    """The text of the function `name` in a module's source, its decorators included."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            return "".join(source.splitlines(keepends=True)[first - 1 : node.end_lineno])
    raise AssertionError(f"no function {name}()")


def test_the_limits_table_says_what_script_3_does():
    """Each flag's default (as --help says it), each constant, each sentence a client sees."""
    path = ROOT / "3_websocket_broadcast.py"
    source, names = path.read_text(), runpy.run_path(str(path))  # not __main__: nothing runs
    shown = subprocess.run(
        [sys.executable, str(path), "--help"], capture_output=True, text=True, check=True
    ).stdout
    table = PAGE.split("## Change a limit", 1)[1]
    rows = [row.split(" | ")[1:3] for row in table.splitlines() if row.startswith("| ")][1:]
    units, checked = {"": 1, " KiB": 1024, " MiB": 1024 * 1024}, []
    for where, sees in rows:
        for flag, value in re.findall(r"`(--[\w-]+)` \(([\d,]+)", where):
            default = re.search(rf"^  {flag} .*?\(default: (\d+)", shown, re.M | re.S)
            assert int(value.replace(",", "")) == int(default.group(1)), flag
            checked.append(flag)
        for name, value, unit in re.findall(
            r"`(\w+)`(?: in `SETTINGS`)? \(([\d,]+)( [KM]iB)?", where
        ):
            actual = names["SETTINGS"][name] if name in names["SETTINGS"] else names[name]
            assert int(value.replace(",", "")) * units[unit] == actual, name
            checked.append(name)
        for name, rate, burst in re.findall(r"`(\w+)`: `Limit\((\d+), (\d+)\)`", where):
            assert (names[name].rate, names[name].burst) == (int(rate), int(burst)), name
            checked.append(name)
        for sentence in re.findall(r'"([^"]+)"', sees):  # up to its first number, if any
            assert re.match(r"\D*", sentence).group(0) in source, sentence
            checked.append(sentence)
    assert len(checked) >= 18, checked  # the table was read, not skipped
