"""A WebSocket server that accepts connections and keeps track of its clients.

Run it:    python 1_websocket_server.py
Connect:   python -m websockets ws://localhost:8765   (in a second terminal)
"""

import argparse
import asyncio
import contextlib
import errno
import itertools
import json
import logging
import re
import signal
import socket
import sys
import time

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.frames import Opcode

CLIENTS = set()  # the connections that are open right now
CLIENT_NUMBERS = itertools.count(1)  # 1, 2, 3, ... in order of arrival


async def handler(websocket):
    """Welcome a client, log what it sends, and forget it when it leaves."""
    client = next(CLIENT_NUMBERS)
    CLIENTS.add(websocket)
    address = "{}:{}".format(*websocket.remote_address)
    logging.info("client #%d connected from %s (%d connected)", client, address, len(CLIENTS))
    try:
        welcome = {"type": "welcome", "client": client, "clients": len(CLIENTS)}
        await websocket.send(json.dumps(welcome))
        async for message in websocket:
            logging.info("client #%d sent %r", client, message[:80])
    except ConnectionClosed:
        pass  # it left, maybe in the middle of a send(): normal on networks
    finally:
        # finally runs however the connection ends, so the count never drifts.
        CLIENTS.discard(websocket)
        why = websocket.protocol.close_exc  # who closed, with which code and why
        logging.info("client #%d disconnected (%d connected): %s", client, len(CLIENTS), why)


def health(connection, request):
    """Answer GET /health over plain HTTP, before any WebSocket handshake."""
    if request.path == "/health":  # e.g. for a load balancer: curl localhost:8765/health
        response = connection.respond(200, json.dumps({"status": "ok", "clients": len(CLIENTS)}))
        del response.headers["Content-Type"]  # respond() made it text/plain
        response.headers["Content-Type"] = "application/json"
        return response


# --- Start-up, flags and safety checks: as in every numbered script, plus /health. ---
# What is above gives main() a handler and the demo's hooks; what is below gives the part
# above ARGS, Limit, warn() and each connection's address and cut().

TIMEOUT = 5  # seconds for an opening or closing handshake to finish
MAX_BACKLOG = 1024 * 1024  # bytes a client may fall behind before it is cut off (1008)
KERNEL_BUFFER = 64 * 1024  # bytes the system may hold for a socket each way (Linux: twice)
# 64 KiB at most per message (more: close code 1009); no compression (docs/performance.md).
SETTINGS = dict(max_size=64 * 1024, compression=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT)
# Programs (no Origin), pages from disk ("null") or this machine: other sites could hijack it.
ORIGINS = [None, "null", re.compile(r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?")]
IN_USE = "it is already in use. Another demo still running? Stop it with Ctrl+C, or use --port {}"


class Connection(ServerConnection):
    """A connection that costs what it may: not read while its writes wait (pongs too), cut
    off past MAX_BACKLOG behind or with too many pings."""

    address = None  # where the client is, once check() lets it in

    def connection_made(self, transport):
        super().connection_made(transport)
        # KiB, not MiB, waiting in the kernel for this socket: so nearly all is counted here.
        sock = transport.get_extra_info("socket")
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, KERNEL_BUFFER)
        self.recv_messages.resume = self.resume_if_writable  # the queue of unread messages

    def resume_if_writable(self):
        """Read again only when both allow it: the queue of unread messages, and the writes."""
        if not self.paused:
            self.transport.resume_reading()

    def pause_writing(self):  # over 32 KiB unsent (write_limit): stop reading from it
        super().pause_writing()
        self.transport.pause_reading()

    def resume_writing(self):
        super().resume_writing()
        if not self.recv_messages.paused:
            self.transport.resume_reading()

    def send_data(self):  # every write passes here: send(), broadcast() and pongs
        super().send_data()
        if self.transport.get_write_buffer_size() > MAX_BACKLOG:
            self.cut("too slow")

    def process_event(self, event):
        if getattr(event, "opcode", None) is Opcode.PING and not PINGS.take(self.address):
            self.cut("too many pings")
        super().process_event(event)

    def cut(self, reason, code=1008):
        """Close at once (1008: it broke a rule, logged); drop it if the client doesn't answer."""
        if self.protocol.state.name == "OPEN":
            if code == 1008:
                warn(self.address, "disconnected a client from %s: %s", self.address, reason)
            self.protocol.fail(code, reason)
            super().send_data()
            self.transport.pause_reading()  # what it sends from now on is not worth reading
            self.loop.call_later(TIMEOUT, self.transport.abort)


class Limit:
    """Token buckets, one per key (mostly an address): `rate` a second, bursts up to `burst`."""

    def __init__(self, rate, burst):
        self.rate, self.burst, self.buckets = rate, burst, {}

    def take(self, key):
        """Take a token from the key's bucket; False if it is empty (rate 0: no limit)."""
        now = time.monotonic()
        tokens, then = self.buckets.pop(key, (self.burst, now))  # put back last: LRU order
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        allowed = tokens >= 1 or not self.rate
        self.buckets[key] = (tokens - 1 if allowed else tokens, now)
        if len(self.buckets) > 10_000:  # forget the least recently seen: memory stays bounded
            del self.buckets[next(iter(self.buckets))]
        return allowed


HANDSHAKES, PINGS, WARNED = Limit(1, 20), Limit(2, 20), Limit(0.1, 1)  # per address


def warn(key, message, *args):
    """Log a warning once per key (an address) every 10 s, not once per attempt."""
    if WARNED.take((key, message)):
        logging.warning(message, *args)


def check(connection, request, response):
    """Let a client in, or say why not: its origin, too many clients, too many from its
    address or too many attempts. Behind a proxy on this machine, X-Real-IP is its address,
    kept as connection.address for every limit per address."""
    status, host = response.status_code, connection.remote_address[0]
    if host in ("127.0.0.1", "::1"):  # X-Real-IP from anywhere else could be a lie
        host = request.headers.get("X-Real-IP", host)
    # Through a proxy a client is elsewhere, where "null" may be any site's sandboxed frame.
    refuse_null = "X-Real-IP" in request.headers and "null" not in ARGS.allow_origin
    if status == 101 and refuse_null and request.headers.get("Origin") == "null":
        response = connection.respond(403, "Origin null is refused through a proxy.\n")
    if response.status_code == 403:  # websockets refused the Origin, or the line above did
        origin = request.headers.get("Origin")
        warn(host, "refused origin %r; to allow it: --allow-origin %r", origin, origin)
        return response
    if status == 101 and len(connection.server.connections) >= ARGS.max_clients:
        warn(None, "refused a client: server full (--max-clients %d)", ARGS.max_clients)
        return connection.respond(503, "Server full.\n")
    limited = status == 101 and ARGS.max_per_address  # 0: no limits per address
    from_there = limited and sum(c.address == host for c in connection.server.connections)
    if limited and from_there >= ARGS.max_per_address:
        warn(host, "refused a client from %s: --max-per-address %d", host, ARGS.max_per_address)
        return connection.respond(429, "Too many connections from your address.\n")
    if limited and not HANDSHAKES.take(host):
        warn(host, "refused a client from %s: too many connection attempts", host)
        return connection.respond(429, "Too many connection attempts: wait a second.\n")
    connection.address = host
    return response


async def main():
    loop, main_task, code = asyncio.get_running_loop(), asyncio.current_task(), [1001]

    def stop_on(sig, *_):  # Ctrl+C: 1001 (going away); SIGTERM, a service manager's: 1012
        code[0] = 1012 if sig == signal.SIGTERM else 1001  # (restart: clients come back)
        main_task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl+C, even from a shell that ignores it
        try:
            loop.add_signal_handler(sig, stop_on, sig)
        except NotImplementedError:  # Windows (where asyncio.run() does this only from 3.11)
            signal.signal(sig, lambda *args: loop.call_soon_threadsafe(stop_on, *args))
    hooks = dict(process_response=check, create_connection=Connection)  # the checks above
    hooks.update(process_request=health)  # GET /health, from the demo's part
    try:  # Bind once to choose the port: given port 0, asyncio would choose one per address.
        with socket.create_server((ARGS.host, ARGS.port)) as probe:
            port = probe.getsockname()[1]
        origins = ORIGINS + ARGS.allow_origin
        server = await serve(handler, ARGS.host, port, origins=origins, **hooks, **SETTINGS)
    except OSError as exc:  # most often the port is taken: by a demo still running?
        why = IN_USE.format(ARGS.port + 1) if exc.errno == errno.EADDRINUSE else exc.strerror
        sys.exit(f"Cannot listen on {ARGS.host} port {ARGS.port}: {why}.")
    host = f"[{ARGS.host}]" if ":" in ARGS.host else ARGS.host
    print(f"Listening on ws://{host}:{port} (Ctrl+C to stop)", flush=True)
    try:
        await asyncio.Future()  # run until Ctrl+C or SIGTERM cancels this task
    finally:
        await stop(server, code[0])


async def stop(server, code):
    """Close every connection with `code`; cut off those that don't answer."""
    server.close(close_connections=False)  # refuse new ones (503); close the others here
    connections = list(server.connections)
    closing = [asyncio.ensure_future(websocket.close(code)) for websocket in connections]
    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):  # or Ctrl+C again
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)
    for websocket in connections:  # close() waits on drain() with no limit:
        websocket.transport.abort()  # cut off the clients that are not reading
    await asyncio.wait([*closing, asyncio.ensure_future(server.wait_closed())])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--host", default="localhost", help="interface to listen on (default: localhost)")
    add("--port", type=int, default=8765, help="port to listen on; 0: any free one (default: 8765)")
    add("--allow-origin", action="append", default=[], help="also accept pages from that origin")
    add("--max-clients", type=int, default=1000, help="clients at most, then 503 (default: 1000)")
    add("--max-per-address", type=int, default=20, help="clients per address (default: 20; 0: any)")
    ARGS = parser.parse_args()
    if not 0 <= ARGS.port <= 65535:
        parser.error(f"--port must be a number from 0 to 65535, not {ARGS.port}")
    if ARGS.max_clients < 1:
        parser.error(f"--max-clients must be at least 1, not {ARGS.max_clients}")
    for name, value in vars(ARGS).items():  # every other number: 0 is off, below is a mistake
        if type(value) is int and value < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 (off) or more, not {value}")
    if ARGS.host not in ("localhost", "127.0.0.1", "::1"):
        print(f"Warning: on {ARGS.host} other machines can connect.", file=sys.stderr)
        ORIGINS.remove("null")  # there, "null" may be any web site in a sandboxed frame
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    logging.getLogger("websockets").setLevel(logging.WARNING)  # errors only
    # websockets 15 and 16 (Python 3.9, 3.10) log a client's bad handshake, a browser's plain
    # http:// visit say, as an error with a traceback; 17 only answers it, as all of them do.
    logging.getLogger("websockets.server").addFilter(
        lambda record: not isinstance(record.exc_info and record.exc_info[1], InvalidHandshake)
    )
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):  # main() cleaned up
        asyncio.run(main())
    print("Server stopped. Goodbye!")
