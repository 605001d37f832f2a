"""Real CPU latency of pruned models against their MACs: does removing x% of the work remove x% of the time?

For each model: dense, and 30% and 50% of filters pruned in one shot (L1, local), plus 50% with the kept
channels of each group rounded to a multiple of 8 (`round_to=8`). Parameters, MACs (torch.utils.flop_counter)
and median latency (torch.utils.benchmark, eval, inference_mode, 2 threads) at batch 1 and 64, eager in
contiguous and channels_last memory format, and with torch.compile (inductor) at batch 1 (dense and 50%). The "fit" column is
latency ratio / MACs ratio: 1.0 means the time fell exactly as the work did; the target is at most 1.1.

Run: `.venv/bin/python bench/latency.py [--models ...] [--out bench/results/latency.md]`
"""
import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from torchvision_sweep import build  # noqa: E402

from fasterai.examples import Net  # noqa: E402
from fasterai.pruner import Pruner  # noqa: E402
from fasterai.report import count_macs, count_params  # noqa: E402

MODELS = {'seed_net': (1, 28), 'resnet50': (3, 224), 'mobilenet_v2': (3, 224), 'efficientnet_b0': (3, 224)}
VARIANTS = [('dense', None, None), ('30%', 30, None), ('50%', 50, None), ('50%, round_to=8', 50, 8)]
COMPILED = ('dense', '50%')
"The variants also timed under torch.compile (each compile takes tens of seconds on 2 cores)."



def model_of(name, size):
    if name == 'seed_net':
        torch.manual_seed(0)
        return Net(1).eval()
    return build(name, (1, 3, size, size))


def latency(model, x, channels_last=False, compiled=False, min_run_time=1.0):
    "Median milliseconds of one forward pass."
    if channels_last: model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    if compiled: model = torch.compile(model)
    with torch.inference_mode():
        for _ in range(2): model(x)   # warm-up (and compile)
        t = Timer('model(x)', globals={'model': model, 'x': x}, num_threads=torch.get_num_threads())
        return t.blocked_autorange(min_run_time=min_run_time).median * 1e3


def rows_for(name, channels, size):
    dense = model_of(name, size)
    shape1 = (1, channels, size, size)
    base = None
    for label, sparsity, round_to in VARIANTS:
        m = dense if sparsity is None else Pruner(sparsity=sparsity, round_to=round_to, example_input=shape1,
                                                  layer_type=(nn.Conv2d, nn.Linear)).prune_model(dense)
        m = m.eval()
        r = dict(model=name, variant=label, params=count_params(m), macs=count_macs(m, shape1))
        for batch in (1, 64):
            x = torch.randn(batch, channels, size, size)
            r[f'b{batch}'] = latency(m, x)
            r[f'b{batch}_cl'] = latency(m, x, channels_last=True)
        if label in COMPILED: r['b1_compiled'] = latency(m, torch.randn(shape1), compiled=True)
        if base is None: base = r
        yield r, base


def fmt(r, base):
    macs = r['macs'] / base['macs']
    cells = [r['model'], r['variant'], f"{r['params'] / base['params']:.3f}", f'{macs:.3f}']
    for k in ('b1', 'b1_cl', 'b64', 'b64_cl', 'b1_compiled'):
        if k not in r: cells += ['', '']; continue
        ratio = r[k] / base[k]
        cells += [f'{r[k]:.2f}', f'{ratio:.3f}' + ('' if r is base else f' ({ratio / macs:.2f})')]
    return '| ' + ' | '.join(cells) + ' |'


def main():
    warnings.filterwarnings('ignore')
    torch.set_num_threads(2)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--models', nargs='*', default=list(MODELS))
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    cols = ['model', 'variant', 'params ratio', 'MACs ratio']
    for k in ('batch 1', 'batch 1, channels_last', 'batch 64', 'batch 64, channels_last', 'batch 1, torch.compile'):
        cols += [f'{k} ms', f'{k} ratio (fit)']
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    for name in args.models:
        for r, base in rows_for(name, *MODELS[name]):
            lines.append(fmt(r, base)); print(lines[-1], flush=True)
    if args.out: write_result(args.out, 'Latency of pruned models', __doc__, lines)


if __name__ == '__main__':
    main()
