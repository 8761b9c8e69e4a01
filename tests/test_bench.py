"""Smoke tests: each benchmark still runs with tiny numbers and prints its tables.

These prove the benchmarks work; they assert nothing about speed.
"""

import subprocess
import sys

from conftest import ROOT


def run(script):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_echo_benchmark_prints_its_table():
    out = run("echo.py")
    for server in ("2_websocket_echo.py --quiet", "bare websockets echo", "raw asyncio TCP"):
        assert server in out
    assert "1 client(s) in ping-pong" in out and "50 client(s) in ping-pong" in out


def test_broadcast_benchmark_prints_its_tables():
    out = run("broadcast.py")
    assert "20 clients, 10 messages a second" in out
    for server in ("3_websocket_broadcast.py", "bare broadcast()", "await send()", "floor"):
        assert server in out
    assert "p99 ratios" in out and "20 idle clients" in out
    latency_table = out.split("latency in ms\n", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in latency_table.splitlines()[2:] if "|" in line]
    assert len(rows) == 4
    assert all(row.split("|")[5].strip() == "0" for row in rows), latency_table  # nothing lost


def test_broadcast_scale_out_benchmark_prints_its_table():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "broadcast.py"), "--quick", "--scale-out"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    assert "1 process" in out and "2 processes + Redis" in out, out
