#!/usr/bin/python3
"""Keeps docs/operations.md true to the code.

Checks, both ways (nothing missing from the page, nothing on the page the code lacks):
  * the config reference: the fields of DaemonConfig, BoundaryConfig and TlsConfig in
    proto/mapl/v1/config.proto against the first column of the tables under
    "### DaemonConfig", "### BoundaryConfig", "### TlsConfig" and "### UcxConfig";
  * the BoundaryConfig rows that say "Must match" against the fields of peer.proto's
    BoundaryFingerprint (what the handshake and a checkpoint restore compare);
  * the flags: every ABSL_FLAG of server/main.cc against the table under "### mapld flags";
  * the metrics reference: every name server/metrics.cc exports against the first column of the
    tables under "## Metrics reference", with its type (counter, gauge, histogram); and every
    whole metric name the page mentions elsewhere must be one mapld exports.

server/metrics.cc declares no statistic by name: it exports every field of the stats records of
proto/mapl/v1/local.proto that carries a (metric) option, by reflection. This script applies the
same rules to local.proto, and first checks that metrics.cc still spells them as it assumes (the
prefixes, the _total suffix, the histogram's name), so a change there fails here too.

Plain Python 3, no dependencies: /usr/bin/python3 tests/docs/check_operations.py (exit 0: all
good; 1: every problem listed).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "operations.md"
CONFIG_PROTO = REPO / "proto" / "mapl" / "v1" / "config.proto"
LOCAL_PROTO = REPO / "proto" / "mapl" / "v1" / "local.proto"
PEER_PROTO = REPO / "proto" / "mapl" / "v1" / "peer.proto"
METRICS_CC = REPO / "server" / "metrics.cc"
MAIN_CC = REPO / "server" / "main.cc"

CONFIG_MESSAGES = ("DaemonConfig", "BoundaryConfig", "TlsConfig", "UcxConfig")
SCALARS = {"double", "float", "int32", "int64", "uint32", "uint64", "sint32", "sint64", "fixed32",
           "fixed64", "sfixed32", "sfixed64", "bool", "string", "bytes"}


# ---- proto reading (enough for these files: no nested messages in the records read) ----

def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def message_body(proto: str, name: str) -> str:
    """The text between the braces of `message name { ... }` (top level)."""
    m = re.search(r"\bmessage\s+" + name + r"\s*\{", proto)
    if m is None:
        raise SystemExit(f"check_operations: no message {name} in the proto")
    depth, i = 1, m.end()
    while depth:
        if i >= len(proto):
            raise SystemExit(f"check_operations: message {name} is not closed")
        depth += {"{": 1, "}": -1}.get(proto[i], 0)
        i += 1
    return proto[m.end():i - 1]


FIELD = re.compile(
    r"^\s*(?:(optional|repeated)\s+)?"
    r"(map\s*<\s*\w+\s*,\s*[\w.]+\s*>|[\w.]+)\s+(\w+)\s*=\s*\d+\s*(\[[^\]]*\])?\s*;", re.M)


def fields(proto: str, message: str) -> List[Tuple[str, str, str, str]]:
    """(label, type, name, options) of each field of `message`, in order."""
    body = message_body(proto, message)
    # Drop nested blocks (oneof bodies stay: their fields are the message's), reserved lines.
    body = re.sub(r"\breserved\b[^;]*;", "", body)
    out = []
    for m in FIELD.finditer(body):
        label, type_, name, options = m.group(1) or "", m.group(2), m.group(3), m.group(4) or ""
        if type_ in ("option", "reserved"):
            continue
        out.append((label, re.sub(r"\s+", "", type_), name, options))
    return out


# ---- the metric names, by server/metrics.cc's rules ----

def check_metrics_cc(problems: List[str]) -> str:
    """Checks the spellings this script relies on; returns the histogram's name."""
    cc = METRICS_CC.read_text()
    expected = {
        '"mapl_boundary"': "BoundaryStats records are exported as mapl_boundary_<field>",
        '"mapl_peer_server"': "PeerServerStats is exported as mapl_peer_server_<field>",
        'StrCat("mapl_", f->name())': "a nested record field <f> becomes the prefix mapl_<f>",
        'StrCat(prefix, "_", f->name())': "a map field <f> becomes <prefix>_<f>_<subfield>",
        'name + "_total"': "counters carry _total",
        '{"body",': "map keys become the label body",
    }
    for needle, rule in expected.items():
        if needle not in cc:
            problems.append(f"server/metrics.cc no longer contains {needle} ({rule}); update "
                            "tests/docs/check_operations.py and the metrics reference")
    names = re.findall(r'\.Name\("(\w+)"\)', cc)
    if len(names) != 1:
        problems.append(f"server/metrics.cc: expected one histogram .Name(\"...\"), found {names}")
        return "mapl_codec_seconds"
    return names[0]


def exported_metrics(problems: List[str]) -> Dict[str, str]:
    """name -> type (counter, gauge, histogram) of every series family mapld exports."""
    proto = strip_comments(LOCAL_PROTO.read_text())
    out: Dict[str, str] = {}

    def kind_of(options: str) -> str:
        m = re.search(r"\(metric\)\s*=\s*(METRIC_\w+)", options)
        return m.group(1) if m else "METRIC_NONE"

    def add(name: str, kind: str) -> None:
        full = name + "_total" if kind == "METRIC_COUNTER" else name
        out[full] = "counter" if kind == "METRIC_COUNTER" else "gauge"

    def record(message: str, prefix: str) -> None:
        # FamilyBuilder::AddRecord of metrics.cc.
        for label, type_, name, options in fields(proto, message):
            if type_.startswith("map<"):
                value = type_[type_.index(",") + 1:-1]
                if value in SCALARS:
                    continue
                for _, _, sub, sub_options in fields(proto, value):
                    kind = kind_of(sub_options)
                    if kind != "METRIC_NONE":
                        add(f"{prefix}_{name}_{sub}", kind)
                continue
            if type_ not in SCALARS and label != "repeated" and not is_enum(proto, type_):
                record(type_, f"mapl_{name}")
                continue
            kind = kind_of(options)
            if kind != "METRIC_NONE":
                add(f"{prefix}_{name}", kind)

    record("BoundaryStats", "mapl_boundary")
    record("PeerServerStats", "mapl_peer_server")
    out[check_metrics_cc(problems)] = "histogram"
    return out


def is_enum(proto: str, type_: str) -> bool:
    return re.search(r"\benum\s+" + re.escape(type_.split(".")[-1]) + r"\b", proto) is not None


# ---- the page ----

def section(doc: str, heading: str) -> str:
    """The text under the heading line `heading` up to the next heading of its level or above."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == heading:
            body = []
            for rest in lines[i + 1:]:
                m = re.match(r"^(#+)\s", rest)
                if m and len(m.group(1)) <= level:
                    break
                body.append(rest)
            return "\n".join(body)
    raise SystemExit(f"check_operations: docs/operations.md has no heading '{heading}'")


def table_keys(text: str) -> Dict[str, List[str]]:
    """First cell (inside backticks) -> the other cells, of every table row of `text`."""
    rows: Dict[str, List[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^\|\s*`([^`]+)`\s*\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def compare(what: str, code: Set[str], doc: Set[str], problems: List[str]) -> None:
    for name in sorted(code - doc):
        problems.append(f"{what}: '{name}' is missing from docs/operations.md")
    for name in sorted(doc - code):
        problems.append(f"{what}: docs/operations.md documents '{name}', which the code lacks")


def main() -> int:
    doc = DOC.read_text()
    problems: List[str] = []

    config = strip_comments(CONFIG_PROTO.read_text())
    reference = section(doc, "## Config reference")
    for message in CONFIG_MESSAGES:
        in_proto = {name for _, _, name, _ in fields(config, message)}
        in_doc = set(table_keys(section(reference, f"### {message}")))
        compare(f"config {message}", in_proto, in_doc, problems)

    boundary_rows = table_keys(section(reference, "### BoundaryConfig"))
    must_match = {name for name, cells in boundary_rows.items()
                  if any("Must match" in c for c in cells)}
    fingerprint = {name for _, _, name, _ in
                   fields(strip_comments(PEER_PROTO.read_text()), "BoundaryFingerprint")}
    compare("BoundaryFingerprint field (a BoundaryConfig row saying 'Must match')", fingerprint,
            must_match, problems)

    flags = set(re.findall(r"ABSL_FLAG\(\s*[\w:<>]+\s*,\s*(\w+)\s*,", MAIN_CC.read_text()))
    if not flags:
        problems.append("server/main.cc: no ABSL_FLAG found; update tests/docs/check_operations.py")
    in_doc = {k[2:] for k in table_keys(section(reference, "### mapld flags")) if k.startswith("--")}
    compare("mapld flag", flags, in_doc, problems)

    metrics = exported_metrics(problems)
    rows = {k: v for k, v in table_keys(section(doc, "## Metrics reference")).items()
            if k.startswith("mapl_")}
    compare("metric", set(metrics), set(rows), problems)
    for name in sorted(set(metrics) & set(rows)):
        cells = rows[name]
        if not cells or cells[0] != metrics[name]:
            problems.append(f"metric '{name}': docs/operations.md says type "
                            f"'{cells[0] if cells else ''}', the code exports a {metrics[name]}")

    # Metric names elsewhere on the page (errors, TLS, prose) must exist too: a name followed by
    # a backtick or a space is a whole name, not a prefix such as `mapl_link_<f>`.
    for name in sorted(set(re.findall(r"`(mapl_[a-z0-9_]+)[` ]", doc))):
        if name not in metrics:
            problems.append(f"metric: docs/operations.md mentions '{name}', which mapld does not "
                            "export")

    if problems:
        print(f"docs/operations.md is out of step with the code ({len(problems)} problem(s)):")
        for p in problems:
            print("  " + p)
        return 1
    print(f"docs/operations.md: {sum(len(fields(config, m)) for m in CONFIG_MESSAGES)} config "
          f"fields, {len(flags)} flags and {len(metrics)} metrics documented, none extra")
    return 0


if __name__ == "__main__":
    sys.exit(main())
