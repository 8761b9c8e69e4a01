"""Reference servers for the benchmarks: measuring sticks, not code to copy.

Run: python bench/servers.py NAME [--port PORT] [--deflate]   (NAME: see SERVERS below)
Each prints the same ready line as the demos, so the benchmarks start them alike.
Compression is off, as in the demos, unless --deflate keeps the library's default
(permessage-deflate), so that a comparison with the demos compares code with code.
"""

import argparse
import asyncio
import contextlib

from websockets.asyncio.server import broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

CLIENTS = set()


async def bare_echo(websocket):
    """The library's own echo."""
    async for message in websocket:
        await websocket.send(message)


async def bare_broadcast(websocket):
    """websockets' broadcast() with no application logic."""
    CLIENTS.add(websocket)
    try:
        async for message in websocket:
            broadcast(CLIENTS, message)
    finally:
        CLIENTS.discard(websocket)


async def await_each(websocket):
    """The naive fan-out: await send() to each client in turn."""
    CLIENTS.add(websocket)
    try:
        async for message in websocket:
            for other in list(CLIENTS):
                with contextlib.suppress(ConnectionClosed):
                    await other.send(message)
    finally:
        CLIENTS.discard(websocket)


def text_frame(payload):
    """An unmasked, uncompressed text frame, as a server sends it."""
    n = len(payload)
    if n < 126:
        return bytes([0x81, n]) + payload
    if n < 1 << 16:
        return bytes([0x81, 126]) + n.to_bytes(2, "big") + payload
    return bytes([0x81, 127]) + n.to_bytes(8, "big") + payload


async def floor_probe(websocket):
    """The floor: one pre-built frame written straight to each transport."""
    CLIENTS.add(websocket)
    try:
        async for message in websocket:
            frame = text_frame(message.encode())
            for other in CLIENTS:
                if other.state is State.OPEN:  # as broadcast() does; a closing one refuses writes
                    other.transport.write(frame)
    finally:
        CLIENTS.discard(websocket)


class RawEcho(asyncio.Protocol):
    """TCP echo without WebSocket framing: the Python ceiling."""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


SERVERS = {
    "bare-echo": bare_echo,
    "bare-broadcast": bare_broadcast,
    "await-each": await_each,
    "floor": floor_probe,
    "raw-tcp-echo": None,
}


async def main(name, port, deflate):
    if name == "raw-tcp-echo":
        server = await asyncio.get_running_loop().create_server(RawEcho, "127.0.0.1", port)
    elif name == "floor":  # a pre-built frame is never compressed
        server = await serve(floor_probe, "127.0.0.1", port, compression=None)
    else:  # "deflate" is the library's default
        compression = "deflate" if deflate else None
        server = await serve(SERVERS[name], "127.0.0.1", port, compression=compression)
    print(
        f"Listening on ws://127.0.0.1:{server.sockets[0].getsockname()[1]} (Ctrl+C to stop)",
        flush=True,
    )
    await asyncio.Future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=SERVERS)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--deflate", action="store_true", help="the library's default compression")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.name, args.port, args.deflate))
