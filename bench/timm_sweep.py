"""Prune 30% of the filters of one model of every timm family in one shot; check sparse == pruned.

One model per timm model module (`timm.list_modules()`): among its models, the one with the fewest parameters of
up to six candidates whose names suggest small variants (counted on the meta device). Built with
`pretrained=False`, at its default input size capped at 224 (its own size when the model fixes it), batch 2,
BatchNorm statistics calibrated on one random batch and near-zero weights (layer scales) randomised, as in
bench/torchvision_sweep.py. Then `Sparsifier(model, 'filter', 'local', 'l1', (Conv2d, Linear)).sparsify(30)` and
`Pruner()` with `verify=True` (every output, eval and train mode), each model in its own process with a time and
memory cap. "outcome": *exact* (pruned, verified, and the explicit eval-mode difference under 1e-4), *nothing
pruned* (no group can be sparsified: the first reasons are listed), *refused* (a clear TraceError or ValueError),
*caught* (verify raised PruningError: not a silent mismatch, but a bug to fix), *silent mismatch* (a model came
back whose outputs differ: must be 0), *time* or *memory* (over the cap). "frozen" counts the channel groups some
layer writes that stay, with their most common reasons (node names removed). With --peer, Torch-Pruning 1.6.1's
MetaPruner on the same model (30%, L1 magnitude, its dependency graph, the classifier ignored, same caps, its own
process): whether its model runs to the same output shape, its parameter ratio and time (it does not keep the
function: it removes live channels). Torch-Pruning is installed only where the benchmark runs.

With --peer-from FILE [FILE ...], Torch-Pruning's columns are read from earlier results files of this script (they
do not depend on fasterai's code: the same model, seed and caps; the first file that ran a family wins; rows that say
"not run" are gaps), once every family's fasterai run is done, and it runs only for the families the files lack.

Run: `.venv/bin/python bench/timm_sweep.py [--families resnet vit ...] [--timeout 300] [--peer | --peer-from FILE ...]
[--out bench/results/timm.md]`
"""
import argparse
import collections
import json
import re
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

KEYWORDS = ('atto', 'femto', 'pico', 'nano', 'tiny', 'mini', 'micro', 'xxs', 'xs', 'small', 'lite', '050', '075',
            '18', '26', 'b0', 's', 't')
MEMORY = 12 * 2 ** 30


def candidates(models, n=6):
    "Up to `n` model names, those whose names suggest a small variant first."
    rank = lambda m: (next((i for i, k in enumerate(KEYWORDS) if k in re.split(r'[_.]', m) or k in m), len(KEYWORDS)),
                      len(m), m)
    return sorted(models, key=rank)[:n]


def pick(family):
    "The model of `family` with the fewest parameters among its candidates (built on the meta device)."
    import timm
    import torch
    best = None
    for name in candidates(timm.list_models(module=family)):
        try:
            with torch.device('meta'): n = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
        except Exception:
            continue
        if best is None or n < best[1]: best = (name, n)
    return best[0] if best else candidates(timm.list_models(module=family))[0]


def reason_kind(reason):
    "A frozen reason without its node and module names, so that reasons of the same kind count together."
    return re.sub(r"'[^']*'", "'…'", reason)[:140]


def build(name):
    "The model as every run of it here sees it, and its example shape."
    warnings.filterwarnings('ignore')
    import timm
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from torchvision_sweep import calibrate
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    cfg = model.pretrained_cfg or {}
    c, h, w = cfg.get('input_size', (3, 224, 224))
    if not cfg.get('fixed_input_size', False): h, w = min(h, 224), min(w, 224)
    shape = (2, c, h, w)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 1 and p.numel() > 1 and p.abs().max() < 1e-4: p.normal_(0, 0.1)
    return calibrate(model, shape), shape


def peer_child(name):
    """Torch-Pruning 1.6.1's MetaPruner on the same model, 30% by L1 magnitude, the classifier ignored; it does not
    keep the function (it removes live channels), so only whether its model runs to the same output shape, its size
    and its time compare. One JSON line."""
    import torch
    import torch.nn as nn
    import torch_pruning as tp
    from fasterai.report import count_params
    model, shape = build(name)
    x = torch.randn(shape)
    with torch.no_grad(): ref = model(x)
    before, row = count_params(model), dict(model=name)
    try:
        last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
        t = time.perf_counter()
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.3,
                                      ignored_layers=[last])
        pruner.step()
        row['s'] = time.perf_counter() - t
        with torch.no_grad(): out = model.eval()(x)
        row['params'] = count_params(model) / before
        row['outcome'] = 'runs' if out.shape == ref.shape else f'output shape {tuple(out.shape)}'
    except Exception as e:
        row['outcome'] = f'error: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ""}'
    print(json.dumps(row), flush=True)


def child(name):
    "Build, sparsify, prune and check one model; print one JSON line."
    import torch
    import torch.nn as nn
    from torchvision_sweep import rel_diff
    from fasterai.errors import PruningError, TraceError
    from fasterai.pruner import Pruner
    from fasterai.report import count_macs, count_params
    from fasterai.sparsifier import Sparsifier
    from fasterai.verify import outputs
    model, shape = build(name)
    h = shape[2]
    attention = any(re.search('Attention|Attn|MultiHead', type(m).__name__) for m in model.modules())
    row = dict(model=name, input=h, kind='attention' if attention else 'cnn')
    t = time.perf_counter()
    try:
        sp = Sparsifier(model, 'filter', 'local', 'l1', (nn.Conv2d, nn.Linear), example_input=shape)
        row['groups'] = len(sp.targets)
        frozen = [g for g in sp.graph.groups if g.frozen and g.by_role('out')]
        row['frozen'] = len(frozen)
        kinds = collections.Counter(reason_kind(r) for g in frozen for r in g.frozen[:1])
        row['reasons'] = [f'{n}x {k}' for k, n in kinds.most_common(2)]
        sp.sparsify(30)
        pruned = Pruner(example_input=shape).prune_model(model)
        row['s'] = time.perf_counter() - t
        row['diff'] = rel_diff(outputs(model, shape, False), outputs(pruned, shape, False))
        row['params'] = count_params(pruned) / count_params(model)
        row['macs'] = count_macs(pruned, shape) / count_macs(model, shape)
        row['outcome'] = 'exact' if row['diff'] < 1e-4 else 'silent mismatch'
        if row['params'] >= 1: row['outcome'] = 'nothing pruned'
    except PruningError as e:
        row['outcome'], row['note'] = 'caught', str(e)[:200]
    except ValueError as e:
        msg = str(e)
        row['outcome'] = 'nothing pruned' if 'can be sparsified' in msg else 'refused'
        row['note'] = msg.splitlines()[0][:200]
    except TraceError as e:
        row['outcome'], row['note'] = 'refused', str(e).splitlines()[0][:200]
    except Exception as e:
        row['outcome'], row['note'] = 'error', f'{type(e).__name__}: {str(e).splitlines()[0][:180] if str(e) else ""}'
    print(json.dumps(row), flush=True)


def isolated(name, timeout, which='--child'):
    "`child(name)` (or `peer_child`) in a fresh process under the time and memory caps."
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    try:
        out = subprocess.run([sys.executable, __file__, which, name], capture_output=True, text=True,
                             preexec_fn=limit, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(model=name, outcome='time', note=f'no result in {timeout} s')
    lines = [l for l in out.stdout.splitlines() if l.startswith('{')]
    if lines: return json.loads(lines[-1])
    err = (out.stderr.strip().splitlines() or [f'exit code {out.returncode}'])[-1]
    return dict(model=name, outcome='memory' if 'alloc' in err.lower() or 'MemoryError' in err else 'error',
                note=err[:200])


def fmt(family, r, peer=None):
    f = lambda k, spec, r=r: format(r[k], spec) if k in r else ''
    note = '; '.join(r.get('reasons', [])) if r.get('outcome') == 'exact' else r.get('note', '; '.join(r.get('reasons', [])))
    said = {'time': 'over the time cap', 'memory': 'over the memory cap'}
    tp = '' if peer is None else (f" {said.get(peer.get('outcome'), peer.get('outcome', ''))} | "
                                  f"{f('params', '.3f', peer)} | {f('s', '.1f', peer)} |")
    return (f"| {family} | {r['model']} | {r.get('kind', '')} | {r['outcome']} | {f('params', '.3f')} | "
            f"{f('macs', '.3f')} | {f('diff', '.1e')} | {r.get('groups', '')}/{r.get('frozen', '')} | {f('s', '.1f')} |"
            f"{tp} {note.replace('|', '/')} |")


def peers_from(path):
    """Family -> Torch-Pruning's result (outcome, params, s) as a results file of this script records it, and
    the file's machine line."""
    said = {'over the time cap': 'time', 'over the memory cap': 'memory'}
    out, machine = {}, ''
    for line in Path(path).read_text().splitlines():
        if line.startswith('Machine:'): machine = line.removeprefix('Machine:').strip()
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if not line.startswith('| ') or len(cells) != 13 or cells[0] == 'family': continue
        if cells[9].startswith('not run'): continue             # a gap another file (or this run) fills
        p = {'outcome': said.get(cells[9], cells[9])}
        if cells[10]: p['params'] = float(cells[10])
        if cells[11]: p['s'] = float(cells[11])
        out[cells[0]] = p
    return out, machine


def main():
    if sys.argv[1:2] == ['--child']: return child(sys.argv[2])
    if sys.argv[1:2] == ['--peer-child']: return peer_child(sys.argv[2])
    if sys.argv[1:2] == ['--pick']: return print(pick(sys.argv[2]))
    warnings.filterwarnings('ignore')
    import timm
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--families', nargs='*', default=None)
    ap.add_argument('--timeout', type=int, default=300)
    ap.add_argument('--out', default=None)
    ap.add_argument('--peer', action='store_true', help='also run Torch-Pruning 1.6.1 on each model, same caps')
    ap.add_argument('--peer-from', nargs='+', default=None,
                    help="Torch-Pruning's columns from earlier results files (the first that ran a family wins)")
    args = ap.parse_args()
    args.peer = args.peer or bool(args.peer_from)
    families = args.families or timm.list_modules()
    peer_cols = 'Torch-Pruning | TP params ratio | TP time s | ' if args.peer else ''
    lines = ['| family | model | kind | outcome | params ratio | MACs ratio | max rel. diff | groups pruned/frozen | '
             f'time s | {peer_cols}frozen reasons, or why |', '|' + '---|' * (13 if args.peer else 10)]
    rows, names = [], []
    for fam in families:
        names.append(pick(fam))
        rows.append(isolated(names[-1], args.timeout))
        print(fmt(fam, rows[-1]), flush=True)
    earlier, machines = {}, []                                          # (read when they are needed)
    for path in args.peer_from or []:
        found, machine = peers_from(path)
        earlier = {**found, **earlier}
        machines.append(machine)
    peer_machine = '; '.join(m for m in machines if m)
    peers = [(earlier.get(fam) or isolated(name, args.timeout, '--peer-child')) if args.peer else None
             for fam, name in zip(families, names)]
    lines += [fmt(fam, r, p) for fam, r, p in zip(families, rows, peers)]
    good = lambda rs: [r for r in rs if r['outcome'] == 'exact' and r['params'] <= 0.9]
    cnn = [r for r in rows if r.get('kind') == 'cnn']
    count = collections.Counter(r['outcome'] for r in rows)
    summary = [f"{len(good(rows))} of {len(rows)} families prune exactly to at most 0.9x their parameters "
               f"({100 * len(good(rows)) / len(rows):.0f}%); CNN families: {len(good(cnn))} of {len(cnn)} "
               f"({100 * len(good(cnn)) / max(len(cnn), 1):.0f}%). Outcomes: "
               + ', '.join(f'{k} {v}' for k, v in count.most_common()) + '.', '']
    if args.peer:
        runs = [p for p in peers if p.get('outcome') == 'runs']
        worst = max((p['params'] for p in runs), default=float('nan'))
        summary.insert(1, f"Torch-Pruning 1.6.1 gives a model that runs to the same output shape on {len(runs)} of "
                          f"{len(peers)} families (parameters at most {worst:.3f}x; its outputs are not the sparse "
                          f"model's: it removes live channels)" + ('; the others: ' + ', '.join(
                              f'{k} {v}' for k, v in collections.Counter(re.sub(r':.*', '', p.get('outcome', ''))
                                                                         for p in peers if p not in runs).most_common())
                              if len(runs) < len(peers) else '') + '.')
    print(summary[0])
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import write_result
        import subprocess as sp
        commit = sp.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
        taken = sum(fam in earlier for fam in families)
        source = (f"; Torch-Pruning columns of {taken} families from {' and '.join(args.peer_from)}"
                  + (f' ({peer_machine})' if peer_machine else '') if taken else '')
        write_result(args.out, 'Every timm family: 30% of filters, pruned and checked', __doc__, lines,
                     f', timm {timm.__version__}, commit {commit}{source}', '\n'.join(summary) + '\n')


if __name__ == '__main__':
    main()
