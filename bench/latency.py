"""Real CPU latency of pruned models against their MACs: does removing x% of the work remove x% of the time?

For each model: dense, and 30% and 50% of filters pruned in one shot (L1, local), plus 50% with the kept
channels of each group rounded to a multiple of 8 (`round_to=8`). Parameters, MACs (torch.utils.flop_counter)
and latency (torch.utils.benchmark, eval, inference_mode, 2 threads) at batch 1 and 64, eager in contiguous
and channels_last memory format, and with torch.compile (inductor) at batch 1 (dense and 50%): the median of 3
rounds, each timing every variant of a model in turn (so drift on a shared machine hits them alike). The "fit"
column is latency ratio / MACs ratio: 1.0 means the time fell exactly as the work did; the target is at most 1.1.

Run: `.venv/bin/python bench/latency.py [--models ...] [--out bench/results/latency.md]`
"""
import argparse
import copy
import statistics
import sys
import time
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


ROUNDS = 3
"Interleaved rounds: each round times every variant once, so drift on a shared machine hits all of them alike."


def prepared(model, x, channels_last=False, compiled=False):
    "The model and input in the memory format, compiled if asked, warmed up (and compiled) once."
    if channels_last: model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    if compiled: model = torch.compile(model)
    with torch.inference_mode():
        for _ in range(2): model(x)
    return model, x


def once(model, x, min_run_time=0.2):
    "Median milliseconds of one forward pass, over at least `min_run_time` seconds (at least one pass)."
    with torch.inference_mode():
        t = Timer('model(x)', globals={'model': model, 'x': x}, num_threads=torch.get_num_threads())
        return t.blocked_autorange(min_run_time=min_run_time).median * 1e3


def interleaved(pairs):
    "Median over ROUNDS of each (model, input) pair's latency, the pairs timed in turn within every round."
    times = [[] for _ in pairs]
    for _ in range(ROUNDS):
        for t, (m, x) in zip(times, pairs): t.append(once(m, x))
    return [statistics.median(t) for t in times]


def rows_for(name, channels, size):
    dense = model_of(name, size)
    shape1 = (1, channels, size, size)
    models, rows = [], []
    for label, sparsity, round_to in VARIANTS:
        m = dense if sparsity is None else Pruner(sparsity=sparsity, round_to=round_to, example_input=shape1,
                                                  layer_type=(nn.Conv2d, nn.Linear)).prune_model(dense)
        models.append(m.eval())
        rows.append(dict(model=name, variant=label, params=count_params(m), macs=count_macs(m, shape1)))
    for batch in (1, 64):
        x = torch.randn(batch, channels, size, size)
        for key, cl in ((f'b{batch}', False), (f'b{batch}_cl', True)):
            for r, ms in zip(rows, interleaved([prepared(copy.deepcopy(m), x, channels_last=cl) for m in models])):
                r[key] = ms
    compiled = [i for i, (label, _, _) in enumerate(VARIANTS) if label in COMPILED]
    pairs = [prepared(copy.deepcopy(models[i]), torch.randn(shape1), compiled=True) for i in compiled]
    for i, ms in zip(compiled, interleaved(pairs)): rows[i]['b1_compiled'] = ms
    return [(r, rows[0]) for r in rows]


BREAKDOWN = ('resnet50', 'mobilenet_v2', 'efficientnet_b0')
"Models whose time is also split by layer kind (dense against 50%)."


def kind(m):
    "The kind of a leaf module, for the breakdown."
    if isinstance(m, nn.Conv2d):
        if m.groups == 1: return 'conv 1x1' if m.kernel_size == (1, 1) else 'conv kxk'
        return 'depthwise conv' if m.groups == m.in_channels else 'grouped conv'
    if isinstance(m, nn.Linear): return 'linear'
    if isinstance(m, nn.modules.batchnorm._BatchNorm): return 'batchnorm'
    return 'activation, pool, other layers'


def by_kind(model, x, runs=1, warm_up=True):
    """Milliseconds per forward pass spent in each kind of leaf module (forward hooks around each), their MACs,
    and the time outside any leaf module (adds, multiplies, reshapes written in forward code)."""
    leaves = [m for m in model.modules() if not list(m.children())]
    spent, macs, start = {}, {}, {}
    def pre(m, i): start[m] = time.perf_counter()
    def post(m, i, o):
        k = kind(m)
        spent[k] = spent.get(k, 0.) + time.perf_counter() - start[m]
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight
            macs[k] = macs.get(k, 0) + o.numel() * w[0].numel() // x.shape[0]   # per image
    hooks = [h for m in leaves for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with torch.inference_mode():
            if warm_up: model(x)
            spent.clear(); macs.clear()
            t = time.perf_counter()
            for _ in range(runs): model(x)
            total = time.perf_counter() - t
    finally:
        for h in hooks: h.remove()
    out = {k: (v / runs * 1e3, macs.get(k, 0) / runs) for k, v in spent.items()}
    out['outside the layers'] = ((total - sum(spent.values())) / runs * 1e3, 0)
    return out, total / runs * 1e3


def _median_kinds(results):
    "The per-kind median (ms, MACs) and the median total over rounds of `by_kind` results."
    kinds = results[0][0]
    return ({k: (statistics.median(r[0][k][0] for r in results), kinds[k][1]) for k in kinds},
            statistics.median(r[1] for r in results))


def breakdown_lines(models):
    lines = ['| model | layer kind | dense ms | 50% ms | time ratio | MACs ratio | share of the dense time |',
             '|' + '---|' * 7]
    for name in models:
        dense = model_of(name, 224)
        pruned = Pruner(sparsity=50, example_input=(1, 3, 224, 224), layer_type=(nn.Conv2d, nn.Linear)).prune_model(dense).eval()
        x = torch.randn(64, 3, 224, 224)
        rounds = [(by_kind(dense, x, warm_up=r == 0), by_kind(pruned, x, warm_up=r == 0)) for r in range(ROUNDS)]
        (d, dt), (p, pt) = (_median_kinds([r[i] for r in rounds]) for i in (0, 1))
        dm, pm = sum(v[1] for v in d.values()), sum(v[1] for v in p.values())
        for k in sorted(d, key=lambda k: -d[k][0]):
            mr = f'{p[k][1] / d[k][1]:.3f}' if d[k][1] else ''
            lines.append(f'| {name} | {k} | {d[k][0]:.1f} | {p[k][0]:.1f} | {p[k][0] / d[k][0]:.3f} | {mr} | '
                         f'{d[k][0] / dt:.1%} |')
        lines.append(f'| {name} | all | {dt:.1f} | {pt:.1f} | {pt / dt:.3f} | {pm / dm:.3f} | 100% |')
        print('\n'.join(lines[-len(d) - 1:]), flush=True)
    return lines


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
    blines = breakdown_lines([m for m in args.models if m in BREAKDOWN])
    intro = ['', 'Where the time goes, batch 64, eager, contiguous: each leaf layer timed by forward hooks, dense '
             f'against 50% of filters pruned, medians of {ROUNDS} passes of each in turn; "outside the layers" is the rest '
             'of the forward pass (residual adds, SE multiplies, reshapes).', '']
    if args.out: write_result(args.out, 'Latency of pruned models', __doc__, lines + intro + blines)


if __name__ == '__main__':
    main()
