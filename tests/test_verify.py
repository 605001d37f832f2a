"""The safety net: models built to defeat the channel graph end in a frozen group or a PruningError, never in a
returned model that computes otherwise; `verify` checks eval and train mode and every output."""
import collections
import dataclasses
import random
import types

import numpy as np

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from conftest import randomize_norms

from fasterai.errors import PruningError, TraceError
from fasterai.graph import trace
from fasterai.pruner import Pruner
from fasterai.sparsifier import Sparsifier
from fasterai.verify import check_same_function, mismatch, outputs

SHAPE = (2, 3, 8, 8)


class Pair(nn.Module):
    "c1 (3 -> 8 channels, every other one zeroed), ReLU, then `f` decides what c2 (8 -> 4) reads."
    def __init__(self, f):
        super().__init__()
        self.c1, self.c2, self.aux, self.f = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 2, 1), f
        self.c, self.shift = 8, torch.ones(1, 8, 1, 1)   # a channel count and a tensor set at construction
        with torch.no_grad(): self.c1.weight[::2] = 0; self.c1.bias[::2] = 0

    def forward(self, x):
        return self.f(self, F.relu(self.c1(x)))


def differs(model, pruned, training):
    "Whether the pruned model's outputs differ from the model's in a mode (dropout off, as verify runs them)."
    return mismatch(outputs(model, SHAPE, training), outputs(pruned, SHAPE, training)) is not None


# ---------------------------------------------------------------- what fx cannot see: only verify catches it
def alias_written_in_place(self, a):
    b = a.contiguous()   # the same tensor: fx records `b += 1` as `b + 1`, so the graph sees `a` unchanged
    b += 1
    return self.c2(a)


def alias_written_in_train_mode(self, a):
    if getattr(self, 'train' + 'ing'):   # a training read no scan of the source could see
        b = a.contiguous()
        b += 1
    return self.c2(a)


@pytest.mark.parametrize('f,mode', [(alias_written_in_place, 'eval'), (alias_written_in_train_mode, 'train')])
def test_verify_refuses_what_the_graph_cannot_see(f, mode):
    model = Pair(f)
    with pytest.raises(PruningError, match=f'in {mode} mode: output differs from the sparse one'):
        Pruner(example_input=SHAPE).prune_model(model)
    unchecked = Pruner(example_input=SHAPE, verify=False).prune_model(model)   # what verify stands between
    assert unchecked.c1.out_channels == 4 and differs(model, unchecked, mode == 'train')
    assert not differs(model, unchecked, False) or mode == 'eval'


# ---------------------------------------------------------------- training reads: both modes are traced
class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.aux = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)


class FlagByTrain(Base):
    "train() sets another flag that forward branches on."
    def train(self, mode=True):
        super().train(mode)
        self.use_aux = mode
        return self

    def forward(self, x):
        h = F.relu(self.a(x))
        return (self.b(h), self.aux(h)) if getattr(self, 'use_aux', False) else self.b(h)


class AuxMixin:
    def maybe_aux(self, h):
        return self.aux(h) if self.training else None


class TrailingMixin(Base, AuxMixin):
    "The mode is read in a mixin that comes after nn.Module in the MRO."
    def forward(self, x):
        h = F.relu(self.a(x))
        extra = self.maybe_aux(h)
        return self.b(h) if extra is None else (self.b(h), extra)


helpers = types.ModuleType('user_helpers')
exec('def aux_if_training(block, h):\n    return block.aux(h) if block.training else None', helpers.__dict__)


class ViaModule(Base):
    "The mode is read by a helper reached as an attribute of a module (utils.aux_if_training)."
    def forward(self, x):
        h = F.relu(self.a(x))
        extra = helpers.aux_if_training(self, h)
        return self.b(h) if extra is None else (self.b(h), extra)


class Hidden(Base):
    "The mode read under a computed name; in train mode an extra output, in a dict."
    def forward(self, x):
        h = F.relu(self.a(x))
        out = {'logits': self.b(h)}
        if getattr(self, 'train' + 'ing'): out['aux'] = self.aux(h).mean((2, 3))
        return out


@pytest.mark.parametrize('cls', [FlagByTrain, TrailingMixin, ViaModule, Hidden])
def test_train_only_readers_are_followed_and_verified(cls):
    torch.manual_seed(0)
    model = cls()
    (grp,) = [g for g in trace(model, SHAPE).groups if any(s.module == 'a' for s in g.slices)]
    assert {s.module for s in grp.slices} == {'a', 'b', 'aux'}   # the train-only reader is in the group
    Sparsifier(model, 'filter', example_input=SHAPE).sparsify(50)
    pruned = Pruner(example_input=SHAPE).prune_model(model)
    assert pruned.a.out_channels == 4 and pruned.aux.in_channels == 4
    assert not differs(model, pruned, False) and not differs(model, pruned, True)


# ---------------------------------------------------------------- channel counts read from attributes: frozen
ATTRIBUTE_CASES = {
    'a constant tensor set at construction': (lambda s, a: s.c2(a + s.shift), 'untracked per-channel tensor'),
    'a new tensor of the stored count': (lambda s, a: s.c2(a + a.new_ones(a.shape[0], s.c, a.shape[2], a.shape[3])),
                                         'untracked per-channel tensor'),
    'a reshape to the stored count': (lambda s, a: s.c2(a.reshape(a.shape[0], s.c, -1).view_as(a)), 'hard-codes size 8'),
    'halves by the stored count': (lambda s, a: s.c2(torch.cat([a[:, :s.c // 2], a[:, s.c // 2:]], 1)),
                                   'indexes the channels'),
}


@pytest.mark.parametrize('name', list(ATTRIBUTE_CASES))
def test_channel_counts_from_attributes_freeze(name):
    f, reason = ATTRIBUTE_CASES[name]
    model = Pair(f)
    (grp,) = [g for g in trace(model, SHAPE).groups if any(s.module == 'c1' and s.role == 'out' for s in g.slices)]
    assert not grp.prunable and any(reason in r for r in grp.frozen), grp.frozen
    for verify in (True, False):
        pruned = Pruner(example_input=SHAPE, verify=verify).prune_model(model)
        assert pruned.c1.out_channels == 8 and not differs(model, pruned, False) and not differs(model, pruned, True)


# ---------------------------------------------------------------- every output, structure included
Out = collections.namedtuple('Out', 'main aux')
Other = collections.namedtuple('Other', 'main aux')
t = torch.arange(6.).view(2, 3)


@pytest.mark.parametrize('got,expected', [
    ((t, [t, {'k': t + 1}]), "output[1][1]['k'] differs from the sparse one by 1"),
    ((t,), 'structured differently'),                                          # a missing output
    ((t, [t, {'k': t}], t), 'structured differently'),                         # an extra one
    ((t, [t, {'j': t}]), 'structured differently'),                            # a renamed key
    ((t, [t.view(3, 2), {'k': t}]), 'output[1][0] has shape (3, 2) where the sparse model gives (2, 3)'),
    ((t, [t, {'k': t.long()}]), "output[1][1]['k']"),                          # a dtype changed
    ((t, [t, {'k': None}]), "output[1][1]['k'] is None where the sparse model gives a tensor of shape (2, 3)"),
])
def test_mismatch_compares_every_output(got, expected):
    ref = (t, [t, {'k': t}])
    assert mismatch(ref, ref) is None
    assert expected in mismatch(ref, got)


def test_mismatch_compares_namedtuple_types_and_non_tensors():
    assert mismatch(Out(t, t), Out(t, t)) is None
    assert 'structured differently' in mismatch(Out(t, t), Other(t, t))
    assert 'structured differently' in mismatch(Out(t, t), (t, t))
    assert "is 3 where the sparse model gives 2" in mismatch((t, 2), (t, 3))


class Heads(nn.Module):
    "Returns a namedtuple in train mode, `n` outputs; a wrong `scale` on the auxiliary output alone."
    def __init__(self, n=2, scale=1.):
        super().__init__()
        self.conv, self.n, self.scale = nn.Conv2d(3, 4, 1), n, scale

    def forward(self, x):
        y = self.conv(x)
        if not self.training: return y
        return Out(y, y * self.scale) if self.n == 2 else (y,)


def test_check_same_function_sees_outputs_a_truncating_zip_would_drop():
    a, same = Heads(), Heads()
    same.load_state_dict(a.state_dict())
    check_same_function(a, same, SHAPE)
    b = Heads(scale=2.); b.load_state_dict(a.state_dict())
    with pytest.raises(PruningError, match=r'in train mode: output\.aux differs'):
        check_same_function(a, b, SHAPE)
    c = Heads(n=1); c.load_state_dict(a.state_dict())
    with pytest.raises(PruningError, match='in train mode: its output is structured differently'):
        check_same_function(a, c, SHAPE)


class Cancel(nn.Module):
    "Sums terms that cancel (1e4 * x0 - 1e4 * x0 + x1) in a given order: the same function, rounded differently."
    def __init__(self, order, k=1.):
        super().__init__()
        self.order, self.k = order, k

    def forward(self, x):
        terms = [1e4 * x[:, 0], -1e4 * x[:, 0], self.k * x[:, 1]]
        return sum(terms[i] for i in self.order)


def test_a_rounding_difference_is_checked_again_in_float64():
    x = torch.randn(SHAPE)
    a, b = Cancel((0, 1, 2)), Cancel((0, 2, 1))
    assert mismatch(outputs(a, x, False), outputs(b, x, False)) is not None   # float32 alone would refuse it
    check_same_function(a, b, x)   # float64 agrees: not a wrong model
    with pytest.raises(PruningError, match='differs from the sparse one'):
        check_same_function(a, Cancel((0, 2, 1), k=1.001), x)


# ---------------------------------------------------------------- train mode: no false alarm, nothing changed
class Noisy(nn.Module):
    "BatchNorm, stochastic depth and dropout: train mode is random and updates statistics."
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.depth, self.drop = torchvision.ops.StochasticDepth(0.5, 'row'), nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        h = h + self.depth(self.c2(h))
        return self.fc(self.drop(F.dropout(h.mean((2, 3)), 0.3, self.training)))


def test_train_mode_verify_has_no_false_alarm_and_changes_nothing():
    torch.manual_seed(0)
    model = randomize_norms(Noisy()).train()
    Sparsifier(model, 'filter', example_input=SHAPE).sparsify(50)
    before, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    pruned = Pruner(example_input=SHAPE).prune_model(model)   # the check ran in train mode: random and seeded
    assert torch.equal(rng, torch.get_rng_state()) and model.training and pruned.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    keep = model.bn.weight.detach() != 0
    assert torch.equal(pruned.bn.running_mean, model.bn.running_mean[keep])   # statistics put back in the copy
    assert int(pruned.bn.num_batches_tracked) == int(model.bn.num_batches_tracked)


# ---------------------------------------------------------------- auxiliary heads of torchvision
def test_googlenet_aux_heads_with_and_without_example_input():
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)).eval()
    Sparsifier(model, 'filter', example_input=(2, 3, 64, 64)).sparsify(30)
    for example in ((2, 3, 64, 64), None):   # None: the shape is guessed (224 x 224)
        pruned = Pruner(example_input=example).prune_model(model)
        assert pruned.aux1.conv.conv.in_channels < 512 and pruned.inception4a.branch1.conv.out_channels < 192
        for training in (False, True):
            x = torch.randn(2, 3, 64, 64)
            assert mismatch(outputs(model, x, training), outputs(pruned, x, training)) is None


def test_inception_v3_needs_an_input_it_trains_on():
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)).eval()
    with pytest.raises(TraceError, match='Inception3 in train mode.*the shape was guessed: pass an example_input'):
        Sparsifier(model, 'filter')
    shape = (2, 3, 299, 299)
    Sparsifier(model, 'filter', example_input=shape).sparsify(30)
    with pytest.raises(TraceError, match='the shape was guessed'):
        Pruner().prune_model(model)   # never a model whose auxiliary head reads removed channels
    pruned = Pruner(example_input=shape).prune_model(model)
    assert pruned.AuxLogits.conv0.conv.in_channels < 768
    x = torch.randn(shape)
    for training in (False, True):
        ref, got = outputs(model, x, training), outputs(pruned, x, training)
        assert type(got) is type(ref) and mismatch(ref, got, rtol=1e-3) is None


# ---------------------------------------------------------------- what the check leaves as it was, and odd outputs
class Counting(FlagByTrain):
    "Counts its training forwards in buffers and draws from Python's and NumPy's random streams."
    def __init__(self):
        super().__init__()
        self.register_buffer('steps', torch.zeros((), dtype=torch.long))
        self.register_buffer('fsteps', torch.zeros(()))

    def forward(self, x):
        if self.training:
            self.steps += 1; self.fsteps += 1
            random.random(); np.random.rand(); torch.rand(1)
        return super().forward(x)


def test_trace_and_prune_leave_the_model_and_random_streams_alone():
    torch.manual_seed(0)
    model = Counting().eval()
    Sparsifier(model, 'filter', example_input=SHAPE).sparsify(50)
    x = torch.randn(SHAPE)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = Pruner(example_input=x).prune_model(model)
    after = torch.get_rng_state(), random.getstate(), np.random.get_state()[1]
    assert torch.equal(states[0], after[0]) and states[1] == after[1] and (states[2] == after[2]).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and int(model.steps) == 0
    assert not model.training and model.use_aux is False   # its own train() ran again to put its state back
    assert not pruned.training and pruned.use_aux is False


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x.mul_(2))


def test_the_example_tensor_is_not_changed():
    x = torch.randn(SHAPE)
    x0 = x.clone()
    Pruner(example_input=x).prune_model(InPlace())
    assert torch.equal(x, x0)


class BatchNormHead(nn.Module):
    "BatchNorm1d after pooling: one value per channel with a batch of one."
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm1d(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.bn(F.relu(self.conv(x)).mean((2, 3))))


def test_an_example_the_model_cannot_train_on_is_a_trace_error():
    with pytest.raises(TraceError, match='fails to run in train mode on the example input.*a batch of two or more'):
        Pruner(example_input=(1, 3, 8, 8)).prune_model(BatchNormHead())
    Pruner(example_input=(2, 3, 8, 8)).prune_model(BatchNormHead())


def test_a_model_on_the_meta_device_is_refused():
    with pytest.raises(ValueError, match='on the meta device'):
        Pruner(example_input=SHAPE).prune_model(nn.Conv2d(3, 4, 1, device='meta'))


@dataclasses.dataclass
class DataOut:
    logits: torch.Tensor
    n: int


class ModelOutput(collections.OrderedDict):
    "A dict subclass such as Hugging Face's outputs."


@pytest.mark.parametrize('wrap', [
    lambda y: DataOut(y, 3), lambda y: ModelOutput(logits=y), lambda y: (y, y.detach().numpy()),
    lambda y: (y, y.sum().item()), lambda y: torch.fft.fft2(y),
    lambda y: y.masked_fill(torch.arange(4).view(1, -1, 1, 1) == 0, float('-inf')),
    lambda y: torch.cat([y, torch.full_like(y[:, :1], float('nan'))], 1)])
def test_outputs_of_every_kind_compare_without_false_alarm(wrap):
    torch.manual_seed(0)
    model = Pair(lambda s, a: wrap(s.c2(a)))
    pruned = Pruner(example_input=SHAPE).prune_model(model)
    assert pruned.c1.out_channels == 4


def test_mismatch_sees_non_finite_values_and_odd_containers():
    nan = torch.tensor([1., float('nan')])
    assert mismatch(nan, nan) is None and 'NaN or infinities' in mismatch(nan, torch.tensor([float('nan'), 1.]))
    assert 'differs' in mismatch(DataOut(t, 3), DataOut(t + 1, 3))
    assert 'structured differently' in mismatch(ModelOutput(a=t), {'a': t})
    assert 'is 4 where the sparse model gives 3' in mismatch(DataOut(t, 3), DataOut(t, 4))
    assert mismatch((t, 1.0), (t, 1.0 + 1e-7)) is None and 'differs' in mismatch((t, 1.0), (t, 1.1))


class CancelCast(Cancel):
    "Cancel, then a layer that needs float32 input: the float64 re-check cannot run."
    def __init__(self, order, k=1.):
        super().__init__(order, k)
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(super().forward(x).float())


def test_a_float64_recheck_that_cannot_run_reports_the_float32_difference():
    x = torch.randn(SHAPE)
    a, b = CancelCast((0, 1, 2)), CancelCast((0, 2, 1))
    b.load_state_dict(a.state_dict())
    with pytest.raises(PruningError, match=r'differs from the sparse one by .*a float64 re-check, to rule out '
                                           'rounding, could not run'):
        check_same_function(a, b, x)
