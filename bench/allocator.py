"""Timing with glibc's malloc as the process left it, and inside `fasterai.latency.steady_allocator`.

Each row runs in a fresh process, at one thread. "page faults" counts the minor page faults of 20 eval-mode
forward passes of the small ResNet of bench/accuracy.py at batch 64, after 3 passes to warm up, and "ms per pass"
is their mean time. Then the same process times the small ResNet pruned to k, k, 2k, 2k, 4k, 4k channels per group
(random weights, seed 0; k from 4 to 16, the dense model at 16) against the dense model, twice over
(`Sparsifier.measure`: the median ratio of 7 interleaved timings); the columns give the ratio of a quarter (k = 4)
and of a half (k = 8) of the channels in the first and the second sweep. "default" replaces `steady_allocator` by
a context that changes nothing, so the timings run with glibc's own thresholds: it maps fresh pages for every block
above a threshold that grows with the blocks the process has freed, and trims the top of its heap past twice that.

Run: `.venv/bin/python bench/allocator.py [--out bench/results/allocator.md]`
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402


def child(mode):
    import contextlib
    import resource
    import time
    import warnings
    import torch
    warnings.filterwarnings('ignore')
    import fasterai.latency as latency
    if mode == 'default': latency.steady_allocator = contextlib.nullcontext
    from accuracy import SmallResNet
    from fasterai.budget import Latency
    from fasterai.sparsifier import Sparsifier, _Drops
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(64, 1, 28, 28)
    model = SmallResNet().eval()
    with torch.inference_mode(), latency.steady_allocator():
        for _ in range(3): model(x)
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        for _ in range(20): model(x)
        ms = (time.perf_counter() - start) / 20 * 1e3
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    sp = Sparsifier(model, 'filter', 'local', 'l1', (torch.nn.Conv2d, torch.nn.Linear), example_input=x[:2])
    budget, ratios = Latency(0.5, batch_size=64, threads=1), {}
    for sweep in (1, 2):
        for k in range(4, 17):
            drops = _Drops(torch.arange(t.units - w) for t, w in zip(sp.targets, [k, k, 2 * k, 2 * k, 4 * k, 4 * k]))
            sp._update_masks(drops)
            sp.counts = drops
            ratios[f'{sweep}-{k}'] = sp.measure(budget)
    print(json.dumps(dict(mode=mode, faults=faults, ms=ms, ratios=ratios)), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default=None)
    ap.add_argument('--child', default=None)
    args = ap.parse_args()
    if args.child: return child(args.child)
    lines = ['| allocator | process | page faults (20 passes) | ms per pass | quarter, sweep 1 | quarter, sweep 2 | '
             'half, sweep 1 | half, sweep 2 |', '|---|---|---|---|---|---|---|---|']
    for mode in ('default', 'steady_allocator'):
        for process in (1, 2):
            out = subprocess.run([sys.executable, __file__, '--child', 'default' if mode == 'default' else 'steady'],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            q = r['ratios']
            lines.append(f"| {mode} | {process} | {r['faults']:,} | {r['ms']:.1f} | {q['1-4']:.3f} | {q['2-4']:.3f} | "
                         f"{q['1-8']:.3f} | {q['2-8']:.3f} |")
            print(lines[-1], flush=True)
    if args.out: write_result(args.out, "Timing and glibc's malloc", __doc__, lines, ' (timed at 1 thread)')


if __name__ == '__main__':
    main()
