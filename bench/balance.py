"""How a 'global' budget plan weighs each channel group's cost: `fasterai.budget.BALANCE` at 0, 0.5 and 1.

A 'global' plan ranks each channel by its share of the L1 its group keeps (`fasterai.budget._shares`) times the
group's cost to the power BALANCE, over the cost the channel saves. At 0 the plan evens out the cost every group
keeps (a costly group thins most); at 1, with equal scores, every group keeps the same fraction of its channels,
whatever it costs, as 'uniform' does. The rows train as bench/budget.py's (--n-train images, --epochs epochs, the
budget reached at 2/3 of the fit, pruned, latency timed at one thread), in one process per model and seed, with
'uniform' (`method='local'`) beside them: the small ResNet of bench/accuracy.py at half its latency (the budget the
issue's "better than uniform" asks about) and the seed net at 0.3 of its parameters (where 'global' beats 'uniform').

Run: `.venv/bin/python bench/balance.py [--seeds 0 1] [--out bench/results/balance.md]`
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_child, write_result  # noqa: E402
import budget  # noqa: E402

BALANCES = ('0', '0.5', '1')
ROWS = {'small_resnet': 'Latency', 'seed_net': 'Params'}


def main():
    warnings.filterwarnings('ignore')
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n-train', type=int, default=10000)
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--seeds', type=int, nargs='*', default=[0, 1])
    ap.add_argument('--threads', type=int, default=1, help='threads of the latency timings (training runs on 2)')
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    rows = []
    for arch, bname in ROWS.items():
        runs = [(bname, 'uniform')] + [(bname, f'global, balance {b}') for b in BALANCES]
        for seed in args.seeds:
            rows += run_child(budget.__file__, 'fasterai', arch, args.n_train, args.epochs, seed, json.dumps(runs),
                              args.threads)
            print(budget.table(rows)[-1], flush=True)
    lines = budget.table(rows)
    for arch, bname in ROWS.items():   # mean over the seeds, points against 'uniform'
        mean = lambda m: sum(r['acc'] for r in rows if r['arch'] == arch and r['method'] == m) / len(args.seeds)
        lines += ['', f"{arch}, {bname}: mean over seeds {', '.join(map(str, args.seeds))}, points against 'uniform' "
                      f"({mean('uniform'):.2f}): " +
                  ', '.join(f"balance {b} {mean(f'global, balance {b}') - mean('uniform'):+.2f}" for b in BALANCES)]
    if args.out: write_result(args.out, "Balance of 'global' budget plans", __doc__, lines,
                              f', {args.n_train:,} training images, {args.epochs} epochs')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
