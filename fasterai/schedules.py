"""Sparsity schedules: pure functions `f(start, end, pos)` of training progress `pos` in [0, 1].

They follow fastai's `sched_*` convention, so fastai's own `sched_cos`, `sched_lin` can be passed to
`SparsifyCallback(sched_func=...)`; so can a function of `pos` alone giving the sparsity itself, such as
fastai's `SchedCos(0, 30)` or `combine_scheds(...)` (then `start` and `end` are not used).
"""
import inspect
import math
from functools import partial

__all__ = ['annealing_cos', 'annealing_linear', 'annealing_agp', 'one_shot', 'iterative', 'one_cycle', 'dsd',
           'SCHEDULES', 'resolve_schedule']


def annealing_cos(start, end, pos):
    "Cosine from `start` to `end`: slow at both ends, fastest half-way."
    return start + (end - start) * (1 - math.cos(math.pi * pos)) / 2


def annealing_linear(start, end, pos):
    "Straight line from `start` to `end`."
    return start + (end - start) * pos


def annealing_agp(start, end, pos):
    """Automated gradual pruning: fast at first, then slower (cubic).

    s(pos) = end + (start - end) * (1 - pos)**3. Zhu and Gupta 2017, https://arxiv.org/abs/1710.01878
    """
    return end + (start - end) * (1 - pos) ** 3


def one_shot(start, end, pos):
    "`start` until the very end of training, then `end` at once."
    return end if pos >= 1 else start


def _steps(n, start, end, pos):
    return start + (end - start) * math.floor(pos * n + 1e-9) / n


def iterative(n):
    "`n` equal steps from `start` to `end`, at pos = 1/n, 2/n, ..., 1 (iterative pruning: prune, train, repeat)."
    if isinstance(n, bool) or not isinstance(n, int) or n < 1: raise ValueError(f'iterative needs n >= 1 steps, got {n!r}')
    f = partial(_steps, n)
    f.__name__ = f'iterative({n})'
    return f


def one_cycle(start, end, pos, alpha=14, beta=6):
    """A logistic S-curve from `start` to `end`: slow start, steep middle, flat end.

    s(pos) = start + (end - start) * (g(pos) - g(0)) / (g(1) - g(0)) with g(p) = 1 / (1 + exp(beta - alpha * p)).
    """
    g = lambda p: 1 / (1 + math.exp(beta - alpha * p))
    return start + (end - start) * (g(pos) - g(0)) / (g(1) - g(0))


def dsd(start, end, pos):
    """Dense-sparse-dense: cosine up to `end` at mid-training, then back down to `start` so the pruned weights
    can grow again (Han et al. 2017, https://arxiv.org/abs/1607.04381)."""
    return annealing_cos(start, end, 2 * pos) if pos < 0.5 else annealing_cos(end, start, 2 * pos - 1)


SCHEDULES = {'cos': annealing_cos, 'linear': annealing_linear, 'agp': annealing_agp, 'one_shot': one_shot,
             'one_cycle': one_cycle, 'dsd': dsd}
"Schedules by name."


def _of_pos(f, start, end, pos):
    return f(pos)


def resolve_schedule(sched):
    "A function f(start, end, pos) from a name in `SCHEDULES`, such a function, or a function of `pos` alone."
    if isinstance(sched, str) and sched in SCHEDULES: return SCHEDULES[sched]
    if callable(sched):
        try:
            inspect.signature(sched).bind(0, 30, 0.5)
            return sched
        except TypeError:
            pass
        except ValueError:   # no signature to inspect (a builtin): take it as f(start, end, pos)
            return sched
        try:
            inspect.signature(sched).bind(0.5)
            return partial(_of_pos, sched)
        except TypeError:
            pass
    raise ValueError(f'unknown schedule {sched!r}: choose one of {sorted(SCHEDULES)}, or pass a function '
                     'f(start, end, pos) or f(pos)')
