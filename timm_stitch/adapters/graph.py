"""Splitting a timm model's ``forward_features`` into embedding -> units -> finish, from its own code.

:func:`split_forward_features` traces ``forward_features`` with ``torch.fx``, treating every block (and every
module that holds no block) as one call, so only the model's own glue code (stem calls, position embeddings,
reshapes, downsamples, final norms) is traced. A *cut* may follow a block only where its output is the one value
the rest of the graph needs from before it; the graph between two cuts becomes one unit. The pieces share the
model's modules and parameters (they are views, never registered in a model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import fx, nn

try:  # timm >= 1.0.10 keeps these in timm.layers
    from timm.layers._fx import get_notrace_functions, get_notrace_modules
except ImportError:  # pragma: no cover - older timm
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules

__all__ = ['GraphSplit', 'split_forward_features', 'block_modules']


class _ForwardFeatures(nn.Module):
    """``model.forward_features`` as a module's ``forward``, so that FX traces it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class _SpineTracer(fx.Tracer):
    """Traces only the modules that hold blocks; everything else (blocks included) is a single call."""

    def __init__(self, spine: set[int]):
        notrace = tuple(get_notrace_modules())
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self._spine, self._notrace = spine, notrace

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) not in self._spine or isinstance(m, self._notrace)


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _repeats(stage: nn.Module) -> bool:
    """Whether a stage's children are repeated blocks (two or more, one class; RegNet's ``b1``, ``b2``...)."""
    children = [m for m in stage.children() if _has_parameters(m)]
    return len(children) > 1 and len({type(m) for m in stage.children()}) == 1


def block_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks of ``model`` in order, found from its ``feature_info``: the stage modules it names (with their
    siblings in the same container: stages timm leaves out of ``feature_info``), each split into its ``blocks``
    (or its children when it is a ``Sequential``/``ModuleList`` or holds only repeated blocks)."""
    info = getattr(model, 'feature_info', None)
    if not info:
        return []
    names = [i['module'] for i in (info.get_dicts() if hasattr(info, 'get_dicts') else info)]
    modules = dict(model.named_modules())
    names = [n for n in names if n in modules]
    parents = {n.rpartition('.')[0] for n in names}
    if len(parents) == 1 and next(iter(parents)):
        parent = next(iter(parents))
        names = [f'{parent}.{child}' for child, _ in modules[parent].named_children()]
    blocks: list[tuple[str, nn.Module]] = []
    for name in names:
        stage = modules[name]
        inner = getattr(stage, 'blocks', None)
        if isinstance(inner, (nn.Sequential, nn.ModuleList)) and len(inner):
            children = [(f'{name}.blocks.{c}', m) for c, m in inner.named_children()]
        elif isinstance(stage, (nn.Sequential, nn.ModuleList)) or _repeats(stage):
            children = [(f'{name}.{c}', m) for c, m in stage.named_children()]
        else:
            children = [(name, stage)]
        blocks.extend((n, m) for n, m in children if _has_parameters(m))
    return blocks


@dataclass
class GraphSplit:
    """``forward_features`` of a model as ``finish(units[-1](...units[0](embed(x))))``."""
    embed: fx.GraphModule
    units: tuple[fx.GraphModule, ...]
    finish: fx.GraphModule
    #: the finish without its norm layers (``final_norm=False``)
    finish_no_norm: fx.GraphModule
    #: names of the blocks each unit runs
    unit_blocks: tuple[tuple[str, ...], ...]


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.BatchNorm1d, nn.modules.batchnorm._NormBase)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or 'norm' in type(module).__name__.lower()


def split_forward_features(model: nn.Module, blocks: Sequence[tuple[str, nn.Module]]) -> GraphSplit:
    """Trace ``model.forward_features`` and cut it after blocks (see the module docstring).

    Raises ``TypeError`` when the code cannot be traced, a block is not called exactly once in order, or no cut
    leaves a single activation between the embedding, the blocks and the finish.
    """
    if not blocks:
        raise TypeError('no blocks found from its feature_info')
    root = _ForwardFeatures(model)
    names = [f'model.{n}' for n, _ in blocks]
    spine = {id(root)}
    modules = dict(root.named_modules())
    for name in names:
        parts = name.split('.')
        spine.update(id(modules['.'.join(parts[:i])]) for i in range(1, len(parts)))
    try:
        graph = _SpineTracer(spine).trace(root)
    except Exception as e:  # noqa: BLE001 - any tracing failure means the generic split does not apply
        raise TypeError(f'its forward_features cannot be traced ({type(e).__name__}: {str(e)[:200]})') from e
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    calls = [n for n in nodes if n.op == 'call_module' and n.target in set(names)]
    if [n.target for n in calls] != names:
        raise TypeError('its forward_features does not call each block once, in order')
    first = calls[0]
    if not first.args or not isinstance(first.args[0], fx.Node):
        raise TypeError('its first block takes no activation')
    candidates = [first.args[0]] + calls
    # the latest position before which a node is read by a later node: a cut at c is valid when nothing after c
    # reads a node before or at c other than c itself (parameters read with get_attr are re-read, not carried)
    reads_after: dict[fx.Node, int] = {}
    for n in nodes:
        for m in n.all_input_nodes:
            reads_after[m] = max(reads_after.get(m, -1), pos[n])
    valid = []
    for c in candidates:
        p = pos[c]
        carried = [m for m in nodes[:p + 1] if m is not c and m.op != 'get_attr' and reads_after.get(m, -1) > p]
        valid.append(not carried)
    if not valid[0]:
        raise TypeError('its blocks read values from the embedding other than the activation (e.g. the grid size)')
    if not valid[-1]:
        raise TypeError('its finish reads values from before the last block other than the activation')
    cuts = [c for c, ok in zip(candidates, valid) if ok]
    if len(cuts) < 3:
        raise TypeError('no block boundary carries the activation alone')
    output = next(n for n in nodes if n.op == 'output')
    embed = _subgraph(root, nodes, None, cuts[0])
    units, unit_blocks = [], []
    for a, b in zip(cuts, cuts[1:]):
        units.append(_subgraph(root, nodes, a, b))
        unit_blocks.append(tuple(n.target[len('model.'):] for n in calls if pos[a] < pos[n] <= pos[b]))
    finish = _subgraph(root, nodes, cuts[-1], output.args[0])
    finish_no_norm = _subgraph(root, nodes, cuts[-1], output.args[0],
                               skip=lambda n: n.op == 'call_module' and _is_norm(modules[n.target]))
    return GraphSplit(embed, tuple(units), finish, finish_no_norm, tuple(unit_blocks))


def _subgraph(root: nn.Module, nodes: list[fx.Node], start: Optional[fx.Node], end: fx.Node,
              skip=None) -> fx.GraphModule:
    """The nodes after ``start`` (None: the graph's input) up to ``end`` as a module of one input and one output;
    ``skip(node)`` passes a node's first input through instead of running it."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    begin = 0
    if start is None:
        placeholder = next(n for n in nodes if n.op == 'placeholder')
        env[placeholder] = graph.placeholder('x')
        begin = nodes.index(placeholder) + 1
    else:
        env[start] = graph.placeholder('x')
        begin = nodes.index(start) + 1

    def read(m: fx.Node) -> fx.Node:
        if m not in env:  # a parameter or buffer read before this piece
            assert m.op == 'get_attr', f'{m} is carried across a cut'
            env[m] = graph.get_attr(m.target)
        return env[m]

    for n in nodes[begin:nodes.index(end) + 1]:
        if n.op in ('placeholder', 'output'):
            continue
        if skip is not None and skip(n):
            env[n] = read(n.args[0])
            continue
        env[n] = graph.node_copy(n, read)
    graph.output(read(end))
    piece = fx.GraphModule(root, graph, class_name=type(root.model).__name__ + 'Piece')
    piece.graph.eliminate_dead_code()
    piece.recompile()
    return piece
