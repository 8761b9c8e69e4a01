"""Raw bytes on a TCP socket: what a broken or hostile client can send."""

import base64
import os
import socket
import struct


def raw_connect(port, timeout=10, source="127.0.0.1"):
    """A TCP connection from a loopback address (all of 127.0.0.0/8 is this machine)."""
    return socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    )


def request(path="/", extra=""):
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def read_response(sock):
    """Read an HTTP response head; return (status, bytes read past the head)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None
    return status, rest


def handshake(port, **kwargs):
    """An open WebSocket on a plain socket, and any bytes already received."""
    sock = raw_connect(port, **kwargs)
    sock.sendall(request())
    status, rest = read_response(sock)
    assert status == 101, status
    return sock, rest


def frame(opcode, payload, fin=True, mask=True, rsv=0):
    """One WebSocket frame as a client would send it (masked unless told otherwise)."""
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    length = len(payload)
    bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_close_code(sock, rest=b""):
    """Read frames from the server until its close frame; return the close code."""
    data = rest
    while True:
        while len(data) >= 2:
            opcode, length = data[0] & 0x0F, data[1] & 0x7F
            start = 2
            if length == 126:
                length, start = struct.unpack("!H", data[2:4])[0], 4
            elif length == 127:
                length, start = struct.unpack("!Q", data[2:10])[0], 10
            if len(data) < start + length:
                break
            payload, data = data[start : start + length], data[start + length :]
            if opcode == 0x8:
                return struct.unpack("!H", payload[:2])[0] if payload else None
        chunk = sock.recv(65536)
        if not chunk:
            return None  # closed without a close frame
        data += chunk
