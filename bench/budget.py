"""Compress to a budget: half the MACs, half the latency, 30% of the parameters, with uniform or chosen ratios.

On Fashion-MNIST (--n-train training images, --epochs epochs, batches of 64, `fit_one_cycle(epochs, 1e-3)`,
accuracy on the 10,000 test images), the seed net, the small ResNet of bench/accuracy.py and torchvision's resnet18
(`weights=None`, 10 classes; the images upsampled to 32x32 and repeated to 3 channels by a first module of the model,
`RGB32`) are trained dense; then, from the same initial weights and data order, each is sparsified to each budget while it trains (the schedule ramps
the budget from the dense cost, cosine, reached at 2/3 of training) and pruned (`Pruner()`, exact). The rows:
- **uniform**: `SparsifyCallback(target=B, method='local')`: one L1 percentage for every channel group, the lowest
  that meets B;
- **uniform, round_to auto**: the same with `round_to='auto'`: plans with every group's kept channels a multiple of
  8 timed too, the rounded one pruned where it pays (within 1.5% of B and more MACs kept, or closer);
- **global**: `method='global'`: the channels least important per unit of B's cost saved (a channel's share of the L1
  its group keeps, times the square root of the group's cost: `fasterai.budget._shares`, `BALANCE`);
- **global, round_to auto**: the same with `round_to='auto'`: plans ranked in blocks that keep every group's
  channels a multiple of 8 (16, 32) timed too, the rounded one pruned where it pays;
- **global, Taylor**: the same with `criteria='taylor'` (first-order loss change, accumulated over the steps);
- **sensitivity**: `sensitivity()` of the trained dense net (4 validation batches, 25/50/75% of each group), its
  `.sparsities(B)` as the per-layer dict of `SparsifyCallback(method='local')`;
- **global + KD**: 'global' with `KnowledgeDistillationCallback(dense teacher)` (soft targets, weight 0.5, T = 4).

resnet18 runs the first seed only, and every row but the 'round_to auto' ones, 'global, Taylor' and 'global + KD' (its fits
take the longest).

Each pruned model is measured: MACs and parameters counted; latency timed at batch 64 on --threads threads (the
Latency budget's own threads too; training runs on 2), as the median ratio to the dense model of 7 interleaved
timings in one process. One thread by default: on this 2-core machine a 2-thread timing shares its second core with
whatever else runs, and the same pair of models (the small ResNet at half its filters) reads from 0.466 to 0.542 at
2 threads within and across processes, against 0.421 to 0.465 at one, within 4% of the median in each process
(bench/results/timing_noise.md). "Reached" is the ratio of the budget's own cost.
"Latency timed in the fit" is what the callback's last calibration timed for the plan it pruned (at 2/3 of the fit,
against the model of that moment, its masked channels given the values they were dropped with): the two differ by
the timing noise of this machine, and by what the last third of the fit changes. "Dead channels kept": channels of
the pruned model whose weights are below 1e-3 of their layer's largest (see `dead_kept`).
The recovery table runs the seed net at half the latency on the longer budget (--long-n-train, --long-epochs), with
and without distillation; its row 'uniform + KD of fasterai 0.4.1' trains as 'uniform + KD' with fasterai 0.4.1's
`KnowledgeDistillationCallback` (its `SoftTarget` loss at T = 4, weight 0.5) in place of ours. fasterai 0.4.1 has no
budgets, and the `to_layer_targets` the issue names is not in its 0.4.1 wheel, so no other row of it runs. Its row
'uniform + KD, from the dense weights' starts from the trained dense net instead of its initial weights (the usual
fine-tuning workflow: the same fit, after the dense training the teacher needs anyway).

Every row is also kept in the --out file with .jsonl as it comes; --resume reuses the rows kept there (each child
process's rows: a model and seed, or the recovery table) and runs only the rest.

Run: `.venv/bin/python bench/budget.py [--n-train 10000] [--epochs 3] [--seeds 0] [--long-n-train 30000]
[--long-epochs 6] [--threads 1] [--out bench/results/budget.md] [--resume]`
"""
import argparse
import contextlib
import copy
import functools
import io
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import examples, run_child, write_result  # noqa: E402

AUTO = 'uniform, round_to auto'
GLOBAL_AUTO = 'global, round_to auto'
TAYLOR = 'global, Taylor'
BUDGETS = [('MACs', 'uniform'), ('MACs', 'global'), ('Latency', 'uniform'), ('Latency', AUTO), ('Latency', 'global'),
           ('Latency', GLOBAL_AUTO), ('Latency', TAYLOR), ('Latency', 'sensitivity'), ('Latency', 'global + KD'),
           ('Params', 'uniform'), ('Params', 'global')]
BIG = [r for r in BUDGETS if r[1] not in (AUTO, GLOBAL_AUTO, TAYLOR, 'global + KD')]   # resnet18's rows (its fits
# take longest)
RATIO = {'MACs': 0.5, 'Latency': 0.5, 'Params': 0.3}
PEER_KD = 'uniform + KD of fasterai 0.4.1'
FROM_DENSE = 'uniform + KD, from the dense weights'
LONG = [('Latency', 'global'), ('Latency', 'global + KD'), ('Latency', 'uniform'), ('Latency', 'uniform + KD'),
        ('Latency', PEER_KD), ('Latency', AUTO), ('Latency', FROM_DENSE)]


class RGB32(torch.nn.Module):
    "Fashion-MNIST's 28x28 grey images as 32x32 RGB: bilinear upsampling, the grey channel repeated."
    def forward(self, x):
        return torch.nn.functional.interpolate(x, size=32, mode='bilinear', align_corners=False).expand(-1, 3, -1, -1)


def resnet18():
    "torchvision's resnet18 (10 classes, weights=None) on the images made 32x32 RGB (`RGB32`, part of the model)."
    import torchvision
    return torch.nn.Sequential(RGB32(), torchvision.models.resnet18(weights=None, num_classes=10))


def budget_of(name, threads):
    from fasterai.budget import Latency, MACs, Params
    return {'MACs': MACs(0.5), 'Latency': Latency(0.5, batch_size=64, threads=threads), 'Params': Params(0.3)}[name]


def peer_kd():
    """fasterai 0.4.1's KnowledgeDistillationCallback and SoftTarget loss, imported from bench/.peer as package
    `fasterai_peer` (this process's `fasterai` is ours: the sparsifying, pruning and timing stay the same)."""
    import importlib.util
    from common import PEER
    if not (PEER / 'fasterai').is_dir(): raise SystemExit(f'{PEER} holds no fasterai 0.4.1: make bench-setup installs it')
    if 'fasterai_peer' not in sys.modules:
        spec = importlib.util.spec_from_file_location('fasterai_peer', PEER / 'fasterai' / '__init__.py',
                                                      submodule_search_locations=[str(PEER / 'fasterai')])
        sys.modules['fasterai_peer'] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    from fasterai_peer.distill.distillation_callback import KnowledgeDistillationCallback
    from fasterai_peer.distill.losses import SoftTarget
    return KnowledgeDistillationCallback, SoftTarget


def child(arch, n_train, epochs, seed, runs, threads):
    "The dense net, then each (budget, method) of `runs`; one JSON line each."
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    import fastai.callback.schedule  # noqa: F401
    from accuracy import SmallResNet
    import fasterai.budget as budgets
    from fasterai.distill import KnowledgeDistillationCallback
    from fasterai.latency import latency_ratio
    from fasterai.pruner import Pruner
    from fasterai.report import count_macs, count_params
    from fasterai.sensitivity import sensitivity
    from fasterai.sparsifier import SparsifyCallback
    ex = examples()
    torch.set_num_threads(2)
    dls = ex.fashion_mnist_dls(n_train, 10000, bs=64)
    xb = dls.valid.one_batch()[0]
    make = {'seed_net': lambda: ex.Net(1), 'small_resnet': SmallResNet, 'resnet18': resnet18}[arch]
    quiet = lambda learn: (contextlib.redirect_stdout(io.StringIO()), learn.no_bar(), learn.no_logging())
    torch.manual_seed(seed)
    init = make()
    teacher = Learner(dls, copy.deepcopy(init), metrics=accuracy)
    a, b, c = quiet(teacher)
    with a, b, c: teacher.fit_one_cycle(epochs, 1e-3); dense = 100 * teacher.validate()[1]
    teacher.model.eval()
    print(json.dumps(dict(arch=arch, seed=seed, budget='dense', method='', acc=dense, sparse=dense, macs=1., params=1.,
                          latency=1., reached=1., threads=threads)), flush=True)
    sens, default_balance = None, budgets.BALANCE
    for bname, method in runs:
        budget = budget_of(bname, threads)
        torch.manual_seed(seed)
        student = copy.deepcopy(teacher.model if method == FROM_DENSE else init).requires_grad_(True)
        learn = Learner(dls, student, metrics=accuracy)   # (the KD callback froze the teacher's parameters)
        layers = (torch.nn.Conv2d, torch.nn.Linear)
        if method == 'sensitivity':
            if sens is None: sens = sensitivity(teacher, ratios=(0.25, 0.5, 0.75), n_batches=4, layer_type=layers)
            cb = SparsifyCallback(sens.sparsities(budget), 'filter', 'local', 'l1', 'cos', layer_type=layers,
                                  end_epoch=2 * epochs / 3)
        else:
            balanced = re.fullmatch(r'global, balance ([0-9.]+)', method)   # bench/balance.py's rows
            budgets.BALANCE = float(balanced[1]) if balanced else default_balance
            cb = SparsifyCallback(target=budget, method='local' if method.startswith('uniform') else 'global',
                                  criteria='taylor' if method == TAYLOR else 'l1', layer_type=layers,
                                  end_epoch=2 * epochs / 3, round_to='auto' if method in (AUTO, GLOBAL_AUTO) else None)
        cbs = [cb] + ([KnowledgeDistillationCallback(teacher.model)] if 'KD' in method and method != PEER_KD else [])
        if method == PEER_KD:   # the peer's callback, its soft-target loss at our temperature and weight
            PeerKD, PeerSoftTarget = peer_kd()
            cbs.append(PeerKD(teacher.model, loss=functools.partial(PeerSoftTarget, T=4.), weight=0.5))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(epochs, 1e-3, cbs=cbs)
            sparse = 100 * learn.validate()[1]
            pruned = Pruner(example_input=xb[:2]).prune_model(learn.model)
            learn.model = pruned
            acc = 100 * learn.validate()[1]
        d, p = teacher.model.eval(), pruned.eval()
        row = dict(arch=arch, seed=seed, budget=repr(budget), method=method, acc=acc, sparse=sparse,
                   macs=count_macs(p, xb[:1]) / count_macs(d, xb[:1]), params=count_params(p) / count_params(d),
                   latency=latency_ratio(p, d, xb[:64], threads=threads), threads=threads)
        row['reached'] = {'MACs': row['macs'], 'Params': row['params'], 'Latency': row['latency']}[bname]
        row['dead'] = dead_kept(p)
        fit = re.findall(r'the closest at ([0-9.]+) of the dense model', printed.getvalue())
        if fit: row['fit'] = float(fit[-1])   # the callback's last calibration: the plan pruned, timed in the fit
        row['asked'] = budget.ratio
        print(json.dumps(row), flush=True)


def plot(rows, path, threads):
    """Pruned accuracy against the latency timed after the fit, a panel per model: a colour per method, a marker per
    budget (filled: seed 0, hollow: other seeds), the dense net as a black star."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    archs = sorted({r['arch'] for r in rows})
    methods = list(dict.fromkeys(r['method'] for r in rows if r['budget'] != 'dense'))
    colour = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    marker = {'MACs': 'o', 'Latency': 's', 'Params': '^'}
    fig, axes = plt.subplots(1, len(archs), figsize=(5 * len(archs) + 2.5, 4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for r in (r for r in rows if r['arch'] == arch):
            first = r['seed'] == min(q['seed'] for q in rows)
            if r['budget'] == 'dense':
                ax.scatter(r['latency'], r['acc'], marker='*', s=90, c='k' if first else 'none', edgecolors='k')
                continue
            c = colour[r['method']]
            ax.scatter(r['latency'], r['acc'], marker=marker[r['budget'].split('(')[0]], s=32,
                       c=[c] if first else 'none', edgecolors=[c])
        ax.set_title(arch); ax.grid(alpha=0.3)
        ax.set_xlabel(f'latency, pruned / dense (batch 64, {threads} thread{"s" * (threads > 1)}, timed)')
        ax.set_ylabel('pruned accuracy (%)')
    handles = [Line2D([], [], ls='', marker='s', color=colour[m], label=m) for m in methods]
    handles += [Line2D([], [], ls='', marker=mk, color='grey', label=f'{b} budget') for b, mk in marker.items()]
    handles += [Line2D([], [], ls='', marker='*', color='k', markersize=10, label='dense'),
                Line2D([], [], ls='', marker='o', color='grey', label='seed 0 (filled)'),
                Line2D([], [], ls='', marker='o', mfc='none', color='grey', label='seed 1 (hollow)')]
    fig.legend(handles=handles, loc='center right', fontsize=7)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / fig.get_figwidth(), 1)); fig.savefig(path, dpi=110)


def dead_kept(model):
    """Channels the pruned `model` kept that compute nothing: output rows of its convs and linear layers below 1e-3 of
    the layer's largest (a channel the masks dropped, then gave back as zeros: only the optimizer's momentum moves it)."""
    n = 0
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            r = m.weight.detach().flatten(1).abs().sum(1)
            n += int((r < 1e-3 * r.max()).sum())
    return n


def table(rows):
    lines = ['| model | seed | budget | method | pruned acc. | - dense | reached (asked) | MACs ratio | params ratio | '
             'latency ratio | latency timed in the fit | dead channels kept |', '|' + '---|' * 12]
    dense = {(r['arch'], r['seed']): r['acc'] for r in rows if r['budget'] == 'dense'}
    for r in rows:
        asked = f" ({r['asked']:g})" if 'asked' in r else ''
        lines.append(f"| {r['arch']} | {r['seed']} | {r['budget']} | {r['method']} | {r['acc']:.2f} | "
                     f"{r['acc'] - dense[(r['arch'], r['seed'])]:+.2f} | {r['reached']:.3f}{asked} | {r['macs']:.3f} | "
                     f"{r['params']:.3f} | {r['latency']:.3f} | {format(r['fit'], '.3f') if 'fit' in r else ''} | "
                     f"{r.get('dead', '')} |")
    return lines


def main():
    warnings.filterwarnings('ignore')
    if sys.argv[1:2] == ['--child']:
        arch, n, e, seed, runs = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), json.loads(sys.argv[7])
        return child(arch, n, e, seed, [tuple(r) for r in runs], int(sys.argv[8]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n-train', type=int, default=10000)
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--seeds', type=int, nargs='*', default=[0])
    ap.add_argument('--long-n-train', type=int, default=30000)
    ap.add_argument('--long-epochs', type=int, default=6)
    ap.add_argument('--archs', nargs='*', default=['seed_net', 'small_resnet', 'resnet18'])
    ap.add_argument('--threads', type=int, default=1, help='threads of the latency timings (training runs on 2)')
    ap.add_argument('--out', default=None)
    ap.add_argument('--resume', action='store_true', help='reuse the rows of an earlier run kept in --out with .jsonl')
    args = ap.parse_args()
    kept = Path(args.out).with_suffix('.jsonl') if args.out else None   # every row as it comes (a crash loses none)
    old = [json.loads(l) for l in kept.read_text().splitlines()] if args.resume and kept and kept.exists() else []
    if kept and not args.resume: kept.write_text('')
    code = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip() or 'unknown'
    code += '+changes' if subprocess.run(['git', 'diff', '--quiet', 'HEAD', '--', '../fasterai', '.', ':!results'],
                                         cwd=Path(__file__).parent).returncode else ''
    def runs_of(part, *child):
        got = [r for r in old if r.get('part') == part and r.get('threads', 2) == args.threads]
        if got: return got
        got = [dict(r, part=part, code=code) for r in run_child(__file__, 'fasterai', *child)]
        if kept:
            with kept.open('a') as f: f.writelines(json.dumps(r) + '\n' for r in got)
        return got
    rows = []
    for seed in args.seeds:
        for arch in args.archs:
            if arch == 'resnet18' and seed != args.seeds[0]: continue   # its fits take the longest: one seed
            runs = BIG if arch == 'resnet18' else BUDGETS
            for r in runs_of(f'{arch} {seed}', arch, args.n_train, args.epochs, seed, json.dumps(runs), args.threads):
                rows.append(r)
                print(table([r for r in rows if r['arch'] == arch and r['seed'] == seed])[-1], flush=True)
    long = []
    if args.long_epochs:
        long = runs_of('long', 'seed_net', args.long_n_train, args.long_epochs, 0, json.dumps(LONG), args.threads)
        for line in table(long)[2:]: print(line, flush=True)
    if args.out:
        png = Path(args.out).with_name('budget_pareto.png')
        plot(rows, png, args.threads)
        lines = table(rows) + ['', f'Recovery: the seed net at half the latency, {args.long_n_train:,} training images, '
                                   f'{args.long_epochs} epochs, seed 0.', ''] + (table(long) if long else [])
        parts = {}
        for r in rows + long: parts.setdefault(r.get('code', 'an earlier commit'), {}).setdefault(r['part'], None)
        made = '; '.join(f"{', '.join(ps)} at {c}" for c, ps in parts.items())
        lines += ['', f'The code that made the rows (--resume keeps earlier ones): {made}.']
        write_result(args.out, 'Compress to a budget', __doc__, lines,
                     f', {args.n_train:,} training images, {args.epochs} epochs',
                     f'![accuracy against measured latency]({png.name})\n\n')


if __name__ == '__main__':
    main()
