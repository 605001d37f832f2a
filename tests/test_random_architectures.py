"""Property: any network built from the supported blocks, sparsified at any level, prunes to the same function.

Hypothesis draws the blocks (chains, residual adds, concatenations, depthwise and grouped convs,
squeeze-excitation, per-channel and frozen norms), their sizes, the head (global pooling or a flatten into
Linear layers), the sparsity, method and criterion. The examples are the same on every run (derandomized,
so CI is stable); FASTERAI_HYPOTHESIS_RANDOM=1 explores new ones. A failing example found either way is
added below with @example as a regression test.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import max_rel_diff, randomize_norms
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fasterai.pruner import Pruner
from fasterai.report import count_params
from fasterai.sparsifier import Sparsifier

ACTS = {'relu': nn.ReLU, 'silu': nn.SiLU, 'gelu': nn.GELU, 'sigmoid': nn.Sigmoid, 'relu6': nn.ReLU6}


class Chain(nn.Module):
    def __init__(self, cin, cout, k, act, norm):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=not norm)
        self.norm = {'bn': nn.BatchNorm2d(cout), 'gn1': nn.GroupNorm(cout, cout), 'none': nn.Identity(),
                     'gn2': nn.GroupNorm(1, cout)}[norm]
        self.act = ACTS[act]()

    def forward(self, x): return self.act(self.norm(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, c, hidden):
        super().__init__()
        self.a, self.b = Chain(c, hidden, 3, 'relu', 'bn'), nn.Sequential(nn.Conv2d(hidden, c, 1), nn.BatchNorm2d(c))

    def forward(self, x): return F.relu(x + self.b(self.a(x)))


class Concat(nn.Module):
    def __init__(self, c, grow):
        super().__init__()
        self.a = Chain(c, grow, 3, 'relu', 'bn')

    def forward(self, x): return torch.cat([x, self.a(x)], 1)


class Depthwise(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw, self.bn = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c)

    def forward(self, x): return F.relu6(self.bn(self.dw(x)))


class Grouped(nn.Module):
    def __init__(self, c, groups, mult):
        super().__init__()
        self.expand = Chain(c, groups * mult, 1, 'relu', 'bn')
        self.conv, self.bn = nn.Conv2d(groups * mult, groups * mult, 3, padding=1, groups=groups), nn.BatchNorm2d(groups * mult)
        self.project = nn.Conv2d(groups * mult, c, 1)

    def forward(self, x): return x + self.project(F.relu(self.bn(self.conv(self.expand(x)))))


class SE(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x): return x * torch.sigmoid(self.expand(F.silu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))


class RandomNet(nn.Module):
    def __init__(self, spec, head, n_out=5):
        super().__init__()
        c, blocks = 3, []
        for kind, *args in spec:
            if kind == 'chain': blocks.append(Chain(c, *args)); c = args[0]
            elif kind == 'residual': blocks.append(Residual(c, *args))
            elif kind == 'concat': blocks.append(Concat(c, *args)); c += args[0]
            elif kind == 'depthwise': blocks.append(Depthwise(c))
            elif kind == 'grouped': blocks.append(Grouped(c, *args))
            elif kind == 'se': blocks.append(SE(c, *args))
        self.blocks, self.head_kind = nn.Sequential(*blocks), head
        self.head = (nn.Linear(c, n_out) if head == 'pool' else
                     nn.Sequential(nn.Flatten(), nn.Linear(4 * c, 12), nn.ReLU(), nn.Linear(12, n_out)))

    def forward(self, x):
        x = self.blocks(x)
        if self.head_kind == 'pool': return self.head(x.mean((2, 3)))
        return self.head(F.adaptive_avg_pool2d(x, 2))


sizes = st.integers(2, 12)
block = st.one_of(
    st.tuples(st.just('chain'), sizes, st.sampled_from([1, 3]), st.sampled_from(sorted(ACTS)),
              st.sampled_from(['bn', 'gn1', 'gn2', 'none'])),
    st.tuples(st.just('residual'), sizes),
    st.tuples(st.just('concat'), sizes),
    st.tuples(st.just('depthwise')),
    st.tuples(st.just('grouped'), st.integers(1, 4), st.integers(1, 4)),
    st.tuples(st.just('se'), st.integers(1, 4)),
)
FIRST = st.tuples(st.just('chain'), sizes, st.just(3), st.just('relu'), st.just('bn'))


@settings(max_examples=250, deadline=None, derandomize=os.environ.get('FASTERAI_HYPOTHESIS_RANDOM') != '1',
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.tuples(FIRST).flatmap(lambda f: st.lists(block, max_size=5).map(lambda rest: [f[0], *rest])),
       head=st.sampled_from(['pool', 'flatten']), sparsity=st.floats(5, 95),
       method=st.sampled_from(['local', 'global']), criteria=st.sampled_from(['l1', 'l2', 'random', 'small_final']))
@example(spec=[('chain', 4, 3, 'relu', 'bn'), ('grouped', 2, 2), ('se', 2)], head='flatten', sparsity=50.,
         method='global', criteria='l1')
def test_random_network_prunes_to_the_same_function(spec, head, sparsity, method, criteria):
    torch.manual_seed(0)
    model = randomize_norms(RandomNet(spec, head)).eval()
    shape = (2, 3, 6, 6)
    dense = count_params(model)
    sp = Sparsifier(model, 'filter', method, criteria, layer_type=(nn.Conv2d, nn.Linear), example_input=shape)
    sp.sparsify(sparsity)
    pruned = Pruner(example_input=shape, verify=False).prune_model(model)
    x = torch.randn(shape)
    for mode in ('eval', 'train'):
        getattr(model, mode)(); getattr(pruned, mode)()
        with torch.no_grad():
            assert max_rel_diff(model(x), pruned(x)) < 1e-4, mode
    assert (count_params(pruned) < dense) == (sum(sp.counts) > 0)   # whatever was zeroed is removed
