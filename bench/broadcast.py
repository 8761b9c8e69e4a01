"""Broadcast benchmark: 3_websocket_broadcast.py against its peers, Node's ws and references.

Delivery latency, server CPU and loss at 1,000 and 5,000 clients, with a control in
every run (the floor must come out faster than the demo, or the load is what is measured);
memory per idle connection; then all the cores of the machine: one process, Node's ws and
the deployment stack's shape (two processes through Redis, behind nginx) at 5,000 and
10,000 clients. --proxy: what the nginx hop costs the demo at 1,000 clients.

Run: python bench/broadcast.py    (about 50 minutes; --quick for a smoke run of seconds)
Servers run on one core, the load processes on the other; all on 127.0.0.1. Each run
saves its raw figures in bench/results/; --charts-from FILE redraws its charts.
"""

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections import namedtuple
from pathlib import Path

from common import (
    ROOT,
    Nginx,
    Server,
    compare,
    cpu_seconds,
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

DEMO, NODE, BARE, FLOOR = (
    "3_websocket_broadcast.py",
    "Node ws (same protocol)",
    "bare broadcast()",
    "floor: pre-built frame to each transport",
)
SOCKETIO, FASTAPI, AIOHTTP = "python-socketio", "FastAPI tutorial loop", "aiohttp"
LOAD = Path(__file__).with_name("load.py")
RESULTS = ROOT / "bench" / "results"
# --rate 0: the load's one sender talks far faster than the 5 a second a person may.
# The load comes from one address: no limits per address (--max-per-address 0, --rate 0).
DEMO_COMMAND = python(
    DEMO, "--port", 0, "--max-clients", 20000, "--max-per-address", 0, "--rate", 0
)
# framing: "demo" speaks the demo's JSON, "socketio" the same inside Socket.IO packets,
# "bare" relays the sender's text as it is (the library references).
Entry = namedtuple("Entry", "command compression framing")
# name: (bench/peers.py's name, what it imports, framing)
PEERS = {
    SOCKETIO: ("socketio", ("socketio", "uvicorn", "uvloop"), "socketio"),
    FASTAPI: ("fastapi", ("fastapi", "uvicorn", "uvloop"), "demo"),
    AIOHTTP: ("aiohttp", ("aiohttp",), "demo"),
}
MISSING = "{} is not installed: pip install -r bench/requirements.txt"


def missing(modules):
    """The first module that cannot be imported, or None. In CI a missing one is an error:
    a peer that cannot be installed must not vanish from the table unnoticed."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            if os.environ.get("CI"):
                raise SystemExit(MISSING.format(module))
            return module
    return None


def latency_servers():
    """name -> Entry: the demo, Node's ws, the library references, the floor, the peers."""
    servers = python("bench/servers.py")
    found = {
        DEMO: Entry(DEMO_COMMAND, "off", "demo"),
        NODE: Entry(node_ws("broadcast"), "off", "demo"),
        BARE: Entry([*servers, "bare-broadcast"], "off", "bare"),
        f"{BARE}, deflate": Entry([*servers, "bare-broadcast", "--deflate"], "deflate", "bare"),
        "await send() to each": Entry([*servers, "await-each"], "off", "bare"),
        "await send() to each, deflate": Entry(
            [*servers, "await-each", "--deflate"], "deflate", "bare"
        ),
        FLOOR: Entry([*servers, "floor"], "off", "bare"),
    }
    for name, (kind, modules, framing) in PEERS.items():
        absent = missing(modules)
        if absent:
            print(f"{name}: skipped ({MISSING.format(absent)}).\n")
            continue
        command = python("bench/peers.py", kind)
        # Their default compresses; off is the demo's choice, code against code.
        found[name] = Entry([*command, "--no-compression"], "off", framing)
        found[f"{name}, deflate"] = Entry(command, "deflate (its default)", framing)
    return {name: entry for name, entry in found.items() if entry.command}


def memory_servers(latency):
    found = {
        name: latency[name] for name in (DEMO, NODE, BARE, f"{BARE}, deflate") if name in latency
    }
    for script in ("1_websocket_server.py", "2_websocket_echo.py"):
        found[script] = Entry(
            python(script, "--port", 0, "--max-clients", 20000, "--max-per-address", 0),
            "off",
            "bare",
        )
    return found


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else float("nan")


# --- One run: start the load, time the window, read every process's CPU around it. ---


def rate_for(n, args):
    """Messages a second: --rate, or what keeps the demo under about half its core, so that
    latency measures a fan-out rather than a queue of them: 10 up to 1,000 clients, then 5."""
    return args.rate or (10 if n <= 1000 else 5)


def run_loads(servers, n, args, framing, pinned=True, watch=None):
    """One sender and `args.processes` receiver processes against servers, or against the
    proxy in front of them (watch["proxy_url"]); merge what they measured. watch also maps
    names to the pids of other processes whose CPU counts (nginx, Redis)."""
    watch = watch or {}
    proxy = watch.get("proxy_url")
    urls = proxy or ",".join(s.url for s in servers)
    warmup, total, rate = args.warmup, args.messages, rate_for(n, args)
    first = urls.split(",")[0]
    sender = spawn(LOAD, "send", first, framing, rate, warmup, total, pinned=pinned)
    load = [sender]
    try:
        read_json(sender)  # connected
        shares = [n // args.processes + (i < n % args.processes) for i in range(args.processes)]
        timeout = (warmup + total) / rate + 60
        load += [
            spawn(
                LOAD,
                "receive",
                urls,
                share,
                framing,
                n + 1,  # the sender is in the conversation too
                warmup,
                total,
                timeout,
                pinned=pinned,
            )
            for share in shares
            if share
        ]
        receivers = load[1:]
        connect = max(read_json(r)["connect"] for r in receivers)
        for proc in load:
            tell(proc, "go")
        read_json(sender)  # "timed": the warm-up is over
        pids = {name: pid for name, pid in watch.items() if name != "proxy_url"}

        def cpu_now():
            return (
                sum(s.cpu_seconds() for s in servers),
                sum(cpu_seconds(p.pid) for p in load),
                {name: cpu_seconds(pid, children=True) for name, pid in pids.items()},
            )

        before, t0 = cpu_now(), time.monotonic()
        outs = [read_json(r) for r in receivers]  # the timed connections got everything
        after, elapsed = cpu_now(), time.monotonic() - t0
        for out, r in zip(outs, receivers, strict=True):
            out |= read_json(r)  # and then every other connection: lost, closed
        slip = read_json(sender)["slip"]
        for proc in load:
            tell(proc, "close")
            finish(proc)
        latencies = [x for o in outs for x in o["latencies"]]
        cpu = after[0] - before[0]
        result = {
            "rate": rate,
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "max": max(latencies, default=float("nan")),
            "lost": sum(o["lost"] for o in outs),
            "closed": sum(o["closed"] for o in outs),
            "cpu": cpu / elapsed,
            "cpu_us": 1e6 * cpu / (total * (n + 1)),  # the sender gets each message too
            "load_cpu": (after[1] - before[1]) / elapsed,
            "connect": connect,
            "slip": slip,
            "timed": sum(o["timed"] for o in outs),
        }
        for name in pids:
            used = after[2][name] - before[2][name]
            result[f"{name}_cpu"] = used / elapsed
            result[f"{name}_us"] = 1e6 * used / (total * (n + 1))
        return result

    finally:
        for proc in load:  # after a failure: none is left waiting on its stdin
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def attempt(work):
    """work(name, entry), unless that server already failed at this size: a server that
    cannot hold the load is left out and said so, and the benchmark goes on."""
    failed = set()

    def tried(name, entry):
        if name not in failed:
            try:
                return work(name, entry)
            except Exception as exc:
                failed.add(name)
                print(f"  {name} failed ({exc}): not tried again at this size", file=sys.stderr)
        return {"failed": True}

    return tried


def alternate(catalogue, tried, n, args):
    """{name: [one result per run]}: every server once per run, runs one after the other."""
    results = {name: [] for name in catalogue}
    for run in range(args.runs):
        for name, out in each_server(catalogue, tried, args.quick).items():
            results[name].append(out)
        print(f"  {n} clients: run {run + 1}/{args.runs} done", file=sys.stderr)
    return results


def measured(results, say=False):
    """The runs that did not fail, for each server that has any; say which failed."""
    found = {}
    for name, outs in results.items():
        good = [o for o in outs if not o.get("failed")]
        if say and len(good) < len(outs):
            print(f"{name}: {len(outs) - len(good)} of {len(outs)} runs failed, left out.")
        if good:
            found[name] = good
    return found


def measure_latency(catalogue, sizes, args, keep):
    rates = ", ".join(f"{rate_for(n, args):g} at {n:,}" for n in sizes)
    print("Delivery latency: one sender sends a timestamped message a number of times a second")
    print(f"({rates} clients); {args.warmup} messages of warm-up, then {args.messages} timed.")
    print(f"Median of {args.runs} alternating runs (min-max). CPU µs/msg: server CPU per")
    print("delivered message.")
    print(f"Load CPU: the sender and {args.processes} receiver processes, all on one core. Each")
    print("receiver process times 100 of its connections; the others are read after the window,")
    print("and every connection must have got every message.\n")
    everything = {}
    for n in sizes:

        def one(name, entry, n=n):
            with tempfile.TemporaryFile() as log, Server(entry.command, log=log) as server:
                return run_loads([server], n, args, entry.framing)

        everything[n] = alternate(catalogue, attempt(one), n, args)
        keep(everything)
        report_latency(n, everything[n], {name: e.compression for name, e in catalogue.items()})
    return everything


def report_latency(n, results, compression):
    results = measured(results, say=True)
    print_latency_table(f"{n:,} clients, latency in ms", results, compression)
    control(results)
    print_ratios(results)


def control(results):
    """The check that the load is not what is measured: the floor's p99 below the demo's."""
    if DEMO not in results or FLOOR not in results:
        return None
    floor, demo = [o["p99"] for o in results[FLOOR]], [o["p99"] for o in results[DEMO]]
    holds = max(floor) < min(demo)
    loads = [o["load_cpu"] for outs in results.values() for o in outs]
    said = f"the floor's p99 {summary(floor, '{:.1f}')} ms, the demo's {summary(demo, '{:.1f}')} ms"
    busy = f"the load's core was at most {max(loads):.0%} busy"
    if holds:
        print(f"Control holds: {said}, ranges apart: the load tells the servers apart ({busy}).")
    else:
        why = "the load limits what is measured" if max(loads) > 0.8 else "one slow run is enough"
        print(
            f"CONTROL FAILED: {said}, ranges overlap. At this size p99 does not rank the"
            f" servers ({busy}; {why}). CPU per message still does."
        )
    return holds


def print_ratios(results):
    if DEMO not in results:
        return
    ours = results[DEMO]
    for name, theirs in results.items():
        if name != DEMO and not name.startswith("await"):
            p99 = compare([o["p99"] for o in ours], [o["p99"] for o in theirs])
            cpu = compare([o["cpu_us"] for o in ours], [o["cpu_us"] for o in theirs])
            print(f"{DEMO} vs {name}: p99 {p99}; CPU per message {cpu}")
    print()


def print_latency_table(title, results, compression=None, extra=()):
    """extra: names of watched processes (nginx, Redis) whose CPU gets a column."""
    rows = []
    for name, outs in results.items():

        def col(key, fmt="{:.1f}", outs=outs):
            return summary([o[key] for o in outs], fmt)

        row = [name, (compression or {}).get(name, "off"), col("p50"), col("p99"), col("max")]
        row += [sum(o["lost"] + o["closed"] for o in outs), col("cpu", "{:.0%}")]
        row += [col("cpu_us"), col("load_cpu", "{:.0%}")]
        row += [col(f"{x}_cpu", "{:.0%}") if f"{x}_cpu" in outs[0] else "-" for x in extra]
        rows.append([*row, col("connect", "{:.1f} s")])
    headers = ["server", "compression", "p50", "p99", "max", "lost", "server CPU", "CPU µs/msg"]
    headers += ["load CPU", *(f"{x} CPU" for x in extra), "connect (all N)"]
    print(title)
    print(table(headers, rows))
    slip = max(o["slip"] for outs in results.values() for o in outs)
    print(f"The sender kept its schedule to within {slip:.1f} ms.")


# --- The targets of docs/performance.md, checked against the run. ---


def ratio(results, ours, theirs, key):
    """median(ours) / median(theirs) and the run-to-run range, or None without both."""
    if ours not in results or theirs not in results:
        return None
    a, b = [o[key] for o in results[ours]], [o[key] for o in results[theirs]]
    if not (min(a) > 0 and min(b) > 0):
        return None
    return median(a) / median(b), min(a) / max(b), max(a) / min(b)


def print_targets(everything):
    """Each target, measured: met by the median ratio, with the range of run-to-run ratios."""
    rows = []

    def check(size, theirs, key, limit, what):
        if size not in everything:
            return
        found = ratio(measured(everything[size]), DEMO, theirs, key)
        if found:
            mid, low, high = found
            verdict = "met" if mid <= limit else "missed"
            shown = f"{mid:.2f}x ({low:.2f}-{high:.2f})"
            rows.append([f"{what} at {size:,}", f"≤ {limit:g}x", shown, verdict])

    for size in (1000, 5000):
        check(size, BARE, "cpu_us", 1.05, "CPU/msg vs bare broadcast()")
    for name in (SOCKETIO, f"{SOCKETIO}, deflate", FASTAPI, f"{FASTAPI}, deflate"):
        for key, what in (("p99", "p99"), ("cpu_us", "CPU/msg")):
            check(5000, name, key, 0.5, f"{what} vs {name}")
    for size in (1000, 5000):
        for key, what in (("p99", "p99"), ("cpu_us", "CPU/msg")):
            check(size, NODE, key, 1.3, f"{what} vs Node ws")
    if rows:
        print("Targets: the demo's median over the other's (run-to-run min-max)")
        print(table(["target", "limit", "measured", "verdict"], rows))
        print()


# --- Memory: an idle connection, held by the lean clients of bench/lean.py. ---


def measure_memory(catalogue, sizes, runs, parallel):
    print("Memory: resident memory per idle connection that offered permessage-deflate,")
    print(f"(RSS with N clients - RSS with none) / N, KiB. Median of {runs} runs (min-max).\n")
    memory = {name: {} for name in catalogue}
    for n in sizes:

        def one(name, entry, n=n):
            events = int(entry.framing == "demo")
            per = []
            for _ in range(runs):
                with tempfile.TemporaryFile() as log, Server(entry.command, log=log) as server:
                    before = server.rss_kib()
                    proc = spawn(
                        __file__, "--idle", server.url, n, events, 0.05 if parallel else 0.5
                    )
                    read_json(proc)  # ready
                    per.append((server.rss_kib() - before) / n)
                    tell(proc, "close")
                    finish(proc)
            return per

        for name, per in each_server(catalogue, one, parallel).items():
            memory[name][n] = per
    print_memory(memory, {name: e.compression for name, e in catalogue.items()})
    return memory


def print_memory(memory, compression):
    sizes = sorted(next(iter(memory.values())))
    rows = [
        [name, compression.get(name, "off"), *(summary(memory[name][n], "{:.1f}") for n in sizes)]
        for name in memory
    ]
    print(table(["server", "compression", *(f"{n:,} idle clients" for n in sizes)], rows))
    print()


async def idle(url, n, events, pause):
    """Load process: n idle connections, held until stdin says close."""
    from lean import Client, open_all

    class Idle(Client):
        """Reads and ignores everything; for the demo's protocol, waits for presence."""

        settled = not events

        def message(self, payload, now):
            if events and b'"presence"' in payload:
                self.settled |= json.loads(payload)["clients"] == n

    receivers = await open_all(Idle, [url], n)
    t0 = time.monotonic()
    while not all(r.settled for r in receivers) and time.monotonic() - t0 < 60:
        await asyncio.sleep(0.02)
    await asyncio.sleep(pause)  # let the server finish its welcome and presence frames
    print('"ready"', flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for r in receivers:
        r.transport.abort()


# --- All the cores: the deployment stack's shape against one process and Node's ws. ---


def measure_scale_out(sizes, args, keep):
    with redis_server() as url:
        if url is None:
            if os.environ.get("CI"):
                raise SystemExit("redis-server is not installed: apt-get install redis-server")
            print("Scaling out: skipped, no redis-server (apt-get install redis-server).\n")
            return None
        return scale_out(sizes, args, url, keep)


def scale_out(sizes, args, redis_url, keep):
    print("All the cores: one process, Node's ws, or two processes sharing one conversation")
    print("through Redis, directly or behind nginx (least_conn) as in deploy/. Nothing is")
    print("pinned: servers, Redis, nginx and the load share the 2 cores. Machine: the CPU of")
    print("everything (servers, Redis, nginx, load) over the 2 cores; load: of one core.")
    rates = ", ".join(f"{rate_for(n, args):g} at {n:,}" for n in sizes)
    print(f"Messages a second: {rates} clients; {args.warmup} of warm-up then {args.messages}")
    print(f"timed; median of {args.runs} runs (min-max).\n")
    redis_pid = redis_url.pid
    modes = {"1 process": (1, False), NODE: (0, False)}
    modes |= {"2 processes + Redis": (2, False), "2 processes + Redis, behind nginx": (2, True)}
    if node_ws("broadcast") is None:
        del modes[NODE]
    if not Nginx.available():
        if os.environ.get("CI"):
            raise SystemExit("nginx is not installed: apt-get install nginx")
        print("The nginx row: skipped (apt-get install nginx).\n")
        del modes["2 processes + Redis, behind nginx"]
    everything = {}
    for n in sizes:

        def one(name, mode, n=n):
            count, proxied = mode
            with tempfile.TemporaryFile() as log, tempfile.TemporaryDirectory() as run_dir:
                servers, nginx = [], None
                try:
                    if count == 0:
                        servers.append(Server(node_ws("broadcast"), cores=None, log=log))
                    # A database each: in --quick both Redis rows run at once.
                    shared = str(redis_url).replace("/0", f"/{int(proxied)}")
                    for _ in range(count):
                        extra = [] if count == 1 else ["--redis", shared]
                        servers.append(Server([*DEMO_COMMAND, *extra], cores=None, log=log))
                    watch = {"Redis": redis_pid} if count == 2 else {}
                    if proxied:
                        nginx = Nginx(servers, run_dir, workers=2, cores=None)
                        watch |= {"nginx": nginx.pid, "proxy_url": nginx.url}
                    out = run_loads(servers, n, args, "demo", pinned=False, watch=watch)
                    everyone = out["cpu"] + out["load_cpu"] + out.get("Redis_cpu", 0)
                    out["machine"] = (everyone + out.get("nginx_cpu", 0)) / 2
                    return out
                finally:
                    if nginx:
                        nginx.stop()
                    for server in servers:
                        server.stop()

        everything[n] = alternate(modes, attempt(one), n, args)
        keep(everything)
        report_scale_out(n, everything[n])
    return everything


def report_scale_out(n, results):
    results = measured(results, say=True)
    print_latency_table(f"{n:,} clients, latency in ms", results, extra=("Redis", "nginx"))
    rows = [
        [name, summary([o["machine"] for o in outs], "{:.0%}")] for name, outs in results.items()
    ]
    print(table(["server", "the whole machine busy"], rows))
    print()


# --- Behind nginx: the demo direct, or with nginx's hop in front (deploy/nginx.conf). ---


def measure_proxy(sizes, args, keep):
    if not Nginx.available():
        if os.environ.get("CI"):
            raise SystemExit("nginx is not installed: apt-get install nginx")
        print("Behind nginx: skipped (apt-get install nginx).\n")
        return None
    print("Behind nginx: the demo alone, or behind deploy/nginx.conf's proxy (one worker).")
    print("The demo and nginx share the server's core, the load has the other. CPU µs/msg:")
    print("the demo's; nginx µs/msg: nginx's own, per delivered message.")
    print(f"Median of {args.runs} alternating runs (min-max).\n")
    modes = {"direct": None, "behind nginx, plain HTTP": False}
    cert, key = ROOT / "cert.pem", ROOT / "key.pem"
    if cert.exists() and key.exists():
        modes["behind nginx, TLS"] = True
    else:
        print("The TLS row: skipped (no cert.pem and key.pem: run 4_websocket_secure.py once).\n")
    everything = {}
    for n in sizes:

        def one(name, tls, n=n):
            with (
                tempfile.TemporaryFile() as log,
                tempfile.TemporaryDirectory() as run_dir,
                Server(DEMO_COMMAND, log=log) as server,
            ):
                if tls is None:
                    return run_loads([server], n, args, "demo")
                nginx = Nginx([server], run_dir, tls=tls)
                try:
                    watch = {"nginx": nginx.pid, "proxy_url": nginx.url}
                    return run_loads([server], n, args, "demo", watch=watch)
                finally:
                    nginx.stop()

        everything[n] = alternate(modes, attempt(one), n, args)
        keep(everything)
        report_proxy(n, everything[n])
    return everything


def report_proxy(n, results):
    results = measured(results, say=True)
    print_latency_table(f"{n:,} clients, latency in ms", results, extra=("nginx",))
    rows = []
    for name, outs in results.items():
        us = [o["cpu_us"] + o.get("nginx_us", 0) for o in outs]
        rows.append([name, summary([o.get("nginx_us", 0) for o in outs], "{:.1f}")])
        rows[-1].append(summary(us, "{:.1f}"))
    print(table(["server", "nginx µs/msg", "demo + nginx µs/msg"], rows))
    if "direct" in results:
        for name in results:
            if name != "direct":
                p99 = compare(
                    [o["p99"] for o in results[name]], [o["p99"] for o in results["direct"]]
                )
                print(f"{name} vs direct: p99 {p99}")
    print()


# --- Charts: where a reader would rather look than read. ---

COLOURS = {DEMO: "#d62728", NODE: "#2ca02c", FLOOR: "#7f7f7f"}
PEER_COLOURS = {SOCKETIO: "#ff7f0e", FASTAPI: "#1f77b4", AIOHTTP: "#9467bd"}


def colour(name):
    for peer, value in PEER_COLOURS.items():
        if name.startswith(peer):
            return value
    return COLOURS.get(name, "#17becf" if name.startswith("await") else "#8c564b")


def chart_bars(everything, key, xlabel, title, directory, filename):
    """A bar per server at each size, min-max whiskers; deflate hatched."""
    plt = pyplot()
    sizes = [n for n in sorted(everything) if n >= 1000] or sorted(everything)
    names = list(everything[sizes[0]])[::-1]
    fig, axes = plt.subplots(
        1, len(sizes), figsize=(5 * len(sizes), 0.32 * len(names) + 1.6), squeeze=False
    )
    for i, (ax, n) in enumerate(zip(axes[0], sizes, strict=True)):
        results = {
            name: [o for o in outs if not o.get("failed")] for name, outs in everything[n].items()
        }
        values = [[o[key] for o in results.get(name, [])] or [float("nan")] for name in names]
        mid = [median(v) for v in values]
        err = [
            [m - min(v) for m, v in zip(mid, values, strict=True)],
            [max(v) - m for m, v in zip(mid, values, strict=True)],
        ]
        bars = ax.barh(names, mid, xerr=err, capsize=2, color=[colour(x) for x in names])
        for bar, name in zip(bars, names, strict=True):
            if "deflate" in name:
                bar.set_hatch("///")
                bar.set_alpha(0.6)
        ax.set_xscale("log")
        # Plain numbers on the log axis, only at the decades and their 2s and 5s.
        ax.xaxis.set_major_locator(plt.LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_title(f"{n:,} clients")
        ax.set_xlabel(xlabel)
        if i:
            ax.tick_params(labelleft=False)
    fig.suptitle(f"{title}\nmedian of the runs, whiskers from the fastest to the slowest")
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


def draw(saved, directory):
    """Every chart that the saved results hold."""
    if saved.get("latency"):
        latency = saved["latency"]
        chart_bars(
            latency,
            "p99",
            "p99 delivery latency, ms",
            "Broadcast: p99 latency (shorter is better)",
            directory,
            "bench-broadcast-p99.png",
        )
        chart_bars(
            latency,
            "cpu_us",
            "server CPU µs per delivered message",
            "Broadcast: server CPU per delivered message (shorter is better)",
            directory,
            "bench-broadcast-cpu.png",
        )
    if saved.get("memory"):
        chart_memory(saved["memory"], directory)
    if saved.get("scale_out"):
        chart_bars(
            saved["scale_out"],
            "p99",
            "p99 delivery latency, ms",
            "All the cores: one process, Node's ws, two through Redis",
            directory,
            "bench-scale-out.png",
        )


# --- Raw results: one JSON file per run, so that charts are redrawn without re-running. ---


def save_results(saved, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=1))


def load_results(path):
    """The saved run, with its sizes as numbers again (JSON keys are strings)."""
    saved = json.loads(Path(path).read_text())
    for part in ("latency", "scale_out", "proxy"):
        if saved.get(part):
            saved[part] = {int(n): results for n, results in saved[part].items()}
    if saved.get("memory"):
        saved["memory"] = {
            name: {int(n): per for n, per in sizes.items()}
            for name, sizes in saved["memory"].items()
        }
    return saved


def reprint(saved):
    """The tables of a saved run, as the run printed them."""
    print(f"Broadcast benchmark, saved {saved['started']}; {saved['versions']}\n")
    compression = saved.get("compression", {})
    for n, results in (saved.get("latency") or {}).items():
        report_latency(n, results, compression)
    if saved.get("latency"):
        print_targets(saved["latency"])
    if saved.get("memory"):
        print_memory(saved["memory"], compression)
    for n, results in (saved.get("scale_out") or {}).items():
        report_scale_out(n, results)
    for n, results in (saved.get("proxy") or {}).items():
        report_proxy(n, results)


def parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--runs", type=int, default=3, help="Alternating runs of each server (default 3).")
    add("--rate", type=float, help="Messages a second (default: 10 up to 1,000 clients, then 5).")
    add("--messages", type=int, default=100, help="Timed messages in each run (default 100).")
    add("--warmup", type=int, default=10, help="Messages sent before the timing (default 10).")
    add(
        "--sizes",
        type=int,
        nargs="+",
        help="Clients (default 1000 5000; all cores: 5000 10000).",
    )
    add("--memory-runs", type=int, default=3, help="Runs of the memory table (default 3).")
    add("--processes", type=int, default=2, help="Receiver processes (default 2).")
    add("--only", nargs="+", metavar="WORD", help="Only the servers whose name holds a WORD.")
    add("--no-memory", action="store_true", help="Skip the memory table.")
    add("--no-scale-out", action="store_true", help="Skip the all-cores table.")
    add("--scale-out", action="store_true", help="Only the all-cores table (needs Redis, nginx).")
    add("--proxy", action="store_true", help="Only the demo direct against behind nginx.")
    add("--charts", metavar="DIR", help="Where to write the PNGs (default: docs).")
    add("--results", metavar="DIR", help="Where to save the raw figures (default: bench/results).")
    add("--charts-from", metavar="FILE", help="Redraw the charts and tables of a saved run.")
    add("--quick", action="store_true", help="Tiny numbers, all at once: a smoke test.")
    add("--idle", nargs=4, help=argparse.SUPPRESS)
    return parser.parse_args()


def main():
    args = parse()
    raise_file_limit()
    if args.idle:
        url, n, events, pause = args.idle
        asyncio.run(idle(url, int(n), events == "1", float(pause)))
        return
    charts = args.charts or (None if args.quick else ROOT / "docs")
    if args.charts_from:
        saved = load_results(args.charts_from)
        reprint(saved)
        draw(saved, args.charts or ROOT / "docs")
        return
    absent = missing(("picows", "uvloop"))
    if absent:  # the load itself: without it nothing is measured
        raise SystemExit(MISSING.format(absent))
    if args.quick:
        args.runs, args.memory_runs, args.rate, args.messages, args.warmup = 1, 1, 50, 3, 1
        args.processes = 1
    results = args.results or (None if args.quick else RESULTS)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    kind = "proxy" if args.proxy else "scale-out" if args.scale_out else "broadcast"
    path = Path(results) / f"{kind}-{stamp}.json" if results else None
    saved = {"started": stamp, "versions": versions(), "args": vars(args)}
    print(f"Broadcast benchmark; {saved['versions']}\n")

    def keep(part, value):
        saved[part] = value
        if path:  # after each part: a crash later keeps what was measured
            save_results(saved, path)

    if args.proxy:
        sizes = args.sizes or ([20] if args.quick else [1000])
        keep("proxy", measure_proxy(sizes, args, lambda x: keep("proxy", x)))
    elif not args.scale_out:
        catalogue = latency_servers()
        if args.only:
            catalogue = {k: v for k, v in catalogue.items() if any(w in k for w in args.only)}
        saved["compression"] = {name: e.compression for name, e in catalogue.items()}
        sizes = args.sizes or ([20] if args.quick else [1000, 5000])
        keep("latency", measure_latency(catalogue, sizes, args, lambda x: keep("latency", x)))
        print_targets(saved["latency"])
        if not args.no_memory:
            memory_sizes = [n for n in sizes if n >= 1000] or sizes
            servers = memory_servers(catalogue)
            keep("memory", measure_memory(servers, memory_sizes, args.memory_runs, args.quick))
    if args.scale_out or not (args.proxy or args.no_scale_out or args.only):
        sizes = (args.sizes if args.scale_out else None) or ([20] if args.quick else [5000, 10000])
        keep("scale_out", measure_scale_out(sizes, args, lambda x: keep("scale_out", x)))
    if path:
        print(f"results: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if charts:
        draw(saved, charts)


if __name__ == "__main__":
    main()
