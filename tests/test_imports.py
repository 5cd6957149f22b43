"""The package's structure stays simple: no import cycle between its modules, the model below everything that
reads or serves it, and no module over 500 lines.

Every import counts, also inside functions (a method importing a module lazily to delegate to it depends on it just
the same); only ``if TYPE_CHECKING:`` blocks, which never run, are skipped. Importing ``a.b.c`` also runs the
``__init__`` of ``a.b`` (unless the importer lives inside ``a.b`` already), so that counts as importing ``a.b``.
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


def _all_imports(tree: ast.Module) -> list[ast.stmt]:
    """Every import statement, at module level or inside functions, classes, ``try`` and ``if`` blocks, except those
    under ``if TYPE_CHECKING:``."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node):
            todo += node.orelse
        else:
            todo += [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]
    return found


def _with_packages(target: str, importer: str) -> set[str]:
    """``target`` and the packages above it whose ``__init__`` importing it runs (those not above ``importer``)."""
    parts = target.split('.')
    return {'.'.join(parts[:n]) for n in range(1, len(parts) + 1)
            if not importer.startswith('.'.join(parts[:n]) + '.')}


def _imports(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports (a ``from pkg import sub`` of a submodule counts ``pkg.sub``, of a name
    defined in ``pkg`` counts ``pkg``)."""
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    targets = set()
    for node in _all_imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
            continue
        base = package
        for _ in range(node.level - 1):
            base = base.rpartition('.')[0]
        source = (f'{base}.{node.module}' if node.module else base) if node.level else node.module
        for alias in node.names:
            targets.add(f'{source}.{alias.name}' if f'{source}.{alias.name}' in MODULES else source)
    found = set().union(*(_with_packages(t, name) for t in targets if t in MODULES)) if targets else set()
    return {t for t in found if t in MODULES and t != name}


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


def _reached(graph: dict[str, set[str]], start: str) -> set[str]:
    """The modules ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_import_graph_has_no_cycle():
    assert GRAPH['timm_stitch.model'] >= {'timm_stitch.adapters', 'timm_stitch.routes'}  # the parser sees imports
    assert 'timm_stitch.features' in GRAPH['timm_stitch.model']  # ... also inside methods
    assert _with_packages('timm_stitch.models._release', 'timm_stitch.model') == {  # ... and the packages they run
        'timm_stitch.models', 'timm_stitch.models._release'}
    cycle = _find_cycle(GRAPH)
    assert not cycle, 'import cycle: ' + ' -> '.join(cycle)


def test_cycle_finder_reports_a_cycle():
    assert _find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert _find_cycle({'a': {'b'}, 'b': set()}) == []


def test_parser_counts_imports_in_functions_not_type_checking():
    tree = ast.parse('import a\nif TYPE_CHECKING:\n    import b\ndef f():\n    import c\n'
                     'class K:\n    def m(self):\n        from d import e\n')
    assert sorted(n.names[0].name if isinstance(n, ast.Import) else n.module for n in _all_imports(tree)) == \
        ['a', 'c', 'd']


def test_model_imports_nothing_above_it():
    """The model runs routes; cards, selection, serving, export... may import it, nothing it imports does."""
    above = {name for name in GRAPH if 'timm_stitch.model' in _reached(GRAPH, name)}
    assert not _reached(GRAPH, 'timm_stitch.model') & (above | {'timm_stitch.model'})
    assert {'timm_stitch.builder', 'timm_stitch.models', 'timm_stitch.models._factory'} <= above  # seen


def test_no_module_over_500_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert not {n: s for n, s in sizes.items() if s > MAX_LINES}
