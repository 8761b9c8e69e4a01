"""Echo is exact: any text and any bytes up to 64 KiB come back unchanged, in order."""

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

MAX = 64 * 1024
TEXT = st.text(max_size=MAX // 4).filter(lambda t: len(t.encode()) <= MAX)  # any Unicode
BINARY = st.binary(max_size=MAX)
MESSAGES = st.lists(st.one_of(TEXT, BINARY, st.just(b"x" * MAX)), min_size=1, max_size=8)


def test_echo_returns_every_payload_byte_for_byte(start):
    script = start("2_websocket_echo.py", "--quiet")
    users = itertools.count()  # 150 connections in seconds: each from an address of its own

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(messages=MESSAGES)
    def echo_is_exact(messages):
        user = next(users)
        source = (f"127.0.{user // 250 + 1}.{user % 250 + 1}", 0)
        with connect(script.url, proxy=None, max_size=None, source_address=source) as ws:
            for message in messages:
                ws.send(message)
            for message in messages:
                echo = ws.recv(timeout=10)
                assert type(echo) is type(message)
                assert echo == message

    echo_is_exact()
