"""Patterns where pruning would change the function: each must freeze (reason given) or prune exactly."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import max_rel_diff

from fasterai.graph import trace
from fasterai.pruner import Pruner


class Pair(nn.Module):
    "c1 (3 -> 8 channels) then `f`, then c2 reads the result; `extra` layers for the patterns that need them."
    def __init__(self, f, c2=None, **extra):
        super().__init__()
        self.c1, self.f = nn.Conv2d(3, 8, 1), f
        self.c2 = c2 or nn.Conv2d(8, 4, 1)
        for k, v in extra.items(): setattr(self, k, v)

    def forward(self, x):
        return self.c2(self.f(self, F.relu(self.c1(x))))


def alias_add(self, a):
    skip = self.id(a)
    a.add_(1)
    return skip


def view_then_add(self, a):
    f = a.flatten(1)
    a.add_(1)
    return f


def inplace_act(self, a):
    self.act(a)
    return a


def functional_weight(self, a):
    return a + F.relu(F.conv2d(a, self.c2.weight.new_ones(8, 8, 1, 1)))


CASES = {   # name: (model, input shape, a fragment of the reason c1's group is frozen with)
    'alias written in place': (Pair(alias_add, id=nn.Identity()), (2, 3, 8, 8), 'makes them non-zero in place'),
    'view taken before an in-place add': (Pair(view_then_add, c2=nn.Linear(8 * 64, 4)), (2, 3, 8, 8), 'non-zero in place'),
    'Hardsigmoid(inplace=True)': (Pair(inplace_act, act=nn.Hardsigmoid(inplace=True)), (2, 3, 8, 8), 'non-zero in place'),
    'Hardtanh(0.1, 1, inplace=True)': (Pair(inplace_act, act=nn.Hardtanh(0.1, 1., inplace=True)), (2, 3, 8, 8), 'non-zero in place'),
    'pooling channels-last': (Pair(lambda s, a: F.avg_pool2d(a.permute(0, 2, 3, 1), 3, 1, 1), c2=nn.Linear(8, 4)), (2, 3, 8, 8),
                              'pools or resizes along the channels'),
    'pooling a flattened map': (Pair(lambda s, a: F.max_pool1d(a.flatten(1), 3, 1, 1), c2=nn.Linear(8 * 4, 4)), (2, 3, 2, 2),
                                'pools or resizes along the channels'),
    'interpolating channels-last': (Pair(lambda s, a: F.interpolate(a.permute(0, 2, 3, 1), size=(16, 8)), c2=nn.Linear(8, 4)),
                                    (2, 3, 8, 8), 'pools or resizes along the channels'),
    'padding the channels': (Pair(lambda s, a: F.pad(a.permute(0, 2, 3, 1), (1, -1)), c2=nn.Linear(8, 4)), (2, 3, 8, 8),
                             'pads along the channels'),
    'cat of unlike layouts': (Pair(lambda s, a: torch.cat([a, a.transpose(1, 2)], 0)), (2, 3, 8, 8), 'different dims'),
    'a weight used by a function': (Pair(functional_weight), (2, 3, 8, 8), 'not an operation the channel graph knows'),
    'BatchNorm also on the input': (Pair(lambda s, a: s.bn(a) + s.bn(torch.ones_like(a)), bn=nn.BatchNorm2d(8)), (2, 3, 8, 8),
                                    'also called'),
}


@pytest.mark.parametrize('name', list(CASES))
def test_frozen_with_reason(name):
    model, shape, reason = CASES[name]
    (grp,) = [g for g in trace(model, shape).groups if any(s.module == 'c1' and s.role == 'out' for s in g.slices)]
    assert not grp.prunable and any(reason in r for r in grp.frozen), grp.frozen
    with torch.no_grad(): model.c1.weight[::2] = 0; model.c1.bias[::2] = 0
    pruned = Pruner(example_input=shape, verify=False).prune_model(model)
    assert pruned.c1.out_channels == 8


class LeafShared(nn.Module):
    "A conv used directly and inside a module kept whole."
    def __init__(self):
        super().__init__()
        self.conv, self.h1, self.h2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        self.block = nn.Sequential(self.conv, nn.ReLU())

    def forward(self, x):
        return self.h1(F.relu(self.conv(x))) + self.h2(self.block(x))


def test_module_shared_with_a_leaf_keeps_its_channels():
    (grp,) = [g for g in trace(LeafShared(), (2, 3, 8, 8), leaf_modules=['block']).groups
              if any(s.module == 'conv' for s in g.slices)]
    assert not grp.prunable


class Unbind(nn.Module):
    "unbind(0) drops the batch dim: the channels move from dim 1 to dim 0."
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a, b = F.relu(self.c1(x)).unbind(0)
        return self.c2(a) + self.c2(b)


def test_unbind_moves_the_channel_dim():
    torch.manual_seed(0)
    model = Unbind().eval()
    with torch.no_grad(): model.c1.weight[:3] = 0; model.c1.bias[:3] = 0
    pruned = Pruner(example_input=(2, 3, 4, 4), verify=False).prune_model(model)
    x = torch.randn(2, 3, 4, 4)
    assert pruned.c1.out_channels == 5 and max_rel_diff(model(x), pruned(x)) < 1e-5


def test_zero_keeping_inplace_write_into_a_view_stays_prunable():
    "EfficientNet's head: flatten, then Dropout(inplace=True) writes into the view; zeros stay zeros."
    model = Pair(lambda s, a: s.drop(F.adaptive_avg_pool2d(a, 1).flatten(1)), c2=nn.Linear(8, 4),
                 drop=nn.Dropout(0.2, inplace=True))
    (grp,) = [g for g in trace(model, (2, 3, 8, 8)).groups if any(s.module == 'c1' for s in g.slices)]
    assert grp.prunable
