"""Pipeline descriptions (mapl.pipeline): the shipped ones load; a bad one fails naming the file,
the key and the fix; the Kubernetes target's configs (roles, addresses, who dials, TLS files,
identities); and, with real daemons, a description whose downstream dials and whose links run
mutual TLS with identity checks carries a tensor forward and its gradient back."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytest

from conftest import REPO, mapld_binary, need_module

pipeline = need_module("mapl.pipeline")

PIPELINES = REPO / "deploy" / "pipelines"
PROTO = REPO / "proto" / "mapl" / "v1" / "config.proto"


def base() -> Dict[str, Any]:
    return {"pipeline": {"name": "t"}, "boundary": {"d": 64, "vocab": 256},
            "stages": [{}, {}]}


def error(data: Dict[str, Any]) -> str:
    with pytest.raises(pipeline.DescriptionError) as e:
        pipeline.parse(data, "desc.toml", PROTO)
    return str(e.value)


def test_the_shipped_descriptions_load() -> None:
    for f in sorted(PIPELINES.glob("*.toml")):
        desc = pipeline.load(f, PROTO)
        assert len(desc.boundaries) == len(desc.stages) - 1 >= 1
    four = pipeline.load(PIPELINES / "four-stage-two-sites.toml", PROTO)
    methods = [b.fields["method"] for b in four.boundaries]
    assert methods == ["METHOD_DENSE", "METHOD_MAPL", "METHOD_DENSE"]
    assert four.tls is not None and four.boundaries[1].check_peer_identity


@pytest.mark.parametrize("change, words", [
    (lambda d: d["boundary"].update(kk=3), ["desc.toml", "[boundary] kk", "did you mean 'k'"]),
    (lambda d: d.setdefault("daemon", {}).update(auth_token="x"),
     ["[daemon] auth_token", "never put it in a description"]),
    (lambda d: d["boundary"].update(method="SPARSE"), ["method", "METHOD_MAPL"]),
    (lambda d: d["boundary"].update(d="64"), ["[boundary] d", "integer"]),
    (lambda d: d["boundary"].pop("d"), ["[boundaries.0] d", "required"]),
    (lambda d: d.update(boundaries={"1": {}}), ["[boundaries.1]", "numbered 0 to 0"]),
    (lambda d: d.update(tls={"ca_file": "x"}), ["[tls] ca_file", "target"]),
    (lambda d: d.update(boundaries={"0": {"check_peer_identity": True}}),
     ["check_peer_identity", "identity"]),
    (lambda d: d.update(stages=[{}]), ["[[stages]]", "at least two"]),
    (lambda d: d["pipeline"].update(name="Bad_Name"), ["[pipeline] name"]),
    (lambda d: d.update(stage=[{}]), ["stage", "unknown top-level key"]),
])
def test_a_bad_description_names_file_key_and_fix(change: Any, words: Any) -> None:
    data = base()
    change(data)
    message = error(data)
    for w in words:
        assert w in message, message


def test_enums_take_short_names_and_the_k8s_target_places_every_stage() -> None:
    data = base()
    data["stages"] = [{}, {}, {"k8s_address": "far.example:7000"}]
    data["tls"] = {"identity": "spiffe://x/{pipeline}/s{stage}"}
    data["boundaries"] = {"0": {"method": "dense", "dialer": "downstream"},
                          "1": {"forward_codec": "RVQ", "check_peer_identity": True}}
    desc = pipeline.parse(data, "desc.toml", PROTO)
    text = pipeline.daemon_configs(desc, "k8s")
    # Stage 0 listens for boundary 0 (its downstream dials); stage 1 dials both.
    assert 'peer_listen: "0.0.0.0:7000"' in text[0]
    assert "dial: false" in text[0] and "method: METHOD_DENSE" in text[0]
    assert 'peer_address: "t-stage0.default.svc:7000"' in text[1] and "dial: true" in text[1]
    assert "peer_listen" not in text[1]
    assert 'peer_address: "far.example:7000"' in text[1]
    assert 'peer_identity: "spiffe://x/t/s2"' in text[1]
    assert 'peer_identity: "spiffe://x/t/s1"' in text[2]
    assert "forward_codec: CODEC_RVQ" in text[2]
    for t in text.values():
        assert 'auth_token_file: "/etc/mapl/token/token"' in t and "auth_token:" not in t
        assert 'cert_file: "/etc/mapl/tls/tls.crt"' in t
    # The listener of each boundary starts first locally.
    assert pipeline.start_order(desc) == [0, 2, 1]


def test_downstream_dialing_over_mutual_tls_carries_a_tensor(short_tmp: Path) -> None:
    mapld_binary()
    torch = need_module("torch")
    launch = need_module("mapl.launch")
    data = base()
    data["boundary"].update(method="DENSE", max_tokens=256)
    data["tls"] = {"identity": "spiffe://mapl.test/{pipeline}/stage{stage}"}
    data["boundaries"] = {"0": {"dialer": "downstream", "check_peer_identity": True}}
    desc = pipeline.parse(data, "desc.toml", PROTO)
    daemons = launch.start_pipeline(desc, short_tmp, daemon={
        "client_buffers": 4, "client_buffer_bytes": 4 << 20, "recv_timeout_ms": 20000})
    try:
        up, down = daemons[0].connect("up"), daemons[1].connect("down")
        h, ids = torch.randn(100, 64), torch.randint(0, 256, (100,))
        up.send_activation(0, 1, 0, h, ids)
        h_hat = down.recv_activation(0, 1, 0, timeout=20)
        down.send_gradient(0, 1, 0, h_hat * 0.5)
        g = up.recv_gradient(0, 1, 0, timeout=20)
        assert float((h_hat - h).norm() / h.norm()) < 0.01
        assert float((g - 0.5 * h).norm() / h.norm()) < 0.01
        up.close()
        down.close()
    finally:
        codes = [d.stop() for d in daemons.values()]
    assert codes == [0, 0]
    config = (short_tmp / "stage1.textproto").read_text()
    assert "dial: true" in config and "tls {" in config


def test_two_stage_toml_is_the_main_jobs_default_run(tmp_path: Path) -> None:
    """deploy/pipelines/two-stage.toml describes what run.py runs with its defaults: both make
    the same daemon configs, field order aside (the README says so)."""
    import sys
    sys.path.insert(0, str(REPO / "examples"))
    from llama_pipeline.config import RunConfig
    from llama_pipeline.run import pipeline_description

    made = pipeline_description(RunConfig())
    described = pipeline.load(PIPELINES / "two-stage.toml", PROTO)
    target = pipeline.LocalTarget(directory=tmp_path, token="t",
                                  peer_address={1: "127.0.0.1:7001"})
    for s in range(2):  # as dicts: the fields' order differs
        assert (pipeline._stage_config(made, target, s)
                == pipeline._stage_config(described, target, s))
