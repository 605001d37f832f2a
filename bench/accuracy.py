"""Accuracy against compression on Fashion-MNIST: sparse and pruned accuracy, parameters, MACs and latency.

The seed net and a small ResNet, `fit_one_cycle(EPOCHS, 1e-3)` on the first --n-train images (batches of 64,
same data and seed), dense and with 'filter' sparsity 30/50/70% under the cosine, AGP and one-shot schedules
('local', L1), then pruned. The schedules are placed as fasterai 0.4.1 places its own: cosine over all of
training, AGP from 20% of training to the end, one-shot at half of training (`start_epoch`, `end_epoch`).
fasterai: `SparsifyCallback` then `Pruner()` (it removes exactly the zeroed filters, so pruned accuracy must
equal sparse accuracy). fasterai 0.4.1 (bench/.peer, `make bench-setup`): its `SparsifyCallback(sparsity/100,
'filter', 'local', large_final, schedule)` then its `Pruner(model, sparsity/100, 'local', large_final)`, which
re-chooses filters with Torch-Pruning. Latency: median ms of one batch of 64, eval, 2 threads. The plot
(accuracy_vs_macs.png) draws pruned accuracy against MACs.

The second table tests the half-MACs target on a longer budget (--target-n-train images, --target-epochs
epochs, all 10,000 test images for validation): the seed net dense, and at 30% of filters (about half the
MACs), the sparsity reached by two thirds of training so the last third fine-tunes the pruned shape.

Run: `.venv/bin/python bench/accuracy.py [--n-train 10000] [--epochs 2] [--target-n-train 30000] [--target-epochs 6]
[--out bench/results/accuracy.md]`
"""
import argparse
import contextlib
import io
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PEER_NAME, examples, run_child, write_result  # noqa: E402 (no fasterai import: the peer's process uses it too)

SPARSITIES, SCHEDULES = (30, 50, 70), ('cos', 'agp', 'one_shot')


class SmallResNet(nn.Module):
    "A ResNet for 28x28 images: a stem and three stages of one basic block each (16, 32, 64 channels)."
    def __init__(self, n_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stages = nn.ModuleList([Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2)])
        self.fc = nn.Linear(64, n_classes)

    def forward(self, x):
        x = self.stem(x)
        for s in self.stages: x = s(x)
        return self.fc(x.mean((2, 3)))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.down(x) + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


def measure(model, dls):
    from torch.utils.benchmark import Timer
    from torch.utils.flop_counter import FlopCounterMode
    model = model.eval()
    x = dls.valid.one_batch()[0]
    with torch.no_grad(), FlopCounterMode(display=False) as fc: model(x[:1])
    with torch.inference_mode():
        ms = Timer('m(x)', globals={'m': model, 'x': x}, num_threads=2).blocked_autorange(min_run_time=0.5).median * 1e3
    return dict(params=sum(p.numel() for p in model.parameters()), macs=fc.get_total_flops() // 2, ms=ms)


def child(impl, n_train, epochs):
    "Every configuration of `impl` in this process; one JSON line each."
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    import fastai.callback.schedule  # noqa: F401
    import fastai.callback.progress  # noqa: F401
    ex = examples()
    torch.set_num_threads(2)
    dls = ex.fashion_mnist_dls(n_train, 2000, bs=64)
    archs = {'seed_net': lambda: ex.Net(1), 'small_resnet': SmallResNet}
    configs = [(a, 0, 'dense') for a in archs] if impl == 'fasterai' else []
    configs += [(a, s, sch) for a in archs for s in SPARSITIES for sch in SCHEDULES]
    for arch, sparsity, sched in configs:
        torch.manual_seed(0)
        learn = Learner(dls, archs[arch](), metrics=accuracy)
        cbs = [] if sparsity == 0 else [callback(impl, sparsity, sched, epochs)]
        with contextlib.redirect_stdout(io.StringIO()), learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(epochs, 1e-3, cbs=cbs)
            sparse_acc = learn.validate()[1]
            if sparsity: learn.model = prune(impl, learn.model, sparsity, dls)
            pruned_acc = learn.validate()[1]
        row = dict(impl=impl, arch=arch, sparsity=sparsity, schedule=sched, sparse=100 * sparse_acc,
                   pruned=100 * pruned_acc, **measure(learn.model, dls))
        print(json.dumps(row), flush=True)


def callback(impl, sparsity, sched, epochs):
    if impl == 'fasterai':   # each schedule where 0.4.1 puts its own: AGP from 20% of training, one-shot at 50%
        from fasterai.sparsifier import SparsifyCallback
        place = {'agp': dict(start_epoch=0.2 * epochs), 'one_shot': dict(end_epoch=0.5 * epochs)}.get(sched, {})
        return SparsifyCallback(sparsity, 'filter', 'local', 'l1', sched, **place)
    from fasterai.sparse.all import SparsifyCallback, agp, cos, large_final, one_shot   # fasterai 0.4.1
    return SparsifyCallback(sparsity / 100, 'filter', 'local', large_final, {'cos': cos, 'agp': agp, 'one_shot': one_shot}[sched])


TARGET = [('dense', None, None), ('l1, cos', 'l1', 'cos'), ('l1, agp', 'l1', 'agp'), ('taylor, cos', 'taylor', 'cos')]


def target_child(n_train, epochs):
    """The half-MACs target: the seed net dense and at 30% of filters, sparse by 2/3 of training; one JSON line
    per configuration."""
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    import fastai.callback.schedule  # noqa: F401
    from fasterai.pruner import Pruner
    from fasterai.sparsifier import SparsifyCallback
    ex = examples()
    torch.set_num_threads(2)
    dls = ex.fashion_mnist_dls(n_train, 10000, bs=64)
    for name, criteria, sched in TARGET:
        torch.manual_seed(0)
        learn = Learner(dls, ex.Net(1), metrics=accuracy)
        cbs = [] if criteria is None else [SparsifyCallback(30, 'filter', 'local', criteria, sched,
                                                            end_epoch=2 * epochs / 3)]
        with contextlib.redirect_stdout(io.StringIO()), learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(epochs, 1e-3, cbs=cbs)
            sparse_acc = learn.validate()[1]
            learn.model = Pruner().prune_model(learn.model)
            pruned_acc = learn.validate()[1]
        print(json.dumps(dict(name=name, sparse=100 * sparse_acc, pruned=100 * pruned_acc,
                              **measure(learn.model, dls))), flush=True)


def prune(impl, model, sparsity, dls):
    if impl == 'fasterai':
        from fasterai.pruner import Pruner
        return Pruner().prune_model(model)
    from fasterai.prune.all import Pruner   # fasterai 0.4.1
    from fasterai.sparse.all import large_final
    Pruner(model, sparsity / 100, 'local', large_final, example_inputs=dls.valid.one_batch()[0][:1]).prune_model()
    return model


def plot(rows, dense, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, arch in zip(axes, ('seed_net', 'small_resnet')):
        d = dense[arch]
        ax.axhline(d['pruned'], color='gray', linestyle=':', label='dense')
        for impl, marker in (('fasterai', 'o'), ('peer', 'x')):
            for sched in SCHEDULES:
                pts = sorted((r['macs'] / d['macs'], r['pruned']) for r in rows
                             if r['impl'] == impl and r['arch'] == arch and r['schedule'] == sched and r['sparsity'])
                if pts: ax.plot(*zip(*pts), marker=marker, linestyle='-' if impl == 'fasterai' else '--',
                                label=f"{'fasterai' if impl == 'fasterai' else 'fasterai 0.4.1'}, {sched}")
        ax.set_title(arch); ax.set_xlabel('MACs, pruned / dense'); ax.set_ylabel('pruned accuracy (%)')
    axes[1].legend(fontsize=7)
    fig.tight_layout(); fig.savefig(path, dpi=110)


def main():
    warnings.filterwarnings('ignore')
    if sys.argv[1:2] == ['--child']:
        if sys.argv[2] == 'target': return target_child(int(sys.argv[3]), int(sys.argv[4]))
        return child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n-train', type=int, default=10000)
    ap.add_argument('--epochs', type=int, default=2)
    ap.add_argument('--target-n-train', type=int, default=30000)
    ap.add_argument('--target-epochs', type=int, default=6)
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    target = run_child(__file__, 'target', args.target_n_train, args.target_epochs) or []
    tlines = [f'Half the MACs: the seed net, {args.target_n_train:,} training images, {args.target_epochs} epochs, '
              f'30% of filters zeroed by epoch {2 * args.target_epochs / 3:g}, accuracy on the 10,000 test images.',
              '', '| run | sparse acc. | pruned acc. | pruned - dense | MACs ratio | params ratio |', '|' + '---|' * 6]
    for r in target:
        d = target[0]
        tlines.append(f"| {r['name']} | {r['sparse']:.2f} | {r['pruned']:.2f} | {r['pruned'] - d['pruned']:+.2f} | "
                      f"{r['macs'] / d['macs']:.3f} | {r['params'] / d['params']:.3f} |")
        print(tlines[-1], flush=True)
    rows = [r for impl in ('fasterai', PEER_NAME) for r in run_child(__file__, impl, args.n_train, args.epochs) or []]
    dense = {r['arch']: r for r in rows if r['sparsity'] == 0}
    lines = ['| model | sparsity | schedule | library | sparse acc. | pruned acc. | pruned - sparse | params ratio | '
             'MACs ratio | latency ratio (batch 64) |', '|' + '---|' * 10]
    for r in rows:
        d = dense[r['arch']]
        lib = 'fasterai' if r['impl'] == 'fasterai' else 'fasterai 0.4.1'
        lines.append(f"| {r['arch']} | {r['sparsity'] or 'dense'} | {r['schedule']} | {lib} | {r['sparse']:.2f} | "
                     f"{r['pruned']:.2f} | {r['pruned'] - r['sparse']:+.2f} | {r['params'] / d['params']:.3f} | "
                     f"{r['macs'] / d['macs']:.3f} | {r['ms'] / d['ms']:.3f} |")
        print(lines[-1], flush=True)
    if args.out:
        png = Path(args.out).with_name('accuracy_vs_macs.png')
        plot(rows, dense, png)
        write_result(args.out, 'Accuracy against compression', __doc__, lines + [''] + tlines,
                     f', {args.n_train:,} training images, {args.epochs} epochs', f'![accuracy against MACs]({png.name})\n\n')


if __name__ == '__main__':
    main()
