"""Channel shuffles: channels whose positions depend on the channel counts, followed exactly.

A channel shuffle (ShuffleNet's `channel_shuffle`: reshape into groups, transpose, flatten) interleaves channels,
and a `chunk(2)` after it sends each position to a branch by where it now lies. A pruned network runs the same ops
on fewer channels, so every position moves. Tying channel t of one part to channel t of the other cannot follow
that: the ties grow block by block until a whole stage is one unit. Instead the layouts these ops make carry a
*route*, an expression that lays the channels out again for any channel counts, and:

- the spaces a route connects form a *cluster*; each of its channels has a *signature*, the layers (and roles)
  it reaches, so two channels of a space with one signature can trade places;
- a width `k` (every space of a cluster has the same size and keeps `k` channels) is *feasible* when the route,
  run with `k` channels per space, gives each signature no more positions than the full width has channels with
  it; the Sparsifier keeps that many of each signature, the best by score;
- the Pruner takes the smallest feasible width that holds every live channel of each signature (filling with
  zero channels), gives each kept channel a position of its signature, and slices each layer's rows and columns
  in the order the route lays them out at that width (surgery selects indices in any order).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

__all__ = ['Leaf', 'Cat', 'Chunk', 'Shuffle', 'Parts', 'Cluster', 'Infeasible', 'route_of', 'lay_out']


class Infeasible(Exception):
    "The route cannot run at these channel counts (a chunk or a shuffle of a count it does not divide)."


class Leaf(NamedTuple):
    "Channels no route moved: a layout's pieces (whole spaces, once the cluster is built)."
    pieces: tuple


class Cat(NamedTuple):
    "Concatenation along the channels."
    parts: tuple


class Chunk(NamedTuple):
    "Part `index` of `chunk(parts)` along the channels."
    src: object
    parts: int
    index: int


class Shuffle(NamedTuple):
    "A channel shuffle of `groups` groups: output channel j*groups + g is input channel g*(n // groups) + j."
    src: object
    groups: int


class Parts(NamedTuple):
    """A reshape of the channels into (`parts`, channels // parts), not yet flattened back: `src` is the layout
    before it and `parts_dim` where the parts lie now (a transpose moves it). Read by anything but a transpose or
    the flatten back, the parts are tied channel to channel, as a chunk ties them."""
    src: object
    parts: int
    parts_dim: int


def route_of(lay):
    "The route of a layout: its own, or a leaf of its pieces."
    return lay.route if lay.route is not None else Leaf(lay.pieces)


def lay_out(expr, seqs, memo=None):
    """The channels `expr` lays out, in order, when space s holds the channels `seqs[s]` (a list of labels); raises
    Infeasible where a chunk or shuffle does not divide the count."""
    memo = {} if memo is None else memo
    key = id(expr)
    if key in memo: return memo[key]
    if isinstance(expr, Leaf):
        out = [x for p in expr.pieces for x in seqs[p.space]]
    elif isinstance(expr, Cat):
        out = [x for e in expr.parts for x in lay_out(e, seqs, memo)]
    elif isinstance(expr, Chunk):
        src = lay_out(expr.src, seqs, memo)
        if len(src) % expr.parts: raise Infeasible(f'chunk({expr.parts}) of {len(src)} channels')
        n = len(src) // expr.parts
        out = src[expr.index * n:(expr.index + 1) * n]
    elif isinstance(expr, Shuffle):
        src, g = lay_out(expr.src, seqs, memo), expr.groups
        if len(src) % g: raise Infeasible(f'a shuffle of {len(src)} channels in {g} groups')
        n = len(src) // g
        out = [src[i * n + j] for j in range(n) for i in range(g)]
    else: raise TypeError(f'not a route: {expr!r}')
    memo[key] = out
    return out


@dataclass
class Cluster:
    """Channel spaces (group ids, each of `size` channels) that a route connects, with the route of every module
    role that writes, normalises or reads them: `layouts` maps (module, role) to (route over group ids, block)."""
    groups: tuple
    size: int
    layouts: dict
    _cache: dict = field(default_factory=dict, repr=False)

    def sequences(self, k):
        "(module, role) -> the labels (group, position) it sees when each space keeps `k` channels; Infeasible."
        seqs, memo = {g: [(g, j) for j in range(k)] for g in self.groups}, {}
        return {key: lay_out(expr, seqs, memo) for key, (expr, _) in self.layouts.items()}

    def signatures(self, k):
        "Label -> its signature (the module roles it reaches, with how often) at width `k`, or None if infeasible."
        if k not in self._cache:
            try: seqs = self.sequences(k)
            except Infeasible: seqs = None
            sig = None
            if seqs is not None:
                reach = collections.defaultdict(collections.Counter)
                for key, labels in seqs.items():
                    for x in labels: reach[x][key] += 1
                sig = {x: tuple(sorted(c.items())) for x, c in reach.items()}
            self._cache[k] = sig
        return self._cache[k]

    def classes(self, k):
        "(group, signature) -> the positions that have it at width `k`, in order; None when `k` is infeasible."
        sig = self.signatures(k)
        if sig is None: return None
        out = collections.defaultdict(list)
        for g in self.groups:
            for j in range(k): out[(g, sig.get((g, j), ()))].append(j)
        return dict(out)

    def quotas(self, k):
        "(group, signature) -> channels kept at width `k`, or None when the full width cannot give them."
        if k == self.size: return {c: len(p) for c, p in self.classes(k).items()}
        at, full = self.classes(k), self.classes(self.size)
        if at is None or any(len(p) > len(full.get(c, ())) for c, p in at.items()): return None
        return {c: len(at.get(c, ())) for c in full}

    def widths(self):
        "Every feasible width, ascending (the full width always is)."
        if 'widths' not in self._cache:
            self._cache['widths'] = [k for k in range(1, self.size + 1) if self.quotas(k) is not None]
        return self._cache['widths']

    def members(self):
        "(group, signature) -> the channels of the full width that have it, in order."
        return self.classes(self.size)

    def choose(self, k, rank):
        """Channels kept per group at feasible width `k`: of each signature, its quota of channels ranked first by
        `rank` (group -> a score per channel, higher kept first; ties to the lower channel). Returns group -> bool."""
        keep = {g: torch.zeros(self.size, dtype=torch.bool) for g in self.groups}
        for (g, s), n in self.quotas(k).items():
            chans = torch.tensor(self.members()[(g, s)], dtype=torch.long)
            order = sorted(range(len(chans)), key=lambda i: (-float(rank[g][chans[i]]), int(chans[i])))
            keep[g][chans[order[:n]]] = True
        return keep

    def fit(self, live):
        """The smallest feasible width whose quotas hold every `live` channel (group -> bool per channel) of each
        signature, and the channels each group keeps there (its live ones, then zero ones of the same signature)."""
        members = self.members()
        need = {c: int(live[c[0]][torch.tensor(ch, dtype=torch.long)].sum()) for c, ch in members.items()}
        k = next(k for k in self.widths() if all(n <= self.quotas(k)[c] for c, n in need.items()))
        return k, self.choose(k, {g: live[g].float() for g in self.groups})

    def orders(self, keep, k):
        """(module, role) -> the indices of its channels the pruned module keeps, in the order the route lays them
        out at width `k` when group g keeps the channels `keep[g]` (a feasible choice: `choose`)."""
        full, at, cls = self.sequences(self.size), self.sequences(k), self.classes(k)
        sig_full = self.signatures(self.size)
        pos = {}   # label at width k -> the kept channel that takes that position
        for g in self.groups:
            by_sig = collections.defaultdict(list)
            for c in keep[g].nonzero().flatten().tolist(): by_sig[sig_full.get((g, c), ())].append(c)
            for (h, s), positions in cls.items():
                if h != g: continue
                if len(by_sig[s]) != len(positions):
                    raise AssertionError(f'group {g} keeps {len(by_sig[s])} channels of a signature with '
                                         f'{len(positions)} positions at width {k}')
                pos.update({(g, j): (g, c) for j, c in zip(positions, by_sig[s])})
        out = {}
        for key, labels in at.items():
            where = collections.defaultdict(list)   # a label the module sees twice has two offsets
            for i, x in enumerate(full[key]): where[x].append(i)
            seen = collections.Counter()
            idx = []
            for x in labels:
                y = pos[x]
                idx.append(where[y][seen[y]]); seen[y] += 1
            block = self.layouts[key][1]
            t = torch.tensor(idx, dtype=torch.long)
            out[key] = (t[:, None] * block + torch.arange(block)).flatten() if block != 1 else t
        return out
