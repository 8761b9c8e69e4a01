"""3_websocket_broadcast.py: the protocol table in the README, event by event."""

import asyncio
import json

import pytest
from conftest import assert_clean, client

SCRIPT = "3_websocket_broadcast.py"


async def next_event(ws, kind, timeout=10):
    """The next event of one type, skipping the others."""
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if event["type"] == kind:
            return event


async def test_welcome_then_presence_for_each_arrival_and_departure(start):
    script = start(SCRIPT)
    async with client(script.url) as one:
        assert json.loads(await one.recv()) == {"type": "welcome", "client": 1, "clients": 1}
        assert await next_event(one, "presence") == {
            "type": "presence",
            "clients": 1,
            "joined": [1],
            "left": [],
        }
        async with client(script.url) as two:
            assert json.loads(await two.recv()) == {"type": "welcome", "client": 2, "clients": 2}
            expected = {"type": "presence", "clients": 2, "joined": [2], "left": []}
            assert await next_event(one, "presence") == expected
            assert await next_event(two, "presence") == expected
        assert await next_event(one, "presence") == {
            "type": "presence",
            "clients": 1,
            "joined": [],
            "left": [2],
        }


async def test_presence_is_batched(start):
    script = start(SCRIPT)
    async with client(script.url) as watcher:
        await next_event(watcher, "presence")
        others = [await client(script.url) for _ in range(20)]
        joined = []
        while len(joined) < 20:
            joined += (await next_event(watcher, "presence"))["joined"]
        assert sorted(joined) == list(range(2, 22))
        for ws in others:
            await ws.close()


async def test_message_reaches_everyone_with_its_sender(start):
    script = start(SCRIPT)
    async with client(script.url) as one, client(script.url) as two, client(script.url) as three:
        await three.send("hello, everyone")
        expected = {"type": "message", "client": 3, "text": "hello, everyone"}
        for ws in (one, two, three):
            assert await next_event(ws, "message") == expected
    await script.until(r"client #3 to 3 clients: 'hello, everyone'")


@pytest.mark.parametrize(
    "message, reason",
    [
        (b"binary", "binary messages are not supported"),
        ("", "empty message"),
        (" \t\n ", "empty message"),
        ("x" * 1001, "message too long: 1001 characters, the limit is 1000"),
    ],
)
async def test_bad_messages_get_an_error_and_the_sender_stays(start, message, reason):
    script = start(SCRIPT)
    async with client(script.url) as sender, client(script.url) as other:
        await sender.send(message)
        error = await next_event(sender, "error")
        assert set(error) == {"type", "reason"} and reason in error["reason"]
        await sender.send("x" * 1000)  # still connected; exactly the limit is fine
        assert (await next_event(other, "message"))["text"] == "x" * 1000
        assert (await next_event(sender, "message"))["text"] == "x" * 1000
    assert_clean(script)


@pytest.mark.parametrize(
    "text",
    ['{"type": "welcome", "client": 99}', "<img src=x onerror=alert(1)>", "é \u2028 \\n \"'"],
)
async def test_json_and_html_are_relayed_as_literal_text(start, text):
    script = start(SCRIPT)
    async with client(script.url) as sender:
        await sender.send(text)
        assert await next_event(sender, "message") == {"type": "message", "client": 1, "text": text}
