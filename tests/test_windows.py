"""Windows' path in every numbered script: no add_signal_handler, Ctrl+C a KeyboardInterrupt."""

import asyncio
import json
import signal
import socket
import ssl

import pytest
import trustme
from conftest import SCRIPTS, assert_clean, client
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

# On Windows, asyncio's loops have no add_signal_handler(): it raises NotImplementedError,
# and Ctrl+C arrives as Python's KeyboardInterrupt (or, from 3.11 on, asyncio.run()'s own
# SIGINT handler cancels main()). This runs the script with the Unix loop made so.
AS_ON_WINDOWS = """
import asyncio, runpy, signal, sys
def add_signal_handler(self, sig, callback, *args):
    print("as on Windows: no add_signal_handler for", signal.Signals(sig).name, file=sys.stderr)
    raise NotImplementedError
asyncio.SelectorEventLoop.add_signal_handler = add_signal_handler
runpy.run_path(sys.argv.pop(1), run_name="__main__")
"""
TOKEN = "correct-horse-battery-staple"


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """Demo 4's flags with a certificate for localhost, and a client context that trusts it."""
    folder, ca = tmp_path_factory.mktemp("pki"), trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(folder / "cert.pem")
    issued.private_key_pem.write_to_path(folder / "key.pem")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    flags = ["--certfile", str(folder / "cert.pem"), "--keyfile", str(folder / "key.pem")]
    return [*flags, "--token", TOKEN], context


@pytest.mark.parametrize("name", [*SCRIPTS, "4_websocket_secure.py"])
async def test_ctrl_c_as_on_windows_closes_with_1001_and_frees_the_port(start, name, tls):
    secure = name.startswith("4_")
    flags, context = tls if secure else ([], None)
    script = start(name, *flags, code=AS_ON_WINDOWS)
    # The launcher took effect: the script met no add_signal_handler and went on without.
    await script.until("as on Windows: no add_signal_handler for SIGINT")
    async with client(script.url, ssl=context) as one, client(script.url, ssl=context) as two:
        for ws in (one, two) if secure else ():
            await ws.send(json.dumps({"type": "auth", "token": TOKEN}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "welcome"
        await script.until("client #2 connected from")
        script.proc.send_signal(signal.SIGINT)  # Ctrl+C
        for ws in (one, two):
            with pytest.raises(ConnectionClosed):
                while True:  # skip what the script sent first (a welcome, presence)
                    await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == CloseCode.GOING_AWAY, ws.close_code
    assert await asyncio.to_thread(script.wait) == 0
    assert "Goodbye" in script.text("stdout")
    assert_clean(script)
    # Free at once: a server started again right away binds it, as this does.
    with socket.create_server(("localhost", script.port)):
        pass
