"""Channel groups of a model, traced with torch.fx: the slices of layers that live and die together.

A *group* is a set of tensor channels that must be removed together: the output rows of the layers that
write them, the per-channel norms on the way, and the input columns of every layer that reads them.
The Sparsifier (at 'filter' granularity) zeroes whole groups and the Pruner removes their all-zero
channels, so both read the same `ChannelGraph` and sparse == pruned holds by construction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

from .tracing import (MODES, Leaves, buffers_kept, check_example_input, check_model, hooks_taken_out, input_shape,
                      input_specs, propagate_shapes, seeded, state_kept, symbolic_trace, training_mode)
from .layers import known_base, kind_of
from .ops import (COUNT_RULES, FUNCTION_RULES, METHOD_RULES, MODULE_RULES, ROUTE_RULES, Count, Layout, Piece, SizeOf,
                  Unhandled, is_inplace, keep, permute, reshape, settle, unite)
from .routing import Cat, Cluster, Leaf, Parts, route_of

__all__ = ['Slice', 'Group', 'ChannelGraph', 'trace']


@dataclass(frozen=True)
class Slice:
    """Group channels [start, start+length) seen as channels [offset, offset+length) of one module role."""
    module: str      # qualified name of the module
    role: str        # 'out': weight rows and bias; 'norm': per-channel affine and stats; 'dw': a depthwise
                     # conv's rows and bias (its input and output channels are these channels); 'in': input columns
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
    tie: int = 1     # channels u, u+K, u+2K, ... (K = size/tie) live or die together (grouped convolutions)
    width: int = 1   # ... and so do runs of `width` consecutive channels in each block (an attention head)
    route: int = None   # index of the `routing.Cluster` (in `ChannelGraph.routes`) a channel shuffle puts it in

    @property
    def units(self):
        """How many units the group can lose: each unit is `width` consecutive channels in each of its `tie` blocks
        (one channel per block for a grouped conv's channels, a head's q, k and v rows for attention)."""
        return self.size // (self.tie * self.width)

    def channels(self, units):
        "Per-channel vector from a per-unit one (unit u is channels [u*width, (u+1)*width) of each block)."
        return units.repeat_interleave(self.width).repeat(self.tie)

    def per_unit(self, channels, how):
        "Per-unit vector from a per-channel one, reduced over each unit's channels: 'sum', 'any' or 'all'."
        v = channels.view(self.tie, self.units, self.width)
        return getattr(getattr(v, how)(2), how)(0)

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
        tie = (f' tied in {self.tie} blocks' if self.tie != 1 else '') + (f' in runs of {self.width}' if self.width != 1 else '')
        return f'Group {self.id} ({self.size} ch{tie}, {state}): ' + ', '.join(fmt(s) for s in self.slices)


@dataclass
class ChannelGraph:
    """The channel groups of a model, as traced by `trace`."""
    model: nn.Module
    groups: list
    input_shape: tuple
    unfollowed: dict = field(default_factory=dict)   # module name -> why a call of it could not be followed
    branches: list = field(default_factory=list)     # Python branches on shapes, as the example's shapes took them
    routes: list = field(default_factory=list)       # `routing.Cluster`s: groups a channel shuffle lays out

    def modules(self):
        "Qualified name -> module, for every module the groups name."
        names = {s.module for g in self.groups for s in g.slices}
        return {n: self.model.get_submodule(n) for n in sorted(names)}

    def __repr__(self):
        head = f'ChannelGraph of {type(self.model).__name__}: {len(self.groups)} groups, ' \
               f'{sum(g.prunable for g in self.groups)} prunable'
        lines = [head] + [f'  {g}' for g in self.groups]
        return '\n'.join(lines + [f'  not followed: {r}' for r in self.unfollowed.values()] +
                         [f'  branch on shapes: {b}' for b in self.branches])


class _Spaces:
    """Union-find over channel spaces; each space collects its slices and freeze reasons."""
    def __init__(self):
        self.parent, self.size, self.slices, self.frozen, self.tie, self.width = [], [], [], [], [], []

    def new(self, n):
        self.parent.append(len(self.parent)); self.size.append(n); self.slices.append([]); self.frozen.append([])
        self.tie.append(1); self.width.append(1)
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
        self.tie_space(a, self.tie[b], 'are united with channels tied in other blocks')
        self.run_space(a, self.width[b], 'are united with channels that go in runs')
        return a

    def unite_prefix(self, a, b):
        """Make whole space `a`'s channels the first channels of the larger space `b` (the first of the parts of a
        space tied in parts: channel t of `a` lives or dies with channel t of each part)."""
        a, b = self.find(a), self.find(b)
        if a == b: return a
        if not self.size[a] < self.size[b]: raise AssertionError('a prefix must be smaller than its space')
        self.parent[a] = b
        self.slices[b] += self.slices[a]; self.frozen[b] += self.frozen[a]
        if self.tie[a] != 1:   # a's channels t and t + its block are one unit: b's blocks must divide that distance
            step = self.size[a] // self.tie[a]
            self.tie_space(b, self.size[b] // math.gcd(self.size[b], step), 'are united with channels tied in other blocks')
        self.run_space(b, self.width[a], 'are united with channels that go in runs')
        return b

    def tie_space(self, space, blocks, why):
        "Tie the space's channels in `blocks` equal blocks (channel u of each block goes with u of the others)."
        self._unit(space, math.lcm(self.tie[self.find(space)], blocks), self.width[self.find(space)], why)

    def run_space(self, space, width, why):
        "Make the space's channels go in runs of `width` consecutive channels of each block (attention heads)."
        self._unit(space, self.tie[self.find(space)], math.lcm(self.width[self.find(space)], width), why)

    def _unit(self, space, tie, width, why):
        r = self.find(space)
        if self.size[r] % (tie * width):
            self.freeze_space(r, f'{why}: {self.size[r]} channels do not split into {tie} blocks of runs of {width}')
        else:
            self.tie[r], self.width[r] = tie, width

    def add_slices(self, layout, module, role):
        "Record that `module` sees `layout`'s channels as its own channels 0.. in order (its `role`)."
        offset = 0
        for p in layout.pieces:
            self.slices[self.find(p.space)].append(Slice(module, role, offset, p.start, p.stop - p.start, layout.block))
            offset += p.stop - p.start

    def freeze(self, layout, reason):
        for p in layout.pieces: self.freeze_space(p.space, reason)

    def freeze_space(self, space, reason):
        reasons = self.frozen[self.find(space)]
        if reason not in reasons: reasons.append(reason)

    def roots(self): return sorted({self.find(s) for s in range(len(self.parent))})

    def groups(self, routes=()):
        "The groups, one per root; `routes`: clusters of roots (`_clusters`) whose groups they name."
        gid = {r: i for i, r in enumerate(self.roots())}
        of = {gid[r]: c for c, roots in enumerate(routes) for r in roots}
        return [Group(i, self.size[r], self.slices[r], self.frozen[r], self.tie[r], self.width[r], of.get(i))
                for i, r in enumerate(self.roots())]


def _freeze_shared(model, spaces):
    "Groups touching a parameter that another module also holds (tied weights) cannot be sliced alone."
    holders = {}
    for name, m in model.named_modules():
        for p in m.parameters(recurse=False): holders.setdefault(id(p), []).append(name)
    shared = {n: h for h in holders.values() if len(h) > 1 for n in h}
    for r in range(len(spaces.parent)):
        for s in spaces.slices[r]:
            if s.module in shared:
                spaces.freeze_space(r, f"'{s.module}' shares a parameter with '{[h for h in shared[s.module] if h != s.module][0]}'")


def trace(model, example_input=None, leaf_modules=()):
    """Trace `model` with torch.fx and return its `ChannelGraph`.

    `example_input`: a tensor, a tuple of tensors (one per input, any dtype) or a shape, batch included (shapes
    come from meta tensors, no compute); when None, (2, C, 224, 224) or (2, F) is guessed from the first Conv2d
    or Linear. Forward hooks are traced where PyTorch runs them: what a hook only observes leaves nothing in the
    graph, and an output a hook stores for a later module (fastai's `Hook.stored`) is followed to that module.
    The model is traced in eval and in train mode (branches such as auxiliary heads that run only in training are
    covered; an identical second graph is not followed twice); both traces feed one graph, and a model that
    fails to run in either mode on the example input raises TraceError.
    `leaf_modules`: qualified names or types of modules to keep whole (untraceable code, custom layers):
    their inputs and outputs are frozen.
    """
    check_model(model)
    check_example_input(model, example_input)
    leaves = Leaves(leaf_modules)
    names = dict(model.named_modules())
    unknown = sorted(n for n in leaves.names if n not in names)
    if unknown: raise ValueError(f'leaf_modules names modules that {type(model).__name__} does not have: {unknown}')
    shape, specs = input_shape(model, example_input), input_specs(model, example_input)
    spaces, owner, seen, poisoned, opaque, unfollowed, branches = _Spaces(), {}, set(), set(), set(), {}, []
    for training in MODES:   # a branch that runs only in training (an auxiliary head) reads channels too
        with training_mode(model, training), buffers_kept(model), state_kept(model), seeded(model), \
                hooks_taken_out(model) as hooks:
            graph = symbolic_trace(model, leaves, hooks, specs)   # forwards may update buffers; hooks traced
            signature = tuple((n.op, str(n.target), str(n.args), str(n.kwargs)) for n in graph.nodes)
            if signature in seen: continue   # the same graph in both modes: follow it once
            seen.add(signature)
            branches += [b for b in graph.branches if b not in branches]
            propagate_shapes(graph, model, specs, example_input is None)
            ctx = _Context(model, spaces, owner, poisoned, opaque, unfollowed)
            for node in graph.nodes: ctx.env[node] = ctx.visit(node)
    # a module some call could not follow, or that also lives inside a module kept whole, keeps all its channels
    poisoned |= {t for t, _ in owner if id(model.get_submodule(t)) in opaque}
    for (target, role), lay in owner.items():
        if target in poisoned and lay is not None:
            spaces.freeze(lay, f"'{target}' is also called where its channels cannot be followed")
    _freeze_shared(model, spaces)
    roots, clusters = _clusters(spaces, owner)
    return ChannelGraph(model, spaces.groups(roots), shape, unfollowed, branches, clusters)


def _regroup(expr, gid, spaces):
    "`expr` over group ids: each leaf piece a whole group (checked by `_clusters`)."
    if isinstance(expr, Leaf):
        return Leaf(tuple(Piece(gid[spaces.find(p.space)], 0, p.stop - p.start) for p in expr.pieces))
    if isinstance(expr, Cat): return Cat(tuple(_regroup(e, gid, spaces) for e in expr.parts))
    return expr._replace(src=_regroup(expr.src, gid, spaces))


def _leaves(expr):
    if isinstance(expr, Leaf): return list(expr.pieces)
    if isinstance(expr, Cat): return [p for e in expr.parts for p in _leaves(e)]
    return _leaves(expr.src)


def _connected(spaces, lays):
    """The sets of roots a channel shuffle connects: those its routes lay out, with every root any module role that
    sees one of them also sees."""
    parent = {}
    def find(r):
        while parent.setdefault(r, r) != r: r = parent[r]
        return r
    def join(pieces):
        rs = [find(spaces.find(p.space)) for p in pieces]
        for r in rs[1:]: parent[find(r)] = find(rs[0])
    for lay in lays.values():
        if lay.route is not None: join(_leaves(lay.route) + list(lay.pieces))
    seen = set(parent)
    while seen:
        grew = False
        for lay in lays.values():
            rs = {spaces.find(p.space) for p in lay.pieces}
            if not rs & seen: continue
            if len({find(r) for r in rs}) > 1: join(lay.pieces); grew = True
            seen |= rs
        if not grew: break
    members = {}
    for r in seen: members.setdefault(find(r), set()).add(r)
    return [sorted(m) for m in members.values()]


def _clusters(spaces, owner):
    """The roots of each set a channel shuffle connects (`_connected`) and its `routing.Cluster`, for the sets that
    can be pruned; the others are frozen, with the reason."""
    lays = {key: lay for key, lay in owner.items() if lay is not None}
    gid = {r: i for i, r in enumerate(spaces.roots())}
    out_roots, out = [], []
    for roots in _connected(spaces, lays):
        sizes = {spaces.size[r] for r in roots}
        mine = {key: lay for key, lay in lays.items() if any(spaces.find(p.space) in roots for p in lay.pieces)}
        whole = all(p.start == 0 and p.stop == spaces.size[spaces.find(p.space)]
                    for lay in mine.values() for p in (_leaves(lay.route) if lay.route is not None else lay.pieces))
        frozen = next((spaces.frozen[r][0] for r in roots if spaces.frozen[r]), None)
        why = ('a channel shuffle mixes channel spaces of different sizes' if len(sizes) > 1 else
               'a channel shuffle lays out parts of channel spaces' if not whole else
               'a channel shuffle lays out channels tied in blocks or runs'
               if any(spaces.tie[r] != 1 or spaces.width[r] != 1 for r in roots) else
               f'a channel shuffle lays them out with frozen channels: {frozen}' if frozen else None)
        if why is None:
            cluster = Cluster(tuple(gid[r] for r in roots), sizes.pop(),
                              {key: (_regroup(route_of(lay), gid, spaces), lay.block) for key, lay in mine.items()})
            if len(cluster.widths()) < 2:
                why = 'a channel shuffle lays them out so that no smaller width keeps each channel on its way'
        if why is not None:
            for r in roots: spaces.freeze_space(r, why)
            continue
        out_roots.append(roots); out.append(cluster)
    return out_roots, out




def _unregistered(base):
    "The rule of a subclass of a known layer that is not registered: it freezes what it touches, saying why."
    def rule(ctx, node):
        m = ctx.module(node)
        if parametrize.is_parametrized(m):
            raise Unhandled('has parametrized tensors (torch.nn.utils.parametrize): remove the parametrizations '
                            '(parametrize.remove_parametrizations(module, name)) before sparsifying and pruning')
        cls = type(m).__name__
        like = f'nn.{base.__name__}' if base.__module__.startswith('torch.nn') else base.__name__
        raise Unhandled(f'is a subclass of {base.__name__} that fasterai does not know (its forward may differ): '
                        f'fasterai.register_layer({cls}, like={like}) if it maps channels as {base.__name__} does')
    return rule


class _Context:
    """What a rule sees of the trace: the node, its inputs' layouts, and ways to create and record spaces."""
    def __init__(self, model, spaces, owner, poisoned, opaque, unfollowed):
        self.spaces, self.owner, self.poisoned, self.opaque, self.env = spaces, owner, poisoned, opaque, {}
        self.unfollowed = unfollowed   # module name -> the reason, also where no tracked channel reaches it
        self.modules = dict(model.named_modules(remove_duplicate=False))

    def visit(self, node):
        if node.op == 'placeholder': return None
        if node.op == 'get_attr':   # a layer's parameter used directly: that layer keeps all its channels
            if node.users: self.poisoned.add(node.target.rpartition('.')[0])   # (read and unused: no matter)
            return None
        tracked = self.tracked((node.args, node.kwargs))
        if node.op == 'output':
            for lay in tracked: self.freeze(lay, 'reaches the model output')
            return None
        rule, what = self.rule(node)
        module = self.module(node) if node.op == 'call_module' else None
        inplace = is_inplace(node, module)
        try:
            if rule is None and module is not None: self.opaque.update(id(m) for m in module.modules())
            if rule not in COUNT_RULES and self.counts((node.args, node.kwargs)):
                raise Unhandled('uses a channel count read from a tensor, which pruning changes')
            if rule is None:
                if not tracked: return None
                raise Unhandled('is not an operation the channel graph knows')
            if rule not in (keep, permute, reshape): tracked = self.settle((node.args, node.kwargs))
            out = rule(self, node)
            if rule not in ROUTE_RULES: self.check_route(tracked, out)
        except Exception as e:   # an Unhandled case, or one no rule foresaw: freezing is always safe
            reason = str(e) if isinstance(e, Unhandled) else f'could not be followed ({type(e).__name__}: {e})'
            for lay in tracked: self.freeze(lay, f"{what} at '{node.name}' {reason}")
            if module is not None:
                self.poisoned.add(node.target)
                self.unfollowed.setdefault(node.target, f"{what} at '{node.name}' {reason}")
            return None
        if node.meta.get('concrete'):   # the tracer took its value from the example: a channel count is baked in
            lay = out.layout if isinstance(out, Count) else out if isinstance(out, Layout) and out.dim == 0 else None
            if lay is not None:
                self.freeze(lay, f"{what} at '{node.name}' is read as a plain number (int(), float(), len(), an "
                                 'index), which pruning would change')
        if out is not None and inplace and isinstance(node.args[0], fx.Node):
            before = self.env.get(node.args[0])
            if isinstance(before, Layout) and any(p.nonzero and not q.nonzero for p, q in zip(out.pieces, before.pieces)):
                # aliases of the operand (views, the tensor a view was taken of, casts that return it) are not
                # followed: they would read non-zero values where the graph expects zeros. A write that keeps
                # zeros (relu_, dropout) leaves every alias right.
                self.freeze(out, f"{what} at '{node.name}' makes them non-zero in place")
            self.env[node.args[0]] = out   # later readers of the overwritten operand see the result
        return out

    def rule(self, node):
        if node.op == 'call_module':
            m = self.modules[node.target]
            kind, base = kind_of(m), known_base(m)
            rule = kind.rule if kind is not None else _unregistered(base) if base else MODULE_RULES.get(type(m))
            return rule, f"{type(m).__name__} '{node.target}'"
        if node.op == 'call_method':
            return METHOD_RULES.get(node.target), f"method '.{node.target}()'"
        name = getattr(node.target, '__name__', str(node.target))
        return FUNCTION_RULES.get(node.target), f"function '{name}'"

    def tracked(self, args):
        "Every input layout found in nested `args` (the parts of split outputs included)."
        out = []
        def add(n):
            v = self.env.get(n)
            if isinstance(v, (SizeOf, Count)): out.append(v.layout)
            elif isinstance(v, tuple): out.extend(x for x in v if x is not None)
            elif v is not None: out.append(v)
        fx.node.map_arg(args, add)
        return out

    def settle(self, args):
        "Tie the parts of every input reshaped into parts (see `ops.settle`); the inputs' layouts again."
        def one(n):
            v = self.env.get(n)
            if isinstance(v, Layout) and isinstance(v.route, Parts): self.env[n] = settle(self, v)
        fx.node.map_arg(args, one)
        return self.tracked(args)

    def check_route(self, tracked, out):
        """A rule that knows nothing of routes (`routing`) may pass channels a shuffle laid out through unmoved, or
        read them into new channels; anything else (merging them with channels laid out otherwise, moving them)
        is unhandled."""
        routes = {id(l.route): l for l in tracked if isinstance(l, Layout) and l.route is not None}
        if not routes: return
        if len(routes) > 1 or any(isinstance(l, Layout) and l.route is None for l in tracked):
            raise Unhandled('merges channels a channel shuffle laid out with channels laid out otherwise')
        src = next(iter(routes.values()))
        mine = {r for r, _, _ in self.ids(src)}
        for o in (out if isinstance(out, tuple) else (out,)):
            o = o.layout if isinstance(o, (SizeOf, Count)) else o
            if not isinstance(o, Layout) or not {r for r, _, _ in self.ids(o)} & mine: continue
            if o.route is not src.route or self.ids(o) != self.ids(src):
                raise Unhandled('moves channels a channel shuffle laid out')

    def counts(self, args):
        "The `Count`s among nested `args`."
        out = []
        fx.node.map_arg(args, lambda n: out.append(self.env[n]) if isinstance(self.env.get(n), Count) else None)
        return out

    # helpers for rules
    def module(self, node): return self.modules[node.target]
    def tensor_attr(self, node):
        "The model's tensor a get_attr `node` reads (a buffer or parameter), or None for any other node."
        if node.op != 'get_attr': return None
        owner, _, name = node.target.rpartition('.')
        t = getattr(self.modules.get(owner), name, None)
        return t if isinstance(t, torch.Tensor) else None
    def kind(self, node): return kind_of(self.modules[node.target])
    def layout(self, node, i=0):
        v = self.env.get(node.args[i]) if len(node.args) > i and isinstance(node.args[i], fx.Node) else None
        if isinstance(v, (tuple, SizeOf, Count)): raise Unhandled('reads a tuple of tensors or sizes')
        return v
    def shape(self, node):
        "The output shape of `node` (None when it is not one tensor)."
        shape = node.meta.get('shape')
        return shape if isinstance(shape, torch.Size) else None
    def ids(self, lay):
        "The channels of `lay` as (root space, start, stop) per piece: equal when two layouts hold the same channels."
        return [(self.spaces.find(p.space), p.start, p.stop) for p in lay.pieces]
    def whole(self, p): return p.start == 0 and p.stop == self.spaces.size[self.spaces.find(p.space)]
    def new_layout(self, n, dim):
        "A new channel space of `n` channels along `dim`."
        return Layout(dim, (Piece(self.spaces.new(n), 0, n),))

    def record(self, layout, node, role):
        "Record `layout`'s channels as the `role` channels of the module called at `node` (None: untracked)."
        key = (node.target, role)
        if layout is None or self.owner.get(key, 0) is None:
            # channels no layer here writes (the input): this module's columns must all stay, in every call
            if self.owner.setdefault(key, layout) is not None: self.poisoned.add(node.target)
            if layout is not None: self.freeze(layout, f"'{node.target}' is also called on channels no layer here writes")
            return
        if role == 'in':
            for p in layout.pieces:
                if p.nonzero:
                    self.spaces.freeze_space(p.space, f"'{node.target}' reads them after '{p.nonzero}', "
                                                      'which makes them non-zero')
        first = self.owner.setdefault(key, layout)
        if first is layout:
            self.spaces.add_slices(layout, node.target, role)
            return
        # a module called again (or in the other mode's trace): channel i is the same weight row or column
        same_route = (first.route is None and layout.route is None) or route_of(first) == route_of(layout)
        if self.ids(first) == self.ids(layout) and first.block == layout.block and same_route: return
        try:
            if not same_route: raise Unhandled('a channel shuffle lays them out otherwise')
            unite(self, first, layout, lambda x, y: x)   # position by position, as a residual add unites
        except Unhandled:
            self.freeze(first, f"'{node.target}' is called on channels laid out differently")
            raise Unhandled('is called again on channels laid out differently') from None

    def freeze(self, layout, reason): self.spaces.freeze(layout, reason)
