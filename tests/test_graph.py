import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from conftest import FlatNet

from fasterai.errors import TraceError
from fasterai.examples import Net
from fasterai.graph import trace
from fasterai.pruner import Pruner
from fasterai.sparsifier import Sparsifier


def roles(group):
    return sorted((s.module, s.role) for s in group.slices)


def test_seed_net_groups():
    g = trace(Net(3))
    assert [grp.size for grp in g.groups] == [20, 50, 100, 50, 10]
    assert roles(g.groups[0]) == [('bn1', 'norm'), ('conv1', 'out'), ('conv2', 'in')]
    assert roles(g.groups[2]) == [('bn3', 'norm'), ('conv3', 'out'), ('fc1', 'in')]
    assert [grp.prunable for grp in g.groups] == [True, True, True, True, False]
    assert g.groups[4].frozen == ['reaches the model output']
    assert not any(s.module == 'conv1' and s.role == 'in' for grp in g.groups for s in grp.slices)


def test_flatten_maps_a_channel_to_a_block_of_features():
    g = trace(FlatNet(), example_input=(2, 3, 8, 8))
    (fc_in,) = [s for grp in g.groups for s in grp.slices if s.module == 'head.1' and s.role == 'in']
    assert (fc_in.length, fc_in.block) == (12, 16)
    assert roles(g.groups[2]) == [('head.1', 'out'), ('head.2', 'norm'), ('head.5', 'in')]


def test_graph_prints_groups_and_reasons():
    text = repr(trace(Net(3)))
    assert 'ChannelGraph of Net: 5 groups, 4 prunable' in text
    assert 'conv1.out[0:20], bn1.norm[0:20], conv2.in[0:20]' in text
    assert 'frozen: reaches the model output' in text


class Sorted(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), 1))


def test_operation_outside_the_rules_freezes_what_it_touches():
    g = trace(Sorted(), (2, 3, 8, 8))
    (grp,) = [grp for grp in g.groups if ('a', 'out') in roles(grp)]
    assert grp.frozen == ["function 'cumsum' at 'cumsum' is not an operation the channel graph knows"]
    assert not any(('b', 'in') in roles(grp) for grp in g.groups), 'b reads untracked channels'


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else x.repeat(1, 2, 1, 1)[:, :4]


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.body, self.head = nn.Conv2d(3, 3, 1), nn.Sequential(nn.ReLU(), Branchy()), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def test_untraceable_model_names_the_module_and_the_way_out():
    with pytest.raises(TraceError, match=r"cannot trace Outer inside module 'body.1' \(Branchy\).*leaf_modules=\['body.1'\]"):
        trace(Outer(), (2, 3, 8, 8))
    for leaves in (['body.1'], 'body', Branchy):
        g = trace(Outer(), (2, 3, 8, 8), leaf_modules=leaves)
        assert not any(grp.prunable for grp in g.groups)
    with pytest.raises(ValueError, match='leaf_modules must hold'):
        trace(Outer(), (2, 3, 8, 8), leaf_modules=[3])


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.c(F.relu(self.b(torch.sigmoid(self.a(x)))))


def test_zero_moving_activation_freezes_the_group():
    g = trace(Gated(), (2, 3, 12, 12))
    (a_group,) = [grp for grp in g.groups if ('a', 'out') in roles(grp)]
    assert a_group.frozen == ["'b' reads them after 'sigmoid', which makes them non-zero"]
    s = Sparsifier(Gated(), example_input=(2, 3, 12, 12))
    assert [t.name for t in s.targets] == ['b'] and 'a' in s.frozen


class HardCoded(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.pool, self.fc = nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Linear(10, 2)

    def forward(self, x):
        return self.fc(self.pool(self.a(x)).view(-1, 10))


def test_hard_coded_channel_count_freezes():
    m = HardCoded()
    g = trace(m, (2, 3, 8, 8))
    assert any('hard-codes size 10' in r for grp in g.groups for r in grp.frozen)
    with torch.no_grad(): m.a.weight[:3] = 0; m.a.bias[:3] = 0
    assert Pruner(example_input=(2, 3, 8, 8)).prune_model(m).a.out_channels == 10


class Shared(nn.Module):
    "One conv applied twice: its input and output channels are the same channels."
    def __init__(self):
        super().__init__()
        self.a, self.c, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = F.relu(self.a(x))
        x = F.relu(self.c(x))
        return self.head(F.relu(self.c(x)))


def test_module_called_twice_unites_its_channels():
    torch.manual_seed(0)
    m = Shared()
    g = trace(m, (2, 3, 8, 8))
    (grp,) = [grp for grp in g.groups if ('a', 'out') in roles(grp)]
    assert roles(grp) == [('a', 'out'), ('c', 'in'), ('c', 'out'), ('head', 'in')]
    Sparsifier(m, example_input=(2, 3, 8, 8)).sparsify(50)
    p = Pruner(example_input=(2, 3, 8, 8)).prune_model(m)
    assert p.c.weight.shape == (4, 4, 3, 3)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(p(x), m(x), rtol=1e-5, atol=1e-6)


def test_shapes_come_from_meta_tensors_only(monkeypatch):
    import fasterai.tracing as G
    runs, init = [], G._Shapes.__init__
    monkeypatch.setattr(G._Shapes, '__init__', lambda self, root, graph, meta: (runs.append(meta), init(self, root, graph, meta))[1])
    g = trace(Net(3), torch.zeros(4, 3, 40, 40))
    assert g.input_shape == (4, 3, 40, 40) and runs == [True]


def test_bad_example_input_names_the_shape():
    with pytest.raises(TraceError, match=r'shape \(2, 5, 8, 8\)'):
        trace(Net(3), (2, 5, 8, 8))


class _Shortcuts(nn.Module):
    "Every shape shortcut of the meta propagation: Linear on 4-d maps, adaptive pools, layer_norm, pointwise ops."
    def __init__(self):
        super().__init__()
        self.c, self.lin = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 6)
        self.p1, self.p2, self.p3 = nn.AdaptiveAvgPool2d((None, 3)), nn.AdaptiveAvgPool2d(2), nn.AdaptiveAvgPool1d(4)
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x):
        h = self.c(x)
        t = self.lin(h.permute(0, 2, 3, 1))                                  # (N, H, W, 6)
        t = F.layer_norm(t, (6,)) * self.scale + 1.5
        t = F.gelu(torch.sigmoid(t) - t, approximate='tanh') / 2
        u = self.p1(h) + self.p2(h).mean((2, 3), keepdim=True)              # broadcast to (N, 8, H, 3)
        return t.sum((1, 2)), u.flatten(2), self.p3(h.flatten(2)), torch.add(h, 1, alpha=2) * 0.5


@pytest.mark.parametrize('make,shape', [(_Shortcuts, (2, 3, 9, 7)),
                                        (lambda: torchvision.models.convnext_tiny(), (1, 3, 64, 64)),
                                        (lambda: torchvision.models.efficientnet_b0(), (1, 3, 64, 64))])
def test_meta_shapes_equal_a_real_run(make, shape):
    "The shapes computed without running an op equal those of running the graph on real zeros."
    from fasterai.tracing import Leaves, _Shapes, hooks_taken_out, symbolic_trace
    model = make().eval()
    with hooks_taken_out(model) as hooks: graph = symbolic_trace(model, Leaves(()), hooks)
    _Shapes(model, graph, meta=True).run(torch.empty(shape, device='meta'))
    meta = {n.name: n.meta.get('shape') for n in graph.nodes}
    with torch.no_grad(): _Shapes(model, graph, meta=False).run(torch.zeros(shape))
    real = {n.name: n.meta.get('shape') for n in graph.nodes}
    assert meta == real and sum(isinstance(s, torch.Size) for s in real.values()) > 10


class LinearNorm(nn.Module):
    "LeViT's Linear + BatchNorm1d on tokens: the batch and token dims merged for the norm, then split back."
    def __init__(self, i, o):
        super().__init__()
        self.linear, self.bn = nn.Linear(i, o), nn.BatchNorm1d(o)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = LinearNorm(8, 16), LinearNorm(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        return self.c(h.view(-1, h.shape[-1])).view(x.shape[0], x.shape[1], 3)


def test_reshapes_of_the_dims_before_the_channels_keep_them():
    from conftest import max_rel_diff, randomize_norms
    model, x = randomize_norms(Tokens()).eval(), torch.randn(2, 5, 8)
    g = trace(model, x)
    assert [grp.prunable for grp in g.groups] == [True, True, False]   # a's and b's rows; the output
    assert {(s.module, s.role) for s in g.groups[0].slices} == {('a.linear', 'out'), ('a.bn', 'norm'), ('b.linear', 'in')}
    Sparsifier(model, 'filter', 'local', 'l1', nn.Linear, example_input=x).sparsify(50)
    pruned = Pruner(example_input=x).prune_model(model)
    assert (pruned.a.linear.out_features, pruned.b.linear.out_features) == (8, 4)
    y = torch.randn(3, 7, 8)
    with torch.no_grad(): assert max_rel_diff(model(y), pruned(y)) < 1e-5


class Clamped(nn.Module):
    "Clamps between two convs: by numbers, by one-value buffers (Gemma 4's clippable Linear), or off zero."
    def __init__(self, lo, hi, buffers=False):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 2, 1)
        self.lo, self.hi = lo, hi
        if buffers:
            self.register_buffer('lo_t', torch.tensor(lo)); self.register_buffer('hi_t', torch.tensor(hi))
        self.buffers_ = buffers

    def forward(self, x):
        y = self.a(x)
        y = torch.clamp(y, self.lo_t, self.hi_t) if self.buffers_ else y.clamp(self.lo, self.hi)
        return self.b(y)


@pytest.mark.parametrize('lo, hi, buffers, keeps', [(-1., 1., False, True), (-float('inf'), float('inf'), True, True),
                                                    (0.5, 2., False, False), (0.5, 2., True, False)])
def test_clamp_keeps_zeros_when_its_bounds_hold_zero(lo, hi, buffers, keeps):
    torch.manual_seed(0)
    model = Clamped(lo, hi, buffers).eval()
    (a_group,) = [grp for grp in trace(model, (2, 3, 8, 8)).groups if ('a', 'out') in roles(grp)]
    assert a_group.prunable == keeps
    if not keeps:
        assert len(a_group.frozen) == 1 and a_group.frozen[0].endswith('which makes them non-zero')
        return
    Sparsifier(model, example_input=(2, 3, 8, 8)).sparsify(50)
    pruned = Pruner(example_input=(2, 3, 8, 8)).prune_model(model)
    assert pruned.a.out_channels == 3
