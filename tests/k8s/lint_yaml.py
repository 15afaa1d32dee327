#!/usr/bin/python3
"""A YAML lint for deploy/k8s (yamllint is not a Debian package this project installs): every
file, and every stream given on stdin with '-', must parse with python3-yaml's safe loader
with no key repeated in a mapping (safe_load silently keeps the last), no tab characters and no
trailing whitespace. Prints each problem as FILE:LINE: message; exits 1 if any."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List

import yaml


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} repeated (first at line {seen[key] + 1})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def lint(name: str, text: str) -> List[str]:
    problems = []
    for i, line in enumerate(text.splitlines(), 1):
        if "\t" in line:
            problems.append(f"{name}:{i}: tab character")
        if line != line.rstrip():
            problems.append(f"{name}:{i}: trailing whitespace")
    try:
        for _ in yaml.load_all(text, Loader=_UniqueKeyLoader):
            pass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 0
        problems.append(f"{name}:{line}: {getattr(e, 'problem', None) or e}")
    return problems


def main(argv: List[str]) -> int:
    files: List[str] = []
    for arg in argv:
        p = Path(arg)
        files += sorted(str(f) for f in p.rglob("*.y*ml")) if p.is_dir() else [arg]
    problems, count = [], 0
    for f in files:
        if "node_modules" in f:
            continue
        text = sys.stdin.read() if f == "-" else Path(f).read_text()
        problems += lint("<stdin>" if f == "-" else f, text)
        count += 1
    for p in problems:
        print(p)
    print(f"yaml lint: {count} files, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
