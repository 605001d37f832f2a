"""Channel groups of a model, traced with torch.fx: the slices of layers that live and die together.

A *group* is a set of tensor channels that must be removed together: the output rows of the layers that
write them, the per-channel norms on the way, and the input columns of every layer that reads them.
The Sparsifier (at 'filter' granularity) zeroes whole groups and the Pruner removes their all-zero
channels, so both read the same `ChannelGraph` and sparse == pruned holds by construction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .errors import TraceError, UnsupportedOperationError
from .ops import FUNCTION_RULES, METHOD_RULES, MODULE_RULES, Layout

__all__ = ['Slice', 'Group', 'ChannelGraph', 'trace']


@dataclass(frozen=True)
class Slice:
    """Group channels [start, start+length) seen as channels [offset, offset+length) of one module role."""
    module: str      # qualified name of the module
    role: str        # 'out': weight rows and bias; 'norm': per-channel affine and stats; 'in': input columns
    offset: int      # first channel on the module's side
    start: int       # first channel on the group's side
    length: int
    block: int = 1   # input features per channel ('in' of a Linear reading a flattened map: H*W)


@dataclass
class Group:
    """Channels that live or die together, with every layer slice that writes, normalises or reads them."""
    id: int
    size: int
    slices: list = field(default_factory=list)
    frozen: list = field(default_factory=list)   # reasons this group may not be pruned; empty when prunable

    def by_role(self, role):
        "The slices of this group with `role` ('out', 'norm' or 'in')."
        return [s for s in self.slices if s.role == role]

    @property
    def prunable(self):
        "True when nothing freezes the group and some layer writes it."
        return not self.frozen and bool(self.by_role('out'))

    def __repr__(self):
        def fmt(s):
            rng = f'[{s.offset}:{s.offset + s.length}]'
            return f'{s.module}.{s.role}{rng}' + (f'x{s.block}' if s.block != 1 else '')
        state = 'frozen: ' + '; '.join(self.frozen) if self.frozen else 'prunable'
        return f'Group {self.id} ({self.size} ch, {state}): ' + ', '.join(fmt(s) for s in self.slices)


@dataclass
class ChannelGraph:
    """The channel groups of a model, as traced by `trace`."""
    model: nn.Module
    groups: list
    input_shape: tuple

    def modules(self):
        "Qualified name -> module, for every module the groups name."
        names = {s.module for g in self.groups for s in g.slices}
        return {n: self.model.get_submodule(n) for n in sorted(names)}

    def __repr__(self):
        head = f'ChannelGraph of {type(self.model).__name__}: {len(self.groups)} groups, ' \
               f'{sum(g.prunable for g in self.groups)} prunable'
        return '\n'.join([head] + [f'  {g}' for g in self.groups])


class _Spaces:
    """Union-find over channel spaces; each space collects its slices and freeze reasons."""
    def __init__(self):
        self.parent, self.size, self.slices, self.frozen = [], [], [], []

    def new(self, n):
        self.parent.append(len(self.parent)); self.size.append(n); self.slices.append([]); self.frozen.append([])
        return len(self.parent) - 1

    def find(self, s):
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def unite(self, a, b):
        a, b = self.find(a), self.find(b)
        if a == b: return a
        if self.size[a] != self.size[b]: raise AssertionError('united spaces must have equal sizes')
        self.parent[b] = a
        self.slices[a] += self.slices[b]; self.frozen[a] += self.frozen[b]
        return a

    def add_slices(self, layout, module, role):
        "Record that `module` sees `layout`'s channels as its own channels 0.. in order (its `role`)."
        offset = 0
        for space, start, stop in layout.pieces:
            self.slices[self.find(space)].append(Slice(module, role, offset, start, stop - start, layout.block))
            offset += stop - start

    def freeze(self, layout, reason):
        for space, _, _ in layout.pieces:
            reasons = self.frozen[self.find(space)]
            if reason not in reasons: reasons.append(reason)

    def groups(self):
        roots = sorted({self.find(s) for s in range(len(self.parent))})
        return [Group(i, self.size[r], self.slices[r], self.frozen[r]) for i, r in enumerate(roots)]


def _check_hooks(model):
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            raise TraceError(f"module '{name or type(model).__name__}' has forward hooks; torch.fx does not run "
                             "hooks, so its traced graph would not be the model's real computation. Remove the "
                             "hooks (or prune the model without them) before tracing.")


def _symbolic_trace(model):
    try:
        return fx.symbolic_trace(model)
    except Exception as e:
        raise TraceError(f'torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: {e}. Control flow '
                         'that depends on tensor values cannot be traced; move it into a submodule of a type '
                         'the tracer keeps as a leaf, or rewrite it without data-dependent branches.') from e


class _MetaShapeProp(ShapeProp):
    "Shape propagation on meta tensors: no weights are read and no arithmetic is done."
    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        state = {k: torch.empty_like(v, device='meta') for k, v in (*m.named_parameters(), *m.named_buffers())}
        return torch.func.functional_call(m, state, args, kwargs)

    def get_attr(self, target, args, kwargs):
        v = super().get_attr(target, args, kwargs)
        return torch.empty_like(v, device='meta') if isinstance(v, torch.Tensor) else v


def _default_input_shape(model):
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if isinstance(first, nn.Conv2d): return (2, first.in_channels, 224, 224)
    if isinstance(first, nn.Linear): return (2, first.in_features)
    raise TraceError(f'cannot guess the input shape of {type(model).__name__}: pass example_input')


def _propagate_shapes(gm, model, example_input):
    shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else example_input
    shape = tuple(shape) if shape is not None else _default_input_shape(model)
    dtype = example_input.dtype if isinstance(example_input, torch.Tensor) else torch.float32
    was_training = model.training
    model.eval(); gm.eval()
    try:
        try:
            _MetaShapeProp(gm).propagate(torch.empty(shape, dtype=dtype, device='meta'))
        except Exception:   # code that builds real tensors in forward cannot mix with meta: run it for real
            p = next(model.parameters(), None)
            with torch.no_grad():
                ShapeProp(gm).propagate(torch.zeros(shape, dtype=dtype, device=p.device if p is not None else 'cpu'))
    except Exception as e:
        hint = '' if example_input is not None else ' (the shape was guessed: pass example_input)'
        raise TraceError(f'running {type(model).__name__} on an input of shape {shape} failed{hint}: {e}') from e
    finally:
        model.train(was_training)
    return shape


def trace(model, example_input=None):
    """Trace `model` with torch.fx and return its `ChannelGraph`.

    `example_input`: a tensor or a shape, batch included (shapes come from meta tensors, no compute);
    when None, (2, C, 224, 224) or (2, F) is guessed from the first Conv2d or Linear.
    """
    _check_hooks(model)
    gm = _symbolic_trace(model)
    shape = _propagate_shapes(gm, model, example_input)
    spaces, env, owner = _Spaces(), {}, {}
    ctx = _Context(gm, spaces, env, owner)
    for node in gm.graph.nodes:
        env[node] = ctx.visit(node)
    return ChannelGraph(model, spaces.groups(), shape)


def _meta(node):
    tm = node.meta.get('tensor_meta')
    return tm if isinstance(tm, TensorMetadata) else None


class _Context:
    """What a rule sees of the trace: the node, its inputs' layouts, and ways to create and record spaces."""
    def __init__(self, gm, spaces, env, owner):
        self.gm, self.spaces, self.env, self.owner = gm, spaces, env, owner

    def visit(self, node):
        if node.op in ('placeholder', 'get_attr'): return None
        if node.op == 'output':
            for lay in self.tracked(node.args):
                self.spaces.freeze(lay, 'reaches the model output')
            return None
        rule, what = self.rule(node)
        if rule is None:
            if not self.tracked((node.args, node.kwargs)): return None
            raise UnsupportedOperationError(f"{what} at node '{node.name}' reads channels the pruner tracks, "
                                            'and the channel graph does not handle it yet')
        return rule(self, node)

    def rule(self, node):
        if node.op == 'call_module':
            m = self.gm.get_submodule(node.target)
            return MODULE_RULES.get(type(m)), f"module '{node.target}' ({type(m).__name__})"
        if node.op == 'call_method':
            return METHOD_RULES.get(node.target), f"method '.{node.target}()'"
        name = getattr(node.target, '__name__', str(node.target))
        return FUNCTION_RULES.get(node.target), f"function '{name}'"

    def tracked(self, args):
        "Every input layout (not None) found in nested `args`."
        out = []
        fx.node.map_arg(args, lambda n: out.append(self.env.get(n)) if self.env.get(n) is not None else None)
        return out

    # helpers for rules
    def module(self, node): return self.gm.get_submodule(node.target)
    def layout(self, node, i=0): return self.env.get(node.args[i]) if len(node.args) > i else None
    def shape(self, node): return _meta(node).shape if _meta(node) is not None else None

    def new_space(self, node, n, dim):
        space = self.spaces.new(n)
        return Layout(dim, ((space, 0, n),))

    def record(self, layout, node, role):
        "Record `layout`'s channels as the `role` channels of the module called at `node`."
        key = (node.target, role)
        first = self.owner.setdefault(key, layout)
        if first is layout:
            self.spaces.add_slices(layout, node.target, role)
            return
        # a module called twice: channel i of both calls is the same weight row or column, so they unite
        whole = lambda lay: all(a == 0 and b == self.spaces.size[s] for s, a, b in lay.pieces)
        if len(first.pieces) != len(layout.pieces) or first.block != layout.block or not (whole(first) and whole(layout)):
            raise UnsupportedOperationError(f"module '{node.target}' is called twice on channels laid out "
                                            'differently; the channel graph cannot couple them')
        for (a, _, _), (b, _, _) in zip(first.pieces, layout.pieces):
            if self.spaces.size[a] != self.spaces.size[b]:
                raise UnsupportedOperationError(f"module '{node.target}' is called twice on channels laid out "
                                                'differently; the channel graph cannot couple them')
            self.spaces.unite(a, b)

    def freeze(self, layout, reason): self.spaces.freeze(layout, reason)
