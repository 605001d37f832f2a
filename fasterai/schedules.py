"""Sparsity schedules: pure functions `f(start, end, pos)` of training progress `pos` in [0, 1].

They follow fastai's `sched_*` convention, so fastai's own schedules (`sched_cos`, `sched_lin`) and
`combine_scheds` can be passed to `SparsifyCallback(sched_func=...)` as well.
"""
import math

__all__ = ['annealing_cos', 'annealing_linear', 'annealing_agp', 'one_shot', 'SCHEDULES', 'resolve_schedule']


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


SCHEDULES = {'cos': annealing_cos, 'linear': annealing_linear, 'agp': annealing_agp, 'one_shot': one_shot}
"Schedules by name."


def resolve_schedule(sched):
    "A schedule function from its name in `SCHEDULES` or a callable `f(start, end, pos)`."
    if callable(sched): return sched
    if sched in SCHEDULES: return SCHEDULES[sched]
    raise ValueError(f'unknown schedule {sched!r}: choose one of {sorted(SCHEDULES)} or pass a function f(start, end, pos)')
