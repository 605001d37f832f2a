import os
import tempfile
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

warnings.filterwarnings('ignore', category=FutureWarning, module='torch')
os.environ['FASTERAI_CACHE'] = tempfile.mkdtemp(prefix='fasterai-test-cache-')   # never a table timed before the run


class FlatNet(nn.Module):
    "conv-bn-relu, conv-relu-pool, flatten straight into a Linear (a block of 16 features per channel)."
    def __init__(self, c=3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(12 * 4 * 4, 20), nn.BatchNorm1d(20), nn.ReLU(),
                                  nn.Dropout(0.1), nn.Linear(20, 5))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x)


def randomize_norms(model, seed=0):
    "Give every BatchNorm, InstanceNorm and GroupNorm non-trivial affine parameters and running statistics."
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
            n = m.num_channels if isinstance(m, nn.GroupNorm) else m.num_features
            if m.weight is not None:
                m.weight.data = torch.rand(n, generator=g) + 0.5
                m.bias.data = torch.randn(n, generator=g)
            if getattr(m, 'running_mean', None) is not None:
                m.running_mean = torch.randn(n, generator=g)
                m.running_var = torch.rand(n, generator=g) + 0.5
    return model


def max_rel_diff(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()
