"""Echo benchmark: round trips per second, 2_websocket_echo.py against references.

Run: python bench/echo.py            (about 2 minutes; --quick for a smoke run)
Servers run on one core, the load generator on the other; all on 127.0.0.1.
"""

import argparse
import asyncio
import json
import sys
import time

from common import Server, machine, run_load, summary, table

SERVERS = {
    "2_websocket_echo.py --quiet": ["2_websocket_echo.py", "--quiet", "--port", "0"],
    "2_websocket_echo.py (logs each message)": ["2_websocket_echo.py", "--port", "0"],
    "bare websockets echo (baseline)": ["bench/servers.py", "bare-echo"],
    "raw asyncio TCP echo (ceiling)": ["bench/servers.py", "raw-tcp-echo"],
}
MESSAGE = "x" * 32


async def websocket_client(url, deadline, counts):
    from websockets.asyncio.client import connect

    # Offer permessage-deflate, as browsers do (the library's default).
    async with connect(url, proxy=None, compression="deflate") as ws:
        while time.monotonic() < deadline:
            await ws.send(MESSAGE)
            await ws.recv()
            counts[0] += 1


async def tcp_client(url, deadline, counts):
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    data = MESSAGE.encode()
    while time.monotonic() < deadline:
        writer.write(data)
        await reader.readexactly(len(data))
        counts[0] += 1
    writer.close()


async def load(url, clients, seconds, raw):
    """The load generator: `clients` clients in ping-pong for `seconds`."""
    counts = [0]
    client = tcp_client if raw else websocket_client
    cpu0, t0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(client(url, t0 + seconds, counts) for _ in range(clients)))
    elapsed = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    print(json.dumps({"rate": counts[0] / elapsed, "client_cpu": cpu / elapsed}))


def measure(runs, clients, seconds):
    results = {name: [] for name in SERVERS}
    for run in range(runs):  # alternate the servers, run after run
        for name, command in SERVERS.items():
            with Server(command) as server:
                cpu0 = server.cpu_seconds()
                out = run_load(
                    __file__,
                    "--load",
                    server.url,
                    clients,
                    seconds,
                    "raw" if "raw" in command[-1] else "ws",
                )
                out["server_cpu"] = (server.cpu_seconds() - cpu0) / seconds
                results[name].append(out)
        print(f"  {clients} client(s): run {run + 1}/{runs} done", file=sys.stderr)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--quick", action="store_true", help="1 run of 1 s: a smoke test")
    parser.add_argument(
        "--load", nargs=4, metavar=("URL", "CLIENTS", "SECONDS", "KIND"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.load:
        url, clients, seconds, kind = args.load
        asyncio.run(load(url, int(clients), float(seconds), kind == "raw"))
        return
    if args.quick:
        args.runs, args.seconds = 1, 1
    print(f"Echo round trips per second, 32-byte text messages; {machine()}")
    print(f"median of {args.runs} alternating runs of {args.seconds:g} s (min-max)\n")
    for clients in (1, 50):
        results = measure(args.runs, clients, args.seconds)
        baseline = sorted(r["rate"] for r in results["bare websockets echo (baseline)"])
        base = baseline[len(baseline) // 2]
        rows = []
        for name, runs in results.items():
            rates = [r["rate"] for r in runs]
            rows.append(
                [
                    name,
                    summary(rates),
                    f"{sorted(rates)[len(rates) // 2] / base:.2f}x",
                    summary([100 * r["server_cpu"] for r in runs], "{:.0f}%"),
                    summary([100 * r["client_cpu"] for r in runs], "{:.0f}%"),
                ]
            )
        print(f"{clients} client(s) in ping-pong")
        print(table(["server", "round trips/s", "vs baseline", "server CPU", "client CPU"], rows))
        print()


if __name__ == "__main__":
    main()
