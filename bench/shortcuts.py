"""What each speed shortcut of the Pruner saves: prune time with the shortcut, and with it turned off.

For each model of bench/prune_time.py (weights=None, 224x224, batch 1): `Pruner(sparsity=30, verify=False)` as it
is, and with one shortcut replaced by the plain way at a time:
- "shape formulas": shape propagation computes the shapes of norms, activations, convolutions, Linear and
  adaptive pools from formulas instead of running each module on meta tensors;
- "module copy": the pruned copy's module tree is built by `copy_modules` instead of `copy.deepcopy`.
Medians of interleaved rounds (each round times every variant in turn), 2 CPU threads. A shortcut keeps its
place where it saves at least 5% at the median: two that did not were removed after this benchmark measured
them on 2026-11-28 (formulas for the shapes of pointwise functions: 1.04x median, 1.01x to 1.17x; checking every
parameter finite with one synchronisation: 1.01x median, 1.00x to 1.02x).

Run: `.venv/bin/python bench/shortcuts.py [--models ...] [--repeats 5] [--out bench/results/shortcuts.md]`
"""
import copy
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import model_args, write_result  # noqa: E402
from prune_time import MODELS, SHAPE  # noqa: E402
from torchvision_sweep import build  # noqa: E402

from fasterai import pruner, tracing  # noqa: E402
from fasterai.pruner import Pruner  # noqa: E402


def _plain_module(self, target, args, kwargs):
    "Every module run on meta tensors (its parameters swapped for meta ones), no formula."
    m = self.fetch_attr(target)
    if not self.meta: return fx.Interpreter.call_module(self, target, args, kwargs)
    state = {k: torch.empty_like(v, device='meta') for k, v in (*m.named_parameters(), *m.named_buffers())}
    return torch.func.functional_call(m, state, args, kwargs) if state else m(*args, **kwargs)


OFF = {   # name: (module, attribute, the plain way)
    'shape formulas': (tracing._Shapes, 'call_module', _plain_module),
    'module copy': (pruner, 'copy_modules', lambda module, memo: copy.deepcopy(module, memo)),
}


@contextmanager
def off(name):
    "The shortcut `name` replaced by the plain way for a while (None: every shortcut on)."
    if name is None:
        yield
        return
    owner, attr, plain = OFF[name]
    saved = getattr(owner, attr)
    setattr(owner, attr, plain)
    try:
        yield
    finally:
        setattr(owner, attr, saved)


def measure(name, repeats):
    model = build(name, SHAPE)
    prune = lambda: Pruner(sparsity=30, layer_type=(nn.Conv2d, nn.Linear), example_input=SHAPE,
                           verify=False).prune_model(model)
    variants = [None, *OFF]
    times = {v: [] for v in variants}
    for _ in range(repeats + 1):   # the first round warms up
        for v in variants:
            with off(v):
                t = time.perf_counter(); prune(); times[v].append(time.perf_counter() - t)
    return {v: statistics.median(ts[1:]) for v, ts in times.items()}


def main():
    args = model_args(__doc__, MODELS, 5)
    lines = ['| model | prune s | ' + ' | '.join(f'without {k}: s, ratio' for k in OFF) + ' |', '|' + '---|' * (len(OFF) + 2)]
    ratios = {k: [] for k in OFF}
    for name in args.models:
        r = measure(name, args.repeats)
        for k in OFF: ratios[k].append(r[k] / r[None])
        lines.append(f'| {name} | {r[None]:.3f} | ' + ' | '.join(f'{r[k]:.3f}, {r[k] / r[None]:.2f}' for k in OFF) + ' |')
        print(lines[-1], flush=True)
    summary = 'Prune time without each shortcut, as a multiple of the time with it, median (range): ' + '; '.join(
        f'{k} {statistics.median(v):.2f} ({min(v):.2f} to {max(v):.2f})' for k, v in ratios.items()) + '.'
    print(summary)
    if args.out: write_result(args.out, 'What each speed shortcut saves', __doc__, lines, before_table=summary + '\n\n')


if __name__ == '__main__':
    main()
