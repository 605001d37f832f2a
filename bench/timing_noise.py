"""How repeatable is a latency ratio on this machine? One pair of models timed again and again.

The seed net and the small ResNet of bench/accuracy.py (random weights, eval, batch 64, at each of --threads thread
counts), each pruned to half its filters in every channel group ('local', L1), are timed against their dense models
as a `Latency` budget
times them (`fasterai.latency.latency_ratio`: the median ratio of 7 interleaved runs of `torch.utils.benchmark`),
--repeats times in a row in each of --processes fresh processes. Nothing changes between the timings: the spread is
the machine's. A budget is met "within 3%" only as far as one timing of the same two models stays within 3% of
another; the columns give, per thread count, model and process, the smallest, median and largest ratio, and the
share of all the timings of that model and thread count within 3% of their median over every process. On this 2-core
machine a 2-thread timing shares its second core with whatever else runs (the tools, the OS), and its ratio moves
within a process as well as between processes; at one thread it stays within a few percent in a process, but can
settle a few percent apart in another (the small ResNet). bench/budget.py times at one thread: its calibration in the
fit and its final timing share a process.

Run: `.venv/bin/python bench/timing_noise.py [--repeats 15] [--processes 3] [--threads 1 2]
[--out bench/results/timing_noise.md]`
"""
import argparse
import json
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402


def child(repeats, threads):
    from accuracy import SmallResNet
    from fasterai.examples import Net
    from fasterai.latency import latency_ratio
    from fasterai.pruner import Pruner
    from fasterai.sparsifier import Sparsifier
    torch.set_num_threads(threads)
    x = torch.randn(64, 1, 28, 28)
    for name, make in (('seed_net', lambda: Net(in_channels=1)), ('small_resnet', SmallResNet)):
        torch.manual_seed(0)
        dense = make().eval()
        sparse = make().eval()
        sparse.load_state_dict(dense.state_dict())
        Sparsifier(sparse, 'filter', 'local', 'l1', (torch.nn.Conv2d, torch.nn.Linear), example_input=x[:2]).sparsify(50.)
        pruned = Pruner(example_input=x[:2]).prune_model(sparse).eval()
        ratios = [latency_ratio(pruned, dense, x, threads=threads) for _ in range(repeats)]
        print(json.dumps(dict(model=name, ratios=ratios)), flush=True)


def main():
    warnings.filterwarnings('ignore')
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--repeats', type=int, default=15)
    ap.add_argument('--processes', type=int, default=3)
    ap.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    ap.add_argument('--out', default=None)
    ap.add_argument('--child', action='store_true')
    args = ap.parse_args()
    if args.child: return child(args.repeats, args.threads[0])
    runs = {}
    for threads in args.threads:
        for p in range(args.processes):
            out = subprocess.run([sys.executable, __file__, '--child', '--repeats', str(args.repeats), '--threads',
                                  str(threads)], capture_output=True, text=True, cwd=Path(__file__).resolve().parent,
                                 check=True)
            for line in out.stdout.splitlines():
                if line.startswith('{'):
                    row = json.loads(line)
                    runs.setdefault((threads, row['model']), []).append(row['ratios'])
                    print(threads, row['model'], p, ' '.join(f'{r:.3f}' for r in row['ratios']), flush=True)
    lines = ['| threads | model | process | smallest | median | largest | timings within 3% of the median of all |',
             '|---|---|---|---|---|---|---|']
    for (threads, model), per in runs.items():
        every = [r for rs in per for r in rs]
        mid = statistics.median(every)
        for p, rs in enumerate(per):
            lines.append(f'| {threads} | {model} | {p + 1} | {min(rs):.3f} | {statistics.median(rs):.3f} | '
                         f'{max(rs):.3f} | |')
        inside = sum(abs(r - mid) <= 0.03 * mid for r in every)
        lines.append(f'| {threads} | {model} | all | {min(every):.3f} | {mid:.3f} | {max(every):.3f} | '
                     f'{inside} of {len(every)} |')
    print('\n'.join(lines))
    if args.out: write_result(args.out, 'Latency ratios timed again', __doc__, lines)


if __name__ == '__main__':
    main()
