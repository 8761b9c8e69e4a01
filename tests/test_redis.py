"""3_websocket_broadcast.py --redis: several processes, one conversation, through a real Redis."""

import asyncio
import os
import signal

import pytest
from conftest import Listener, assert_clean, client, free_port

SCRIPT = "3_websocket_broadcast.py"


@pytest.mark.parametrize("processes", [2, 3])
async def test_processes_share_one_conversation_in_one_order(start, redis_server, processes):
    servers = [start(SCRIPT, "--redis", redis_server.url) for _ in range(processes)]
    clients = [await Listener.connect(s.url) for s in servers for _ in range(3)]
    everyone = len(clients)
    await Listener.until(lambda: all(c.of("welcome") for c in clients))
    numbers = [c.of("welcome")[0]["client"] for c in clients]
    assert len(set(numbers)) == everyone  # unique across processes
    await Listener.until(
        lambda: all(
            c.of("presence") and c.of("presence")[-1]["clients"] == everyone for c in clients
        )
    )
    for round_ in range(5):
        for c in clients:
            await c.ws.send(f"{round_} from {c.of('welcome')[0]['client']}")
    total = 5 * everyone
    await Listener.until(lambda: all(len(c.of("message")) == total for c in clients))
    orders = [[(m["client"], m["text"]) for m in c.of("message")] for c in clients]
    assert all(order == orders[0] for order in orders)
    for c in clients:
        await c.ws.close()
    for s in servers:
        assert s.stop() == 0
        assert_clean(s)


async def test_a_killed_process_stops_counting_and_its_clients_leave(start, redis_server):
    alive = start(SCRIPT, "--redis", redis_server.url)
    doomed = start(SCRIPT, "--redis", redis_server.url)
    watcher = await Listener.connect(alive.url)
    victims = [await Listener.connect(doomed.url) for _ in range(3)]
    await Listener.until(
        lambda: watcher.of("presence") and watcher.of("presence")[-1]["clients"] == 4
    )
    gone = sorted(v.of("welcome")[0]["client"] for v in victims)
    doomed.proc.send_signal(signal.SIGKILL)
    await Listener.until(
        lambda: watcher.of("presence")[-1]["clients"] == 1,
        timeout=12,  # "about 10 s"
    )
    left = [n for e in watcher.of("presence") for n in e["left"]]
    assert sorted(left) == gone  # each departure announced, once
    await alive.until("went silent; its 3 clients left")


async def test_redis_outage_answers_errors_and_resumes_by_itself(start, redis_server):
    one = start(SCRIPT, "--redis", redis_server.url)
    two = start(SCRIPT, "--redis", redis_server.url)
    sender = await Listener.connect(one.url)
    reader = await Listener.connect(two.url)
    await Listener.until(
        lambda: reader.of("presence") and reader.of("presence")[-1]["clients"] == 2
    )
    redis_server.stop()
    await one.until("lost Redis")
    await sender.ws.send("while Redis is down")
    await Listener.until(lambda: sender.of("error"))
    assert "broadcast unavailable" in sender.of("error")[0]["reason"]
    assert not reader.of("message")  # nothing was relayed, and the sender was told
    assert one.proc.poll() is None and two.proc.poll() is None  # nobody crashed
    async with client(one.url) as newcomer:  # no unique number to give: try again later
        await asyncio.wait_for(newcomer.wait_closed(), 10)
    assert newcomer.close_code == 1013

    redis_server.start()  # same port
    await one.until("relaying Redis channel", count=2, timeout=40)
    await two.until("relaying Redis channel", count=2, timeout=40)
    await sender.ws.send("Redis is back")
    await Listener.until(lambda: [m["text"] for m in reader.of("message")] == ["Redis is back"])
    assert sender.ws.state.name == "OPEN" and reader.ws.state.name == "OPEN"
    for s in (one, two):
        assert "Traceback" not in s.text()


def test_unreachable_redis_is_one_clear_sentence(start):
    script = start(SCRIPT, "--redis", f"redis://127.0.0.1:{free_port()}/0", wait_ready=False)
    assert script.wait() not in (0, None)
    error = script.text("stderr")
    assert "Cannot reach Redis at redis://127.0.0.1:" in error and "without --redis" in error
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
