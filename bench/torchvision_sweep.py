"""Prune 30% of the filters of every torchvision classification model in one shot; check sparse == pruned.

Every classification model of torchvision (`list_models(module=torchvision.models)`), built with
`weights=None` at its usual input size (224, Inception-v3 299) and batch 2, BatchNorm statistics calibrated on
one random batch and near-zero inits (ViT's head, ConvNeXt's layer scale) randomised so that the comparison
means something. For each of 'local' and 'global': `Pruner(sparsity=30, criteria='l1', layer_type=(Conv2d,
Linear), verify=False)` timed (trace in both modes, score, build the pruned copy), then the pruned model against
the sparse one (the same 30% zeroed by the Sparsifier) on a random input, every output, in eval and in train
mode (dropout off, other random draws seeded, as `verify` runs them). "result" is ok when
`check_same_function` passes (a float32 difference above 1e-4 is checked again in float64) and parameters fell;
the "dense vs sparse" column shows how much sparsifying itself moved the outputs, so the check is not vacuous.
"groups pruned/with producers" counts the channel groups sparsified and pruned against all groups some layer
writes (the output group is always frozen); `print(trace(model))` says why each other group is frozen. Prune
times are single runs: bench/prune_time.py measures them properly (alternating, repeated).

With --peer, the same 30% with Torch-Pruning 1.6.1's MetaPruner (L1 magnitude, its dependency graph, the
classifier ignored), timed from graph build to pruned model, in a separate process limited to about 10 GiB (a
blow-up becomes a row); it does not keep the function (it removes live channels), so only whether it runs and
its size compare. Torch-Pruning is installed only where the benchmark runs (`pip install torch-pruning==1.6.1`),
never a dependency of fasterai.

Run: `.venv/bin/python bench/torchvision_sweep.py [--models resnet18 ...] [--peer] [--out FILE.md]`
"""
import argparse
import copy
import platform
import statistics
import sys
import time
import traceback
import warnings
from datetime import date
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from torch.utils._pytree import tree_leaves

from fasterai.pruner import Pruner
from fasterai.errors import PruningError
from fasterai.verify import MODES, check_same_function, outputs
from fasterai.report import count_macs, count_params
from fasterai.sparsifier import Sparsifier


SIZES = {'inception_v3': 299}
"Input sizes other than 224 (the usual size of every other model)."
PEER_SKIP = {}
"Models the peer is not run on, and why."


MODE = {False: '', True: '_train'}
"Row keys of the two modes' differences."


def input_shape(name, size=None, batch=2):
    s = size or SIZES.get(name, 224)
    return (batch, 3, s, s)


def ours(model, shape, method, macs):
    "Prune a copy with fasterai; returns the row's fields."
    row = {}
    t = time.perf_counter()
    pruned = Pruner(sparsity=30, method=method, layer_type=(nn.Conv2d, nn.Linear), example_input=shape,
                    verify=False).prune_model(model)
    row['s'] = time.perf_counter() - t
    sparse = copy.deepcopy(model)
    sp = Sparsifier(sparse, 'filter', method, 'l1', layer_type=(nn.Conv2d, nn.Linear), example_input=shape)
    sp.sparsify(30)
    for training in MODES:   # every output, in eval and in train mode (dropout off, BatchNorm statistics put back)
        a, b, d = (outputs(m, shape, training) for m in (sparse, pruned, model))
        row['diff' + MODE[training]] = rel_diff(a, b)
        row['moved'] = max(row.get('moved', 0.), rel_diff(d, a))   # how much sparsifying changed the output
    try:   # the Pruner's own check: a float32 difference over 1e-4 is checked again in float64
        check_same_function(sparse, pruned, shape)
        why = None
    except PruningError as e:
        why = str(e)
    row['params'], row['macs'] = count_params(pruned) / count_params(model), count_macs(pruned, shape) / macs
    frozen = [g for g in sp.graph.groups if g.frozen and g.by_role('out')]
    row['groups'] = f'{len(sp.targets)}/{len(sp.targets) + len(frozen)}'
    row['ok'] = why is None and row['params'] < 1
    if why: row['note'] = why
    if row['params'] >= 1: row['note'] = 'nothing pruned: ' + (frozen[0].frozen[0] if frozen else '')
    return row


def rel_diff(ref, got):
    "The largest difference between two outputs' tensors, relative to each reference tensor's scale."
    return max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(tree_leaves(ref), tree_leaves(got)))


def peer(model, shape, method):
    "Prune a copy with Torch-Pruning's MetaPruner, same ratio; returns the row's fields."
    import torch_pruning as tp
    model = copy.deepcopy(model)
    x = torch.randn(shape)
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    t = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.3,
                                  global_pruning=method == 'global', ignored_layers=[last])
    pruner.step()
    row = {'s': time.perf_counter() - t}
    with torch.no_grad(): out = model.eval()(x)
    row['params'], row['ok'] = count_params(model) , out.shape[-1] == 1000
    return row


PEER_MEMORY = 14 * 2 ** 30
"Address-space limit of the process that runs the peer (about 10 GiB resident): a blow-up becomes a row, not a kill."


def peer_isolated(name, shape, method):
    "`peer` in a fresh process under PEER_MEMORY; its fields, or the reason it gave none."
    import json
    import resource
    import subprocess
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (PEER_MEMORY, PEER_MEMORY))
    cmd = [sys.executable, __file__, '--peer-child', name, method, str(shape[-1])]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=900)
    except subprocess.TimeoutExpired:
        return {'error': 'no result in 15 minutes'}
    lines = [l for l in out.stdout.splitlines() if l.startswith('{')]
    if out.returncode == 0 and lines: return json.loads(lines[-1])
    err = (out.stderr.strip().splitlines() or [f'exit code {out.returncode}'])[-1]
    return {'error': 'out of memory (over 10 GiB)' if 'MemoryError' in err or 'alloc' in err.lower() else err[:100]}


def build(name, shape, **kwargs):
    """The model with weights=None (and builder `kwargs`), in eval mode; weights initialised at zero or nearly
    (ViT's head, ConvNeXt's layer scale of 1e-6) get random values, so that comparing outputs means something."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and p.abs().max() < 1e-4: p.normal_(0, 0.1)
    return calibrate(model, shape)


def calibrate(model, shape):
    """BatchNorm statistics from one train-mode pass on random data, as after training: activations keep
    their scale through deep stacks (with the initial statistics GoogLeNet's features fall to 1e-12)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms: m.momentum = None
    with torch.no_grad(): model.train()(torch.randn((4,) + tuple(shape[1:])))
    for m in norms: m.momentum = 0.1
    return model.eval()


def run(name, methods, size=None, with_peer=False):
    "The rows of one model, one per method."
    shape = input_shape(name, size)
    model, rows = build(name, shape), []
    macs = count_macs(model, shape)
    for method in methods:
        row = dict(model=name, method=method)
        try:
            row.update(ours(model, shape, method, macs))
        except Exception as e:
            row['ok'], row['note'] = False, f'{type(e).__name__}: {str(e).splitlines()[0][:160]}'
            if '-v' in sys.argv: traceback.print_exc()
        if with_peer and name in PEER_SKIP:
            row['tp'] = PEER_SKIP[name]
        elif with_peer:
            p = peer_isolated(name, shape, method)
            if 'error' in p:
                row['tp'] = p['error']
            else:
                row['tp'] = 'ok' if p['ok'] else 'wrong output'
                row['tp_params'], row['tp_s'] = p['params'] / count_params(model), p['s']
        rows.append(row)
    return rows


def fmt(row, with_peer):
    f = lambda k, spec: format(row[k], spec) if k in row else ''
    cells = [row['model'], row['method'], 'ok' if row['ok'] else 'FAIL', f('params', '.3f'), f('macs', '.3f'),
             f('diff', '.1e'), f('diff_train', '.1e'), f('moved', '.2f'), row.get('groups', ''), f('s', '.2f')]
    if with_peer:
        ratio = f"{row['s'] / row['tp_s']:.2f}" if 's' in row and 'tp_s' in row else ''
        cells += [row.get('tp', ''), f('tp_params', '.3f'), f('tp_s', '.2f'), ratio]
    return '| ' + ' | '.join(cells + [row.get('note', '')]) + ' |'


def peer_child(name, method, size):
    "The --peer-child process: build the model as `run` does, run the peer, print its fields as JSON."
    import json
    warnings.filterwarnings('ignore')
    torch.set_num_threads(2)
    shape = input_shape(name, int(size))
    try:
        print(json.dumps(peer(build(name, shape), shape, method)))
    except Exception as e:
        print(f'{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ""}', file=sys.stderr)
        sys.exit(1)


def main():
    if sys.argv[1:2] == ['--peer-child']: return peer_child(*sys.argv[2:5])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--models', nargs='*', default=None)
    ap.add_argument('--methods', nargs='*', default=['local', 'global'])
    ap.add_argument('--size', type=int, default=None, help='input size for every model (default: usual)')
    ap.add_argument('--peer', action='store_true', help='also run Torch-Pruning 1.6.1 on the same models')
    ap.add_argument('--start', default=None, help='skip the models before this one (to finish a stopped run)')
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    warnings.filterwarnings('ignore')
    torch.set_num_threads(2)
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    if args.start: names = names[names.index(args.start):]
    cols = ['model', 'method', 'result', 'params after/before', 'MACs after/before', 'max rel. diff sparse vs pruned, eval', 'train',
            'max rel. diff dense vs sparse', 'groups pruned/with producers', 'prune s']
    if args.peer: cols += ['Torch-Pruning', 'TP params after/before', 'TP prune s', 'prune s ours/TP']
    lines = ['| ' + ' | '.join(cols + ['note']) + ' |', '|' + '---|' * (len(cols) + 1)]
    rows = []
    for name in names:
        for row in run(name, args.methods, args.size, args.peer):
            rows.append(row)
            lines.append(fmt(row, args.peer)); print(lines[-1], flush=True)
        if args.out: write(args, lines, rows, done=name == names[-1])   # after each model: a partial table survives


def commit():
    "The commit of the code measured (with '+changes' when tracked files differ from it)."
    import subprocess
    root = Path(__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(['git', *a], capture_output=True, text=True, cwd=root).stdout
    changed = git('status', '--porcelain', '-uno', '--', '.', ':!bench/results').strip()   # its own output aside
    return git('rev-parse', '--short', 'HEAD').strip() + ('+changes' if changed else '')


def summary(rows, with_peer):
    "The results in sentences: how many runs are exact, the parameter ratios with their worst, the peer's count."
    ok = [r for r in rows if r['ok']]
    text = f'**{len(ok)} of {len(rows)} runs prune, with sparse == pruned in eval and train mode**'
    diffs = [r[k] for r in ok for k in ('diff', 'diff_train') if k in r]
    if ok:
        worst = max(ok, key=lambda r: r['params'])
        text += (f' (max relative difference {max(diffs):.1e} in float32); parameters left from '
                 f"{min(r['params'] for r in ok):.3f} to {worst['params']:.3f} ({worst['model']} {worst['method']})")
    bad = [f"{r['model']} {r['method']}" for r in rows if not r['ok']]
    text += '.' + (f' Not ok: {", ".join(bad)}.' if bad else '')
    if with_peer:
        ran = [r for r in rows if 'tp_s' in r]
        both = [r['s'] / r['tp_s'] for r in ran if 's' in r]
        fails = sorted({f"{r['model']} ({r['tp']})" for r in rows if r.get('tp') not in ('ok', None)})
        text += (f' Torch-Pruning 1.6.1 returns a model in {len(ran)} of {len(rows)} runs'
                 + (f'; prune time ours/Torch-Pruning median {statistics.median(both):.2f}, from {min(both):.2f} to '
                    f'{max(both):.2f}' if both else '') + '.' + (f' Torch-Pruning fails on: {"; ".join(fails)}.' if fails else ''))
    return text


def write(args, lines, rows, done):
    description = __doc__.split('\n\n', 1)[1].split('Run:')[0]
    head = (f'# torchvision classification models: 30% of filters, one shot, then pruned\n\n{description}'
            f'Command: `{" ".join(["python"] + sys.argv)}`  \n'
            f'Code: fasterai at commit {commit()}  \n'
            f'Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, '
            f'torchvision {torchvision.__version__}, {date.today()}\n\n'
            f'{summary(rows, args.peer)}'
            f'{"" if done else " (Partial: the run was stopped before the last model.)"}\n\n')
    with open(args.out, 'w') as f: f.write(head + '\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
