"""The servers a Python developer would pick instead, speaking the demo's conversation.

Run: python bench/peers.py socketio|fastapi|aiohttp [--port PORT] [--no-compression]

Each is written as its own documentation teaches, with the defaults a user gets from
`pip install python-socketio "uvicorn[standard]"`, `pip install "fastapi[standard]"` or
`pip install aiohttp`, compression included (all three negotiate permessage-deflate unless
told not to), and speaks 3_websocket_broadcast.py's JSON: a welcome with the latest 20
messages, message events with an id and a time, presence in batches of 200 ms.
Measuring sticks for bench/broadcast.py, not code to copy. Each prints the demos' ready line.
"""

import argparse
import asyncio
import collections
import json
import socket
import time

HISTORY = 100  # messages kept, as in the demo
MAX_TEXT = 1000


class Conversation:
    """What the demo adds to a fan-out: client numbers, ids, history, batched presence.

    `send_to_all(event)` is each server's own fan-out (a coroutine function)."""

    def __init__(self, send_to_all):
        self.send_to_all, self.online = send_to_all, 0
        self.clients = self.messages = 0
        self.started = time.time_ns() // 1_000_000
        self.history = collections.deque(maxlen=HISTORY)
        self.joined, self.left, self.tasks = [], [], set()

    def join(self):
        """A new client's number and its welcome."""
        self.clients += 1
        self.online += 1
        self.presence("joined", self.clients)
        latest = self.history[-1]["id"] if self.history else f"{self.started}-0"
        welcome = {"type": "welcome", "client": self.clients, "clients": self.online}
        return self.clients, welcome | {
            "history": list(self.history)[-20:],
            "recovered": False,
            "latest": latest,
        }

    def leave(self, client):
        self.online -= 1
        self.presence("left", client)

    def message(self, client, text):
        """The event to send to everyone, or None for a message the demo refuses."""
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
            return None
        self.messages += 1
        event = {"type": "message", "client": client, "text": text}
        event |= {"id": f"{self.started}-{self.messages}", "time": time.time_ns() // 10**6}
        self.history.append(event)
        return event

    def presence(self, kind, client):
        if not (self.joined or self.left):
            task = asyncio.get_running_loop().create_task(self.announce())
            self.tasks.add(task)  # asyncio holds tasks only weakly
            task.add_done_callback(self.tasks.discard)
        (self.joined if kind == "joined" else self.left).append(client)

    async def announce(self):
        await asyncio.sleep(0.2)
        joined, left = (who[:] if len(who) <= 20 else len(who) for who in (self.joined, self.left))
        del self.joined[:], self.left[:]
        event = {"type": "presence", "clients": self.online, "joined": joined, "left": left}
        await self.send_to_all(event)


# --- python-socketio: AsyncServer, one emit() to everyone, as an ASGI app under uvicorn. ---


def socketio_app():
    import socketio

    sio = socketio.AsyncServer(async_mode="asgi")
    clients = {}  # sid -> client number

    async def emit_to_all(event):
        await sio.emit("event", event)

    conversation = Conversation(emit_to_all)

    @sio.event
    async def connect(sid, environ):
        clients[sid], welcome = conversation.join()
        await sio.emit("event", welcome, to=sid)

    @sio.event
    async def message(sid, text):
        event = conversation.message(clients[sid], text)
        if event:
            await sio.emit("event", event)

    @sio.event
    async def disconnect(sid, reason):
        conversation.leave(clients.pop(sid))

    return socketio.ASGIApp(sio), "/socket.io/?EIO=4&transport=websocket"


# --- FastAPI's WebSocket tutorial: a ConnectionManager that awaits send_text() to each. ---


def fastapi_app():
    from fastapi import FastAPI, WebSocket, WebSocketDisconnect

    class ConnectionManager:
        """As in FastAPI's tutorial ("Handling disconnections and multiple clients")."""

        def __init__(self):
            self.active_connections: list[WebSocket] = []

        async def connect(self, websocket: WebSocket):
            await websocket.accept()
            self.active_connections.append(websocket)

        def disconnect(self, websocket: WebSocket):
            self.active_connections.remove(websocket)

        async def broadcast(self, message: str):
            for connection in self.active_connections:
                await connection.send_text(message)

    app, manager = FastAPI(), ConnectionManager()

    async def broadcast_event(event):
        await manager.broadcast(json.dumps(event))

    conversation = Conversation(broadcast_event)

    @app.websocket("/ws")
    async def websocket_endpoint(websocket: WebSocket):
        await manager.connect(websocket)
        client, welcome = conversation.join()
        await websocket.send_text(json.dumps(welcome))
        try:
            while True:
                event = conversation.message(client, await websocket.receive_text())
                if event:
                    await broadcast_event(event)
        except WebSocketDisconnect:
            manager.disconnect(websocket)
            conversation.leave(client)

    return app, "/ws"


def uvicorn_run(app, path, sock, compression):
    import uvicorn

    # uvicorn's defaults but for compression: uvloop and httptools when installed, as
    # `pip install "fastapi[standard]"` installs them, and a log line per connection.
    config = uvicorn.Config(app, ws_per_message_deflate=compression, ws_max_size=64 * 1024)
    ready(sock, path)
    uvicorn.Server(config).run(sockets=[sock])


# --- aiohttp: its WebSocketResponse, and an awaited send_str() to each. ---


def aiohttp_run(sock, compression):
    import weakref

    from aiohttp import WSMsgType, web

    websockets = web.AppKey("websockets", weakref.WeakSet)

    async def send_to_all(event):
        data = json.dumps(event)
        for ws in set(app[websockets]):
            await ws.send_str(data)

    conversation = Conversation(send_to_all)

    async def handler(request):
        ws = web.WebSocketResponse(compress=compression, max_msg_size=64 * 1024)
        await ws.prepare(request)
        request.app[websockets].add(ws)
        client, welcome = conversation.join()
        try:
            await ws.send_str(json.dumps(welcome))
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    event = conversation.message(client, msg.data)
                    if event:
                        await send_to_all(event)
        finally:
            request.app[websockets].discard(ws)
            conversation.leave(client)
        return ws

    app = web.Application()
    app[websockets] = weakref.WeakSet()
    app.router.add_get("/ws", handler)
    ready(sock, "/ws")
    web.run_app(app, sock=sock, print=None)


def ready(sock, path):
    port = sock.getsockname()[1]
    print(f"Listening on ws://127.0.0.1:{port}{path} (Ctrl+C to stop)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=["socketio", "fastapi", "aiohttp"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--no-compression",
        action="store_true",
        help="Turn permessage-deflate off, as the demos do; by default each keeps its own.",
    )
    args = parser.parse_args()
    sock = socket.create_server(("127.0.0.1", args.port), backlog=4096)
    compression = not args.no_compression
    if args.name == "aiohttp":
        aiohttp_run(sock, compression)
    else:
        uvicorn_run(
            *(socketio_app() if args.name == "socketio" else fastapi_app()), sock, compression
        )


if __name__ == "__main__":
    main()
