"""What the benchmarks share: start servers, pin processes to cores, compare runs, draw."""

import contextlib
import functools
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

# Before any third-party import: on an older Python, one sentence rather than a traceback.
if sys.version_info < (3, 11):  # noqa: UP036 (the demos run on 3.9; the benchmarks do not)
    sys.exit(f"The benchmarks need Python 3.11 or newer, not {platform.python_version()}.")

import psutil

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "bench" / ".node"  # where the bench installs ws (ignored by git)
READY = re.compile(r"Listening on (ws://\S+)")
SERVER_CORE, CLIENT_CORE = {0}, {1}  # on 2 cores: the server on one, the load on the other


def raise_file_limit():
    """Thousands of sockets need thousands of file descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def pin(pid, cores):
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(pid, cores)


def python(*args):
    return [sys.executable, "-u", *map(str, args)]


@functools.cache
def node_ready():
    """True if Node and ws are there (ws installed into bench/.node if missing), or why not."""
    if shutil.which("node") is None:
        return "Node.js is not installed: install Node.js 18 or later, with npm, to add this row"
    if not (NODE_DIR / "node_modules" / "ws" / "package.json").exists():
        npm = shutil.which("npm")
        NODE_DIR.mkdir(exist_ok=True)
        command = [npm or "npm", "install", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"]
        result = (
            subprocess.run([*command, "ws@8"], capture_output=True, text=True, timeout=300)
            if npm
            else None
        )
        if result is None or result.returncode != 0:
            return f"npm could not install ws: run `npm install --prefix {NODE_DIR} ws@8`"
    return True


def node_ws(mode):
    """The command that starts Node's ws reference, or None (and one sentence) without Node."""
    ready = node_ready()
    if ready is not True:
        print(f"Node ws: skipped ({ready}).\n")
        return None
    return ["node", str(ROOT / "bench" / "ws_server.js"), mode]


def versions():
    """The machine and the software measured, for the first line of every table."""
    import websockets

    found = [
        f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        f"Python {platform.python_version()}",
        f"websockets {websockets.__version__}",
    ]
    ws = NODE_DIR / "node_modules" / "ws" / "package.json"
    if shutil.which("node") and ws.exists():
        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout
        found.append(f"Node {node.strip()}, ws {json.loads(ws.read_text())['version']}")
    return ", ".join(found)


class Server:
    """A server in a subprocess, pinned to its core, its output drained all the time."""

    def __init__(self, command, cores=SERVER_CORE, log=None):
        raise_file_limit()
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log or subprocess.DEVNULL,  # log: a real file, to measure what logging costs
            text=True,
        )
        if cores:
            pin(self.proc.pid, cores)
        line = self.proc.stdout.readline()
        match = READY.search(line)
        if not match:
            self.stop()
            raise RuntimeError(f"{command} did not start: {line!r}")
        self.url = match.group(1).replace("localhost", "127.0.0.1")
        # Keep reading: a full pipe would freeze the server.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def cpu_seconds(self):
        return cpu_seconds(self.proc.pid)

    def rss_kib(self):
        return psutil.Process(self.proc.pid).memory_info().rss / 1024

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def cpu_seconds(pid, children=False):
    """CPU time of all a process's threads (to 10 ms: time the window long enough), and of
    its children's (nginx's workers) if asked."""
    process = psutil.Process(pid)
    found = [process, *(process.children() if children else [])]
    return sum(p.cpu_times().user + p.cpu_times().system for p in found)


class Nginx:
    """nginx in front of servers, configured from deploy/nginx.conf: the same proxy lines,
    least_conn over one upstream per server; plain HTTP unless tls (demo 4's certificate)."""

    BINARY = shutil.which("nginx") or "/usr/sbin/nginx"

    @classmethod
    def available(cls):
        return os.access(cls.BINARY, os.X_OK)

    def __init__(self, servers, directory, tls=False, workers=1, cores=SERVER_CORE):
        conf = (ROOT / "deploy" / "nginx.conf").read_text()
        port = free_port()
        upstreams = [f"server 127.0.0.1:{urlsplit(s.url).port} max_fails=0;" for s in servers]
        listen = f"listen 127.0.0.1:{port}{' ssl' if tls else ''}"
        if workers > 1:
            # Past 10,000 clients one worker needs more than the 20,000 file descriptors a
            # process may open here (a client and an upstream each): reuseport shares them.
            listen += " reuseport"
        swaps = [
            (r"listen 127\.0\.0\.1:@PORT@ ssl", listen),
            (r"worker_processes \d+", f"worker_processes {workers}"),
            (r"worker_connections \d+", "worker_connections 19000"),
            (r"@UPSTREAMS@", "\n        ".join(upstreams)),
            (r"@ROOT@", str(directory)),
            # The load comes from one address: the per-address limits would refuse it.
            (r"\n\s*limit_(conn|req) (connections|zone=handshakes)[^\n]*", ""),
            (r"@CSP@", "default-src 'none'"),  # no page is served here
        ]
        if tls:
            swaps += [("@CERT@", str(ROOT / "cert.pem")), ("@KEY@", str(ROOT / "key.pem"))]
        else:
            swaps.append((r"\n\s*ssl_certificate(_key)? @(CERT|KEY)@;[^\n]*", ""))
        for pattern, value in swaps:
            conf, found = re.subn(pattern, lambda _, v=value: v, conf)
            if not found:  # deploy/nginx.conf changed: say so rather than measure another
                raise RuntimeError(f"deploy/nginx.conf has no {pattern!r} any more")
        (Path(directory) / "nginx.conf").write_text(conf)
        command = [self.BINARY, "-p", str(directory), "-c", "nginx.conf", "-e", "stderr"]
        self.proc = subprocess.Popen(
            [*command, "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            preexec_fn=(lambda: pin(0, cores)) if cores else None,  # its workers inherit it
        )
        self.pid = self.proc.pid
        self.url = f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/ws"
        wait_for_port(port, self.proc)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(15)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, proc, seconds=10):
    """Until something accepts connections on port; fail if proc exits first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.args[0]} did not start listening on {port}") from None
            time.sleep(0.05)


class RedisURL(str):
    """The URL of a throwaway redis-server, which also knows its process id."""

    pid = None


def spawn(script, *args, pinned=True):
    """A load process on the client core, talking JSON lines over its stdin and stdout."""
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=(lambda: pin(0, CLIENT_CORE)) if pinned else None,
    )


def read_json(proc):
    line = proc.stdout.readline()
    if not line:
        proc.wait(60)
        raise RuntimeError(f"a load process failed (exit code {proc.returncode})")
    return json.loads(line)


def tell(proc, word):
    proc.stdin.write(word + "\n")
    proc.stdin.flush()


def finish(proc):
    """Let a load process close its connections and exit; it must exit with 0."""
    proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"a load process failed (exit code {proc.returncode})")


def each_server(catalogue, work, parallel):
    """{name: work(name, entry)}: one after the other, or (--quick) all at once."""
    if not parallel:
        return {name: work(name, entry) for name, entry in catalogue.items()}
    with ThreadPoolExecutor(len(catalogue)) as pool:
        futures = {name: pool.submit(work, name, entry) for name, entry in catalogue.items()}
        return {name: future.result() for name, future in futures.items()}


def median(values):
    return statistics.median(values) if values else float("nan")


def summary(values, fmt="{:,.0f}"):
    """Median and spread (min-max) of the runs."""
    if not values:
        return "-"
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return f"{fmt.format(median(values))} ({low}-{high})"


def compare(ours, theirs, lower_is_better=True):
    """The ratio of the medians, with the run-to-run spread; a win only if ranges don't overlap."""
    if not (min(ours) > 0 and min(theirs) > 0):
        return "n/a (too short to measure)"
    ratio = median(ours) / median(theirs)
    apart_low, apart_high = max(ours) < min(theirs), min(ours) > max(theirs)
    if apart_low or apart_high:
        verdict = "better" if apart_low == lower_is_better else "worse"
        verdict += ", ranges apart"
    else:
        verdict = "ranges overlap: no winner"
    spread = f"{min(ours) / max(theirs):.2f}-{max(ours) / min(theirs):.2f}"
    return f"{ratio:.2f}x (min-max {spread}; {verdict})"


def table(headers, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    lines = [" | ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def pyplot():
    """matplotlib without a display (a dev requirement: pip install -r requirements-dev.txt)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 10, "axes.grid": True})
    plt.rcParams.update({"grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def save(fig, directory, name):
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    print(f"chart: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


@contextlib.contextmanager
def redis_server():
    """A throwaway redis-server on a free port, persistence off: yields its URL (a RedisURL),
    or None when redis-server is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    redis = subprocess.Popen([*command, "no"], stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, redis)
        url = RedisURL(f"redis://127.0.0.1:{port}/0")
        url.pid = redis.pid
        yield url
    finally:
        redis.terminate()
        redis.wait()
