"""Every command the README, the docs, the pages and the scripts show runs as printed."""

import functools
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCK = re.compile(r"```(?:bash|sh|shell|console|powershell)\n(.*?)```", re.S)
INLINE = re.compile(r"`([^`\n]*\bpython3? [^`\n]*)`")
# In a page or a script's docstring: "python 2_websocket_echo.py --quiet", up to a quote,
# a tag, a bracket or the end of the line.
MENTION = re.compile(r"\bpython3? (\S+\.py)([^\"'<)\n]*)")


def commands(text):
    """The shell commands in a Markdown text: its shell blocks and inline code."""
    for block in SHELL_BLOCK.findall(text):
        yield from block.splitlines()
    yield from INLINE.findall(text)


def python_runs(command):
    """(script, [flags]) for each `python something.py --flag ...` in a shell command line."""
    for part in re.split(r"&&|\|\||[;|]", command.removeprefix("$ ")):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:  # a Windows path or a quote shlex does not know: not a python run
            continue
        for i, word in enumerate(words):
            # `python -m pip` and `python --version` run no script of ours
            script, rest = words[i + 1 : i + 2], words[i + 2 :]
            if word in ("python", "python3") and script and not script[0].startswith("-"):
                script = script[0]
                yield script, [w.split("=")[0] for w in rest if w.startswith("--")]


def everything():
    found = []
    for path in MARKDOWN:
        for command in commands(path.read_text()):
            found += [(path.name, script, flags) for script, flags in python_runs(command)]
    for path in [*ROOT.glob("*.html"), *ROOT.glob("[0-9]_*.py")]:
        for script, rest in MENTION.findall(path.read_text()):
            flags = [w.split("=")[0] for w in rest.split() if w.startswith("--")]
            found.append((path.name, script, flags))
    return found


@functools.cache
def help_text(script):
    result = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_docs_show_commands_at_all():
    shown = {script for _, script, _ in everything()}
    for script in ("1_websocket_server.py", "2_websocket_echo.py", "3_websocket_broadcast.py"):
        assert script in shown
    assert "4_websocket_secure.py" in shown and "bench/broadcast.py" in shown


@pytest.mark.parametrize("where, script, flags", everything())
def test_each_python_command_names_a_real_script_and_real_flags(where, script, flags):
    assert (ROOT / script).is_file(), f"{where} runs {script}, which does not exist"
    for flag in flags:
        assert re.search(rf"(^|\s){re.escape(flag)}\b", help_text(script)), (
            f"{where} runs {script} with {flag}, which its --help does not know"
        )


def test_ci_runs_the_test_command_the_readme_gives():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(line for line in commands(readme) if "pytest" in line)
    assert test_command.endswith("&& python -m pytest"), test_command
    assert "\npython -m pytest\n" in ci
    assert ". .venv/bin/activate" in test_command and ". .venv/bin/activate" in ci
