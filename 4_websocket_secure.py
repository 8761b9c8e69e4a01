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
from pathlib import Path

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.frames import CloseCode

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
            logging.warning("refused a client from %s: %s", address, problem)
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

TIMEOUT = 5  # seconds for an opening or closing handshake to finish
# 64 KiB at most per message (more: close code 1009); no compression (docs/performance.md).
SETTINGS = dict(max_size=64 * 1024, compression=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT)
# Programs (no Origin), pages from disk ("null") or this machine: other sites could hijack it.
ORIGINS = [None, "null", re.compile(r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?")]
IN_USE = "it is already in use. Another demo still running? Stop it with Ctrl+C, or use --port {}"


def check(connection, request, response):
    """Refuse a client past --max-clients; name a refused origin and how to allow it."""
    if response.status_code == 403:  # websockets refused the Origin
        origin = request.headers.get("Origin")
        logging.warning("refused origin %r; to allow it: --allow-origin %r", origin, origin)
    # Count connections still sending their token too: idle sockets cannot pile up.
    elif response.status_code == 101 and len(connection.server.connections) >= ARGS.max_clients:
        logging.warning("refused a client: server full (--max-clients %d)", ARGS.max_clients)
        return connection.respond(503, "Server full.\n")


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
    loop, main_task = asyncio.get_running_loop(), asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl+C, even from a shell that ignores it
        try:
            loop.add_signal_handler(sig, main_task.cancel)
        except NotImplementedError:  # Windows (where asyncio.run() does this only from 3.11)
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(main_task.cancel))
    try:  # Bind once to choose the port: given port 0, asyncio would choose one per address.
        with socket.create_server((ARGS.host, ARGS.port)) as probe:
            port = probe.getsockname()[1]
        origins = ORIGINS + ARGS.allow_origin
        hooks = dict(origins=origins, process_request=certificate_page, process_response=check)
        server = await serve(handler, ARGS.host, port, ssl=TLS, **hooks, **SETTINGS)
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
        server.close()  # every client gets close code 1001 (going away)
        connections = list(server.connections)
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):  # or Ctrl+C again
            await asyncio.wait_for(server.wait_closed(), TIMEOUT)
        for websocket in connections:  # close() waits on drain() with no limit:
            websocket.transport.abort()  # cut off the clients that are not reading
        await server.wait_closed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--host", default="localhost", help="interface to listen on (default: localhost)")
    add("--port", type=int, default=8443, help="port to listen on; 0: any free one (default: 8443)")
    add("--allow-origin", action="append", default=[], help="also accept pages from that origin")
    add("--max-clients", type=int, default=1000, help="clients at most, then 503 (default: 1000)")
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
