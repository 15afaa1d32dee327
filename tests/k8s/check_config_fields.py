#!/usr/bin/python3
"""Checks that every field a mapld config sets exists in proto/mapl/v1/config.proto: for each
text-format mapl.v1.DaemonConfig (a file, or each ConfigMap key ending in .textproto in the
rendered manifests read from a YAML file), every field name, nested `boundaries { }` and
`tls { }` blocks included, must be a field of the message it sits in, and enum values must be
names of the field's enum. In rendered manifests, each file a StatefulSet's config names
(auth_token_file, the tls files, local_socket) must also lie under a volume its mapld
container mounts: a component whose patch matched nothing would leave them missing. A parser of its own, independent of mapl.pipeline, which writes the
configs: the check is not the generator checking itself.

    check_config_fields.py --proto proto/mapl/v1/config.proto [--yaml RENDERED.yaml] [FILE ...]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import yaml

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}:])|([^\s{}:"#]+))', re.S)


def proto_messages(path: Path) -> Tuple[Dict[str, Dict[str, str]], Dict[str, List[str]]]:
    """message -> field -> type, and enum -> value names, of config.proto and peer.proto."""
    messages: Dict[str, Dict[str, str]] = {}
    enums: Dict[str, List[str]] = {}
    for p in (path, path.with_name("peer.proto")):
        if not p.is_file():
            continue
        text = re.sub(r"//[^\n]*", "", p.read_text())
        for m in re.finditer(r"^enum\s+(\w+)\s*\{(.*?)^\}", text, re.S | re.M):
            enums[m.group(1)] = re.findall(r"^\s*([A-Z][A-Z0-9_]*)\s*=", m.group(2), re.M)
        for m in re.finditer(r"^message\s+(\w+)\s*\{(.*?)^\}", text, re.S | re.M):
            messages[m.group(1)] = {
                f[1]: f[0] for f in re.findall(
                    r"^\s*(?:optional\s+|repeated\s+)?([\w.]+)\s+(\w+)\s*=\s*\d+\s*;",
                    m.group(2), re.M)}
    return messages, enums


def check_text(name: str, text: str, messages: Dict[str, Dict[str, str]],
               enums: Dict[str, List[str]]) -> Tuple[int, List[str]]:
    """(fields seen, problems) of one text-format DaemonConfig."""
    tokens = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            break
        for group in (2, 3, 4):
            if m.group(group):
                tokens.append((m.group(group), text.count("\n", 0, m.start(group)) + 1))
        pos = m.end()
    stack = ["DaemonConfig"]
    problems, seen, i = [], 0, 0
    while i < len(tokens):
        tok, ln = tokens[i]
        if tok == "}":
            if len(stack) == 1:
                problems.append(f"{name}:{ln}: unbalanced '}}'")
            else:
                stack.pop()
            i += 1
            continue
        message = stack[-1]
        fields = messages.get(message, {})
        nxt = tokens[i + 1][0] if i + 1 < len(tokens) else None
        seen += 1
        if tok not in fields:
            problems.append(f"{name}:{ln}: {tok}: not a field of mapl.v1.{message}")
        ftype = fields.get(tok, "")
        if nxt == "{" or (nxt == ":" and i + 2 < len(tokens) and tokens[i + 2][0] == "{"):
            if tok in fields and ftype not in messages:
                problems.append(f"{name}:{ln}: {tok}: is a {ftype}, not a message")
            stack.append(ftype if ftype in messages else "?")
            i += 2 if nxt == "{" else 3
            continue
        if nxt != ":" or i + 2 >= len(tokens):
            problems.append(f"{name}:{ln}: {tok}: expected 'name: value' or 'name {{'")
            i += 1
            continue
        value = tokens[i + 2][0]
        if ftype in enums and value not in enums[ftype]:
            problems.append(f"{name}:{ln}: {tok}: {value} is not a value of {ftype}")
        i += 3
    if len(stack) != 1:
        problems.append(f"{name}: a block is not closed")
    return seen, problems


_PATH_FIELDS = re.compile(r'^\s*(auth_token_file|cert_file|key_file|ca_file|local_socket|'
                          r'state_dir)\s*:\s*"([^"]*)"', re.M)


def check_mounts(name: str, sts: dict, configs: Dict[str, str]) -> List[str]:
    """Files the mapld config names that no volume of the mapld container holds."""
    spec = sts["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mapld = [c for c in spec.get("initContainers", []) + spec.get("containers", [])
             if c["name"] == "mapld"]
    if not mapld:
        return [f"{name}: no mapld container"]
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in mapld[0].get("volumeMounts", [])}
    config_volumes = [v["configMap"]["name"] for v in volumes.values() if "configMap" in v]
    problems = []
    for cm in config_volumes:
        for field, path in _PATH_FIELDS.findall(configs.get(cm, "")):
            d = path.rsplit("/", 1)[0]
            if not any(d == m or d.startswith(m + "/") for m in mounts):
                problems.append(f"{name}: {field} {path}: no volume of the mapld container is "
                                "mounted there")
    return problems


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proto", type=Path, required=True)
    ap.add_argument("--yaml", type=Path, action="append", default=[],
                    help="rendered manifests: check every ConfigMap key ending in .textproto")
    ap.add_argument("files", nargs="*", type=Path)
    args = ap.parse_args(argv)
    messages, enums = proto_messages(args.proto)
    configs: List[Tuple[str, str]] = [(str(f), f.read_text()) for f in args.files]
    problems: List[str] = []
    for y in args.yaml:
        docs = [d for d in yaml.safe_load_all(y.read_text()) if isinstance(d, dict)]
        maps = {}
        for doc in docs:
            if doc.get("kind") == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if key.endswith(".textproto"):
                        configs.append((f"{y}: ConfigMap {doc['metadata']['name']} {key}",
                                        text))
                        maps[doc["metadata"]["name"]] = text
        for doc in docs:
            if doc.get("kind") == "StatefulSet":
                problems += check_mounts(f"{y}: StatefulSet {doc['metadata']['name']}", doc,
                                         maps)
    total = 0
    for name, text in configs:
        n, p = check_text(name, text, messages, enums)
        total += n
        problems += p
    for p in problems:
        print(p)
    print(f"config fields: {len(configs)} configs, {total} fields, {len(problems)} problems")
    return 1 if problems or not configs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
