"""The start-up below the marker is shared: the same lines in every numbered script where
it does the same job, so a fix in one is a fix in all (issue: changeability)."""

import ast

import pytest
from conftest import ROOT

SCRIPTS = [
    "1_websocket_server.py",
    "2_websocket_echo.py",
    "3_websocket_broadcast.py",
    "4_websocket_secure.py",
]
MARKER = "# --- Start-up, flags and safety checks:"
# What does the same job in every script: each must read exactly as in script 3.
SHARED = [
    *("TIMEOUT", "MAX_BACKLOG", "KERNEL_BUFFER", "SETTINGS", "ORIGINS", "IN_USE"),
    *("Connection", "Limit", "HANDSHAKES", "warn", "check", "stop"),
]


def definitions(name):
    """Each top-level name below the marker -> its source."""
    source = (ROOT / name).read_text()
    below = source.index(MARKER)
    found = {}
    for node in ast.parse(source).body:
        start = sum(len(line) for line in source.splitlines(True)[: node.lineno - 1])
        if start < below:
            continue
        text = ast.get_source_segment(source, node)
        names = [getattr(node, "name", None)]
        if isinstance(node, ast.Assign):
            names = [n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        for n in names:
            found[n] = text
    return found, source[below:]


@pytest.mark.parametrize("name", [s for s in SCRIPTS if s != "3_websocket_broadcast.py"])
def test_the_shared_start_up_reads_as_in_script_3(name):
    mine, _ = definitions(name)
    theirs, _ = definitions("3_websocket_broadcast.py")
    for shared in SHARED:
        assert mine.get(shared) == theirs[shared], f"{name}: {shared} differs from script 3's"


@pytest.mark.parametrize("name", SCRIPTS)
def test_main_differs_from_script_3_only_in_what_the_script_adds(name):
    """main() and the __main__ block: every line of script 3's that is not about its
    conversation (lifespan, flags) appears in each script, in the same order."""
    mine, theirs = ((ROOT / n).read_text() for n in (name, "3_websocket_broadcast.py"))
    mine, theirs = (text[text.index("async def main():") :] for text in (mine, theirs))
    own = ("lifespan", "flags(add)", "hooks.update", "description=", "Listening on ws://")
    wanted = [line.strip() for line in theirs.splitlines() if line.strip()]
    if name == "4_websocket_secure.py":  # port 8443, and TLS needed off this machine
        own += ('add("--port"', "if ARGS.host not in")
    wanted = [line for line in wanted if not any(word in line for word in own)]
    lines, at, missing = [line.strip() for line in mine.splitlines()], 0, []
    for line in wanted:  # in the same order: each found after the one before
        if line in lines[at:]:
            at = lines.index(line, at) + 1
        else:
            missing.append(line)
    assert not missing, f"{name} lacks, or reorders: {missing[:3]}"
