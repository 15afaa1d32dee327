"""What README.md and deploy/examples/ promise an operator, run through real processes:

* every config in deploy/examples/ loads (``mapld --config F --print_config`` exits 0) and the
  printed config says what the file says;
* README.md's "Running two sidecars by hand" works as written: its mapld command lines and its two
  trainer programs are read from README.md and run, with only the ports (0: the kernel picks)
  and the paths (a temp dir, this build) adapted.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from conftest import REPO, mapld_binary, need_module

EXAMPLES = sorted((REPO / "deploy" / "examples").glob("*.textproto"))
README_SECTION = "Running two sidecars by hand"


# ---- a small reader of the text format, enough for DaemonConfig ----

def _strip_comment(line: str) -> str:
    """`line` without a trailing # comment (a # inside a quoted string stays)."""
    quoted = False
    for i, c in enumerate(line):
        if c == '"' and (i == 0 or line[i - 1] != "\\"):
            quoted = not quoted
        elif c == "#" and not quoted:
            return line[:i]
    return line


def textproto_fields(text: str) -> Dict[str, str]:
    """Every scalar of a text-format message, one per line as mapld and the examples write them,
    by path: {"stage": "0", "boundaries[0].d": "512", "local_socket": '"/tmp/x.sock"'}."""
    fields: Dict[str, str] = {}
    path: List[str] = []
    counts: List[Dict[str, int]] = [{}]
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).strip()
        if not line:
            continue
        if m := re.fullmatch(r"(\w+)\s*:?\s*\{", line):
            index = counts[-1].get(m.group(1), 0)
            counts[-1][m.group(1)] = index + 1
            path.append(f"{m.group(1)}[{index}]")
            counts.append({})
        elif line == "}":
            path.pop()
            counts.pop()
        elif m := re.fullmatch(r"(\w+)\s*:\s*(.+)", line):
            fields[".".join(path + [m.group(1)])] = m.group(2).strip()
        else:
            raise AssertionError(f"line {number}: cannot read {raw!r}")
    assert not path, "unbalanced braces"
    return fields


def same_value(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


# proto3 does not print a scalar at its zero value: such a field may be absent from the output.
PROTO3_ZEROS = {"0", "0.0", "false", '""'}


@pytest.mark.parametrize("config", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_loads_and_prints_what_it_says(config: Path):
    r = subprocess.run([str(mapld_binary()), "--config", str(config), "--print_config"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    written, printed = textproto_fields(config.read_text()), textproto_fields(r.stdout)
    for path, value in written.items():
        if path not in printed:
            assert value in PROTO3_ZEROS, f"{config.name}: {path}: {value} is not printed"
            continue
        if path == "auth_token":  # A secret: --print_config never shows it.
            assert printed[path] == '"<redacted>"', printed[path]
            continue
        assert same_value(printed[path], value), f"{config.name}: {path}: {printed[path]}"
    assert boundary_blocks(printed) == boundary_blocks(written)


def boundary_blocks(fields: Dict[str, str]) -> set:
    return {p.split(".")[0] for p in fields if p.startswith("boundaries[")}


def test_there_are_example_configs():
    assert len(EXAMPLES) >= 2, "deploy/examples/ should hold the two-stage example"


# ---- README.md, "Running two sidecars by hand" ----

def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"^## " + re.escape(title) + r"\n(.*?)(?=^## )", text, re.M | re.S)
    assert m, f"README.md has no section '## {title}'"
    return m.group(1)


def readme_daemon_commands(section: str) -> List[List[str]]:
    """The mapld command lines of the section, in order, as argv after the binary."""
    commands = []
    for line in re.findall(r"^build/server/mapld\s+(.*)$", section, re.M):
        commands.append(shlex.split(line.split("#")[0].rstrip().rstrip("&")))
    assert len(commands) == 2, f"expected the two mapld command lines, found {commands}"
    return commands


def readme_programs(section: str) -> List[Tuple[str, bool]]:
    """The section's Python heredocs: (source, whether the README runs it in the background)."""
    programs = re.findall(
        r"^([^\n]*)/usr/bin/python3 - <<'PY'([ \t]*&)?[ \t]*\n(.*?)^PY$", section, re.M | re.S)
    assert len(programs) == 2, "expected the two trainer programs (<<'PY' heredocs)"
    for env, _, _ in programs:
        assert set(env.split()) == {"PYTHONPATH=build/python", "OPENBLAS_NUM_THREADS=1"}, env
    return [(source, bool(background)) for _, background, source in programs]


def config_value(config: Path, field: str) -> str:
    value = textproto_fields(config.read_text())[field]
    return json.loads(value) if value.startswith('"') else value


def wait_ready(ready: Path, proc: subprocess.Popen, log: Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        assert proc.poll() is None, f"mapld exited with {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"mapld never became ready:\n{log.read_text()}"
        time.sleep(0.05)
    return json.loads(ready.read_text())


def test_readme_two_sidecars_by_hand(short_tmp: Path):
    mapld = mapld_binary()
    mapl = need_module("mapl")
    need_module("torch")
    section = readme_section(README_SECTION)
    daemons: List[Tuple[subprocess.Popen, Path]] = []
    sockets: Dict[str, str] = {}  # README's socket path -> this test's
    metrics_ports: List[int] = []
    listen_port = None
    try:
        for argv in readme_daemon_commands(section):
            assert argv[0] == "--config", argv
            config = REPO / argv[1]
            stage = config_value(config, "stage")
            sock = str(short_tmp / f"s{stage}.sock")
            sockets[config_value(config, "local_socket")] = sock
            # The adaptations: sockets in the temp dir, ports the kernel picks.
            overrides = ["local_socket=" + sock, "metrics_address=127.0.0.1:0"]
            if "peer_listen" in textproto_fields(config.read_text()):
                overrides.append("peer_listen=127.0.0.1:0")
            else:
                assert listen_port is not None, "README starts the dialing stage first"
                overrides.append(f"boundaries[0].peer_address=127.0.0.1:{listen_port}")
            ready, log = short_tmp / f"s{stage}.ready", short_tmp / f"s{stage}.log"
            cmd = [str(mapld), "--config", str(config), *argv[2:], "--ready_file", str(ready)]
            for o in overrides:
                cmd += ["--set", o]
            proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
            daemons.append((proc, log))
            info = wait_ready(ready, proc, log)
            metrics_ports.append(info["metrics_port"])
            if "peer_listen" in textproto_fields(config.read_text()):
                listen_port = info["peer_port"]

        # The README's curl: metrics are served.
        for port in metrics_ports:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                          timeout=10).read().decode()
            assert re.search(r"^mapl_", text, re.M), text[:500]

        env = dict(os.environ, OPENBLAS_NUM_THREADS="1",
                   PYTHONPATH=str(Path(mapl.__file__).resolve().parents[1]))
        programs = readme_programs(section)
        # The first runs in the background (&) while the second runs: start both, then wait.
        assert [background for _, background in programs] == [True, False], programs
        trainers = []
        for i, (source, _) in enumerate(programs):
            for readme_path, ours in sockets.items():
                source = source.replace(readme_path, ours)
            assert str(short_tmp) in source, f"program {i} names none of the example sockets"
            script = short_tmp / f"trainer{i}.py"
            script.write_text(source)
            with script.open() as stdin:  # python3 - <<'PY': the program on stdin
                trainers.append((subprocess.Popen([sys.executable, "-"], stdin=stdin,
                                                  stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True, env=env),
                                 source))
        outputs = []
        for proc, source in trainers:
            try:
                out, _ = proc.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                for p, _ in trainers:
                    p.kill()
                raise
            outputs.append(out)
            assert proc.returncode == 0, f"{source}\n-> exit {proc.returncode}:\n{out}"
        assert "grad torch.Size([512, 512])" in outputs[0], outputs[0]
        assert "got (4, 64, 512) ids (4, 64)" in outputs[1], outputs[1]
    finally:
        codes = []
        for proc, _ in reversed(daemons):  # SIGTERM: deliver what is in flight, then exit 0
            proc.terminate()
            try:
                codes.append(proc.wait(timeout=60))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
    logs = [log.read_text() for _, log in daemons]
    assert codes == [0, 0], logs
    for log, port in zip(logs, metrics_ports):
        # "It says when it is ready, where its metrics are and when the peer link connects."
        assert "ready" in log and f":{port}/metrics" in log, log
        assert re.search(r"\bconnected\b", log), log  # not "disconnected"
