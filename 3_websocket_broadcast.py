"""A broadcast server: every message goes to every client; one that comes back catches up.

Run it:    python 3_websocket_broadcast.py
Then open 3_client_broadcast.html in two or three browser windows (double-click it).
"""

import argparse
import asyncio
import collections
import contextlib
import errno
import json
import logging
import re
import signal
import socket
import sys
import time
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import broadcast, serve
from websockets.exceptions import ConnectionClosed

CLIENTS = {}  # the connections that are open right now -> their client number
HISTORY = CONVERSATION = None  # a History and a Conversation (see below), made by main()
MAX_TEXT = 1000  # characters in one chat message
RATE = 5  # messages a second one client may send, in bursts of up to twice that (--rate)
MAX_BACKLOG = 1024 * 1024  # bytes a client may fall behind before it is cut off
JOINED, LEFT = [], []  # arrivals and departures not announced yet
# JSON as UTF-8: an emoji takes 4 bytes, not 12 as the escape \ud83d\ude00 would.
to_json = json.JSONEncoder(ensure_ascii=False).encode


async def handler(websocket):
    """Welcome a client with what it missed, then relay each of its messages to everyone."""
    # A client that comes back names the last message it saw: ws://localhost:8765/?since=ID
    since = parse_qs(urlsplit(websocket.request.path).query).get("since", [None])[0]
    client = await CONVERSATION.new_client(websocket, since)  # its number: 1, 2, 3...
    # No await from reading HISTORY to joining CLIENTS, and send() writes at once:
    # each message is in the welcome's history or delivered live, never both.
    CLIENTS[websocket] = client
    welcome = {"type": "welcome", "client": client, "clients": CONVERSATION.online()}
    welcome |= HISTORY.since(since)  # {"history": [...], "recovered": bool, "latest": ID}
    logging.info("client #%d connected from %s", client, address(websocket))
    limit = RateLimit(ARGS.rate)
    try:
        await websocket.send(to_json(welcome))
        await CONVERSATION.publish({"type": "joined", "client": client})
        async for message in websocket:
            problem = limit.check() or problem_with(message)
            if problem is None:
                event = {"type": "message", "client": client, "text": message}
                problem = await CONVERSATION.publish(event)  # None, or (--redis) Redis is away
            if problem:
                await websocket.send(to_json({"type": "error", "reason": problem}))
            if len(limit.refused) > 100:  # in 10 s: a program, not a person typing
                logging.warning("client #%d keeps sending too fast: disconnecting it", client)
                return await websocket.close(1008, "too many messages")
    except ConnectionClosed:
        pass  # it left, maybe in the middle of a send(): normal on networks
    finally:
        # finally runs however the connection ends, so the count never drifts.
        CLIENTS.pop(websocket, None)  # None: already gone if it was cut off as too slow
        logging.info("client #%d disconnected: %s", client, websocket.protocol.close_exc)
        await CONVERSATION.publish({"type": "left", "client": client})


def problem_with(message):
    """Say what is wrong with a message, or return None if it can be broadcast."""
    if isinstance(message, bytes):
        return "binary messages are not supported: send text"
    if not message.strip():
        return "empty message: type something first"
    if len(message) > MAX_TEXT:
        return f"message too long: {len(message)} characters, the limit is {MAX_TEXT}"


class RateLimit:
    """A token bucket: `rate` messages a second, in bursts of up to twice that (0: no limit)."""

    def __init__(self, rate):
        self.rate, self.tokens, self.last, self.refused = rate, 2 * rate, time.monotonic(), []

    def check(self):
        """Take a token for a message; return None, or why the message is refused."""
        now = time.monotonic()
        self.tokens = min(2 * self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1 or not self.rate:
            self.tokens -= 1
            return None
        self.refused = [t for t in self.refused if t > now - 10] + [now]  # the last 10 s
        return f"too many messages: at most {self.rate} a second"


def deliver(event):
    """Hand an event to the clients here; with --redis, events come from every process."""
    kind, client = event["type"], event["client"]
    if kind == "message":
        HISTORY.add(event)
        logging.info("client #%d to %d clients: %.80r", client, len(CLIENTS), event["text"])
        return send_to_all(event)
    # "joined" or "left": announced in batches, 5 a second at most. The first change
    # since the last announcement schedules the next one and later ones ride along.
    if not (JOINED or LEFT):
        asyncio.get_running_loop().call_later(0.2, announce_presence)
    (JOINED if kind == "joined" else LEFT).append(client)


def announce_presence():
    # Up to 20 numbers each, else how many: a storm of N arrivals costs O(N) bytes in all.
    joined, left = (who[:] if len(who) <= 20 else len(who) for who in (JOINED, LEFT))
    online = CONVERSATION.online()
    send_to_all({"type": "presence", "clients": online, "joined": joined, "left": left})
    del JOINED[:], LEFT[:]


def send_to_all(event):
    """Send an event to every client here without waiting for any of them."""
    broadcast(CLIENTS, to_json(event))
    # broadcast() never waits, so what a client doesn't read piles up here.
    # Cut off a client that falls too far behind, before it eats all memory.
    for websocket in [ws for ws in CLIENTS if ws.transport.get_write_buffer_size() > MAX_BACKLOG]:
        client = CLIENTS.pop(websocket)
        logging.warning("client #%d is over %d bytes behind: disconnecting it", client, MAX_BACKLOG)
        # The connection holds the closing task: asyncio itself holds tasks only weakly.
        websocket.closing = asyncio.create_task(websocket.close(1008, "too slow"))
        # It isn't reading, so it won't answer the close either: cut the TCP connection.
        asyncio.get_running_loop().call_later(TIMEOUT, websocket.transport.abort)


class History:
    """The latest messages, oldest first, so that a client that comes back can catch up.

    At most `size` messages and 512 KiB: a welcome fits in a websockets client's 1 MiB."""

    def __init__(self, size, start):
        self.size, self.messages, self.bytes = size, collections.deque(), 0
        self.known = self.latest = start  # all after `known` is here; `latest`: the newest id

    def add(self, event):
        self.messages.append(event)
        self.bytes += len(to_json(event).encode())
        self.latest = event["id"]
        while len(self.messages) > self.size or self.bytes > 512 * 1024:  # the oldest go
            oldest = self.messages.popleft()
            self.bytes -= len(to_json(oldest).encode())
            self.known = oldest["id"]

    def since(self, message_id):
        """Every message after message_id if all are here, else the latest 20 (not recovered)."""
        ids = [self.known, *(event["id"] for event in self.messages)]
        recovered = message_id in ids
        history = list(self.messages)[ids.index(message_id) if recovered else -20 :]
        return {"history": history, "recovered": recovered, "latest": self.latest}


class Conversation:
    """One process, one conversation; with --redis, broadcast_redis.Conversation instead."""

    available, arriving = True, 0  # --redis: False while Redis is away; clients waiting on it
    clients = messages = 0  # how many came, and were said, so far
    started = time.time_ns() // 1_000_000  # ids start with it: none repeats after a restart

    async def new_client(self, websocket, since):
        self.clients += 1
        return self.clients

    async def publish(self, event):
        """Deliver an event to every client; return None, or why it could not be."""
        if event["type"] == "message":  # it gets an id, and the time it was said (in ms)
            self.messages += 1
            event |= {"id": f"{self.started}-{self.messages}", "time": time.time_ns() // 10**6}
        deliver(event)

    def online(self):
        return len(CLIENTS)


# --- Start-up, flags and safety checks: as in every script, plus /health, a proxy, --rate... ---

TIMEOUT = 5  # seconds for an opening or closing handshake to finish
# 64 KiB at most per message (more: close code 1009); no compression (docs/performance.md).
SETTINGS = dict(max_size=64 * 1024, compression=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT)
# Programs (no Origin), pages from disk ("null") or this machine: other sites could hijack it.
ORIGINS = [None, "null", re.compile(r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?")]
IN_USE = "it is already in use. Another demo still running? Stop it with Ctrl+C, or use --port {}"


def check(connection, request, response):
    """Answer /health; refuse a client past --max-clients; name a refused origin."""
    if request.path == "/health":  # for nginx or a load balancer: 503 while Redis is away
        ok = CONVERSATION.available
        body = {"status": "ok" if ok else "unavailable", "clients": len(CLIENTS)}
        return connection.respond(200 if ok else 503, to_json(body) + "\n")
    # Through a proxy a client is elsewhere, where "null" may be any site's sandboxed frame.
    proxied = "X-Real-IP" in request.headers and "null" not in ARGS.allow_origin
    if response.status_code == 101 and proxied and request.headers.get("Origin") == "null":
        response = connection.respond(403, "Origin null is refused through a proxy.\n")
    if response.status_code == 403:  # websockets refused the Origin, or the line above did
        origin = request.headers.get("Origin")
        logging.warning("refused origin %r; to allow it: --allow-origin %r", origin, origin)
        return response
    # Count the clients still waiting for Redis too: --max-clients holds during a burst.
    if response.status_code == 101 and len(CLIENTS) + CONVERSATION.arriving >= ARGS.max_clients:
        logging.warning("refused a client: server full (--max-clients %d)", ARGS.max_clients)
        return connection.respond(503, "Server full.\n")
    if response.status_code == 101 and not CONVERSATION.available:  # --redis, Redis away
        logging.warning("refused a client: the broadcast is unavailable until Redis is back")
        return connection.respond(503, "Broadcast unavailable, try again soon.\n")


def address(connection):
    """Where a client is: behind a proxy on this machine, where the proxy saw it."""
    host, port = connection.remote_address[:2]
    proxy = host in ("127.0.0.1", "::1")  # X-Real-IP from anywhere else could be a lie
    return (proxy and connection.request.headers.get("X-Real-IP")) or f"{host}:{port}"


async def main():
    global HISTORY, CONVERSATION
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl+C, even from a shell that ignores it
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl+C is KeyboardInterrupt
            asyncio.get_running_loop().add_signal_handler(sig, asyncio.current_task().cancel)
    try:  # Bind once to choose the port: given port 0, asyncio would choose one per address.
        with socket.create_server((ARGS.host, ARGS.port)) as probe:
            port = probe.getsockname()[1]
        HISTORY, CONVERSATION = History(ARGS.history, f"{Conversation.started}-0"), Conversation()
        if ARGS.redis:  # only once the port is ours; the demo alone never imports redis
            import broadcast_redis

            CONVERSATION = await broadcast_redis.start(ARGS.redis, HISTORY, deliver, CLIENTS)
        settings = dict(origins=ORIGINS + ARGS.allow_origin, process_response=check, **SETTINGS)
        server = await serve(handler, ARGS.host, port, **settings)
    except OSError as exc:  # most often the port is taken: by a demo still running?
        why = IN_USE.format(ARGS.port + 1) if exc.errno == errno.EADDRINUSE else exc.strerror
        sys.exit(f"Cannot listen on {ARGS.host} port {ARGS.port}: {why}.")
    host = f"[{ARGS.host}]" if ":" in ARGS.host else ARGS.host
    print(f"Listening on ws://{host}:{port} (Ctrl+C to stop)", flush=True)
    try:
        await asyncio.Future()  # run until Ctrl+C or SIGTERM cancels this task
    finally:
        server.close()  # every client gets close code 1001 (going away)
        connections = list(server.connections)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):  # or a second Ctrl+C
            await asyncio.wait_for(server.wait_closed(), TIMEOUT)
        for websocket in connections:  # close() waits on drain() with no limit:
            websocket.transport.abort()  # cut off the clients that are not reading
        await server.wait_closed()
        if ARGS.redis:
            await CONVERSATION.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--host", default="localhost", help="interface to listen on (default: localhost)")
    add("--port", type=int, default=8765, help="port to listen on; 0: any free one (default: 8765)")
    add("--allow-origin", action="append", default=[], help="also accept pages from that origin")
    add("--max-clients", type=int, default=1000, help="clients at most, then 503 (default: 1000)")
    add("--history", type=int, default=100, help="messages kept for catching up (default: 100)")
    add("--rate", type=int, default=RATE, help="messages a second per client (default: 5; 0: none)")
    add("--redis", metavar="URL", help="share the conversation through Redis (docs/scaling-out.md)")
    ARGS = parser.parse_args()
    if not 0 <= ARGS.port <= 65535:
        parser.error(f"--port must be a number from 0 to 65535, not {ARGS.port}")
    if ARGS.max_clients < 1:
        parser.error(f"--max-clients must be at least 1, not {ARGS.max_clients}")
    if ARGS.history < 0 or ARGS.rate < 0:
        flag, value = ("--history", ARGS.history) if ARGS.history < 0 else ("--rate", ARGS.rate)
        parser.error(f"{flag} must be 0 (off) or more, not {value}")
    if ARGS.host not in ("localhost", "127.0.0.1", "::1"):
        print(f"Warning: on {ARGS.host} other machines can connect.", file=sys.stderr)
        ORIGINS.remove("null")  # there, "null" may be any web site in a sandboxed frame
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    logging.getLogger("websockets").setLevel(logging.WARNING)  # errors only
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):  # main() cleaned up
        asyncio.run(main())
    print("Server stopped. Goodbye!")
