"""One process of `torchrun --nproc_per_node 2 tests/fastai_distrib_worker.py OUT`: a seed-net fit with
SparsifyCallback inside fastai's `learn.distrib_ctx()` on the CPU (gloo); each rank saves its masks to OUT.

fastai 2.8.12's distributed training assumes CUDA in two places (DistributedDL broadcasts its batch order as a
CUDA tensor; DistributedTrainer reads `.device` from the wrapped model); this worker replaces those two methods
with CPU versions and leaves the rest (accelerate, DistributedDataParallel) as fastai runs it. SyncBatchNorm
trains only on a GPU, so the BatchNorms stay (tests/test_layers.py prunes a model converted to SyncBatchNorm)."""
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import fastai.callback.schedule  # noqa: F401
import fastai.distributed as fd
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner

from fasterai.examples import LabelledTensors, Net
from fasterai.sparsifier import SparsifyCallback
from fasterai.tracing import unwrap


def _broadcast(self, t, rank):
    "fastai's DistributedDL broadcasts its batch order as a CUDA tensor (NCCL); on the CPU gloo takes a CPU one."
    t = torch.LongTensor(t)
    dist.broadcast(t, rank)
    return t.tolist()


def _wrap_dl(self, dl):
    "fastai's DistributedTrainer asks the wrapped model for `.device`, which DistributedDataParallel lacks on the CPU."
    return dl if isinstance(dl, fd.DistributedDL) else fd.DistributedDL(dl, device=torch.device('cpu'))


class Seen(Callback):
    "What SparsifyCallback sees during the fit: the wrapper and the norm layers."
    order = SparsifyCallback.order + 1
    def before_fit(self):
        self.wrapper = type(self.learn.model).__name__
        self.norms = sorted({type(m).__name__ for m in unwrap(self.learn.model).modules() if 'Norm' in type(m).__name__})


def main(out):
    warnings.filterwarnings('ignore')
    fd.DistributedDL._broadcast, fd.DistributedTrainer._wrap_dl = _broadcast, _wrap_dl   # fastai's CUDA-only parts
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1, 28, 28, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, :, :14].mean((1, 2, 3)) > 0).long()
    dls = DataLoaders.from_dsets(LabelledTensors(x[:96], y[:96]), LabelledTensors(x[96:], y[96:]), bs=16,
                                 device='cpu', num_workers=0)
    torch.manual_seed(0)   # the same initial model on every rank
    learn = Learner(dls, Net(1), loss_func=nn.CrossEntropyLoss())
    cb, seen = SparsifyCallback(40, 'filter', criteria='taylor'), Seen()
    with learn.distrib_ctx(sync_bn=False, cpu=True), learn.no_bar(), learn.no_logging():   # SyncBatchNorm: GPU only
        learn.fit_one_cycle(2, 1e-2, cbs=[cb, seen])
        rank = dist.get_rank()
    torch.save({'masks': {k: v.cpu() for k, v in cb.sparsifier.masks.items()}, 'sparsity': cb.sparsifier.sparsity(),
                'wrapper': seen.wrapper, 'norms': seen.norms, 'world': dist.get_world_size()},
               Path(out) / f'rank{rank}.pt')


if __name__ == '__main__':
    main(sys.argv[1])
