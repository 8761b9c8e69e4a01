"""A broadcast server: every message goes to every connected client.

Run it:    python 3_websocket_broadcast.py
Then open 3_client_broadcast.html in two or three browser windows (double-click it).
"""

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import itertools
import json
import logging
import os
import re
import signal
import socket
import sys
from functools import partial
from http import HTTPStatus

from websockets.asyncio.server import broadcast, serve
from websockets.exceptions import ConnectionClosedError
from websockets.frames import CloseCode

CLIENTS = {}  # the connections that are open right now -> their client number
CLIENT_NUMBERS = itertools.count(1)  # 1, 2, 3, ... in order of arrival
MAX_SIZE = 64 * 1024  # bigger messages close the connection with code 1009
MAX_TEXT = 1000  # characters in one chat message
MAX_BACKLOG = 1024 * 1024  # bytes a client may fall behind before it is cut off
PRESENCE_INTERVAL = 0.2  # seconds: at most 5 presence updates a second
TIMEOUT = 5  # seconds for an opening or closing handshake to finish
JOINED, LEFT = [], []  # arrivals and departures not announced yet
TASKS = set()  # asyncio keeps only weak references to tasks: hold them here


async def handler(websocket):
    """Welcome a client, then relay each of its messages to everyone."""
    client = await new_client_number()
    if client is None:  # only with --redis, while Redis is unreachable
        await websocket.close(CloseCode.TRY_AGAIN_LATER, "broadcast unavailable")
        return
    address = "{}:{}".format(*websocket.remote_address)
    CLIENTS[websocket] = client
    logging.info("client #%d connected from %s (%d connected)", client, address, len(CLIENTS))
    await share({"type": "joined", "client": client})
    try:
        await websocket.send(json.dumps({"type": "welcome", "client": client, "clients": online()}))
        async for message in websocket:
            if problem := problem_with(message):
                await websocket.send(json.dumps({"type": "error", "reason": problem}))
            elif not await share({"type": "message", "client": client, "text": message}):
                reason = "broadcast unavailable: Redis is unreachable, try again soon"
                await websocket.send(json.dumps({"type": "error", "reason": reason}))
    except ConnectionClosedError:
        pass  # the client vanished without a closing handshake: normal on networks
    finally:
        # finally runs however the connection ends, so the count never drifts.
        CLIENTS.pop(websocket, None)  # None: already gone if it was cut off as too slow
        logging.info(
            "client #%d disconnected (code %s, %d connected)",
            client,
            websocket.close_code,
            len(CLIENTS),
        )
        await share({"type": "left", "client": client})


def problem_with(message):
    """Say what is wrong with a message, or return None if it can be broadcast."""
    if isinstance(message, bytes):
        return "binary messages are not supported: send text"
    if not message.strip():
        return "empty message: type something first"
    if len(message) > MAX_TEXT:
        return f"message too long: {len(message)} characters, the limit is {MAX_TEXT}"
    return None


def deliver(event):
    """Hand an event (from this process or, with --redis, from any) to the clients here."""
    server = event.pop("server", SERVER_ID)
    if event["type"] == "message":
        logging.info(
            "client #%d to %d clients: %r", event["client"], len(CLIENTS), event["text"][:80]
        )
        send_to_all(event)
    elif event["type"] == "heartbeat":
        if server != SERVER_ID:
            server_seen(server, set(event["clients"]))
    else:  # "joined" or "left"
        joined = event["type"] == "joined"
        if server != SERVER_ID:
            clients = OTHER_SERVERS.get(server, (set(), 0))[0]
            if (event["client"] in clients) == joined:
                return  # its heartbeat told us already
            (clients.add if joined else clients.discard)(event["client"])
            OTHER_SERVERS[server] = (clients, asyncio.get_running_loop().time())
        presence_changed(JOINED if joined else LEFT, [event["client"]])


def send_to_all(event):
    """Send an event to every client here without waiting for any of them."""
    broadcast(CLIENTS, json.dumps(event))
    # broadcast() never waits, so what a client doesn't read piles up here.
    # Cut off a client that falls too far behind, before it eats all memory.
    for websocket in [ws for ws in CLIENTS if ws.transport.get_write_buffer_size() > MAX_BACKLOG]:
        client = CLIENTS.pop(websocket)
        logging.warning(
            "client #%d is over %d KiB behind: disconnecting it", client, MAX_BACKLOG // 1024
        )
        close = asyncio.create_task(websocket.close(CloseCode.POLICY_VIOLATION, "too slow"))
        TASKS.add(close)
        close.add_done_callback(TASKS.discard)
        # It isn't reading, so it won't answer the close either: cut the TCP connection.
        asyncio.get_running_loop().call_later(TIMEOUT, websocket.transport.abort)


def presence_changed(changes, clients):
    """Note arrivals or departures; announce them in batches, 5 a second at most."""
    first = not (JOINED or LEFT)
    changes.extend(clients)
    # The first change since the last announcement schedules the next one and
    # later changes ride along: a storm of N arrivals costs O(N) frames, not O(N²).
    if first and clients:
        asyncio.get_running_loop().call_later(PRESENCE_INTERVAL, announce_presence)


def announce_presence():
    send_to_all({"type": "presence", "clients": online(), "joined": JOINED, "left": LEFT})
    JOINED.clear()
    LEFT.clear()


# Scaling out, optional: with --redis URL, any number of these processes share one
# conversation. Each publishes its events to one Redis channel and delivers only
# what comes back, so Redis puts every message in one order for every client.
# Without --redis, share() delivers at once and nothing here touches Redis.

REDIS = None  # with --redis: a redis.asyncio client
RedisError = ()  # with --redis: redis.exceptions.RedisError (an empty tuple catches nothing)
CHANNEL, COUNTER = "broadcast:events", "broadcast:client-numbers"
SERVER_ID = f"{socket.gethostname()}:{os.getpid()}"
OTHER_SERVERS = {}  # with --redis: another process -> (its client numbers, when last heard)
# One Redis command at a time: Redis gets this process's events in the order they
# happened, and a storm of arrivals queues here instead of opening a connection each.
ONE_AT_A_TIME = asyncio.Lock()
SUBSCRIBED = asyncio.Event()  # set while the channel is relayed, i.e. Redis is there
HEARTBEAT = 2  # seconds between "I'm alive, with these clients" messages
SILENT_LIMIT = 7  # seconds without a heartbeat before a process counts as dead


def online():
    """How many clients are connected, here and on every other live process."""
    return len(CLIENTS) + sum(len(clients) for clients, _ in OTHER_SERVERS.values())


async def new_client_number():
    """The next client number, unique across all processes; None if Redis is down."""
    if REDIS is None:
        return next(CLIENT_NUMBERS)
    if not SUBSCRIBED.is_set():
        return None
    try:
        async with ONE_AT_A_TIME:
            return await REDIS.incr(COUNTER)
    except RedisError:
        return None


async def share(event):
    """Deliver an event to every process's clients. False if Redis is unreachable."""
    if REDIS is None:
        deliver(event)
        return True
    if not SUBSCRIBED.is_set():  # Redis is down: don't queue up attempts
        return False
    try:
        async with ONE_AT_A_TIME:
            await REDIS.publish(CHANNEL, json.dumps({**event, "server": SERVER_ID}))
        return True
    except RedisError as exc:
        logging.warning("cannot publish to Redis: %s", exc)
        return False


def server_seen(server, clients):
    """Update what we know of another process; announce whoever came or went there."""
    before = OTHER_SERVERS.get(server, (set(), 0))[0]
    OTHER_SERVERS[server] = (clients, asyncio.get_running_loop().time())
    presence_changed(JOINED, sorted(clients - before))
    presence_changed(LEFT, sorted(before - clients))


async def relay_from_redis():
    """Deliver every event published to the channel; if Redis goes away, retry with backoff."""
    delay = 1
    while True:
        try:
            async with REDIS.pubsub() as pubsub:
                await pubsub.subscribe(CHANNEL)
                # After a Redis restart the counter starts again at 0: lift it
                # above every client number still in use, so numbers stay unique.
                known = [*CLIENTS.values(), *(n for c, _ in OTHER_SERVERS.values() for n in c)]
                await REDIS.eval(LIFT_COUNTER, 1, COUNTER, max(known, default=0))
                logging.info("relaying Redis channel %r", CHANNEL)
                SUBSCRIBED.set()
                delay = 1
                async for item in pubsub.listen():
                    if item["type"] == "message":
                        deliver(json.loads(item["data"]))
        except RedisError as exc:
            SUBSCRIBED.clear()
            logging.warning("lost Redis (%s); retrying in %d s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 30)


async def connect_redis(url):
    """With --redis: connect to Redis, or say in one sentence why not."""
    global REDIS, RedisError
    try:
        import redis.asyncio
        from redis.exceptions import RedisError
    except ImportError:
        sys.exit("--redis needs the redis package: pip install redis")
    try:
        REDIS = redis.asyncio.from_url(url, socket_timeout=TIMEOUT)
        await REDIS.ping()
    except (RedisError, ValueError) as exc:
        sys.exit(f"Cannot reach Redis at {url}: {exc}. Start Redis, or run without --redis.")


LIFT_COUNTER = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
    redis.call('SET', KEYS[1], ARGV[1])
end"""


async def heartbeat():
    """Tell the other processes who is connected here; forget those that went silent."""
    while True:
        await share({"type": "heartbeat", "clients": list(CLIENTS.values())})
        now = asyncio.get_running_loop().time()
        for server, (clients, heard) in list(OTHER_SERVERS.items()):
            if now - heard > SILENT_LIMIT:  # killed, or cut off from Redis
                del OTHER_SERVERS[server]
                if clients:
                    logging.warning("%s went silent; its %d clients left", server, len(clients))
                presence_changed(LEFT, sorted(clients))
        await asyncio.sleep(HEARTBEAT)


LOCAL_PAGE = re.compile(r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?")


def process_request(connection, request, allowed_origins, max_clients):
    """Refuse foreign web pages, and cap the number of clients."""
    # Browsers always send Origin; any web page could otherwise use a visitor's
    # browser to talk to this server (Cross-Site WebSocket Hijacking).
    # No Origin: not a browser. "null": a page opened from disk.
    origin = ", ".join(request.headers.get_all("Origin")) or None
    if origin not in (None, "null", *allowed_origins) and not LOCAL_PAGE.fullmatch(origin):
        logging.warning("refused origin %r; to allow it: --allow-origin %r", origin, origin)
        return connection.respond(HTTPStatus.FORBIDDEN, "Origin not allowed.\n")
    if len(CLIENTS) >= max_clients:
        logging.warning("refused a connection: %d clients is the limit", max_clients)
        return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "Server full.\n")
    return None


async def main(args):
    checks = partial(
        process_request, allowed_origins=args.allow_origin, max_clients=args.max_clients
    )
    if args.redis:
        await connect_redis(args.redis)
        redis_tasks = [asyncio.create_task(relay_from_redis()), asyncio.create_task(heartbeat())]
        await SUBSCRIBED.wait()
    try:
        server = await serve(
            handler,
            args.host,
            args.port,
            process_request=checks,
            max_size=MAX_SIZE,
            compression=None,  # see README, "Performance": small messages gain little
            open_timeout=TIMEOUT,
            close_timeout=TIMEOUT,
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            sys.exit(
                f"Port {args.port} is already in use (is the server already running?). "
                "Stop the other program, or choose another port with --port."
            )
        sys.exit(f"Cannot listen on {args.host}:{args.port}: {exc.strerror}.")
    port = server.sockets[0].getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Listening on ws://{host}:{port} (Ctrl+C to stop)", flush=True)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    with contextlib.suppress(NotImplementedError):  # Windows has no SIGTERM handler
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()  # until SIGTERM, or Ctrl+C cancels this task
    finally:
        server.close()  # every client gets close code 1001 (going away)
        for websocket in CLIENTS:  # a client that stopped reading never answers:
            loop.call_later(TIMEOUT, websocket.transport.abort)
        await server.wait_closed()
        if REDIS is not None:
            for task in redis_tasks:
                task.cancel()
            await REDIS.aclose()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="localhost", help="interface (default: localhost)")
    parser.add_argument(
        "--port", type=int, default=8765, help="0 picks a free port (default: 8765)"
    )
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="also accept web pages from ORIGIN, e.g. https://example.com",
    )
    parser.add_argument(
        "--max-clients", type=int, default=1000, help="refuse more with HTTP 503 (default: 1000)"
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="share the conversation with other "
        "processes through Redis, e.g. redis://localhost:6379/0",
    )
    args = parser.parse_args()
    if not 0 <= args.port <= 65535 or args.max_clients < 1:
        parser.error("--port must be 0 to 65535, and --max-clients at least 1")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"Warning: listening on {args.host!r}: other machines can connect.", file=sys.stderr)
    return args


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    logging.getLogger("websockets").setLevel(logging.WARNING)  # errors only
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C: main() closed every connection
        asyncio.run(main(parse_args()))
    print("Server stopped. Goodbye!")
