"""Prune time and peak memory: fasterai against Torch-Pruning 1.6.1 removing the same channels, and against a
`copy.deepcopy` of the model.

For each model (weights=None, 224x224, batch 1): fasterai's `Pruner(sparsity=30)` (trace on meta tensors,
score, choose 30% of every channel group by L1, build the pruned copy; `verify=False`, the check timed apart)
against Torch-Pruning's dependency graph built on the same input plus the pruning of the very channels
fasterai chose (one `get_pruning_group(...).prune()` per fasterai group, on its first producer). Times are
medians of repeated runs alternating the two sides, 2 CPU threads, each side on its own deep copy (the copy
not timed). Peak memory is how far the peak RSS of a fresh process rises above its RSS while doing one prune
(the peak reset through /proc/self/clear_refs just before).
Torch-Pruning is a benchmark peer only (`pip install torch-pruning==1.6.1`), never a dependency of fasterai.

Run: `.venv/bin/python bench/prune_time.py [--models ...] [--repeats 5] [--out bench/results/prune_time.md]`
"""
import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from torchvision_sweep import build  # noqa: E402 (one model set-up for every benchmark)

from fasterai.pruner import Pruner  # noqa: E402
from fasterai.report import count_params  # noqa: E402
from fasterai.sparsifier import Sparsifier  # noqa: E402
from fasterai.verify import check_same_function  # noqa: E402

MODELS = ['resnet50', 'mobilenet_v2', 'densenet121', 'vgg16_bn', 'efficientnet_b0', 'convnext_tiny', 'regnet_y_400mf']
SHAPE = (1, 3, 224, 224)
LAYERS = (nn.Conv2d, nn.Linear)


def ours(model):
    return Pruner(sparsity=30, layer_type=LAYERS, example_input=SHAPE, verify=False).prune_model(model)


def chosen(model):
    "The channels fasterai removes: (producer module name, its output channel indices) per channel group."
    sp = Sparsifier(copy.deepcopy(model), 'filter', 'local', 'l1', LAYERS, SHAPE)
    masks, out = sp.plan_masks(30), []
    for t in sp.targets:
        s = t.group.by_role('out')[0]
        keep = masks[f'{s.module}.weight'].flatten()[s.offset:s.offset + s.length]
        out.append((s.module, (~keep).nonzero().flatten().tolist()))
    return [(n, idx) for n, idx in out if idx]


def peer(model, plan):
    "Torch-Pruning: the dependency graph, then the given channels pruned group by group (in place)."
    import torch_pruning as tp
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(SHAPE), verbose=False)
    for name, idxs in plan:
        m = model.get_submodule(name)
        fn = tp.prune_linear_out_channels if isinstance(m, nn.Linear) else tp.prune_conv_out_channels
        dg.get_pruning_group(m, fn, idxs).prune()
    return model


def timed(f, model, *args):
    m = copy.deepcopy(model)
    t = time.perf_counter()
    out = f(m, *args)
    return time.perf_counter() - t, out


def measure(name, repeats):
    model = build(name, SHAPE)
    plan = chosen(model)
    t_ours, t_peer, t_copy = [], [], []
    ours(model); peer(copy.deepcopy(model), plan)   # warm-up: first calls import and compile kernels
    for _ in range(repeats):   # alternate the sides
        s, pruned = timed(lambda m: ours(m), model); t_ours.append(s)
        s, theirs = timed(peer, model, plan); t_peer.append(s)
        t = time.perf_counter(); copy.deepcopy(model); t_copy.append(time.perf_counter() - t)
    t = time.perf_counter()
    check_same_function(_sparse(model), pruned, SHAPE)   # eval and train mode, as the Pruner's verify
    t_verify = time.perf_counter() - t
    med = statistics.median
    return dict(model=name, ours=med(t_ours), peer=med(t_peer), copy=med(t_copy), verify=t_verify,
                params=count_params(pruned) / count_params(model), peer_params=count_params(theirs) / count_params(model))


def _sparse(model):
    m = copy.deepcopy(model)
    Sparsifier(m, 'filter', 'local', 'l1', LAYERS, SHAPE).sparsify(30)
    return m


def child(name, side):
    """One prune in this fresh process: the growth of its peak RSS (bytes). The model is built without the
    calibration pass (whose activations would set the peak before pruning starts)."""
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    plan = chosen(model) if side == 'peer' else None
    m = copy.deepcopy(model) if side == 'peer' else model   # the peer prunes in place: give it its copy first
    Path('/proc/self/clear_refs').write_text('5')   # reset the peak (VmHWM) to the current RSS (Linux)
    before = _status('VmRSS')
    ours(m) if side == 'ours' else peer(m, plan)
    print(json.dumps(_status('VmHWM') - before))


def _status(key):
    "A memory figure of this process from /proc/self/status, in bytes."
    line = next(l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith(key + ':'))
    return int(line.split()[1]) * 1024


def peak(name, side):
    out = subprocess.run([sys.executable, __file__, '--child', name, side], capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None


def main():
    warnings.filterwarnings('ignore')
    torch.set_num_threads(2)
    if sys.argv[1:2] == ['--child']: return child(*sys.argv[2:4])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--models', nargs='*', default=MODELS)
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    mib = lambda b: '' if b is None else f'{b / 2 ** 20:,.0f}'
    lines = ['| model | fasterai s | Torch-Pruning s | fasterai / TP | deepcopy s | fasterai / deepcopy | verify s | '
             'params after (fasterai, TP) | peak MiB fasterai | peak MiB TP |', '|' + '---|' * 10]
    rows = []
    for name in args.models:
        r = measure(name, args.repeats)
        r['peak'], r['peer_peak'] = peak(name, 'ours'), peak(name, 'peer')
        rows.append(r)
        lines.append(f"| {name} | {r['ours']:.3f} | {r['peer']:.3f} | {r['ours'] / r['peer']:.2f} | {r['copy']:.3f} | "
                     f"{r['ours'] / r['copy']:.2f} | {r['verify']:.3f} | {r['params']:.3f}, {r['peer_params']:.3f} | "
                     f"{mib(r['peak'])} | {mib(r['peer_peak'])} |")
        print(lines[-1], flush=True)
    ratios = [r['ours'] / r['peer'] for r in rows]
    summary = (f'fasterai / Torch-Pruning: median {statistics.median(ratios):.2f} (from {min(ratios):.2f} to '
               f'{max(ratios):.2f}); fasterai / deepcopy: median '
               f'{statistics.median(r["ours"] / r["copy"] for r in rows):.2f}.')
    print(summary)
    if args.out: write_result(args.out, 'Prune time and peak memory', __doc__, lines, before_table=summary + '\n\n')


if __name__ == '__main__':
    main()
