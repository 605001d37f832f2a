"""Where does latency fall in steps? The seed net's timed latency against one percentage for every layer.

The seed net (random weights, eval, batch 64) with one L1 percentage of filters for every channel group ('local',
as a uniform Latency budget plans), from 20% to 60%: the kept widths and the latency of the pruned copy over the
dense model, timed as `Sparsifier.measure` times the plans of a Latency budget (the median ratio of 7 interleaved
runs). Where a width crosses a multiple the CPU kernels prefer, the latency drops by more than the widths do; a
uniform plan then steps over a budget that lies between two percentages, and only rounding the widths (not
automatic yet) or a plan that is not uniform lands in the step.

Run: `.venv/bin/python bench/width_steps.py [--threads 1 2] [--out bench/results/width_steps.md]`
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import threads_args, write_result  # noqa: E402

from fasterai.examples import Net  # noqa: E402
from fasterai.sparsifier import Latency, Sparsifier  # noqa: E402


def main():
    args = threads_args(__doc__)
    torch.manual_seed(0)
    model = Net(in_channels=1).eval()
    sp = Sparsifier(model, 'filter', 'local', 'l1', (torch.nn.Conv2d, torch.nn.Linear), example_input=(2, 1, 28, 28))
    names = [t.name for t in sp.targets]
    lines = [f'| % of filters | {" | ".join(names)} | ' + ' | '.join(f'latency ratio, {t} thread{"s" * (t > 1)}'
                                                                      for t in args.threads) + ' |',
             '|---' * (1 + len(names) + len(args.threads)) + '|']
    for p in range(20, 62, 2):
        masks = sp.plan_masks(float(p))
        widths = [str(t.units - t.count(float(p))) for t in sp.targets]
        ratios = []
        for t in args.threads:
            torch.set_num_threads(t)
            ratios.append(f'{sp.measure(Latency(0.5, batch_size=64, threads=t), masks):.3f}')
        lines.append(f'| {p} | {" | ".join(widths)} | {" | ".join(ratios)} |')
        print(lines[-1], flush=True)
    if args.out: write_result(args.out, 'Latency in steps', __doc__, lines)


if __name__ == '__main__':
    main()
