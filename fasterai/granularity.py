"""Granularities: which weights one score (and one mask entry) covers.

A granularity is data: the weight dims a score is summed over, per weight rank (a Conv2d weight is
out x in x kh x kw, a Linear weight out x in). 'filter' (or 'row') is structural: it scores and zeroes whole
channel groups of the channel graph (see `graph.py`); 'head' does so for the groups of attention heads alone. 'N:M' keeps at most N non-zero weights in every M
consecutive ones along the input dim (2:4 is the pattern sparse tensor cores run).
"""
import re
from typing import NamedTuple

__all__ = ['FILTER', 'HEAD', 'STRUCTURAL', 'NM', 'GRANULARITIES', 'resolve_granularity', 'layer_dims']

FILTER = 'filter'
HEAD = 'head'
STRUCTURAL = (FILTER, HEAD)
"The granularities that zero whole channel groups, which the Pruner removes."


class NM(NamedTuple):
    "N:M semi-structured sparsity: at most `n` non-zero weights in each block of `m` along the input dim."
    n: int
    m: int


GRANULARITIES = {
    'weight': {2: (), 3: (), 4: ()},     # each weight
    'vector': {4: (3,)},                 # each row of each kh x kw kernel (pass (2,) for its columns)
    'kernel': {3: (2,), 4: (2, 3)},      # each kernel: one (output, input) channel pair
    'column': {2: (0,), 4: (0, 2, 3)},   # one input feature (Linear) or input channel (conv) across all rows
    'filter': FILTER,                    # whole output channels with everything coupled to them
    'row': FILTER,                       # the same for a Linear layer: whole output neurons
    'head': HEAD,                        # whole attention heads (q, k, v rows and output columns) alone
}
"Granularities by name: weight rank -> dims to sum scores over, or FILTER for whole channel groups."


def resolve_granularity(granularity):
    "FILTER, HEAD, an `NM`, a dims tuple, or a name's {rank: dims}; a ValueError for anything else."
    if (isinstance(granularity, tuple) and len(set(granularity)) == len(granularity) and
            all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in granularity)):
        return granularity
    if isinstance(granularity, str) and granularity in GRANULARITIES: return GRANULARITIES[granularity]
    match = re.fullmatch(r'(\d+):(\d+)', granularity) if isinstance(granularity, str) else None
    if match and 0 < int(match[1]) < int(match[2]): return NM(int(match[1]), int(match[2]))
    raise ValueError(f'unknown granularity {granularity!r}: choose one of {sorted(GRANULARITIES)}, '
                     "'N:M' with 0 < N < M (such as '2:4'), or a tuple of distinct weight dims (ints >= 0) "
                     'to score together')


def layer_dims(granularity, name, weight):
    "The dims to sum scores over for layer `name`'s `weight` under a resolved non-structural granularity."
    if isinstance(granularity, dict):
        if weight.dim() not in granularity:
            names = sorted(k for k, v in GRANULARITIES.items() if v in STRUCTURAL or weight.dim() in v)
            raise ValueError(f"this granularity does not apply to layer '{name}' (a weight of {weight.dim()} dims): "
                             f'choose one of {names}')
        return granularity[weight.dim()]
    if any(d >= weight.dim() for d in granularity):
        raise ValueError(f"granularity dims {granularity} do not fit layer '{name}' whose weight has {weight.dim()} dims")
    return granularity
