"""1_websocket_server.py: welcome, numbering, message logging, /health."""

import asyncio
import json

import pytest
from conftest import client, health

SCRIPT = "1_websocket_server.py"


async def test_welcome_numbers_clients_in_order_with_the_count(start):
    script = start(SCRIPT)
    async with client(script.url) as one, client(script.url) as two:
        assert json.loads(await one.recv()) == {"type": "welcome", "client": 1, "clients": 1}
        assert json.loads(await two.recv()) == {"type": "welcome", "client": 2, "clients": 2}
    async with client(script.url) as three:
        assert json.loads(await three.recv()) == {"type": "welcome", "client": 3, "clients": 1}


async def test_health_counts_connected_clients(start):
    script = start(SCRIPT)
    assert await asyncio.to_thread(health, script) == {"status": "ok", "clients": 0}
    async with client(script.url) as ws:
        await ws.recv()
        assert await asyncio.to_thread(health, script) == {"status": "ok", "clients": 1}
    await script.until(r"client #1 disconnected \(0 connected\)")
    assert await asyncio.to_thread(health, script) == {"status": "ok", "clients": 0}


async def test_logs_the_first_80_characters_and_does_not_answer(start):
    script = start(SCRIPT)
    async with client(script.url) as ws:
        await ws.recv()  # welcome
        await ws.send("a" * 79 + "bcdef")
        await ws.send(b"\x00\x01")
        line = await script.until("client #1 sent b")
        assert "client #1 sent " + repr("a" * 79 + "b") in script.text()
        assert repr(b"\x00\x01") in line.string
        # The pong comes after any answer the server would have written.
        await (await ws.ping())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.2)
