"""Broadcast benchmark: delivery latency, loss and memory of 3_websocket_broadcast.py
against reference servers, at 100, 1,000 and 5,000 clients.

Run: python bench/broadcast.py       (about 10 minutes; --quick for a smoke run)
Servers run on one core, the load generator on the other; all on 127.0.0.1.
"""

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time

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


async def connect_all(urls, n):
    """Open n connections spread over urls, 100 at a time; offer permessage-deflate,
    as browsers do."""
    from websockets.asyncio.client import connect

    clients = []
    for start in range(0, n, 100):
        batch = [
            connect(urls[i % len(urls)], proxy=None, open_timeout=120, ping_interval=None)
            for i in range(start, min(start + 100, n))
        ]
        clients += await asyncio.gather(*batch)
    return clients


async def load(urls, n, rate, seconds, ours, everyone, sending):
    """A load generator: n receivers and, if `sending`, the one sender.

    With several load processes, each waits until the server's presence count says
    all `everyone` clients are connected, so the sender starts when all are there.
    """
    urls = urls.split(",")
    received = [[] for _ in range(n)]  # latencies in ms, per receiver
    settled = [False] * n
    all_settled = asyncio.Event()

    async def read(i, ws):
        async for message in ws:
            now = time.time()
            if ours:
                event = json.loads(message)
                if event["type"] == "presence" and event["clients"] == everyone:
                    settled[i] = True
                    if all(settled):
                        all_settled.set()
                if event["type"] != "message":
                    continue
                message = event["text"]
            received[i].append(round((now - float(message)) * 1000, 2))

    t0 = time.monotonic()
    receivers = await connect_all(urls, n)
    readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(receivers)]
    senders = await connect_all(urls, 1) if sending else []
    drains = [asyncio.create_task(read_and_drop(ws)) for ws in senders]
    if ours:
        await asyncio.wait_for(all_settled.wait(), 300)
    connect_time = time.monotonic() - t0

    total = int(rate * seconds)
    slips = []
    start = time.monotonic() + 0.5
    for k in range(total if sending else 0):
        scheduled = start + k / rate
        await asyncio.sleep(max(0, scheduled - time.monotonic()))
        slips.append(time.monotonic() - scheduled)
        await senders[0].send(repr(time.time()))
    deadline = time.monotonic() + seconds + 60
    while time.monotonic() < deadline and any(len(r) < total for r in received):
        await asyncio.sleep(0.05)
    for ws in [*receivers, *senders]:
        ws.transport.abort()
    for task in [*readers, *drains]:
        task.cancel()
    print(
        json.dumps(
            {
                "latencies": [x for r in received for x in r],
                "lost": sum(total - len(r) for r in received),
                "connect": connect_time,
                "slip": max(slips, default=0) * 1000,
            }
        )
    )


def run_loads(urls, n, rate, seconds, ours, processes=1):
    """Run the load in `processes` processes, the first one sending; merge the results."""
    shares = [n // processes + (i < n % processes) for i in range(processes)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--load",
                ",".join(urls),
                str(share),
                str(rate),
                str(seconds),
                "ours" if ours else "ref",
                str(n + 1),
                str(int(i == 0)),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=(lambda: pin(0, CLIENT_CORE)) if processes == 1 else None,
        )
        for i, share in enumerate(shares)
    ]
    outs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError("load generator failed")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    latencies = [x for o in outs for x in o["latencies"]]
    return {
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "p99": percentile(latencies, 99),
        "max": max(latencies, default=float("nan")),
        "lost": sum(o["lost"] for o in outs),
        "connect": max(o["connect"] for o in outs),
        "slip": outs[0]["slip"],
    }


async def read_and_drop(ws):
    async for _ in ws:
        pass


async def idle(url, n):
    """Hold n idle connections open until stdin closes."""
    clients = await connect_all([url], n)
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
                    servers = [Server([*command, *extra], cores=None) for _ in range(count)]
                    try:
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
    parser.add_argument("--load", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument("--idle", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        urls, n, rate, seconds, kind, everyone, sending = args.load
        asyncio.run(
            load(
                urls,
                int(n),
                float(rate),
                float(seconds),
                kind == "ours",
                int(everyone),
                sending == "1",
            )
        )
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
