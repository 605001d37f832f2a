"""The seed notebook's network and Fashion-MNIST, for the demo, tests, notebooks and benchmarks."""
import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['Net', 'FASHION_MNIST_DIR', 'load_fashion_mnist', 'fashion_mnist_dls']

FASHION_MNIST_DIR = Path(os.environ.get('FASHION_MNIST_DIR', '/usr/share/datasets/fashion-mnist'))
"Where the idx files are (Debian's dataset-fashion-mnist package); override with $FASHION_MNIST_DIR."

MEAN, STD = 0.2860, 0.3530


class Net(nn.Module):
    "The seed notebook's BatchNorm network; `in_channels` adapts its first conv to the data."
    def __init__(self, in_channels=3, n_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5, 1)
        self.bn1 = nn.BatchNorm2d(20)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.bn2 = nn.BatchNorm2d(50)
        self.conv3 = nn.Conv2d(50, 100, 5, 1)
        self.bn3 = nn.BatchNorm2d(100)
        self.pool = nn.AdaptiveAvgPool2d((1))
        self.fc1 = nn.Linear(100, 50)
        self.fc2 = nn.Linear(50, n_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.bn1(x)
        x = F.max_pool2d(x, 2, 2)
        x = F.relu(self.conv2(x))
        x = self.bn2(x)
        x = F.relu(self.conv3(x))
        x = self.bn3(x)
        x = self.pool(x)
        x = x.view(x.shape[0], -1)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return x


def _idx(path):
    with gzip.open(path, 'rb') as f: data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy())


def load_fashion_mnist(split='train', n=None, path=None):
    "Images (N, 1, 28, 28) normalised floats and labels (N,) int64; the first `n` when given."
    path = Path(path or FASHION_MNIST_DIR)
    prefix = {'train': 'train', 'valid': 't10k'}[split]
    files = [path / f'{prefix}-{kind}-idx{d}-ubyte.gz' for kind, d in (('images', 3), ('labels', 1))]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f'Fashion-MNIST not found ({", ".join(missing)}): on Debian run '
                                '`apt-get install -y dataset-fashion-mnist`, or set FASHION_MNIST_DIR to a '
                                'folder with the four idx .gz files')
    x, y = (_idx(f)[:n] for f in files)
    return ((x.float() / 255 - MEAN) / STD).unsqueeze(1), y.long()


class LabelledTensors(torch.utils.data.TensorDataset):
    "A tensor dataset of (input, label) that tells fastai's Learner its loss function and can `learn.export`."
    loss_func, n_inp = nn.CrossEntropyLoss(), 1

    def new_empty(self):
        "The same dataset without items (what `learn.export` keeps of the data)."
        return type(self)(*(t[:0] for t in self.tensors))


def fashion_mnist_dls(n_train=None, n_valid=None, bs=64, seed=0):
    "fastai DataLoaders over Fashion-MNIST (the first `n_train` / `n_valid` images)."
    from fastai.data.core import DataLoaders
    from fastai.torch_core import set_seed
    set_seed(seed)
    train, valid = (LabelledTensors(*load_fashion_mnist(s, n)) for s, n in (('train', n_train), ('valid', n_valid)))
    return DataLoaders.from_dsets(train, valid, bs=bs, device='cpu', num_workers=0)   # in-memory tensors
