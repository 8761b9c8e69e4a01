"""Every recipe of docs/recipes.md is a real file, started and talked to here."""

import asyncio
import itertools
import json
import re
import signal
import time

import pytest
from conftest import ROOT, Listener, assert_clean, client

MARKER = "# --- Start-up, flags and safety checks:"
RECIPES = ["recipes/nickname.py", "recipes/dashboard.py"]


def message_promise(event):
    """What the README's protocol table promises of a message event; more fields may come."""
    assert event["type"] == "message"
    assert isinstance(event["id"], str) and isinstance(event["text"], str)
    assert isinstance(event["client"], int) and isinstance(event["time"], int)


async def say_and_hear(speakers, hearers):
    """Each speaker says something; return what every hearer got: (name, text) in order."""
    for n, speaker in enumerate(speakers):
        await speaker.ws.send(f"hello {n}")
    count = len(speakers)
    await Listener.until(lambda: all(len(h.of("message")) == count for h in hearers))
    for hearer in hearers:
        for event in hearer.of("message"):
            message_promise(event)
    return [[(e["name"], e["text"]) for e in h.of("message")] for h in hearers]


async def test_nickname_puts_the_name_on_every_message(start):
    script = start("recipes/nickname.py")
    ada = await Listener.connect(f"{script.url}/?name=Ada", user=1)
    bob = await Listener.connect(f"{script.url}/?name=%20%3Cb%3EBob%3C/b%3E%20", user=2)
    nobody = await Listener.connect(script.url, user=3)
    heard = await say_and_hear([ada, bob, nobody], [ada, bob, nobody])
    expected = [("Ada", "hello 0"), ("<b>Bob</b>", "hello 1"), ("anonymous", "hello 2")]
    assert all(sorted(h) == sorted(expected) for h in heard)  # plain text, as it was typed
    assert_clean(script)


async def test_nickname_goes_through_redis_to_the_other_process(start, redis_server):
    one = start("recipes/nickname.py", "--redis", redis_server.url)
    two = start("recipes/nickname.py", "--redis", redis_server.url)
    ada = await Listener.connect(f"{one.url}/?name=Ada", user=1)
    bob = await Listener.connect(f"{two.url}/?name=Bob", user=2)
    await Listener.until(lambda: ada.of("welcome") and bob.of("welcome"))
    heard = await say_and_hear([ada, bob], [ada, bob])
    assert heard[0] == heard[1] and sorted(heard[0]) == [("Ada", "hello 0"), ("Bob", "hello 1")]
    async with client(two.url, user=3) as newcomer:  # and in the history, from the stream
        history = json.loads(await newcomer.recv())["history"]
        assert sorted(m["name"] for m in history) == ["Ada", "Bob"]
    for s in (one, two):
        assert_clean(s)


async def test_dashboard_pushes_unasked_every_second_and_stops_cleanly(start):
    script = start("recipes/dashboard.py")
    watcher = await Listener.connect(script.url, user=1)
    await Listener.until(lambda: len(watcher.of("load")) >= 3, timeout=10)
    loads = watcher.of("load")
    assert watcher.of("welcome")[0]["client"] == 1
    assert all(isinstance(e["time"], int) and e["clients"] == 1 for e in loads)
    gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(loads)]
    assert all(500 <= gap <= 5000 for gap in gaps), gaps  # --every 1: a second apart, give or take
    await watcher.ws.send("anyone there?")
    await Listener.until(lambda: watcher.of("error"))
    assert watcher.of("error")[0]["reason"] == "this feed only speaks"
    t0 = time.monotonic()
    script.proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(script.wait, 10) == 0
    assert time.monotonic() - t0 < 5
    assert "Goodbye" in script.text("stdout")
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


def test_every_excerpt_in_the_recipes_page_is_in_its_file():
    page = (ROOT / "docs" / "recipes.md").read_text()
    blocks = re.findall(r"From `(recipes/\w+\.py)`[^\n]*\n+```python\n(.*?)```", page, re.S)
    assert len(blocks) >= 3, "the page shows its code from the files"
    for path, code in blocks:
        source = (ROOT / path).read_text()
        for line in code.splitlines():
            assert line in source, f"docs/recipes.md shows a line {path} lacks: {line!r}"
