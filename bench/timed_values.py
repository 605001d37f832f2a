"""Does a CPU time depend on the values, not only the shapes? What `Sparsifier.measure` gives masked units.

A latency budget is calibrated by timing pruned copies of the model against a dense reference while it trains.
The masks hold some weights at zero then; the timed copies give the masked units back the values they had when
dropped (the masks decide what goes, not the zeros; entries left near zero are made zero, or they would be timed
as slow denormals). Part 1 times single operations on random inputs and
on the same inputs with half the channels constant (what a filter of constant weights feeds on). Part 2 times the
seed net (random weights, batch 64, eval) as `Sparsifier.measure` does for `Latency(0.5)` ('local', L1): the plan
timed before its masks are applied, then after (the model holding their zeros), with the masked units given back
the values they were dropped with, as `measure` does, and made 1 (as it did at first, and still does for units
dropped with no values kept: zeros found, a state loaded); and the dense model with its masked filters made 1,
and left at zero (their channels constant: what a copy timed as the model holds it would be), against the dense
model itself. Medians of `torch.utils.benchmark` runs; ratios of interleaved runs.

Run: `.venv/bin/python bench/timed_values.py [--threads 1 2] [--out bench/results/timed_values.md]`
"""
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import threads_args, write_result  # noqa: E402

from fasterai.examples import Net  # noqa: E402
from fasterai.latency import batch_of, latency_ratio  # noqa: E402
from fasterai.sparsifier import Latency, Sparsifier  # noqa: E402

LAYERS = (torch.nn.Conv2d, torch.nn.Linear)


def op_rows(threads):
    torch.manual_seed(0)
    x = torch.randn(64, 20, 24, 24)
    half = x.clone()
    half[:, :10] = 0.3   # half the channels constant
    w = torch.randn(50, 20, 5, 5)
    ops = {'relu': F.relu, 'max_pool2d(2, 2)': lambda a: F.max_pool2d(a, 2, 2),
           'batch_norm (eval)': lambda a: F.batch_norm(a, torch.zeros(20), torch.ones(20), torch.ones(20), torch.zeros(20)),
           'conv2d 20->50, 5x5': lambda a: F.conv2d(a, w)}
    rows = []
    for name, f in ops.items():
        t = [Timer('f(a)', globals=dict(f=f, a=a), num_threads=threads).blocked_autorange(min_run_time=0.5).median
             for a in (x, half)]
        rows.append(f'| {threads} | {name} | {t[0] * 1e6:.0f} | {t[1] * 1e6:.0f} | {t[1] / t[0]:.3f} |')
    return rows


def net_row(threads):
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = Net(in_channels=1).eval()
    dense = copy.deepcopy(model)
    sp = Sparsifier(model, 'filter', 'local', 'l1', LAYERS, example_input=(2, 1, 28, 28))
    budget = Latency(0.5, batch_size=64, threads=threads)
    masks = sp.plan_masks(budget)
    before = sp.measure(budget, masks)
    sp.sparsify(budget)
    after = sp.measure(budget, masks)
    sp._saved_units = [None if s is None else torch.zeros_like(s) for s in sp._saved_units]   # none kept: made 1
    ones = sp.measure(budget, masks)
    constant = copy.deepcopy(model)
    with torch.no_grad():
        for p in constant.parameters(): p.masked_fill_(p == 0, 1.)
    example = batch_of(dense, (2, 1, 28, 28), 64)
    fast = latency_ratio(constant, dense, example, threads)
    zero = latency_ratio(model, dense, example, threads)
    return f'| {threads} | {before:.3f} | {after:.3f} | {ones:.3f} | {fast:.3f} | {zero:.3f} |'


def main():
    args = threads_args(__doc__)
    lines = ['| threads | operation | random input, us | half the channels constant, us | ratio |', '|---|---|---|---|---|']
    for t in args.threads: lines += op_rows(t)
    lines += ['', '| threads | plan timed before its masks | after, masked units as dropped | after, masked units made 1 '
                  '| dense with masked filters made 1, over dense | dense with masked filters zero, over dense |',
              '|---|---|---|---|---|---|']
    for t in args.threads: lines.append(net_row(t))
    print('\n'.join(lines))
    if args.out: write_result(args.out, 'Timings that depend on values', __doc__, lines)


if __name__ == '__main__':
    main()
