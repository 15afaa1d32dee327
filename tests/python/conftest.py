"""Shared helpers of the Python tests: real mapld daemons (mapl.launch) in temp dirs on loopback,
and how a missing dependency is reported.

Missing dependencies. The suite expects numpy, torch, the built mapl package (its extension
modules mapl._mapl and mapl._client) and the mapld binary. Test files get them through
:func:`need_module` and :func:`mapld_binary`: where one is missing, the tests that need it skip
with a reason that says what to do (``pytest -rs`` lists every skip), except when the environment
variable CI is ``true``: there they FAIL, so that CI cannot pass by skipping.

Exit status. pytest exits 0 when every test it ran was skipped; this file makes that exit
:data:`ALL_SKIPPED_EXIT` instead, which tests/python/CMakeLists.txt declares as ctest's
SKIP_RETURN_CODE, so such a file shows as "Skipped" in ctest and not as "Passed".
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Dict, Iterator, List, NoReturn, Optional, Tuple

import pytest

# tests/python/CMakeLists.txt passes the same number to ctest (SKIP_RETURN_CODE).
ALL_SKIPPED_EXIT = 77

REPO = Path(__file__).resolve().parents[2]

_HINTS = {
    "numpy": "install Debian's python3-numpy (bash deploy/install-deps.sh) and run the tests "
             "with /usr/bin/python3",
    "torch": "install Debian's python3-torch (bash deploy/install-deps.sh) and run the tests "
             "with /usr/bin/python3",
    "mapl": "build the package (ninja -C build mapl_python mapl_python_client) and run with "
            "PYTHONPATH=build/python",
}


def in_ci() -> bool:
    """Whether this run is CI's (CI=true), where a missing dependency is a failure."""
    return os.environ.get("CI", "").lower() == "true"


def missing(what: str) -> NoReturn:
    """Report a missing expected dependency: skip the test (or the whole file, when called at
    import time), or fail it when CI=true."""
    if in_ci():
        pytest.fail(f"{what} (CI=true: an expected dependency must not be missing)",
                    pytrace=False)
    pytest.skip(what, allow_module_level=True)


def need_module(name: str) -> ModuleType:
    """``import name``, or :func:`missing` naming the module and how to get it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        hint = _HINTS.get(name.split(".")[0], "install it")
        missing(f"cannot import {name} ({e}): {hint}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    outcomes = reporter.stats if reporter is not None else {}
    ran = any(outcomes.get(k) for k in ("passed", "failed", "error", "xfailed", "xpassed"))
    # A file skipped as a whole at import collects no test: pytest says NO_TESTS_COLLECTED (5).
    # A file with no tests and no skips keeps that status, and fails in ctest.
    if (exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
            and outcomes.get("skipped") and not ran):
        session.exitstatus = ALL_SKIPPED_EXIT


def proto_fields(message: str, proto: str = "proto/mapl/v1/local.proto") -> List[str]:
    """The field names of `message` (a top-level message without nested ones) as the .proto file
    declares them, in order: what the tests hold the client's records to."""
    text = re.sub(r"//[^\n]*", "", (REPO / proto).read_text())
    body = re.search(r"\bmessage\s+" + message + r"\s*\{([^{}]*)\}", text)
    assert body is not None, f"{proto} declares no message {message} (or it nests one)"
    return re.findall(r"(?:repeated\s+)?(?:map\s*<[^>]*>|[\w.]+)\s+(\w+)\s*=\s*\d+",
                      body.group(1))


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir under /tmp: Unix socket paths must fit in 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="mapl-py-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def mapld_binary() -> Path:
    """The daemon the tests run, or :func:`missing` when it is not built."""
    launch = need_module("mapl.launch")
    try:
        return launch.find_mapld()
    except launch.LaunchError as e:
        missing(str(e))


# Small buffers and a generous Recv deadline: these tests run next to other builds.
_TEST_FIELDS = {"client_buffers": 4, "client_buffer_bytes": 4 << 20, "recv_timeout_ms": 20000}


def start_mapld(directory: Path, stage: int, boundaries: List[Dict[str, object]],
                extra: Optional[Dict[str, object]] = None,
                wrap: Optional[List[str]] = None):
    """mapl.launch.start_mapld with the tests' buffer sizes; returns a launch.Daemon."""
    mapld_binary()
    launch = need_module("mapl.launch")
    return launch.start_mapld(directory, stage, boundaries, dict(_TEST_FIELDS, **(extra or {})),
                              wrap=wrap)


def start_pair(directory: Path, boundary: Dict[str, object],
               extra: Optional[Dict[str, object]] = None) -> Tuple[object, object]:
    """mapl.launch.start_pair with the tests' buffer sizes: (upstream, downstream) Daemons."""
    mapld_binary()
    launch = need_module("mapl.launch")
    return launch.start_pair(directory, boundary, dict(_TEST_FIELDS, **(extra or {})))


class TrainerPair:
    """The two daemons of boundary 0 (stage 0 upstream, stage 1 downstream) on loopback, a
    trainer Sidecar on each, and :meth:`both` to run the two trainers' parts at once (a receive
    blocks until the peer sends)."""

    def __init__(self, boundary: Dict[str, object], timeout: float) -> None:
        self.timeout = timeout
        self.dir = Path(tempfile.mkdtemp(prefix="mapl-py-", dir="/tmp"))
        try:
            self.up_proc, self.down_proc = start_pair(self.dir, boundary)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.up = self.up_proc.connect("stage0")
        self.down = self.down_proc.connect("stage1")
        from concurrent.futures import ThreadPoolExecutor
        self.pool = ThreadPoolExecutor(2)

    def both(self, up_fn, down_fn) -> Tuple[object, object]:
        """``up_fn(upstream Sidecar)`` and ``down_fn(downstream Sidecar)`` run concurrently;
        their results."""
        fu, fd = self.pool.submit(up_fn, self.up), self.pool.submit(down_fn, self.down)
        return fu.result(timeout=4 * self.timeout), fd.result(timeout=4 * self.timeout)

    def close(self) -> None:
        self.pool.shutdown()
        for s in (self.up, self.down):
            s.close()
        for p in (self.up_proc, self.down_proc):
            p.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
