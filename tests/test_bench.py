"""Smoke tests: each benchmark still runs with tiny numbers, prints its tables, draws.

These prove the benchmarks work; they assert nothing about speed. --quick runs every
server at once, so the whole file takes a few seconds.
"""

import shutil
import subprocess
import sys

from conftest import ROOT

NODE = shutil.which("node") is not None


def run(script, *args):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def rows(out, title):
    """The rows of the table whose title or header line holds `title`: cells per row."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if title in line)
    if "|" not in lines[start]:  # a title line: the header is next
        start += 1
    table = []
    for line in lines[start + 2 :]:  # after the header and its rule
        if "|" not in line:
            break
        table.append([cell.strip() for cell in line.split("|")])
    return table


def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_echo_benchmark_prints_its_table_and_chart(tmp_path):
    out = run("echo.py", "--charts", tmp_path)
    names = [row[0] for row in rows(out, "5 client(s) in ping-pong")]
    expected = [
        "2_websocket_echo.py --quiet",
        "2_websocket_echo.py, log to a file",
        "bare websockets echo",
        "bare websockets echo, deflate",
        *(["Node ws echo"] if NODE else []),
        "raw asyncio TCP echo (ceiling)",
    ]
    assert names == expected, out
    assert NODE or "Node ws: skipped (Node.js is not installed" in out
    assert "2_websocket_echo.py --quiet vs bare websockets echo: " in out
    assert_png(tmp_path / "bench-echo.png")


def test_broadcast_benchmark_prints_its_tables_and_charts(tmp_path):
    out = run("broadcast.py", "--charts", tmp_path)
    latency = rows(out, "20 clients, latency in ms")
    names = [row[0] for row in latency]
    assert names[:2] == ["3_websocket_broadcast.py", "Node ws (same protocol)"][: 1 + NODE]
    for name in ("bare broadcast()", "bare broadcast(), deflate", "await send() to each, deflate"):
        assert name in names
    assert names[-1] == "floor: pre-built frame to each transport"
    assert all(row[5] == "0" for row in latency), out  # nothing lost, no connection closed
    assert "3_websocket_broadcast.py vs floor" in out
    assert ("3_websocket_broadcast.py vs Node ws (same protocol): p99 " in out) == NODE
    memory = [row[0] for row in rows(out, "| 20 idle clients")]
    assert "1_websocket_server.py" in memory and "2_websocket_echo.py" in memory, out
    for chart in ("bench-broadcast-p99.png", "bench-broadcast-cpu.png", "bench-memory.png"):
        assert_png(tmp_path / chart)


def test_broadcast_scale_out_benchmark_prints_its_table():
    if shutil.which("redis-server") is None:
        out = run("broadcast.py", "--scale-out")
        assert "Scaling out: skipped, no redis-server" in out
        return
    out = run("broadcast.py", "--scale-out")
    latency = rows(out, "20 clients, latency in ms")
    assert [row[0] for row in latency] == ["1 process", "2 processes + Redis"], out
    assert all(row[5] == "0" for row in latency), out
