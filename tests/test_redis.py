"""3_websocket_broadcast.py --redis: several processes, one conversation, through a real Redis."""

import asyncio
import json
import os
import signal

import pytest
import redis.asyncio
from conftest import Listener, assert_clean, client, free_port
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
    clients = [await Listener.connect(s.url) for s in servers for _ in range(3)]
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
    one = start(SCRIPT, "--redis", redis_server.url)
    two = start(SCRIPT, "--redis", redis_server.url)
    talker = await Listener.connect(one.url)
    stop = asyncio.Event()

    async def talk():
        while not stop.is_set():
            await talker.ws.send("busy")
            await asyncio.sleep(0.001)

    talking = asyncio.create_task(talk())
    await Listener.until(lambda: len(talker.of("message")) > 20)
    for _ in range(50):
        async with client(two.url) as newcomer:
            assert json.loads(await newcomer.recv())["type"] == "welcome"
    stop.set()
    await talking
    assert_clean(one)
    assert_clean(two)


async def test_a_killed_process_stops_counting_and_its_clients_catch_up_elsewhere(
    start, redis_server
):
    alive = start(SCRIPT, "--redis", redis_server.url)
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
    # The survivor counts the dead process's clients as gone, each once, within 10 s.
    await Listener.until(
        lambda: sorted(n for e in talker.of("presence") for n in e["left"]) == gone, timeout=12
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
        await r.xadd("broadcast:messages", {"event": json.dumps({"client": "1", "text": 2})})
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


@pytest.mark.parametrize("command", ["xadd", "xread", "xrevrange", "incrby", "eval"])
async def test_a_command_redis_refuses_at_start_is_one_sentence(start, redis_server, command):
    async with redis.asyncio.from_url(redis_server.url) as r:  # as a strict ACL could
        await r.execute_command("ACL", "SETUSER", "default", f"-{command}")
    script = start(SCRIPT, "--redis", redis_server.url, wait_ready=False)
    assert await asyncio.to_thread(script.wait, 20) not in (0, None)
    error = script.text("stderr").strip()
    assert error.startswith(f"Cannot use Redis at {redis_server.url}: "), error
    assert f"'{command}' command" in error and len(error.splitlines()) == 1
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
