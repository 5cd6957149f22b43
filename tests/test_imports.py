"""The package's structure stays simple: no import cycle between its modules and no module over 500 lines.

Only imports that run when a module is imported count: ``if TYPE_CHECKING:`` blocks and imports inside functions
are skipped (a method importing a module lazily to delegate to it is not a cycle).
"""
from __future__ import annotations

import ast
from pathlib import Path

import timm_stitch

PACKAGE = Path(timm_stitch.__file__).parent
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = ('timm_stitch',) + path.relative_to(PACKAGE).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or (
        isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING')


def _top_level_imports(tree: ast.Module) -> list[ast.stmt]:
    """Import statements run at import time: module level, also inside ``try``/``if`` (not ``TYPE_CHECKING``)."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return found


def _imports(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports at import time (a ``from pkg import sub`` counts ``pkg.sub``)."""
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    targets = set()
    for node in _top_level_imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
            continue
        base = package
        for _ in range(node.level - 1):
            base = base.rpartition('.')[0]
        source = (f'{base}.{node.module}' if node.module else base) if node.level else node.module
        targets.add(source)
        targets |= {f'{source}.{alias.name}' for alias in node.names}
    return {t for t in targets if t in MODULES and t != name}


def _find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as a list of modules, or [] when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_import_graph_has_no_cycle():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    assert graph['timm_stitch.model'] >= {'timm_stitch.adapters', 'timm_stitch.routes'}  # the parser sees imports
    cycle = _find_cycle(graph)
    assert not cycle, 'import cycle: ' + ' -> '.join(cycle)


def test_cycle_finder_reports_a_cycle():
    assert _find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert _find_cycle({'a': {'b'}, 'b': set()}) == []


def test_model_does_not_import_cards_profile_or_selection():
    """The model runs routes; card annotation, latency profiles and selection import the model, not the reverse."""
    imported = _imports('timm_stitch.model', MODULES['timm_stitch.model'])
    assert not imported & {f'timm_stitch.{m}' for m in ('cards', 'profile', 'selection', 'macs', 'export', 'ls_init')}


def test_no_module_over_500_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert not {n: s for n, s in sizes.items() if s > MAX_LINES}
