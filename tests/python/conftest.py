"""Fixtures for the mapl.Sidecar tests: real mapld daemons (mapl.launch) started in temp dirs on
loopback and stopped afterwards. Tests skip while the daemon is not built."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from mapl import launch


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir under /tmp: Unix socket paths must fit in 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="mapl-py-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def mapld_binary() -> Path:
    try:
        return launch.find_mapld()
    except launch.LaunchError as e:
        pytest.skip(str(e))


def start_mapld(directory: Path, stage: int, boundaries: List[Dict[str, object]],
                extra: Optional[Dict[str, object]] = None) -> launch.Daemon:
    mapld_binary()
    fields = {"client_buffers": 4, "client_buffer_bytes": 4 << 20, "recv_timeout_ms": 20000}
    fields.update(extra or {})
    return launch.start_mapld(directory, stage, boundaries, fields)


def start_pair(directory: Path, boundary: Dict[str, object],
               extra: Optional[Dict[str, object]] = None) -> Tuple[launch.Daemon, launch.Daemon]:
    mapld_binary()
    fields = {"client_buffers": 4, "client_buffer_bytes": 4 << 20, "recv_timeout_ms": 20000}
    fields.update(extra or {})
    return launch.start_pair(directory, boundary, fields)
