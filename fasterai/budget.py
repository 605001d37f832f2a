"""Budgets: sparsify and prune to a ratio of MACs, of parameters or of measured latency instead of a percentage.

`MACs(0.5)` asks for half the multiply-accumulates of the dense model, `Params(0.3)` for 30% of its parameters,
`Latency(0.5, batch_size=64)` for half its median CPU latency on this machine. A `CostModel` gives the cost of a
plan (which units of which channel group go) from the channel graph: the cost of each layer is a sum of terms, each
a coefficient times the product of the fractions of channels it keeps on the sides the term scales with
(a convolution's MACs: dense MACs x kept inputs x kept outputs; a BatchNorm's parameters: x kept channels). For
MACs and parameters the coefficients are counted (`torch.utils.flop_counter`, the layers' own tensors), so the
cost of a plan is the pruned model's cost, exactly; for latency they come from a table of each layer timed alone
at full and half widths on this machine, and the plan is then checked by timing pruned copies.
"""
import copy
import math
import numbers

import torch

from .layers import kind_of

__all__ = ['Budget', 'MACs', 'Params', 'Latency', 'BUDGETS', 'check_budget', 'reached', 'CostModel', 'plan_drops']


class Budget:
    "A cost to reach, as a ratio of the dense model's (0 < ratio <= 1)."
    metric = None
    def __init__(self, ratio):
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 1:
            raise ValueError(f'{type(self).__name__} takes a ratio of the dense model in (0, 1], got {ratio!r}')
        self.ratio = float(ratio)   # the cost asked, over the dense model's

    def at(self, ratio):
        "The same budget at another ratio (the schedule ramps it)."
        new = copy.copy(self)
        new.ratio = float(ratio)
        return new

    def __eq__(self, other): return type(other) is type(self) and vars(other) == vars(self)
    def __hash__(self): return hash((type(self), tuple(sorted(vars(self).items()))))
    def __repr__(self): return f'{type(self).__name__}({self.ratio:g})'


class MACs(Budget):
    "Multiply-accumulates of one forward pass, as `count_macs` counts them, over the dense model's."
    metric = 'MACs'


class Params(Budget):
    "Parameters, as `count_params` counts them, over the dense model's."
    metric = 'parameters'


class Latency(Budget):
    """Median CPU latency of one eval-mode forward pass at `batch_size` with `threads` threads (default: torch's
    setting), over the dense model's, measured on this machine."""
    metric = 'latency'
    def __init__(self, ratio, batch_size=64, threads=None):
        super().__init__(ratio)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f'batch_size must be a positive int, got {batch_size!r}')
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f'threads must be a positive int or None (torch.get_num_threads()), got {threads!r}')
        self.batch_size, self.threads = batch_size, threads   # the batch the latency is timed at; CPU threads

    def __repr__(self): return f'Latency({self.ratio:g}, batch_size={self.batch_size}, threads={self.threads})'


BUDGETS = {'macs': MACs, 'params': Params, 'latency': Latency}
"The budgets by name."


def check_budget(budget):
    "`budget` if it is a Budget, or a ValueError naming the choices."
    if isinstance(budget, Budget): return budget
    raise ValueError(f'a budget must be one of {", ".join(f"{c.__name__}(ratio)" for c in BUDGETS.values())}, '
                     f'got {budget!r}')


def reached(budget, dense, pruned, example_input):
    "`pruned`'s cost of `budget`'s kind over `dense`'s: MACs and parameters counted, latency timed (interleaved)."
    from .report import count_macs, count_params
    if isinstance(budget, MACs): return count_macs(pruned, example_input) / count_macs(dense, example_input)
    if isinstance(budget, Params): return count_params(pruned) / count_params(dense)
    from .latency import batch_of, latency_ratio
    return latency_ratio(pruned, dense, batch_of(dense, example_input, budget.batch_size), budget.threads)


class CostModel:
    """The cost (MACs, parameters or modelled latency) of a model as a function of the units its channel-group
    targets drop: `cost(ks)` when target `i` drops the first `ks[i]` units of its `order(i)`.

    Each (module, role) a target's slices touch is a column with its channel count; a term is a coefficient times
    the product of the kept fractions of its columns; what no target can change is a constant."""
    def __init__(self, model, targets, budget, example):
        self.targets, self.budget = targets, check_budget(budget)
        self.cols, self.n = {}, []
        self.parts = []   # per target: (column indices, (units, columns) channels each unit removes from each)
        for t in targets:
            g = t.group
            unit = g.channels(torch.arange(g.units))   # the unit each channel of the group belongs to
            per = {}
            for s in g.slices:
                col = self._col(s.module, s.role, model)
                n = torch.bincount(unit[s.start:s.start + s.length], minlength=g.units).double() * s.block
                per[col] = per.get(col, 0) + n
            cols = sorted(per)
            self.parts.append((torch.tensor(cols), torch.stack([per[c] for c in cols], 1)))
        terms = _terms(model, self.cols, budget, example)
        self.const = float(sum(c for c, cols in terms if not cols))
        terms = [(c, cols) for c, cols in terms if cols]
        width = max([len(cols) for _, cols in terms] or [1])
        none = len(self.n)   # a column whose kept fraction is always 1
        self.coef = torch.tensor([c for c, _ in terms], dtype=torch.float64)
        self.term_cols = torch.tensor([list(cols) + [none] * (width - len(cols)) for _, cols in terms],
                                      dtype=torch.long).view(-1, width)
        self.channels = torch.tensor(self.n + [1], dtype=torch.float64)
        self.dense = self.cost_of(torch.zeros(len(self.n)))
        self.orders = None
        self.measured = []   # (modelled ratio, measured ratio) of plans timed on pruned copies (`Sparsifier.calibrate`)
        self.pinned = {}     # ratio asked -> the modelled ratio whose plan timed closest to it
        self.plans = {}      # ratio asked -> the drops of a finer plan that timed closer still (`calibrate(fine=)`)
        self.plan_ratio = {}  # ratio asked -> what that finer plan timed
        self.timed = 0       # plans the last calibration timed

    def floor(self):
        """The modelled ratio with every target at its narrowest: one unit, or one step of its `round_to` (its width
        when narrower)."""
        return self.cost_of(self.dropped([torch.arange(min(_steps(t) or 1, t.units), t.units)
                                          for t in self.targets])) / self.dense

    def _col(self, module, role, model):
        key = (module, role)
        if key not in self.cols:
            m = model.get_submodule(module)
            self.cols[key] = len(self.n)
            self.n.append(kind_of(m).channels(m, role))
        return self.cols[key]

    def kept(self, dropped):
        """Per column, the fraction of channels kept when `dropped` channels (a vector by column, or rows of them)
        go; 1 appended."""
        dropped = dropped.double()
        return 1 - torch.cat([dropped, dropped.new_zeros(*dropped.shape[:-1], 1)], -1) / self.channels

    def cost_of(self, dropped):
        "The cost when `dropped` channels (a vector by column) go."
        return self.costs_of(dropped.view(1, -1))[0]

    def costs_of(self, dropped):
        "The cost of each row of `dropped` (channels gone, a row per plan and a column per column), as a list."
        return (self.const + (self.kept(dropped)[:, self.term_cols].prod(2) * self.coef).sum(1)).tolist()

    def dropped(self, drops):
        "Channels removed per column when target `i` drops units `drops[i]` (indices or a bool per unit)."
        out = torch.zeros(len(self.n), dtype=torch.float64)
        for (cols, per), d in zip(self.parts, drops): out.index_add_(0, cols, per[d].view(-1, len(cols)).sum(0))
        return out

    def savings(self, dropped):
        """Per target, the cost each unit saves at the kept fractions `dropped` leaves (the gradient of the cost,
        so the first unit of a fresh layer counts as much as the last)."""
        f = self.kept(dropped)
        grads = torch.zeros(len(self.n) + 1, dtype=torch.float64)
        for j in range(self.term_cols.shape[1]):
            others = torch.cat([f[self.term_cols[:, :j]], f[self.term_cols[:, j + 1:]]], 1).prod(1)
            grads.index_add_(0, self.term_cols[:, j], self.coef * others)
        rate = grads[:-1] / self.channels[:-1]
        return [per @ rate[cols] for cols, per in self.parts]

    # ------------------------------------------------------------ plans: target i drops its first ks[i] units
    def set_orders(self, orders):
        "Each target's units in the order they go (a permutation per target), and their cumulative removals."
        self.orders = orders
        self.cum = [t.cumulative(per, o) if hasattr(t, 'cumulative') else   # (the units a shuffle lays out go
                    torch.cat([torch.zeros(1, len(cols), dtype=torch.float64), per[o].cumsum(0)])   # in steps)
                    for t, (cols, per), o in zip(self.targets, self.parts, orders)]

    def dropped_at(self, ks):
        "Channels removed per column when target `i` drops the first `ks[i]` units of its order."
        out = torch.zeros(len(self.n), dtype=torch.float64)
        for (cols, _), c, k in zip(self.parts, self.cum, ks): out.index_add_(0, cols, c[k])
        return out

    def cost(self, ks):
        "The cost when target `i` drops the first `ks[i]` units of its order."
        return self.cost_of(self.dropped_at(ks))

    def ratio(self, ks): return self.cost(ks) / self.dense

    def costs_with(self, ks, changes):
        "For each `(i, k)` of `changes`, the cost when target `i` drops its first `k` units and the others `ks`."
        if not changes: return []
        rows = self.dropped_at(ks).repeat(len(changes), 1)
        for r, (i, k) in enumerate(changes):
            cols, c = self.parts[i][0], self.cum[i]
            rows[r].index_add_(0, cols, c[k] - c[ks[i]])
        return self.costs_of(rows)

    def _points(self): return sorted({(1., 1.), *self.measured})

    def measured_for(self, modelled):
        "The ratio a plan with this `modelled` ratio measures: `modelled` until plans were measured, then interpolated."
        pts = self._points()
        if len(pts) < 2: return modelled
        return _interpolate([p[0] for p in pts], [p[1] for p in pts], modelled)

    def modelled_for(self, ratio):
        """The modelled ratio to plan for so that the measured one is `ratio`: the model itself until plans were
        measured, then interpolated (linearly, extrapolated from the nearest two) through the dense model (1, 1)
        and the measured plans."""
        if round(ratio, 9) in self.pinned: return self.pinned[round(ratio, 9)]
        return modelled_for(self.measured, ratio)


def modelled_for(measured, ratio):
    """The modelled ratio to plan for so that the measured one is `ratio`, from `measured` (modelled, measured)
    pairs and the dense model (1, 1); `ratio` itself when none was measured."""
    pts = sorted({(1., 1.), *measured}, key=lambda p: p[1])
    if len(pts) < 2: return ratio
    return min(max(_interpolate([p[1] for p in pts], [p[0] for p in pts], ratio), 1e-6), 1.)


def next_guess(timed, ratio):
    """The modelled ratio to time next for a measured `ratio`: interpolated through the `timed` (modelled, measured)
    points, but kept within the middle half of the closest pair that brackets it (latency falls in steps where
    widths cross the multiples the kernels prefer, and interpolating across a step creeps towards it)."""
    guess = modelled_for(timed, ratio)
    below = [p for p in timed if p[1] <= ratio]
    above = [p for p in (*timed, (1., 1.)) if p[1] > ratio]
    if below and above:
        lo, hi = max(below, key=lambda p: p[1])[0], min(above, key=lambda p: p[1])[0]
        a, b = sorted((lo, hi))
        guess = min(max(guess, a + (b - a) / 4), b - (b - a) / 4)
    return guess


def _interpolate(xs, ys, x):
    "y at `x` on the broken line through the points (xs sorted), extrapolated from the nearest two."
    i = min(max(next((j for j, v in enumerate(xs) if v >= x), len(xs) - 1), 1), len(xs) - 1)
    (x0, y0), (x1, y1) = (xs[i - 1], ys[i - 1]), (xs[i], ys[i])
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0) if x1 != x0 else y0


def _terms(model, cols, budget, example):
    "(coefficient, columns) of every term of the model's cost; columns () for what no target changes."
    roles = {}
    for (m, r), c in cols.items(): roles.setdefault(m, {})[r] = c
    if isinstance(budget, MACs):
        from .report import macs_by_module
        proj = _projection_tokens(model, example, [n for n, r in roles.items() if 'heads' in r and 'out' in r])
        own, out = macs_by_module(model, example), []
        for n, v in own.items():
            mine = roles.get(n, {})
            if n not in proj: out.append((v, tuple(mine.values()))); continue
            # a module that projects its own heads (nn.MultiheadAttention): the in-projection scales with its inputs
            # and rows, the out-projection (counted here when torch's forward applies its weight itself) with its
            # columns and rows, the attention itself with its heads
            tokens, m = proj[n], model.get_submodule(n)
            inner = tokens * getattr(m, kind_of(m).weight).numel()
            out.append((inner, tuple(c for r, c in mine.items() if r != 'heads')))
            child = f'{n}.out_proj'
            if child not in own and hasattr(m, 'out_proj'):
                outer = tokens * m.out_proj.weight.numel()
                out.append((outer, tuple(roles.get(child, {}).values())))
                inner += outer
            out.append((v - inner, (mine['heads'],)))
        return out
    if isinstance(budget, Params):
        out, seen = [], set()
        for n, m in model.named_modules():
            kind, mine = kind_of(m), roles.get(n, {})
            for p, v in m.named_parameters(recurse=False):
                if id(v) in seen: continue
                seen.add(id(v))
                out.append((v.numel(), tuple(c for r, c in mine.items() if _scales(kind, r, p))))
        return out
    from .latency import latency_terms
    return latency_terms(model, roles, budget, example)


def _projection_tokens(model, example, names):
    """Module name -> the tokens its projections see in one forward pass, for the modules `names` (each applies its
    in-projection `kind.weight` to every token of its one input, as nn.MultiheadAttention's self-attention does)."""
    if not names: return {}
    from .report import count_macs
    tokens, handles = {}, []
    for n in names:
        m = model.get_submodule(n)
        def hook(mod, args, kwargs, n=n):
            q = args[0] if args else kwargs['query']
            tokens[n] = tokens.get(n, 0) + q.numel() // q.shape[-1]
        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try: count_macs(model, example)
    finally:
        for h in handles: h.remove()
    return {n: tokens.get(n, 0) for n in names}


def _scales(kind, role, pname):
    "Whether parameter `pname` of a layer of `kind` holds the channels of `role`."
    if role == 'in': return pname == kind.weight
    if role == 'heads': return False
    return pname in dict(kind.rows(role))


def plan_drops(costs, scores, ratio, method, count, fill=True, trade=False):
    """Per target, the units to drop (indices) so that the cost is at most `ratio` of the dense model's, as little
    below as the units allow. `scores`: per target, its units' scores (-inf: held, dropped first).
    'local': one percentage for every target, the lowest that meets the ratio, each target dropping its lowest
    scores; 'global': the units least important per unit of cost saved (each unit's share of the scores its target
    keeps, `_shares`, times the target's cost to the power `BALANCE`, over the cost the unit saves), ranked over all
    targets, re-ranked once at the costs the first plan leaves. Each
    target keeps its best unit. Then, with `fill`, units are put back while the ratio holds (`_fill`): 'local' where
    the most is dropped, 'global' the best ranked. With `trade` ('global', the final plan: see `_trade`), the costliest
    unit may go back for more of the next ranked ones. `count(p)`: per target, the units a percentage `p` drops
    ('local').
    A ValueError when even that cannot meet the ratio."""
    if method == 'local':
        costs.set_orders([torch.sort(s, stable=True).indices for s in scores])
        ks = count
        _reachable(costs, ks(100), ratio)
        lo, hi = 0., 100.   # lowest percentage that meets the ratio: costs fall as the percentage rises
        if costs.ratio(ks(0)) <= ratio: hi = 0.
        for _ in range(40):
            if hi - lo < 1e-6: break
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if costs.ratio(ks(mid)) <= ratio else (mid, hi)
        chosen = ks(hi)
        # put back first where the most is dropped (the percentage stays as even as the units allow)
        first = lambda i, k: k / max(costs.targets[i].units, 1)
    else:
        dropped = torch.zeros(len(costs.n), dtype=torch.float64)
        for _ in range(2):   # rank at dense widths, then again at the widths the first plan leaves
            ranked = _rank(costs, scores, costs.savings(dropped))
            chosen = (_global_blocks if any(_steps(t) for t in costs.targets) else _global_prefix)(costs, ranked, ratio)
            dropped = costs.dropped_at(chosen)
        # put back first the unit ranked most important per unit of cost saved
        first = lambda i, k: float(ranked[i][costs.orders[i][k - 1]])
    floor = [int(torch.isneginf(s).sum()) for s in scores]   # held units stay dropped
    if fill: chosen = _fill(costs, list(chosen), ratio, first, floor)
    if trade and method != 'local': chosen = _trade(costs, chosen, ranked, ratio, first, floor)
    return [o[:k] for o, k in zip(costs.orders, chosen)]


def _unrounded(costs):
    "The targets whose units a plan may change one at a time (not those that round their kept channels)."
    return [i for i, t in enumerate(costs.targets) if not getattr(t, 'round_to', None) or hasattr(t, 'cumulative')]


def _fill(costs, ks, ratio, first, floor, most=256):
    """`ks` with units put back, one at a time, while the cost stays within `ratio`: the plan may end on a costly unit
    (a channel of a wide layer) and leave the cost below the ratio by more than smaller units cost ('local' on the
    small ResNet at 0.3 of its parameters: 0.290 without). Each round puts back, of the targets whose last dropped
    unit fits, the one `first(i, k)` ranks highest; not in targets that round their kept channels (`round_to`).
    At most `most` units. Only units the plan itself dropped come back (trading a costly unit for more of the next
    ranked ones: `_trade`, on the final plan only)."""
    limit = ratio * costs.dense * (1 + 1e-12)
    ok = _unrounded(costs)
    for _ in range(most):
        can = [i for i in ok if ks[i] > floor[i]]
        if not can: break
        fits = [i for i, c in zip(can, costs.costs_with(ks, [(i, ks[i] - 1) for i in can])) if c <= limit]
        if not fits: break
        i = max(fits, key=lambda i: first(i, ks[i]))
        ks[i] -= 1
    return ks


def _trade(costs, ks, ranked, ratio, first, floor):
    """`ks`, or, when that keeps more of the cost within `ratio`, `ks` with the last unit of one target put back and
    the next units of the ranking (of the other targets) dropped instead, then filled (`_fill`); each target's trade
    is tried, the best kept. The unit that ends a 'global' prefix can cost more than the ratio's slack many times over
    (the seed net at 0.3 of its parameters: a conv2 channel is 1.9% of them, and the plan stops at 0.290), and `_fill`
    alone cannot trade it for smaller units. Only for the plan a fit ends on (or a one-shot prune): done at every plan
    of a schedule, the units it drops instead are zero at the next plan and rank first, and the allocation drifts
    (tried: conv2 kept whole, conv3 halved, the seed net at half its MACs 5 points lower)."""
    limit = ratio * costs.dense * (1 + 1e-12)
    ok = _unrounded(costs)
    best, best_cost = ks, costs.cost(ks)
    for big in [i for i in ok if ks[i] > floor[i]]:
        base = list(ks)
        base[big] -= 1
        for _ in range(sum(t.units for t in costs.targets)):   # down the ranking, without `big`, until the ratio holds
            if costs.cost(base) <= limit: break
            nxt = [(float(ranked[j][costs.orders[j][base[j]]]), j) for j in ok
                   if j != big and base[j] < costs.targets[j].units]   # (the next unit's key; inf: a target's best)
            nxt = [p for p in nxt if math.isfinite(p[0])]
            if not nxt: break
            base[min(nxt)[1]] += 1
        else: continue
        base = _fill(costs, base, ratio, first, floor)
        c = costs.cost(base)
        if best_cost < c <= limit: best, best_cost = base, c
    return best


def _rank(costs, scores, savings):
    """Per target, each unit's key in the ranking over all targets (its share of the scores, weighted by the target's
    cost, over the cost it saves: see `plan_drops`), each target's best unit at inf; the targets' orders set by it."""
    ranked = []
    for s, save in zip(scores, savings):
        s, finite = s.double(), torch.isfinite(s)
        if finite.any(): s[finite] = _shares(s[finite]) * float(save[finite].sum()) ** BALANCE
        s = s / save.clamp_min(1e-300)
        s[torch.argmax(torch.where(torch.isneginf(s), -math.inf, s))] = math.inf   # each target keeps its best unit
        ranked.append(s)
    costs.set_orders([torch.sort(s, stable=True).indices for s in ranked])
    return ranked


def _global_prefix(costs, ranked, ratio):
    "Units per target of the shortest prefix, in the ranking (`_rank`) over all targets, that meets the ratio."
    flat = torch.cat(ranked)
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(ranked)])
    order = owner[torch.sort(flat, stable=True).indices]
    n = len(ranked)
    def ks(k): return torch.bincount(order[:k], minlength=n).tolist()
    top = int(torch.isfinite(flat).sum() + torch.isneginf(flat).sum())
    _reachable(costs, ks(top), ratio)
    lo, hi = int(torch.isneginf(flat).sum()), top   # the shortest prefix (held units first) whose cost meets the ratio
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if costs.ratio(ks(mid)) <= ratio else (mid + 1, hi)
    return ks(lo)


BALANCE = 0.5
"""How a 'global' budget plan weighs each channel group's cost: a unit's importance (`_shares`) times the group's cost
to this power. At 0 the plan evens out what every group keeps of the cost (a costly group thins most); at 1, with
equal scores, every group keeps the same fraction of its units, whatever it costs (as 'local' does). On
bench/results/balance.md (seeds 0 and 1, points against 'local'): the small ResNet at half its latency -6.82 at 0,
-2.28 at 0.5, -0.35 at 1; the seed net at 0.3 of its parameters +0.40, +1.07 and -0.75. 0.5 is the compromise."""


def _shares(s):
    """Each unit's score (made >= 0: a criterion may score below 0) over the sum of the scores of the units its group
    still keeps when it goes (in the order of the scores, lowest first; the unit itself included): the k-th lowest of
    n counts s_k / (s_k + ... + s_n). A group's units grow more important as it thins, so that summed over a plan the
    damage of a group is about -log(the share of its scores kept), and no group is emptied for the cost its units
    save (ranked by score over the group's mean instead, the small ResNet at half its latency kept 1 of its 16 stem
    channels, and 3 to 4 points of accuracy less than with these shares)."""
    s = s - min(float(s.min()), 0.)
    order = torch.sort(s, stable=True).indices
    v = s[order]
    out = torch.empty_like(s)
    out[order] = v / v.flip(0).cumsum(0).flip(0).clamp_min(1e-300)
    return out


def _steps(t):
    """Target `t`'s kept units per multiple of its `round_to` (None: it does not round; a group that shuffles its
    channels rounds them itself)."""
    return None if hasattr(t, 'cumulative') or not hasattr(t, 'step') else t.step()


def _global_blocks(costs, ranked, ratio):
    """Units per target of the shortest prefix, in one ranking of blocks over all targets, that meets the ratio, where
    each target that rounds (`round_to`) drops whole blocks: the units down to the largest multiple of its step below
    its width, then a step at a time, never its last step (so its kept channels are a multiple of `round_to`, or all
    of them; a group narrower than a step stays whole). A block ranks by its units' mean key (score over cost saved),
    so a target's blocks come in its own order."""
    keys, owner, size = [], [], []
    for i, (t, r) in enumerate(zip(costs.targets, ranked)):
        step, n = _steps(t), t.units
        sizes = [1] * (n - 1) if step is None else \
            ([n - (n - 1) // step * step] + [step] * ((n - 1) // step - 1) if n > step else [])
        k = 0
        for b in sizes:
            v = r[costs.orders[i][k:k + b]].double()
            keys.append(-math.inf if torch.isneginf(v).any() else float(v.mean()))
            owner.append(i)
            size.append(b)
            k += b
    order = sorted(range(len(keys)), key=lambda j: keys[j])   # (stable: a target's blocks stay in its order)
    def ks(m):
        out = [0] * len(costs.targets)
        for j in order[:m]: out[owner[j]] += size[j]
        return out
    top = len(order)
    _reachable(costs, ks(top), ratio)
    lo, hi = sum(keys[j] == -math.inf for j in order), top
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if costs.ratio(ks(mid)) <= ratio else (mid + 1, hi)
    return ks(lo)


def _reachable(costs, ks, ratio):
    r = costs.ratio(ks)
    if r > ratio + 1e-12:
        raise ValueError(f'{costs.budget.at(ratio)!r} cannot be reached: with every targeted layer down to one unit (or '
                         'to round_to channels) the '
                         f'{costs.budget.metric} come to {r:.3f} of the dense model\'s (the rest is in layers no target '
                         'changes: the input and output, frozen or excluded groups, other layer types)')
