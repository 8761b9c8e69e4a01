"""3_websocket_broadcast.py: the protocol table in the README, event by event."""

import asyncio
import http.client
import json
import re
import time

import pytest
from conftest import Script, assert_clean, client
from websockets.exceptions import ConnectionClosed, InvalidStatus

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
        welcome = json.loads(await one.recv())
        assert welcome == {
            "type": "welcome",
            "client": 1,
            "clients": 1,
            "history": [],
            "recovered": False,
            "latest": welcome["latest"],  # where the conversation stands: before any message
        }
        assert re.fullmatch(r"\d+-0", welcome["latest"])
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
        others = [await client(script.url, user=i) for i in range(20)]
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
        assert received[0] | {"id": None, "time": None} == {
            "type": "message",
            "id": None,
            "client": 3,
            "text": "hello, everyone",
            "time": None,
        }
        assert isinstance(received[0]["id"], str) and received[0]["id"]
        # When it was said, in milliseconds since 1970 (JavaScript's Date.now()).
        assert abs(received[0]["time"] - time.time() * 1000) < 10_000
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
        assert isinstance(error["reason"], str) and reason in error["reason"]  # other fields: open
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


async def welcome(url, user=None):
    async with client(url, user=user) as ws:
        return json.loads(await ws.recv())


async def test_message_ids_are_unique_and_increase_in_the_order_delivered(start):
    script = start(SCRIPT, "--rate", "0")
    events = await say(script.url, *(f"m{i}" for i in range(30)))
    ids = [event["id"] for event in events]
    assert len(set(ids)) == 30
    # Opaque to clients; the server's ids happen to be "first-second" numbers.
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))


async def test_a_newcomer_gets_the_20_latest_messages_oldest_first(start):
    script = start(SCRIPT, "--rate", "0")
    assert (await welcome(script.url))["history"] == []
    sent = await say(script.url, *(f"m{i}" for i in range(25)))
    hello = await welcome(script.url)
    assert hello["history"] == sent[-20:]
    assert hello["recovered"] is False


async def test_since_returns_exactly_what_was_missed(start):
    script = start(SCRIPT, "--rate", "0")
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
    script = start(SCRIPT, "--history", "1000", "--rate", "0")
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


async def test_a_window_that_saw_nothing_comes_back_to_everything_it_missed(start):
    """The welcome says where the conversation stands, even before the first message."""
    script = start(SCRIPT, "--rate", "0")
    latest = (await welcome(script.url))["latest"]  # it saw no message: still a place to stand
    missed = await say(script.url, *(f"while away {i}" for i in range(30)))
    hello = await welcome(f"{script.url}/?since={latest}")
    assert hello["recovered"] is True and hello["history"] == missed  # all 30, not 20
    assert hello["latest"] == missed[-1]["id"]


async def test_json_is_utf_8_and_a_welcome_of_emoji_fits_a_default_client(start):
    script = start(SCRIPT, "--rate", "0")
    emoji = "\N{GRINNING FACE}" * 1000
    async with client(script.url, max_size=None) as talker:
        for _ in range(100):
            await talker.send(emoji)
        raw = [await talker.recv() for _ in range(102)]  # welcome, presence, 100 messages
    frame = next(m for m in raw if '"message"' in m)
    assert emoji in frame and "\\ud83d" not in frame  # 4 bytes an emoji, not a 12-byte escape
    # A client with websockets' default max_size (1 MiB) gets its welcome, history and all.
    first = next(json.loads(m) for m in raw if '"message"' in m)
    async with client(f"{script.url}/?since={first['id']}") as returning:
        hello = json.loads(await returning.recv())
    assert len(hello["history"]) == 99 and hello["recovered"] is True
    async with client(script.url) as newcomer:  # and the latest 20, as always
        assert len(json.loads(await newcomer.recv())["history"]) == 20


async def test_the_welcome_history_is_bounded_in_bytes_and_says_so(start):
    """With a long --history, the server keeps at most 512 KiB: every welcome fits 1 MiB."""
    script = start(SCRIPT, "--history", "1000", "--rate", "0")
    emoji = "\N{GRINNING FACE}" * 1000  # about 4 KB a message
    first = (await say(script.url, "before"))[0]
    async with client(script.url, max_size=None) as talker:
        for _ in range(200):  # about 800 KB of messages
            await talker.send(emoji)
        said = [await next_event(talker, "message") for _ in range(200)]
    async with client(f"{script.url}/?since={first['id']}") as returning:
        hello = json.loads(await returning.recv())
    assert hello["recovered"] is False and hello["history"] == said[-20:]  # "before" is gone
    # The oldest that is still held: a welcome from there is the largest there can be.
    # Each from an address of its own: 200 reconnects from one address would be refused.
    held = [
        m
        for i, m in enumerate(said)
        if (await welcome(f"{script.url}/?since={m['id']}", i))["recovered"]
    ]
    assert 100 < len(held) < 200
    async with client(f"{script.url}/?since={held[0]['id']}") as returning:  # 1 MiB max_size
        raw = await returning.recv()
    assert len(raw.encode()) < 513 * 1024 and json.loads(raw)["history"] == held[1:]


@pytest.mark.parametrize("rate, burst", [(None, 10), ("2", 4)])
async def test_a_fast_sender_is_told_to_slow_down_and_stays(start, rate, burst):
    script = start(SCRIPT, *(["--rate", rate] if rate else []))
    per_second = int(rate or 5)
    async with client(script.url) as sender, client(script.url) as reader:
        for i in range(burst + 3):  # a burst, back to back
            await sender.send(f"m{i}")
        texts, errors = [], []
        while len(texts) + len(errors) < burst + 3:
            event = json.loads(await asyncio.wait_for(sender.recv(), 10))
            if event["type"] == "message":
                texts.append(event["text"])
            elif event["type"] == "error":
                errors.append(event["reason"])
        assert texts == [f"m{i}" for i in range(burst)]  # the burst goes through, in order
        assert errors == [f"too many messages: at most {per_second} a second"] * 3
        relayed = [(await next_event(reader, "message"))["text"] for _ in range(burst)]
        assert relayed == texts
        await asyncio.sleep(1.1 / per_second)  # a token comes back: it may talk again
        await sender.send("later")
        assert (await next_event(reader, "message"))["text"] == "later"
    assert "disconnected a client" not in script.text()  # a few refusals are no offence
    assert_clean(script)


async def test_a_client_that_keeps_flooding_is_closed_with_1008_and_logged_once(start):
    script = start(SCRIPT)
    async with client(script.url) as flooder, client(script.url) as reader:
        with pytest.raises(ConnectionClosed):
            for _ in range(1000):
                await flooder.send("spam")
                await asyncio.sleep(0)
            await asyncio.wait_for(drain(flooder), 10)
            await flooder.recv()
        assert (flooder.close_code, flooder.close_reason) == (1008, "too many messages")
        assert reader.state.name == "OPEN"  # the others stay
    await script.until(r"client #1 disconnected: sent 1008 \(policy violation\) too many messages")
    assert script.text().count("from 127.0.0.1: too many messages") == 1
    assert_clean(script)


async def test_presence_past_20_arrivals_is_a_count(start):
    script = start(SCRIPT)
    async with client(script.url) as watcher:
        await next_event(watcher, "presence")
        others = await asyncio.gather(*(client(script.url, user=i) for i in range(30)))
        joined = []
        while sum(n if isinstance(n, int) else len(n) for n in joined) < 30:
            joined.append((await next_event(watcher, "presence"))["joined"])
        assert any(isinstance(n, int) and n > 20 for n in joined), joined  # "37 joined"
        assert all(isinstance(n, int) or len(n) <= 20 for n in joined), joined
        for ws in others:
            await ws.close()


async def test_x_real_ip_is_logged_from_this_machine_only(start):
    script = start(SCRIPT)
    async with client(script.url, additional_headers={"X-Real-IP": "203.0.113.7"}):
        await script.until(r"client #1 connected from 203\.0\.113\.7$")
    # From elsewhere the header would be believed from nobody: the server on a public
    # interface, reached through 127.0.0.1, still trusts only this machine.
    async with client(script.url):
        await script.until(r"client #2 connected from 127\.0\.0\.1$")


async def test_origin_null_through_a_proxy_is_refused_unless_allowed(start):
    script = start(SCRIPT)
    proxied = {"X-Real-IP": "203.0.113.7"}
    with pytest.raises(InvalidStatus) as refused:
        async with client(script.url, origin="null", additional_headers=proxied):
            pass
    assert refused.value.response.status_code == 403
    await script.until(r"refused origin 'null'; to allow it: --allow-origin 'null'")
    async with client(script.url, origin="null") as ws:  # a page opened from disk, here
        assert ws.state.name == "OPEN"
    allowed = start(SCRIPT, "--allow-origin", "null")
    async with client(allowed.url, origin="null", additional_headers=proxied) as ws:
        assert ws.state.name == "OPEN"


async def test_health_says_200_and_the_count(start):
    script = start(SCRIPT)
    async with client(script.url), client(script.url):
        status, body = await asyncio.to_thread(get, script, "/health")
    assert (status, json.loads(body)) == (200, {"status": "ok", "clients": 2})


def get(script, path):
    conn = http.client.HTTPConnection("127.0.0.1", script.port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


@pytest.mark.parametrize(
    "flags, error",
    [
        (["--history", "-1"], "--history must be 0 (off) or more, not -1"),
        (["--rate", "-1"], "--rate must be 0 (off) or more, not -1"),
    ],
)
def test_a_negative_history_or_rate_is_one_sentence(flags, error):
    script = Script(SCRIPT, *flags, wait_ready=False)
    assert script.wait() == 2
    assert script.text("stderr").splitlines()[-1].endswith(error)
