"""How well does a Latency budget's cost model predict the timed latency of the plans it makes?

The seed net and the small ResNet of bench/accuracy.py (random weights, seed 0, eval, batch 64, --threads threads)
are planned for `Latency(r)` at a few ratios r with `method='local'` (one percentage for every channel group) and
`method='global'` (ranked per unit of modelled time saved; with `round_to=8`, in blocks that keep every group's
channels a multiple of 8), before any calibration: "modelled" is the cost model's
ratio for the plan (`Sparsifier.cost_ratio`: the per-layer table of `fasterai.latency`, each layer timed at full
and half widths and fitted as a + b*f_in + c*f_out + d*f_in*f_out), "timed" the median of 3 timings of the pruned
copy against the dense model (`Sparsifier.measure`). "kept" lists the channels each group keeps, in the order of the
Sparsifier's targets. The calibration (`Sparsifier.calibrate`) maps modelled to timed ratios by one curve per
budget; a plan whose layers the table mis-predicts more than others' is still chosen by the table.

Run: `.venv/bin/python bench/latency_model.py [--ratios 0.7 0.5 0.35] [--threads 1]
[--out bench/results/latency_model.md]`
"""
import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402


def main():
    warnings.filterwarnings('ignore')
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--ratios', type=float, nargs='+', default=[0.7, 0.5, 0.35])
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    from accuracy import SmallResNet
    from fasterai.budget import Latency
    from fasterai.examples import Net
    from fasterai.sparsifier import Sparsifier
    torch.set_num_threads(args.threads)
    x = torch.randn(64, 1, 28, 28)
    lines = ['| model | method | asked | modelled | timed | timed / modelled | kept per group |',
             '|---|---|---|---|---|---|---|']
    for name, make in (('seed_net', lambda: Net(in_channels=1)), ('small_resnet', SmallResNet)):
        for method, round_to in (('local', None), ('global', None), ('global', 8)):
            torch.manual_seed(0)
            sp = Sparsifier(make().eval(), 'filter', method, 'l1', (torch.nn.Conv2d, torch.nn.Linear),
                            example_input=x[:2], round_to=round_to)
            if round_to: method = f'{method}, round_to {round_to}'
            for r in args.ratios:
                budget = Latency(r, batch_size=64, threads=args.threads)
                sp.sparsify(budget)
                modelled = sp.cost_ratio(budget)
                timed = statistics.median(sp.measure(budget) for _ in range(3))
                kept = ' '.join(str(int(t.units - t.zero_units().sum())) for t in sp.targets)
                lines.append(f'| {name} | {method} | {r:g} | {modelled:.3f} | {timed:.3f} | {timed / modelled:.2f} | '
                             f'{kept} |')
                print(lines[-1], flush=True)
    if args.out: write_result(args.out, "A Latency budget's cost model against the timings", __doc__, lines,
                              f' (timed at {args.threads} thread{"s" * (args.threads > 1)})')


if __name__ == '__main__':
    main()
