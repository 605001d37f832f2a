"""Shrink while training: SparsifyCallback(prune_every=1) against sparsify-then-prune, fit time and accuracy.

The demo task (the seed net on Fashion-MNIST, `fit_one_cycle(EPOCHS, 1e-3)`, batches of 64, all 10,000 test images
for validation), 'filter' sparsity under the cosine schedule ('local', L1), for each sparsity and seed:
*sparsify, then prune*: `SparsifyCallback(s)` for the whole fit, then `Pruner().prune_model`; *prune every epoch*:
`SparsifyCallback(s, prune_every=1)`, which removes the filters zeroed so far at each epoch end (`learn.prune()`,
the optimizer state carried), so later epochs run on the smaller network. Time: wall-clock seconds of the fit
(the final pruning included, validation included), 2 threads, the two runs of a seed one after the other in one
process. Accuracy: of the final pruned model. After a pruning a filter's L1 norm no longer counts the weights that
read removed channels (they are gone), so the two runs can choose different filters later on: same budget, not
the same trajectory.

Run: `.venv/bin/python bench/prune_every.py [--n-train 60000] [--epochs 3] [--sparsities 50 70] [--seeds 0 1 2]
[--out bench/results/prune_every.md]`
"""
import argparse
import contextlib
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402


def one(dls, sparsity, seed, epochs, every):
    "(fit seconds, pruned accuracy %, parameters) of one run."
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed
    import fastai.callback.schedule  # noqa: F401
    from fasterai.examples import Net
    from fasterai.pruner import Pruner
    from fasterai.sparsifier import SparsifyCallback
    set_seed(seed)
    learn = Learner(dls, Net(1), metrics=accuracy)
    cb = SparsifyCallback(sparsity, 'filter', 'local', 'l1', 'cos', prune_every=every)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, 1e-3, cbs=cb)
        if every is None: learn.model = Pruner(example_input=dls.valid.one_batch()[0][:8]).prune_model(learn.model)
    seconds = time.perf_counter() - start
    with contextlib.redirect_stdout(io.StringIO()), learn.no_bar(), learn.no_logging():
        acc = learn.validate()[1]
    return seconds, 100 * acc, sum(p.numel() for p in learn.model.parameters())


def main():
    warnings.filterwarnings('ignore')
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n-train', type=int, default=None, help='training images (default: all 60,000)')
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--sparsities', type=float, nargs='+', default=[50, 70])
    ap.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    from fasterai.examples import fashion_mnist_dls
    torch.set_num_threads(2)
    dls = fashion_mnist_dls(args.n_train, None, bs=64)
    lines = ['| sparsity | seed | sparsify, then prune: fit s | prune every epoch: fit s | time ratio | '
             'accuracy: then prune | accuracy: every epoch | difference | params (both) |', '|' + '---|' * 9]
    summary = {}
    for s in args.sparsities:
        for seed in args.seeds:
            (t0, a0, p0), (t1, a1, p1) = (one(dls, s, seed, args.epochs, every) for every in (None, 1))
            summary.setdefault(s, []).append((t1 / t0, a1 - a0))
            both = f'{p0:,}' if p0 == p1 else f'{p0:,} / {p1:,}'
            lines.append(f'| {s:g} | {seed} | {t0:.1f} | {t1:.1f} | {t1 / t0:.3f} | {a0:.2f} | {a1:.2f} | '
                         f'{a1 - a0:+.2f} | {both} |')
            print(lines[-1], flush=True)
    lines += ['', '| sparsity | median time ratio | worst time ratio | accuracy difference, range |', '|' + '---|' * 4]
    for s, rs in summary.items():
        ratios, diffs = [r for r, _ in rs], [d for _, d in rs]
        lines.append(f'| {s:g} | {statistics.median(ratios):.3f} | {max(ratios):.3f} | '
                     f'{min(diffs):+.2f} to {max(diffs):+.2f} |')
        print(lines[-1], flush=True)
    if args.out:
        write_result(args.out, 'Shrink while training (prune_every)', __doc__, lines,
                     f', {len(dls.train_ds):,} training images, {args.epochs} epochs')


if __name__ == '__main__':
    main()
