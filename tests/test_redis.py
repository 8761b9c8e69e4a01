"""3_websocket_broadcast.py --redis: several processes, one conversation, through a real Redis."""

import asyncio
import http.client
import json
import os
import signal
import time

import pytest
import redis.asyncio
from conftest import ROOT, Listener, assert_clean, client, free_port
from websockets.exceptions import InvalidStatus

SCRIPT = "3_websocket_broadcast.py"


def texts(listener):
    return [m["text"] for m in listener.of("message")]


async def everyone_sees(listeners, count):
    await Listener.until(
        lambda: all(
            c.of("presence") and c.of("presence")[-1]["clients"] == count for c in listeners
        )
    )


async def two_processes(start, redis_server):
    """Two processes sharing one Redis, a sender on the first and a reader on the second."""
    one = start(SCRIPT, "--redis", redis_server.url)
    two = start(SCRIPT, "--redis", redis_server.url)
    sender = await Listener.connect(one.url)
    reader = await Listener.connect(two.url)
    await everyone_sees([sender, reader], 2)
    return one, two, sender, reader


@pytest.mark.parametrize("processes", [2, 3])
async def test_processes_share_one_conversation_in_one_order(start, redis_server, processes):
    servers = [start(SCRIPT, "--redis", redis_server.url) for _ in range(processes)]
    clients = [await Listener.connect(s.url, user=i) for i, s in enumerate(servers * 3)]
    everyone = len(clients)
    await Listener.until(lambda: all(c.of("welcome") for c in clients))
    numbers = [c.of("welcome")[0]["client"] for c in clients]
    assert len(set(numbers)) == everyone  # unique across processes
    await everyone_sees(clients, everyone)
    for round_ in range(5):
        for c in clients:
            await c.ws.send(f"{round_} from {c.of('welcome')[0]['client']}")
    total = 5 * everyone
    await Listener.until(lambda: all(len(c.of("message")) == total for c in clients))
    orders = [[(m["id"], m["client"], m["text"]) for m in c.of("message")] for c in clients]
    assert all(order == orders[0] for order in orders)
    assert len({id_ for id_, _, _ in orders[0]}) == total  # one id per message
    for c in clients:
        await c.ws.close()
    for s in servers:
        assert await asyncio.to_thread(s.stop) == 0
        assert_clean(s)


async def test_welcome_comes_first_under_steady_traffic(start, redis_server):
    one = start(SCRIPT, "--redis", redis_server.url, "--rate", "0")
    two = start(SCRIPT, "--redis", redis_server.url)
    talker = await Listener.connect(one.url)
    stop = asyncio.Event()

    async def talk():
        while not stop.is_set():
            await talker.ws.send("busy")
            await asyncio.sleep(0.001)

    talking = asyncio.create_task(talk())
    await Listener.until(lambda: len(talker.of("message")) > 20)
    for _ in range(20):
        async with client(two.url) as newcomer:
            assert json.loads(await newcomer.recv())["type"] == "welcome"
    stop.set()
    await talking
    assert_clean(one)
    assert_clean(two)


async def test_a_killed_process_stops_counting_and_its_clients_catch_up_elsewhere(
    start, redis_server
):
    alive = start(SCRIPT, "--redis", redis_server.url, "--rate", "0")
    doomed = start(SCRIPT, "--redis", redis_server.url)
    talker = await Listener.connect(alive.url)
    victims = [await Listener.connect(doomed.url) for _ in range(3)]
    await everyone_sees([talker, *victims], 4)
    gone = sorted(v.of("welcome")[0]["client"] for v in victims)
    sent, stop = 0, asyncio.Event()

    async def talk():
        nonlocal sent
        while not stop.is_set():
            await talker.ws.send(str(sent))
            sent += 1
            await asyncio.sleep(0.005)

    talking = asyncio.create_task(talk())
    await Listener.until(lambda: all(len(v.of("message")) >= 10 for v in victims))
    doomed.proc.send_signal(signal.SIGKILL)
    await Listener.until(lambda: all(v.task.done() for v in victims))
    # Each victim reconnects to the survivor where it left off.
    back = []
    for victim in victims:
        since = victim.of("message")[-1]["id"]
        back.append(await Listener.connect(f"{alive.url}/?since={since}"))
    await Listener.until(lambda: all(b.of("welcome") for b in back))
    assert all(b.of("welcome")[0]["recovered"] is True for b in back)
    await Listener.until(lambda: all(len(b.of("message")) >= 10 for b in back))
    stop.set()
    await talking
    await Listener.until(lambda: all(texts(b)[-1:] == [str(sent - 1)] for b in back))
    for victim, again in zip(victims, back, strict=True):
        seen = texts(victim) + [m["text"] for m in again.of("welcome")[0]["history"]] + texts(again)
        first = int(seen[0])
        assert seen == [str(n) for n in range(first, sent)], "lost or repeated"
    # The survivor counts the dead process's clients as gone, each once: within 10 s of
    # silence (SILENT_LIMIT and a heartbeat), then LINGER (5 s) in case they come back.
    await Listener.until(
        lambda: sorted(n for e in talker.of("presence") for n in e["left"]) == gone, timeout=17
    )
    await Listener.until(lambda: talker.of("presence")[-1]["clients"] == 4)  # 1 + 3 back
    await alive.until("went silent; its 3 clients left")


async def test_redis_outage_refuses_newcomers_tells_senders_and_resumes(start, redis_server):
    one, two, sender, reader = await two_processes(start, redis_server)
    await sender.ws.send("before the outage")
    await Listener.until(lambda: texts(reader) == ["before the outage"])
    redis_server.stop()
    await one.until("lost Redis")
    await sender.ws.send("while Redis is down")
    await Listener.until(lambda: sender.of("error"))
    assert "broadcast unavailable" in sender.of("error")[0]["reason"]
    assert one.proc.poll() is None and two.proc.poll() is None  # nobody crashed
    # Refused at the handshake, so that a page backs off instead of retrying at once.
    with pytest.raises(InvalidStatus) as refused:
        async with client(one.url):
            pass
    assert refused.value.response.status_code == 503
    await one.until("refused a client: the broadcast is unavailable")

    redis_server.start()  # same port, empty: nothing from before the outage is in it
    await one.until("Redis is back: relaying", timeout=40)
    await two.until("Redis is back: relaying", timeout=40)
    await sender.ws.send("Redis is back")
    await Listener.until(lambda: texts(reader)[-1:] == texts(sender)[-1:] == ["Redis is back"])
    # Nothing published before the outage comes again, and nothing refused comes late.
    assert texts(reader) == ["before the outage", "Redis is back"]
    assert texts(sender) == ["before the outage", "Redis is back"]
    async with client(one.url) as newcomer:
        assert json.loads(await newcomer.recv())["type"] == "welcome"
    for s in (one, two):
        assert_clean(s)


async def test_a_malformed_entry_is_logged_and_skipped(start, redis_server):
    one, two, sender, reader = await two_processes(start, redis_server)
    async with redis.asyncio.from_url(redis_server.url) as r:
        await r.xadd("broadcast:messages", {"event": "not json"})
        await r.xadd("broadcast:messages", {"something": "else"})
        await r.xadd(
            "broadcast:messages",
            {"event": json.dumps({"type": "message", "client": "1", "text": 2})},
        )
        await r.xadd("broadcast:presence", {"event": json.dumps({"type": "joined"})})
        await r.xadd("broadcast:presence", {"event": "[1, 2"})
    await sender.ws.send("still flowing")
    await Listener.until(lambda: texts(reader) == ["still flowing"])
    for s in (one, two):
        await s.until("skipped entry", count=5)
        assert_clean(s)


async def test_history_comes_from_the_stream_and_survives_a_process_restart(start, redis_server):
    first = start(SCRIPT, "--redis", redis_server.url)
    talker = await Listener.connect(first.url)
    for i in range(3):
        await talker.ws.send(f"m{i}")
    await Listener.until(lambda: len(talker.of("message")) == 3)
    await talker.ws.close()
    assert await asyncio.to_thread(first.stop) == 0
    later = start(SCRIPT, "--redis", redis_server.url)  # a new process, a new port
    async with client(later.url) as newcomer:
        welcome = json.loads(await newcomer.recv())
    assert welcome["history"] == talker.of("message")
    since = talker.of("message")[0]["id"]
    async with client(f"{later.url}/?since={since}") as returning:
        welcome = json.loads(await returning.recv())
    assert welcome["recovered"] is True and welcome["history"] == talker.of("message")[1:]


@pytest.mark.parametrize("command", ["xadd", "xread", "xrevrange", "xinfo", "eval"])
async def test_a_command_redis_refuses_at_start_is_one_sentence(start, redis_server, command):
    async with redis.asyncio.from_url(redis_server.url) as r:  # as a strict ACL could
        await r.execute_command("ACL", "SETUSER", "default", f"-{command}")
    script = start(SCRIPT, "--redis", redis_server.url, wait_ready=False)
    assert await asyncio.to_thread(script.wait, 20) not in (0, None)
    error = script.text("stderr").strip()
    assert error.startswith(f"Cannot use Redis at {redis_server.url}: "), error
    assert f"'{command}" in error and len(error.splitlines()) == 1
    assert ".." not in error and "Traceback" not in script.text()


def test_unreachable_redis_is_one_clear_sentence(start):
    url = f"redis://127.0.0.1:{free_port()}/0"
    script = start(SCRIPT, "--redis", url, wait_ready=False)
    assert script.wait() not in (0, None)
    error = script.text("stderr").strip()
    assert error.startswith(f"Cannot use Redis at {url}: ") and "without --redis" in error
    assert len(error.splitlines()) == 1 and ".." not in error
    assert "Traceback" not in script.text()


async def test_without_the_flag_redis_is_never_imported(start, tmp_path):
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "__init__.py").write_text("raise ImportError('redis was imported')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    script = start(SCRIPT, env=env)
    async with client(script.url) as ws:
        await ws.send("no Redis here")
        while '"message"' not in (message := await ws.recv()):
            pass
        assert "no Redis here" in message
    assert_clean(script)


# Faults a real deployment meets: each promise of docs/scaling-out.md, kept.


async def say(listener, texts):
    """Send texts and wait until the sender has them back; return their events."""
    before = len(listener.of("message"))
    for text in texts:
        await listener.ws.send(text)
    await Listener.until(lambda: len(listener.of("message")) >= before + len(texts), timeout=60)
    return listener.of("message")[before:]


async def welcome_from(url):
    async with client(url) as ws:
        return json.loads(await ws.recv())


async def test_a_hole_trimmed_past_a_lagging_process_is_never_recovered_true(start, redis_server):
    lagging = start(SCRIPT, "--redis", redis_server.url, "--history", "3000")
    busy = start(SCRIPT, "--redis", redis_server.url, "--rate", "0")  # keeps ~1,000 entries
    reader, talker = await Listener.connect(lagging.url), await Listener.connect(busy.url)
    # The handshake is over before the handler has its client number from Redis: until the
    # welcome, what is said goes into the welcome's history, not live to the reader.
    await Listener.until(lambda: reader.of("welcome") and talker.of("welcome"))
    last_seen = (await say(talker, ["before the pause"]))[0]
    await Listener.until(lambda: texts(reader) == ["before the pause"])
    lagging.proc.send_signal(signal.SIGSTOP)  # a process that stalls: swapped out, say
    try:
        await say(talker, [f"m{i}" for i in range(2500)])  # trimmed past its position
    finally:
        lagging.proc.send_signal(signal.SIGCONT)
    await lagging.until("may be lost here")
    try:
        await Listener.until(lambda: texts(reader)[-1:] == ["m2499"])  # it has read them all
    except TimeoutError:
        raise AssertionError(f"{texts(reader)[-3:]}\n{lagging.text()[-3000:]}") from None
    hello = await welcome_from(f"{lagging.url}/?since={last_seen['id']}")
    assert hello["recovered"] is False  # 1,500 of them are gone: it must not say otherwise
    assert [m["text"] for m in hello["history"]] == [f"m{i}" for i in range(2480, 2500)]
    assert lagging.text().count("may be lost here") == 1  # logged once, not per client
    # Delivery goes on, and a client that comes back from after the hole catches up.
    since = (await say(talker, ["after"]))[0]
    more = await say(talker, ["and more"])
    hello = await welcome_from(f"{lagging.url}/?since={since['id']}")
    assert hello["recovered"] is True and hello["history"] == more
    assert_clean(lagging)


async def test_redis_restarted_empty_while_a_process_lagged_is_not_recovered(start, redis_server):
    lagging = start(SCRIPT, "--redis", redis_server.url)
    busy = start(SCRIPT, "--redis", redis_server.url, "--rate", "0")
    talker = await Listener.connect(busy.url)
    last_seen = (await say(talker, ["one"]))[0]
    await lagging.until("client #1 to 0 clients: 'one'")
    lagging.proc.send_signal(signal.SIGSTOP)
    try:
        heard_only_by_busy = await say(talker, [f"m{i}" for i in range(50)])
        redis_server.stop()
        redis_server.start()  # empty: the 50 are gone from Redis
        await busy.until("Redis is back", timeout=20)
    finally:
        lagging.proc.send_signal(signal.SIGCONT)
    await lagging.until("may be lost here", timeout=20)
    for since in (last_seen["id"], heard_only_by_busy[-1]["id"]):
        hello = await welcome_from(f"{lagging.url}/?since={since}")
        assert hello["recovered"] is False, since
    # New messages flow to both, whatever their ids.
    reader = await Listener.connect(lagging.url)
    await Listener.until(lambda: reader.of("welcome"))
    await say(talker, ["after the restart"])
    await Listener.until(lambda: texts(reader)[-1:] == ["after the restart"])
    assert_clean(lagging)


async def test_a_paused_redis_around_a_send_is_neither_not_sent_nor_twice(start, redis_server):
    one, _, sender, reader = await two_processes(start, redis_server)
    redis_server.pause()  # a Redis that stalls longer than the 5 s command timeout
    try:
        await sender.ws.send("said while Redis stalled")
        await one.until("lost Redis", timeout=20)
    finally:
        redis_server.resume()
    await one.until("Redis is back", timeout=20)
    await Listener.until(lambda: texts(reader) == texts(sender) == ["said while Redis stalled"])
    await sender.ws.send("and after")  # a later message: the first is not coming twice
    await Listener.until(lambda: texts(reader)[-1:] == texts(sender)[-1:] == ["and after"])
    assert texts(reader) == texts(sender) == ["said while Redis stalled", "and after"]
    assert sender.of("error") == []  # never told "not sent" for what was delivered


async def test_client_numbers_stay_unique_after_redis_restarts_empty(start, redis_server):
    first = start(SCRIPT, "--redis", redis_server.url)
    clients = [await Listener.connect(first.url) for _ in range(3)]
    await Listener.until(lambda: all(c.of("welcome") for c in clients))
    taken = {c.of("welcome")[0]["client"] for c in clients}
    redis_server.stop()
    await first.until("lost Redis")
    redis_server.start()  # empty: the counter starts again from nothing
    later = start(SCRIPT, "--redis", redis_server.url)  # knows no number in use
    newcomers = [await Listener.connect(later.url) for _ in range(3)]
    await Listener.until(lambda: all(c.of("welcome") for c in newcomers))
    numbers = [c.of("welcome")[0]["client"] for c in newcomers]
    assert not taken & set(numbers), (taken, numbers)


async def test_max_clients_holds_under_a_burst_with_redis(start, redis_server):
    script = start(SCRIPT, "--redis", redis_server.url, "--max-clients", "5")

    async def try_one():
        try:
            async with client(script.url) as ws:
                await asyncio.wait_for(ws.recv(), 10)  # its welcome
                await asyncio.sleep(1)  # stay while the others try
                return True
        except InvalidStatus as refused:
            assert refused.response.status_code == 503
            return False

    welcomed = await asyncio.gather(*(try_one() for _ in range(60)))
    assert sum(welcomed) == 5


async def test_a_poisoned_entry_is_logged_and_skipped_and_delivery_goes_on(start, redis_server):
    one, two, sender, reader = await two_processes(start, redis_server)
    async with redis.asyncio.from_url(redis_server.url) as r:
        deep = '{"type": "message", "client": 1, "text": ' + "[" * 5_000 + "]" * 5_000 + "}"
        await r.xadd("broadcast:messages", {"event": deep})  # RecursionError in json.loads
        lone = (
            '{"type": "message", "client": 1, "text": "\\ud800", "time": 0}'  # nobody can send it
        )
        await r.xadd("broadcast:messages", {"event": lone})
        await r.xadd("broadcast:presence", {"event": deep})
    await sender.ws.send("still flowing")
    await Listener.until(lambda: texts(reader) == ["still flowing"])
    for s in (one, two):
        await s.until("skipped entry", count=3)
        assert_clean(s)
    async with client(two.url) as newcomer:  # and its welcome can be sent
        assert json.loads(await newcomer.recv())["history"][-1]["text"] == "still flowing"


def health_of(script):
    conn = http.client.HTTPConnection("127.0.0.1", script.port, timeout=10)
    conn.request("GET", "/health")
    response = conn.getresponse()
    return response.status, json.loads(response.read())


async def test_health_is_503_while_redis_is_away_and_200_after(start, redis_server):
    script = start(SCRIPT, "--redis", redis_server.url)
    async with client(script.url) as ws:
        await ws.recv()  # welcomed: it counts
        assert await asyncio.to_thread(health_of, script) == (200, {"status": "ok", "clients": 1})
        redis_server.stop()
        await script.until("lost Redis")
        assert await asyncio.to_thread(health_of, script) == (
            503,
            {"status": "unavailable", "clients": 1},
        )
        redis_server.start()
        await script.until("Redis is back", timeout=20)
        assert await asyncio.to_thread(health_of, script) == (200, {"status": "ok", "clients": 1})


async def test_stopping_takes_no_longer_than_the_close_timeout_whatever_redis_does(
    start, redis_server
):
    script = start(SCRIPT, "--redis", redis_server.url)
    async with client(script.url) as ws:
        await ws.recv()
        redis_server.pause()
        try:
            t0 = time.monotonic()
            script.proc.send_signal(signal.SIGINT)
            assert await asyncio.to_thread(script.wait, 20) == 0
            assert time.monotonic() - t0 < 5 + 2
        finally:
            redis_server.resume()
    assert_clean(script)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_a_stop_closes_the_conversation_before_the_reader_is_cancelled(
    start, redis_server, sig
):
    script = start(SCRIPT, "--redis", redis_server.url)
    async with client(script.url) as ws:
        await ws.recv()
    await asyncio.sleep(0.6)  # past one blocking read: the reader is waiting on Redis
    script.proc.send_signal(sig)
    assert await asyncio.to_thread(script.wait, 10) == 0
    # Cancelled by asyncio.run() instead of stopped by close(), the reader says so, and
    # redis-py may hang in the middle of its read (1 stop in 4 did, before the fix).
    assert "the Redis reader stopped" not in script.text()
    assert_clean(script)


async def test_sigterm_while_redis_does_not_answer_at_start_is_a_clean_stop(start, redis_server):
    redis_server.pause()
    try:
        script = start(SCRIPT, "--redis", redis_server.url, wait_ready=False)
        await asyncio.sleep(1)  # it is waiting for Redis: there is no line to wait for
        script.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(script.wait, 10) == 0
    finally:
        redis_server.resume()
    assert "Goodbye" in script.text("stdout")
    assert "Traceback" not in script.text()


async def test_redis_flag_without_the_redis_package_is_one_sentence(start, tmp_path):
    (tmp_path / "redis").mkdir()  # a redis that cannot be imported, as if not installed
    (tmp_path / "redis" / "__init__.py").write_text("raise ModuleNotFoundError(name='redis')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    script = start(SCRIPT, "--redis", "redis://127.0.0.1:1/0", env=env, wait_ready=False)
    assert await asyncio.to_thread(script.wait) == 1
    assert script.text("stderr") == "--redis needs the redis package: pip install redis"


async def test_a_reader_that_stopped_makes_the_process_refuse_clients(
    start, redis_server, tmp_path
):
    """Should the reader ever end (a bug, say), the process says so and answers 503."""
    (tmp_path / "sitecustomize.py").write_text(
        "import broadcast_redis\n"
        "async def relay(self):\n"
        "    raise RuntimeError('a bug in the reader')\n"
        "broadcast_redis.Conversation.relay = relay\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    script = start(SCRIPT, "--redis", redis_server.url, env=env)
    await script.until(r"the Redis reader stopped \(RuntimeError\('a bug in the reader'\)\)")
    with pytest.raises(InvalidStatus) as refused:
        async with client(script.url):
            pass
    assert refused.value.response.status_code == 503
    assert (await asyncio.to_thread(health_of, script))[0] == 503


async def test_a_foreign_writer_s_unknown_field_reaches_every_client_and_its_type_is_skipped(
    start, redis_server
):
    """Another writer (a newer version, during a rolling deploy) adds a field and a type."""
    one, two, sender, reader = await two_processes(start, redis_server)
    newer = {"type": "message", "client": 99, "text": "hello", "time": 1, "mood": {"x": [1]}}
    async with redis.asyncio.from_url(redis_server.url) as r:
        await r.xadd("broadcast:messages", {"event": json.dumps({"type": "reaction", "to": 1})})
        await r.xadd("broadcast:messages", {"event": json.dumps(newer)})
        await r.xadd("broadcast:messages", {"event": json.dumps({"type": "reaction", "to": 2})})
    for listener in (sender, reader):
        await Listener.until(lambda listener=listener: texts(listener) == ["hello"])
        message = listener.of("message")[0]
        assert message["mood"] == {"x": [1]}  # unchanged, whatever this version knows
        assert (message["client"], message["text"], message["time"]) == (99, "hello", 1)
        assert isinstance(message["id"], str)
        assert not listener.of("reaction")
    async with client(two.url, user=3) as newcomer:  # in the history too
        assert json.loads(await newcomer.recv())["history"][-1]["mood"] == {"x": [1]}
    for s in (one, two):  # skipped with one line, however many arrive
        await s.until("skipped events of unknown type 'reaction'")
        assert s.text().count("skipped events of unknown type") == 1
        assert_clean(s)


async def test_the_redis_password_is_in_no_log_line(start, redis_server):
    secret = "s3cret-Pass"
    async with redis.asyncio.from_url(redis_server.url) as r:
        await r.config_set("requirepass", secret)
    with_url = start(SCRIPT, "--redis", redis_server.url.replace("//", f"//:{secret}@"))
    env = {**os.environ, "REDIS_PASSWORD": secret}  # kept off the command line (ps)
    from_env = start(SCRIPT, "--redis", redis_server.url, env=env)
    for script in (with_url, from_env):
        async with client(script.url) as ws:
            assert json.loads(await ws.recv())["type"] == "welcome"
    wrong_url = redis_server.url.replace("//", "//:wrong-Pass@")
    wrong = start(SCRIPT, "--redis", wrong_url, wait_ready=False)
    assert await asyncio.to_thread(wrong.wait, 20) == 1
    assert ":***@" in wrong.text() and "wrong-Pass" not in wrong.text()
    for script in (with_url, from_env):
        assert await asyncio.to_thread(script.stop) == 0
        assert secret not in script.text()
    assert ":***@" in with_url.text()


async def test_two_prefixes_share_a_redis_and_not_a_conversation(start, redis_server):
    blue = start(SCRIPT, "--redis", redis_server.url, "--redis-prefix", "blue")
    green = start(SCRIPT, "--redis", redis_server.url)  # the default: broadcast
    listeners = [await Listener.connect(s.url) for s in (blue, green)]
    await Listener.until(lambda: all(c.of("welcome") for c in listeners))
    await listeners[0].ws.send("for blue")
    await listeners[1].ws.send("for green")
    await Listener.until(lambda: texts(listeners[0]) == ["for blue"])
    await Listener.until(lambda: texts(listeners[1]) == ["for green"])
    assert listeners[0].of("welcome")[0]["client"] == listeners[1].of("welcome")[0]["client"]
    async with redis.asyncio.from_url(redis_server.url) as r:
        assert await r.xlen("blue:messages") == 1 and await r.xlen("broadcast:messages") == 1


async def test_an_oversized_entry_is_skipped_and_logged(start, redis_server):
    one, two, sender, reader = await two_processes(start, redis_server)
    huge = {"type": "message", "client": 1, "text": "x" * 1000, "time": 0, "pad": "y" * 30_000}
    async with redis.asyncio.from_url(redis_server.url) as r:
        await r.xadd("broadcast:messages", {"event": json.dumps(huge)})  # 30 KB: not relayed
    await sender.ws.send("after it")
    await Listener.until(lambda: texts(reader) == texts(sender) == ["after it"])
    for s in (one, two):
        await s.until("over 16384 characters")
        assert_clean(s)


async def health_becomes(script, status, timeout=10):
    """Poll /health (as nginx or a load balancer does) until it answers `status`."""
    deadline = time.monotonic() + timeout
    while (await asyncio.to_thread(health_of, script))[0] != status:
        assert time.monotonic() < deadline, f"/health never answered {status}"
        await asyncio.sleep(0.1)


async def test_redis_refusing_writes_turns_health_to_503_with_no_false_departures(
    start, redis_server
):
    """Out of memory (or disk), Redis answers and refuses every write, heartbeats too."""
    one, two, sender, reader = await two_processes(start, redis_server)
    async with redis.asyncio.from_url(redis_server.url) as r:
        await r.config_set("maxmemory-policy", "noeviction")
        await r.config_set("maxmemory", 1)
        await sender.ws.send("refused")
        await Listener.until(lambda: sender.of("error"))
        assert sender.of("error")[0]["reason"].startswith("message not sent: Redis refused it (")
        for s in (one, two):  # the next heartbeat tells the other process too
            await health_becomes(s, 503)
            await s.until("Redis refuses writes")
        # Past SILENT_LIMIT (7 s) without a heartbeat either way: nobody is announced gone.
        await asyncio.sleep(9)
        await r.config_set("maxmemory", 0)
    for s in (one, two):
        await health_becomes(s, 200)
    await sender.ws.send("accepted again")
    await Listener.until(lambda: texts(reader) == ["accepted again"])
    for listener in (sender, reader):
        assert all(not event["left"] for event in listener.of("presence")), listener.of("presence")
    for s in (one, two):
        assert "went silent" not in s.text()
        assert_clean(s)
