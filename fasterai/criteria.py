"""Importance criteria: one score per weight (higher = keep), from the weight, its value at a reference point
(initialisation or a rewind epoch), or gradient statistics accumulated during training.

A granularity then sums these scores over the dims it groups (a kernel, a filter's rows), so 'l2' ranks
filters by their squared L2 norm. A plain function `f(weight) -> scores` works as a criterion too.
"""
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch

__all__ = ['Criterion', 'CRITERIA', 'resolve_criterion', 'l1', 'l2', 'large_final', 'squared_final', 'small_final',
           'large_init', 'small_init', 'large_init_large_final', 'magnitude_increase', 'updating_magnitude_increase',
           'movement', 'taylor', 'random']


@dataclass(frozen=True)
class Criterion:
    """How to score weights. `score(w, ref, acc)` gets the weight, its reference copy (when `needs_ref`) and
    the sum over training steps of `accumulate(w, grad)` (when given); it returns one score per weight."""
    name: str
    score: Callable
    needs_ref: bool = False               # the weights at a reference point (init, or a rewind epoch)
    accumulate: Optional[Callable] = None  # a per-step statistic of (weight, gradient), summed over steps
    updating: bool = False                # the reference moves to the current weights at each pruning step
    elementwise: bool = False             # each score depends on that weight's entries alone: rows can be
                                          # scored a block at a time (no full-size temporary)

    def __call__(self, w, ref=None, acc=None):
        if self.needs_ref and ref is None: raise ValueError(f"criteria '{self.name}' needs the reference weights")
        if self.accumulate is not None and acc is None: acc = torch.zeros_like(w)   # no step seen yet
        return self.score(w, ref, acc)


def _abs(w, ref, acc): return w.abs()
def _square(w, ref, acc): return w.square()
def _neg_abs(w, ref, acc): return -w.abs()
def _ref_abs(w, ref, acc): return ref.abs()
def _neg_ref_abs(w, ref, acc): return -ref.abs()
def _min_abs(w, ref, acc): return torch.minimum(w.abs(), ref.abs())
def _increase(w, ref, acc): return w.abs() - ref.abs()
def _acc(w, ref, acc): return acc
def _movement_step(w, g): return -w * g
def _taylor_step(w, g): return (w * g).square()
def _random(w, ref, acc):
    g = torch.Generator().manual_seed(hash(tuple(w.shape)) % 2 ** 31)   # the same scores at every call
    return torch.rand(w.shape, generator=g).to(w.device)


large_final = l1 = Criterion('l1', _abs, elementwise=True)
"|w|: keep the largest weights (Han et al. 2015, https://arxiv.org/abs/1506.02626)."
squared_final = l2 = Criterion('l2', _square, elementwise=True)
"w**2: a filter's score is its squared L2 norm (Li et al. 2017, https://arxiv.org/abs/1608.08710)."
small_final = Criterion('small_final', _neg_abs, elementwise=True)
"-|w|: keep the smallest weights, a control (Zhou et al. 2019, https://arxiv.org/abs/1905.01067)."
large_init = Criterion('large_init', _ref_abs, needs_ref=True, elementwise=True)
"|w_init|: keep what was large at the reference point (Zhou et al. 2019, https://arxiv.org/abs/1905.01067)."
small_init = Criterion('small_init', _neg_ref_abs, needs_ref=True, elementwise=True)
"-|w_init|: keep what was small at the reference point (Zhou et al. 2019)."
large_init_large_final = Criterion('large_init_large_final', _min_abs, needs_ref=True, elementwise=True)
"min(|w_init|, |w|): large at both points (Zhou et al. 2019, https://arxiv.org/abs/1905.01067)."
magnitude_increase = Criterion('magnitude_increase', _increase, needs_ref=True, elementwise=True)
"|w| - |w_init|: keep the weights that grew most (Zhou et al. 2019, https://arxiv.org/abs/1905.01067)."
updating_magnitude_increase = Criterion('updating_magnitude_increase', _increase, needs_ref=True, updating=True, elementwise=True)
"|w| - |w_prev|, the reference moving to the weights of the last pruning step."
movement = Criterion('movement', _acc, accumulate=_movement_step, elementwise=True)
"""-sum over steps of w * dL/dw: keep the weights moving away from zero (movement pruning, Sanh et al. 2020,
https://arxiv.org/abs/2005.07683)."""
taylor = Criterion('taylor', _acc, accumulate=_taylor_step, elementwise=True)
"""sum over steps of (w * dL/dw)**2: the first-order Taylor estimate of the loss change when a weight is removed
(Molchanov et al. 2019, https://arxiv.org/abs/1906.10771); a filter sums its weights' estimates."""
random = Criterion('random', _random)
"""Uniform random scores, fixed per weight shape (so masks only grow and agree across processes): the control
every criterion should beat."""

CRITERIA = {c.name: c for c in (l1, l2, small_final, large_init, small_init, large_init_large_final,
                                magnitude_increase, updating_magnitude_increase, movement, taylor, random)}
CRITERIA.update(large_final=l1, squared_final=l2)
"Criteria by name."


def _of_weight(f, w, ref, acc): return f(w)


def _plain(f):
    return Criterion(getattr(f, '__name__', 'custom'), partial(_of_weight, f))


def resolve_criterion(criteria):
    "A `Criterion` from its name in `CRITERIA`, a `Criterion`, or a callable `f(weight) -> scores of the same shape`."
    if isinstance(criteria, Criterion): return criteria
    if isinstance(criteria, str) and criteria in CRITERIA: return CRITERIA[criteria]
    if callable(criteria) and not isinstance(criteria, type): return _plain(criteria)
    raise ValueError(f'unknown criteria {criteria!r}: choose one of {sorted(CRITERIA)} or pass a function f(weight)')
