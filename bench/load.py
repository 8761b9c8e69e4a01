"""The broadcast benchmark's load processes: receivers, one sender, idle connections.

The receivers run on picows (frames parsed in C) and uvloop. Even so, reading a frame
costs the load about what writing it costs the fastest server (a system call each, on a
core of its own), so a load that read every socket at once would time itself. During the
timed window each receiver process therefore reads SAMPLE of its connections, spread
evenly over the order they joined; the others stay paused, their messages waiting in the
kernel, and are read after the window, when every connection must have got every message
(or it counts as lost). The latency measured is then the server's fan-out, not the load's.
Measuring sticks, not code to copy. Each process talks to bench/broadcast.py in JSON
lines over its standard input and output.
"""

import asyncio
import json
import ssl
import sys
import time
import zlib

import uvloop
from picows import WSListener, WSMsgType, ws_connect

# As browsers do: the server decides whether to compress.
OFFER = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
TAIL = b"\x00\x00\xff\xff"  # removed from each compressed message by the sender (RFC 7692)
# A message event starts thus in the demo's JSON and in python-socketio's packets.
MESSAGE = (b'{"type": "message"', b'42["event",{"type":"message"')
SAMPLE = 100  # connections per receiver process read during the timed window


def timestamp_of(payload):
    """The sender's timestamp, sliced out of the text field rather than parsed, so that a
    conversation costs the load no more than the references' bare text does."""
    start = payload.index(b'"', payload.index(b'"text":') + 7) + 1
    return float(payload[start : payload.index(b'"', start)])


class Receiver(WSListener):
    """Records when each message arrives, after the warm-up; answers Socket.IO's pings."""

    def __init__(self, run):
        self.run, self.count, self.inflate, self.closed = run, 0, None, False
        self.settled, self.timed = not run.events, True

    def on_ws_connected(self, transport):
        self.transport = transport
        if "permessage-deflate" in transport.response.headers.get("Sec-WebSocket-Extensions", ""):
            self.inflate = zlib.decompressobj(-15)

    def on_ws_disconnected(self, transport):
        self.closed = True

    def on_ws_frame(self, transport, frame):
        now = time.time()
        if frame.msg_type is not WSMsgType.TEXT:
            if frame.msg_type is WSMsgType.CLOSE:
                self.closed = True
            return
        payload = frame.get_payload_as_bytes()
        if frame.rsv1:
            payload = self.inflate.decompress(payload + TAIL)
        if self.run.events:
            if not payload.startswith(MESSAGE):
                self.event(payload)
                return
            sent = timestamp_of(payload)
        else:
            sent = float(payload)
        self.count += 1
        if self.count > self.run.warmup and self.timed:
            self.run.latencies.append(round((now - sent) * 1000, 2))

    def event(self, payload):
        if self.run.socketio:  # Engine.IO: 0 open, 2 ping; Socket.IO: 40 connected, 42 event
            if payload[:1] == b"0":
                self.transport.send(WSMsgType.TEXT, b"40")  # join the default namespace
            elif payload == b"2":
                self.transport.send(WSMsgType.TEXT, b"3")
            if not payload.startswith(b"42"):
                return
            payload = json.loads(payload[2:])[1]
        else:
            payload = json.loads(payload)
        if payload["type"] == "presence" and payload["clients"] == self.run.everyone:
            self.settled = True


class Run:
    """What every receiver of a load process shares."""

    def __init__(self, events, socketio, everyone, warmup):
        self.events, self.socketio = events, socketio
        self.everyone, self.warmup, self.latencies = everyone, warmup, []


def tls_context():
    """For nginx with demo 4's self-signed certificate: encrypted, not verified."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


async def open_all(factory, urls, n, batch=100):
    """Open n connections, `batch` at a time, spread over urls; fail if any is refused."""
    listeners, context = [], tls_context() if urls[0].startswith("wss:") else None
    for start in range(0, n, batch):
        pending = [
            ws_connect(
                factory,
                urls[i % len(urls)],
                ssl_context=context,
                # A busy server answers late while thousands join: that is not what is timed.
                websocket_handshake_timeout=60,
                extra_headers=OFFER,
                max_frame_size=1 << 20,
            )
            for i in range(start, min(start + batch, n))
        ]
        try:
            listeners += [listener for _, listener in await asyncio.gather(*pending)]
        except Exception as exc:
            raise SystemExit(f"the server refused a WebSocket connection: {exc}") from None
    return listeners


async def line():
    """The next word from bench/broadcast.py, without blocking the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def say(value):
    print(json.dumps(value), flush=True)


async def receive(urls, n, framing, everyone, warmup, total, timeout):
    """n receivers; reports when all are in, then what arrived, then closes."""
    run = Run(framing != "bare", framing == "socketio", everyone, warmup)
    t0 = time.monotonic()
    receivers = await open_all(lambda: Receiver(run), urls, n)
    while not all(r.settled for r in receivers):  # presence says that everyone is in
        if any(r.closed for r in receivers) or time.monotonic() - t0 > 90:
            raise SystemExit("the server closed connections, or presence never settled")
        await asyncio.sleep(0.02)
    say({"connect": time.monotonic() - t0})
    step = max(1, len(receivers) // SAMPLE)
    paused = [r for i, r in enumerate(receivers) if i % step]
    for r in paused:  # not timed: read after the window, to count what was lost
        r.timed = False
        r.transport.underlying_transport.pause_reading()
    timed = receivers[::step]
    await line()  # "go": the sender starts
    cpu0, t1 = time.process_time(), time.monotonic()
    deadline = t1 + timeout

    async def until_all_in(group):
        while time.monotonic() < deadline and any(r.count < warmup + total for r in group):
            await asyncio.sleep(0.01)

    await until_all_in(timed)
    cpu = (time.process_time() - cpu0) / (time.monotonic() - t1)
    say({"latencies": run.latencies, "load_cpu": cpu, "timed": len(timed)})
    for r in paused:
        r.transport.underlying_transport.resume_reading()
    deadline = time.monotonic() + 30
    await until_all_in(receivers)
    lost = sum(max(0, warmup + total - r.count) for r in receivers)
    say({"lost": lost, "closed": sum(r.closed for r in receivers)})
    await line()  # "close": the bench has read the server's CPU
    for r in receivers:
        r.transport.disconnect(graceful=False)


class Sender(WSListener):
    """The one client that talks; everything it receives it drops, but Socket.IO's pings."""

    def __init__(self, socketio):
        self.socketio, self.joined = socketio, asyncio.get_running_loop().create_future()
        if not socketio:
            self.joined.set_result(None)

    def on_ws_connected(self, transport):
        self.transport = transport

    def on_ws_frame(self, transport, frame):
        if not self.socketio or frame.msg_type is not WSMsgType.TEXT or frame.rsv1:
            return  # a compressed frame is never one of Engine.IO's short packets
        payload = frame.get_payload_as_bytes()
        if payload[:1] == b"0":
            transport.send(WSMsgType.TEXT, b"40")
        elif payload == b"2":
            transport.send(WSMsgType.TEXT, b"3")
        elif payload.startswith(b"40") and not self.joined.done():
            self.joined.set_result(None)

    def message(self, text):
        # Sent uncompressed even where the server compresses: RSV1 is per message.
        if self.socketio:
            return b'42["message",' + json.dumps(text).encode() + b"]"
        return text.encode()


async def send(url, framing, rate, warmup, total):
    """The sender, alone in its process, so that its schedule depends on nobody else."""
    context = tls_context() if url.startswith("wss:") else None
    factory = lambda: Sender(framing == "socketio")  # noqa: E731
    transport, sender = await ws_connect(factory, url, ssl_context=context)
    await asyncio.wait_for(sender.joined, 30)
    say("connected")
    await line()  # "go"
    slips, start = [], time.monotonic() + 0.05
    for k in range(warmup + total):
        if k == warmup:
            say("timed")  # the bench reads the server's CPU now
        scheduled = start + k / rate
        await asyncio.sleep(max(0, scheduled - time.monotonic()))
        slips.append(time.monotonic() - scheduled)
        transport.send(WSMsgType.TEXT, sender.message(repr(time.time())))
    say({"slip": max(slips, default=0) * 1000})
    await line()  # "close": until then the bench may read this process's CPU
    transport.disconnect(graceful=False)


def main(mode, args):
    if mode == "receive":
        urls, n, framing, everyone, warmup, total, timeout = args
        work = receive(
            urls.split(","), int(n), framing, int(everyone), int(warmup), int(total), float(timeout)
        )
    else:
        url, framing, rate, warmup, total = args
        work = send(url, framing, float(rate), int(warmup), int(total))
    uvloop.run(work)


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from common import raise_file_limit

    raise_file_limit()
    main(sys.argv[1], sys.argv[2:])
