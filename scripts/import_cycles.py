"""Check that fasterai's modules import one another without a cycle (module-level imports; an import inside a
function, such as the lazy `SparsifyCallback` of fasterai.sparsifier, is left out) and print the layers.

Run: `.venv/bin/python scripts/import_cycles.py` (exit 1 on a cycle)
"""
import ast
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / 'fasterai'


def imports(path):
    "The fasterai modules `path` imports at module level."
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.add(node.module or '__init__')
        elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('fasterai.'):
            out.add(node.module.split('.', 1)[1])
    return out


def main():
    deps = {p.stem: imports(p) - {p.stem} for p in PKG.glob('*.py')}
    try:
        order = list(TopologicalSorter(deps).static_order())
    except CycleError as e:
        sys.exit(f'import cycle: {" -> ".join(e.args[1])}')
    print('no import cycle; modules in dependency order:', ', '.join(order))


if __name__ == '__main__':
    main()
