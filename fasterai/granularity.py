"""Granularities: which dims of a weight one score (and one mask entry) covers.

A granularity is data: a tuple of the weight dims a score is summed over. 'filter' is structural: it
scores and zeroes whole channel groups of the channel graph (see `graph.py`).
"""

__all__ = ['FILTER', 'GRANULARITIES', 'resolve_granularity']

FILTER = 'filter'

GRANULARITIES = {'weight': (), 'kernel': (2, 3), 'filter': FILTER}
"Granularities by name: dims to sum scores over, or FILTER for whole channel groups."


def resolve_granularity(granularity):
    "The dims tuple (or FILTER) for a name in `GRANULARITIES` or a tuple of dims given directly."
    if (isinstance(granularity, tuple) and len(set(granularity)) == len(granularity) and
            all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in granularity)):
        return granularity
    if isinstance(granularity, str) and granularity in GRANULARITIES: return GRANULARITIES[granularity]
    raise ValueError(f'unknown granularity {granularity!r}: choose one of {sorted(GRANULARITIES)} '
                     'or pass a tuple of distinct weight dims (ints >= 0) to score together')
