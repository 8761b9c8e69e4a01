"""Broadcast benchmark: delivery latency, loss and memory of 3_websocket_broadcast.py
against reference servers, at 100, 1,000 and 5,000 clients.

Run: python bench/broadcast.py       (about 10 minutes; --quick for a smoke run)
Servers run on one core, the load generator on the other; all on 127.0.0.1.
"""

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

from common import CLIENT_CORE, ROOT, Server, machine, pin, run_load, summary, table

SERVERS = {
    "3_websocket_broadcast.py": ["3_websocket_broadcast.py", "--max-clients", "20000"],
    "bare broadcast() reference": ["bench/servers.py", "bare-broadcast"],
    "await send() to each": ["bench/servers.py", "await-each"],
    "floor: pre-built frame to each transport": ["bench/servers.py", "floor"],
}
MEMORY_SERVERS = {
    "3_websocket_broadcast.py": SERVERS["3_websocket_broadcast.py"],
    "bare broadcast() reference": SERVERS["bare broadcast() reference"],
    "1_websocket_server.py": ["1_websocket_server.py", "--max-clients", "20000"],
    "2_websocket_echo.py": ["2_websocket_echo.py", "--max-clients", "20000"],
}


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else float("nan")


async def connect_all(url, n, on_message=None):
    """Open n connections, 100 at a time; offer permessage-deflate as browsers do."""
    from websockets.asyncio.client import connect

    clients = []
    for start in range(0, n, 100):
        batch = [
            connect(url, proxy=None, open_timeout=60, ping_interval=None)
            for _ in range(min(100, n - start))
        ]
        clients += await asyncio.gather(*batch)
    return clients


async def load(url, n, rate, seconds, ours):
    """The load generator: n receivers, one sender at `rate` messages a second."""
    received = [[] for _ in range(n)]  # latencies, per receiver
    settled = asyncio.Event()
    presence_needed = n + 1

    async def read(i, ws):
        async for message in ws:
            now = time.time()
            if ours:
                event = json.loads(message)
                if event["type"] == "presence" and event["clients"] == presence_needed:
                    counts[i] = True
                    if all(counts):
                        settled.set()
                if event["type"] != "message":
                    continue
                message = event["text"]
            received[i].append(now - float(message))

    counts = [False] * n
    t0 = time.monotonic()
    receivers = await connect_all(url, n)
    readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(receivers)]
    (sender,) = await connect_all(url, 1)
    sender_reader = asyncio.create_task(read_and_drop(sender))
    if ours:
        await asyncio.wait_for(settled.wait(), 120)
    connect_time = time.monotonic() - t0

    total = int(rate * seconds)
    start = time.monotonic() + 0.5
    slips = []
    for k in range(total):
        scheduled = start + k / rate
        await asyncio.sleep(max(0, scheduled - time.monotonic()))
        slips.append(time.monotonic() - scheduled)
        await sender.send(repr(time.time()))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(len(r) < total for r in received):
        await asyncio.sleep(0.05)
    lost = sum(total - len(r) for r in received)
    latencies = [x for r in received for x in r]
    for ws in [*receivers, sender]:
        ws.transport.abort()
    for task in [*readers, sender_reader]:
        task.cancel()
    print(
        json.dumps(
            {
                "p50": percentile(latencies, 50) * 1000,
                "p95": percentile(latencies, 95) * 1000,
                "p99": percentile(latencies, 99) * 1000,
                "max": max(latencies, default=float("nan")) * 1000,
                "lost": lost,
                "connect": connect_time,
                "slip": max(slips, default=0) * 1000,
            }
        )
    )


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
                    out = run_load(
                        __file__,
                        "--load",
                        server.url,
                        n,
                        rate,
                        seconds,
                        "ours" if name.endswith(".py") else "ref",
                    )
                    out["cpu"] = (server.cpu_seconds() - cpu0) / (time.monotonic() - t0)
                    results[name].append(out)
            print(f"  {n} clients: run {run + 1}/{runs} done", file=sys.stderr)
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
        print(f"{n:,} clients, {rate} messages a second, latency in ms")
        print(
            table(
                [
                    "server",
                    "p50",
                    "p95",
                    "p99",
                    "max",
                    "lost",
                    "send slip ms",
                    "server CPU",
                    "connect (all N)",
                ],
                rows,
            )
        )
        p99 = {name: statistics.median(o["p99"] for o in outs) for name, outs in results.items()}
        ours = p99["3_websocket_broadcast.py"]
        print(
            f"p99 ratios: {ours / p99['bare broadcast() reference']:.2f}x the bare broadcast() "
            f"reference, {ours / p99['floor: pre-built frame to each transport']:.2f}x the floor\n"
        )


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--quick", action="store_true", help="tiny numbers: a smoke test")
    parser.add_argument("--load", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--idle", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        url, n, rate, seconds, kind = args.load
        asyncio.run(load(url, int(n), float(rate), float(seconds), kind == "ours"))
        return
    if args.idle:
        asyncio.run(idle(args.idle[0], int(args.idle[1])))
        return
    if args.quick:
        args.runs, args.seconds, args.sizes = 1, 1, [20]
    print(f"Broadcast benchmark; {machine()}\n")
    measure_latency(args.sizes, args.runs, args.seconds)
    measure_memory([n for n in args.sizes if n >= 1000] or args.sizes, args.runs)


if __name__ == "__main__":
    main()
