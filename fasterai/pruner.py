"""Pruner: rebuild a sparse model smaller, without the channels whose whole group is zero."""
import copy
from collections import OrderedDict
from contextlib import contextmanager

import torch
import torch.nn as nn

from .budget import Latency, check_budget, reached
from .criteria import resolve_criterion
from .graph import trace
from .tracing import check_model, first_nonfinite, is_tensors, unwrap
from .masks import mask_drops
from .sparsifier import Sparsifier, check_layer_type, check_method, check_round_to, check_sparsity
from .targets import pname as qualified
from .layers import kind_of, param_dim, resize_splits, shrink
from .verify import MODES, check_same_function, outputs, reference_outputs

__all__ = ['Pruner', 'dead_channels', 'kept_entries']


def _row_zero(masks, layer, pname, m):
    """Per-channel bool vector of the channels that `masks` zeroes in parameter `pname` of module `m` (named
    `layer`), or None when it has no mask; a ValueError unless the mask drops whole channels."""
    keep = masks.get(qualified(layer, pname))
    if keep is None: return None
    d, p = param_dim(m, pname), getattr(m, pname)
    if keep.dim() != p.dim() or any(n != (p.shape[d] if i == d else 1) for i, n in enumerate(keep.shape)):
        raise ValueError(f"the mask of '{qualified(layer, pname)}' (shape {tuple(keep.shape)}) does not drop whole "
                         f'channels: pruning takes masks of whole rows, such as a Sparsifier at granularity '
                         f"'filter' makes")
    return ~keep.flatten().cpu()


def dead_channels(group, modules, masks=None):
    """Which channels of `group` are exactly zero wherever a layer reads them (so removing them is exact).

    The graph has checked that a zeroed group reaches its readers as zeros; here every producer's and
    depthwise conv's weight row and bias must be zero, and every norm's scale and shift (or, without affine
    parameters, its running mean). The cheap per-channel vectors are read first; weights only for the channels
    still in question. `masks` (parameter name -> keep-mask of whole rows, as the Sparsifier plans them): the
    rows they drop count as zero without being read, as they would read once the masks are applied.
    """
    dead = torch.zeros(group.size, dtype=torch.bool)
    if not group.prunable: return dead
    dead[:], masks = True, masks or {}
    slices = [s for s in group.slices if s.role in ('out', 'dw', 'norm')]
    for s in slices:
        m = modules[s.module]
        for pname, v in kind_of(m).zero_when_dead(m, s.role):
            zero = (v.detach()[s.offset:s.offset + s.length] == 0).flatten(1).all(1).cpu() if v.dim() > 1 else \
                (v.detach()[s.offset:s.offset + s.length] == 0).cpu()   # a vector may be (C, 1, 1, 1): a conv's gain
            known = _row_zero(masks, s.module, pname, m)
            if known is not None: zero |= known[s.offset:s.offset + s.length]
            dead[s.start:s.start + s.length] &= zero
    for s in slices:
        if s.role == 'norm': continue
        known = _row_zero(masks, s.module, kind_of(modules[s.module]).weight, modules[s.module])
        question = dead[s.start:s.start + s.length].clone()
        if known is not None: question &= ~known[s.offset:s.offset + s.length]
        rows = question.nonzero().flatten()   # only the channels still in question
        if not len(rows): continue
        m = modules[s.module]
        kind = kind_of(m)
        w = getattr(m, kind.weight).detach().movedim(kind.out_dim, 0)
        if 2 * len(rows) > s.length:   # most rows: read them all in place (a view), keep those in question
            part = w[s.offset:s.offset + s.length].flatten(1)
            zero = ((part.amax(1) == 0) & (part.amin(1) == 0)).cpu()[rows]
        else:
            part = w.index_select(0, (rows + s.offset).to(w.device)).flatten(1)
            zero = ((part.amax(1) == 0) & (part.amin(1) == 0)).cpu()
        dead[rows + s.start] = zero
    dead = group.per_unit(dead, 'all')   # a unit of tied channels (a head) goes only as a whole
    if dead.all(): dead[0] = False   # a layer keeps at least one channel
    return group.channels(dead)


def plan(graph, masks=None):
    """Module name -> {role: indices to keep}, for every module that loses channels (`masks`: rows known to be
    zero, see `dead_channels`). Channels a channel shuffle lays out (`graph.routes`) are kept at the smallest width
    that holds their live ones, in the order the shuffle lays them out there (`routing.Cluster.orders`)."""
    modules, drops, keep = graph.modules(), {}, {}
    dead = {g.id: dead_channels(g, modules, masks) for g in graph.groups}
    for c in graph.routes:
        k, kept = c.fit({g: ~dead[g] for g in c.groups})
        for (name, role), idx in c.orders(kept, k).items():
            if not torch.equal(idx, torch.arange(kind_of(modules[name]).channels(modules[name], role))):
                keep.setdefault(name, {})[role] = idx
    for g in graph.groups:
        if g.route is not None or not dead[g.id].any(): continue
        for s in g.slices:
            idx = dead[g.id][s.start:s.start + s.length].nonzero().flatten() + s.offset
            if s.block != 1: idx = (idx[:, None] * s.block + torch.arange(s.block)).flatten()
            drops.setdefault((s.module, s.role), []).append(idx)
    for (name, role), idx in drops.items():
        if role in keep.get(name, {}):
            raise AssertionError(f"'{name}' ({role}) holds channels a shuffle lays out and others")
        k = torch.ones(kind_of(modules[name]).channels(modules[name], role), dtype=torch.bool)
        k[torch.cat(idx)] = False
        keep.setdefault(name, {})[role] = k.nonzero().flatten()
    return keep


class Pruner:
    """Returns a physically smaller copy of a model: every channel whose whole group is zero is removed.

    `sparsity`: when given, first zero that percentage of filters in one shot, with the Sparsifier's own
    group scoring (`criteria`, `method`, `layer_type` as in `Sparsifier`); when None, prune what is zero.
    `example_input`: a tensor, a tuple of tensors (one per input) or a shape for tracing (guessed from the first
    layer when None); when tensors, `verify` runs on them, otherwise on a random input of that shape.
    `leaf_modules`: names or types of modules the tracer keeps whole (see `graph.trace`).
    `verify`: run the sparse and pruned models in eval and in train mode (dropout off, random draws seeded, the
    BatchNorm statistics put back) and raise PruningError if any output differs (see `verify.check_same_function`).
    `round_to`: with `sparsity` or `target`, each group keeps a multiple of this many channels ('auto': see
    `Sparsifier`).
    `target`: instead of `sparsity`, a budget (`MACs(0.5)`, `Params(0.3)`, `Latency(0.5, batch_size=64)`) the one-shot
    pruning meets: with method 'local' one percentage for every group, with 'global' the channels least important per
    unit of cost saved. After `prune_model`, `reached` holds the pruned model's ratio (latency: timed).
    """
    def __init__(self, sparsity=None, criteria='l1', method='local', layer_type=nn.Conv2d, example_input=None,
                 leaf_modules=(), verify=True, round_to=None, target=None):
        if sparsity is not None and target is not None: raise ValueError('give sparsity or target, not both')
        self.sparsity = None if sparsity is None else check_sparsity(sparsity)   # percent of filters, or None
        self.target = None if target is None else check_budget(target)         # a budget instead of a percentage
        self.reached = None   # after prune_model with a target: the pruned model's ratio
        self.criteria, self.method = resolve_criterion(criteria), check_method(method)
        if (sparsity is not None or target is not None) and (self.criteria.needs_ref or self.criteria.accumulate is not None):
            raise ValueError(f"criteria '{self.criteria.name}' needs training (reference weights or gradients): "
                             'one-shot pruning takes a criterion of the weights alone, such as l1 or l2; '
                             'train with SparsifyCallback, then prune what it zeroed with Pruner()')
        self.layer_type = check_layer_type(layer_type)   # what one-shot pruning scores
        if not isinstance(verify, bool): raise ValueError(f'verify must be True or False, got {verify!r}')
        self.example_input, self.leaf_modules, self.verify = example_input, leaf_modules, verify
        if round_to is not None and sparsity is None and target is None:
            raise ValueError('round_to applies when the Pruner chooses the channels itself: pass sparsity or target too')
        self.round_to = check_round_to(round_to)   # kept channels of each group a multiple of it (see Sparsifier)

    def prune_model(self, model):
        """A new model of the same class, computing the same function without the zero channels (of the
        wrapped module for a DataParallel or DistributedDataParallel model).

        The user's model is not changed (one-shot masks are applied to it only for the verification's reference
        pass, then its values are put back; the copy is planned and built from the masks without them); the
        copy is built layer by layer from the kept channels, so the peak memory is about the size of the pruned
        model plus, when verifying, the masked entries."""
        model = unwrap(model)
        check_model(model)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            raise ValueError(f'{type(model).__name__} is on the meta device (its tensors hold no values): load its '
                             'weights first (model.to_empty(device=...), then load_state_dict)')
        bad = first_nonfinite(model.named_parameters())
        if bad is not None: raise ValueError(f"parameter '{bad}' holds NaN or inf: such a model cannot be pruned exactly")
        if self.sparsity is None and self.target is None:
            graph, masks = trace(model, self.example_input, self.leaf_modules), {}
        else:
            sp = Sparsifier(model, 'filter', self.method, self.criteria, self.layer_type, self.example_input,
                            self.leaf_modules, round_to=self.round_to)
            sp.final = self.target
            if isinstance(self.target, Latency): sp.calibrate(self.target)
            graph, masks = sp.graph, sp.plan_masks(self.sparsity if self.target is None else self.target)
        example = self.example_input if is_tensors(self.example_input) else graph.input_shape
        if self.verify:   # the sparse model's outputs in both modes, computed before the copy takes memory
            reference = _reference(model, masks, example)
            expected = reference_outputs(reference, MODES)
        # the masks are never needed on the user's model to build the copy: the rows they drop are known zero,
        # the copy leaves them out, and the few it keeps (a layer keeps one channel) are zeroed in the copy
        keep = plan(graph, masks)
        pruned = _pruned_copy(model, keep, masks)
        resize_splits(pruned)   # (split sizes a module holds, from its layers' new sizes: `layers.register_split`)
        self.kept = keep   # module name -> {role: kept channels}: what `kept_entries` reads
        if self.verify:
            check_same_function(lambda training, float64=False: expected[training] if not float64 else
                                reference(training, float64), pruned, example)
        if self.target is not None: self.reached = reached(self.target, model, pruned, example)
        return pruned


def kept_entries(model, keep):
    """Qualified name -> the flat (row-major) indices of the entries the pruned copy keeps, for every parameter and
    buffer of `model` that `keep` (module name -> {role: kept channels}, `Pruner.kept`) shrinks: what carries an
    optimizer's state (momentum, Adam moments) over to the pruned model. Each layer is shrunk once more as
    `prune_model` shrinks it, with its tensors holding their own indices, so the slicing rules live in one place."""
    out = {}
    for name, k in keep.items():
        layer = model.get_submodule(name)
        probe = copy.deepcopy(layer)
        for m in probe.modules():   # (an attention module's per-head rows may live in a child: Swin V2's bias MLP)
            for store, cast in ((m._parameters, nn.Parameter), (m._buffers, lambda t: t)):
                for t, v in store.items():
                    if v is not None: store[t] = cast(torch.arange(v.numel(), dtype=torch.float64).view(v.shape))
        shrink(probe, k)
        old = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
        for t, v in (*probe.named_parameters(), *probe.named_buffers()):
            if v.shape != old[t].shape: out[qualified(name, t)] = v.flatten().long()
    return out


def _reference(model, masks, example):
    "A function `(training, float64) -> outputs` of the sparse model: `model` with `masks` applied while it runs."
    def run(training, float64=False):
        with _masked(model, masks): return outputs(model, example, training, float64)
    return run


@contextmanager
def _masked(model, masks):
    "Zero the masked entries of `model` for a while; their values come back afterwards, whatever happens."
    params, saved = dict(model.named_parameters(remove_duplicate=False)), []
    try:
        with torch.no_grad():
            for name, keep in masks.items():
                p = params[name]
                dim, where = mask_drops(keep, p)
                if dim is not None:   # whole rows (filter masks): save and zero them by index
                    saved.append((p, dim, where, p.index_select(dim, where)))
                    p.index_fill_(dim, where, 0)
                else:
                    where = where.expand_as(p)
                    saved.append((p, None, where, p[where]))
                    p.masked_fill_(where, 0)
        yield
    finally:
        with torch.no_grad():
            for p, dim, where, values in reversed(saved):
                if dim is None: p.masked_scatter_(where, values)
                else: p.index_copy_(dim, where, values)


_ATOMIC = (int, float, bool, str, bytes, type(None), type, torch.dtype, torch.device)
_PROTOCOL = ('__reduce_ex__', '__reduce__', '__getstate__')
_PLAIN = tuple(getattr(nn.Module, k) for k in _PROTOCOL)


_HOOK_DICTS = ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks')


def _a_callbacks(hook):
    """Whether `hook` belongs to a fastai callback (ActivationStats' hooks): it registered them on the model it
    watches and removes them after the fit, so a copy must not carry them (nor a copy of the callback's Learner)."""
    owner = getattr(hook, '__self__', None)
    owner = getattr(getattr(owner, 'hook_func', None), '__self__', owner)   # fastai's Hook wraps the callback's method
    return any(c.__name__ == 'Callback' and c.__module__.startswith('fastai.') for c in type(owner).__mro__)


def copy_modules(module, memo):
    """What `copy.deepcopy(module, memo)` returns, several times faster on a tree of plain modules: each module's
    own dicts (children, parameters, buffers, empty hook dicts) are rebuilt directly instead of through the
    generic pickling protocol, then handed to the class's `__setstate__` as deepcopy does; every other
    attribute, and any module class with its own `__deepcopy__`, `__reduce_ex__`, `__reduce__` or `__getstate__`,
    goes through `copy.deepcopy` with the same `memo`, so shared objects stay shared. Hooks a fastai callback
    registered (ActivationStats) are not copied."""
    if id(module) in memo: return memo[id(module)]
    cls = type(module)
    if hasattr(cls, '__deepcopy__') or tuple(getattr(cls, k) for k in _PROTOCOL) != _PLAIN:
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = {}
    for k, v in module.__getstate__().items():   # what deepcopy copies (a compiled call, for one, is left out)
        t = type(v)
        if k == '_modules': state[k] = t((n, None if c is None else copy_modules(c, memo)) for n, c in v.items())
        elif k in ('_parameters', '_buffers'): state[k] = t((n, copy.deepcopy(x, memo)) for n, x in v.items())
        elif t in _ATOMIC: state[k] = v
        elif k in _HOOK_DICTS and any(_a_callbacks(h) for h in v.values()):   # hooks a fastai callback registered
            state[k] = t((i, copy.deepcopy(h, memo)) for i, h in v.items() if not _a_callbacks(h))
        elif id(v) in memo: state[k] = memo[id(v)]
        elif t in (dict, OrderedDict, set) and not v: state[k] = memo[id(v)] = t()   # shared ones stay shared
        else: state[k] = copy.deepcopy(v, memo)
    new.__setstate__(state)
    return new


def _computed(model):
    """id -> a detached copy, for every tensor a forward computed and stored in a module (fastai's WeightDropout
    stores its dropped-out weights, a recurrent model its hidden state): deepcopy refuses tensors that are not
    graph leaves, and the copy must not hold the user's autograd graph."""
    out = {}
    def note(v):
        if isinstance(v, torch.Tensor) and v.grad_fn is not None: out[id(v)] = v.detach().clone()
    for m in model.modules():
        for v in vars(m).values():
            note(v)
            if isinstance(v, (list, tuple)):
                for x in v:
                    note(x)
                    if isinstance(x, (list, tuple)):
                        for y in x: note(y)
    return out


@torch.no_grad()
def _pruned_copy(model, keep, masks=None):
    """A copy of `model` whose layers in `keep` hold only the kept channels: the module tree is copied with
    the tensors shared, the resized layers get new smaller tensors, and every other tensor is cloned. Then
    the rows `masks` drop that the copy still holds are zeroed in it (the user's model keeps its values)."""
    original = {id(t): t for t in (*model.parameters(), *model.buffers())}
    pruned = copy_modules(model, {**_computed(model), **original})
    order = {n: i for i, (n, _) in enumerate(pruned.named_modules())}
    for name in sorted(keep, key=lambda n: order.get(n, len(order))):   # parents first: an attention module reads
        # its head size from its layers (a layer named only through a module it is shared with goes last)
        shrink(pruned.get_submodule(name), keep[name])
    clones = {}
    for m in pruned.modules():
        for store in (m._parameters, m._buffers):
            for k, t in store.items():
                if t is None or id(t) not in original: continue
                if id(t) not in clones:
                    c = t.detach().clone()
                    clones[id(t)] = nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else c
                store[k] = clones[id(t)]
    for pname, mask in (masks or {}).items():
        module, _, attr = pname.rpartition('.')
        kept = keep.get(module, {})
        rows = next((kept[r] for r in ('out', 'dw', 'norm') if r in kept), None)
        drop = ~mask.flatten()
        if rows is not None: drop = drop[rows.to(drop.device)]
        if drop.any():
            m = pruned.get_submodule(module)
            getattr(m, attr).index_fill_(param_dim(m, attr), drop.nonzero().flatten().to(mask.device), 0)
    return pruned
