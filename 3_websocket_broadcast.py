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
import secrets
import signal
import socket
import sys
import time
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.frames import Opcode

CLIENTS = {}  # the connections that are open right now -> their client number
HISTORY = CONVERSATION = RATES = STRIKES = None  # made by lifespan(), below
MAX_TEXT = 1000  # characters in one chat message
CHAT = "chat"  # the subprotocol the page speaks: JSON frames, a hello first (README)
# JSON as UTF-8: an emoji takes 4 bytes, not 12 as the escape \ud83d\ude00 would.
to_json = json.JSONEncoder(ensure_ascii=False).encode


async def handler(websocket):
    """Welcome a client with what it missed, then relay each of its messages to everyone."""
    # A client that comes back names the last message it saw: ws://localhost:8765/?since=ID
    since = parse_qs(urlsplit(websocket.request.path).query).get("since", [None])[0]
    # A page that speaks "chat" proves who it was with the secret its last welcome gave it.
    secret = await hello(websocket) if websocket.subprotocol == CHAT else None
    client, resume = await CONVERSATION.new_client(websocket, since, secret)  # 1, 2, 3...
    for old in [ws for ws, number in CLIENTS.items() if number == client]:  # one number, one
        old.cut("replaced by a newer connection", 4001)  # connection (a blip left it open)
    # From joining CLIENTS to send(), nothing awaits (send() writes before it could wait):
    # so each message is either in the welcome's history or sent after it, exactly once.
    CLIENTS[websocket] = client
    online = len(ANNOUNCED | CONVERSATION.numbers())  # those away a moment, and newcomers
    welcome = {"type": "welcome", "client": client, "clients": online}
    welcome |= HISTORY.since(since)  # {"history": [...], "recovered": bool, "latest": ID}
    if resume:  # (chat) the proof of who it is, for its next connection: kept secret,
        welcome |= {"resume": resume, "rate": ARGS.rate}  # and how fast it may send
    logging.info("client #%d connected from %s", client, websocket.address)
    try:
        await websocket.send(to_json(welcome))
        await CONVERSATION.publish({"type": "joined", "client": client})
        async for frame in websocket:
            text, ref = unpack(frame, websocket)  # ref: {"ref": the page's id for it}, or {}
            problem = problem_with(text, websocket)
            if problem:
                reply = {"type": "error", "reason": problem}
            else:  # None, or for the sender alone: why not, or (sent before) where it went
                event = {"type": "message", "client": client, "text": text, **ref}
                reply = await CONVERSATION.publish(event)
            if reply:
                await websocket.send(to_json({**reply, **ref}))
    except ConnectionClosed:
        pass  # it left, maybe in the middle of a send(): normal on networks
    finally:
        # finally runs however the connection ends, so the count never drifts.
        del CLIENTS[websocket]
        logging.info("client #%d disconnected: %s", client, websocket.protocol.close_exc)
        await CONVERSATION.leave(websocket, client)  # "left", unless it is back in LINGER s


async def hello(websocket):
    """The secret in a page's first frame, {"type": "hello", "resume": SECRET}, if any."""
    try:
        frame = json.loads(await asyncio.wait_for(websocket.recv(), TIMEOUT))
        secret = frame.get("resume") if frame.get("type") == "hello" else None
    except (ConnectionClosed, asyncio.TimeoutError, ValueError, AttributeError):
        secret = None  # no secret: a new number (a closed connection ends just after)
    return secret if isinstance(secret, str) else None


def unpack(frame, websocket):
    """A message's text and the page's id for it: (text, {}) from a plain client, and from
    a page, which speaks "chat", {"type": "message", "text": "...", "ref": "ID"}."""
    if websocket.subprotocol != CHAT or isinstance(frame, bytes):
        return frame, {}
    with contextlib.suppress(ValueError, KeyError, TypeError):
        message = json.loads(frame)
        if isinstance(message["ref"], str) and 0 < len(message["ref"]) <= 64:
            return message["text"], {"ref": message["ref"]}
    return None, {}  # unreadable: problem_with() says what to send


def deliver(event):
    """Hand an event to the clients here; with --redis, events come from every process."""
    if event["type"] == "message":
        HISTORY.add(event)
        logging.info(
            "client #%d to %d clients: %.80r", event["client"], len(CLIENTS), event["text"]
        )
        send_to_all(event)
    elif event["type"] in ("joined", "left"):
        announce_soon()
    else:  # a type that a newer version sends, during a rolling deploy: skip it
        warn(event["type"], "skipped events of unknown type %r", event["type"])


def send_to_all(event):
    """Send an event to every client here without waiting for any of them."""
    # A client that falls behind is cut off (see Connection, below): never the others.
    broadcast(CLIENTS, to_json(event))


# Presence: who is here. A client that drops out has LINGER seconds to come back (a reload,
# a network blip, a restart of its server) before anyone is told it left.

LINGER = 5  # seconds
ANNOUNCED, MISSING = set(), {}  # the numbers said to be here; those gone since -> when
TIMER = None  # the next announcement, once one is due


def announce_soon():
    """Announce presence in 0.2 s: 5 times a second at most, later changes ride along."""
    global TIMER
    if TIMER is None:
        TIMER = asyncio.get_running_loop().call_later(0.2, announce_presence)


def announce_presence():
    """One presence event for who came, and who went more than LINGER seconds ago."""
    global TIMER, MISSING
    TIMER, now, here = None, asyncio.get_running_loop().time(), CONVERSATION.numbers()
    # Who is away, since when. One back in time drops out: nobody needs to know it was away.
    MISSING = {client: MISSING.get(client, now) for client in ANNOUNCED - here}
    joined = sorted(here - ANNOUNCED)
    left = sorted(client for client, since in MISSING.items() if now - since >= LINGER)
    ANNOUNCED.update(joined)
    ANNOUNCED.difference_update(left)
    if len(left) < len(MISSING):  # look again until each is back, or gone LINGER seconds
        announce_soon()
    if joined or left:  # up to 20 numbers each, else how many: a storm costs O(N) in all
        joined, left = (who if len(who) <= 20 else len(who) for who in (joined, left))
        online = len(ANNOUNCED)
        send_to_all({"type": "presence", "clients": online, "joined": joined, "left": left})


# What protects everyone: one client cannot flood the others. (Nor hold the server's memory
# or every place in it: Connection and check(), in the start-up below.)

RATE = 5  # messages a second from one address, in bursts of up to twice that (--rate)


def problem_with(message, websocket):
    """Say what is wrong with a message, or return None if it can be broadcast."""
    if not RATES.take(websocket.address):  # per address: reconnecting resets nothing
        if not STRIKES.take(websocket.address):  # 100 refused in a row, 200 in 10 s: a program
            websocket.cut("too many messages")
        return f"too many messages: at most {ARGS.rate} a second"
    if isinstance(message, bytes):
        return "binary messages are not supported: send text"
    if not isinstance(message, str):  # from a page that speaks "chat"
        return 'unreadable: send {"type": "message", "text": "...", "ref": "an id"}'
    if not message.strip():
        return "empty message: type something first"
    if len(message) > MAX_TEXT:
        return f"message too long: {len(message)} characters, the limit is {MAX_TEXT}"
    return None


# The conversation: in this process, or shared by several through Redis (--redis).


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

    available = True  # --redis: False while Redis is away
    clients = messages = 0  # how many came, and were said, so far
    started = time.time_ns() // 1_000_000  # ids start with it: none repeats after a restart

    def __init__(self):
        self.resumable = collections.OrderedDict()  # secret -> (client number, valid until)
        self.refs = collections.OrderedDict()  # (client, ref) of the latest messages -> id

    async def new_client(self, websocket, since, secret):
        """The number a secret was given for, once, else a new one; and a new secret."""
        client, until = self.resumable.pop(secret, (0, 0))
        if until < time.monotonic():  # none, forged, used already or too old
            self.clients += 1
            client = self.clients
        websocket.resume = None
        if websocket.subprotocol:  # a client that can give it back: a page
            websocket.resume = secrets.token_urlsafe(16)  # 128 random bits
            self.resumable[websocket.resume] = (client, time.monotonic() + 24 * 3600)
            if len(self.resumable) > 10_000:  # memory stays bounded: forget the oldest
                self.resumable.popitem(last=False)
        return client, websocket.resume

    async def publish(self, event):
        """Deliver an event to every client; return None, or a reply for its sender."""
        if event["type"] == "message":  # it gets an id, and the time it was said (in ms)
            said = (event["client"], event.get("ref"))
            if said in self.refs:  # sent again: its acknowledgement was lost on the way
                return {"type": "sent", "id": self.refs[said]}
            self.messages += 1
            event |= {"id": f"{self.started}-{self.messages}", "time": time.time_ns() // 10**6}
            if "ref" in event:
                self.refs[said] = event["id"]
                if len(self.refs) > 10_000:
                    self.refs.popitem(last=False)
        deliver(event)
        return None

    async def leave(self, websocket, client):
        """Say it left (to clients after LINGER); its secret is valid for 10 more minutes."""
        if websocket.resume in self.resumable:  # not used by a reconnection already
            self.resumable[websocket.resume] = (client, time.monotonic() + 600)
        await self.publish({"type": "left", "client": client})

    def numbers(self):
        return set(CLIENTS.values())

    async def close(self):
        pass


@contextlib.asynccontextmanager
async def lifespan():
    """What the handler shares: made before the first client, closed after the last one."""
    global HISTORY, CONVERSATION, RATES, STRIKES
    RATES, STRIKES = Limit(ARGS.rate, 2 * ARGS.rate), Limit(10, 100)
    HISTORY, CONVERSATION = History(ARGS.history, f"{Conversation.started}-0"), Conversation()
    if ARGS.redis:  # the demo alone never imports redis
        import broadcast_redis

        keys = ARGS.redis_prefix
        CONVERSATION = await broadcast_redis.start(ARGS.redis, HISTORY, deliver, CLIENTS, keys)
        ANNOUNCED.update(CONVERSATION.numbers())  # those on other processes: not news
    try:
        yield
    finally:  # however main() ends: Ctrl+C arrives as an exception here
        await CONVERSATION.close()


def health(connection, request):
    """Answer GET /health (for nginx or a load balancer); while Redis is away, 503 to all."""
    ok = CONVERSATION.available
    if request.path == "/health":
        body = {"status": "ok" if ok else "unavailable", "clients": len(CLIENTS)}
        return connection.respond(200 if ok else 503, to_json(body) + "\n")
    if not ok:
        warn("redis", "refused a client: the broadcast is unavailable until Redis is back")
        return connection.respond(503, "Broadcast unavailable, try again soon.\n")
    return None


def chat(connection, offered):
    """Speak "chat" with a client that offers it (the page does), plain text with others."""
    return CHAT if CHAT in offered else None


HOOKS = dict(process_request=health, select_subprotocol=chat)  # what main() adds to serve()


def flags(add):
    """This demo's own flags; the start-up below adds the shared ones."""
    add("--history", type=int, default=100, help="messages kept for catching up (default: 100)")
    add("--rate", type=int, default=RATE, help="messages a second per address (default: 5; 0: any)")
    add("--redis", metavar="URL", help="share the conversation through Redis (docs/scaling-out.md)")
    add("--redis-prefix", default="broadcast", help="its keys' prefix (default: broadcast)")


# --- Start-up, flags and safety checks: the same in every numbered script. ---
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
    hooks.update(HOOKS)  # from the demo's part, above
    async with lifespan():  # what the handler shares (above): made first, closed last
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
    flags(add)  # this demo's own (above)
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
