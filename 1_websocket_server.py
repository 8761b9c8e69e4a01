"""A WebSocket server that accepts connections and keeps track of its clients.

Run it:    python 1_websocket_server.py
Connect:   python -m websockets ws://localhost:8765   (in a second terminal)
Health:    curl http://localhost:8765/health
"""

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import itertools
import json
import logging
import re
import signal
import sys
from functools import partial
from http import HTTPStatus

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosedError

CLIENTS = set()  # the connections that are open right now
CLIENT_NUMBERS = itertools.count(1)  # 1, 2, 3, ... in order of arrival
MAX_SIZE = 64 * 1024  # bigger messages close the connection with code 1009
TIMEOUT = 5  # seconds for an opening or closing handshake to finish


async def handler(websocket):
    """Welcome a client, log what it sends, and forget it when it leaves."""
    client = next(CLIENT_NUMBERS)
    address = "{}:{}".format(*websocket.remote_address)
    CLIENTS.add(websocket)
    logging.info("client #%d connected from %s (%d connected)", client, address, len(CLIENTS))
    try:
        await websocket.send(
            json.dumps({"type": "welcome", "client": client, "clients": len(CLIENTS)})
        )
        async for message in websocket:
            logging.info("client #%d sent %r", client, message[:80])
    except ConnectionClosedError:
        pass  # the client vanished without a closing handshake: normal on networks
    finally:
        # finally runs however the connection ends, so the count never drifts.
        CLIENTS.discard(websocket)
        logging.info(
            "client #%d disconnected (code %s, %d connected)",
            client,
            websocket.close_code,
            len(CLIENTS),
        )


LOCAL_PAGE = re.compile(r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?")


def process_request(connection, request, allowed_origins, max_clients):
    """Answer /health, refuse foreign web pages, and cap the number of clients."""
    if request.path == "/health":
        body = json.dumps({"status": "ok", "clients": len(CLIENTS)})
        response = connection.respond(HTTPStatus.OK, body + "\n")
        del response.headers["Content-Type"]  # respond() made it text/plain
        response.headers["Content-Type"] = "application/json"
        return response
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
    check = partial(
        process_request, allowed_origins=args.allow_origin, max_clients=args.max_clients
    )
    try:
        server = await serve(
            handler,
            args.host,
            args.port,
            process_request=check,
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
