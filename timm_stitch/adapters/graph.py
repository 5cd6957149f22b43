"""Splitting a timm model's ``forward_features`` into embedding -> units -> finish, from its own code.

:func:`split_forward_features` traces ``forward_features`` with ``torch.fx``, treating every block (and every
module that holds no block) as one call, so only the model's own glue code (stem calls, position embeddings,
reshapes, downsamples, final norms) is traced. A *cut* may follow a block only where its output is the one value
the rest of the graph needs from before it; the graph between two cuts becomes one unit. The pieces share the
model's modules and parameters (they are views, never registered in a model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx, nn

from .._modes import eval_mode
from .._timm_compat import get_notrace_functions, get_notrace_modules

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
    if not names:  # feature_info names modules the model does not have (MViT v2's 'block.i'): timm's usual names
        names = next(([f'{a}.{c}' for c, _ in modules[a].named_children()] for a in ('stages', 'layers', 'blocks')
                      if isinstance(modules.get(a), (nn.Sequential, nn.ModuleList))), [])
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
    #: each unit's output shape on the probe (batch dim left out)
    unit_shapes: tuple[torch.Size, ...]
    #: sizes taken at the probe's image size cross a cut: the pieces take only that input size
    fixed_size: bool


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.BatchNorm1d, nn.modules.batchnorm._NormBase)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or 'norm' in type(module).__name__.lower()


def _trace(root: _ForwardFeatures, names: Sequence[str]) -> fx.Graph:
    spine = {id(root)}
    modules = dict(root.named_modules())
    for name in names:
        parts = name.split('.')
        spine.update(id(modules['.'.join(parts[:i])]) for i in range(1, len(parts)))
    try:
        return _SpineTracer(spine).trace(root)
    except Exception as e:  # noqa: BLE001 - any tracing failure means the generic split does not apply
        raise TypeError(f'its forward_features cannot be traced ({type(e).__name__}: {str(e)[:200]})') from e


def _run_recording(root: nn.Module, graph: fx.Graph, x: torch.Tensor) -> dict[fx.Node, Any]:
    """Every node's value when the graph runs on ``x``."""
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            values[n] = super().run_node(n)
            return values[n]

    with torch.no_grad():
        Recorder(fx.GraphModule(root, graph)).run(x)
    return values


def _with_batch(template: Any, batch_at: tuple, x: torch.Tensor) -> Any:
    """``template`` (a size, a tuple of ints or an int) with the entries at ``batch_at`` set to ``x``'s batch size."""
    if not isinstance(template, (tuple, list)):
        return x.shape[0] if batch_at else template
    values = [x.shape[0] if i in batch_at else v for i, v in enumerate(template)]
    return type(template)(values) if isinstance(template, torch.Size) else tuple(values)


def _bakeable(one: Any, two: Any) -> Optional[tuple[Any, tuple]]:
    """For a non-tensor value seen at batch 1 (``one``) and batch 2 (``two``): the template and the positions that
    are the batch size, or None when it depends on the batch in another way (or is a tensor)."""
    if isinstance(one, bool) or isinstance(two, torch.Tensor) or isinstance(one, torch.Tensor):
        return None
    if isinstance(one, int) and isinstance(two, int):
        return (one, ()) if one == two else ((one, (0,)) if (one, two) == (1, 2) else None)
    if isinstance(one, (tuple, list)) and isinstance(two, (tuple, list)) and len(one) == len(two):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (*one, *two)):
            return None
        batch = tuple(i for i, (a, b) in enumerate(zip(one, two)) if a != b)
        return (one, batch) if all((one[i], two[i]) == (1, 2) for i in batch) else None
    return (one, ()) if isinstance(one, (float, str, type(None))) and one == two else None


def split_forward_features(model: nn.Module, blocks: Sequence[tuple[str, nn.Module]],
                           probe: Callable[[int], torch.Tensor]) -> GraphSplit:
    """Trace ``model.forward_features`` and cut it after blocks (see the module docstring); ``probe(n)`` is an input
    batch of ``n`` images of the model's size.

    Values other than the activation may cross a cut when they can be rebuilt there: tensors computed from
    parameters alone are recomputed, and sizes (ints, tuples) are taken at the probe's image size with the batch
    size read from the activation (the split then fixes the input size: :attr:`GraphSplit.fixed_size`).
    Raises ``TypeError`` when the code cannot be traced, a block is not called exactly once in order, or no cut
    leaves the activation alone between the embedding, the blocks and the finish.
    """
    if not blocks:
        raise TypeError('no blocks found from its feature_info')
    root = _ForwardFeatures(model)
    names = [f'model.{n}' for n, _ in blocks]
    graph = _trace(root, names)
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    calls = [n for n in nodes if n.op == 'call_module' and n.target in set(names)]
    if [n.target for n in calls] != names:
        raise TypeError('its forward_features does not call each block once, in order')
    first = calls[0]
    if not first.args or not isinstance(first.args[0], fx.Node):
        raise TypeError('its first block takes no activation')
    with eval_mode(model):
        one, two = (_run_recording(root, graph, probe(n)) for n in (1, 2))
    on_input = _input_dependent(nodes)
    candidates = [first.args[0]] + sorted(set(calls) | _stage_ends(nodes, names, pos[first]), key=pos.get)
    reads_after: dict[fx.Node, int] = {}
    for n in nodes:
        for m in n.all_input_nodes:
            reads_after[m] = max(reads_after.get(m, -1), pos[n])
    carried_ok, valid = {}, []
    for c in candidates:  # a cut at c: nodes after it may read c, parameters, and values that can be rebuilt
        p, ok = pos[c], isinstance(two.get(c), torch.Tensor)
        for m in nodes[:p + 1]:
            if m is c or m.op == 'get_attr' or reads_after.get(m, -1) <= p:
                continue
            if m not in on_input:
                carried_ok[m] = 'recompute'
            elif (baked := _bakeable(one[m], two[m])) is not None:
                carried_ok[m] = baked
            else:
                ok = False
        valid.append(ok)
    # blocks before the first valid cut run in the embedding, blocks after the last one in the finish
    cuts: list[fx.Node] = []
    for c, ok in zip(candidates, valid):  # each unit runs at least one block (a stem's pool joins the next unit)
        if ok and (not cuts or any(pos[cuts[-1]] < pos[b] <= pos[c] for b in calls)):
            cuts.append(c)
    if len(cuts) < 3:
        raise TypeError(f'its blocks read values from the embedding or earlier blocks other than the activation and '
                        f'sizes: {max(len(cuts) - 1, 0)} of {len(calls)} block boundaries carry the activation alone '
                        '(two are needed)')
    output = next(n for n in nodes if n.op == 'output')
    modules = dict(root.named_modules())
    pieces = _Pieces(root, nodes, carried_ok)
    units = [pieces.make(a, b) for a, b in zip(cuts, cuts[1:])]
    return GraphSplit(
        embed=pieces.make(None, cuts[0]), units=tuple(units), finish=pieces.make(cuts[-1], output.args[0]),
        finish_no_norm=pieces.make(cuts[-1], output.args[0],
                                   skip=lambda n: n.op == 'call_module' and _is_norm(modules[n.target])),
        unit_blocks=tuple(tuple(n.target[len('model.'):] for n in calls if pos[a] < pos[n] <= pos[b])
                          for a, b in zip(cuts, cuts[1:])),
        unit_shapes=tuple(two[c].shape[1:] for c in cuts[1:]), fixed_size=pieces.baked)


def _stage_ends(nodes: list[fx.Node], names: Sequence[str], after: int) -> set[fx.Node]:
    """The last node run inside each module holding blocks (a stage's output, after the glue that follows its
    blocks: CSPNet's merge of the cross-stage partial), from the module stack FX records per node."""
    holders = {'.'.join(n.split('.')[:i]) for n in names for i in range(2, n.count('.') + 1)}
    last: dict[str, fx.Node] = {}
    for i, n in enumerate(nodes):
        if i > after and n.op in ('call_module', 'call_function', 'call_method'):
            for key in n.meta.get('nn_module_stack', {}):
                if key in holders:
                    last[key] = n
    return set(last.values())


def _input_dependent(nodes: list[fx.Node]) -> set[fx.Node]:
    """The nodes whose value depends on the graph's input."""
    dependent: set[fx.Node] = set()
    for n in nodes:
        if n.op == 'placeholder' or any(m in dependent for m in n.all_input_nodes):
            dependent.add(n)
    return dependent


def _in_place(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``n`` writes its first input (``relu_``, ``x.add_(...)``, ``nn.ReLU(inplace=True)``...)."""
    if n.op == 'call_module':
        return getattr(modules[n.target], 'inplace', False) is True
    if n.op == 'call_method':
        return n.target.endswith('_') and not n.target.endswith('__')
    if n.op == 'call_function':
        name = getattr(n.target, '__name__', '')
        return n.kwargs.get('inplace') is True or (name.endswith('_') and not name.endswith('__'))
    return False


def _clone_if_written(graph: fx.Graph, x: fx.Node, modules: dict[str, nn.Module]) -> None:
    """Make a piece copy its input before an op writes it in place: a route's activation may feed several
    continuations (shared prefixes of mixed-route batches) and the stitching layer's backward."""
    if not any(u.args and u.args[0] is x and _in_place(u, modules) for u in x.users):
        return
    with graph.inserting_after(x):
        copy = graph.call_method('clone', (x,))
    x.replace_all_uses_with(copy, delete_user_cb=lambda u: u is not copy)


class _Pieces:
    """Builds the pieces of a traced graph as modules of one input and one output."""

    def __init__(self, root: nn.Module, nodes: list[fx.Node], carried: dict[fx.Node, Any]):
        self.root, self.nodes, self.carried = root, nodes, carried
        self.modules = dict(root.named_modules())
        self.baked = False

    def make(self, start: Optional[fx.Node], end: fx.Node,
             skip: Optional[Callable[[fx.Node], bool]] = None) -> fx.GraphModule:
        """The nodes after ``start`` (None: the graph's input) up to ``end``; ``skip(node)`` passes a node's first
        input through instead of running it."""
        nodes = self.nodes
        graph = fx.Graph()
        begin = next(n for n in nodes if n.op == 'placeholder') if start is None else start
        x = graph.placeholder('x')
        env: dict[fx.Node, fx.Node] = {begin: x}

        def read(m: fx.Node) -> fx.Node:
            if m in env:
                return env[m]
            how = self.carried.get(m)
            if m.op == 'get_attr':
                env[m] = graph.get_attr(m.target)
            elif how == 'recompute':  # computed from parameters alone: run it again here
                env[m] = graph.node_copy(m, read)
            elif how is not None:  # a size: the probe's, with the batch size read from the activation
                self.baked = True
                template, batch_at = how
                env[m] = graph.call_function(_with_batch, (template, batch_at, x))
            else:
                raise AssertionError(f'{m} is carried across a cut')
            return env[m]

        for n in nodes[nodes.index(begin) + 1:nodes.index(end) + 1]:
            if n.op in ('placeholder', 'output'):
                continue
            env[n] = read(n.args[0]) if skip is not None and skip(n) else graph.node_copy(n, read)
        graph.output(read(end))
        if start is not None:
            _clone_if_written(graph, x, self.modules)
        piece = fx.GraphModule(self.root, graph, class_name=type(self.root.model).__name__ + 'Piece')
        piece.graph.eliminate_dead_code()
        piece.recompile()
        return piece
