"""What the Sparsifier zeroes, one target at a time: a layer's weights (scored element-wise or in blocks), N:M
blocks, or a channel group (scored by its producers' rows). Each target counts its units for a sparsity, scores
them, picks the units to drop and gives the keep-masks that drop them.
"""
import math
from dataclasses import replace

import torch
import torch.nn as nn

from .granularity import HEAD, NM, STRUCTURAL, layer_dims
from .graph import Group, trace
from .layers import LAYERS, kind_of, known_base

__all__ = ['weights_of', 'WeightView', 'WeightTarget', 'NMTarget', 'GroupTarget', 'RoutedTarget', 'make_targets', 'round_half_up', 'n_zero', 'by_mean', 'pname']


def pname(layer, name):
    "The qualified name of parameter `name` of the module named `layer` ('' for the model itself)."
    return f'{layer}.{name}' if layer else name



def round_half_up(x):
    "The one rounding rule of the library: to the nearest int, halves up (2.5 -> 3), float noise forgiven."
    return math.floor(x + 0.5 + 1e-9)


def n_zero(units, sparsity):
    "How many of `units` make `sparsity` percent, rounding half up: 30% of 20 is 6, 7.5% of 20 is 2."
    return round_half_up(units * sparsity / 100)


def by_mean(scores):
    "Scores divided by their mean magnitude, so that layers of different size and scale compare."
    return scores / scores.abs().mean().clamp_min(torch.finfo(scores.dtype).tiny)


def weights_of(module):
    """The names of `module`'s weights: 'weight', or for a layer without one its own parameters named weight*
    (an LSTM's weight_ih_l0 and weight_hh_l0, fastai's WeightDropout's weight_hh_l0_raw)."""
    if isinstance(getattr(module, 'weight', None), torch.Tensor): return ('weight',)
    kind = kind_of(module)
    if kind is not None and isinstance(getattr(module, kind.weight or '', None), torch.Tensor): return (kind.weight,)
    return tuple(n for n, _ in module.named_parameters(recurse=False) if n.startswith('weight'))


class WeightView:
    "One weight of a layer that has several (an LSTM's `weight_ih_l0`), seen as the `.weight` the scoring reads."
    def __init__(self, module, wname): self.module, self.wname = module, wname
    @property
    def weight(self): return getattr(self.module, self.wname)


class WeightTarget:
    """One weight of a layer ('weight', or `wname` such as an LSTM's 'weight_hh_l0'), scored in blocks summed over
    `dims` ('weight': each element; 'kernel': each k x k kernel)."""
    def __init__(self, name, module, dims, wname='weight'):
        self.key = name if wname == 'weight' else pname(name, wname)   # the name it is scored and masked by
        self.name, self.dims, self.layers, self.wname = name, dims, [name], wname
        self.module = module if wname == 'weight' else WeightView(module, wname)
        w = self.module.weight
        self.shape = tuple(1 if d in dims else s for d, s in enumerate(w.shape))
        self.units = math.prod(self.shape)

    def count(self, sparsity): return n_zero(self.units, sparsity)

    def scored(self): return {self.key: self.module}

    def scores(self, sp):
        s = sp.score(self.key)
        return (s.sum(self.dims, keepdim=True) if self.dims else s).flatten().float()

    def drop(self, scores, k): return torch.topk(scores, k, largest=False).indices

    def zero_units(self):
        "Bool per unit: all its weights are exactly zero."
        live = self.module.weight.detach() != 0
        return ~(live.any(dim=self.dims, keepdim=True) if self.dims else live).flatten().cpu()

    def masks(self, drop):
        keep = torch.ones(self.units, dtype=torch.bool, device=self.module.weight.device)
        keep[drop] = False
        return {pname(self.name, self.wname): keep.view(self.shape)}


class NMTarget:
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

    def zero_units(self):
        "None: an N:M pattern is chosen anew in every block, so zeros found are not held."
        return None

    def masks(self, drop):
        w = self.module.weight
        keep = torch.ones(w.numel() // self.nm.m, self.nm.m, dtype=torch.bool, device=w.device)
        keep.scatter_(1, drop.to(w.device), False)
        moved = w.movedim(1, -1).shape
        return {pname(self.name, 'weight'): keep.view(moved).movedim(-1, 1)}


class GroupTarget:
    "A channel group: scored by its producers' rows, zeroed in every producer row, bias and norm."
    def __init__(self, group, modules, layer_names, round_to=None):
        self.group, self.modules, self.units = group, modules, group.units
        self.layers, self.round_to = layer_names, round_to
        self.name = '+'.join(s.module for s in group.by_role('out'))
        self.origin = self.units   # units before any pruning (SparsifyCallback(prune_every=...) sets it)

    def count(self, sparsity):
        """Units to zero: round(sparsity% of them), keeping one; with `round_to`, kept channels a multiple of it.
        The percentage is of `origin` units: a group a pruning made smaller counts its removed units as zero."""
        drop = self._unrounded(sparsity)
        if not self.round_to or drop == 0: return drop
        step = self.step()
        kept = max(step, step * round_half_up((self.units - drop) / step))
        return max(self.units - kept, 0)

    def step(self):
        "Kept units per multiple of `round_to` channels (None: no rounding)."
        if not self.round_to: return None
        return self.round_to // math.gcd(self.round_to, self.group.tie * self.group.width)   # (tie * width: per unit)

    def _unrounded(self, sparsity):
        "Units to zero before `round_to`: round(sparsity% of `origin`), less those a pruning removed, keeping one."
        return min(max(n_zero(self.origin, sparsity) - (self.origin - self.units), 0), self.units - 1)

    def scored(self):
        "Producer name -> what the scoring reads as its `.weight` (the module, or a view of its kind's weight)."
        out = {}
        for s in self.group.by_role('out'):
            m = self.modules[s.module]
            w = kind_of(m).weight
            out[s.module] = m if w == 'weight' else WeightView(m, w)
        return out

    def scores(self, sp):
        """Each unit's score: the sum over the group's producers of their row scores, each divided by its mean
        (a unit of tied channels sums its channels)."""
        total = torch.zeros(self.group.size)
        for s in self.group.by_role('out'):
            rows = sp.row_scores(s.module, kind_of(self.modules[s.module]).out_dim, s.offset, s.length).float().cpu()
            total[s.start:s.start + s.length] += by_mean(rows)
        return self.group.per_unit(total, 'sum')

    def drop(self, scores, k): return torch.topk(scores, k, largest=False).indices

    def zero_units(self, below=0.):
        """Bool per unit: every entry its masks cover (producer rows and biases, norm scales and shifts) is zero (of a
        magnitude at most `below`)."""
        live = torch.zeros(self.group.size, dtype=torch.bool)
        for s in self.group.slices:
            if s.role == 'in': continue
            m = self.modules[s.module]
            for name, d in kind_of(m).rows(s.role):
                p = getattr(m, name, None)
                if p is None: continue
                rows = (~(p.detach().abs() <= below)).movedim(d, 0).reshape(p.shape[d], -1).any(1).cpu()
                live[s.start:s.start + s.length] |= rows[s.offset:s.offset + s.length]
        return ~self.group.per_unit(live, 'any')

    def masks(self, drop):
        "Keep-masks for every producer row and bias, depthwise row and bias, and norm scale and shift."
        keep = torch.ones(self.units, dtype=torch.bool)
        keep[drop] = False
        keep, out = self.group.channels(keep), {}
        for s in self.group.slices:
            if s.role == 'in': continue
            m, k = self.modules[s.module], keep[s.start:s.start + s.length]
            for name, d in kind_of(m).rows(s.role):
                p = getattr(m, name, None)
                if p is None: continue
                shape = [1] * p.dim(); shape[d] = -1
                new = (torch.ones(p.shape[d], dtype=torch.bool), shape, p.device)
                mask = out.setdefault(pname(s.module, name), new)[0]
                mask[s.offset:s.offset + s.length] &= k
        return {name: mask.view(shape).to(device) for name, (mask, shape, device) in out.items()}

    def dropped(self, masks):
        "Bool per unit: `masks` (this target's own, as `masks` made them; None: none) drop it."
        drop = torch.zeros(self.group.size, dtype=torch.bool)
        for s in self.group.slices:
            if s.role == 'in' or masks is None: continue
            for name, _ in kind_of(self.modules[s.module]).rows(s.role):
                keep = masks.get(pname(s.module, name))
                if keep is None: continue
                drop[s.start:s.start + s.length] |= ~keep.flatten().cpu()[s.offset:s.offset + s.length]
        return self.group.per_unit(drop, 'all')

    def state(self, units):
        """(qualified name, tensor, dim, indices) of every tensor entry that holds `units` (bool per unit): producer
        rows and biases, depthwise rows, norm scales, shifts and running statistics."""
        ch = self.group.channels(units)
        for s in self.group.slices:
            if s.role == 'in': continue
            idx = ch[s.start:s.start + s.length].nonzero().flatten() + s.offset
            if not len(idx): continue
            m, kind = self.modules[s.module], kind_of(self.modules[s.module])
            extra = [(b, 0) for b in kind.buffers] if s.role == 'norm' else []
            for name, d in [*kind.rows(s.role), *extra]:
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor): yield pname(s.module, name), t, d, idx




class RoutedTarget(GroupTarget):
    """The groups a channel shuffle lays out (`routing.Cluster`), as one target of `len(groups) * size` units (group
    i's channel c is unit i*size + c): every group keeps the same feasible width, and of each signature (the layers
    a channel reaches) its quota of channels, the best by score."""
    def __init__(self, groups, cluster, modules, layer_names, round_to=None):
        n = cluster.size
        slices = [replace(s, start=s.start + i * n) for i, g in enumerate(groups) for s in g.slices]
        super().__init__(Group(groups[0].id, n * len(groups), slices), modules, layer_names, round_to)
        self.cluster, self.ids, self.last = cluster, [g.id for g in groups], None

    def width(self, kept):
        "The feasible width nearest `kept` channels per group (with `round_to`, a multiple of it where one is)."
        ws = self.cluster.widths()
        if self.round_to: ws = [w for w in ws if w % self.round_to == 0 or w == self.cluster.size] or ws
        return min(ws, key=lambda w: (abs(w - kept), -w))

    def count(self, sparsity):   # (rounded once, by `width`: a multiple of round_to per group, not in all)
        kept = (self.units - self._unrounded(sparsity)) / len(self.ids)
        return self.units - len(self.ids) * self.width(kept)

    def scores(self, sp):
        self.last = super().scores(sp)
        return self.last

    def drop(self, scores, k):
        self.last = scores
        return self._feasible(torch.topk(scores, k, largest=False).indices)

    def masks(self, drop): return super().masks(self._feasible(drop))

    def cumulative(self, per, order):
        """Row k: what leaves each cost column (`per`: a row per unit) when the first k units of `order` drop, as the
        drop is made feasible: the width nearest what they keep, fewer channels of each signature (all of one
        signature reach the same layers, so which ones does not matter)."""
        c, n = self.cluster, len(self.ids)
        index = {g: i * c.size for i, g in enumerate(self.ids)}
        sums = {key: per[torch.tensor(ch) + index[key[0]]].sum(0) for key, ch in c.members().items()}
        at = {}
        for w in c.widths():
            q = c.quotas(w)
            at[w] = sum((1 - q[key] / len(ch)) * sums[key] for key, ch in c.members().items())
        return torch.stack([at[self.width((self.units - k) / n)] for k in range(self.units + 1)])

    def _feasible(self, drop):
        """The units a feasible choice drops: the width nearest what `drop` keeps, and of each signature the channels
        `drop` keeps first, then the best scored."""
        n, size = len(self.ids), self.cluster.size
        kept = torch.ones(self.units, dtype=torch.bool)
        kept[drop] = False
        score = self.last if self.last is not None else torch.zeros(self.units)
        order = torch.empty(self.units)
        order[score.float().argsort()] = torch.arange(self.units, dtype=torch.float) / self.units   # in [0, 1)
        rank = (kept.float() + order).view(n, size)
        keep = self.cluster.choose(self.width(int(kept.sum()) / n), dict(zip(self.ids, rank)))
        return (~torch.cat([keep[g] for g in self.ids])).nonzero().flatten()


def _not_kinds(layers):
    "Layer name -> why, for the targeted layers that are not layer kinds (an LSTM: no filters to remove)."
    def why(m):
        name = type(m).__name__
        if isinstance(m, nn.RNNBase):
            return (f'{name} is not a layer kind whose filters fasterai can remove (a hidden unit of a recurrent layer '
                    "mixes its gates over time, not one row of one weight): sparsify it at granularity='weight'")
        return (f'{name} is not a layer kind fasterai knows (registered: {sorted(t.__name__ for t in LAYERS)}): '
                "describe it with fasterai.register_layer, or sparsify it at granularity='weight'")
    return {n: why(m) for n, m in layers.items() if kind_of(m) is None and known_base(m) is None}


def _summary(frozen, n=3):
    "The first `n` distinct reasons of `frozen` (layer -> reason), each with a layer it holds and how many more."
    by = {}
    for layer, reason in frozen.items(): by.setdefault(reason, []).append(layer)
    parts = [f"'{ls[0]}'" + (f' (and {len(ls) - 1} more)' if len(ls) > 1 else '') + f': {r}'
             for r, ls in list(by.items())[:n]]
    more = f'; {len(by) - n} more reasons (print(fasterai.graph.trace(model, example_input)) lists every group)' if len(by) > n else ''
    return '; '.join(parts) + more


def _heads_known():
    return ', '.join(sorted(f'{t.__module__.partition(".")[0]} {t.__name__}' for t, k in LAYERS.items()
                            if 'heads' in k.sizes)) or "timm's Attention"


def make_targets(model, granularity, layers, excluded, round_to=None, example_input=None, leaf_modules=()):
    """The targets of `granularity` over `layers` (name -> module; `excluded`: names left dense), the channel graph
    at 'filter' (else None), and targeted layer name -> why it cannot be sparsified at this granularity."""
    if isinstance(granularity, NM):
        bad = [n for n, m in layers.items() if weights_of(m) != ('weight',)]
        if bad: raise ValueError(f"N:M sparsity takes layers with one weight matrix; '{bad[0]}' has "
                                 f'{list(weights_of(layers[bad[0]]))}: use granularity=\'weight\' for it')
        return [NMTarget(n, m, granularity) for n, m in layers.items()], None, {}
    if granularity not in STRUCTURAL:
        return [WeightTarget(n, m, layer_dims(granularity, n, getattr(m, w)), w)
                for n, m in layers.items() for w in weights_of(m)], None, {}
    if len(_not_kinds(layers)) == len(layers):   # nothing to trace for
        raise ValueError(f'no filter of {type(model).__name__} can be sparsified: {_summary(_not_kinds(layers))}')
    graph = trace(model, example_input, leaf_modules)
    modules, targets, frozen = graph.modules(), [], {}
    for g in graph.groups:
        mine = [s.module for s in g.by_role('out') if s.module in layers]
        if not mine or (granularity == HEAD and not g.by_role('heads')) or g.route is not None: continue
        kept = [s.module for s in g.slices if s.role != 'in' and s.module in excluded]
        if kept: frozen.update({n: f"shares its filters with excluded layer '{kept[0]}'" for n in mine})
        elif g.prunable: targets.append(GroupTarget(g, modules, mine, round_to))
        else: frozen.update({n: '; '.join(g.frozen) for n in mine})
    for c in graph.routes if granularity != HEAD else ():
        groups = [graph.groups[i] for i in c.groups]
        mine = [s.module for g in groups for s in g.by_role('out') if s.module in layers]
        if not mine: continue
        kept = [s.module for g in groups for s in g.slices if s.role != 'in' and s.module in excluded]
        left = [s.module for g in groups for s in g.by_role('out') if s.module not in layers]
        if kept or left:
            why = (f"shares its filters with excluded layer '{kept[0]}'" if kept else
                   f"a channel shuffle lays its filters out with those of '{left[0]}', which is not targeted")
            frozen.update({n: why for n in mine})
        else: targets.append(RoutedTarget(groups, c, modules, mine, round_to))
    frozen.update({n: r for n, r in graph.unfollowed.items() if n in layers and n not in frozen and
                   not any(n in t.layers for t in targets)})   # called on channels no layer writes (the input)
    frozen.update(_not_kinds(layers))
    if granularity == HEAD:
        heads = {n for n, m in model.named_modules() if 'heads' in getattr(kind_of(m), 'sizes', {})}
        frozen = {n: r for n, r in {**frozen, **graph.unfollowed}.items() if n in heads or n.rpartition('.')[0] in heads}
        if not targets:
            raise ValueError(f'no attention head of {type(model).__name__} can be sparsified: '
                             f'{_summary(frozen) if frozen else "it has no attention module fasterai knows"} '
                             f"(known: {_heads_known()}; granularity='filter' prunes what else it has)")
    if not targets:
        raise ValueError(f'no {", ".join(sorted({type(m).__name__ for m in layers.values()}))} filter '
                         f'of {type(model).__name__} can be sparsified: {_summary(frozen)}')
    return targets, graph, frozen
