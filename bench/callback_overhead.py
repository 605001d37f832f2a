"""Training overhead of SparsifyCallback: fastai epochs with and without it, and the time spent in its events.

The seed net on Fashion-MNIST (the first --n-train images), batches of 64, `fit_one_cycle(1, 1e-3)` per
run, the same data and seed; each run alternates a dense fit and a fit with the callback ('filter', 'local',
L1, cosine to 30%), repeated, medians reported. The callback's event methods are wrapped with timers, so
the table also gives the time spent inside them: the first batch's setup (tracing the model, the first
scores), once per fit, apart from the time per epoch (every other event, the whole schedule from 0 to 30%
falling within the one epoch: the most re-scoring an epoch can see). fasterai 0.4.1's SparsifyCallback with its closest settings
(sparsity=0.3, 'filter', 'local', large_final, cos) runs the same way in its own process, importing that
version from bench/.peer (`make bench-setup`).

Run: `.venv/bin/python bench/callback_overhead.py [--n-train 12000] [--repeats 3] [--out bench/results/callback_overhead.md]`
"""
import argparse
import contextlib
import io
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PEER_NAME, examples, run_child, write_result  # noqa: E402

EVENTS = ('before_fit', 'before_epoch', 'before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_backward',
          'before_step', 'after_step', 'after_batch', 'after_epoch', 'after_fit')


def make_callback(impl):
    if impl == 'fasterai':
        from fasterai.sparsifier import SparsifyCallback, annealing_cos
        return SparsifyCallback(sparsity=30, granularity='filter', method='local', criteria='l1', sched_func=annealing_cos)
    from fasterai.sparse.all import SparsifyCallback, cos, large_final   # fasterai 0.4.1
    return SparsifyCallback(sparsity=0.3, granularity='filter', context='local', criteria=large_final, schedule=cos)


def timed_events(cb):
    """Wrap the callback's event methods; returns the dict their seconds accumulate in. The first
    before_batch (where a callback builds its state: the trace, the first scores) counts as 'setup'."""
    spent = {}
    for ev in EVENTS:
        f = getattr(type(cb), ev, None)
        if f is None: continue
        def wrapper(f=f, ev=ev):
            t = time.perf_counter()
            try: return f(cb)
            finally:
                key = 'setup' if ev == 'before_batch' and 'setup' not in spent else ev
                spent[key] = spent.get(key, 0.) + time.perf_counter() - t
        setattr(cb, ev, wrapper)
    return spent


def child(impl, n_train, repeats):
    "In this process: alternate dense and sparse fits; print the seconds of each as JSON."
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    import fastai.callback.schedule  # noqa: F401
    import fastai.callback.progress  # noqa: F401
    ex = examples()
    torch.set_num_threads(2)
    dls = ex.fashion_mnist_dls(n_train, 1000, bs=64)
    out = {'dense': [], 'sparse': [], 'inside': [], 'events': {}}
    for r in range(repeats + 1):   # the first round warms up
        for kind in ('dense', 'sparse'):
            torch.manual_seed(0)
            learn = Learner(dls, ex.Net(1), metrics=accuracy)
            cbs, spent = [], {}
            if kind == 'sparse':
                cb = make_callback(impl)
                spent, cbs = timed_events(cb), [cb]
            with contextlib.redirect_stdout(io.StringIO()), learn.no_bar(), learn.no_logging():
                t = time.perf_counter()
                learn.fit_one_cycle(1, 1e-3, cbs=cbs)
                s = time.perf_counter() - t
            if r == 0: continue
            out[kind].append(s)
            if kind == 'sparse':
                out['inside'].append(sum(v for k, v in spent.items() if k != 'setup'))
                for k, v in spent.items(): out['events'].setdefault(k, []).append(v)
    print(json.dumps(out))


def main():
    warnings.filterwarnings('ignore')
    if sys.argv[1:2] == ['--child']: return child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n-train', type=int, default=12000)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    med = statistics.median
    lines = ['| callback | dense epoch s | epoch with callback s | overhead | setup once per fit s | '
             'time inside the callback per epoch s | inside / dense epoch | slowest events (s per epoch) |',
             '|' + '---|' * 8]
    for impl in ('fasterai', PEER_NAME):
        r = run_child(__file__, impl, args.n_train, args.repeats)
        if r is None:
            lines.append(f'| {impl} | not installed: run `make bench-setup` |  |  |  |  |  |'); continue
        r = r[-1]
        d, s, i = med(r['dense']), med(r['sparse']), med(r['inside'])
        setup = med(r['events'].pop('setup', [0.]))
        slow = sorted(((med(v), k) for k, v in r['events'].items()), reverse=True)[:3]
        lines.append(f'| {impl} | {d:.2f} | {s:.2f} | {100 * (s - d) / d:+.1f}% | {setup:.3f} | {i:.3f} | '
                     f'{100 * i / d:.2f}% | ' + ', '.join(f'{k} {v:.3f}' for v, k in slow) + ' |')
        print(lines[-1], flush=True)
    if args.out:
        write_result(args.out, 'Training overhead of SparsifyCallback', __doc__, lines,
                     f', {args.n_train:,} images per epoch')


if __name__ == '__main__':
    main()
