"""Lean WebSocket clients for the load processes: thousands fit in one process.

A browser-like handshake (it offers permessage-deflate, as browsers do), frames parsed
in bulk with no task per client, pings answered. Measuring sticks, not code to copy.
"""

import asyncio
import base64
import os
import re
import time
import zlib

WINDOW_BITS = re.compile(rb"client_max_window_bits=(\d+)")


def masked(opcode, payload, key):
    """A client frame: FIN, the opcode, the length, the masking key, the masked payload."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    mask = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return head + key + (int.from_bytes(payload, "big") ^ mask).to_bytes(n, "big")


class Client(asyncio.Protocol):
    """Handshake, frame parsing and pings; subclasses say what to do with each message."""

    def __init__(self, path, host):
        self.path, self.host = path, host
        self.buffer, self.opened = b"", asyncio.get_running_loop().create_future()
        self.inflate = self.deflate = None
        self.key, self.closed = os.urandom(4), False

    def connection_made(self, transport):
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n".encode()
        )

    def connection_lost(self, exc):
        self.closed = True
        if not self.opened.done():
            self.opened.set_result(False)

    def data_received(self, data):
        now = time.time()
        self.buffer += data
        if not self.opened.done():
            head, found, self.buffer = self.buffer.partition(b"\r\n\r\n")
            if not found:
                self.buffer = head
                return
            if b"permessage-deflate" in head.lower():  # the server chose compression
                bits = WINDOW_BITS.search(head)
                self.inflate = zlib.decompressobj(-15)
                self.deflate = zlib.compressobj(wbits=-int(bits.group(1)) if bits else -15)
            self.opened.set_result(head.startswith(b"HTTP/1.1 101"))
        while len(self.buffer) >= 2:
            first, length = self.buffer[0], self.buffer[1] & 0x7F
            start = 2
            if length == 126:
                length, start = int.from_bytes(self.buffer[2:4], "big"), 4
            elif length == 127:
                length, start = int.from_bytes(self.buffer[2:10], "big"), 10
            if len(self.buffer) < start + length:
                return
            payload = self.buffer[start : start + length]
            self.buffer = self.buffer[start + length :]
            opcode = first & 0x0F
            if opcode == 0x8:
                self.closed = True
            elif opcode == 0x9:  # ping: answer with a pong
                self.transport.write(masked(0xA, payload, self.key))
            elif opcode in (0x1, 0x2):
                if first & 0x40:  # compressed (RSV1)
                    payload = self.inflate.decompress(payload + b"\x00\x00\xff\xff")
                self.message(payload, now)

    def frame(self, payload):
        """A text frame for this connection, compressed if the server chose compression."""
        if self.deflate is None:
            return masked(0x1, payload, self.key)
        data = self.deflate.compress(payload) + self.deflate.flush(zlib.Z_SYNC_FLUSH)
        frame = masked(0x1, data[:-4], self.key)  # without the 00 00 ff ff tail
        return bytes([frame[0] | 0x40]) + frame[1:]  # RSV1: compressed

    def message(self, payload, now):
        raise NotImplementedError


async def open_all(factory, urls, n, batch=100):
    """Open n connections, `batch` at a time, spread over urls; fail if any is refused."""
    from urllib.parse import urlsplit

    loop = asyncio.get_running_loop()
    clients = []
    for start in range(0, n, batch):
        pending = []
        for i in range(start, min(start + batch, n)):
            url = urlsplit(urls[i % len(urls)])
            client = factory(url.path or "/", url.netloc)
            pending.append(loop.create_connection(lambda c=client: c, url.hostname, url.port))
            clients.append(client)
        await asyncio.gather(*pending)
        if not all(await asyncio.gather(*(c.opened for c in clients[start:]))):
            raise SystemExit("the server refused a WebSocket handshake")
    return clients
