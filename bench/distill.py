"""Recovery with distillation: the half-MACs seed net, with and without KnowledgeDistillationCallback.

The setting of bench/accuracy.py's second table (the seed net, --n-train Fashion-MNIST images, --epochs epochs,
batches of 64, `fit_one_cycle(epochs, 1e-3)`, 30% of filters 'local' L1 on the cosine schedule, zeroed by two thirds
of training, accuracy on the 10,000 test images). First the dense net is trained; it is the teacher. Then, from
the same initial weights and data order, the student is sparsified without distillation, with soft targets
(`KnowledgeDistillationCallback(teacher)`: weight 0.5, T = 4) and with soft targets plus attention transfer at
conv2 and conv3. Each is pruned (`Pruner()`, exact), and its accuracy is compared with the dense teacher's.

Run: `.venv/bin/python bench/distill.py [--n-train 30000] [--epochs 6] [--seeds 0 1] [--out bench/results/distill.md]`
"""
import argparse
import contextlib
import copy
import io
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import examples, run_child, write_result  # noqa: E402

RUNS = [('no distillation', None), ('soft targets', {}), ('soft targets + attention transfer',
                                                          {'features': {'conv2': 'conv2', 'conv3': 'conv3'}})]


def child(n_train, epochs, seed):
    "Dense teacher, then each student run; one JSON line each."
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    import fastai.callback.schedule  # noqa: F401
    from fasterai.distill import KnowledgeDistillationCallback
    from fasterai.pruner import Pruner
    from fasterai.report import count_macs
    from fasterai.sparsifier import SparsifyCallback
    ex = examples()
    torch.set_num_threads(2)
    dls = ex.fashion_mnist_dls(n_train, 10000, bs=64)
    x = dls.valid.one_batch()[0][:2]
    quiet = lambda learn: (contextlib.redirect_stdout(io.StringIO()), learn.no_bar(), learn.no_logging())
    torch.manual_seed(seed)
    init = ex.Net(1)
    teacher = Learner(dls, copy.deepcopy(init), metrics=accuracy)
    a, b, c = quiet(teacher)
    with a, b, c: teacher.fit_one_cycle(epochs, 1e-3); dense = 100 * teacher.validate()[1]
    print(json.dumps(dict(name='dense (the teacher)', seed=seed, sparse=dense, pruned=dense, macs=1.0)), flush=True)
    for name, kd in RUNS:
        torch.manual_seed(seed)
        learn = Learner(dls, copy.deepcopy(init), metrics=accuracy)
        cbs = [SparsifyCallback(30, 'filter', 'local', 'l1', 'cos', end_epoch=2 * epochs / 3)]
        if kd is not None: cbs.append(KnowledgeDistillationCallback(teacher.model, **kd))
        a, b, c = quiet(learn)
        with a, b, c:
            learn.fit_one_cycle(epochs, 1e-3, cbs=cbs)
            sparse = 100 * learn.validate()[1]
            learn.model = Pruner(example_input=x).prune_model(learn.model)
            pruned = 100 * learn.validate()[1]
        macs = count_macs(learn.model, x) / count_macs(teacher.model, x)
        print(json.dumps(dict(name=name, seed=seed, sparse=sparse, pruned=pruned, dense=dense, macs=macs)), flush=True)


def main():
    warnings.filterwarnings('ignore')
    if sys.argv[1:2] == ['--child']: return child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n-train', type=int, default=30000)
    ap.add_argument('--epochs', type=int, default=6)
    ap.add_argument('--seeds', type=int, nargs='*', default=[0])
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    lines = ['| run | seed | sparse acc. | pruned acc. | pruned - dense | MACs ratio |', '|' + '---|' * 6]
    for seed in args.seeds:
        rows = run_child(__file__, str(args.n_train), args.epochs, seed) or []
        dense = rows[0]['pruned'] if rows else float('nan')
        for r in rows:
            lines.append(f"| {r['name']} | {seed} | {r['sparse']:.2f} | {r['pruned']:.2f} | {r['pruned'] - dense:+.2f} | "
                         f"{r['macs']:.3f} |")
            print(lines[-1], flush=True)
    if args.out:
        write_result(args.out, 'Recovery with distillation at half the MACs', __doc__, lines,
                     f', {args.n_train:,} training images, {args.epochs} epochs')


if __name__ == '__main__':
    main()
