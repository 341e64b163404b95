#!/usr/bin/env python3
"""The header graph of include/polyattn (docs/design.md §3): for each header, its direct polyattn
includes and its floors — the length of its longest include chain, counting itself and the
header at the bottom that includes no polyattn header.

    python3 tests/tools/header_graph.py [include/polyattn]
"""
import os, re, sys, functools
root = sys.argv[1] if len(sys.argv) > 1 else 'include/polyattn'
edges = {}
for d, _, files in os.walk(root):
    for f in files:
        if not f.endswith('.hpp'): continue
        p = os.path.normpath(os.path.join(d, f))
        rel = os.path.relpath(p, root)
        incs = []
        for m in re.finditer(r'#include "([^"]+)"', open(p).read()):
            incs.append(os.path.relpath(os.path.normpath(os.path.join(d, m.group(1))), root))
        edges[rel] = incs
@functools.lru_cache(None)
def depth(h):
    return 1 + max((depth(i) for i in edges.get(h, [])), default=0)
mode = sys.argv[2] if len(sys.argv) > 2 else 'table'
order = sorted(edges, key=lambda h: (h.count('/'), h))
if mode == 'table':
    print('| header | floors | includes (polyattn) |\n| --- | --- | --- |')
    for h in order:
        print(f'| `{h}` | {depth(h)} | {", ".join("`"+i+"`" for i in sorted(edges[h])) or "—"} |')
print(f'\nmax floors: {max(depth(h) for h in edges)}')
