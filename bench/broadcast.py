"""Broadcast benchmark: delivery latency, loss and memory of 3_websocket_broadcast.py
against reference servers, at 100, 1,000 and 5,000 clients.

Run: python bench/broadcast.py       (about 10 minutes; --quick for a smoke run)
Servers run on one core, the load generator on the other; all on 127.0.0.1.
"""

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import zlib
from urllib.parse import urlsplit

from common import CLIENT_CORE, ROOT, Server, machine, pin, summary, table

SERVERS = {
    "3_websocket_broadcast.py": [
        "3_websocket_broadcast.py",
        "--port",
        "0",
        "--max-clients",
        "20000",
    ],
    "bare broadcast() reference": ["bench/servers.py", "bare-broadcast"],
    "await send() to each": ["bench/servers.py", "await-each"],
    "floor: pre-built frame to each transport": ["bench/servers.py", "floor"],
}
MEMORY_SERVERS = {
    "3_websocket_broadcast.py": SERVERS["3_websocket_broadcast.py"],
    "bare broadcast() reference": SERVERS["bare broadcast() reference"],
    "1_websocket_server.py": ["1_websocket_server.py", "--port", "0", "--max-clients", "20000"],
    "2_websocket_echo.py": ["2_websocket_echo.py", "--port", "0", "--max-clients", "20000"],
}


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else float("nan")


async def connect_all(url, n):
    """Open n connections, 100 at a time; offer permessage-deflate, as browsers do."""
    from websockets.asyncio.client import connect

    clients = []
    for start in range(0, n, 100):
        batch = [
            connect(url, proxy=None, open_timeout=120, ping_interval=None)
            for _ in range(min(100, n - start))
        ]
        clients += await asyncio.gather(*batch)
    return clients


class Receiver(asyncio.Protocol):
    """A lean read-only WebSocket client, so that thousands fit in one process.

    It offers permessage-deflate as browsers do, answers pings, and records when
    each broadcast arrives; it parses frames in bulk, with no task per client.
    """

    def __init__(self, path, host, ours, everyone, latencies):
        self.path, self.host, self.ours, self.everyone = path, host, ours, everyone
        self.latencies = latencies  # shared list of (ms) for this process
        self.buffer, self.opened = b"", asyncio.get_running_loop().create_future()
        self.inflate, self.settled, self.closed, self.count = None, False, False, 0

    def connection_made(self, transport):
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n".encode()
        )

    def data_received(self, data):
        now = time.time()
        self.buffer += data
        if not self.opened.done():
            head, found, self.buffer = self.buffer.partition(b"\r\n\r\n")
            if not found:
                self.buffer = head
                return
            if b"permessage-deflate" in head.lower():
                self.inflate = zlib.decompressobj(-15)
            self.opened.set_result(head.startswith(b"HTTP/1.1 101"))
        while len(self.buffer) >= 2:
            first, length = self.buffer[0], self.buffer[1] & 0x7F
            start = 2
            if length == 126:
                length, start = int.from_bytes(self.buffer[2:4], "big"), 4
            elif length == 127:
                length, start = int.from_bytes(self.buffer[2:10], "big"), 10
            if len(self.buffer) < start + length:
                return
            payload = self.buffer[start : start + length]
            self.buffer = self.buffer[start + length :]
            opcode = first & 0x0F
            if opcode == 0x8:
                self.closed = True
            elif opcode == 0x9:  # ping: answer with a masked pong
                self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
            elif opcode == 0x1:
                if first & 0x40:  # compressed (RSV1)
                    payload = self.inflate.decompress(payload + b"\x00\x00\xff\xff")
                self.message(payload, now)

    def message(self, payload, now):
        if self.ours:
            if not payload.startswith(b'{"type": "message"'):
                event = json.loads(payload)
                self.settled |= event["type"] == "presence" and event["clients"] == self.everyone
                return
            # Slice the timestamp out rather than parse the JSON, so that receiving
            # costs the same as with the references, which send bare text.
            payload = payload[payload.rindex(b'"text": "') + 9 : -2]
        self.count += 1
        self.latencies.append(round((now - float(payload)) * 1000, 2))


async def receive(urls, n, ours, everyone, total, seconds):
    """Load process: n lean receivers. Prints "ready" once all are in, then the latencies."""
    loop = asyncio.get_running_loop()
    latencies, receivers = [], []
    t0 = time.monotonic()
    for start in range(0, n, 100):
        batch = []
        for i in range(start, min(start + 100, n)):
            url = urlsplit(urls[i % len(urls)])
            receiver = Receiver(url.path or "/", url.netloc, ours, everyone, latencies)
            batch.append(loop.create_connection(lambda r=receiver: r, url.hostname, url.port))
            receivers.append(receiver)
        await asyncio.gather(*batch)
        assert all(await asyncio.gather(*(r.opened for r in receivers[start:])))
    while ours and not all(r.settled for r in receivers):  # presence says all are in
        if any(r.closed for r in receivers) or time.monotonic() - t0 > 300:
            raise SystemExit("the server closed connections, or presence never settled")
        await asyncio.sleep(0.05)
    print(json.dumps({"connect": time.monotonic() - t0}), flush=True)
    deadline = time.monotonic() + seconds + 60
    await loop.run_in_executor(None, sys.stdin.readline)  # "go": the sender has started
    while time.monotonic() < deadline and any(r.count < total for r in receivers):
        await asyncio.sleep(0.05)
    for r in receivers:
        r.transport.abort()
    print(json.dumps({"latencies": latencies, "lost": sum(total - r.count for r in receivers)}))


async def send(url, rate, total):
    """Load process: the sender, alone, so that its schedule depends on nobody else."""
    from websockets.asyncio.client import connect

    async with connect(url, proxy=None, ping_interval=None) as ws:
        drain = asyncio.create_task(read_and_drop(ws))
        print("connected", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "go"
        slips = []
        start = time.monotonic() + 0.2
        for k in range(total):
            scheduled = start + k / rate
            await asyncio.sleep(max(0, scheduled - time.monotonic()))
            slips.append(time.monotonic() - scheduled)
            await ws.send(repr(time.time()))
        drain.cancel()
    print(json.dumps({"slip": max(slips, default=0) * 1000}))


def run_loads(urls, n, rate, seconds, ours, processes=1):
    """One sender process and `processes` receiver processes; merge what they measured."""
    total = int(rate * seconds)

    def spawn(*args):
        return subprocess.Popen(
            [sys.executable, __file__, *map(str, args)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=(lambda: pin(0, CLIENT_CORE)) if processes == 1 else None,
        )

    sender = spawn("--send", urls[0], rate, total)
    assert sender.stdout.readline().strip() == "connected"
    shares = [n // processes + (i < n % processes) for i in range(processes)]
    kind = "ours" if ours else "ref"
    receivers = [
        spawn("--receive", ",".join(urls), share, kind, n + 1, total, seconds) for share in shares
    ]
    connect = max(json.loads(r.stdout.readline())["connect"] for r in receivers)
    for proc in [*receivers, sender]:  # go
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outs = [
        json.loads(proc.communicate(timeout=900)[0].strip().splitlines()[-1]) for proc in receivers
    ]
    slip = json.loads(sender.communicate(timeout=900)[0].strip().splitlines()[-1])["slip"]
    latencies = [x for o in outs for x in o["latencies"]]
    return {
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "p99": percentile(latencies, 99),
        "max": max(latencies, default=float("nan")),
        "lost": sum(o["lost"] for o in outs),
        "connect": connect,
        "slip": slip,
    }


async def read_and_drop(ws):
    async for _ in ws:
        pass


async def idle(url, n):
    """Hold n idle connections open until stdin closes."""
    clients = await connect_all(url, n)
    await asyncio.sleep(1)  # let the server finish its welcome and presence frames
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for ws in clients:
        ws.transport.abort()


def measure_latency(sizes, runs, seconds):
    print("Delivery latency: one sender, a timestamped message 10 times a second (5 at 5,000)")
    print(
        f"for {seconds:g} s; every client records its arrival. Median of {runs} runs (min-max).\n"
    )
    for n in sizes:
        rate = 5 if n >= 5000 else 10
        results = {name: [] for name in SERVERS}
        for run in range(runs):
            for name, command in SERVERS.items():
                with Server(command) as server:
                    cpu0, t0 = server.cpu_seconds(), time.monotonic()
                    out = run_loads([server.url], n, rate, seconds, name.endswith(".py"))
                    out["cpu"] = (server.cpu_seconds() - cpu0) / (time.monotonic() - t0)
                    results[name].append(out)
            print(f"  {n} clients: run {run + 1}/{runs} done", file=sys.stderr)
        print_latency_table(f"{n:,} clients, {rate} messages a second, latency in ms", results)
        p99 = {name: statistics.median(o["p99"] for o in outs) for name, outs in results.items()}
        ours = p99["3_websocket_broadcast.py"]
        print(
            f"p99 ratios: {ours / p99['bare broadcast() reference']:.2f}x the bare broadcast() "
            f"reference, {ours / p99['floor: pre-built frame to each transport']:.2f}x the floor\n"
        )


def print_latency_table(title, results):
    rows = []
    for name, outs in results.items():

        def col(key, fmt="{:.1f}", outs=outs):
            return summary([o[key] for o in outs], fmt)

        rows.append(
            [
                name,
                col("p50"),
                col("p95"),
                col("p99"),
                col("max"),
                sum(o["lost"] for o in outs),
                col("slip"),
                col("cpu", "{:.0%}"),
                col("connect", "{:.1f} s"),
            ]
        )
    print(title)
    headers = [
        "server",
        "p50",
        "p95",
        "p99",
        "max",
        "lost",
        "send slip ms",
        "server CPU",
        "connect (all N)",
    ]
    print(table(headers, rows))


def measure_memory(sizes, runs):
    print("Memory: resident memory per idle connection that offered permessage-deflate,")
    print(f"(RSS with N clients - RSS with none) / N, KiB. Median of {runs} runs (min-max).\n")
    rows = []
    for name, command in MEMORY_SERVERS.items():
        row = [name]
        for n in sizes:
            per = []
            for _ in range(runs):
                with Server(command) as server:
                    before = server.rss_kib()
                    proc = subprocess.Popen(
                        [sys.executable, __file__, "--idle", server.url, str(n)],
                        cwd=ROOT,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                        preexec_fn=lambda: pin(0, CLIENT_CORE),
                    )
                    assert proc.stdout.readline().strip() == "ready"
                    per.append((server.rss_kib() - before) / n)
                    proc.communicate("", timeout=60)
            row.append(summary(per, "{:.1f}"))
        rows.append(row)
    print(table(["server", *(f"{n:,} idle clients" for n in sizes)], rows))
    print()


def measure_scale_out(sizes, runs, seconds):
    """The same latency table for 1 process and for 2 processes sharing through Redis."""
    binary = shutil.which("redis-server")
    if binary is None:
        print("Scaling out: skipped, no redis-server (apt-get install redis-server)\n")
        return
    print("Scaling out: 1 process, or 2 processes sharing one conversation through Redis.")
    print("Nothing pinned: the servers, Redis and 2 load processes share the 2 cores.")
    print(f"5 messages a second for {seconds:g} s; median of {runs} runs (min-max).\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    redis = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    command = ["3_websocket_broadcast.py", "--port", "0", "--max-clients", "20000"]
    try:
        deadline = time.monotonic() + 10
        while True:  # wait until redis-server accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        for n in sizes:
            results = {"1 process": [], "2 processes + Redis": []}
            for run in range(runs):
                for name in results:
                    count = 1 if name == "1 process" else 2
                    extra = [] if count == 1 else ["--redis", url]
                    servers = []
                    try:
                        for _ in range(count):
                            servers.append(Server([*command, *extra], cores=None))
                        cpu0 = sum(s.cpu_seconds() for s in servers)
                        t0 = time.monotonic()
                        out = run_loads([s.url for s in servers], n, 5, seconds, True, 2)
                        cpu = sum(s.cpu_seconds() for s in servers) - cpu0
                        out["cpu"] = cpu / (time.monotonic() - t0)
                        results[name].append(out)
                    finally:
                        for server in servers:
                            server.stop()
                print(f"  {n} clients: run {run + 1}/{runs} done", file=sys.stderr)
            print_latency_table(f"{n:,} clients, 5 messages a second, latency in ms", results)
    finally:
        redis.terminate()
        redis.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--quick", action="store_true", help="tiny numbers: a smoke test")
    parser.add_argument(
        "--scale-out", action="store_true", help="compare 1 process with 2 through Redis"
    )
    parser.add_argument("--receive", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--send", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--idle", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receive:
        urls, n, kind, everyone, total, seconds = args.receive
        asyncio.run(
            receive(
                urls.split(","), int(n), kind == "ours", int(everyone), int(total), float(seconds)
            )
        )
        return
    if args.send:
        asyncio.run(send(args.send[0], float(args.send[1]), int(args.send[2])))
        return
    if args.idle:
        asyncio.run(idle(args.idle[0], int(args.idle[1])))
        return
    if args.quick:
        args.runs, args.seconds, args.sizes = 1, 1, [20]
    if args.scale_out:
        sizes = args.sizes if args.quick else [5000, 10000]
        print(f"Broadcast benchmark, scaling out; {machine()}\n")
        measure_scale_out(sizes, args.runs, args.seconds)
        return
    print(f"Broadcast benchmark; {machine()}\n")
    measure_latency(args.sizes, args.runs, args.seconds)
    measure_memory([n for n in args.sizes if n >= 1000] or args.sizes, args.runs)


if __name__ == "__main__":
    main()
