"""Broadcast benchmark: 3_websocket_broadcast.py against Node's ws and the references.

Delivery latency, server CPU, loss and memory at 100, 1,000 and 5,000 clients;
--scale-out: 1 process against 2 sharing the conversation through Redis Streams.

Run: python bench/broadcast.py       (about 30 minutes; --quick for a smoke run)
Servers run on one core, the load processes on the other; all on 127.0.0.1.
"""

import argparse
import asyncio
import json
import sys
import tempfile
import time

from common import (
    ROOT,
    Server,
    compare,
    each_server,
    finish,
    median,
    node_ws,
    pyplot,
    python,
    raise_file_limit,
    read_json,
    redis_server,
    save,
    spawn,
    summary,
    table,
    tell,
    versions,
)
from lean import Client, open_all

DEMO, NODE, BARE, FLOOR = (
    "3_websocket_broadcast.py",
    "Node ws (same protocol)",
    "bare broadcast()",
    "floor: pre-built frame to each transport",
)
# --rate 0: the load's one sender talks far faster than the 5 a second a person may.
DEMO_COMMAND = python(DEMO, "--port", 0, "--max-clients", 20000, "--rate", 0)


def latency_servers():
    """name -> (command, compression, speaks the demo's protocol)"""
    found = {
        DEMO: (DEMO_COMMAND, "off", True),
        NODE: (node_ws("broadcast"), "off", True),
        BARE: (python("bench/servers.py", "bare-broadcast"), "off", False),
        f"{BARE}, deflate": (
            python("bench/servers.py", "bare-broadcast", "--deflate"),
            "deflate",
            False,
        ),
        "await send() to each": (python("bench/servers.py", "await-each"), "off", False),
        "await send() to each, deflate": (
            python("bench/servers.py", "await-each", "--deflate"),
            "deflate",
            False,
        ),
        FLOOR: (python("bench/servers.py", "floor"), "off", False),
    }
    return {name: value for name, value in found.items() if value[0]}


def memory_servers(latency):
    found = {
        name: latency[name] for name in (DEMO, NODE, BARE, f"{BARE}, deflate") if name in latency
    }
    found["1_websocket_server.py"] = (
        python("1_websocket_server.py", "--port", 0, "--max-clients", 20000),
        "off",
        False,
    )
    found["2_websocket_echo.py"] = (
        python("2_websocket_echo.py", "--port", 0, "--max-clients", 20000),
        "off",
        False,
    )
    return found


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else float("nan")


# --- The load processes: receivers, one sender, idle connections. ---


class Receiver(Client):
    """Records when each broadcast arrives, after the warm-up; parses no more than it must."""

    def __init__(self, path, host, events, everyone, warmup, latencies):
        super().__init__(path, host)
        self.events, self.everyone, self.warmup = events, everyone, warmup
        self.latencies = latencies  # shared list of (ms) for this process
        self.settled, self.count = not events, 0

    def message(self, payload, now):
        if self.events:
            if not payload.startswith(b'{"type": "message"'):
                event = json.loads(payload)
                self.settled |= event["type"] == "presence" and event["clients"] == self.everyone
                return
            # Slice the timestamp out rather than parse the JSON, so that receiving
            # costs the same as with the references, which send bare text.
            start = payload.index(b'"text": "') + 9
            payload = payload[start : payload.index(b'"', start)]
        self.count += 1
        if self.count > self.warmup:
            self.latencies.append(round((now - float(payload)) * 1000, 2))


async def receive(urls, n, events, everyone, warmup, total, timeout):
    """Load process: n receivers; reports when all are in, then what arrived, then closes."""
    latencies, t0 = [], time.monotonic()
    receivers = await open_all(
        lambda path, host: Receiver(path, host, events, everyone, warmup, latencies), urls, n
    )
    while not all(r.settled for r in receivers):  # presence says that everyone is in
        if any(r.closed for r in receivers) or time.monotonic() - t0 > 300:
            raise SystemExit("the server closed connections, or presence never settled")
        await asyncio.sleep(0.02)
    print(json.dumps({"connect": time.monotonic() - t0}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # "go": the sender starts
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(r.count < warmup + total for r in receivers):
        await asyncio.sleep(0.01)
    lost = sum(max(0, warmup + total - r.count) for r in receivers)
    closed = sum(r.closed for r in receivers)
    print(json.dumps({"latencies": latencies, "lost": lost, "closed": closed}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # "close": the bench read the CPU
    for r in receivers:
        r.transport.abort()


async def send(url, rate, warmup, total):
    """Load process: the sender, alone, so that its schedule depends on nobody else."""
    from websockets.asyncio.client import connect

    async with connect(url, proxy=None, ping_interval=None) as ws:
        drain = asyncio.create_task(read_and_drop(ws))
        print('"connected"', flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "go"
        slips = []
        start = time.monotonic() + 0.05
        for k in range(warmup + total):
            if k == warmup:
                print('"timed"', flush=True)  # the bench reads the server's CPU now
            scheduled = start + k / rate
            await asyncio.sleep(max(0, scheduled - time.monotonic()))
            slips.append(time.monotonic() - scheduled)
            await ws.send(repr(time.time()))
        drain.cancel()
    print(json.dumps({"slip": max(slips, default=0) * 1000}), flush=True)


async def read_and_drop(ws):
    async for _ in ws:
        pass


class Idle(Client):
    """Reads and ignores everything; for the demo's protocol, waits until presence says n."""

    def __init__(self, path, host, events, everyone):
        super().__init__(path, host)
        self.events, self.everyone, self.settled = events, everyone, not events

    def message(self, payload, now):
        if self.events and b'"presence"' in payload:
            self.settled |= json.loads(payload)["clients"] == self.everyone


async def idle(url, n, events, pause):
    """Load process: n idle connections, held until stdin says close."""
    receivers = await open_all(lambda path, host: Idle(path, host, events, n), [url], n)
    t0 = time.monotonic()
    while not all(r.settled for r in receivers) and time.monotonic() - t0 < 60:
        await asyncio.sleep(0.02)
    await asyncio.sleep(pause)  # let the server finish its welcome and presence frames
    print('"ready"', flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for r in receivers:
        r.transport.abort()


# --- One run: start the loads, time the window, read the server's CPU around it. ---


def run_loads(servers, n, rate, warmup, total, events, processes=2, pinned=True):
    """One sender and `processes` receiver processes; merge what they measured."""
    urls = ",".join(s.url for s in servers)
    sender = spawn(__file__, "--send", servers[0].url, rate, warmup, total, pinned=pinned)
    read_json(sender)  # connected
    shares = [n // processes + (i < n % processes) for i in range(processes)]
    timeout = (warmup + total) / rate + 60
    receivers = [
        spawn(
            __file__,
            "--receive",
            urls,
            share,
            int(events),
            n + 1,
            warmup,
            total,
            timeout,
            pinned=pinned,
        )
        for share in shares
        if share
    ]
    connect = max(read_json(r)["connect"] for r in receivers)
    for proc in [*receivers, sender]:
        tell(proc, "go")
    read_json(sender)  # "timed": the warm-up is over
    cpu0, t0 = sum(s.cpu_seconds() for s in servers), time.monotonic()
    outs = [read_json(r) for r in receivers]
    cpu, elapsed = sum(s.cpu_seconds() for s in servers) - cpu0, time.monotonic() - t0
    for proc in receivers:
        tell(proc, "close")
        finish(proc)
    slip = read_json(sender)["slip"]
    finish(sender)
    latencies = [x for o in outs for x in o["latencies"]]
    return {
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "max": max(latencies, default=float("nan")),
        "lost": sum(o["lost"] for o in outs),
        "closed": sum(o["closed"] for o in outs),
        "cpu": cpu / elapsed,
        "cpu_us": 1e6 * cpu / (total * (n + 1)),  # the sender gets each message too
        "connect": connect,
        "slip": slip,
    }


def measure_latency(catalogue, sizes, args):
    print(f"Delivery latency: one sender sends a timestamped message {args.rate:g} times a second;")
    print(f"{args.warmup} messages of warm-up, then {args.messages} timed. Median of {args.runs}")
    print("alternating runs (min-max). CPU µs/msg: server CPU per delivered message.\n")
    everything = {}
    for n in sizes:
        results = {name: [] for name in catalogue}

        def one(name, entry, n=n):
            command, _, events = entry
            with tempfile.TemporaryFile() as log, Server(command, log=log) as server:
                return run_loads(
                    [server], n, args.rate, args.warmup, args.messages, events, args.processes
                )

        for run in range(args.runs):
            for name, out in each_server(catalogue, one, args.quick).items():
                results[name].append(out)
            print(f"  {n} clients: run {run + 1}/{args.runs} done", file=sys.stderr)
        print_latency_table(f"{n:,} clients, latency in ms", results, catalogue)
        print_ratios(results)
        everything[n] = results
    return everything


def print_ratios(results):
    if DEMO not in results:
        return
    ours = results[DEMO]
    for name in (NODE, BARE, FLOOR):
        if name in results:
            theirs = results[name]
            p99 = compare([o["p99"] for o in ours], [o["p99"] for o in theirs])
            cpu = compare([o["cpu_us"] for o in ours], [o["cpu_us"] for o in theirs])
            print(f"{DEMO} vs {name}: p99 {p99}; CPU per message {cpu}")
    print()


def print_latency_table(title, results, catalogue=None):
    rows = []
    for name, outs in results.items():

        def col(key, fmt="{:.1f}", outs=outs):
            return summary([o[key] for o in outs], fmt)

        rows.append(
            [
                name,
                catalogue[name][1] if catalogue else "off",
                col("p50"),
                col("p99"),
                col("max"),
                sum(o["lost"] + o["closed"] for o in outs),
                col("cpu", "{:.0%}"),
                col("cpu_us", "{:.1f}"),
                col("slip"),
                col("connect", "{:.1f} s"),
            ]
        )
    print(title)
    headers = ["server", "compression", "p50", "p99", "max", "lost", "server CPU", "CPU µs/msg"]
    print(table([*headers, "send slip ms", "connect (all N)"], rows))


def measure_memory(catalogue, sizes, runs, parallel):
    print("Memory: resident memory per idle connection that offered permessage-deflate,")
    print(f"(RSS with N clients - RSS with none) / N, KiB. Median of {runs} runs (min-max).\n")
    memory = {name: {} for name in catalogue}
    for n in sizes:

        def one(name, entry, n=n):
            command, _, events = entry
            per = []
            for _ in range(runs):
                with tempfile.TemporaryFile() as log, Server(command, log=log) as server:
                    before = server.rss_kib()
                    proc = spawn(
                        __file__, "--idle", server.url, n, int(events), 0.05 if parallel else 0.5
                    )
                    read_json(proc)  # ready
                    per.append((server.rss_kib() - before) / n)
                    tell(proc, "close")
                    finish(proc)
            return per

        for name, per in each_server(catalogue, one, parallel).items():
            memory[name][n] = per
    rows = [
        [name, catalogue[name][1], *(summary(memory[name][n], "{:.1f}") for n in sizes)]
        for name in catalogue
    ]
    print(table(["server", "compression", *(f"{n:,} idle clients" for n in sizes)], rows))
    print()
    return memory


def measure_scale_out(sizes, args):
    """The same latency table for 1 process and for 2 processes sharing through Redis."""
    with redis_server() as url:
        if url is None:
            print("Scaling out: skipped, no redis-server (apt-get install redis-server).\n")
            return None
        return scale_out(sizes, args, url)


def scale_out(sizes, args, url):
    """Run the scale-out measurement against the Redis at url."""
    print("Scaling out: 1 process, or 2 processes sharing one conversation through Redis.")
    print("Nothing pinned: the servers, Redis and 2 load processes share the 2 cores.")
    print(
        f"{args.rate:g} messages a second, {args.warmup} of warm-up then {args.messages} timed; "
        f"median of {args.runs} runs (min-max).\n"
    )
    everything = {}
    for n in sizes:
        modes = {"1 process": 1, "2 processes + Redis": 2}

        def one(name, count, n=n):
            extra = [] if count == 1 else ["--redis", url]
            with tempfile.TemporaryFile() as log:
                servers = []
                try:
                    for _ in range(count):
                        servers.append(Server([*DEMO_COMMAND, *extra], cores=None, log=log))
                    return run_loads(
                        servers, n, args.rate, args.warmup, args.messages, True, 2, False
                    )
                finally:
                    for server in servers:
                        server.stop()

        results = {name: [] for name in modes}
        for run in range(args.runs):
            for name, out in each_server(modes, one, args.quick).items():
                results[name].append(out)
            print(f"  {n} clients: run {run + 1}/{args.runs} done", file=sys.stderr)
        print_latency_table(f"{n:,} clients, latency in ms", results)
        print()
        everything[n] = results
    return everything


# --- Charts: where a reader would rather look than read. ---


def style(name):
    if name.startswith(("3_", "1 process")):
        return {"color": "#d62728", "linewidth": 2.5, "marker": "o"}
    if name.startswith(("Node", "2 processes")):
        return {"color": "#2ca02c", "linewidth": 2.5, "marker": "s"}
    dashed = "deflate" in name
    return {"linewidth": 1.2, "marker": ".", "linestyle": "--" if dashed else "-"}


def chart_lines(everything, key, ylabel, title, directory, filename):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    # Red and green are the demo's and Node's own: the other lines take other colours.
    ax.set_prop_cycle(color=["#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"])
    sizes = sorted(everything)
    for name in everything[sizes[0]]:
        values = [[o[key] for o in everything[n][name]] for n in sizes]
        mid = [median(v) for v in values]
        err = [
            [m - min(v) for m, v in zip(mid, values, strict=True)],
            [max(v) - m for m, v in zip(mid, values, strict=True)],
        ]
        ax.errorbar(sizes, mid, yerr=err, label=name, capsize=3, **style(name))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_locator(plt.NullLocator())  # only the sizes measured
    ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
    ax.set_xlabel("clients")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    save(fig, directory, filename)


def chart_memory(memory, directory):
    plt = pyplot()
    names = list(memory)[::-1]
    sizes = sorted(next(iter(memory.values())))
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    height = 0.8 / len(sizes)
    for i, n in enumerate(sizes):
        mid = [median(memory[name][n]) for name in names]
        ys = [k + i * height for k in range(len(names))]
        ax.barh(ys, mid, height=height, label=f"{n:,} idle clients")
    ax.set_yticks([k + height * (len(sizes) - 1) / 2 for k in range(len(names))], names)
    ax.set_xlabel("KiB of resident memory per connection (median)")
    ax.set_title("Memory per idle connection")
    ax.legend(fontsize=8)
    save(fig, directory, "bench-memory.png")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rate", type=float, default=10, help="messages a second (default 10)")
    parser.add_argument("--messages", type=int, default=50, help="timed messages (default 50)")
    parser.add_argument("--warmup", type=int, default=10, help="messages before the timing")
    parser.add_argument("--sizes", type=int, nargs="+", help="clients (default 100 1000 5000)")
    parser.add_argument("--memory-runs", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2, help="receiver processes (default 2)")
    parser.add_argument("--only", nargs="+", metavar="WORD", help="servers whose name has WORD")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory table")
    parser.add_argument("--charts", metavar="DIR", help="where to write the PNGs (default: docs)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny numbers, all at once: a smoke test"
    )
    parser.add_argument(
        "--scale-out", action="store_true", help="compare 1 process with 2 through Redis"
    )
    parser.add_argument("--receive", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument("--send", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--idle", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_file_limit()
    if args.receive:
        urls, n, events, everyone, warmup, total, timeout = args.receive
        asyncio.run(
            receive(
                urls.split(","),
                int(n),
                events == "1",
                int(everyone),
                int(warmup),
                int(total),
                float(timeout),
            )
        )
        return
    if args.send:
        url, rate, warmup, total = args.send
        asyncio.run(send(url, float(rate), int(warmup), int(total)))
        return
    if args.idle:
        url, n, events, pause = args.idle
        asyncio.run(idle(url, int(n), events == "1", float(pause)))
        return
    if args.quick:
        args.runs, args.memory_runs, args.rate, args.messages, args.warmup = 1, 1, 50, 3, 1
        args.processes = 1
        args.sizes = args.sizes or [20]
    charts = args.charts or (None if args.quick else ROOT / "docs")
    if args.scale_out:
        print(f"Broadcast benchmark, scaling out; {versions()}\n")
        everything = measure_scale_out(args.sizes or [5000, 10000], args)
        if charts and everything:
            chart_lines(
                everything,
                "p99",
                "p99 latency, ms (median, min-max)",
                "One process, or two sharing through Redis",
                charts,
                "bench-scale-out.png",
            )
        return
    sizes = args.sizes or [100, 1000, 5000]
    catalogue = latency_servers()
    if args.only:
        catalogue = {k: v for k, v in catalogue.items() if any(w in k for w in args.only)}
    print(f"Broadcast benchmark; {versions()}\n")
    everything = measure_latency(catalogue, sizes, args)
    if args.no_memory:
        return
    memory_sizes = [n for n in sizes if n >= 1000] or sizes
    memory = measure_memory(memory_servers(catalogue), memory_sizes, args.memory_runs, args.quick)
    if charts:
        chart_lines(
            everything,
            "p99",
            "p99 delivery latency, ms (median, min-max)",
            "Broadcast: p99 latency against clients",
            charts,
            "bench-broadcast-p99.png",
        )
        chart_lines(
            everything,
            "cpu_us",
            "server CPU µs per delivered message",
            "Broadcast: server CPU per delivered message",
            charts,
            "bench-broadcast-cpu.png",
        )
        chart_memory(memory, charts)


if __name__ == "__main__":
    main()
