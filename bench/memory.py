"""Peak memory of pruning: how much the process grows while `Pruner(sparsity=30).prune_model` runs, against
the size of the model's weights.

Each model runs in a fresh process: build it (weights=None), run one forward pass at batch 1 (so the
baseline already holds what any inference needs), note the peak RSS, prune, note the peak again.
The growth counts the pruned copy itself (a new model is returned, the user's stays), the channel graph,
the masks and the verification passes. The target is at most one extra copy of the weights (growth / weights
<= 1) on the large models; small ones show a fixed cost of 15-25 MiB (the traced graphs, the verification
passes' activations at 224x224) that dominates when the weights are a few MiB.

Run: `.venv/bin/python bench/memory.py [--models resnet50 vit_b_16] [--out bench/results/memory.md]`
"""
import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

MODELS = ['resnet50', 'vit_b_16', 'mobilenet_v2', 'densenet121']


def child(name):
    import torchvision
    from fasterai.pruner import Pruner

    torch.set_num_threads(2)
    model = torchvision.models.get_model(name, weights=None).eval()
    shape = (1, 3, 224, 224)
    with torch.no_grad(): model(torch.randn(shape))
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    pruned = Pruner(sparsity=30, layer_type=(torch.nn.Conv2d, torch.nn.Linear), example_input=shape).prune_model(model)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kept = sum(t.numel() * t.element_size() for t in (*pruned.parameters(), *pruned.buffers()))
    print(json.dumps(dict(model=name, weights=weights, pruned=kept, growth=peak - before)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--models', nargs='*', default=MODELS)
    ap.add_argument('--out', default=None)
    ap.add_argument('--child', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child: return child(args.child)
    mib = lambda b: f'{b / 2 ** 20:,.0f}'
    lines = ['| model | weights MiB | pruned weights MiB | peak growth while pruning MiB | growth / weights |',
             '|---|---|---|---|---|']
    for name in args.models:
        out = subprocess.run([sys.executable, __file__, '--child', name], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        lines.append(f"| {name} | {mib(r['weights'])} | {mib(r['pruned'])} | {mib(r['growth'])} | "
                     f"{r['growth'] / r['weights']:.2f} |")
        print(lines[-1], flush=True)
    if args.out: write_result(args.out, 'Peak memory while pruning', __doc__, lines)


if __name__ == '__main__':
    main()
