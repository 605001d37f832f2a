"""Models that once pruned into something that failed or computed otherwise, and inputs once accepted silently."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import max_rel_diff, randomize_norms
from fastai.callback.schedule import SchedCos, SchedLin, combine_scheds

from fasterai.errors import TraceError
from fasterai.examples import Net
from fasterai.graph import trace
from fasterai.pruner import Pruner
from fasterai.schedules import resolve_schedule
from fasterai.sparsifier import Sparsifier, SparsifyCallback

SHAPE = (2, 3, 8, 8)


def prune_checked(model, shape=SHAPE, sparsity=50):
    """Sparsify at 'filter' where anything can be, zero half of every conv's rows by hand where nothing can,
    prune without the safety net, and return (sparse, pruned) in eval mode after comparing them."""
    torch.manual_seed(0)
    model = randomize_norms(model).eval()
    try:
        Sparsifier(model, 'filter', 'local', 'l1', layer_type=(nn.Conv2d, nn.Linear), example_input=shape).sparsify(sparsity)
    except ValueError as e:
        assert 'can be sparsified' in str(e)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Conv2d): m.weight[::2] = 0; m.bias[::2] = 0
    pruned = Pruner(example_input=shape, verify=False).prune_model(model).eval()
    x = torch.randn(shape)
    assert max_rel_diff(model(x), pruned(x)) < 1e-5
    return model, pruned


class TwiceOnInput(nn.Module):
    "One conv reads the network input and, later, tracked channels: its input columns must all stay."
    def __init__(self):
        super().__init__()
        self.a, self.c, self.head = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.c(x))) + self.head(F.relu(self.c(F.relu(self.a(x)))))


class TwiceOnCat(nn.Module):
    "One conv called on a plain tensor and on a concatenation laid out differently."
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 8, 1)
        self.d, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.c(F.relu(self.a(x)))
        z = self.c(torch.cat([F.relu(self.b(x)), F.relu(self.d(x))], 1))
        return self.head(F.relu(y)) + self.head(F.relu(z))


@pytest.mark.parametrize('cls', [TwiceOnInput, TwiceOnCat])
def test_module_called_twice_on_unlike_inputs(cls):
    _, pruned = prune_checked(cls())
    assert pruned.c.in_channels == (3 if cls is TwiceOnInput else 8)


class FanIn(nn.Module):
    "Reads its channel count as a number: b(h) / sqrt(C) changes when C does."
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.b(h) * h.shape[1] ** -0.5 + self.b(h) * h.size(1)


class ViewInplace(nn.Module):
    "Writes through a view: the channels stop being zero after the write."
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = F.relu(self.a(x))
        h.view(h.size(0), -1).add_(1)
        return self.b(h)


@pytest.mark.parametrize('cls', [FanIn, ViewInplace])
def test_hidden_uses_of_channels_freeze(cls):
    (grp,) = [g for g in trace(cls(), SHAPE).groups if any(s.module == 'a' and s.role == 'out' for s in g.slices)]
    assert not grp.prunable and grp.frozen
    _, pruned = prune_checked(cls())
    assert pruned.a.out_channels == 8


class NoAffine(nn.Module):
    def __init__(self, **bn):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8, **bn), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(self.bn(self.a(x)))


@pytest.mark.parametrize('bn,prunable', [(dict(affine=False), False), (dict(track_running_stats=False), True),
                                         (dict(affine=False, track_running_stats=False), True)])
def test_batchnorm_variants(bn, prunable):
    model = NoAffine(**bn)
    with torch.no_grad():
        if bn.get('track_running_stats', True): model.bn.running_mean.uniform_(-1, 1)
    (grp,) = [g for g in trace(model, SHAPE).groups if any(s.module == 'a' for s in g.slices)]
    assert grp.prunable == prunable
    if prunable:
        model.eval()
        Sparsifier(model, example_input=SHAPE).sparsify(50)
        pruned = Pruner(example_input=SHAPE, verify=False).prune_model(model)
        x = torch.randn(SHAPE)
        assert pruned.a.out_channels == 4 and max_rel_diff(model(x), pruned.eval()(x)) < 1e-5


class Acts(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.a, self.act, self.b = nn.Conv2d(3, 8, 1), act, nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(self.act(self.a(x)))


@pytest.mark.parametrize('act,prunable', [(nn.Hardtanh(0.1, 1.0), False), (nn.Hardtanh(), True), (nn.ReLU6(), True),
                                          (nn.AlphaDropout(0.2), False), (nn.Softplus(), False)])
def test_activation_zero_rules(act, prunable):
    (grp,) = [g for g in trace(Acts(act), SHAPE).groups if any(s.module == 'a' for s in g.slices)]
    assert grp.prunable == prunable


def test_float64_and_float16_models_trace_from_a_shape():
    model = Net(3).double()
    Sparsifier(model).sparsify(30)
    pruned = Pruner().prune_model(model)
    assert pruned.conv1.weight.dtype == torch.float64 and pruned.conv1.out_channels == 14
    assert len(trace(Net(3).half()).groups) == 5


class Tied(nn.Module):
    "Two layers hold one weight: slicing one would slice the other."
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


def test_tied_weights_freeze():
    g = trace(Tied(), (2, 6))
    assert all(not grp.prunable for grp in g.groups if any(s.module in 'ab' and s.role == 'out' for s in grp.slices))
    with pytest.raises(ValueError, match="'a': 'a' shares a parameter with 'b'"):
        Sparsifier(Tied(), layer_type=nn.Linear, example_input=(2, 6))


class Odd(nn.Module):
    "Ops the rules meet with arguments they do not expect: frozen, not an exception."
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = torch.cat(h.chunk(2, dim=2), dim=2)
        return self.b(h).mean(x.dim() - 1)


def test_unexpected_arguments_freeze_instead_of_raising():
    g = trace(Odd(), SHAPE)
    assert any('could not be followed' in r for grp in g.groups for r in grp.frozen)


def test_modes_of_submodules_are_restored():
    model = Net(3).train()
    model.bn2.eval()
    Sparsifier(model).sparsify(30)
    pruned = Pruner().prune_model(model)
    assert model.training and not model.bn2.training and model.bn1.training
    assert pruned.training and not pruned.bn2.training


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(50, 8), nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(F.relu(self.fc(self.emb(x))))


def test_verify_uses_the_example_tensor():
    torch.manual_seed(0)
    model = Tokens()
    x = torch.randint(0, 50, (2, 5))
    Sparsifier(model, layer_type=nn.Linear, example_input=x).sparsify(50)
    pruned = Pruner(example_input=x).prune_model(model)
    assert pruned.fc.out_features == 8 and max_rel_diff(model(x), pruned(x)) < 1e-5


def test_schedules_of_position_alone():
    f = resolve_schedule(combine_scheds([0.5, 0.5], [SchedLin(0, 10), SchedCos(10, 30)]))
    assert f(0, 99, 0.0) == pytest.approx(0) and f(0, 99, 0.5) == pytest.approx(10) and f(0, 99, 1.0) == pytest.approx(30)
    assert resolve_schedule(SchedCos(0, 30))(0, 0, 1 / 3) == pytest.approx(7.5)
    with pytest.raises(ValueError, match='f\\(start, end, pos\\) or f\\(pos\\)'):
        resolve_schedule(lambda a, b: a)


@pytest.mark.parametrize('kwargs,match', [
    (dict(layer_type='conv'), 'layer_type must be an nn.Module subclass'),
    (dict(granularity=(2, 2)), 'distinct weight dims'),
    (dict(granularity=(True,)), 'distinct weight dims'),
])
def test_callback_checks_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsifyCallback(30, **kwargs)


def test_sparsifier_argument_errors():
    import numpy as np
    s = Sparsifier(Net(3), 'weight')
    s.sparsify(np.float32(30))
    with pytest.raises(ValueError, match='criteria must return one score per weight'):
        Sparsifier(Net(3), 'weight', criteria=lambda w: w.sum()).sparsify(30)
    with pytest.raises(ValueError, match="layer 'pool' of layer_type has no weight"):
        Sparsifier(Net(3), layer_type=nn.AdaptiveAvgPool2d)
    with pytest.raises(ValueError, match='verify must be True or False'):
        Pruner(verify='no')
    with pytest.raises(ValueError, match='layer_type must be'):
        Pruner(sparsity=30, layer_type='conv')


def test_train_mode_failure_is_an_error_not_a_dropped_branch():
    "A branch that runs only in training and cannot run on the input: never pruned around (it reads the channels)."
    class AuxTooSmall(nn.Module):
        def __init__(self, k=5):
            super().__init__()
            self.a, self.b, self.aux = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, k)

        def forward(self, x):
            h = F.relu(self.a(x))
            return (self.b(h), self.aux(F.max_pool2d(h, 2))) if self.training else self.b(h)
    with pytest.raises(TraceError, match=r'in train mode on an input of shape \(2, 3, 6, 6\) failed.*pass an '
                                         'example_input AuxTooSmall runs on in train and eval mode'):
        trace(AuxTooSmall(), (2, 3, 6, 6))
    with pytest.raises(TraceError, match='in train mode.*the shape was guessed'):
        Pruner().prune_model(AuxTooSmall(k=120))   # the guessed (2, 3, 224, 224) pools to 111 x 111
    assert len(trace(AuxTooSmall(), (2, 3, 16, 16)).groups) == 3   # where the branch runs, it is followed


class Normed(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(3, 8, 1), norm, nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(F.relu(self.norm(self.a(x))))


@pytest.mark.parametrize('norm,prunable', [
    (lambda: nn.GroupNorm(8, 8), True), (lambda: nn.GroupNorm(8, 8, affine=False), True),
    (lambda: nn.GroupNorm(2, 8), False), (lambda: nn.InstanceNorm2d(8), True),
    (lambda: nn.InstanceNorm2d(8, affine=True, track_running_stats=True), True)])
def test_per_channel_norms_prune_and_grouped_statistics_freeze(norm, prunable):
    model = Normed(norm())
    (grp,) = [g for g in trace(model, SHAPE).groups if any(s.module == 'a' for s in g.slices)]
    assert grp.prunable == prunable, grp.frozen
    if not prunable:
        assert grp.frozen == ["GroupNorm 'norm' at 'norm' GroupNorm computes its statistics across the channels "
                              "of each of its 2 groups"]
        return
    torch.manual_seed(0)
    model = randomize_norms(model)
    Sparsifier(model, example_input=SHAPE).sparsify(50)
    pruned = Pruner(example_input=SHAPE, verify=False).prune_model(model)
    x = torch.randn(SHAPE)
    for mode in ('train', 'eval'):
        getattr(model, mode)(); getattr(pruned, mode)()
        assert pruned.a.out_channels == 4 and max_rel_diff(model(x), pruned(x)) < 1e-5, mode


def _aux_head(block, h):
    "A helper outside the module's class that branches on the mode."
    return block.aux(h.mean((2, 3))) if block.training else None


class HelperAux(nn.Module):
    "A train-only branch decided in a free function: the train trace must still run and freeze what it reads."
    def __init__(self):
        super().__init__()
        self.a, self.b, self.aux = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1), nn.Linear(8, 8)

    def forward(self, x):
        h = F.relu(self.a(x))
        extra = _aux_head(self, h)
        return self.b(h) if extra is None else (self.b(h), extra)


def test_both_modes_are_traced_and_an_identical_graph_followed_once(monkeypatch):
    from fasterai import graph as graph_module
    modes, visits = [], []
    real, real_visit = graph_module.training_mode, graph_module._Context.visit
    def spy(model, training):
        modes.append(training)
        return real(model, training)
    def visit(self, node):
        visits.append(node.name)
        return real_visit(self, node)
    monkeypatch.setattr(graph_module, 'training_mode', spy)
    monkeypatch.setattr(graph_module._Context, 'visit', visit)
    g = trace(HelperAux(), (2, 3, 8, 8))
    assert modes == [False, True]
    (grp,) = [x for x in g.groups if any(s.module == 'a' for s in x.slices)]
    assert {s.module for s in grp.slices} == {'a', 'b', 'aux'}   # seen only by the train-mode trace
    modes.clear(); visits.clear()
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    trace(seq, (2, 3, 8, 8))
    assert modes == [False, True] and len(visits) == len(set(visits)) == 7   # torch.nn layers are leaves