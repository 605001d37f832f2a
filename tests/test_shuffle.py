"""Channel shuffles (ShuffleNet V2): the channels a shuffle lays out prune exactly, with the width each stage keeps
chosen so that every kept channel still reaches the layers it reached, and the rows and columns of each layer
taken in the order the pruned shuffle lays them out."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import max_rel_diff, randomize_norms

from fasterai.export import pruned_config, rebuild_pruned
from fasterai.graph import trace
from fasterai.pruner import Pruner, kept_entries
from fasterai.report import count_params
from fasterai.sparsifier import Sparsifier
from fasterai.targets import RoutedTarget


def tiny(repeats=(2, 3, 2), widths=(8, 16, 32, 64, 96)):
    "torchvision's ShuffleNet V2 with small stages: its own blocks, shuffle and chunk."
    from torchvision.models import ShuffleNetV2
    torch.manual_seed(0)
    return randomize_norms(ShuffleNetV2(list(repeats), list(widths), num_classes=5)).eval()


def stage_widths(model):
    "The channels each stage writes, as the next layer reads them."
    return [model.stage3[0].branch1[0].in_channels, model.stage4[0].branch1[0].in_channels,
            model.conv5[0].in_channels]


@pytest.mark.parametrize('method', ['local', 'global'])
def test_shufflenet_prunes_the_channels_its_shuffles_lay_out(method):
    model, x = tiny(), torch.randn(2, 3, 32, 32)
    sp = Sparsifier(model, 'filter', method, 'l1', (nn.Conv2d, nn.Linear), example_input=x)
    routed = [t for t in sp.targets if isinstance(t, RoutedTarget)]
    assert len(routed) == 3 and not any('stage' in n for n in sp.frozen)   # one per stage, nothing frozen there
    sp.sparsify(40)
    with torch.no_grad(): ref = model(x)
    pruned = Pruner(example_input=x).prune_model(model)   # verified in eval and train mode
    with torch.no_grad(): assert max_rel_diff(ref, pruned(x)) < 1e-5
    assert all(a < b for a, b in zip(stage_widths(pruned), stage_widths(model)))
    assert count_params(pruned) < 0.75 * count_params(model)
    zero_rows = [n for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d) and (m.weight.flatten(1) == 0).all(1).any()]
    assert not zero_rows   # every filter the Sparsifier zeroed is gone: it zeroes only what a feasible width removes


def test_any_zero_channels_of_a_shuffled_stage_prune_exactly():
    "Zeros no feasible width matches (chosen by hand, not by the Sparsifier): the live ones keep their layers."
    model, x = tiny(), torch.randn(2, 3, 32, 32)
    g = trace(model, x)
    assert len(g.routes) == 3
    gen = torch.Generator().manual_seed(1)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for c in g.routes:
            for i in c.groups:
                for ch in torch.randperm(c.size, generator=gen)[:c.size // 3]:
                    for s in g.groups[i].slices:
                        if s.role in ('out', 'norm') and s.start <= ch < s.start + s.length:
                            m, at = modules[s.module], s.offset + ch - s.start
                            m.weight[at] = 0
                            if m.bias is not None: m.bias[at] = 0
        ref = model(x)
    pruned = Pruner(example_input=x).prune_model(model)
    with torch.no_grad(): assert max_rel_diff(ref, pruned(x)) < 1e-5
    assert stage_widths(pruned)[-1] < stage_widths(model)[-1]


def test_signatures_of_a_two_block_stage_at_a_smaller_width():
    """A stage of a stride-2 block (branches a and b, 4 channels each) and one stride-1 block. Shuffled, the first
    half of its 8 channels passes the second block (to the next layer), the second half is read by its branch.
    With 3 channels per branch: a0 b0 a1 | b1 a2 b2, so a keeps 2 passing and 1 read, b 1 and 2."""
    from torchvision.models.shufflenetv2 import InvertedResidual
    model = nn.Sequential(nn.Conv2d(3, 6, 1), InvertedResidual(6, 8, 2), InvertedResidual(8, 8, 1), nn.Conv2d(8, 2, 1))
    (c,) = trace(model, (1, 3, 8, 8)).routes
    a, b = (next(g.id for g in trace(model, (1, 3, 8, 8)).groups if any(s.module == f'1.{n}' and s.role == 'out'
                                                                        for s in g.slices))
            for n in ('branch1.2', 'branch2.5'))
    reads = lambda sig: any(m == '2.branch2.0' for (m, _), _ in sig)
    for k, (a_read, b_read) in {4: (2, 2), 3: (1, 2), 2: (1, 1), 1: (0, 1)}.items():
        cls = c.classes(k)
        assert sum(len(p) for (g, s), p in cls.items() if g == a and reads(s)) == a_read
        assert sum(len(p) for (g, s), p in cls.items() if g == b and reads(s)) == b_read
    assert c.widths() == [1, 2, 3, 4]


def test_round_to_keeps_a_multiple_per_branch():
    model, x = tiny(), torch.randn(2, 3, 32, 32)
    Sparsifier(model, 'filter', 'local', 'l1', (nn.Conv2d, nn.Linear), example_input=x, round_to=4).sparsify(40)
    pruned = Pruner(example_input=x).prune_model(model)
    assert all(w % 8 == 0 for w in stage_widths(pruned))   # two branches of a multiple of 4
    assert stage_widths(pruned)[-1] < stage_widths(model)[-1]


def _shuffle(y):
    n, c, h, w = y.shape
    return y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class _Shuffled(nn.Module):
    "Two convs concatenated and shuffled, then read as `how` says."
    def __init__(self, a=8, b=8, how='read'):
        super().__init__()
        self.a, self.b, self.how = nn.Conv2d(3, a, 1), nn.Conv2d(3, b, 1), how
        self.head = nn.Conv2d((a + b) // (2 if how == 'parts' else 1), 4, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        if self.how == 'twice': return self.head(_shuffle(y) + _shuffle(y))   # (two routes: not compared, frozen)
        if self.how == 'parts':
            z = _shuffle(y)
            n, c, h, w = z.shape
            return self.head(z.view(n, 2, c // 2, h, w).sum(1))
        return self.head(_shuffle(y))


@pytest.mark.parametrize('make, reason', [
    (lambda: _Shuffled(4, 8), 'a channel shuffle mixes channel spaces of different sizes'),
    (lambda: _Shuffled(how='twice'), 'merges channels a channel shuffle laid out with channels laid out otherwise'),
    (lambda: _Shuffled(how='parts'), 'reshapes channels a channel shuffle laid out into parts'),
])
def test_shuffles_the_graph_cannot_follow_freeze_with_the_reason(make, reason):
    model, x = make().eval(), torch.randn(2, 3, 4, 4)
    g = trace(model, x)
    frozen = [gr for gr in g.groups if any(s.module in ('a', 'b') and s.role == 'out' for s in gr.slices)]
    assert frozen and all(any(reason in r for r in gr.frozen) for gr in frozen)
    with torch.no_grad():
        model.a.weight[0] = 0; model.a.bias[0] = 0
        ref = model(x)
    pruned = Pruner(example_input=x).prune_model(model)
    with torch.no_grad(): assert max_rel_diff(ref, pruned(x)) < 1e-6
    assert pruned.a.out_channels == model.a.out_channels


def test_pruned_shufflenet_saves_rebuilds_and_carries_optimizer_state():
    model, x = tiny(), torch.randn(2, 3, 32, 32)
    Sparsifier(model, 'filter', 'local', 'l1', nn.Conv2d, example_input=x).sparsify(40)
    p = Pruner(example_input=x)
    pruned = p.prune_model(model)
    fresh = rebuild_pruned(tiny(), pruned_config(pruned))
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad(): assert max_rel_diff(pruned(x), fresh(x)) < 1e-6
    entries = kept_entries(model, p.kept)   # a permutation of rows is carried entry by entry
    name = 'conv5.0.weight'
    w = dict(model.named_parameters())[name]
    assert torch.equal(w.detach().flatten()[entries[name]].view_as(pruned.conv5[0].weight), pruned.conv5[0].weight)


def test_shufflenet_in_a_fastai_fit_then_learn_prune():
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from torch.utils.data import TensorDataset

    from fasterai.callback import SparsifyCallback
    torch.manual_seed(0)
    ds = lambda n: TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 5, (n,)))
    learn = Learner(DataLoaders.from_dsets(ds(32), ds(16), bs=16), tiny(), loss_func=nn.CrossEntropyLoss())
    learn.fit(2, 1e-3, cbs=SparsifyCallback(40, 'filter', layer_type=(nn.Conv2d, nn.Linear)))
    x = torch.randn(4, 3, 32, 32)
    learn.model.eval()
    with torch.no_grad(): ref = learn.model(x)
    dense = copy.deepcopy(learn.model)
    pruned = learn.prune()
    with torch.no_grad(): assert max_rel_diff(ref, pruned.eval()(x)) < 1e-5
    assert stage_widths(pruned)[-1] < stage_widths(dense)[-1]
    learn.fit(1, 1e-3)   # and it trains on


@pytest.mark.parametrize('budget', ['macs', 'params'])
def test_budget_on_shufflenet_counts_the_widths_its_shuffles_allow(budget):
    "The cost model steps a shuffled stage by feasible widths, as the Pruner will keep them: the budget is met."
    import torchvision

    from fasterai.budget import MACs, Params
    from fasterai.report import count_macs
    torch.manual_seed(0)
    model, shape = torchvision.models.shufflenet_v2_x0_5().eval(), (2, 3, 64, 64)
    target = MACs(0.5) if budget == 'macs' else Params(0.5)
    pr = Pruner(target=target, method='global', layer_type=(nn.Conv2d, nn.Linear), example_input=shape)
    pruned = pr.prune_model(model)
    real = count_macs(pruned, shape) / count_macs(model, shape) if budget == 'macs' else \
        count_params(pruned) / count_params(model)
    assert abs(real - 0.5) < 0.01 and abs(pr.reached - real) < 1e-9


def test_prune_every_prunes_shuffled_stages_through_a_fit():
    "SparsifyCallback(prune_every=1) prunes the model after each epoch: the shuffled stages shrink and it runs on."
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from torch.utils.data import TensorDataset

    from fasterai.callback import SparsifyCallback
    torch.manual_seed(0)
    ds = lambda n: TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 5, (n,)))
    learn = Learner(DataLoaders.from_dsets(ds(32), ds(16), bs=16), tiny(), loss_func=nn.CrossEntropyLoss())
    before = stage_widths(learn.model)
    learn.fit(2, 1e-3, cbs=SparsifyCallback(50, 'filter', layer_type=(nn.Conv2d, nn.Linear), prune_every=1))
    assert all(a < b for a, b in zip(stage_widths(learn.model), before))
    learn.model.eval()
    with torch.no_grad(): assert learn.model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
