"""SparsifyCallback: sparsify a model on a schedule while fastai trains it."""
import torch
import torch.nn as nn
from fastai.callback.core import Callback
from fastai.callback.schedule import LRFinder
from fastai.learner import Learner, SkipToEpoch
from fastcore.basics import patch
from fastcore.meta import delegates
from fastcore.xtras import join_path_file

from .budget import Latency, Params, check_budget, reached
from .criteria import resolve_criterion
from .granularity import STRUCTURAL, resolve_granularity
from .schedules import annealing_cos, resolve_schedule
from .sparsifier import (Sparsifier, check_layer_type, check_method, check_round_to, check_sparsities, check_sparsity,
                         find_layers, targeted_type)
from .layers import kind_of
from .targets import weights_of
from .tracing import unwrap
from . import learner as _learner  # noqa: F401 (registers learn.prune())

__all__ = ['SparsifyCallback']


def _some(names, n=3):
    "'a', 'b', 'c' and 17 more layers are' (for messages)."
    shown = ', '.join(f"'{x}'" for x in names[:n])
    more = f' and {len(names) - n} more' if len(names) > n else ''
    return f'{shown}{more} {"is" if len(names) == 1 else "are"}'


def _check_prune_every(every, granularity, lth, criteria):
    "`every` (epochs between prunings) if it is None or a positive int that the other arguments allow."
    if every is None: return None
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f'prune_every must be a number of epochs >= 1 or None, got {every!r}')
    if resolve_granularity(granularity) not in STRUCTURAL:
        raise ValueError(f"prune_every removes whole filters: it needs granularity='filter' (or 'row', 'head'), "
                         f'got {granularity!r}')
    if lth: raise ValueError('prune_every does not combine with lth=True (rewinding needs the weights of the dense shapes)')
    if resolve_criterion(criteria).needs_ref:
        raise ValueError(f"prune_every does not combine with criteria {criteria!r}, which compares with the weights of "
                         "the dense model: use one of the weights alone ('l1', 'l2') or of gradients ('taylor')")
    return every


def _check_epoch(x, name):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or x < 0:
        raise ValueError(f'{name} must be a number of epochs >= 0, got {x!r}')
    return x


class SparsifyCallback(Callback):
    """Raise the model's sparsity from `start_sparsity` to `sparsity` percent along `sched_func` during `fit`.

    After every training batch the schedule is evaluated on training progress, the `Sparsifier` re-scores
    when the number of zero units changes, and masks are applied again after the optimizer step. `history`
    records (epoch, planned, measured sparsity) per batch. `learn.save` also writes the callback's state
    (`NAME.sparsify.pth` beside `NAME.pth`), and after `learn.load` the next SparsifyCallback resumes from it.

    `target`: instead of `sparsity`, a budget (`MACs(0.5)`, `Params(0.3)`, `Latency(0.5, batch_size=64)`): the
    schedule ramps the cost from the dense model's down to it, and at each step the Sparsifier zeroes the channels
    that meet it ('local': one percentage for every group; 'global': the channels least important per unit of cost
    saved). `history` then records (epoch, planned ratio, reached ratio); a Latency budget is timed on pruned copies
    on the first batch and at the end. With `prune_every` the budget stays a ratio of the dense model's cost: after a
    pruning the plans ask the smaller model for the budget over the share of it that is left (counted, or timed
    against a copy of the model taken before the first pruning).
    """
    order = 55         # after Recorder (which prints the epoch row), before ProgressCallback (the header)
    run_valid = False

    def __init__(self, sparsity=None, granularity='filter', method='local', criteria='l1', sched_func=annealing_cos,
                 layer_type=nn.Conv2d, start_sparsity=0, start_epoch=0, end_epoch=None, lth=False, rewind_epoch=0,
                 exclude=(), leaf_modules=(), round_to=None, prune_every=None, target=None):
        if (sparsity is None) == (target is None):
            raise ValueError('give sparsity (a percentage, or one per layer) or target (a budget: MACs(0.5), Params(0.3), '
                             f'Latency(0.5, batch_size=64)), not {"both" if target is not None else "neither"}')
        self.target = None if target is None else check_budget(target)   # a budget instead of a percentage
        if self.target is not None:
            if resolve_granularity(granularity) not in STRUCTURAL:
                raise ValueError(f"a budget chooses whole channels: it needs granularity='filter' (or 'row', 'head'), "
                                 f'got {granularity!r}')
            if start_sparsity:
                raise ValueError(f'start_sparsity is a percentage ({start_sparsity!r}); a budget ramps the cost from the '
                                 "dense model's: give start_epoch instead, or a sparsity")
        self.sparsity = None if sparsity is None else check_sparsities(sparsity, check_method(method))   # target %
        self.start_sparsity = check_sparsity(start_sparsity)    # percentage at the start of training
        self.granularity = granularity                          # see GRANULARITIES, 'N:M' or a dims tuple
        resolve_granularity(granularity)
        self.method = check_method(method)                      # 'local' or 'global'
        self.criteria = criteria                                # a name in CRITERIA or a function of the weight
        resolve_criterion(criteria)
        self.sched_func = resolve_schedule(sched_func)          # f(start, end, pos), a name or a function
        self.layer_type = check_layer_type(layer_type)          # layer type(s) to sparsify
        self.start_epoch = _check_epoch(start_epoch, 'start_epoch')   # pruning runs from this epoch...
        self.end_epoch = None if end_epoch is None else _check_epoch(end_epoch, 'end_epoch')   # ...to this one
        if self.end_epoch is not None and self.end_epoch <= self.start_epoch:
            raise ValueError(f'end_epoch ({end_epoch}) must come after start_epoch ({start_epoch})')
        if not isinstance(lth, bool): raise ValueError(f'lth must be True or False, got {lth!r}')
        self.lth, self.rewind_epoch = lth, _check_epoch(rewind_epoch, 'rewind_epoch')   # lottery-ticket rewinding
        self.exclude, self.leaf_modules = exclude, leaf_modules  # layers left dense; modules the tracer keeps whole
        self.round_to = check_round_to(round_to)                 # kept channels per group a multiple of it
        if round_to is not None and self.method == 'global' and target is None:   # (the Sparsifier would say so only
            raise ValueError("round_to with method='global' rounds the plans of a budget: pass target=MACs(...), "   # at
                             "Params(...) or Latency(...) instead of a sparsity, or use method='local'")   # the first batch)
        self.prune_every = _check_prune_every(prune_every, granularity, lth, criteria)   # epochs between prunings
        self.sparsifier, self.history, self._rewind, self._origins, self._dense = None, [], None, None, None
        self._scale, self._reference = 1., None   # prune_every with a budget: dense cost over the current model's
        self._start = self.start_sparsity   # the schedule's start in this fit: raised to the sparsity found

    def planned(self, epoch, n_epoch):
        """The scheduled sparsity (a number, or a dict by layer) at `epoch` (a float) of `n_epoch`, starting from
        `start_sparsity` or the sparsity found in the model at the start of this fit, whichever is higher."""
        end = self.end_epoch if self.end_epoch is not None else n_epoch
        pos = min(max((epoch - self.start_epoch) / max(end - self.start_epoch, 1e-12), 0.), 1.)
        start = self._start
        if self.target is not None:   # the cost ramps from the dense model's to the budget (reached: the budget itself)
            if pos >= 1: return self.target
            return self.target.at(1 - self.sched_func(0., 100 * (1 - self.target.ratio), pos) / 100)
        if isinstance(self.sparsity, dict):
            return {k: self.sched_func(min(start, v), v, pos) for k, v in self.sparsity.items()}
        return self.sched_func(min(start, self.sparsity), self.sparsity, pos)

    def _here(self, budget):
        """`budget` (a ratio of the dense model's cost) as a ratio of the current model's: the same after
        `prune_every` has removed channels (the Sparsifier's dense model is then the pruned one)."""
        return budget if self._scale == 1 else budget.at(min(budget.ratio * self._scale, 1.))

    def _cost_ratio(self, measure=False):
        "The budget's cost ratio of the model now (modelled, or `measure`d), over the dense model's."
        here = self._here(self.target)
        return (self.sparsifier.measure(here) if measure else self.sparsifier.cost_ratio(here)) / self._scale

    def _count(self):
        "The model's MACs or parameters, as the budget counts them."
        from .report import count_macs, count_params
        model = unwrap(self.learn.model)
        return count_params(model) if isinstance(self.target, Params) else count_macs(model, self._example)

    def _rescale(self):
        """With `prune_every` and a budget: the dense model's cost over the current model's, counted (MACs,
        parameters) or timed against a copy of the model taken before the first pruning (latency)."""
        if not isinstance(self.target, Latency): self._scale = self._reference / self._count(); return
        self._scale = 1 / reached(self.target, self._reference, unwrap(self.learn.model), self._example)

    # ------------------------------------------------------------ events
    def before_fit(self):
        if any(isinstance(c, LRFinder) for c in self.learn.cbs):
            self.run = False   # a learning-rate range test measures the model as it is (fastai sets run back)
            return
        model = unwrap(self.learn.model)
        g = resolve_granularity(self.granularity)
        layers = find_layers(model, targeted_type(g, self.layer_type), self.exclude, g)
        if self.sparsifier is not None and self.sparsifier.model is not model:
            self.sparsifier = None   # learn.model was replaced (learn.prune()): traced anew on the first batch
            self._origins = self._dense = self._reference = None
            self._scale = 1.
        self.history, self._rewind, self._measured, self._ready, self._retimed = [], None, 0., False, False
        self._start = self.start_sparsity
        # fine_tune's first phase (learn.freeze()): frozen layers cannot recover, so the sparsity is held
        self._frozen = [n for n, m in layers.items() if not all(getattr(m, w).requires_grad for w in weights_of(m))]
        # zeros found are held when they come from sparsifying: an earlier fit of this callback or of another one on
        # this model, or a loaded state; a weight initialised at zero (LoRA's B, a zero-init residual) is left free
        last = getattr(getattr(self.learn, '_sparsify_last', None), 'cb', None)
        self._hold = (self.sparsifier is not None or getattr(self.learn, '_sparsify_resume', None) is not None or
                      (last is not None and last.sparsifier is not None and last.sparsifier.model is model))
        self.learn._sparsify_last = _Last(self)   # learn.save after fit still finds the state
        if self._frozen:
            print(f'Sparsity held in this fit: {_some(self._frozen)} frozen (learn.freeze(), as in the first '
                  'phase of fine_tune); the schedule runs in the fit where every targeted layer trains')
        elif self.target is not None:
            print(f'Pruning of {self.granularity} until {self.target.metric} at {self.target.ratio:g} of the dense model')
        else:
            print(f'Pruning of {self.granularity} until a sparsity of '
                  f'{self.sparsity if isinstance(self.sparsity, dict) else format(self.sparsity, "g")}%')

    def before_batch(self):
        if not self._ready: self._first_batch()
        if self.lth and self._rewind is None and self.epoch >= self.rewind_epoch:
            self._rewind = {k: p.detach().clone() for k, p in self.learn.model.named_parameters()}
            if self.sparsifier.criterion.needs_ref: self.sparsifier.set_reference()

    def _first_batch(self):
        "Trace with this batch (every input, any dtype); resume a saved state, or hold the zeros found."
        self._ready = True
        if self.sparsifier is None:
            xb = tuple(x[:8].detach().clone() for x in self.xb) if self.prune_every else tuple(self.xb)
            self._build(xb[0] if len(xb) == 1 else xb)
        if self.target is not None and not self._frozen:
            if isinstance(self.target, Latency) and not self.sparsifier.cost_model(self.target).measured:
                got = self.sparsifier.calibrate(self._here(self.target)) / self._scale
                print(f'Latency budget: {self.sparsifier.cost_model(self.target).timed} pruned copies timed '
                      f'(the closest at {got:.3f} of the dense model)')
                if got > self.target.ratio + 0.03:
                    print(f'Latency budget {self.target.ratio:g} looks out of reach: the closest plan timed at '
                          f'{got:.3f} of the dense model; the schedule goes as far as the targeted layers can')
            self.sparsifier._budget_drops(self._here(self.target))   # an unreachable budget raises now, not epochs later
        state = self.learn.__dict__.pop('_sparsify_resume', None)   # left by learn.load (see below)
        if state is not None and any(isinstance(c, SkipToEpoch) for c in self.learn.cbs):
            self.load_state_dict(state)   # fit(..., start_epoch=k) after learn.load: the same run goes on
            return
        if not self._hold: return
        found = self.sparsifier.hold_zeros()   # never released: the schedule starts from them
        if any(h is not None for h in self.sparsifier.held) and not self._frozen:
            self._start = max(self._start, found)
            print(f'Found a sparsity of {found:.2f}% in the targeted layers: the schedule starts from it')

    def _build(self, example):
        """The Sparsifier of learn.model, traced on `example` (the first batch); with `prune_every` the example is
        kept for the prunings, and after one the removed units count as zero."""
        self.sparsifier = Sparsifier(self.learn.model, self.granularity, self.method, self.criteria, self.layer_type,
                                     example, self.leaf_modules, self.exclude, self.round_to)
        self.sparsifier.final = None if self.target is None else self._here(self.target)
        if not self.prune_every: return
        self._example = example
        if self._origins is None:
            self._origins = {t.name: t.units for t in self.sparsifier.targets}
            self._dense = {n: (rows.numel(), getattr(m, weights_of(m)[0]).numel()) for n, m, rows in self._rows()}
            if self.target is not None:   # the dense cost, or for latency the dense model to time against
                self._reference = self.sparsifier._probe() if isinstance(self.target, Latency) else self._count()
        else:
            self.sparsifier.set_origins(self._origins)

    def _rows(self):
        "(name, layer, bool per output row: any weight non-zero) of every targeted layer."
        for n, m in self.sparsifier._targeted().items():
            w = getattr(m, weights_of(m)[0]).detach().movedim(kind_of(m).out_dim, 0)
            yield n, m, w.flatten(1).ne(0).any(1)

    def measured(self):
        """The measured sparsity (%): zero weights in the targeted layers; with `prune_every`, what it would be had
        the removed filters stayed as zero rows of the dense layers (so it reaches the `sparsity` asked)."""
        if self._dense is None: return self.sparsifier.sparsity()
        zero = sum((self._dense[n][0] - int(live.sum())) * self._dense[n][1] // self._dense[n][0]
                   for n, _, live in self._rows())
        return 100 * zero / sum(total for _, total in self._dense.values())

    def before_step(self):
        # gradients are final here: unscaled by fastai's MixedPrecision (order 10), and a step it skips for
        # overflowing never reaches this callback
        self.sparsifier.accumulate()

    def after_batch(self):
        epoch = self.epoch + (self.iter + 1) / self.n_iter
        planned = 0. if self._frozen else self.planned(epoch, self.n_epoch)   # held: only the units found zero
        if isinstance(self.target, Latency) and not self._frozen and planned == self.target and not self._retimed:
            self._retimed = True   # the schedule reached the budget: time the plans of the trained weights
            got = self.sparsifier.calibrate(self._here(self.target), fresh=True) / self._scale
            print(f'Latency budget reached by the schedule: {self.sparsifier.cost_model(self.target).timed} plans timed '
                  f'again, the closest at {got:.3f} of the dense model')
        if self.sparsifier.sparsify(self._here(planned) if self.target is not None and planned else planned):
            if self.lth and self._rewind is not None: self._rewind_weights()
            self._measured = self.measured() if self.target is None else self._cost_ratio()
        if self.target is not None and not self._frozen: planned = planned.ratio
        self.history.append((epoch, self._measured if self._frozen else planned, self._measured))

    @torch.no_grad()
    def _rewind_weights(self):
        "Lottery tickets: surviving weights go back to their values at the rewind epoch; pruned ones stay zero."
        for k, p in self.learn.model.named_parameters(): p.copy_(self._rewind[k])
        self.sparsifier.apply_masks()

    def after_epoch(self):
        if self.sparsifier is None: return
        budget = '' if self.target is None else \
            f' ({self.target.metric} at {self._cost_ratio():.3f} of the dense model)'
        print(f'Sparsity at epoch {self.epoch}: {self.measured():.2f}%{budget}')
        if self.prune_every and not self._frozen and (self.epoch + 1) % self.prune_every == 0: self._prune()

    def _prune(self):
        "Remove the zeroed filters now (learn.prune(): the optimizer state follows) and go on on the smaller model."
        dense = sum(p.numel() for p in self.learn.model.parameters())
        self.learn.prune(example_input=self._example, leaf_modules=self.leaf_modules)
        self._build(self._example)
        self.sparsifier.hold_zeros()   # a group's last channel, kept though zero, stays zero
        left = sum(p.numel() for p in self.learn.model.parameters())
        print(f'Pruned after epoch {self.epoch}: {left:,} parameters left of {dense:,}')
        if self.target is None: return
        self._rescale()
        self.sparsifier.final = self._here(self.target)
        if isinstance(self.target, Latency) and self._here(self.target).ratio < 1 and self.epoch + 1 < self.n_epoch:
            # the plans of the smaller model timed (the ones timed before were of the model it was)
            got = self.sparsifier.calibrate(self._here(self.target)) / self._scale
            print(f'Latency budget: {self.sparsifier.cost_model(self.target).timed} plans of the pruned model timed '
                  f'(the closest at {got:.3f} of the dense model)')

    def after_fit(self):
        if self.sparsifier is not None and not self._frozen:
            print(f'Final Sparsity: {self.measured():.2f}')
            if self.target is not None:
                got = self._cost_ratio(measure=True)
                print(f'Final {self.target.metric}: {got:.3f} of the dense model once pruned '
                      f'({"timed" if isinstance(self.target, Latency) else "counted"}; asked {self.target.ratio:g})')

    # ------------------------------------------------------------ state
    def state_dict(self):
        "The sparsifier's state, the lottery-ticket rewind weights and the history: what resuming needs."
        return {'sparsifier': self.sparsifier.state_dict(), 'rewind': self._rewind,
                'history': [[e, p, m] for e, p, m in self.history], 'measured': self._measured}

    def load_state_dict(self, state):
        "Restore `state_dict()` into this callback, whose sparsifier exists (built on the first batch)."
        self.sparsifier.load_state_dict(state['sparsifier'])
        self._rewind, self._measured = state['rewind'], state['measured']
        self.history = [tuple(h) for h in state['history']]

    # ------------------------------------------------------------ plots
    def plot_schedule(self, n_epoch, n_iter=100, ax=None):
        "Draw the planned sparsity over `n_epoch` epochs (before `fit`); returns the matplotlib axes."
        import matplotlib.pyplot as plt
        ax = ax or plt.subplots(figsize=(5, 3))[1]
        xs = [n_epoch * i / (n_epoch * n_iter) for i in range(n_epoch * n_iter + 1)]
        ys = [self.planned(x, n_epoch) for x in xs]
        if self.target is not None: ys = [y.ratio for y in ys]
        if isinstance(self.sparsity, dict):
            for k in self.sparsity: ax.plot(xs, [y[k] for y in ys], label=k)
            ax.legend()
        else:
            ax.plot(xs, ys, label='planned')
        ax.set_xlabel('epoch'); ax.set_ylabel('sparsity (%)' if self.target is None else f'{self.target.metric} ratio')
        return ax

    def plot_history(self, ax=None):
        "Draw the planned and the measured sparsity of each batch of the last `fit`; returns the axes."
        import matplotlib.pyplot as plt
        if not self.history: raise ValueError('no history yet: plot_history draws the batches of a finished fit')
        ax = ax or plt.subplots(figsize=(5, 3))[1]
        xs = [h[0] for h in self.history]
        if not isinstance(self.sparsity, dict): ax.plot(xs, [h[1] for h in self.history], label='planned')
        ax.plot(xs, [h[2] for h in self.history], label='measured', linestyle='--')
        ax.set_xlabel('epoch'); ax.legend()
        ax.set_ylabel('sparsity (%)' if self.target is None else f'{self.target.metric} ratio')
        return ax


# ---------------------------------------------------------------- learn.save / learn.load carry the state
# fastai has no callback event for saving or loading, and SaveModelCallback and LRFinder call learn.save/learn.load
# themselves; so these two methods are wrapped (once, for every Learner). Both are inert unless a SparsifyCallback
# trained this learner in this process: save writes the state only while it describes the model being saved (the
# same model object, every masked entry still zero: a later fit without the callback lets zeros regrow, and then
# nothing is written), and what load reads is used only by a fit that resumes (fit(..., start_epoch=k)).
def _state_file(model_file):
    return model_file.with_name(model_file.stem + '.sparsify.pth')


class _Last:
    "Holds the SparsifyCallback that trained a learner last; pickled empty (`learn.export` does not carry it)."
    def __init__(self, cb=None): self.cb = cb
    def __reduce__(self): return (_Last, ())


def _sparsify_cb(learn):
    "The SparsifyCallback whose state describes `learn.model` now, or None."
    last = getattr(learn, '_sparsify_last', None)
    cb = next((c for c in learn.cbs if isinstance(c, SparsifyCallback)), last.cb if last is not None else None)
    if cb is None or cb.sparsifier is None or cb.sparsifier.model is not unwrap(learn.model): return None
    return cb if cb.sparsifier.masks_hold() else None


_save, _load = Learner.save, Learner.load


@patch
@delegates(_save)
def save(self: Learner, file, **kwargs):
    "Learner.save, plus the SparsifyCallback's state (masks, schedule history, criterion state) beside the model."
    path = _save(self, file, **kwargs)
    cb = _sparsify_cb(self)
    if cb is not None: torch.save(cb.state_dict(), _state_file(path))
    return path


@patch
@delegates(_load)
def load(self: Learner, file, device=None, **kwargs):
    """Learner.load; a SparsifyCallback state saved beside the model is kept for the next SparsifyCallback, which
    resumes from it when its fit resumes (fit(..., start_epoch=k)) and otherwise holds the zeros it finds."""
    res = _load(self, file, device=device, **kwargs)
    state = _state_file(join_path_file(file, self.path / self.model_dir, ext='.pth'))
    if device is None: device = getattr(self.dls, 'device', None)
    self._sparsify_resume = torch.load(state, map_location=device, weights_only=True) if state.exists() else None
    return res
