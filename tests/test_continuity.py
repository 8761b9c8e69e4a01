"""Script 3's "chat" subprotocol: the same person after a reconnect, each message once.

A page speaks "chat": a hello first (with the resume secret of its last welcome, if any),
then {"type": "message", "text": ..., "ref": ...}. Plain clients are unchanged (test_3)."""

import asyncio
import json
import secrets

import pytest
import redis.asyncio
from conftest import assert_clean, client
from websockets.exceptions import ConnectionClosed

SCRIPT = "3_websocket_broadcast.py"
LINGER = 5  # seconds a client that dropped has to come back before "left" is announced


async def chat(url, resume=None, user=None):
    """A connection that speaks "chat", as the page does: returns it and its welcome."""
    ws = await client(url, user=user, subprotocols=["chat"])
    assert ws.subprotocol == "chat"
    await ws.send(json.dumps({"type": "hello", "resume": resume}))
    welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert welcome["type"] == "welcome"
    return ws, welcome


async def events(ws, seconds):
    """Every event a connection gets in the next `seconds`."""
    got = []
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(seconds):
            while True:
                got.append(json.loads(await ws.recv()))
    return got


async def next_of(ws, kind, timeout=10):
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if event["type"] == kind:
            return event


async def joined(watcher, number):
    """Wait until a watcher hears that `number` joined (its own arrival may come first)."""
    while number not in (await next_of(watcher, "presence"))["joined"]:
        pass


def presence(got):
    """Every number joined or left, in the presence events among `got`."""
    joined = [n for e in got if e["type"] == "presence" for n in e["joined"]]
    left = [n for e in got if e["type"] == "presence" for n in e["left"]]
    return joined, left


def say(text, ref):
    return json.dumps({"type": "message", "text": text, "ref": ref})


async def test_plain_clients_get_no_secret_and_pages_a_fresh_one_each_time(start):
    script = start(SCRIPT)
    async with client(script.url) as plain:
        assert "resume" not in json.loads(await plain.recv())
    page, first = await chat(script.url)
    await page.close()
    again, second = await chat(script.url, first["resume"])
    for secret in (first["resume"], second["resume"]):
        assert isinstance(secret, str) and len(secret) >= 22  # 128 bits, URL-safe base64
    assert second["resume"] != first["resume"]
    assert second["client"] == first["client"]
    await again.close()
    assert first["resume"] not in script.text()  # never in a log line
    assert second["resume"] not in script.text()
    assert_clean(script)


async def test_a_page_that_comes_back_keeps_its_number_and_nobody_hears_it_left(start):
    script = start(SCRIPT)
    async with client(script.url, user=1) as watcher:
        await next_of(watcher, "welcome")
        page, welcome = await chat(script.url, user=2)
        number = welcome["client"]
        await joined(watcher, number)
        for _ in range(3):  # a reload, a Disconnect and Connect, a blip: each within LINGER
            await page.close()
            await asyncio.sleep(0.5)
            page, welcome = await chat(script.url, welcome["resume"], user=2)
            assert welcome["client"] == number
        got = await events(watcher, LINGER + 1.5)
        assert presence(got) == ([], []), got  # no "left", no "joined": nothing happened
        await page.close()  # and now for good: "left", once, after LINGER
        got = await events(watcher, LINGER + 1.5)
        assert presence(got) == ([], [number]), got
        assert got[-1]["clients"] == 1
    assert_clean(script)


@pytest.mark.parametrize("how", ["reused", "forged", "not a string", "no hello"])
async def test_a_reused_or_forged_secret_gets_a_new_number(start, how):
    script = start(SCRIPT)
    page, welcome = await chat(script.url)
    owner = welcome["client"]
    again, _ = await chat(script.url, welcome["resume"])  # its owner, back: the secret is used
    resume = {"reused": welcome["resume"], "forged": secrets.token_urlsafe(16)}.get(how)
    if how == "not a string":
        resume = [welcome["resume"]]
    if how == "no hello":
        ws = await client(script.url, subprotocols=["chat"])
        await ws.send(say("hello?", "r1"))  # a message where the hello goes: no secret
        other = json.loads(await ws.recv())
    else:
        ws, other = await chat(script.url, resume)
    assert other["client"] != owner, how
    for connection in (page, again, ws):
        await connection.close()
    assert_clean(script)


async def test_a_secret_used_while_its_connection_is_open_moves_the_number_to_the_new_one(
    start,
):
    # The old connection may be half-open after a blip (the server has not noticed yet), or
    # the page's tab was duplicated with its storage: one number, one connection.
    script = start(SCRIPT)
    async with client(script.url, user=1) as watcher:
        await next_of(watcher, "welcome")
        old, welcome = await chat(script.url, user=2)
        await joined(watcher, welcome["client"])
        new, again = await chat(script.url, welcome["resume"], user=2)
        assert again["client"] == welcome["client"]
        with pytest.raises(ConnectionClosed) as closed:
            while True:  # presence first, maybe; then the close
                await asyncio.wait_for(old.recv(), 10)
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
            4001,
            "replaced by a newer connection",
        )
        await new.send(say("still me", "r1"))
        assert (await next_of(watcher, "message"))["client"] == welcome["client"]
        got = await events(watcher, LINGER + 1)  # the number never left: no "left" for it
        assert welcome["client"] not in presence(got)[1], got
        # The old connection's owner comes back with the secret it had: used, so a new number.
        back, other = await chat(script.url, welcome["resume"], user=2)
        assert other["client"] != welcome["client"]
        for connection in (new, back):
            await connection.close()
    assert_clean(script)


async def test_a_message_sent_again_with_the_same_ref_is_delivered_once(start):
    script = start(SCRIPT, "--rate", "0")
    async with client(script.url, user=1) as watcher:
        await next_of(watcher, "welcome")
        page, welcome = await chat(script.url, user=2)
        await page.send(say("once", "r1"))
        echo = await next_of(page, "message")  # its own message coming back: the ack
        assert (echo["text"], echo["ref"], echo["client"]) == ("once", "r1", welcome["client"])
        await page.send(say("once", "r1"))  # the ack was lost, say: it is sent again
        sent = await next_of(page, "sent")
        assert sent == {"type": "sent", "id": echo["id"], "ref": "r1"}
        await page.close()  # and again after a reconnect, as the same person
        page, _ = await chat(script.url, welcome["resume"], user=2)
        await page.send(say("once", "r1"))
        assert (await next_of(page, "sent"))["id"] == echo["id"]
        await page.send(say("twice", "r2"))  # a new ref is a new message
        assert (await next_of(page, "message"))["ref"] == "r2"
        other, _ = await chat(script.url, user=3)  # someone else's r1 is theirs
        await other.send(say("mine", "r1"))
        assert (await next_of(other, "message"))["text"] == "mine"
        got = await events(watcher, 1)
        said = [e["text"] for e in got if e["type"] == "message"]
        assert said == ["once", "twice", "mine"]  # r1 once, though sent three times
        await page.close()
        await other.close()
    assert_clean(script)


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        json.dumps({"type": "message", "text": "no ref"}),
        json.dumps({"type": "message", "text": "long ref", "ref": "x" * 65}),
        json.dumps({"type": "message", "text": "empty ref", "ref": ""}),
        json.dumps({"type": "message", "text": 42, "ref": "r1"}),
        json.dumps(["text", "ref"]),
    ],
)
async def test_a_chat_frame_that_is_not_one_says_what_to_send_and_the_page_stays(start, frame):
    script = start(SCRIPT)
    page, _ = await chat(script.url)
    await page.send(frame)
    error = await next_of(page, "error")
    assert error["reason"].startswith("unreadable: send {"), error
    await page.send(say("fine", "r1"))
    assert (await next_of(page, "message"))["text"] == "fine"
    await page.close()
    assert_clean(script)


# Through Redis: any process keeps the number, and delivers a message once.


async def test_a_page_keeps_its_number_on_another_process(start, redis_server):
    one = start(SCRIPT, "--redis", redis_server.url)
    two = start(SCRIPT, "--redis", redis_server.url)
    async with client(two.url, user=1) as watcher:
        await next_of(watcher, "welcome")
        page, welcome = await chat(one.url, user=2)
        number = welcome["client"]
        await joined(watcher, number)
        await page.close()  # its process restarted, say: it moves to the other one
        page, again = await chat(two.url, welcome["resume"], user=2)
        assert again["client"] == number
        got = await events(watcher, LINGER + 2)
        assert presence(got) == ([], []), got
        await page.close()
        page, third = await chat(one.url, welcome["resume"], user=2)  # used: a new number
        assert third["client"] != number
        await page.close()
    async with redis.asyncio.from_url(redis_server.url, decode_responses=True) as r:
        keys = await r.keys("broadcast:resume:*")
        assert keys and not any(again["resume"] in key for key in keys)  # hashed
        for key in keys:  # every one expires
            assert await r.ttl(key) > 0
    for script in (one, two):
        assert welcome["resume"] not in script.text()
        assert_clean(script)


async def test_a_message_sent_again_to_another_process_is_delivered_once(start, redis_server):
    one = start(SCRIPT, "--redis", redis_server.url)
    two = start(SCRIPT, "--redis", redis_server.url)
    watchers = [await client(url, user=n) for n, url in enumerate((one.url, two.url), 1)]
    for watcher in watchers:
        await next_of(watcher, "welcome")
    page, welcome = await chat(one.url, user=3)
    await page.send(say("only once", "r1"))
    echo = await next_of(page, "message")
    await page.close()  # before it could tell: it sends it again, to the other process
    page, _ = await chat(two.url, welcome["resume"], user=3)
    await page.send(say("only once", "r1"))
    assert (await next_of(page, "sent"))["id"] == echo["id"]
    await page.send(say("then this", "r2"))
    assert (await next_of(page, "message"))["text"] == "then this"
    for watcher in watchers:
        got = await events(watcher, 1.5)
        assert [e["text"] for e in got if e["type"] == "message"] == ["only once", "then this"]
        await watcher.close()
    await page.close()
    for script in (one, two):
        assert_clean(script)


async def test_a_process_that_starts_knows_who_is_on_the_others_and_announces_nobody(
    start, redis_server
):
    one = start(SCRIPT, "--redis", redis_server.url)
    async with client(one.url, user=1) as there:
        first = json.loads(await there.recv())["client"]
        two = start(SCRIPT, "--redis", redis_server.url)  # a restart, or one more process
        page, welcome = await chat(two.url, user=2)
        assert welcome["clients"] == 2  # the one on the other process, and itself
        got = await events(page, 3)  # longer than a heartbeat: what it hears from `one`
        assert first not in presence(got)[0], got
        await page.close()
    for script in (one, two):
        assert_clean(script)


async def test_a_welcome_counts_who_arrived_a_moment_before(start):
    server = start(SCRIPT)
    async with client(server.url, user=1) as first, client(server.url, user=2) as second:
        welcomes = [json.loads(await ws.recv()) for ws in (first, second)]  # within 0.2 s
        assert sorted(w["clients"] for w in welcomes) == [1, 2], welcomes
    assert_clean(server)
