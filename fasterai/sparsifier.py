"""Sparsifier: zero the least important weights, kernels or whole filters of a model, and keep them zero.

`from fasterai.sparsifier import *` gives `Sparsifier`, `SparsifyCallback` (fastai, imported on first use)
and the schedules.
"""
import dataclasses
import math
import numbers
import warnings

import torch
import torch.nn as nn

from .budget import Budget, CostModel, Latency, _interpolate, check_budget, next_guess, plan_drops, reached
from .criteria import resolve_criterion
from .granularity import HEAD, NM, STRUCTURAL, resolve_granularity
from .layers import kind_of
from .masks import MaskSet
from .scoring import Scores
from .report import SparsityReport
from .targets import GroupTarget, by_mean, make_targets, n_zero, weights_of
from .tracing import check_model, unwrap
from .schedules import *  # noqa: F401,F403 (re-exported: the seed's `from fasterai.sparsifier import *`)
from .schedules import __all__ as _schedules
from .budget import BUDGETS, Latency, MACs, Params  # noqa: F401 (re-exported: budgets for SparsifyCallback and Pruner)

__all__ = ['Sparsifier', 'SparsifyCallback', 'METHODS', 'check_sparsity', 'check_sparsities', 'check_method',
           'check_layer_type', 'check_round_to', 'find_layers', 'MACs', 'Params', 'Latency', 'BUDGETS', *_schedules]

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


AUTO_ROUND = (8, 16, 32)
"`round_to='auto'` tries kept channels rounded to a multiple of each of these (see `Sparsifier.calibrate`)."


def check_round_to(round_to):
    "`round_to` if it is None, a positive int or 'auto' (a Latency budget tries rounding), or a ValueError."
    if round_to is not None and round_to != 'auto' and (isinstance(round_to, bool) or not isinstance(round_to, int)
                                                       or round_to < 1):
        raise ValueError('round_to must be a positive int (kept channels a multiple of it), None, or \'auto\' (with '
                         f'a Latency budget: rounded where the timing says it pays), got {round_to!r}')
    return round_to


def targeted_type(granularity, layer_type):
    "The layer types a granularity (resolved) targets: `layer_type`; at 'head', the Linear layers attention holds."
    return nn.Linear if granularity == HEAD else layer_type


def find_layers(model, layer_type, exclude=(), granularity=None):
    """Qualified name -> module for every module of `layer_type` (a type or tuple of types) not in `exclude`
    (qualified names or the modules themselves), or a ValueError. With nn.Linear, each nn.MultiheadAttention fasterai
    knows (its packed in-projection is a Linear layer's weight), except at an N:M `granularity` (resolved)."""
    types = check_layer_type(layer_type)
    skip = _excluded(model, exclude)
    mha = nn.Linear in types and not isinstance(granularity, NM)
    layers = {n: m for n, m in model.named_modules() if n not in skip and (isinstance(m, types) or mha and
              isinstance(m, nn.MultiheadAttention) and kind_of(m) is not None and m.in_proj_weight is not None)}
    if not layers:
        raise ValueError(f'{type(model).__name__} has no layer of layer_type '
                         f'{", ".join(t.__name__ for t in types)} to sparsify' + (' outside exclude' if skip else ''))
    bad = [n for n, m in layers.items() if not weights_of(m)]
    if bad: raise ValueError(f"layer '{bad[0]}' of layer_type has no weight to sparsify (no parameter named weight*)")
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


def check_sparsities(sparsity, method, layers=None):
    """`sparsity` as a float percentage, or a dict of them by layer name (with method 'local' only, and naming
    only `layers` when given); a ValueError otherwise."""
    if not isinstance(sparsity, dict): return check_sparsity(sparsity)
    if method != 'local': raise ValueError("a sparsity per layer needs method='local'")
    unknown = set(sparsity) - set(layers) if layers is not None else set()
    if unknown: raise ValueError(f'sparsity names layers that are not targeted: {sorted(unknown)}; '
                                 f'choose among {sorted(layers)}')
    return {k: check_sparsity(v) for k, v in sparsity.items()}


NEAR_ZERO = 1e-12
"Weights below this magnitude are timed as the masks' zeros (see `Sparsifier.measure`)."


class Sparsifier(SparsityReport):
    """Zeroes the least important parts of a model's layers and keeps masks to hold them at zero.

    `granularity`: 'weight', 'vector', 'kernel', 'column', 'filter' or 'row' (whole channel groups, prunable
    by `Pruner`), 'head' (whole heads of the attention modules fasterai knows, timm's `Attention`, alone: their
    qkv and proj layers are targeted whatever `layer_type`), 'N:M' such as '2:4', or a tuple of weight dims to
    score together (see `GRANULARITIES`).
    `method`: 'local' (each layer to the target) or 'global' (one threshold, scores normalised per layer).
    `criteria`: a name in `CRITERIA`, a `Criterion`, or a function of the weight.
    `layer_type`: the layer type(s) to sparsify (a group is targeted when one of its producers is one).
    `example_input`: a tensor, a tuple of tensors (one per input) or a shape for tracing at 'filter' (guessed when None).
    `leaf_modules`: names or types of modules the tracer keeps whole ('filter'; see `graph.trace`).
    `exclude`: qualified names of modules (or the modules) whose layers are left dense.
    `round_to`: at 'filter' (or 'head'), round each group's kept channels to a multiple of it (8 or 16 suit
    vectorised kernels; a group smaller than it is left whole): 'local', the one percentage rounded per group;
    'global' (budgets only), blocks of that many channels ranked over all groups. 'auto': with a `Latency` budget, plans rounded to
    multiples of each of `AUTO_ROUND` are timed too, and pruned where they pay (see `calibrate`); otherwise no
    rounding.
    A model wrapped in DataParallel or DistributedDataParallel is sparsified through its `module`; under DDP
    every process computes the same masks (the weights, and the gradients after backward, agree).
    """
    def __init__(self, model, granularity='filter', method='local', criteria='l1', layer_type=nn.Conv2d,
                 example_input=None, leaf_modules=(), exclude=(), round_to=None):
        model = unwrap(model)
        check_model(model)
        self.model, self.granularity = model, resolve_granularity(granularity)
        self.method, self.criterion = check_method(method), resolve_criterion(criteria)
        if isinstance(self.granularity, NM) and method == 'global':
            raise ValueError("N:M sparsity is the same count in every block: use method='local'")
        check_round_to(round_to)
        if round_to is not None and self.granularity not in STRUCTURAL:
            raise ValueError("round_to rounds the kept channels of each group: it needs granularity='filter' (or "
                             f"'head'), got {granularity!r}")
        self.round_to = round_to
        self.layers = find_layers(model, targeted_type(self.granularity, layer_type), exclude, self.granularity)
        self.excluded = _excluded(model, exclude)
        # the units to zero, the channel graph at 'filter' (else None) and why a layer cannot be sparsified there
        self.targets, self.graph, self.frozen = make_targets(model, self.granularity, self.layers, self.excluded,
                                                             None if round_to == 'auto' else round_to, example_input,
                                                             leaf_modules)
        self.scores = Scores(self.criterion, {n: m for t in self.targets for n, m in t.scored().items()})
        self.maskset = MaskSet(dict(model.named_parameters(remove_duplicate=False)), len(self.targets))
        self.counts = None   # the zero units per target ('global': in all) the masks were made for
        self.planned = None  # the budget those masks were planned for (None: a sparsity): kept until it changes
        self.final = None   # the budget a schedule ends on (its plan may trade a costly unit: `budget._trade`)
        self._saved = {}     # tensor name -> CPU copy holding the values of the channel units the masks dropped
        self._saved_units = [torch.zeros(t.units, dtype=torch.bool) if isinstance(t, GroupTarget) else None
                             for t in self.targets]   # per channel target, the units whose values `_saved` holds
        self._applied = [None] * len(self.targets)   # each target's masks as `sparsify` last applied them
        self.held = [None] * len(self.targets)   # per target, the units found zero that are never released
        self.example_input, self.costs = example_input, {}   # the cost models of budgets, by budget (ratio aside)

    # ------------------------------------------------------------ the criterion's state and scores (see Scores)
    @property
    def masks(self): return self.maskset.masks
    @property
    def ref(self): return self.scores.ref
    @property
    def acc(self): return self.scores.acc
    def set_reference(self, names=None): self.scores.set_reference(names)
    def accumulate(self): self.scores.accumulate()
    def score(self, name): return self.scores.score(name)
    def row_scores(self, name, dim, start, length): return self.scores.row_scores(name, dim, start, length)

    # ------------------------------------------------------------ sparsify
    def hold_zeros(self):
        """Hold the units that are all zero now (a model sparsified before, or loaded so): every later `sparsify`
        zeroes them first and never releases them, whatever the sparsity asked (N:M patterns excepted: they are
        chosen anew in every block). Returns the measured sparsity."""
        self.held = [t.zero_units() for t in self.targets]
        self.held = [None if h is None or not h.any() else h for h in self.held]
        self.counts = None   # the next sparsify chooses anew, the held units included
        return self.sparsity()

    def set_origins(self, origins):
        """Count sparsities in units of an earlier, larger model: `origins` maps a group target's name to its units
        there; the units a pruning removed count as zero (SparsifyCallback(prune_every=...) sets it)."""
        for t in self.targets:
            if hasattr(t, 'origin'): t.origin = max(origins.get(t.name, t.units), t.units)
        self.counts = None

    def _plan(self, sparsity):
        "Zero units per target ('local') or in all ('global'), never fewer than the units held."
        held = [0 if h is None else int(h.sum()) for h in self.held]
        if isinstance(sparsity, Budget): return self._budget_drops(sparsity)
        if isinstance(sparsity, dict):
            return tuple(max(t.count(max(sparsity.get(n, 0.) for n in t.layers)), k)
                         for t, k in zip(self.targets, held))
        if self.method == 'local':
            return tuple(max(t.count(sparsity), k) for t, k in zip(self.targets, held))
        origin = sum(getattr(t, 'origin', t.units) for t in self.targets)   # removed units count as zero
        gone = origin - sum(t.units for t in self.targets)
        return (max(min(n_zero(origin, sparsity) - gone, sum(t.units - 1 for t in self.targets)), sum(held), 0),)

    def _scores(self, i):
        "Target `i`'s unit scores, its held units scored lowest (-inf: zeroed first)."
        s = self.targets[i].scores(self.scores)
        if self.held[i] is not None: s = s.masked_fill(self.held[i].to(s.device), -math.inf)
        return s

    def check_sparsity(self, sparsity):
        """`sparsity` as a float percentage, a dict of them by targeted layer name ('local' only), or a `Budget`
        (channel groups only)."""
        if isinstance(sparsity, Budget):
            if self.graph is None: raise ValueError(f'a budget ({sparsity!r}) chooses whole channels: it needs '
                                                    f"granularity='filter' (or 'row', 'head'), got {self.granularity!r}")
            return sparsity
        if self.round_to is not None and self.method == 'global' and sparsity != 0:   # (0: a fit that holds the masks)
            raise ValueError(f"round_to with method='global' rounds the plans of a budget: pass target=MACs(...), "
                             f"Params(...) or Latency(...) instead of a sparsity ({sparsity!r}), or use method='local'")
        return check_sparsities(sparsity, self.method, self.layers)

    def cost_model(self, budget):
        "The `CostModel` of `budget`'s kind of cost over this Sparsifier's targets (built once per kind)."
        key = check_budget(budget).at(1.)
        if key not in self.costs:
            example = self.example_input if self.example_input is not None else self.graph.input_shape
            self.costs[key] = CostModel(self.model, self.targets, key, example)
        return self.costs[key]

    def _budget_drops(self, budget):
        """Per target, the units to zero to meet `budget` (see `budget.plan_drops`), as a tuple of index tensors
        marked as drops (so that `_update_masks` takes them as they are)."""
        costs = self.cost_model(budget)
        scores = [self._scores(i) for i in range(len(self.targets))]
        count = lambda p: [max(t.count(p), 0 if h is None else int(h.sum())) for t, h in zip(self.targets, self.held)]
        if round(budget.ratio, 9) in costs.plans: return costs.plans[round(budget.ratio, 9)]   # timed (calibrate)
        ratio = costs.modelled_for(budget.ratio)
        if isinstance(budget, Latency):   # a ratio past what the model can reach: as far as it goes (timing tells)
            ratio = max(ratio, costs.floor() + 1e-9)
        # (a Latency plan is not filled: its modelled cost only guides the plans `calibrate` times, which searches
        # finer plans itself)
        return _Drops(plan_drops(costs, scores, ratio, self.method, count, fill=not isinstance(budget, Latency),
                                 trade=not isinstance(budget, Latency) and budget == self.final))

    def cost_ratio(self, budget):
        """The modelled cost ratio of `budget`'s kind without the units that are zero now (exact for MACs and
        parameters; for latency, the table's, calibrated; the plan `calibrate` timed and pinned: that timing)."""
        drops = [t.zero_units() for t in self.targets]   # what a pruning now would remove
        costs = self.cost_model(budget)
        key = round(budget.ratio, 9)
        if key in costs.plans and self.counts == costs.plans[key] and self.planned is not None \
                and round(self.planned.ratio, 9) == key:
            return costs.plan_ratio[key]
        return costs.measured_for(costs.cost_of(costs.dropped(drops)) / costs.dense)

    @torch.no_grad()
    def measure(self, budget, masks=None):
        """The cost ratio of `budget`'s kind (MACs and parameters counted, latency timed) of the model pruned as
        `masks` (default: the current masks) drop, over the dense model's."""
        from .pruner import _pruned_copy, plan
        masks = self.masks if masks is None else masks
        # on a copy in which every channel unit the masks dropped holds the values it had when dropped (`_swap`), so
        # that only `masks` decide what goes (a plan timed by `calibrate` may keep units the model holds at zero now,
        # which a sparsify to it would give back their values), and the dense reference is the model as it would
        # compute with all its channels. Not with a constant: CPU max pooling branches on its values, and channels
        # of a constant output pool a third faster than live ones (bench/results/timed_values.md), so a reference
        # with constant channels runs faster than the dense model and every plan calibrated against it goes too far.
        # Entries left near zero are made zero: a weight the masks hold at zero is moved by the optimizer's decaying
        # momentum between a step and the masks' re-application (to 1e-30 and below), and its products underflow to
        # denormals, which x86 multiplies tens of times more slowly (a small ResNet mid-training: 13.4 ms instead of
        # 8.7): the copy is timed for its architecture, not for that moment
        probe = self._probe()
        keep = plan(dataclasses.replace(self.graph, model=probe), masks)
        pruned = _pruned_copy(probe, keep, masks)
        return reached(budget, probe, pruned, self.example_input if self.example_input is not None else
                       self.graph.input_shape)

    @torch.no_grad()
    def _probe(self):
        """A copy of the model to measure (see `measure`): every channel unit zero now gets back the values put aside
        when the masks dropped it (1 where none were: zeros found, or a state loaded), other entries near zero are
        made zero."""
        from .pruner import _computed, copy_modules
        probe = copy_modules(self.model, _computed(self.model))
        tensors = {**dict(probe.named_parameters(remove_duplicate=False)),
                   **dict(probe.named_buffers(remove_duplicate=False))}
        for t, saved in zip(self.targets, self._saved_units):
            if saved is None: continue
            zero = t.zero_units(NEAR_ZERO)
            for name, _, d, idx in t.state(zero & saved): self._put_back(name, tensors[name], d, idx)
            for name, _, d, idx in t.state(zero & ~saved):
                x = tensors[name]
                if isinstance(x, nn.Parameter): x.index_fill_(d, idx.to(x.device), 1.)
        for x in probe.parameters():
            if x.is_floating_point(): x.masked_fill_(x.abs() < NEAR_ZERO, 0.)
        return probe

    def calibrate(self, budget, tol=0.015, steps=6, fresh=False, fine=5):
        """Time pruned copies planned for a `Latency` budget until one is within `tol` of its ratio (at most `steps`),
        so that later plans meet what is measured, not only what is modelled: the plan that came closest is pinned for
        this ratio, and other ratios are interpolated through the timed ones. When none came within `tol` (latency
        falls in steps, and one percentage more or less for every layer, 'local', can step over the ratio), up to
        `fine` more copies are timed between the closest plans above and below it, a few units at a time (see
        `_between`), then, still none within `tol` (one unit of one layer steps over it), up to `fine` more that keep
        that layer at its faster width and put units back in the others (`_give_back`); the closest of all is the
        plan this ratio prunes. With `round_to='auto'` the plans are
        searched again with every group's kept channels a multiple of each of `AUTO_ROUND` (8, 16, 32), and the
        rounded plan that pays best is the one pruned when it pays: it comes within `tol` and keeps more MACs than the other (or, neither within `tol`, it
        comes closer). `fresh`: forget earlier timings (the weights, hence the plans, have changed since). The masks
        are left as they were. Returns the closest ratio timed."""
        budget = self.check_sparsity(budget)
        costs, ms = self.cost_model(budget), self.maskset
        if fresh: costs.measured, costs.pinned, costs.plans, costs.plan_ratio = [], {}, {}, {}
        for name, v in (('steps', steps), ('fine', fine)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == 'steps' else 0):
                raise ValueError(f'{name} must be a {"positive" if name == "steps" else "non-negative"} int, got {v!r}')
        key, ratio = round(budget.ratio, 9), budget.ratio
        costs.pinned.pop(key, None)
        costs.plans.pop(key, None)
        saved = (self.counts, self.planned, list(ms.by_target), dict(ms.masks), dict(ms.drops))
        rounded = None
        try:   # (units added one by one would break the multiples of round_to: no finer plans then)
            best, closest, n = self._search(budget, costs.measured, tol, steps, fine if self.round_to in (None, 'auto')
                                            else 0)
            if self.round_to == 'auto' and isinstance(budget, Latency):
                extra = 0
                for multiple in AUTO_ROUND:   # the rounded plan that pays best (see `_pays`) of each multiple's
                    for t in self.targets: t.round_to = multiple
                    try: found = self._search(budget, [], tol, steps, 0)
                    except ValueError: continue   # no plan rounded so reaches the budget
                    finally:
                        for t in self.targets: t.round_to = None
                    extra += found[2]
                    if rounded is None or self._pays(found[1], rounded[1], ratio, tol): rounded = found
                rounded = None if rounded is None else (*rounded[:2], extra)
        finally:
            self.counts, self.planned, ms.by_target, ms.masks, ms.drops = saved
            costs.pinned.pop(key, None)
        costs.pinned[key], costs.timed = best[0], n + (0 if rounded is None else rounded[2])
        if rounded is not None and self._pays(rounded[1], closest, ratio, tol): closest = rounded[1]
        if abs(closest[0] - ratio) < abs(best[1] - ratio) or (rounded is not None and closest is rounded[1]):
            costs.plans[key], costs.plan_ratio[key] = closest[1], closest[0]
        if abs(closest[0] - ratio) > tol:
            warnings.warn(f"{budget!r} is not met: of {costs.timed} plans timed, the closest ran at {closest[0]:.3f} of "
                          f"the dense model's latency (tolerance {tol:g}). Latency falls in steps; a plan far above the "
                          'ratio means this machine cannot reach it with these channels (per-layer overheads, or a fused '
                          'kernel the dense model runs and the pruned one cannot): ask for another ratio, batch size or '
                          'thread count', stacklevel=2)
        return closest[0]

    def _search(self, budget, measured, tol, steps, fine):
        """`calibrate`'s timings with the targets' rounding as it is: (the modelled ratio whose plan timed closest,
        that timing), (the closest timing of all, its drops), and how many plans were timed. `measured` gains the
        (modelled, measured) pairs."""
        costs, key, ratio = self.cost_model(budget), round(budget.ratio, 9), budget.ratio
        best, timed = None, []   # timed: (measured ratio, drops) of every plan timed
        for _ in range(steps):
            modelled = next_guess(measured, ratio)
            for _ in range(4):   # a guess no plan reaches (rounded plans reach less far): halfway back, a few times
                costs.pinned[key] = modelled
                self.counts = None
                try:
                    self._rescore(budget)
                    break
                except ValueError:
                    if not timed: raise
                    modelled = (modelled + measured[-1][0]) / 2
            else: break   # the plans timed so far
            if any(self.counts == d for _, d in timed): break   # a plan timed already: finer plans next
            got = self.measure(budget)
            measured.append((modelled, got))
            timed.append((got, self.counts))
            if best is None or abs(got - ratio) < abs(best[1] - ratio): best = (modelled, got)
            if abs(got - ratio) <= tol: break
        above = [p for p in timed if p[0] > ratio]
        below = [p for p in timed if p[0] <= ratio]
        closest = min(timed, key=lambda p: abs(p[0] - ratio))
        if abs(closest[0] - ratio) <= tol or not fine: return best, closest, len(timed)
        fast, stepping = (max(below, key=lambda p: p[0]), set()) if below else (None, set())
        if above and below:   # finer plans between the closest two, a few units at a time
            base, extra = self._between(min(above, key=lambda p: p[0])[1], fast[1])
            lo, hi = 0, len(extra)   # lo: its plan times above the ratio; hi: at or below
            for _ in range(fine):
                m = (lo + hi) // 2
                if m in (lo, hi): break
                drops = _Drops(torch.cat([b, *(e for j, e in extra[:m] if j == i)]).sort().values
                               for i, b in enumerate(base))
                got = self._time_plan(budget, drops, timed)
                if abs(got - ratio) < abs(closest[0] - ratio): closest = (got, drops)
                if abs(got - ratio) <= tol: return best, closest, len(timed)
                if got > ratio: lo = m
                else: lo, hi, fast = lo, m, (got, drops)
            stepping = {i for i, _ in extra[lo:hi]}   # the targets whose next units step the latency past the ratio
        if fast is not None and abs(closest[0] - ratio) > tol:
            closest = self._give_back(budget, fast, stepping, closest, timed, tol, fine)
        return best, closest, len(timed)

    def _time_plan(self, budget, drops, timed):
        "The timed ratio of the plan `drops` (its masks set), added to `timed`."
        self._update_masks(drops)
        self.counts = drops
        got = self.measure(budget)
        timed.append((got, drops))
        return got

    def _give_back(self, budget, fast, stepping, closest, timed, tol, fine):
        """From the plan `fast` (its timed ratio, its drops per target), which times below the ratio, the closest plan
        timed that puts back some of its dropped units, the best scored first, every target alike by its share of its
        own (the targets in `stepping` keep theirs: one unit more there is what steps the latency past the ratio).
        Latency falls in steps where a layer's width crosses a multiple its kernels prefer: when no plan between the
        two closest lands within `tol`, a plan that keeps the stepped layer at its faster width and gives the time it
        saves to the other layers does. How many units go back is guessed from the modelled cost, scaled through the
        plans timed (at most `fine` of them)."""
        ratio, costs, units = budget.ratio, self.cost_model(budget), {}
        for i, d in enumerate(fast[1]):
            if i in stepping or not len(d): continue
            s = self._scores(i).detach().cpu().double()[d.cpu()]
            live = torch.isfinite(s)   # held units (-inf) never come back
            units[i] = d[live.to(d.device)][torch.sort(s[live], descending=True, stable=True).indices.to(d.device)]
        owner = torch.tensor(_by_share({i: len(u) for i, u in units.items()}), dtype=torch.long)   # whose goes back next

        def plan(m):   # `fast` with the first m units `owner` names put back (each target's best first)
            n = torch.bincount(owner[:m], minlength=len(fast[1])).tolist()
            return _Drops(d[~torch.isin(d, units[i][:n[i]])].sort().values if n[i] else d for i, d in enumerate(fast[1]))
        modelled = lambda m: costs.cost_of(costs.dropped(list(plan(m)))) / costs.dense
        points = [(modelled(0), fast[0])]   # (modelled, timed)

        def guess(m):   # the ratio plan m should time: its modelled one through the timed plans
            x = modelled(m)
            if len(points) == 1: return x * points[0][1] / points[0][0]
            ps = sorted(points)
            return _interpolate([p[0] for p in ps], [p[1] for p in ps], x)
        lo, hi = 0, len(owner) + 1   # lo: times at or below the ratio; hi: above (all put back: assumed)
        for _ in range(fine):
            if hi - lo < 2: break
            a, b = lo + 1, hi - 1   # the first plan guessed at or above the ratio, or the one before it if closer
            while a < b:
                mid = (a + b) // 2
                a, b = (mid + 1, b) if guess(mid) < ratio else (a, mid)
            m = a if a - 1 <= lo or abs(guess(a) - ratio) <= abs(guess(a - 1) - ratio) else a - 1
            drops = plan(m)
            got = self._time_plan(budget, drops, timed)
            points.append((modelled(m), got))
            if abs(got - ratio) < abs(closest[0] - ratio): closest = (got, drops)
            if abs(got - ratio) <= tol: break
            lo, hi = (m, hi) if got <= ratio else (lo, m)
        return closest

    def _pays(self, rounded, other, ratio, tol):
        """Whether the rounded plan's timing (ratio, drops) beats the other's: within `tol` where the other is not,
        or both within and it keeps more MACs (more of the model's work, at the same time), or neither within and
        closer."""
        inside = abs(rounded[0] - ratio) <= tol, abs(other[0] - ratio) <= tol
        if inside[0] != inside[1]: return inside[0]
        if not inside[0]: return abs(rounded[0] - ratio) < abs(other[0] - ratio)
        macs = self.cost_model(MACs(1))
        return macs.cost_of(macs.dropped(rounded[1])) > macs.cost_of(macs.dropped(other[1]))

    def _between(self, above, below):
        """The units two plans (drops per target) share, and the ones only one of them drops, in the order to add
        them going from the one that times above the ratio to the one below: within a target by score (lowest
        first), and across targets each by its share of its own (so that halfway drops half of every target's).
        Each target keeps a unit."""
        base, rests = [], {}
        for i, (a, b) in enumerate(zip(above, below)):
            dev, a, b = a.device, a.flatten().cpu(), b.flatten().cpu()
            both = a[torch.isin(a, b)]
            either = torch.unique(torch.cat([a, b]))
            rest = either[~torch.isin(either, both)]
            scores = self._scores(i).detach().flatten().cpu().double()
            rest = rest[torch.sort(scores[rest], stable=True).indices]
            if len(either) >= self.targets[i].units: rest = rest[:-1]   # never all of a target's units
            base.append(both.sort().values.to(dev))
            rests[i] = rest.view(-1, 1).to(dev)
        taken = {i: iter(r) for i, r in rests.items()}
        return base, [(i, next(taken[i])) for i in _by_share({i: len(r) for i, r in rests.items()})]

    @torch.no_grad()
    def sparsify(self, sparsity):
        """Zero `sparsity` percent (a number, or a dict by layer name) of the targeted units and apply the masks.
        A target is re-scored only when its count of zero units changes ('global': when the total changes).
        Returns True when the masks changed."""
        rescored = self._rescore(sparsity)
        self._swap()   # (also when `plan_masks` planned these masks)
        self.apply_masks()
        if rescored and self.criterion.updating:   # the reference moves only where masks were chosen anew
            self.set_reference([n for t in rescored for n in t.scored()])
        return rescored is not None

    @torch.no_grad()
    def _swap(self):
        """Channel units the masks drop now that they did not drop when last applied have their values put aside;
        units they release get back the values they had when dropped. A channel unit is zeroed in every producer row,
        bias and norm scale and shift, so released as zeros it would stay dead: its output is constant, and after a
        norm whose scale is zero, or before a ReLU, no gradient reaches its weights. It would cost what a live channel
        costs and compute nothing; and as a constant output pools faster on a CPU, the pruned model would time faster
        than the plan timed in the fit (the seed net's Latency(0.5) plans timed 0.487-0.512 at 2/3 of the fit and
        0.454-0.485 after it when units came back as zeros: the rows at 14a50b5 in bench/results/budget.md's
        history). Running statistics come back with them."""
        for i, (t, old, new) in enumerate(zip(self.targets, self._applied, self.maskset.by_target)):
            if old is new or self._saved_units[i] is None: continue
            was, now = t.dropped(old), t.dropped(new)
            self._applied[i] = new
            gone, back = now & ~was, was & ~now & self._saved_units[i]
            for name, x, d, idx in t.state(gone):
                if name not in self._saved: self._saved[name] = torch.zeros(x.shape, dtype=x.dtype)
                self._saved[name].index_copy_(d, idx, x.detach().index_select(d, idx.to(x.device)).cpu())
            for name, x, d, idx in t.state(back): self._put_back(name, x, d, idx)
            self._saved_units[i] |= gone

    def _put_back(self, name, x, d, idx):
        "Entries `idx` along dim `d` of tensor `x` (named `name` in the model) get the values put aside for them."
        x.index_copy_(d, idx.to(x.device), self._saved[name].index_select(d, idx).to(x.device, x.dtype))

    @torch.no_grad()
    def plan_masks(self, sparsity):
        "The keep-masks (parameter name -> bool) `sparsify(sparsity)` would apply, without changing the model."
        self._rescore(sparsity)
        return dict(self.masks)

    def apply_masks(self):
        "Set every masked parameter entry to exactly zero (NaN and inf included)."
        self.maskset.apply()

    @torch.no_grad()
    def masks_hold(self):
        "Whether every entry the masks drop is exactly zero in the model now (no training let it regrow)."
        return self.maskset.hold()

    def _rescore(self, sparsity):
        """New masks where the counts changed: the targets re-scored (a list), or None when nothing changed. A budget
        is planned once: asked again (the schedule holding it), its plan stays, as a percentage's counts do, so that
        the plan timed or counted for it is the one pruned."""
        sparsity = self.check_sparsity(sparsity)
        if self.counts is not None and isinstance(sparsity, Budget) and sparsity == self.planned: return None
        counts = self._plan(sparsity)
        self.planned = sparsity if isinstance(sparsity, Budget) else None
        if counts == self.counts: return None
        rescored = self._update_masks(counts)
        self.counts = counts
        return rescored

    def _update_masks(self, counts):
        "New masks for the targets whose count changed ('local'; every target for 'global'), then combined."
        ms = self.maskset
        if isinstance(counts, _Drops):
            old = self.counts if isinstance(self.counts, _Drops) else (None,) * len(counts)
            rescored = [i for i, d in enumerate(counts) if old[i] is None or not _Drops.same(d, old[i])
                        or ms.by_target[i] is None]
            for i in rescored: ms.set(i, self.targets[i].masks(counts[i]))
            ms.combine()
            return [self.targets[i] for i in rescored]
        if self.method == 'local':
            old = self.counts if self.counts and not isinstance(self.counts, _Drops) else (None,) * len(counts)
            rescored = [i for i, k in enumerate(counts) if k != old[i] or ms.by_target[i] is None]
            for i in rescored:
                t = self.targets[i]
                ms.set(i, t.masks(t.drop(self._scores(i), counts[i])))
            ms.combine({n for i in rescored for n in ms.by_target[i]})
            return [self.targets[i] for i in rescored]
        drops = _global_drops([t.scores(self.scores) for t in self.targets], counts[0], self.held)
        for i, (t, d) in enumerate(zip(self.targets, drops)): ms.set(i, t.masks(d))
        ms.combine()
        return self.targets

    # ------------------------------------------------------------ state
    def state_dict(self):
        """Each target's masks, the zero counts they were made for, the criterion's state and the values of the units
        dropped (what a plan that gives them back restores): what resuming needs."""
        return {'counts': None if self.counts is None else list(self.counts),
                'target_masks': list(self.maskset.by_target), 'ref': dict(self.ref), 'acc': dict(self.acc),
                'held': list(self.held), 'saved': dict(self._saved), 'saved_units': list(self._saved_units),
                'planned': None if self.planned is None else (type(self.planned).__name__, dict(vars(self.planned)))}

    @torch.no_grad()
    def load_state_dict(self, state):
        "Restore `state_dict()` (masks are re-applied); a ValueError, with nothing changed, when it does not fit."
        unfit = 'the saved sparsity state does not fit this model: '
        self.maskset.check_state(state['target_masks'], unfit)
        self.scores.check_state(state, unfit)
        held = state.get('held', [None] * len(self.targets))   # a state saved before units were held has none
        if len(held) != len(self.targets) or any(h is not None and h.numel() != t.units
                                                 for h, t in zip(held, self.targets)):
            raise ValueError(unfit + 'the held units do not match the targets')
        saved, units = state.get('saved', {}), state.get('saved_units')   # (a state saved before: none kept)
        units = [None if u is None else torch.zeros_like(u) for u in self._saved_units] if units is None else units
        tensors = {**dict(self.model.named_parameters(remove_duplicate=False)),
                   **dict(self.model.named_buffers(remove_duplicate=False))}
        if len(units) != len(self.targets) or any((u is None) != (v is None) or (u is not None and u.shape != v.shape)
                                                  for u, v in zip(units, self._saved_units)) \
                or any(n not in tensors or tensors[n].shape != v.shape for n, v in saved.items()):
            raise ValueError(unfit + 'the values kept of the dropped units do not match the targets')
        counts = state['counts']
        self.counts = None if counts is None else (_Drops(counts) if counts and isinstance(counts[0], torch.Tensor)
                                                   else tuple(counts))
        self.held = [None if h is None else h.cpu() for h in held]
        self._saved = {n: v.cpu() for n, v in saved.items()}
        self._saved_units = [None if u is None else u.cpu() for u in units]
        self.planned = _budget_from(state.get('planned'))
        self.maskset.load_state(state['target_masks'])
        self._applied = list(self.maskset.by_target)
        self.scores.load_state(state)
        self.apply_masks()


def _budget_from(saved):
    "The budget `state_dict` saved as (class name, attributes), or None."
    if saved is None: return None
    cls = {c.__name__: c for c in BUDGETS.values()}[saved[0]]
    budget = cls.__new__(cls)
    vars(budget).update(saved[1])
    return budget


class _Drops(tuple):
    "The units each target drops, chosen for a budget; equal when the same units drop."
    @staticmethod
    def same(a, b): return len(a) == len(b) and bool((a.sort().values == b.sort().values).all())

    def __eq__(self, other):
        return isinstance(other, _Drops) and len(other) == len(self) and all(map(_Drops.same, self, other))
    __hash__ = tuple.__hash__


def _by_share(lengths):
    """Whose unit comes next (a target index per unit) when each target `i` gives its `lengths[i]` units in order,
    every target alike by its share of its own: halfway through the list is halfway through each target's."""
    return [i for _, i, _ in sorted(((j + 0.5) / n, i, j) for i, n in lengths.items() for j in range(n))]


def _global_drops(scores, k, held):
    """One threshold over scores normalised by each layer's mean; each layer's best unit is never dropped, its
    `held` units (a bool per unit, or None) always are."""
    normed = []
    for s, h in zip(scores, held):
        s = by_mean(s)
        s[s.argmax()] = math.inf
        if h is not None: s[h.to(s.device)] = -math.inf
        normed.append(s)
    flat = torch.cat(normed)
    drop = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    drop[torch.topk(flat, k, largest=False).indices] = True
    return [d.nonzero().flatten() for d in drop.split([s.numel() for s in scores])]


def __getattr__(name):
    if name == 'SparsifyCallback':   # the callback imports fastai; the Sparsifier does not need it
        from .callback import SparsifyCallback
        return SparsifyCallback
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
