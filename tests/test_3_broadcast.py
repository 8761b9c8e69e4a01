"""3_websocket_broadcast.py: the protocol table in the README, event by event."""

import asyncio
import json

import pytest
from conftest import Script, assert_clean, client

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
        assert json.loads(await one.recv()) == {
            "type": "welcome",
            "client": 1,
            "clients": 1,
            "history": [],
            "recovered": False,
        }
        assert await next_event(one, "presence") == {
            "type": "presence",
            "clients": 1,
            "joined": [1],
            "left": [],
        }
        async with client(script.url) as two:
            welcome = json.loads(await two.recv())
            assert (welcome["type"], welcome["client"], welcome["clients"]) == ("welcome", 2, 2)
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
        received = [await next_event(ws, "message") for ws in (one, two, three)]
        assert received[0] == received[1] == received[2]
        assert received[0] | {"id": None} == {
            "type": "message",
            "id": None,
            "client": 3,
            "text": "hello, everyone",
        }
        assert isinstance(received[0]["id"], str) and received[0]["id"]
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
        assert (await next_event(sender, "message"))["text"] == text


# History and catch-up


async def say(url, *texts):
    """Send messages from a client of their own; return the message events, as delivered."""
    async with client(url) as ws:
        for text in texts:
            await ws.send(text)
        return [await next_event(ws, "message") for _ in texts]


async def drain(ws):
    async for _ in ws:
        pass


async def welcome(url):
    async with client(url) as ws:
        return json.loads(await ws.recv())


async def test_message_ids_are_unique_and_increase_in_the_order_delivered(start):
    script = start(SCRIPT)
    events = await say(script.url, *(f"m{i}" for i in range(30)))
    ids = [event["id"] for event in events]
    assert len(set(ids)) == 30
    # Opaque to clients; the server's ids happen to be "first-second" numbers.
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))


async def test_a_newcomer_gets_the_20_latest_messages_oldest_first(start):
    script = start(SCRIPT)
    assert (await welcome(script.url))["history"] == []
    sent = await say(script.url, *(f"m{i}" for i in range(25)))
    hello = await welcome(script.url)
    assert hello["history"] == sent[-20:]
    assert hello["recovered"] is False


async def test_since_returns_exactly_what_was_missed(start):
    script = start(SCRIPT)
    seen = await say(script.url, "before 1", "before 2")
    missed = await say(script.url, *(f"while away {i}" for i in range(30)))
    hello = await welcome(f"{script.url}/?since={seen[-1]['id']}")
    assert hello["recovered"] is True
    assert hello["history"] == missed  # all 30: more than a newcomer gets, none twice
    up_to_date = await welcome(f"{script.url}/?since={missed[-1]['id']}")
    assert (up_to_date["history"], up_to_date["recovered"]) == ([], True)


@pytest.mark.parametrize("since", ["nonsense", "", "1-2-3", "99999999999999-1", "%00", "x" * 5000])
async def test_an_unknown_since_gets_the_latest_and_recovered_false(start, since):
    script = start(SCRIPT)
    sent = await say(script.url, "one", "two")
    hello = await welcome(f"{script.url}/?since={since}")
    assert (hello["history"], hello["recovered"]) == (sent, False)
    assert_clean(script)


async def test_history_wraps_and_then_says_it_cannot_recover(start):
    script = start(SCRIPT, "--history", "5")
    first = await say(script.url, *(f"m{i}" for i in range(8)))
    hello = await welcome(f"{script.url}/?since={first[1]['id']}")  # m2 was forgotten
    assert hello["recovered"] is False and hello["history"] == first[-5:]
    hello = await welcome(f"{script.url}/?since={first[2]['id']}")  # m3 on are all here
    assert hello["recovered"] is True and hello["history"] == first[3:]


async def test_history_0_keeps_nothing_but_knows_the_latest_id(start):
    script = start(SCRIPT, "--history", "0")
    sent = await say(script.url, "one", "two")
    assert (await welcome(script.url))["history"] == []
    hello = await welcome(f"{script.url}/?since={sent[-1]['id']}")
    assert (hello["history"], hello["recovered"]) == ([], True)
    hello = await welcome(f"{script.url}/?since={sent[0]['id']}")
    assert (hello["history"], hello["recovered"]) == ([], False)


async def test_after_a_restart_old_ids_are_not_recovered(start):
    first = start(SCRIPT)
    sent = await say(first.url, "before the restart")
    assert await asyncio.to_thread(first.stop) == 0
    again = start(SCRIPT, port=str(first.port))
    hello = await welcome(f"{again.url}/?since={sent[0]['id']}")
    assert (hello["history"], hello["recovered"]) == ([], False)
    assert (await say(again.url, "after"))[0]["id"] != sent[0]["id"]


async def test_under_traffic_every_message_arrives_once_across_reconnects(start):
    """A talker talks all the time; a reader keeps leaving and coming back with ?since=."""
    script = start(SCRIPT, "--history", "1000")
    async with client(script.url) as talker:
        draining = asyncio.create_task(drain(talker))  # a client that never reads stalls
        sent, stop, said = 0, asyncio.Event(), asyncio.Event()

        async def talk():
            nonlocal sent
            while not stop.is_set():
                await talker.send(str(sent))
                sent += 1
                said.set()
                await asyncio.sleep(0.002)  # about 400 a second

        talking = asyncio.create_task(talk())
        got, last, caught_up = [], None, 0
        for _ in range(15):
            url = script.url if last is None else f"{script.url}/?since={last}"
            # max_queue=None: what it leaves unread must not hold up its closing handshake.
            async with client(url, max_queue=None) as reader:
                hello = json.loads(await reader.recv())
                assert hello["type"] == "welcome"  # first, however busy the server is
                assert last is None or hello["recovered"] is True
                missed = hello["history"] if last is not None else []
                live = [await next_event(reader, "message") for _ in range(5)]
            caught_up += bool(missed)
            got += [int(event["text"]) for event in missed + live]
            last = live[-1]["id"]
            away_from = sent
            while sent < away_from + 3:  # stay away while the talker says a few more
                said.clear()
                await said.wait()
        stop.set()
        await talking
        hello = await welcome(f"{script.url}/?since={last}")  # and what came after
        got += [int(event["text"]) for event in hello["history"]]
        draining.cancel()
    assert got == list(range(got[0], sent)), "a message was lost or repeated"
    assert caught_up == 14  # each return found something it had missed


def test_a_negative_history_is_one_sentence():
    script = Script(SCRIPT, "--history", "-1", wait_ready=False)
    assert script.wait() == 2
    assert (
        script.text("stderr").splitlines()[-1].endswith("--history must be 0 (off) or more, not -1")
    )
