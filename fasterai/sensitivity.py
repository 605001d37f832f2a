"""Sensitivity analysis: how much a model's loss (or metric) suffers when each channel group alone loses a share of
its filters, and the per-layer sparsities that meet a budget at the least total damage.

A group is every layer slice that lives and dies with its channels (the producers, their norms, the layers that
read them, every producer of a residual stream), so zeroing a group's lowest-scored units is exactly what pruning
them would compute: the table measures the pruned model, not a layer alone.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .budget import Latency, check_budget, next_guess
from .sparsifier import Sparsifier
from .tracing import training_mode, unwrap

__all__ = ['sensitivity', 'Sensitivity']


class Sensitivity:
    """The result of `sensitivity`: `base` (the dense model's value), `rows` (one dict per group and ratio: group,
    layers, units, ratio, dropped units, value, damage) and the Sparsifier whose groups they are."""
    def __init__(self, sparsifier, base, rows, ratios, lower_is_better):
        self.sparsifier, self.base, self.rows, self.ratios = sparsifier, base, rows, ratios
        self.lower_is_better = lower_is_better   # damage = value - base for a loss, base - value for a metric

    def damage(self, group):
        "The damage at 0 and at each ratio of `group` (a target name)."
        return [0.] + [r['damage'] for r in self.rows if r['group'] == group]

    def __repr__(self):
        head = [('group', 'units', *[f'{r:g}' for r in self.ratios])]
        body = [(t.name, str(t.units), *[f'{d:+.4f}' for d in self.damage(t.name)[1:]]) for t in self.sparsifier.targets]
        widths = [max(len(r[i]) for r in head + body) for i in range(len(head[0]))]
        lines = ['  '.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in head + body]
        kind = 'loss' if self.lower_is_better else 'metric'
        return (f'Sensitivity ({kind} of the dense model {self.base:.4f}; damage when each group alone loses a '
                'share of its units)\n' + '\n'.join(lines))

    def plot(self, ax=None, top=10):
        "Damage against the share of units removed, for the `top` most sensitive groups; returns the axes."
        import matplotlib.pyplot as plt
        ax = ax or plt.subplots(figsize=(6, 4))[1]
        names = sorted((t.name for t in self.sparsifier.targets), key=lambda n: -max(self.damage(n)))[:top]
        for n in names: ax.plot([0., *self.ratios], self.damage(n), marker='o', label=n)
        ax.set_xlabel('share of the group\'s units removed'); ax.set_ylabel('damage (loss up or metric down)')
        ax.legend(fontsize='small')
        return ax

    def sparsities(self, budget, tol=0.015, steps=6):
        """Per-layer sparsities (a dict for the Sparsifier or SparsifyCallback with method 'local') that meet `budget`
        at the least summed damage: from the dense model, the group whose next ratio costs the least damage per unit
        of cost saved moves up, until the budget is met (the last one only as far as needed). A `Latency` budget is
        planned on the timing table, then the plan is timed on pruned copies and planned again until within `tol`
        (at most `steps` times). A ValueError when the largest ratio of every group does not meet it."""
        sp, budget = self.sparsifier, check_budget(budget)
        costs = sp.cost_model(budget)
        costs.set_orders([torch.sort(t.scores(sp.scores), stable=True).indices for t in sp.targets])
        if not isinstance(budget, Latency): return self._plan(costs, budget, budget.ratio)
        timed, best = [], None
        for _ in range(steps):
            modelled = next_guess(timed, budget.ratio)
            plan = self._plan(costs, budget, modelled, strict=False)
            got = sp.measure(budget, sp.plan_masks(plan))
            timed.append((modelled, got))
            if best is None or abs(got - budget.ratio) < best[0]: best = (abs(got - budget.ratio), plan)
            if best[0] <= tol: break
        sp.counts = None   # (the masks planned for timing are never applied)
        return best[1]

    def _plan(self, costs, budget, ratio, strict=True):
        """The greedy plan of `sparsities` for a modelled `ratio`; when every group is at its largest ratio, a
        ValueError (`strict`) or that plan (a modelled latency: the timing says how far it comes)."""
        sp, levels = self.sparsifier, [0., *self.ratios]
        level = [0] * len(sp.targets)
        damage = [self.damage(t.name) for t in sp.targets]
        ks = lambda pct: [t.count(p) for t, p in zip(sp.targets, pct)]   # (a group keeps a unit)
        pct = lambda lv: [100 * levels[l] for l in lv]
        last = None
        while costs.ratio(ks(pct(level))) > ratio:
            now, best = costs.cost(ks(pct(level))), None
            for i in range(len(level)):
                if level[i] + 1 == len(levels): continue
                up = list(level); up[i] += 1
                saved = now - costs.cost(ks(pct(up)))
                if saved <= 0: continue
                per = max(damage[i][up[i]] - damage[i][level[i]], 0.) / saved
                if best is None or per < best[0]: best = (per, i)
            if best is None and not strict: return {n: p for t, p in zip(sp.targets, pct(level)) for n in t.layers}
            if best is None:
                raise ValueError(f'{budget!r} cannot be reached with at most {100 * self.ratios[-1]:g}% of each group: '
                                 f'the lowest is {costs.ratio(ks(pct(level))):.3f}; measure larger ratios')
            last = best[1]
            level[last] += 1
        out = pct(level)
        if last is not None:   # the last group moved only as far as the budget needs (between its two ratios)
            lo, hi = 100 * levels[level[last] - 1], out[last]
            for _ in range(30):
                out[last] = (lo + hi) / 2
                if costs.ratio(ks(out)) <= ratio: hi = out[last]
                else: lo = out[last]
            out[last] = hi
        return {n: p for t, p in zip(sp.targets, out) for n in t.layers}


def _batches(learn, data, n):
    "Up to `n` (inputs, targets) pairs of tuples: the Learner's validation batches, or `data`'s."
    src = data if data is not None else learn.dls.valid
    out = []
    for b in src:
        if len(out) == n: break
        b = tuple(b)
        n_in = getattr(learn.dls, 'n_inp', 1) if learn is not None else 1
        out.append((b[:n_in], b[n_in:]))
    if not out: raise ValueError('sensitivity needs at least one batch of data (inputs, targets)')
    return out


@torch.no_grad()
def sensitivity(learn_or_model, ratios=(0.25, 0.5, 0.75), data=None, metric=None, lower_is_better=True,
                n_batches=4, layer_type=nn.Conv2d, criteria='l1', exclude=(), leaf_modules=()):
    """Zero each channel group's lowest-scored `ratios` of its units alone (whole coupled groups, as pruning would
    remove them) and measure `metric` on a few batches in eval mode; returns a `Sensitivity`.

    `learn_or_model`: a fastai Learner (its validation batches and loss function are the defaults) or a model.
    `data`: an iterable of (input, target) batches (needed for a model). `metric`: f(prediction, *targets) -> a
    number (default: the Learner's loss, else cross-entropy); `lower_is_better`: False for an accuracy.
    `n_batches`: the batches measured. `layer_type`, `criteria`, `exclude`, `leaf_modules`: as for the Sparsifier.
    The model's weights are put back after each measurement."""
    learn = learn_or_model if hasattr(learn_or_model, 'dls') else None
    model = unwrap(learn.model if learn is not None else learn_or_model)
    if learn is None and data is None: raise ValueError('sensitivity of a model needs data: batches of (input, target)')
    if not ratios or any(not 0 < r < 1 for r in ratios) or list(ratios) != sorted(ratios):
        raise ValueError(f'ratios must be increasing shares of units in (0, 1), got {ratios!r}')
    batches = _batches(learn, data, n_batches)
    metric = metric or (learn.loss_func if learn is not None else F.cross_entropy)
    device = next(model.parameters()).device
    batches = [(tuple(x.to(device) for x in xb), tuple(y.to(device) for y in yb)) for xb, yb in batches]
    example = batches[0][0][0][:8] if len(batches[0][0]) == 1 else tuple(x[:8] for x in batches[0][0])
    sp = Sparsifier(model, 'filter', 'local', criteria, layer_type, example, leaf_modules, exclude)

    def value():
        with training_mode(model, False):
            vals = [float(metric(model(*xb), *yb)) for xb, yb in batches]
        return sum(vals) / len(vals)

    from .pruner import _masked
    base, rows = value(), []
    for t in sp.targets:
        scores = t.scores(sp.scores)
        for r in ratios:
            k = t.count(100 * r)   # (a group keeps a unit)
            with _masked(model, t.masks(t.drop(scores, k))): v = value()
            rows.append(dict(group=t.name, layers=list(t.layers), units=t.units, ratio=r, dropped=k, value=v,
                             damage=(v - base) if lower_is_better else (base - v)))
    return Sensitivity(sp, base, rows, tuple(ratios), lower_is_better)
