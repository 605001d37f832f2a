"""Two processes (torch.distributed, gloo, CPU) under DistributedDataParallel compute identical masks."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from fasterai.examples import Net
from fasterai.sparsifier import Sparsifier


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def worker(rank, world, port, settings):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for granularity, method, criteria in settings:
            torch.manual_seed(0)   # the same initial model on every rank
            model = nn.parallel.DistributedDataParallel(Net(1))
            sp = Sparsifier(model, granularity, method, criteria, example_input=(2, 1, 28, 28))
            opt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9)
            g = torch.Generator().manual_seed(100 + rank)   # different data on each rank
            for step in range(5):
                x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                sp.accumulate()
                opt.step()
                sp.sparsify(12 * (step + 1))
                mine = {k: v.cpu() for k, v in sp.masks.items()}
                everyone = [None] * world
                dist.all_gather_object(everyone, mine)
                for other in everyone:
                    assert other.keys() == mine.keys()
                    for k in mine:
                        assert torch.equal(other[k], mine[k]), (granularity, method, criteria, step, k)
            assert 55 < sp.sparsity() < 65
    finally:
        dist.destroy_process_group()


def test_masks_agree_across_two_processes():
    settings = [('filter', 'local', 'l1'), ('filter', 'global', 'l1'), ('weight', 'global', 'taylor'),
                ('kernel', 'local', 'movement'), ('weight', 'local', 'random')]
    mp.spawn(worker, args=(2, free_port(), settings), nprocs=2, join=True)


def test_fastai_distrib_ctx_under_torchrun_gives_the_same_masks(tmp_path):
    "fastai's own distributed training (learn.distrib_ctx(): accelerate, DistributedDataParallel) on 2 CPU processes."
    import subprocess
    import sys
    from pathlib import Path
    worker = Path(__file__).with_name('fastai_distrib_worker.py')
    def launch():
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
               str(worker), str(tmp_path)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=worker.parent.parent)
    done = launch()
    # gloo's start-up on a loaded machine rarely aborts a rank in C++ ('terminate called without an active exception',
    # SIGABRT, no Python traceback, well before the fit ends; 1 run in CI, 0 in 46 here). That is the launcher's
    # start, not our code: a Python error in the worker prints a traceback and is not retried. One fresh start only.
    if done.returncode and 'terminate called without an active exception' in done.stderr \
            and f'File "{worker}", line' not in done.stderr:
        done = launch()
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    assert a['world'] == 2 and a['wrapper'] == 'DistributedDataParallel' and a['norms'] == ['BatchNorm2d']
    assert a['masks'].keys() == b['masks'].keys() and len(a['masks']) >= 9
    for k in a['masks']: assert torch.equal(a['masks'][k], b['masks'][k]), k
    assert 35 < a['sparsity'] == b['sparsity'] < 45
