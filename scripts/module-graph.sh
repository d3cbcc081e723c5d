#!/usr/bin/env bash
# The module graph of src/, from the `crate::<module>` paths each file names, checked against
# the layers of docs/ARCHITECTURE.md section 1: every edge points down a layer, never up, and
# there is no cycle. Prints the graph as "module -> dependencies"; exits 1 on a violation.
#   scripts/module-graph.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 - <<'PYTHON'
import pathlib, re, sys

# Lowest first. Modules in one layer may use each other, as long as there is no cycle.
LAYERS = [
    ["wal", "durable", "buffer_pool", "progress"],
    ["keyring"],
    ["envelope"],
    ["config", "storage"],
    ["postgres", "repository"],
    ["archive", "backup", "restore", "expire", "verify", "check"],
    ["daemon"],
    ["commands"],
    ["main"],
]
rank = {module: index for index, layer in enumerate(LAYERS) for module in layer}

edges = {}
for path in sorted(pathlib.Path("src").rglob("*.rs")):
    parts = path.relative_to("src").parts
    if parts == ("lib.rs",):
        continue
    module = "main" if parts == ("main.rs",) else parts[0].removesuffix(".rs")
    text = path.read_text()
    prefix = r"pitr::" if module == "main" else r"crate::"
    for used in re.findall(prefix + r"([a-z_]+)", text):
        if used != module:
            edges.setdefault(module, set()).add(used)
    edges.setdefault(module, set())

problems = []
for module, used in sorted(edges.items()):
    if module not in rank:
        problems.append(f"{module} is in no layer of scripts/module-graph.sh")
        continue
    for target in sorted(used):
        if target not in rank:
            problems.append(f"{module} -> {target}: {target} is in no layer")
        elif rank[target] > rank[module]:
            problems.append(f"{module} -> {target} points up a layer")

def cycle_from(start):
    stack, seen = [(start, [start])], set()
    while stack:
        node, trail = stack.pop()
        for target in edges.get(node, ()):
            if target == start:
                return trail + [start]
            if target not in seen and rank.get(target) == rank.get(start):
                seen.add(target)
                stack.append((target, trail + [target]))
    return None

for module in sorted(edges):
    cycle = cycle_from(module)
    if cycle and module == min(cycle[:-1]):
        problems.append("cycle: " + " -> ".join(cycle))

for module in sorted(edges, key=lambda m: (rank.get(m, 99), m)):
    print(f"{module} -> {', '.join(sorted(edges[module])) or '(nothing in pitr)'}")
if problems:
    print("\n".join(["", "module graph violations:"] + problems), file=sys.stderr)
    sys.exit(1)
print("\nno upward edge, no cycle", file=sys.stderr)
PYTHON
