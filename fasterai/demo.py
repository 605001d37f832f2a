"""The seed notebook's flow on Fashion-MNIST: train with SparsifyCallback, prune, compare.

Run: `python -m fasterai.demo [--epochs 3] [--n-train 60000] [--n-valid 10000]`
"""
import argparse
import contextlib
import logging
import sys
import time
import warnings

warnings.filterwarnings('ignore', category=FutureWarning, module='torch')        # torch.jit notices on import
logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)           # "No CUDA runtime is found"


import torch
import fastai.callback.schedule  # noqa: F401 (adds Learner.fit_one_cycle)
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.metrics import accuracy

from fasterai.examples import Net, fashion_mnist_dls
from fasterai.pruner import Pruner
from fasterai.report import compare_models
from fasterai.sparsifier import SparsifyCallback, annealing_cos


class _Header(Callback):
    "Prints the names of fastai's epoch columns once, as its progress bar would."
    order = 60
    def before_fit(self): print('  '.join(self.recorder.metric_names))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--n-train', type=int, default=None, help='training images (default: all 60,000)')
    ap.add_argument('--n-valid', type=int, default=None, help='validation images (default: all 10,000)')
    ap.add_argument('--sparsity', type=float, default=30)
    args = ap.parse_args(argv)

    start = time.perf_counter()
    dls = fashion_mnist_dls(args.n_train, args.n_valid, bs=64)
    learn = Learner(dls, Net(in_channels=1), metrics=accuracy)
    cb = SparsifyCallback(sparsity=args.sparsity, granularity='filter', method='local', criteria='l1',
                          sched_func=annealing_cos)
    plain = not sys.stdout.isatty()   # a log file: fastai's epoch rows without progress bars
    if plain: learn.logger = lambda row: print('  '.join(f'{v:.6f}' if isinstance(v, float) else str(v) for v in row))
    with learn.no_bar() if plain else contextlib.nullcontext():
        learn.fit_one_cycle(args.epochs, 1e-3, cbs=[cb, _Header()] if plain else cb)
    pruned = Pruner().prune_model(learn.model)
    pruned_learn = Learner(dls, pruned, metrics=accuracy)
    with learn.no_bar() if plain else contextlib.nullcontext(), \
            pruned_learn.no_bar() if plain else contextlib.nullcontext():
        acc0, acc1 = learn.validate()[1], pruned_learn.validate()[1]
    print(f'\nThe sparse model has {100 * acc0:.2f} % accuracy')
    print(f'The pruned model has {100 * acc1:.2f} % accuracy\n')
    x = dls.valid.one_batch()[0]
    print(compare_models(learn.model, pruned, x[:1], latency_input=x,
                         extra=[('validation accuracy (%)', f'{100 * acc0:.2f}', f'{100 * acc1:.2f}', '')]))
    print(f'\n{len(dls.train_ds):,} training and {len(dls.valid_ds):,} validation images, {args.epochs} epochs, '
          f'{torch.get_num_threads()} threads, {time.perf_counter() - start:.0f} s in all')


if __name__ == '__main__':
    main()
