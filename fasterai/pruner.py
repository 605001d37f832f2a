"""Pruner: rebuild a sparse model smaller, without the channels whose whole group is zero."""
import copy
from contextlib import contextmanager

import torch
import torch.nn as nn

from .criteria import resolve_criterion
from .errors import PruningError
from .graph import trace
from .tracing import check_model, example_tensor, finite, training_mode
from .sparsifier import Sparsifier, check_layer_type, check_method, check_round_to, check_sparsity
from .surgery import out_dim, shrink

__all__ = ['Pruner', 'dead_channels', 'check_same_function']


def _vectors(s, m):
    "The per-channel vectors of slice `s` of module `m` that must be zero for its channels to go."
    if s.role in ('out', 'dw'): return [] if m.bias is None else [m.bias]
    if m.affine: return [m.weight, m.bias]
    rm = getattr(m, 'running_mean', None)
    return [] if rm is None else [rm]


def dead_channels(group, modules):
    """Which channels of `group` are exactly zero wherever a layer reads them (so removing them is exact).

    The graph has checked that a zeroed group reaches its readers as zeros; here every producer's and
    depthwise conv's weight row and bias must be zero, and every norm's scale and shift (or, without affine
    parameters, its running mean). The cheap per-channel vectors are read first; weights only where some
    channel is still in question.
    """
    dead = torch.zeros(group.size, dtype=torch.bool)
    if not group.prunable: return dead
    dead[:] = True
    slices = [s for s in group.slices if s.role in ('out', 'dw', 'norm')]
    for s in slices:
        for v in _vectors(s, modules[s.module]):
            dead[s.start:s.start + s.length] &= (v.detach()[s.offset:s.offset + s.length] == 0).cpu()
    for s in slices:
        if s.role == 'norm' or not dead[s.start:s.start + s.length].any(): continue
        w = modules[s.module].weight.detach().movedim(out_dim(modules[s.module]), 0)
        lo, hi = torch.aminmax(w[s.offset:s.offset + s.length].flatten(1), dim=1)   # one pass, no temporary
        dead[s.start:s.start + s.length] &= ((lo == 0) & (hi == 0)).cpu()
    dead = dead.view(group.tie, -1).all(0)   # a unit of tied channels goes only as a whole
    if dead.all(): dead[0] = False   # a layer keeps at least one channel
    return group.channels(dead)


def _channels(module, role):
    "How many channels `module` has on the side of `role`."
    if role == 'norm': return module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features
    if role == 'dw': return module.out_channels
    attr = {'out': ('out_channels', 'out_features'), 'in': ('in_channels', 'in_features')}[role]
    return next(getattr(module, a) for a in attr if hasattr(module, a))


def plan(graph):
    "Module name -> {role: indices to keep}, for every module that loses channels."
    modules, drops = graph.modules(), {}
    for g in graph.groups:
        dead = dead_channels(g, modules)
        if not dead.any(): continue
        for s in g.slices:
            idx = dead[s.start:s.start + s.length].nonzero().flatten() + s.offset
            if s.block != 1: idx = (idx[:, None] * s.block + torch.arange(s.block)).flatten()
            drops.setdefault((s.module, s.role), []).append(idx)
    keep = {}
    for (name, role), idx in drops.items():
        k = torch.ones(_channels(modules[name], role), dtype=torch.bool)
        k[torch.cat(idx)] = False
        keep.setdefault(name, {})[role] = k.nonzero().flatten()
    return keep


def _outputs(out):
    "The tensors in a model output (a tensor, or nested tuples, lists and dicts of them)."
    if isinstance(out, torch.Tensor): return [out]
    if isinstance(out, dict): out = list(out.values())
    if isinstance(out, (list, tuple)): return [t for o in out for t in _outputs(o)]
    return []


@torch.no_grad()
def eval_outputs(model, example):
    """The output tensors of `model` in eval mode (each module's mode restored) on `example`: a tensor,
    or a shape for one seeded random input."""
    with training_mode(model, False):
        return _outputs(model(example_tensor(model, example)))


def check_same_function(reference, pruned, example, rtol=1e-4):
    """Raise PruningError unless `pruned` reproduces `reference` (a model, or its `eval_outputs`) within
    `rtol` of the output scale on `example` (a tensor, or a shape for a random input)."""
    ref = reference if isinstance(reference, list) else eval_outputs(reference, example)
    name = type(pruned).__name__
    try:
        got = eval_outputs(pruned, example)
    except RuntimeError as e:
        raise PruningError(f'the pruned {name} fails to run: {e}') from e
    for a, b in zip(ref, got):
        scale = a.abs().max().item()
        diff = (a - b).abs().max().item() if a.shape == b.shape else float('inf')
        if not diff <= rtol * max(scale, 1e-12):
            raise PruningError(f'the pruned {name} differs from the sparse one by {diff:.3g} '
                               f'(output scale {scale:.3g}); please report this model')


class Pruner:
    """Returns a physically smaller copy of a model: every channel whose whole group is zero is removed.

    `sparsity`: when given, first zero that percentage of filters in one shot, with the Sparsifier's own
    group scoring (`criteria`, `method`, `layer_type` as in `Sparsifier`); when None, prune what is zero.
    `example_input`: a tensor or shape for tracing (guessed from the first layer when None); when a tensor,
    `verify` runs on it, otherwise on a random input of that shape.
    `leaf_modules`: names or types of modules the tracer keeps whole (see `graph.trace`).
    `verify`: run the sparse and pruned models and raise PruningError if their outputs differ.
    `round_to`: with `sparsity`, each group keeps a multiple of this many channels (see `Sparsifier`).
    """
    def __init__(self, sparsity=None, criteria='l1', method='local', layer_type=nn.Conv2d, example_input=None,
                 leaf_modules=(), verify=True, round_to=None):
        self.sparsity = None if sparsity is None else check_sparsity(sparsity)   # percent of filters, or None
        self.criteria, self.method = resolve_criterion(criteria), check_method(method)
        if sparsity is not None and (self.criteria.needs_ref or self.criteria.accumulate is not None):
            raise ValueError(f"criteria '{self.criteria.name}' needs training (reference weights or gradients): "
                             'one-shot pruning takes a criterion of the weights alone, such as l1 or l2; '
                             'train with SparsifyCallback, then prune what it zeroed with Pruner()')
        self.layer_type = check_layer_type(layer_type)   # what one-shot pruning scores
        if not isinstance(verify, bool): raise ValueError(f'verify must be True or False, got {verify!r}')
        self.example_input, self.leaf_modules, self.verify = example_input, leaf_modules, verify
        if round_to is not None and sparsity is None:
            raise ValueError('round_to applies when the Pruner chooses the channels itself: pass sparsity too')
        self.round_to = check_round_to(round_to)   # kept channels of each group a multiple of it (see Sparsifier)

    def prune_model(self, model):
        """A new model of the same class, computing the same function without the zero channels (of the
        wrapped module for a DataParallel or DistributedDataParallel model).

        The user's model is not changed (one-shot masks are applied to it only while the pruned copy is
        built, then its values are put back); the copy is built layer by layer from the kept channels, so
        the peak memory is about the size of the pruned model plus the masked entries."""
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)): model = model.module
        check_model(model)
        bad = next((n for n, p in model.named_parameters() if not finite(p)), None)
        if bad is not None: raise ValueError(f"parameter '{bad}' holds NaN or inf: such a model cannot be pruned exactly")
        if self.sparsity is None:
            graph, masks = trace(model, self.example_input, self.leaf_modules), {}
        else:
            sp = Sparsifier(model, 'filter', self.method, self.criteria, self.layer_type, self.example_input,
                            self.leaf_modules, round_to=self.round_to)
            graph, masks = sp.graph, sp.plan_masks(self.sparsity)
        example = self.example_input if isinstance(self.example_input, torch.Tensor) else graph.input_shape
        with _masked(model, masks):
            reference = eval_outputs(model, example) if self.verify else None
            pruned = _pruned_copy(model, plan(graph))
        if self.verify: check_same_function(reference, pruned, example)
        return pruned


@contextmanager
def _masked(model, masks):
    "Zero the masked entries of `model` for a while; their values come back afterwards, whatever happens."
    params, saved = dict(model.named_parameters(remove_duplicate=False)), []
    try:
        with torch.no_grad():
            for name, keep in masks.items():
                p, dims = params[name], [d for d, k in enumerate(keep.shape) if k != 1]
                if len(dims) == 1:   # whole rows (filter masks): save and zero them by index, much faster
                    idx = (~keep).flatten().nonzero().flatten()
                    saved.append((p, dims[0], idx, p.index_select(dims[0], idx)))
                    p.index_fill_(dims[0], idx, 0)
                else:
                    drop = (~keep).expand_as(p)
                    saved.append((p, None, drop, p[drop]))
                    p.masked_fill_(drop, 0)
        yield
    finally:
        with torch.no_grad():
            for p, dim, where, values in reversed(saved):
                if dim is None: p.masked_scatter_(where, values)
                else: p.index_copy_(dim, where, values)


@torch.no_grad()
def _pruned_copy(model, keep):
    """A copy of `model` whose layers in `keep` hold only the kept channels: the module tree is copied with
    the tensors shared, the resized layers get new smaller tensors, and every other tensor is cloned."""
    original = {id(t): t for t in (*model.parameters(), *model.buffers())}
    pruned = copy.deepcopy(model, memo=dict(original))
    for name, k in keep.items(): shrink(pruned.get_submodule(name), k)
    clones = {}
    for m in pruned.modules():
        for store in (m._parameters, m._buffers):
            for k, t in store.items():
                if t is None or id(t) not in original: continue
                if id(t) not in clones:
                    c = t.detach().clone()
                    clones[id(t)] = nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else c
                store[k] = clones[id(t)]
    return pruned
