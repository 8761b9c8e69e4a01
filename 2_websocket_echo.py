"""An echo server: every message comes back to its sender, text as text, binary as binary.

Run `python 2_websocket_echo.py` (--quiet: log less), then double-click 2_client_echo.html.
"""

import argparse
import asyncio
import contextlib
import errno
import itertools
import logging
import re
import signal
import socket
import sys

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake

CLIENT_NUMBERS = itertools.count(1)  # 1, 2, 3, ... in order of arrival
MESSAGES = logging.getLogger("messages")  # one line per message; --quiet turns it off


async def handler(websocket):
    """Send every message straight back to the client that sent it."""
    client = next(CLIENT_NUMBERS)
    logging.info("client #%d connected from %s:%d", client, *websocket.remote_address[:2])
    try:
        async for message in websocket:
            kind = "text" if isinstance(message, str) else "binary"
            MESSAGES.info("client #%d: %s, %d long: %r", client, kind, len(message), message[:80])
            # send() waits while the buffer is full: a client that never reads slows only itself.
            await websocket.send(message)
    except ConnectionClosed:
        pass  # it left, maybe in the middle of a send(): normal on networks
    finally:  # close_exc says who closed the connection, with which code and why
        logging.info("client #%d disconnected: %s", client, websocket.protocol.close_exc)


# --- Start-up, flags and safety checks: as in every numbered script, plus --quiet. ---

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
    elif response.status_code == 101 and len(connection.server.connections) >= ARGS.max_clients:
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
    add("--quiet", action="store_true", help="log who comes and goes, not each message")
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
    MESSAGES.disabled = ARGS.quiet
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):  # main() cleaned up
        asyncio.run(main())
    print("Server stopped. Goodbye!")
