"""Sparsifier: zero the least important weights, kernels or whole filters of a model, and keep them zero.

`from fasterai.sparsifier import *` gives `Sparsifier`, `SparsifyCallback` (fastai, imported on first use)
and the schedules.
"""
import math
import numbers
import warnings

import torch
import torch.nn as nn

from .criteria import resolve_criterion
from .granularity import FILTER, NM, layer_dims, resolve_granularity
from .graph import trace
from .tracing import check_model, finite
from .layers import kind_of
from .schedules import *  # noqa: F401,F403 (re-exported: the seed's `from fasterai.sparsifier import *`)
from .schedules import __all__ as _schedules

__all__ = ['Sparsifier', 'SparsifyCallback', 'METHODS', 'check_sparsity', 'check_method', 'check_layer_type', 'check_round_to',
           'find_layers', *_schedules]

METHODS = ('local', 'global')
"'local': each layer to the target; 'global': one threshold over all targeted layers."


def check_sparsity(sparsity):
    "`sparsity` as a float percentage, or a ValueError."
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 <= sparsity <= 100:
        raise ValueError(f'sparsity must be a percentage in [0, 100], got {sparsity!r}')
    return float(sparsity)


def check_method(method):
    "`method` if it is one of METHODS, or a ValueError."
    if method not in METHODS: raise ValueError(f'unknown method {method!r}: choose one of {sorted(METHODS)}')
    return method


def check_layer_type(layer_type):
    "`layer_type` (a layer class or a tuple of them) as a tuple, or a ValueError."
    types = layer_type if isinstance(layer_type, tuple) else (layer_type,)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise ValueError(f'layer_type must be an nn.Module subclass or a tuple of them, got {layer_type!r}')
    return types


def check_round_to(round_to):
    "`round_to` if it is None or a positive int, or a ValueError."
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f'round_to must be a positive int (kept channels a multiple of it) or None, got {round_to!r}')
    return round_to


def find_layers(model, layer_type, exclude=()):
    """Qualified name -> module for every module of `layer_type` (a type or tuple of types) not in `exclude`
    (qualified names or the modules themselves), or a ValueError."""
    types = check_layer_type(layer_type)
    skip = _excluded(model, exclude)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, types) and n not in skip}
    if not layers:
        raise ValueError(f'{type(model).__name__} has no layer of layer_type '
                         f'{", ".join(t.__name__ for t in types)} to sparsify' + (' outside exclude' if skip else ''))
    bad = [n for n, m in layers.items() if not isinstance(getattr(m, 'weight', None), torch.Tensor)]
    if bad: raise ValueError(f"layer '{bad[0]}' of layer_type has no weight to sparsify")
    return layers


def _excluded(model, exclude):
    "The qualified names of the modules `exclude` names or holds, and of their submodules."
    items = [exclude] if isinstance(exclude, (str, nn.Module)) else list(exclude)
    names = {id(m): n for n, m in model.named_modules()}
    out = set()
    for e in items:
        if isinstance(e, nn.Module) and id(e) in names: e = names[id(e)]
        if not isinstance(e, str) or e not in names.values():
            raise ValueError(f'exclude must name modules of {type(model).__name__} (qualified names or the modules '
                             f'themselves), got {e!r}')
        out |= {n for n in names.values() if n == e or n.startswith(e + '.')}
    return out


def mask_drops(keep, p):
    """How to zero what keep-mask `keep` drops in parameter `p`: (dim, indices) when it drops whole slices along
    one dim (zeroed by index, a few times faster than a broadcast mask), else (None, the drop mask)."""
    drop, dims = ~keep, [d for d, n in enumerate(keep.shape) if n != 1]
    if len(dims) == 1 and keep.dim() == p.dim(): return dims[0], drop.flatten().nonzero().flatten()
    return None, drop


_BLOCK = 2 ** 20
"About how many weights `Sparsifier.row_scores` scores at a time."


def _pname(layer, pname):
    "The qualified name of parameter `pname` of the module named `layer` ('' for the model itself)."
    return f'{layer}.{pname}' if layer else pname


def n_zero(units, sparsity):
    "How many of `units` make `sparsity` percent, rounding half up: 30% of 20 is 6, 7.5% of 20 is 2."
    return math.floor(units * sparsity / 100 + 0.5 + 1e-9)


class _WeightTarget:
    "One layer's weight, scored in blocks summed over `dims` ('weight': each element; 'kernel': each k x k kernel)."
    def __init__(self, name, module, dims):
        w = module.weight
        self.name, self.module, self.dims, self.layers = name, module, dims, [name]
        self.shape = tuple(1 if d in dims else s for d, s in enumerate(w.shape))
        self.units = math.prod(self.shape)

    def count(self, sparsity): return n_zero(self.units, sparsity)

    def scored(self): return {self.name: self.module}

    def scores(self, sp):
        s = sp.score(self.name)
        return (s.sum(self.dims, keepdim=True) if self.dims else s).flatten().float()

    def drop(self, scores, k): return torch.topk(scores, k, largest=False).indices

    def masks(self, drop):
        keep = torch.ones(self.units, dtype=torch.bool, device=self.module.weight.device)
        keep[drop] = False
        return {_pname(self.name, 'weight'): keep.view(self.shape)}


class _NMTarget:
    "One layer's weight in blocks of M consecutive weights along the input dim; each block loses the same count."
    def __init__(self, name, module, nm):
        w = module.weight
        if w.dim() < 2 or w.shape[1] % nm.m:
            raise ValueError(f"{nm.n}:{nm.m} sparsity needs the input dim of layer '{name}' (weight shape "
                             f'{tuple(w.shape)}) to be a multiple of {nm.m}')
        self.name, self.module, self.nm, self.layers = name, module, nm, [name]
        self.units = w.numel()

    def count(self, sparsity):
        n, m = self.nm
        if sparsity > 100 * (m - n) / m + 1e-9:
            raise ValueError(f'{n}:{m} sparsity keeps {n} of every {m} weights: at most {100 * (m - n) / m:g}% '
                             f'can be zero, got {sparsity:g}%')
        return n_zero(m, sparsity)

    def scored(self): return {self.name: self.module}

    def _blocks(self, t): return t.movedim(1, -1).reshape(-1, self.nm.m)

    def scores(self, sp): return self._blocks(sp.score(self.name)).float()

    def drop(self, scores, k): return torch.topk(scores, k, dim=1, largest=False).indices

    def masks(self, drop):
        w = self.module.weight
        keep = torch.ones(w.numel() // self.nm.m, self.nm.m, dtype=torch.bool, device=w.device)
        keep.scatter_(1, drop.to(w.device), False)
        moved = w.movedim(1, -1).shape
        return {_pname(self.name, 'weight'): keep.view(moved).movedim(-1, 1)}


class _GroupTarget:
    "A channel group: scored by its producers' rows, zeroed in every producer row, bias and norm."
    def __init__(self, group, modules, layer_names, round_to=None):
        self.group, self.modules, self.units = group, modules, group.units
        self.layers, self.round_to = layer_names, round_to
        self.name = '+'.join(s.module for s in group.by_role('out'))

    def count(self, sparsity):
        "Units to zero: round(sparsity% of them), keeping one; with `round_to`, kept channels a multiple of it."
        drop = min(n_zero(self.units, sparsity), self.units - 1)
        if not self.round_to or drop == 0: return drop
        step = self.round_to // math.gcd(self.round_to, self.group.tie)   # kept units per multiple of round_to
        kept = max(step, step * round((self.units - drop) / step))
        return max(self.units - kept, 0)

    def scored(self): return {s.module: self.modules[s.module] for s in self.group.by_role('out')}

    def scores(self, sp):
        """Each unit's score: the sum over the group's producers of their row scores, each divided by its mean
        (a unit of tied channels sums its channels)."""
        total = torch.zeros(self.group.size)
        for s in self.group.by_role('out'):
            rows = sp.row_scores(s.module, kind_of(self.modules[s.module]).out_dim, s.offset, s.length).float().cpu()
            total[s.start:s.start + s.length] += rows / rows.abs().mean().clamp_min(torch.finfo(rows.dtype).tiny)
        return total.view(self.group.tie, -1).sum(0)

    def drop(self, scores, k): return torch.topk(scores, k, largest=False).indices

    def masks(self, drop):
        "Keep-masks for every producer row and bias, depthwise row and bias, and norm scale and shift."
        keep = torch.ones(self.units, dtype=torch.bool)
        keep[drop] = False
        keep, out = self.group.channels(keep), {}
        for s in self.group.slices:
            if s.role == 'in': continue
            m, k = self.modules[s.module], keep[s.start:s.start + s.length]
            for pname, d in kind_of(m).rows(s.role):
                p = getattr(m, pname, None)
                if p is None: continue
                shape = [1] * p.dim(); shape[d] = -1
                mask = out.setdefault(_pname(s.module, pname), (torch.ones(p.shape[d], dtype=torch.bool), shape, p.device))[0]
                mask[s.offset:s.offset + s.length] &= k
        return {name: mask.view(shape).to(device) for name, (mask, shape, device) in out.items()}


class Sparsifier:
    """Zeroes the least important parts of a model's layers and keeps masks to hold them at zero.

    `granularity`: 'weight', 'vector', 'kernel', 'column', 'filter' or 'row' (whole channel groups, prunable
    by `Pruner`), 'N:M' such as '2:4', or a tuple of weight dims to score together (see `GRANULARITIES`).
    `method`: 'local' (each layer to the target) or 'global' (one threshold, scores normalised per layer).
    `criteria`: a name in `CRITERIA`, a `Criterion`, or a function of the weight.
    `layer_type`: the layer type(s) to sparsify (a group is targeted when one of its producers is one).
    `example_input`: a tensor or shape for tracing at 'filter' granularity (guessed when None).
    `leaf_modules`: names or types of modules the tracer keeps whole ('filter'; see `graph.trace`).
    `exclude`: qualified names of modules (or the modules) whose layers are left dense.
    `round_to`: at 'filter' and 'local', round each group's kept channels to a multiple of it (8 or 16 suit
    vectorised kernels; a group smaller than it is left whole).
    A model wrapped in DataParallel or DistributedDataParallel is sparsified through its `module`; under DDP
    every process computes the same masks (the weights, and the gradients after backward, agree).
    """
    def __init__(self, model, granularity='filter', method='local', criteria='l1', layer_type=nn.Conv2d,
                 example_input=None, leaf_modules=(), exclude=(), round_to=None):
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)): model = model.module
        check_model(model)
        self.model, self.granularity = model, resolve_granularity(granularity)
        self.method, self.criterion = check_method(method), resolve_criterion(criteria)
        if isinstance(self.granularity, NM) and method == 'global':
            raise ValueError("N:M sparsity is the same count in every block: use method='local'")
        check_round_to(round_to)
        if round_to is not None and (self.granularity != FILTER or method != 'local'):
            raise ValueError("round_to rounds the kept channels of each group: it needs granularity='filter' and "
                             "method='local'")
        self.round_to = round_to
        self.layers = find_layers(model, layer_type, exclude)
        self.excluded = _excluded(model, exclude)
        self.frozen = {}   # targeted layer name -> why it cannot be sparsified at this granularity
        self.targets = self._targets(example_input, leaf_modules)
        self.scored = {n: m for t in self.targets for n, m in t.scored().items()}   # layers whose weights are scored
        self.masks, self._drops, self._counts = {}, {}, None
        self._target_masks = [None] * len(self.targets)   # each target's own masks, kept until its count changes
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self.ref, self.acc = {}, {}   # criterion state: reference weights, accumulated gradient statistics
        if self.criterion.needs_ref: self.set_reference()

    def _targets(self, example_input, leaf_modules):
        g = self.granularity
        if isinstance(g, NM): return [_NMTarget(n, m, g) for n, m in self.layers.items()]
        if g != FILTER: return [_WeightTarget(n, m, layer_dims(g, n, m.weight)) for n, m in self.layers.items()]
        self.graph = trace(self.model, example_input, leaf_modules)
        modules, targets = self.graph.modules(), []
        for g in self.graph.groups:
            mine = [s.module for s in g.by_role('out') if s.module in self.layers]
            if not mine: continue
            kept = [s.module for s in g.slices if s.role != 'in' and s.module in self.excluded]
            if kept: self.frozen.update({n: f"shares its filters with excluded layer '{kept[0]}'" for n in mine})
            elif g.prunable: targets.append(_GroupTarget(g, modules, mine, self.round_to))
            else: self.frozen.update({n: '; '.join(g.frozen) for n in mine})
        if not targets:
            raise ValueError(f'no {", ".join(sorted({type(m).__name__ for m in self.layers.values()}))} filter '
                             f'of {type(self.model).__name__} can be sparsified: {self.frozen}')
        return targets

    # ------------------------------------------------------------ criterion state
    @torch.no_grad()
    def set_reference(self, names=None):
        "Take the current weights of the scored layers (or of `names`) as the reference of init-based criteria."
        self.ref.update({n: self.scored[n].weight.detach().clone() for n in (self.scored if names is None else names)})

    def accumulate(self):
        """Add this step's gradient statistic (after backward, before the optimizer step) for criteria that need
        one; a no-op otherwise. A non-finite statistic (an overflowing step) is skipped."""
        f = self.criterion.accumulate
        if f is None: return
        with torch.no_grad(): self._accumulate(f)

    def _accumulate(self, f):
        for n, m in self.scored.items():
            if m.weight.grad is None: continue
            step = f(m.weight.detach(), m.weight.grad.detach())
            if not finite(step): continue   # an overflowing step must not poison the sum for good
            self.acc[n] = self.acc[n] + step if n in self.acc else step.clone()

    def _weight(self, name):
        "The weight of layer `name`, checked finite (the criterion's statistics for it may be missing: a warning)."
        w = self.scored[name].weight.detach()
        if not finite(w):
            raise ValueError(f"layer '{name}' has NaN or inf weights, which cannot be ranked: the training diverged "
                             'or the model was loaded wrongly (no mask was changed)')
        if self.criterion.accumulate is not None and name not in self.acc:
            warnings.warn(f"criteria '{self.criterion.name}' has no gradient statistics for '{name}' yet: call "
                          'accumulate() after each backward pass (SparsifyCallback does); scoring it as all zeros', stacklevel=4)
        return w

    def score(self, name):
        "The criterion's score of every weight of layer `name`, checked to give one score per weight."
        w = self._weight(name)
        return self._check_shape(self.criterion(w, self.ref.get(name), self.acc.get(name)), w)

    @staticmethod
    def _check_shape(s, w):
        "Scores `s` of weights `w`, or a ValueError unless there is one score per weight."
        if not isinstance(s, torch.Tensor) or s.shape != w.shape:
            raise ValueError(f'criteria must return one score per weight (shape {tuple(w.shape)}), got '
                             f'{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}')
        return s

    def row_scores(self, name, dim, start, length):
        """The summed score of each of the channels [start, start+length) along `dim` of layer `name`'s weight.
        An element-wise criterion scores a block of about a million weights at a time, so a large layer
        needs no full-size temporary."""
        if not self.criterion.elementwise:
            return self.score(name).movedim(dim, 0)[start:start + length].flatten(1).sum(1)
        rows = lambda t: None if t is None else t.detach().movedim(dim, 0)[start:start + length]
        w, ref, acc = rows(self._weight(name)), rows(self.ref.get(name)), rows(self.acc.get(name))
        step = max(1, _BLOCK // max(1, w[0].numel()))
        part = lambda t, i: None if t is None else t[i:i + step]
        return torch.cat([self._check_shape(self.criterion(w[i:i + step], part(ref, i), part(acc, i)), w[i:i + step])
                          .flatten(1).sum(1) for i in range(0, length, step)])

    # ------------------------------------------------------------ sparsify
    def _plan(self, sparsity):
        "Zero units per target ('local') or in all ('global')."
        if isinstance(sparsity, dict):
            return tuple(t.count(max(sparsity.get(n, 0.) for n in t.layers)) for t in self.targets)
        if self.method == 'local':
            return tuple(t.count(sparsity) for t in self.targets)
        return (min(n_zero(sum(t.units for t in self.targets), sparsity),
                    sum(t.units - 1 for t in self.targets)),)   # never a layer emptied

    def check_sparsity(self, sparsity):
        "`sparsity` as a float percentage, or a dict of them by targeted layer name ('local' only)."
        if not isinstance(sparsity, dict): return check_sparsity(sparsity)
        if self.method != 'local': raise ValueError("a sparsity per layer needs method='local'")
        unknown = set(sparsity) - set(self.layers)
        if unknown: raise ValueError(f'sparsity names layers that are not targeted: {sorted(unknown)}; '
                                     f'choose among {sorted(self.layers)}')
        return {k: check_sparsity(v) for k, v in sparsity.items()}

    @torch.no_grad()
    def sparsify(self, sparsity):
        """Zero `sparsity` percent (a number, or a dict by layer name) of the targeted units and apply the masks.
        A target is re-scored only when its count of zero units changes ('global': when the total changes).
        Returns True when the masks changed."""
        rescored = self._rescore(sparsity)
        self.apply_masks()
        if rescored and self.criterion.updating:   # the reference moves only where masks were chosen anew
            self.set_reference([n for t in rescored for n in t.scored()])
        return rescored is not None

    @torch.no_grad()
    def plan_masks(self, sparsity):
        "The keep-masks (parameter name -> bool) `sparsify(sparsity)` would apply, without changing the model."
        self._rescore(sparsity)
        return dict(self.masks)

    def _rescore(self, sparsity):
        "New masks where the counts changed: the targets re-scored (a list), or None when nothing changed."
        counts = self._plan(self.check_sparsity(sparsity))
        if counts == self._counts: return None
        rescored = self._update_masks(counts)
        self._counts = counts
        return rescored

    def _update_masks(self, counts):
        "New masks for the targets whose count changed ('local'; every target for 'global'), then combined."
        if self.method == 'local':
            old = self._counts or (None,) * len(counts)
            rescored = [i for i, k in enumerate(counts) if k != old[i] or self._target_masks[i] is None]
            for i in rescored:
                t = self.targets[i]
                self._target_masks[i] = t.masks(t.drop(t.scores(self), counts[i]))
            self._combine({n for i in rescored for n in self._target_masks[i]})
            rescored = [self.targets[i] for i in rescored]
        else:
            drops = self._global_drops([t.scores(self) for t in self.targets], counts[0])
            self._target_masks, rescored = [t.masks(d) for t, d in zip(self.targets, drops)], self.targets
            self._combine()
        return rescored

    def _combine(self, names=None):
        """`masks` (and how `apply_masks` zeroes what they drop) from every target's own masks, for the parameters
        `names` (all when None); a parameter shared by several targets ANDs their masks."""
        if names is None:
            names, self.masks, self._drops = {n for m in self._target_masks for n in (m or {})}, {}, {}
        for name in names: self.masks.pop(name, None)
        for m in self._target_masks:
            for name, keep in (m or {}).items():
                if name in names: self.masks[name] = self.masks[name] & keep if name in self.masks else keep
        for name in names:
            if (~self.masks[name]).any(): self._drops[name] = mask_drops(self.masks[name], self._params[name])
            else: self._drops.pop(name, None)

    def _global_drops(self, scores, k):
        "One threshold over scores normalised by each layer's mean; each layer's best unit is never dropped."
        normed = []
        for s in scores:
            s = s / s.abs().mean().clamp_min(torch.finfo(s.dtype).tiny)
            s[s.argmax()] = math.inf
            normed.append(s)
        flat = torch.cat(normed)
        drop = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        drop[torch.topk(flat, k, largest=False).indices] = True
        return [d.nonzero().flatten() for d in drop.split([s.numel() for s in scores])]

    @torch.no_grad()
    def apply_masks(self):
        "Set every masked parameter entry to exactly zero (NaN and inf included)."
        for name, (dim, drop) in self._drops.items():
            if dim is None: self._params[name].masked_fill_(drop, 0)
            else: self._params[name].index_fill_(dim, drop, 0)

    # ------------------------------------------------------------ state
    def state_dict(self):
        "Each target's masks, the zero counts they were made for, and the criterion's state: what resuming needs."
        return {'counts': None if self._counts is None else list(self._counts),
                'target_masks': list(self._target_masks), 'ref': dict(self.ref), 'acc': dict(self.acc)}

    @torch.no_grad()
    def load_state_dict(self, state):
        "Restore `state_dict()` (masks are re-applied); a ValueError, with nothing changed, when it does not fit."
        params, unfit = self._params, 'the saved sparsity state does not fit this model: '
        fits = lambda name, keep: name in params and keep.dim() == params[name].dim() and all(
            k in (1, p) for k, p in zip(keep.shape, params[name].shape))
        if len(state['target_masks']) != len(self.targets):
            raise ValueError(unfit + f"{len(state['target_masks'])} targets saved, {len(self.targets)} here")
        for masks in state['target_masks']:
            bad = [n for n, keep in (masks or {}).items() if not fits(n, keep)]
            if bad: raise ValueError(unfit + f'mask {bad[0]!r} has no matching parameter')
        for key in ('ref', 'acc'):
            bad = [n for n, t in state[key].items() if n not in self.scored or t.shape != self.scored[n].weight.shape]
            if bad: raise ValueError(unfit + f'{key} of layer {bad[0]!r}')
        self._counts = None if state['counts'] is None else tuple(state['counts'])
        self._target_masks = [None if m is None else {k: v.to(params[k].device) for k, v in m.items()}
                              for m in state['target_masks']]
        self._combine()
        self.ref, self.acc = ({n: t.to(self.scored[n].weight.device) for n, t in state[key].items()} for key in ('ref', 'acc'))
        self.apply_masks()

    # ------------------------------------------------------------ reports
    def _targeted(self):
        "Name -> layer for every layer of `layer_type` that some target sparsifies."
        return {n: self.layers[n] for t in self.targets for n in t.layers}

    def layer_sparsity(self):
        "Targeted layer name -> percentage of exactly-zero weights."
        return {n: 100 * (m.weight == 0).sum().item() / m.weight.numel() for n, m in self._targeted().items()}

    def sparsity(self):
        "Measured percentage of exactly-zero weights over all targeted layers."
        ws = [m.weight.detach() for m in self._targeted().values()]
        nonzero = torch.stack([torch.count_nonzero(w).to(ws[0].device) for w in ws]).sum().item()   # one sync
        total = sum(w.numel() for w in ws)
        return 100 * (total - nonzero) / total

    def print_sparsity(self):
        "Print each layer of `layer_type`: its shape, zero weights and sparsity, then the targeted total."
        rows = [('Layer', 'Type', 'Weight shape', 'Zeros', 'Sparsity')]
        for n, m in self.layers.items():
            z, total = (m.weight == 0).sum().item(), m.weight.numel()
            note = f'  (frozen: {self.frozen[n]})' if n in self.frozen else ''
            rows.append((n, type(m).__name__, 'x'.join(map(str, m.weight.shape)), f'{z:,}/{total:,}',
                         f'{100 * z / total:.2f}%{note}'))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows: print('  '.join(c.ljust(w) for c, w in zip(r, widths)) + '  ' + r[4])
        print(f'Sparsity of the targeted layers: {self.sparsity():.2f}%')


def __getattr__(name):
    if name == 'SparsifyCallback':   # the callback imports fastai; the Sparsifier does not need it
        from .callback import SparsifyCallback
        return SparsifyCallback
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
