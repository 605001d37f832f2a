"""What tracing and verifying in both modes costs: the Pruner always traces eval and train mode, and verifies in both.

For each model of bench/prune_time.py (weights=None, 224x224, batch 1): `Pruner(sparsity=30)` with
`verify=False`, tracing both modes (what the library does) against tracing eval mode only (`graph.MODES`
patched to eval alone, as before; a model that reads `training` then loses its train-only branches), and the
check `check_same_function(sparse, pruned)` in both modes against eval mode only. Medians of interleaved rounds
(each round times every variant in turn), 2 CPU threads. "train graph differs": fx records another graph in
train mode, so the former bytecode scan (deleted) traced both modes for that model as well. Both modes stay
the rule while they cost less than about 20% of prune time at the median against that scan.

Run: `.venv/bin/python bench/trace_modes.py [--models ...] [--repeats 7] [--out bench/results/trace_modes.md]`
"""
import statistics
import sys
import time
from pathlib import Path

import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import model_args, write_result  # noqa: E402
from prune_time import MODELS, SHAPE, _sparse  # noqa: E402
from torchvision_sweep import build  # noqa: E402

from fasterai import graph  # noqa: E402
from fasterai.pruner import Pruner  # noqa: E402
from fasterai.tracing import Leaves, hooks_taken_out, symbolic_trace, training_mode  # noqa: E402
from fasterai.verify import MODES, check_same_function  # noqa: E402


def timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def prune(model, modes):
    "Prune time with the given trace modes (the graph module's MODES patched for the while)."
    graph.MODES = modes
    try:
        return timed(lambda: Pruner(sparsity=30, layer_type=(nn.Conv2d, nn.Linear), example_input=SHAPE,
                                    verify=False).prune_model(model))
    finally:
        graph.MODES = MODES


def train_graph_differs(model):
    "Whether fx records another graph in train mode (where the former bytecode scan traced twice too)."
    graphs = []
    for training in MODES:
        with training_mode(model, training), hooks_taken_out(model) as hooks:
            g = symbolic_trace(model, Leaves(()), hooks)
        graphs.append([(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in g.nodes])
    return graphs[0] != graphs[1]


def measure(name, repeats):
    model = build(name, SHAPE)
    sparse = _sparse(model)
    pruned = Pruner(example_input=SHAPE, verify=False).prune_model(sparse)
    variants = {'both': lambda: prune(model, MODES), 'eval': lambda: prune(model, (False,)),
                'verify both': lambda: timed(lambda: check_same_function(sparse, pruned, SHAPE)),
                'verify eval': lambda: timed(lambda: check_same_function(sparse, pruned, SHAPE, modes=(False,)))}
    for f in variants.values(): f()   # warm-up
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for k, f in variants.items(): times[k].append(f())
    return {'differs': train_graph_differs(model), **{k: statistics.median(v) for k, v in times.items()}}


def main():
    args = model_args(__doc__, MODELS, 7)
    lines = ['| model | train graph differs | prune s, both modes traced | prune s, eval only | prune, both / eval | '
             'verify s, both modes | verify s, eval only | verify, both / eval |', '|' + '---|' * 8]
    ratios, scan = [], []
    for name in args.models:
        r = measure(name, args.repeats)
        ratios.append(r['both'] / r['eval'])
        scan.append(1. if r['differs'] else ratios[-1])   # the scan traced twice where the graph differs
        lines.append(f"| {name} | {'yes' if r['differs'] else 'no'} | {r['both']:.3f} | {r['eval']:.3f} | {ratios[-1]:.2f} | {r['verify both']:.3f} | "
                     f"{r['verify eval']:.3f} | {r['verify both'] / r['verify eval']:.2f} |")
        print(lines[-1], flush=True)
    worst = max(zip(ratios, args.models))
    summary = (f'Tracing both modes: prune time {statistics.median(ratios):.2f}x tracing eval mode only at the '
               f'median, at worst {worst[0]:.2f}x ({worst[1]}); against the former scan, which traced train mode too '
               f'where the code reads `training` (the models whose train graph differs), '
               f'{statistics.median(scan):.2f}x at the median, at worst {max(scan):.2f}x.')
    print(summary)
    if args.out: write_result(args.out, 'Tracing and verifying in both modes', __doc__, lines,
                              before_table=summary + '\n\n')


if __name__ == '__main__':
    main()
