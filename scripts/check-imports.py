#!/usr/bin/env python3
"""Fails when the top-level modules of a crate import each other in a circle.

Reads every `crate::a::...` path (in `use` lines and inline paths) of each file under
`<crate>/src`, maps the file to its top-level module (`src/jobs/run.rs` -> `jobs`, `src/main.rs`
and `src/lib.rs` -> the crate root, left out), and looks for cycles in the module graph. Usage:
`scripts/check-imports.py node scheduler` (from the workspace root).
"""
import re
import sys
from pathlib import Path

PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")
# `use crate::{a, b::c}` groups
GROUP = re.compile(r"\buse\s+crate::\{([^;]*)\};", re.S)


def module_of(src: Path, file: Path):
    rel = file.relative_to(src)
    if rel.parts[0] in ("main.rs", "lib.rs"):
        return None
    return rel.parts[0].removesuffix(".rs")


def strip_comments(text: str) -> str:
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def graph(crate: str):
    src = Path(crate) / "src"
    edges = {}
    for file in sorted(src.rglob("*.rs")):
        m = module_of(src, file)
        if m is None:
            continue
        text = strip_comments(file.read_text())
        targets = set(PATH.findall(text))
        for group in GROUP.findall(text):
            targets.update(re.findall(r"(?:^|,)\s*([a-z_][a-z0-9_]*)", group))
        edges.setdefault(m, set()).update(t for t in targets if t != m)
    return edges


def cycles(edges):
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for t in sorted(edges.get(n, ())):
            if t not in edges:
                continue
            if state.get(t) == 1:
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)
    return found


def main():
    bad = False
    for crate in sys.argv[1:] or ["node", "scheduler"]:
        found = cycles(graph(crate))
        for c in found:
            bad = True
            print(f"{crate}: import circle: {' -> '.join(c)}")
        if not found:
            print(f"{crate}: no import circle between its modules")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
