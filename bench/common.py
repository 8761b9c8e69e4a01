"""What the benchmarks share: start a server, pin processes to cores, summarise runs."""

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
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


class Server:
    """A server in a subprocess, pinned to its core, its output drained all the time."""

    def __init__(self, command, cores=SERVER_CORE):
        raise_file_limit()
        self.proc = subprocess.Popen(
            [sys.executable, "-u", *command],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
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
        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system

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


def run_load(script, *args, timeout=600):
    """Run a load generator in its own process, pinned to the client core; return its JSON."""
    proc = subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: pin(0, CLIENT_CORE),
    )
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def summary(values, fmt="{:,.0f}"):
    """Median and spread (min-max) of the runs."""
    median = statistics.median(values)
    return f"{fmt.format(median)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def table(headers, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    lines = [" | ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def machine():
    import platform

    import websockets

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, websockets {websockets.__version__}, "
        f"{platform.system()} {platform.release()}"
    )
