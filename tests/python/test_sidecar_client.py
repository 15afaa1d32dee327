"""mapl.Sidecar without a daemon: the error for a missing mapld, the socket path default, the
exception classes, the shared-memory allocator and the stats view (BoundaryStats)."""

from __future__ import annotations

import dataclasses
import json
import pickle
import time
from pathlib import Path

import pytest

from conftest import need_module, proto_fields

torch = need_module("torch")
mapl = need_module("mapl")
errors = need_module("mapl.errors")
sidecar = need_module("mapl.sidecar")


def test_connect_without_daemon_is_unavailable_and_says_what_to_do(short_tmp: Path):
    path = str(short_tmp / "nobody.sock")
    start = time.monotonic()
    with pytest.raises(mapl.Unavailable) as info:
        mapl.Sidecar.connect(stage=2, socket_path=path, timeout=0.2)
    assert time.monotonic() - start < 5
    e = info.value
    assert isinstance(e, ConnectionError) and isinstance(e, mapl.MaplError)
    assert e.code == 14 and e.code_name == "UNAVAILABLE"
    msg = str(e)
    assert f"unix:{path}" in msg and "no socket file" in msg and "start mapld" in msg


def test_default_socket_path_matches_the_daemon(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert mapl.default_socket_path(3) == "/run/user/1234/mapld-3.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    import os
    assert mapl.default_socket_path(0) == f"/tmp/mapld-{os.getuid()}-0.sock"


@pytest.mark.parametrize("code,cls,builtin", [
    (3, mapl.InvalidArgument, ValueError),
    (6, mapl.AlreadyExists, ValueError),
    (9, mapl.FailedPrecondition, ValueError),
    (11, mapl.OutOfRange, ValueError),
    (4, mapl.DeadlineExceeded, TimeoutError),
    (14, mapl.Unavailable, ConnectionError),
    (8, mapl.ResourceExhausted, RuntimeError),
    (7, mapl.MaplError, RuntimeError),  # PERMISSION_DENIED: no subclass
])
def test_errors_map_codes_to_classes(code, cls, builtin):
    e = errors.error_from_status(code, "boundary 0: step 5 microbatch 2: bad")
    assert type(e) is cls and isinstance(e, builtin) and isinstance(e, RuntimeError)
    assert e.code == code and str(e) == "boundary 0: step 5 microbatch 2: bad"


def test_arena_first_fit_alignment_and_coalescing():
    a = sidecar._Arena([4096, 1024], alignment=256)
    b0 = a.alloc(1)
    b1 = a.alloc(300)
    assert b0 == (0, 0, 256) and b1 == (0, 256, 512)
    big = a.alloc(3000)
    assert big == (0, 768, 3072)
    small = a.alloc(1000)  # 256 bytes left in buffer 0: first fit moves on to buffer 1
    assert small == (1, 0, 1024)
    tail = a.alloc(10)
    assert tail == (0, 3840, 256)
    with pytest.raises(mapl.ResourceExhausted, match="shared memory exhausted"):
        a.alloc(10)
    a.free(*b1)
    a.defer_free(*b0)  # as the garbage collector does
    assert a.alloc(700) == (0, 0, 768)  # b0 and b1 coalesced
    for r in [(0, 0, 768), big, small, tail]:
        a.free(*r)
    assert a.free_bytes() == 4096 + 1024 and a.used == 0
    with pytest.raises(mapl.ResourceExhausted, match="client_buffer_bytes"):
        a.alloc(5000)


def a_record() -> dict:
    """A BoundaryStats record shaped as mapl._client returns it: every field local.proto declares
    (distinct values), the nested LinkStats with its maps of Traffic."""
    traffic = lambda m, b: dict(zip(proto_fields("Traffic"), (m, b)))  # noqa: E731
    link = {name: 100 + i for i, name in enumerate(proto_fields("LinkStats"))}
    link.update(connected=True, last_rtt_seconds=0.25,
                sent={"frame": traffic(3, 3000), "ack": traffic(2, 20)},
                received={"delta": traffic(1, 77)})
    record = {name: 1 + i for i, name in enumerate(proto_fields("BoundaryStats"))}
    record.update(role="upstream", orthogonality_error=1e-7, rvq_relative_mse=0.125,
                  has_dictionary=True, link=link)
    return record


def test_boundary_stats_reads_every_field_of_the_record_and_derives_the_old_names():
    record = a_record()
    b = sidecar.BoundaryStats.from_record(record)
    assert isinstance(b, sidecar.BoundaryStats)
    for name, value in record.items():
        assert getattr(b, name) == value, name
    assert b.link.connected is True and b.link.last_rtt_seconds == 0.25
    assert b.link.sent["frame"].bytes == 3000 and b.link.sent.ack.messages == 2
    assert b.link.received["delta"]["bytes"] == 77
    r = record
    assert b.raw_bytes == r["raw_bytes_sent"] + r["raw_bytes_received"]
    assert b.wire_payload_bytes == r["payload_bytes_sent"] + r["payload_bytes_received"]
    assert b.wire_dictionary_bytes == r["dictionary_bytes_sent"] + r["dictionary_bytes_received"]
    assert b.wire_bytes == b.wire_payload_bytes + b.wire_dictionary_bytes
    assert b.last_step_relative_error == 0.125
    assert b.record() == record
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.frames_sent = 0
    with pytest.raises(AttributeError, match="no field 'frames_snet'.*frames_sent"):
        b.frames_snet  # noqa: B018
    with pytest.raises(AttributeError, match="no such field"):
        b.link.conected  # noqa: B018


def test_boundary_stats_as_the_examples_use_it():
    """examples/llama_pipeline/stage.py sends dataclasses.asdict(stats) as JSON, and run.py reads
    the old names from it."""
    b = sidecar.BoundaryStats.from_record(a_record())
    d = json.loads(json.dumps(dataclasses.asdict(b)))
    for name in ("raw_bytes", "wire_payload_bytes", "wire_dictionary_bytes", "frames_sent",
                 "frames_received", "dictionary_version", "dictionary_checksum", "id", "role"):
        assert d[name] == getattr(b, name), name
    assert d["link"]["sent"]["frame"]["bytes"] == 3000
    stats = sidecar.Stats(1, [b])
    assert stats.boundary(b.id) is b
    assert json.loads(json.dumps(dataclasses.asdict(stats)))["boundaries"][0] == d
    assert pickle.loads(pickle.dumps(b)) == b


def test_a_new_statistic_needs_no_client_change():
    record = dict(a_record(), brand_new_counter=41)
    b = sidecar.BoundaryStats.from_record(record)
    assert b.brand_new_counter == 41
    assert dataclasses.asdict(b)["brand_new_counter"] == 41
    # A record field of a derived name wins: the record is the truth.
    assert sidecar.BoundaryStats.from_record(dict(record, raw_bytes=5)).raw_bytes == 5
