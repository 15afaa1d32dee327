"""A pipeline description: one TOML file that says what a pipeline's daemons run, used by the
local launcher (``mapl.launch.start_pipeline``, examples/llama_pipeline/run.py --pipeline) and by
the Kubernetes generator (deploy/k8s/generate.py). It holds what is the same wherever the
pipeline runs; a *target* (``LocalTarget``, ``K8sTarget``) adds what depends on the place:
addresses, ports, socket paths, certificate files and the peer token.

    [pipeline]
    name = "llama"                 # letters, digits and '-' (Kubernetes object names)
    [daemon]                       # mapl.v1.DaemonConfig fields for every stage
    peer_keepalive_ms = 10000
    [boundary]                     # mapl.v1.BoundaryConfig fields for every boundary
    d = 256
    method = "MAPL"                # enum values by full name (METHOD_MAPL) or without the prefix
    [tls]                          # present: TLS on every peer link (see below)
    server_only = false            # TlsConfig fields, file paths aside (the target sets them)
    identity = "spiffe://mapl.example/{pipeline}/stage{stage}"
    [[stages]]                     # one table per stage, in order: stage 0 first
    site = "a"
    [[stages]]
    site = "b"
    [boundaries.0]                 # overrides for boundary 0 (between stage 0 and stage 1)
    forward_codec = "INT8"
    dialer = "downstream"          # which side opens the link; default "upstream"
    check_peer_identity = true     # each side requires the other's tls.identity

Boundary b joins stage b (ROLE_UPSTREAM) and stage b + 1 (ROLE_DOWNSTREAM). TLS is per pipeline,
not per boundary: mapld's DaemonConfig.tls covers all of a daemon's peer links (one listener, one
set of credentials), so in a chain one plaintext boundary would force its neighbours off TLS too.

Every key is checked against the field names of mapl.v1.DaemonConfig, BoundaryConfig and
TlsConfig, read from the text of config.proto (no generated code needed, so this module runs
with the standard library alone: the Kubernetes generator loads it from the source tree). Fields
that depend on the place (stage, sockets, addresses, token, certificate files, role, id) are
refused: the target sets them. What the values mean beyond their type (k <= d, vocab for MAPL)
is mapld's to check at start, as it does for any config.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

__all__ = ["DescriptionError", "Description", "ProtoSchema", "LocalTarget", "K8sTarget",
           "find_config_proto", "load", "parse", "daemon_config", "daemon_configs",
           "start_order", "make_certificates"]


class DescriptionError(ValueError):
    """A description that cannot be used; the message names the file, the key and the fix."""


# ---------------------------------------------------------------------------------------------
# config.proto, read as text.

_MESSAGE = re.compile(r"^message\s+(\w+)\s*\{(.*?)^\}", re.S | re.M)
_ENUM = re.compile(r"^enum\s+(\w+)\s*\{(.*?)^\}", re.S | re.M)
_FIELD = re.compile(r"^\s*(optional\s+|repeated\s+)?([\w.]+)\s+(\w+)\s*=\s*(\d+)\s*;", re.M)
_ENUM_VALUE = re.compile(r"^\s*([A-Z][A-Z0-9_]*)\s*=\s*\d+\s*;", re.M)


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", text)


@dataclass
class ProtoSchema:
    """Field names and types of the config messages, and the enums' value names."""
    messages: Dict[str, Dict[str, Tuple[str, str]]]  # message -> field -> (label, type)
    enums: Dict[str, List[str]]
    path: str

    @classmethod
    def from_files(cls, config_proto: Union[str, Path]) -> "ProtoSchema":
        """Parses config.proto and, when it lies beside it, peer.proto (the Codec and
        Precision enums)."""
        config_proto = Path(config_proto)
        texts = [_strip_comments(config_proto.read_text())]
        peer = config_proto.with_name("peer.proto")
        if peer.is_file():
            texts.append(_strip_comments(peer.read_text()))
        messages: Dict[str, Dict[str, Tuple[str, str]]] = {}
        enums: Dict[str, List[str]] = {}
        for text in texts:
            for m in _ENUM.finditer(text):
                enums[m.group(1)] = _ENUM_VALUE.findall(m.group(2))
            for m in _MESSAGE.finditer(text):
                messages[m.group(1)] = {f[2]: ((f[0] or "").strip(), f[1])
                                        for f in _FIELD.findall(m.group(2))}
        for needed in ("DaemonConfig", "BoundaryConfig", "TlsConfig"):
            if needed not in messages:
                raise DescriptionError(f"{config_proto}: no 'message {needed}' in it: is this "
                                       "mapl's proto/mapl/v1/config.proto?")
        return cls(messages, enums, str(config_proto))

    def fields(self, message: str) -> Dict[str, Tuple[str, str]]:
        return self.messages[message]


def find_config_proto() -> Path:
    """$MAPL_CONFIG_PROTO; else config.proto beside this module (the build copies it into
    <build>/python/mapl); else the source tree's proto/mapl/v1/config.proto."""
    if os.environ.get("MAPL_CONFIG_PROTO"):
        return Path(os.environ["MAPL_CONFIG_PROTO"])
    here = Path(__file__).resolve().parent
    for candidate in (here / "config.proto",
                      here.parents[2] / "proto" / "mapl" / "v1" / "config.proto"):
        if candidate.is_file():
            return candidate
    raise DescriptionError("config.proto not found: set MAPL_CONFIG_PROTO to "
                           "proto/mapl/v1/config.proto, or pass its path")


# ---------------------------------------------------------------------------------------------
# The description.

# Set by the target, never by a description.
_TARGET_DAEMON_FIELDS = {
    "stage": "the stage's index is its place in [[stages]]",
    "local_socket": "the target sets the socket path",
    "metrics_address": "the target sets the metrics address",
    "peer_listen": "the target sets where each daemon listens",
    "auth_token": "the peer token is the target's (a per-run secret locally, a Secret on "
                  "Kubernetes); never put it in a description",
    "auth_token_file": "the target sets the token file",
    "boundaries": "use [boundary] and [boundaries.N]",
    "tls": "use the [tls] table",
}
_TARGET_BOUNDARY_FIELDS = {
    "id": "a boundary's id is its index (boundary b joins stage b and b + 1)",
    "role": "roles follow from the stages (boundary b: stage b upstream, b + 1 downstream)",
    "peer_address": "the target sets the addresses",
    "peer_identity": "set [tls] identity and check_peer_identity = true on the boundary",
    "dial": "use dialer = \"upstream\" or \"downstream\" on the boundary",
}
_TARGET_TLS_FIELDS = {
    "cert_file": "the target sets the certificate files",
    "key_file": "the target sets the certificate files",
    "ca_file": "the target sets the certificate files",
}
# Keys of the description itself, beside the proto's fields.
_PIPELINE_KEYS = {"name": "the pipeline's name", "namespace": "Kubernetes namespace"}
_TLS_KEYS = {"identity": "the name each stage's certificate carries, a template with "
                         "{pipeline} and {stage}", "enabled": "false turns the table off"}
_STAGE_KEYS = {"site": "where the stage runs (a label)", "image": "Kubernetes: trainer image",
               "command": "Kubernetes: trainer command (list of strings)",
               "k8s_address": "Kubernetes: host:port where the other stages reach this "
                              "stage's peer port (default: its Service)"}
_BOUNDARY_KEYS = {"dialer": "\"upstream\" (default) or \"downstream\"",
                  "check_peer_identity": "each side requires the other's [tls] identity"}
_TOP_KEYS = ("pipeline", "daemon", "boundary", "tls", "stages", "boundaries")
_ENUM_PREFIX = {"Method": "METHOD_", "Codec": "CODEC_", "Precision": "PRECISION_",
                "ProjectorInit": "PROJECTOR_INIT_", "Role": "ROLE_"}
_NAME = re.compile(r"[a-z]([a-z0-9-]{0,38}[a-z0-9])?\Z")


@dataclass
class Stage:
    index: int
    site: str = ""
    image: str = ""
    command: List[str] = field(default_factory=list)
    k8s_address: str = ""


@dataclass
class Boundary:
    index: int
    fields: Dict[str, Any]     # BoundaryConfig fields, [boundary] merged with [boundaries.N]
    dialer: str = "upstream"
    check_peer_identity: bool = False


@dataclass
class Description:
    name: str
    path: str
    daemon: Dict[str, Any]
    stages: List[Stage]
    boundaries: List[Boundary]
    tls: Optional[Dict[str, Any]]  # TlsConfig fields (no files), or None: plaintext
    tls_identity: str = ""
    namespace: str = "default"
    schema: Optional[ProtoSchema] = None

    def identity(self, stage: int) -> str:
        return self.tls_identity.format(pipeline=self.name, stage=stage)


def load(path: Union[str, Path], config_proto: Union[str, Path, None] = None) -> Description:
    """Reads and validates a description file (DescriptionError naming file and key)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise DescriptionError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise DescriptionError(f"{path}: not valid TOML: {e}") from None
    return parse(data, str(path), config_proto)


def _suggest(key: str, known: Any) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse(data: Dict[str, Any], path: str = "<description>",
          config_proto: Union[str, Path, None] = None) -> Description:
    """Validates an already parsed description (a dict as tomllib gives)."""
    schema = ProtoSchema.from_files(config_proto or find_config_proto())

    def fail(where: str, message: str) -> DescriptionError:
        return DescriptionError(f"{path}: {where}: {message}")

    def table(key: str, required: bool = False) -> Dict[str, Any]:
        value = data.get(key, {})
        if key not in data and required:
            raise fail(f"[{key}]", "missing")
        if not isinstance(value, dict):
            raise fail(key, f"must be a table ([{key}]), got {type(value).__name__}")
        return value

    def check_value(where: str, message: str, name: str, value: Any) -> Any:
        label, ftype = schema.fields(message)[name]
        if label == "repeated" or ftype in schema.messages:
            raise fail(where, f"{message}.{name} is a {label or 'message'} field; a "
                       "description cannot set it")
        if ftype in ("uint32", "uint64", "int32", "int64"):
            if isinstance(value, bool) or not isinstance(value, int) or (
                    ftype.startswith("u") and value < 0):
                raise fail(where, f"must be a{' non-negative' if ftype[0] == 'u' else 'n'} "
                           f"integer ({message}.{name} is {ftype}), got {value!r}")
        elif ftype in ("float", "double"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise fail(where, f"must be a number ({message}.{name} is {ftype}), got "
                           f"{value!r}")
            value = float(value)
        elif ftype == "bool":
            if not isinstance(value, bool):
                raise fail(where, f"must be true or false, got {value!r}")
        elif ftype == "string":
            if not isinstance(value, str):
                raise fail(where, f"must be a string, got {value!r}")
        elif ftype in schema.enums:
            names = schema.enums[ftype]
            prefix = _ENUM_PREFIX.get(ftype, "")
            if not isinstance(value, str):
                raise fail(where, f"must be a {ftype} name such as {names[1]!r}, got {value!r}")
            full = value if value.startswith(prefix) else prefix + value.upper()
            if full not in names or full.endswith("_UNSPECIFIED"):
                choices = ", ".join(n for n in names if not n.endswith("_UNSPECIFIED"))
                raise fail(where, f"{value!r} is not a {ftype}: one of {choices}")
            value = full
        else:
            raise fail(where, f"{message}.{name} has type {ftype}, which descriptions do not "
                       "support")
        return value

    def fields_of(where: str, given: Dict[str, Any], message: str, refused: Dict[str, str],
                  own: Dict[str, str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """(proto fields, description keys) of one table, each key checked."""
        proto_fields = schema.fields(message)
        out, extra = {}, {}
        for key, value in given.items():
            at = f"{where} {key}"
            if key in own:
                extra[key] = value
            elif key in refused:
                raise fail(at, f"not allowed here: {refused[key]}")
            elif key in proto_fields:
                out[key] = check_value(at, message, key, value)
            else:
                known = (set(proto_fields) - set(refused)) | set(own)
                raise fail(at, f"unknown key{_suggest(key, known)}: not a field of "
                           f"mapl.v1.{message} ({schema.path})"
                           + (f" nor one of {', '.join(sorted(own))}" if own else ""))
        return out, extra

    for key in data:
        if key not in _TOP_KEYS:
            raise fail(key, f"unknown top-level key{_suggest(key, _TOP_KEYS)}: the tables are "
                       + ", ".join(f"[{k}]" for k in _TOP_KEYS[:4]) + ", [[stages]] and "
                       "[boundaries.N]")

    meta = table("pipeline", required=True)
    for key in meta:
        if key not in _PIPELINE_KEYS:
            raise fail(f"[pipeline] {key}", f"unknown key{_suggest(key, _PIPELINE_KEYS)}: "
                       f"[pipeline] has {', '.join(_PIPELINE_KEYS)} (daemon fields go in "
                       "[daemon])")
    name = meta.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise fail("[pipeline] name", f"required: lower-case letters, digits and '-', at most "
                   f"40 characters, starting with a letter (it names Kubernetes objects), got "
                   f"{name!r}")
    namespace = meta.get("namespace", "default")
    if not isinstance(namespace, str) or not _NAME.match(namespace):
        raise fail("[pipeline] namespace", f"must be a Kubernetes namespace name, got "
                   f"{namespace!r}")

    daemon, _ = fields_of("[daemon]", table("daemon"), "DaemonConfig", _TARGET_DAEMON_FIELDS,
                          {})
    common, _ = fields_of("[boundary]", table("boundary"), "BoundaryConfig",
                          _TARGET_BOUNDARY_FIELDS, {})

    tls_table = table("tls")
    tls_fields, tls_meta = fields_of("[tls]", tls_table, "TlsConfig", _TARGET_TLS_FIELDS,
                                     _TLS_KEYS)
    enabled = tls_meta.get("enabled", "tls" in data)
    if not isinstance(enabled, bool):
        raise fail("[tls] enabled", f"must be true or false, got {enabled!r}")
    identity = tls_meta.get("identity", "")
    if not isinstance(identity, str):
        raise fail("[tls] identity", f"must be a string, got {identity!r}")
    try:
        identity.format(pipeline="p", stage=0)
    except (KeyError, IndexError, ValueError) as e:
        raise fail("[tls] identity", f"a template may use {{pipeline}} and {{stage}} only "
                   f"({e})") from None

    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or len(raw_stages) < 2:
        raise fail("[[stages]]", "at least two [[stages]] tables are needed, one per stage "
                   "in order (stage 0 first)")
    stages = []
    for i, st in enumerate(raw_stages):
        where = f"[[stages]] #{i} (stage {i})"
        if not isinstance(st, dict):
            raise fail(where, "must be a table")
        for key, value in st.items():
            if key not in _STAGE_KEYS:
                raise fail(f"{where} {key}", f"unknown key{_suggest(key, _STAGE_KEYS)}: a "
                           f"stage has {', '.join(_STAGE_KEYS)}")
        command = st.get("command", [])
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            raise fail(f"{where} command", "must be a list of strings")
        for key in ("site", "image", "k8s_address"):
            if not isinstance(st.get(key, ""), str):
                raise fail(f"{where} {key}", "must be a string")
        stages.append(Stage(i, st.get("site", ""), st.get("image", ""), list(command),
                            st.get("k8s_address", "")))

    overrides = table("boundaries")
    n_boundaries = len(stages) - 1
    for key in overrides:
        if not key.isdigit() or int(key) >= n_boundaries:
            raise fail(f"[boundaries.{key}]", f"boundaries are numbered 0 to "
                       f"{n_boundaries - 1} ({len(stages)} stages): boundary b joins stage b "
                       "and stage b + 1")
    boundaries = []
    for b in range(n_boundaries):
        where = f"[boundaries.{b}]"
        given = overrides.get(str(b), {})
        if not isinstance(given, dict):
            raise fail(where, "must be a table")
        own, extra = fields_of(where, given, "BoundaryConfig", _TARGET_BOUNDARY_FIELDS,
                               _BOUNDARY_KEYS)
        merged = dict(common, **own)
        if "d" not in merged:
            raise fail(f"{where} d", "required: the hidden size, in [boundary] or here")
        dialer = extra.get("dialer", "upstream")
        if dialer not in ("upstream", "downstream"):
            raise fail(f"{where} dialer", f"must be \"upstream\" or \"downstream\", got "
                       f"{dialer!r}")
        check = extra.get("check_peer_identity", False)
        if not isinstance(check, bool):
            raise fail(f"{where} check_peer_identity", f"must be true or false, got {check!r}")
        if check and not (enabled and identity):
            raise fail(f"{where} check_peer_identity", "needs TLS with an identity: add "
                       "[tls] with identity = \"spiffe://.../{pipeline}/stage{stage}\"")
        boundaries.append(Boundary(b, merged, dialer, check))

    return Description(name=name, path=path, daemon=daemon, stages=stages,
                       boundaries=boundaries, tls=tls_fields if enabled else None,
                       tls_identity=identity, namespace=namespace, schema=schema)


# ---------------------------------------------------------------------------------------------
# Targets.

@dataclass
class LocalTarget:
    """This machine: loopback, sockets and configs in ``directory`` (keep it short: a Unix
    socket path holds at most 107 bytes), the token of this run. ``peer_address[s]``: where
    stage s's peer_listen is reached; the launcher fills it as the daemons report their ports
    (peer_listen defaults to 127.0.0.1:0, a free port). ``tls``: True: the description's TLS
    with certificates in ``tls_dir`` (stage<N>.crt, stage<N>.key, ca.crt; make_certificates
    makes throwaway ones); False: plaintext whatever the description says. ``daemon``: further
    DaemonConfig fields (the launcher's buffer sizes and timeouts), over the description's."""
    directory: Path
    token: str
    tls: bool = True
    tls_dir: Optional[Path] = None
    peer_listen: Dict[int, str] = field(default_factory=dict)
    peer_address: Dict[int, str] = field(default_factory=dict)
    metrics_address: str = "127.0.0.1:0"
    daemon: Dict[str, Any] = field(default_factory=dict)
    name = "local"

    def socket(self, stage: int) -> str:
        return str(Path(self.directory) / f"s{stage}.sock")


@dataclass
class K8sTarget:
    """Kubernetes, one pod per stage (deploy/k8s): each stage's peer port behind a Service
    <pipeline>-stage<N> in the description's namespace (or the stage's k8s_address), the local
    socket in an emptyDir at /run/mapl, the token and certificates from mounted Secrets."""
    namespace: Optional[str] = None   # default: the description's
    peer_port: int = 7000
    metrics_port: int = 9400
    socket_path: str = "/run/mapl/mapld.sock"
    token_file: str = "/etc/mapl/token/token"
    tls_dir: str = "/etc/mapl/tls"
    name = "k8s"

    def service(self, desc: Description, stage: int) -> str:
        return f"{desc.name}-stage{stage}"

    def address(self, desc: Description, stage: int) -> str:
        if desc.stages[stage].k8s_address:
            return desc.stages[stage].k8s_address
        return (f"{self.service(desc, stage)}.{self.namespace or desc.namespace}.svc:"
                f"{self.peer_port}")


Target = Union[LocalTarget, K8sTarget]


def _listens(desc: Description, stage: int) -> bool:
    """Whether the stage's daemon accepts a peer link (it is the non-dialing side of one)."""
    for b in desc.boundaries:
        if b.index == stage and b.dialer == "downstream":
            return True
        if b.index + 1 == stage and b.dialer == "upstream":
            return True
    return False


def start_order(desc: Description) -> List[int]:
    """Stages in an order where each boundary's listener starts before its dialer (the local
    launcher needs the listener's port first). A chain always has one."""
    order: List[int] = []
    pending = list(range(len(desc.stages)))
    while pending:
        for s in pending:
            waits = [b for b in desc.boundaries if s in (b.index, b.index + 1)
                     and _dialer_of(b) == s and _listener_of(b) not in order]
            if not waits:
                order.append(s)
                pending.remove(s)
                break
    return order


def _dialer_of(b: Boundary) -> int:
    return b.index if b.dialer == "upstream" else b.index + 1


def _listener_of(b: Boundary) -> int:
    return b.index + 1 if b.dialer == "upstream" else b.index


def _stage_config(desc: Description, target: Target, stage: int) -> Dict[str, Any]:
    """DaemonConfig of one stage as a dict (boundaries a list of dicts, tls a dict)."""
    cfg: Dict[str, Any] = {"stage": stage}
    if isinstance(target, LocalTarget):
        cfg.update(local_socket=target.socket(stage), metrics_address=target.metrics_address,
                   auth_token=target.token)
        if _listens(desc, stage):
            cfg["peer_listen"] = target.peer_listen.get(stage, "127.0.0.1:0")
    else:
        cfg.update(local_socket=target.socket_path,
                   metrics_address=f"0.0.0.0:{target.metrics_port}",
                   auth_token_file=target.token_file)
        if _listens(desc, stage):
            cfg["peer_listen"] = f"0.0.0.0:{target.peer_port}"
    cfg.update(desc.daemon)
    if isinstance(target, LocalTarget):
        cfg.update(target.daemon)
    boundaries = []
    for b in desc.boundaries:
        if stage not in (b.index, b.index + 1):
            continue
        up = stage == b.index
        fields: Dict[str, Any] = {"id": b.index, "role": "ROLE_UPSTREAM" if up else
                                  "ROLE_DOWNSTREAM"}
        peer = b.index + 1 if up else b.index
        dials = _dialer_of(b) == stage
        if dials:
            if isinstance(target, LocalTarget):
                if peer not in target.peer_address:
                    raise DescriptionError(f"{desc.path}: stage {stage} dials stage {peer} "
                                           f"(boundary {b.index}), whose address is not known "
                                           "yet: start the stages in start_order()")
                fields["peer_address"] = target.peer_address[peer]
            else:
                fields["peer_address"] = target.address(desc, peer)
        # dial only where it differs from the default (upstream dials, downstream listens).
        if b.dialer == "downstream":
            fields["dial"] = dials
        fields.update(b.fields)
        if b.check_peer_identity and desc.tls is not None and (
                not isinstance(target, LocalTarget) or target.tls):
            fields["peer_identity"] = desc.identity(peer)
        boundaries.append(fields)
    cfg["boundaries"] = boundaries
    if desc.tls is not None and (not isinstance(target, LocalTarget) or target.tls):
        if isinstance(target, LocalTarget):
            if target.tls_dir is None:
                raise DescriptionError(f"{desc.path}: [tls] turns TLS on: give the local "
                                       "target a tls_dir (make_certificates makes throwaway "
                                       "ones), or tls=False to run in plaintext")
            d = Path(target.tls_dir)
            files = {"cert_file": str(d / f"stage{stage}.crt"),
                     "key_file": str(d / f"stage{stage}.key"), "ca_file": str(d / "ca.crt")}
        else:
            files = {"cert_file": f"{target.tls_dir}/tls.crt",
                     "key_file": f"{target.tls_dir}/tls.key",
                     "ca_file": f"{target.tls_dir}/ca.crt"}
        cfg["tls"] = dict(files, **desc.tls)
    return cfg


# ---------------------------------------------------------------------------------------------
# Text format.

def _scalar(schema: ProtoSchema, message: str, key: str, value: Any) -> str:
    ftype = schema.fields(message)[key][1]
    if isinstance(value, bool):
        return "true" if value else "false"
    if ftype in schema.enums:
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def to_text(desc: Description, cfg: Dict[str, Any], header: str = "") -> str:
    """A DaemonConfig dict (as _stage_config makes) as text format."""
    schema = desc.schema or ProtoSchema.from_files(find_config_proto())
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for key, value in cfg.items():
        if key == "boundaries":
            for b in value:
                lines.append("boundaries {")
                lines += [f"  {k}: {_scalar(schema, 'BoundaryConfig', k, v)}"
                          for k, v in b.items()]
                lines.append("}")
        elif key == "tls":
            lines.append("tls {")
            lines += [f"  {k}: {_scalar(schema, 'TlsConfig', k, v)}" for k, v in value.items()]
            lines.append("}")
        else:
            lines.append(f"{key}: {_scalar(schema, 'DaemonConfig', key, value)}")
    return "\n".join(lines) + "\n"


def daemon_config(desc: Description, target: Target, stage: int, header: str = "") -> str:
    """Stage ``stage``'s DaemonConfig as text format."""
    return to_text(desc, _stage_config(desc, target, stage), header)


def daemon_configs(desc: Description, target: Union[Target, str]) -> Dict[int, str]:
    """Every stage's DaemonConfig as text format, by stage. ``target``: a LocalTarget (its
    peer_address must already hold every listening stage's address: the launcher starts stages
    one by one instead), a K8sTarget, or "k8s" for K8sTarget()."""
    if target == "k8s":
        target = K8sTarget()
    elif target == "local":
        raise DescriptionError("the local target needs a directory and a token: pass a "
                               "LocalTarget (mapl.launch.start_pipeline does)")
    return {s: daemon_config(desc, target, s) for s in range(len(desc.stages))}  # type: ignore


# ---------------------------------------------------------------------------------------------
# Throwaway certificates for the local target.

def make_certificates(desc: Description, directory: Path, days: int = 1) -> Path:
    """A throwaway CA and one EC P-256 certificate per stage in ``directory`` (ca.crt,
    stage<N>.crt, stage<N>.key), made with the openssl command. Each certificate names
    127.0.0.1 and localhost (the dialer checks the host it dials when a boundary does not check
    identities) and the stage's [tls] identity when there is one. For local runs and tests only:
    the CA's key sits beside them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    def run(*argv: str) -> None:
        p = subprocess.run(argv, cwd=directory, capture_output=True, text=True)
        if p.returncode:
            raise DescriptionError(f"openssl failed making test certificates: "
                                   f"{' '.join(argv)}\n{p.stderr[-2000:]}")

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("openssl", "req", "-x509", *ec, "-days", str(days), "-subj",
        f"/CN=mapl-{desc.name}-local-ca", "-keyout", "ca.key", "-out", "ca.crt")
    for s in range(len(desc.stages)):
        san = "DNS:localhost,IP:127.0.0.1"
        if desc.tls_identity:
            ident = desc.identity(s)
            san += f",{'URI' if '://' in ident else 'DNS'}:{ident}"
        (directory / f"stage{s}.ext").write_text(f"subjectAltName={san}\n")
        run("openssl", "req", "-new", *ec, "-subj", f"/CN={desc.name}-stage{s}", "-keyout",
            f"stage{s}.key", "-out", f"stage{s}.csr")
        run("openssl", "x509", "-req", "-in", f"stage{s}.csr", "-CA", "ca.crt", "-CAkey",
            "ca.key", "-CAcreateserial", "-days", str(days), "-extfile", f"stage{s}.ext",
            "-out", f"stage{s}.crt")
        os.chmod(directory / f"stage{s}.key", 0o600)
    return directory
