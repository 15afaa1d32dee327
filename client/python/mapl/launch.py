"""Starting and stopping mapld processes from Python: for tests, benchmarks and the local
multi-stage launcher. Each daemon gets a text-format config in a directory of yours, logs to a
file there, and reports its ports through --ready_file.

    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        up, down = launch.start_pair(Path(d), {"d": 512, "k": 32, "vocab": 256})
        sidecar = up.connect("trainer-0")
        ...
        up.stop(); down.stop()
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

__all__ = ["Daemon", "LaunchError", "find_mapld", "config_text", "start_mapld", "start_pair",
           "start_config", "start_pipeline"]


class LaunchError(RuntimeError):
    """A daemon exited or never became ready; the message carries the end of its log."""


def find_mapld() -> Path:
    """$MAPLD, else server/mapld of the build this package was imported from, else mapld on
    PATH (the installed package's /usr/bin/mapld)."""
    if os.environ.get("MAPLD"):
        return Path(os.environ["MAPLD"])
    here = Path(__file__).resolve().parents[2] / "server" / "mapld"  # <build>/python/mapl/..
    if here.is_file():
        return here
    installed = shutil.which("mapld")
    if installed:
        return Path(installed)
    raise LaunchError(f"mapld not found: not built ({here} does not exist) and not on PATH; build "
                      "the project (bash deploy/build.sh), install its package, or set MAPLD to "
                      "the binary")


# Enum-valued config fields: their values go bare (METHOD_MAPL); every other string is quoted,
# so that an auth token such as "ABC" stays a string.
_ENUM_FIELDS = {"role", "method", "forward_codec", "backward_codec", "projector_init",
                "dictionary_precision"}


def _value(key: str, v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str) and key not in _ENUM_FIELDS:
        return json.dumps(v)
    return str(v)


def config_text(fields: Dict[str, object], boundaries: List[Dict[str, object]]) -> str:
    """A text-format mapl.v1.DaemonConfig from plain dicts (enum values by name)."""
    text = "".join(f"{k}: {_value(k, v)}\n" for k, v in fields.items())
    for b in boundaries:
        text += "boundaries {\n" + "".join(f"  {k}: {_value(k, v)}\n" for k, v in b.items())
        text += "}\n"
    return text


class Daemon:
    """One mapld process. stop() sends SIGTERM (the daemon drains, then exits)."""

    def __init__(self, argv: List[str], log: Path, socket_path: str, ready_file: Path) -> None:
        self.argv = argv
        self.ready_file = ready_file
        self.log_path = log
        self.socket_path = socket_path
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self, chars: int = 4000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def ready(self, timeout: float = 30.0) -> Dict[str, int]:
        """{socket, peer_port, metrics_port, pid} once the daemon serves."""
        deadline = time.monotonic() + timeout
        while True:
            if self.ready_file.exists():
                return json.loads(self.ready_file.read_text())
            if self.proc.poll() is not None:
                raise LaunchError(f"{self.argv[0]} exited with {self.proc.returncode}:\n"
                                  f"{self.log()}")
            if time.monotonic() > deadline:
                raise LaunchError(f"{self.argv[0]} never became ready:\n{self.log()}")
            time.sleep(0.02)

    def connect(self, name: str = "trainer", timeout: float = 30.0):
        """A mapl.Sidecar attached to this daemon."""
        from .sidecar import Sidecar
        self.ready(timeout)
        return Sidecar.connect(socket_path=self.socket_path, name=name, timeout=timeout)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait (SIGKILL after `timeout`); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


# The peer token of every daemon this process launches: random per launching process, so two
# jobs on one host never accept each other's links. Daemons launched by another process need the
# same token passed in `extra` ({"auth_token": ...}).
LAUNCH_TOKEN = secrets.token_urlsafe(32)


def start_mapld(directory: Path, stage: int, boundaries: List[Dict[str, object]],
                extra: Optional[Dict[str, object]] = None,
                args: Optional[List[str]] = None,
                wrap: Optional[List[str]] = None) -> Daemon:
    """mapld for `stage` with its config, socket, log and ready file in `directory` (keep the
    path short: Unix socket paths hold at most 107 bytes). `wrap` prefixes the command line, for
    example ["ip", "netns", "exec", "ns0"] to run the daemon in a network namespace (the wrapper
    must exec the daemon, so that stop() signals the daemon itself)."""
    sock = str(directory / f"s{stage}.sock")
    fields: Dict[str, object] = {"stage": stage, "local_socket": sock,
                                 "auth_token": LAUNCH_TOKEN, "metrics_address": "127.0.0.1:0"}
    fields.update(extra or {})
    return start_config(directory, stage, config_text(fields, boundaries), sock, args, wrap)


def start_config(directory: Path, stage: int, text: str, socket_path: str,
                 args: Optional[List[str]] = None,
                 wrap: Optional[List[str]] = None) -> Daemon:
    """mapld for `stage` with the text-format config `text` (whose local_socket is
    `socket_path`), written with its log and ready file in `directory`."""
    path = directory / f"stage{stage}.textproto"
    # The config holds the token: readable by this user only, from the first byte.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    ready = directory / f"s{stage}.ready.json"
    ready.unlink(missing_ok=True)
    argv = (list(wrap or []) + [str(find_mapld()), "--config", str(path), "--ready_file",
                                str(ready)] + (args or []))
    return Daemon(argv, directory / f"s{stage}.log", socket_path, ready)


def start_pair(directory: Path, boundary: Dict[str, object],
               extra: Optional[Dict[str, object]] = None) -> Tuple[Daemon, Daemon]:
    """The two daemons of boundary 0 on loopback: stage 1 (downstream, its peer port chosen by
    the kernel) first, then stage 0 dialing it. Returns (upstream, downstream), both ready."""
    b = dict(boundary, id=0)
    down = start_mapld(directory, 1, [dict(b, role="ROLE_DOWNSTREAM")],
                       dict(extra or {}, peer_listen="127.0.0.1:0"))
    up = None
    try:
        port = down.ready()["peer_port"]
        up = start_mapld(directory, 0, [dict(b, role="ROLE_UPSTREAM",
                                             peer_address=f"127.0.0.1:{port}")], extra)
        up.ready()
    except BaseException:
        for d in (up, down):
            if d is not None:
                d.stop()
        raise
    return up, down


def start_pipeline(desc, directory: Path, daemon: Optional[Dict[str, object]] = None,
                   tls: bool = True, peer_listen: Optional[Dict[int, str]] = None,
                   peer_address: Optional[Dict[int, str]] = None,
                   args: Optional[List[str]] = None,
                   wrap: Optional[Dict[int, List[str]]] = None,
                   timeout: float = 30.0) -> Dict[int, Daemon]:
    """Every stage's mapld of a pipeline description (`desc`: a mapl.pipeline.Description, or
    the path of its TOML file) on this machine, each ready; returns them by stage. Each
    boundary's listener starts first and its port goes into the dialer's config. `directory`
    holds configs, sockets, logs (keep its path short) and, when the description turns TLS on
    and `tls` is True, throwaway certificates (mapl.pipeline.make_certificates); `tls=False`
    runs the links in plaintext whatever the description says. `daemon`: further DaemonConfig
    fields for every stage (buffer sizes, timeouts). `peer_listen` / `peer_address`: per stage,
    where its daemon listens and where the others reach it (default 127.0.0.1, a free port).
    `wrap`: per stage, a command-line prefix (start_mapld). On failure the daemons already
    started are stopped and LaunchError names the stage."""
    from . import pipeline
    if not isinstance(desc, pipeline.Description):
        desc = pipeline.load(desc)
    directory = Path(directory)
    target = pipeline.LocalTarget(directory=directory, token=LAUNCH_TOKEN, tls=tls,
                                  peer_listen=dict(peer_listen or {}),
                                  peer_address=dict(peer_address or {}),
                                  daemon=dict(daemon or {}))
    if desc.tls is not None and tls:
        target.tls_dir = pipeline.make_certificates(desc, directory / "tls")
    daemons: Dict[int, Daemon] = {}
    try:
        for s in pipeline.start_order(desc):
            text = pipeline.daemon_config(desc, target, s)
            daemons[s] = start_config(directory, s, text, target.socket(s), args,
                                      (wrap or {}).get(s))
            try:
                port = daemons[s].ready(timeout)["peer_port"]
            except LaunchError as e:
                raise LaunchError(f"mapld of stage {s} did not start: {e}") from None
            if port and s not in target.peer_address:  # 0: this stage listens for none
                target.peer_address[s] = f"127.0.0.1:{port}"
    except BaseException:
        for d in daemons.values():
            d.stop()
        raise
    return daemons
