"""Echo benchmark: round trips per second, 2_websocket_echo.py against references.

Run: python bench/echo.py            (about 8 minutes; --quick for a smoke run)
Servers run on one core, the load generator on the other; all on 127.0.0.1. Each run
opens every connection first, warms up, then counts round trips in a timed window.
"""

import argparse
import asyncio
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
    read_json,
    save,
    spawn,
    summary,
    table,
    tell,
    versions,
)
from lean import Client, open_all

MESSAGE = b"x" * 32
BASELINE = "bare websockets echo"


def servers():
    """name -> (command, compression, logs to a file)"""
    found = {
        "2_websocket_echo.py --quiet": (
            python("2_websocket_echo.py", "--quiet", "--port", 0, "--max-per-address", 0),
            "off",
        ),
        "2_websocket_echo.py, log to a file": (
            python("2_websocket_echo.py", "--port", 0, "--max-per-address", 0),
            "off",
        ),
        BASELINE: (python("bench/servers.py", "bare-echo"), "off"),
        f"{BASELINE}, deflate": (python("bench/servers.py", "bare-echo", "--deflate"), "deflate"),
        "Node ws echo": (node_ws("echo"), "off"),
        "raw asyncio TCP echo (ceiling)": (python("bench/servers.py", "raw-tcp-echo"), "none"),
    }
    return {name: value for name, value in found.items() if value[0]}


class Echoer(Client):
    """Sends a message, waits for its echo, sends the next, for as long as `running`."""

    count, running = 0, True

    def start(self):
        self.transport.write(self.frame(MESSAGE))

    def message(self, payload, now):
        Echoer.count += 1
        if Echoer.running:
            self.transport.write(self.frame(MESSAGE))


class RawEchoer(Echoer):
    """The same ping-pong over bare TCP, for the raw asyncio echo."""

    def connection_made(self, transport):
        self.transport = transport
        self.opened.set_result(True)

    def data_received(self, data):
        self.buffer += data
        while len(self.buffer) >= len(MESSAGE):
            self.buffer = self.buffer[len(MESSAGE) :]
            self.message(MESSAGE, 0)

    def frame(self, payload):
        return payload


async def load(url, clients, seconds, warmup, raw):
    """The load process: open every connection, warm up, then count in a timed window."""
    echoers = await open_all(RawEchoer if raw else Echoer, [url], clients)
    for echoer in echoers:
        echoer.start()
    await asyncio.sleep(warmup)
    count0, cpu0, t0 = Echoer.count, time.process_time(), time.monotonic()
    print('{"timed": true}', flush=True)  # the bench reads the server's CPU now
    await asyncio.sleep(seconds)
    count, cpu, elapsed = Echoer.count - count0, time.process_time() - cpu0, time.monotonic() - t0
    print(f'{{"round_trips": {count}, "rate": {count / elapsed}, "client_cpu": {cpu / elapsed}}}')
    sys.stdout.flush()  # and again now, before the clients stop and close
    Echoer.running = False
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for echoer in echoers:
        echoer.transport.abort()


def measure(catalogue, runs, clients, seconds, warmup, parallel):
    def one(name, entry):
        command = entry[0]
        # The log goes to a real file, as in production: /dev/null would hide its cost.
        with tempfile.TemporaryFile() as log, Server(command, log=log) as server:
            kind = "raw" if "raw-tcp-echo" in command else "ws"
            proc = spawn(__file__, "--load", server.url, clients, seconds, warmup, kind)
            read_json(proc)  # warmed up: the timed window starts
            cpu0, t0 = server.cpu_seconds(), time.monotonic()
            out = read_json(proc)
            cpu = server.cpu_seconds() - cpu0
            out["server_cpu"] = cpu / (time.monotonic() - t0)
            out["cpu_us"] = 1e6 * cpu / max(out["round_trips"], 1)
            tell(proc, "close")
            finish(proc)
            return out

    results = {name: [] for name in catalogue}
    for run in range(runs):  # alternate the servers, run after run
        for name, out in each_server(catalogue, one, parallel).items():
            results[name].append(out)
        print(f"  {clients} client(s): run {run + 1}/{runs} done", file=sys.stderr)
    return results


def report(catalogue, clients, results):
    base = [r["rate"] for r in results[BASELINE]]
    rows = []
    for name, runs in results.items():
        rates = [r["rate"] for r in runs]
        rows.append(
            [
                name,
                catalogue[name][1],
                summary(rates),
                f"{median(rates) / median(base):.2f}x",
                summary([100 * r["server_cpu"] for r in runs], "{:.0f}%"),
                summary([r["cpu_us"] for r in runs], "{:.0f}"),
                summary([100 * r["client_cpu"] for r in runs], "{:.0f}%"),
            ]
        )
    headers = ["server", "compression", "round trips/s", "vs bare", "server CPU", "CPU µs/trip"]
    print(f"{clients} client(s) in ping-pong")
    print(table([*headers, "client CPU"], rows))
    for name in ("2_websocket_echo.py --quiet", "Node ws echo"):
        if name in results:
            ours = [r["rate"] for r in results[name]]
            print(f"{name} vs {BASELINE}: {compare(ours, base, lower_is_better=False)}")
    print()


def chart(catalogue, everything, directory):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(everything), figsize=(10, 3.6), sharey=True, squeeze=False)
    names = list(catalogue)[::-1]
    for ax, (clients, results) in zip(axes[0], everything.items(), strict=True):
        rates = [[r["rate"] for r in results[name]] for name in names]
        mid = [median(r) for r in rates]
        err = [
            [m - min(r) for m, r in zip(mid, rates, strict=True)],
            [max(r) - m for m, r in zip(mid, rates, strict=True)],
        ]
        colours = ["#d62728" if n.startswith("2_") else "#7f7f7f" for n in names]
        colours = [
            "#2ca02c" if n.startswith("Node") else c for n, c in zip(names, colours, strict=True)
        ]
        ax.barh(names, mid, xerr=err, color=colours, capsize=3)
        ax.set_title(f"{clients} client{'s' * (clients > 1)} in ping-pong")
        ax.set_xlabel("round trips per second (median, min-max)")
    save(fig, directory, "bench-echo.png")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5, help="timed window of each run")
    parser.add_argument("--warmup", type=float, default=1, help="seconds before the window")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--charts", metavar="DIR", help="where to write the PNG (default: docs)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny numbers, all at once: a smoke test"
    )
    parser.add_argument("--load", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        url, clients, seconds, warmup, kind = args.load
        asyncio.run(load(url, int(clients), float(seconds), float(warmup), kind == "raw"))
        return
    if args.quick:
        args.runs, args.seconds, args.warmup, args.clients = 1, 0.2, 0.05, [5]
    charts = args.charts or (None if args.quick else ROOT / "docs")
    catalogue = servers()
    print(f"Echo round trips per second, 32-byte text messages; {versions()}")
    print(
        f"Each run: connect, {args.warmup:g} s warm-up, {args.seconds:g} s timed; "
        f"median of {args.runs} alternating runs (min-max).\n"
    )
    everything = {}
    for clients in args.clients:
        everything[clients] = measure(
            catalogue, args.runs, clients, args.seconds, args.warmup, args.quick
        )
        report(catalogue, clients, everything[clients])
    if charts:
        chart(catalogue, everything, charts)


if __name__ == "__main__":
    main()
