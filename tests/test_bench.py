"""Smoke tests: each benchmark still runs with tiny numbers, prints its tables, draws.

These prove the benchmarks work; they assert nothing about speed. --quick runs every
server at once, so the whole file takes a few seconds.
"""

import importlib.util
import json
import os
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


PEERS = ["python-socketio", "FastAPI tutorial loop", "aiohttp"]


def installed(*modules):
    """In CI a missing peer fails the test: the bench must not lose a row unnoticed."""
    found = all(importlib.util.find_spec(m) for m in modules)
    assert found or not os.environ.get("CI"), f"pip install -r bench/requirements.txt ({modules})"
    return found


def test_broadcast_benchmark_prints_its_tables_saves_and_redraws(tmp_path):
    out = run("broadcast.py", "--no-scale-out", "--charts", tmp_path, "--results", tmp_path)
    latency = rows(out, "20 clients, latency in ms")
    names = [row[0] for row in latency]
    assert names[:2] == ["3_websocket_broadcast.py", "Node ws (same protocol)"][: 1 + NODE]
    for name in ("bare broadcast()", "bare broadcast(), deflate", "await send() to each, deflate"):
        assert name in names
    assert "floor: pre-built frame to each transport" in names
    peers = installed("socketio", "fastapi", "uvicorn", "uvloop", "aiohttp")
    for peer in PEERS if peers else []:
        assert peer in names and f"{peer}, deflate" in names, out
        assert f"3_websocket_broadcast.py vs {peer}: p99 " in out
    compression = {row[0]: row[1] for row in latency}
    if peers:  # each peer twice: as it comes, and with the demo's compression
        assert compression["aiohttp, deflate"] == "deflate (its default)", out
        assert compression["aiohttp"] == "off", out
    assert all(row[5] == "0" for row in latency), out  # nothing lost, no connection closed
    assert "Control holds" in out or "CONTROL FAILED" in out, out
    assert "3_websocket_broadcast.py vs floor" in out
    assert ("3_websocket_broadcast.py vs Node ws (same protocol): p99 " in out) == NODE
    memory = [row[0] for row in rows(out, "| 20 idle clients")]
    assert "1_websocket_server.py" in memory and "2_websocket_echo.py" in memory, out
    charts = ("bench-broadcast-p99.png", "bench-broadcast-cpu.png", "bench-memory.png")
    for chart in charts:
        assert_png(tmp_path / chart)
    [saved] = tmp_path.glob("broadcast-*.json")
    assert set(json.loads(saved.read_text())["latency"]["20"]) == set(names)
    again = subprocess.run(
        [sys.executable, "bench/broadcast.py", "--charts-from", saved, "--charts", tmp_path / "re"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert [row[0] for row in rows(again.stdout, "20 clients, latency in ms")] == names
    for chart in charts:
        assert_png(tmp_path / "re" / chart)


def test_broadcast_all_cores_benchmark_prints_its_table():
    tools = [shutil.which("redis-server"), nginx := shutil.which("nginx") or "/usr/sbin/nginx"]
    if not (tools[0] and os.access(nginx, os.X_OK)):
        assert not os.environ.get("CI"), "apt-get install redis-server nginx"
        return
    out = run("broadcast.py", "--scale-out")
    latency = rows(out, "20 clients, latency in ms")
    expected = ["1 process", *(["Node ws (same protocol)"] if NODE else [])]
    expected += ["2 processes + Redis", "2 processes + Redis, behind nginx"]
    assert [row[0] for row in latency] == expected, out
    assert all(row[5] == "0" for row in latency), out
    assert [row[0] for row in rows(out, "the whole machine busy")] == expected, out


def test_broadcast_proxy_benchmark_prints_its_table():
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(nginx, os.X_OK):
        assert not os.environ.get("CI"), "apt-get install nginx"
        return
    out = run("broadcast.py", "--proxy")
    latency = rows(out, "20 clients, latency in ms")
    names = [row[0] for row in latency]
    assert names[:2] == ["direct", "behind nginx, plain HTTP"], out
    tls = (ROOT / "cert.pem").exists() and (ROOT / "key.pem").exists()
    assert ("behind nginx, TLS" in names) == tls, out
    assert all(row[5] == "0" for row in latency), out
    assert "behind nginx, plain HTTP vs direct: p99 " in out
