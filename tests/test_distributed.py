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
