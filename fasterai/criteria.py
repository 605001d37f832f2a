"""Importance criteria: a function of a weight tensor giving each element's score (higher = keep).

A granularity then sums these scores over the dims it groups (a filter's row, a kernel), so 'l2' ranks
filters by their squared L2 norm.
"""

__all__ = ['l1', 'l2', 'CRITERIA', 'resolve_criterion']


def l1(w):
    "Magnitude |w| (large_final in the lottery-ticket papers; Han et al. 2015, https://arxiv.org/abs/1506.02626)."
    return w.abs()


def l2(w):
    "Squared magnitude w**2 (a filter's score is its squared L2 norm; Li et al. 2017, https://arxiv.org/abs/1608.08710)."
    return w.square()


CRITERIA = {'l1': l1, 'l2': l2}
"Criteria by name."


def resolve_criterion(criteria):
    "A criterion from its name in `CRITERIA` or a callable `f(weight) -> scores of the same shape`."
    if callable(criteria): return criteria
    if criteria in CRITERIA: return CRITERIA[criteria]
    raise ValueError(f'unknown criteria {criteria!r}: choose one of {sorted(CRITERIA)} or pass a function f(weight)')
