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

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake

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
    elif response.status_code == 101 and len(CLIENTS) >= ARGS.max_clients:
        logging.warning("refused a client: server full (--max-clients %d)", ARGS.max_clients)
        return connection.respond(503, "Server full.\n")


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
        settings = dict(origins=ORIGINS + ARGS.allow_origin, process_response=check, **SETTINGS)
        server = await serve(handler, ARGS.host, port, process_request=health, **settings)
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
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):  # or Ctrl+C again
            await asyncio.wait_for(server.wait_closed(), TIMEOUT)
        for websocket in connections:  # close() waits on drain() with no limit:
            websocket.transport.abort()  # cut off the clients that are not reading
        await server.wait_closed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--host", default="localhost", help="interface to listen on (default: localhost)")
    add("--port", type=int, default=8765, help="port to listen on; 0: any free one (default: 8765)")
    add("--allow-origin", action="append", default=[], help="also accept pages from that origin")
    add("--max-clients", type=int, default=1000, help="clients at most, then 503 (default: 1000)")
    ARGS = parser.parse_args()
    if not 0 <= ARGS.port <= 65535:
        parser.error(f"--port must be a number from 0 to 65535, not {ARGS.port}")
    if ARGS.max_clients < 1:
        parser.error(f"--max-clients must be at least 1, not {ARGS.max_clients}")
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
