"""Three locks on one door: TLS (wss://), the Origin check and a token, before demo 2's echo.

TLS keeps the conversation private on the wire, the Origin check keeps other web sites out,
and the token decides who may talk. Make a certificate for this machine, once (one line):

  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -keyout key.pem -out cert.pem -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1

(mkcert is an alternative that browsers trust without a warning, after `mkcert -install`.)

Run it:    python 4_websocket_secure.py --certfile cert.pem --keyfile key.pem
Then visit https://localhost:8443/ once to accept the certificate, and open the page
address that the server prints: 4_client_secure.html?token=...
"""  # noqa: E501 (the openssl command stays on one line, to copy and paste)

import argparse
import asyncio
import contextlib
import errno
import hmac
import itertools
import json
import logging
import os
import re
import secrets
import signal
import socket
import ssl
import sys
import time
from pathlib import Path

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.frames import CloseCode, Opcode

AUTHENTICATED = set()  # connections that gave the right token
CLIENT_NUMBERS = itertools.count(1)  # 1, 2, 3, ... in the order they are let in
AUTH_TIMEOUT = 5  # seconds a new connection has to send its token
MESSAGES = logging.getLogger("messages")  # one line per message; --quiet turns it off


async def handler(websocket):
    """Demo 2's echo, for a client whose first message holds the right token."""
    # Locks 1 and 2 opened before this runs: TLS (ssl= in main) and the Origin (origins=).
    address = "{}:{}".format(*websocket.remote_address[:2])
    try:
        if problem := await authenticate(websocket):
            # Once per address and reason every 10 s (warn(), below): not once per attempt.
            warn((websocket.address, problem), "refused a client from %s: %s", address, problem)
            return await websocket.close(CloseCode.POLICY_VIOLATION, problem)
        await echo(websocket, address)
    except ConnectionClosed:
        pass  # it left, maybe in the middle of a send(): normal on networks


async def authenticate(websocket):
    """Lock 3: return None if the first message holds the right token, else the reason."""
    # The token comes in a message, not in the URL: URLs end up in logs and browser history.
    try:
        event = json.loads(await asyncio.wait_for(websocket.recv(), AUTH_TIMEOUT))
    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
        return "authentication timeout"
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested a million deep
        event = None
    token = event.get("token") if isinstance(event, dict) and event.get("type") == "auth" else None
    if not isinstance(token, str):
        return "authentication required"
    # compare_digest() takes as long wherever the first wrong character is: nobody can
    # guess the token one character at a time by timing the answers.
    # "surrogatepass": a lone "\ud800" in JSON is a str that plain encode() refuses.
    if not hmac.compare_digest(token.encode(errors="surrogatepass"), TOKEN.encode()):
        return "invalid token"
    return None


async def echo(websocket, address):
    """Send every message straight back, as demo 2 does, counting the client meanwhile."""
    client = next(CLIENT_NUMBERS)
    AUTHENTICATED.add(websocket)
    try:
        count = len(AUTHENTICATED)
        logging.info("client #%d connected from %s (%d connected)", client, address, count)
        await websocket.send(json.dumps({"type": "welcome", "client": client}))
        async for message in websocket:
            kind = "text" if isinstance(message, str) else "binary"
            MESSAGES.info("client #%d: %s, %d long: %r", client, kind, len(message), message[:80])
            await websocket.send(message)
    finally:  # finally runs however the connection ends, so the count never drifts.
        AUTHENTICATED.discard(websocket)
        why = websocket.protocol.close_exc  # who closed, with which code and why
        logging.info("client #%d disconnected (%d connected): %s", client, len(AUTHENTICATED), why)


def certificate_page(connection, request):
    """A plain visit to https://localhost:8443/: where a browser accepts the certificate."""
    if request.path != "/" or "Upgrade" in request.headers:
        return None  # a WebSocket handshake (or another path): as usual
    if not TLS:  # plain http:// has no certificate to accept
        return connection.respond(200, "No TLS here (no --certfile): open 4_client_secure.html")
    return connection.respond(200, "This certificate is accepted; now open 4_client_secure.html")


# --- Start-up, flags and safety checks: as in every script, plus TLS and the token. ---
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


def tls_context():
    """Lock 1: the certificate and key that make the server speak wss://."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        for path in (ARGS.certfile, ARGS.keyfile):  # load_cert_chain() won't say which is missing
            open(path, "rb").close()
        context.load_cert_chain(ARGS.certfile, ARGS.keyfile)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            sys.exit(f"The key in {ARGS.keyfile} does not match the certificate {ARGS.certfile}.")
        sys.exit(f"{ARGS.certfile} and {ARGS.keyfile} must be a certificate and its key, in PEM.")
    except OSError as exc:
        sys.exit(f"Cannot read {exc.filename}: {exc.strerror}.")
    return context


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
    hooks.update(process_request=certificate_page, ssl=TLS)  # the demo's page, and lock 1
    try:  # Bind once to choose the port: given port 0, asyncio would choose one per address.
        with socket.create_server((ARGS.host, ARGS.port)) as probe:
            port = probe.getsockname()[1]
        origins = ORIGINS + ARGS.allow_origin
        server = await serve(handler, ARGS.host, port, origins=origins, **hooks, **SETTINGS)
    except OSError as exc:  # most often the port is taken: by a demo still running?
        why = IN_USE.format(ARGS.port + 1) if exc.errno == errno.EADDRINUSE else exc.strerror
        sys.exit(f"Cannot listen on {ARGS.host} port {ARGS.port}: {why}.")
    host = f"[{ARGS.host}]" if ":" in ARGS.host else ARGS.host
    url = f"{'wss' if TLS else 'ws'}://{host}:{port}"
    if not ARGS.token:  # the only line that ever shows the token
        page = Path(__file__).with_name("4_client_secure.html").as_uri() + f"?token={TOKEN}"
        print(f"Open {page}{'' if url == 'wss://localhost:8443' else f'&url={url}'}", flush=True)
    print(f"Listening on {url} (Ctrl+C to stop)", flush=True)
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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--host", default="localhost", help="interface to listen on (default: localhost)")
    add("--port", type=int, default=8443, help="port to listen on; 0: any free one (default: 8443)")
    add("--allow-origin", action="append", default=[], help="also accept pages from that origin")
    add("--max-clients", type=int, default=1000, help="clients at most, then 503 (default: 1000)")
    add("--max-per-address", type=int, default=20, help="clients per address (default: 20; 0: any)")
    add("--quiet", action="store_true", help="log who comes and goes, not each message")
    add("--certfile", help="the certificate that makes it wss://, PEM (e.g. cert.pem)")
    add("--keyfile", help="the certificate's private key, PEM (e.g. key.pem)")
    # Other users of this machine can read a command line (ps): prefer the variable.
    token = os.environ.get("WEBSOCKET_TOKEN")
    add("--token", default=token, help="what clients must send (default: $WEBSOCKET_TOKEN, or new)")
    ARGS = parser.parse_args()
    if not 0 <= ARGS.port <= 65535:
        parser.error(f"--port must be a number from 0 to 65535, not {ARGS.port}")
    if ARGS.max_clients < 1:
        parser.error(f"--max-clients must be at least 1, not {ARGS.max_clients}")
    for name, value in vars(ARGS).items():  # every other number: 0 is off, below is a mistake
        if type(value) is int and value < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 (off) or more, not {value}")
    if bool(ARGS.certfile) != bool(ARGS.keyfile):
        parser.error("--certfile and --keyfile go together: give both, or neither")
    loopback = ARGS.host in ("localhost", "127.0.0.1", "::1")
    if not (loopback or ARGS.certfile):  # a token in clear text on a network is anybody's
        parser.error(f"--host {ARGS.host} needs --certfile and --keyfile (TLS)")
    if not loopback:
        print(f"Warning: on {ARGS.host} other machines can connect.", file=sys.stderr)
        ORIGINS.remove("null")  # there, "null" may be any web site in a sandboxed frame
    if not ARGS.certfile:
        why = "tokens cross the wire in clear text (ws://); --help shows how to make a certificate"
        print(f"Warning: without --certfile and --keyfile, {why}.", file=sys.stderr)
    TOKEN = ARGS.token or secrets.token_urlsafe()
    TLS = tls_context() if ARGS.certfile else None
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    logging.getLogger("websockets").setLevel(logging.WARNING)  # errors only
    # websockets 15 and 16 (Python 3.9, 3.10) log a client's bad handshake, a browser's plain
    # http:// visit say, as an error with a traceback; 17 only answers it, as all of them do.
    logging.getLogger("websockets.server").addFilter(
        lambda record: not isinstance(record.exc_info and record.exc_info[1], InvalidHandshake)
    )
    MESSAGES.disabled = ARGS.quiet
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):  # main() cleaned up
        asyncio.run(main())
    print("Server stopped. Goodbye!")
