"""2_websocket_echo.py: every message back, unchanged, in order."""

import os

from conftest import client

SCRIPT = "2_websocket_echo.py"


async def test_echoes_text_as_text_and_binary_as_binary(start):
    script = start(SCRIPT)
    async with client(script.url) as ws:
        for message in ["hello", "héllo wörld 👋", "", b"\x00\xff binary", b"", os.urandom(1000)]:
            await ws.send(message)
            echo = await ws.recv()
            assert type(echo) is type(message) and echo == message


async def test_echoes_in_order(start):
    script = start(SCRIPT, "--quiet")
    async with client(script.url) as ws:
        messages = [f"message {i}" for i in range(500)]
        for message in messages:
            await ws.send(message)
        assert [await ws.recv() for _ in messages] == messages


async def test_echoes_exactly_64_kib(start):
    script = start(SCRIPT)
    async with client(script.url, max_size=None) as ws:
        payload = os.urandom(64 * 1024)
        await ws.send(payload)
        assert await ws.recv() == payload


async def test_logs_kind_size_and_first_80_characters(start):
    script = start(SCRIPT)
    async with client(script.url) as ws:
        await ws.send("x" * 100)
        await ws.recv()
        await ws.send(b"\x01\x02\x03")
        await ws.recv()
    await script.until(r"client #1: text, 100 long: '" + "x" * 80 + "'$")
    await script.until(r"client #1: binary, 3 long: b'\\x01\\x02\\x03'$")


async def test_quiet_logs_connections_but_not_messages(start):
    script = start(SCRIPT, "--quiet")
    async with client(script.url) as ws:
        await ws.send("secret")
        assert await ws.recv() == "secret"
    await script.until(r"client #1 disconnected")
    assert "secret" not in script.text()
    assert "client #1 connected" in script.text()
