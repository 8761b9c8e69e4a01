"""A broadcast server: every message goes to every client; one that comes back catches up.

Run it:    python 3_websocket_broadcast.py
Then open 3_client_broadcast.html in two or three browser windows (double-click it).
"""

import argparse
import asyncio
import collections
import contextlib
import itertools
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
MAX_TEXT = 1000  # characters in one chat message
MAX_BACKLOG = 1024 * 1024  # bytes a client may fall behind before it is cut off
JOINED, LEFT = [], []  # arrivals and departures not announced yet


async def handler(websocket):
    """Welcome a client with what it missed, then relay each of its messages to everyone."""
    client = await CONVERSATION.client_number()
    if client is None:  # only with --redis, if Redis went away since the handshake
        return await websocket.close(1013, "broadcast unavailable, try again later")
    since = parse_qs(urlsplit(websocket.request.path).query).get("since", [None])[0]
    catch_up = HISTORY.since(since)  # {"history": [...], "recovered": True or False}
    # No await from reading HISTORY to joining CLIENTS, and send() writes at once:
    # each message is in the welcome's history or delivered live, never both.
    CLIENTS[websocket] = client
    welcome = {"type": "welcome", "client": client, "clients": CONVERSATION.online(), **catch_up}
    logging.info("client #%d connected from %s:%d", client, *websocket.remote_address[:2])
    try:
        await websocket.send(json.dumps(welcome))
        await CONVERSATION.publish({"type": "joined", "client": client})
        async for message in websocket:
            event = {"type": "message", "client": client, "text": message}
            # publish() too says what went wrong, if anything (with --redis: Redis is down).
            if problem := problem_with(message) or await CONVERSATION.publish(event):
                await websocket.send(json.dumps({"type": "error", "reason": problem}))
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


def deliver(event):
    """Hand an event to the clients here; with --redis, events come from every process."""
    kind, client = event["type"], event["client"]
    if kind == "message":
        HISTORY.add(event)
        logging.info("client #%d to %d clients: %.80r", client, len(CLIENTS), event["text"])
        return send_to_all(event)
    # "joined" or "left": announced in batches, 5 a second at most. The first change
    # since the last announcement schedules the next one and later ones ride along:
    # a storm of N arrivals costs O(N) frames, not O(N²).
    if not (JOINED or LEFT):
        asyncio.get_running_loop().call_later(0.2, announce_presence)
    (JOINED if kind == "joined" else LEFT).append(client)


def send_to_all(event):
    """Send an event to every client here without waiting for any of them."""
    broadcast(CLIENTS, json.dumps(event))
    # broadcast() never waits, so what a client doesn't read piles up here.
    # Cut off a client that falls too far behind, before it eats all memory.
    for websocket in [ws for ws in CLIENTS if ws.transport.get_write_buffer_size() > MAX_BACKLOG]:
        client = CLIENTS.pop(websocket)
        logging.warning("client #%d is over %d bytes behind: disconnecting it", client, MAX_BACKLOG)
        # The connection holds the closing task: asyncio itself holds tasks only weakly.
        websocket.closing = asyncio.create_task(websocket.close(1008, "too slow"))
        # It isn't reading, so it won't answer the close either: cut the TCP connection.
        asyncio.get_running_loop().call_later(TIMEOUT, websocket.transport.abort)


def announce_presence():
    online = CONVERSATION.online()
    send_to_all({"type": "presence", "clients": online, "joined": JOINED, "left": LEFT})
    JOINED.clear()
    LEFT.clear()


class History:
    """The latest messages, oldest first, so that a client that comes back can catch up."""

    def __init__(self, size):
        self.messages = collections.deque(maxlen=size)
        self.forgotten = None  # the newest id no longer held: all after it is here

    def add(self, event):
        if len(self.messages) == self.messages.maxlen:  # full (or size 0): the oldest goes
            self.forgotten = (self.messages[0] if self.messages else event)["id"]
        self.messages.append(event)

    def since(self, message_id):
        """Every message after message_id if all are here, else the latest 20 (not recovered)."""
        ids = [self.forgotten, *(event["id"] for event in self.messages)]
        if message_id is not None and message_id in ids:
            return {"history": list(self.messages)[ids.index(message_id) :], "recovered": True}
        return {"history": list(self.messages)[-20:], "recovered": False}


class Conversation:
    """One process, one conversation; with --redis, broadcast_redis.Conversation instead."""

    available = True  # with --redis, False while Redis is unreachable
    client_numbers = itertools.count(1)  # 1, 2, 3, ... in order of arrival
    # Ids must not repeat after a restart: they start with the time the server did.
    message_ids = map(f"{time.time_ns() // 1_000_000}-{{}}".format, itertools.count(1))

    async def client_number(self):
        return next(self.client_numbers)

    async def publish(self, event):
        """Deliver an event to every client; return None, or why it could not be."""
        if event["type"] == "message":
            event = {"type": "message", "id": next(self.message_ids), **event}
        deliver(event)

    def online(self):
        return len(CLIENTS)


# --- Start-up, flags and safety checks: as in every numbered script, plus --history, --redis. ---

TIMEOUT = 5  # seconds for an opening or closing handshake to finish
# 64 KiB at most per message (more: close code 1009); no compression (docs/performance.md).
SETTINGS = dict(max_size=64 * 1024, compression=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT)
# Programs (no Origin), pages from disk ("null") or this machine; other web sites could
# use a visitor's browser to talk to this server (Cross-Site WebSocket Hijacking).
ORIGINS = [None, "null", re.compile(r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?")]


def check(connection, request, response):
    """Refuse a client past --max-clients; name a refused origin and how to allow it."""
    if response.status_code == 403:  # websockets refused the Origin
        origin = request.headers.get("Origin")
        logging.warning("refused origin %r; to allow it: --allow-origin %r", origin, origin)
    elif response.status_code == 101 and len(CLIENTS) >= ARGS.max_clients:
        logging.warning("refused a client: server full (--max-clients %d)", ARGS.max_clients)
        return connection.respond(503, "Server full.\n")
    elif response.status_code == 101 and not CONVERSATION.available:  # --redis, Redis down
        logging.warning("refused a client: the broadcast is unavailable until Redis is back")
        return connection.respond(503, "Broadcast unavailable, try again soon.\n")


async def main():
    global CONVERSATION
    if ARGS.redis:  # imported only with --redis: the demo alone never needs redis
        import broadcast_redis

        CONVERSATION = await broadcast_redis.start(ARGS.redis, HISTORY, deliver, CLIENTS, TIMEOUT)
    try:  # Bind once to choose the port: given port 0, asyncio would choose one per address.
        with socket.create_server((ARGS.host, ARGS.port)) as probe:
            port = probe.getsockname()[1]
        settings = dict(origins=ORIGINS + ARGS.allow_origin, process_response=check, **SETTINGS)
        server = await serve(handler, ARGS.host, port, **settings)
    except OSError as exc:  # "Address already in use": is the server running already?
        sys.exit(f"Cannot listen on {ARGS.host} port {ARGS.port}: {exc.strerror}.")
    host = f"[{ARGS.host}]" if ":" in ARGS.host else ARGS.host
    print(f"Listening on ws://{host}:{port} (Ctrl+C to stop)", flush=True)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):  # Windows has no SIGTERM, only Ctrl+C
        loop.add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)  # as Ctrl+C
    try:
        await asyncio.Future()  # run until Ctrl+C or SIGTERM cancels this task
    finally:
        server.close()  # every client gets close code 1001 (going away)
        for websocket in server.connections:  # close() waits on drain() with no limit:
            loop.call_later(TIMEOUT, websocket.transport.abort)  # cut off clients not reading
        await server.wait_closed()
        if ARGS.redis:
            await CONVERSATION.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="localhost", help="interface (default: localhost)")
    parser.add_argument("--port", type=int, default=8765, help="0: any free port (default: 8765)")
    parser.add_argument("--allow-origin", action="append", default=[], help="accept its pages")
    parser.add_argument("--max-clients", type=int, default=1000, help="(default: 1000)")
    parser.add_argument("--history", type=int, default=100, help="messages kept (default: 100)")
    parser.add_argument("--redis", metavar="URL", help="share the conversation through Redis")
    ARGS = parser.parse_args()
    if not 0 <= ARGS.port <= 65535:
        parser.error(f"--port must be a number from 0 to 65535, not {ARGS.port}")
    if ARGS.max_clients < 1:
        parser.error(f"--max-clients must be at least 1, not {ARGS.max_clients}")
    if ARGS.history < 0:
        parser.error(f"--history must be 0 (off) or more, not {ARGS.history}")
    if ARGS.host not in ("localhost", "127.0.0.1", "::1"):
        print(f"Warning: on {ARGS.host} other machines can connect.", file=sys.stderr)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    logging.getLogger("websockets").setLevel(logging.WARNING)  # errors only
    HISTORY, CONVERSATION = History(ARGS.history), Conversation()
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):  # main() cleaned up
        asyncio.run(main())
    print("Server stopped. Goodbye!")
