"""Sparsify (30% 'filter' of Conv2d and Linear layers, one shot) and prune every torchvision classification model; check sparse == pruned.

Run: `.venv/bin/python bench/torchvision_sweep.py [--models resnet18 ...] [--out bench/results/torchvision.md]`
Each model is built with weights=None, in eval mode, at its usual input size (SIZES lists the exceptions).
"""
import argparse
import platform
import sys
import time
import traceback
import warnings
from datetime import date

import torch
import torch.nn as nn
import torchvision

from fasterai.pruner import Pruner
from fasterai.report import count_macs, count_params
from fasterai.sparsifier import Sparsifier

warnings.filterwarnings('ignore')

SIZES = {'inception_v3': 299, 'googlenet': 224}
"Input sizes other than 224 (the usual size of every other model)."


def input_shape(name, batch=2):
    return (batch, 3, SIZES.get(name, 224), SIZES.get(name, 224))


def run(name, method, sparsity=30, size=None):
    "One model: a dict of ok/error, ratios, max relative output difference, seconds."
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    shape = input_shape(name) if size is None else (2, 3, size, size)
    row = dict(model=name, method=method)
    try:
        t = time.perf_counter()
        sp = Sparsifier(model, 'filter', method, 'l1', layer_type=(nn.Conv2d, nn.Linear), example_input=shape)
        sp.sparsify(sparsity)
        row['sparsify_s'] = time.perf_counter() - t
        t = time.perf_counter()
        pruned = Pruner(example_input=shape, verify=False).prune_model(model)
        row['prune_s'] = time.perf_counter() - t
        x = torch.randn(shape)
        with torch.no_grad():
            a, b = model(x), pruned.eval()(x)
        row['rel_diff'] = ((a - b).abs().max() / a.abs().max()).item()
        row['params'] = count_params(pruned) / count_params(model)
        one = (1,) + shape[1:]
        row['macs'] = count_macs(pruned, one) / count_macs(model, one)
        frozen = [g for g in sp.graph.groups if g.frozen and g.by_role('out')]
        row['groups'] = f'{len(sp.targets)}/{len(sp.targets) + len(frozen)}'
        row['ok'] = row['rel_diff'] < 1e-4 and row['params'] < 1
        row['note'] = '' if row['params'] < 1 else 'nothing pruned: ' + (frozen[0].frozen[0] if frozen else '')
    except Exception as e:
        row['ok'], row['note'] = False, f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
        if '-v' in sys.argv: traceback.print_exc()
    return row


def fmt(row):
    f = lambda k, spec: format(row[k], spec) if k in row else ''
    return (f"| {row['model']} | {row['method']} | {'ok' if row['ok'] else 'FAIL'} | {f('params', '.3f')} | "
            f"{f('macs', '.3f')} | {f('rel_diff', '.1e')} | {row.get('groups', '')} | {f('sparsify_s', '.2f')} | "
            f"{f('prune_s', '.2f')} | {row.get('note', '')} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--models', nargs='*', default=None)
    ap.add_argument('--methods', nargs='*', default=['local', 'global'])
    ap.add_argument('--size', type=int, default=None, help='input size for every model (default: usual)')
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    lines = ['| model | method | result | params after/before | MACs after/before | max rel. diff | '
             'groups sparsified/with producers | sparsify s | prune s | note |', '|' + '---|' * 10]
    for name in names:
        for method in args.methods:
            row = run(name, method, size=args.size)
            lines.append(fmt(row)); print(lines[-1], flush=True)
    if args.out:
        head = (f'# torchvision classification models: 30% filter sparsity, one shot, then prune\n\n'
                f'Command: `{" ".join(["python"] + sys.argv)}`  \n'
                f'Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, '
                f'torchvision {torchvision.__version__}, {date.today()}\n\n')
        with open(args.out, 'w') as f: f.write(head + '\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
