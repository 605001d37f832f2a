"""The registry of layer kinds: a user's own layers, registered in a line, sparsify and prune exactly; an unknown
subclass of a known layer is frozen with a reason that says how to register it; a wrong registration is caught."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import randomize_norms

from fasterai.errors import PruningError
from fasterai.export import pruned_config, rebuild_pruned
from fasterai.graph import trace
from fasterai.layers import LAYERS, kind_of, register_layer, register_op
from fasterai.pruner import Pruner
from fasterai.sparsifier import Sparsifier
from fasterai.verify import mismatch, outputs

SHAPE = (2, 3, 12, 12)


class WSConv2d(nn.Conv2d):
    "Weight standardisation (Qiao et al. 2019, arXiv 1903.10520): each row normalised over all its inputs."
    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ClaimsInputs(WSConv2d):
    "The same layer, registered as if it could lose input channels: it cannot."


class ConvBNReLU(nn.Module):
    "A conv, BatchNorm and ReLU fused into one module that holds every tensor itself."
    def __init__(self, cin, cout, k=3):
        super().__init__()
        self.in_channels, self.out_channels, self.groups, self.k = cin, cout, 1, k
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5)
        self.bn_weight, self.bn_bias = nn.Parameter(torch.rand(cout) + 0.5), nn.Parameter(torch.randn(cout))
        self.register_buffer('running_mean', torch.randn(cout))
        self.register_buffer('running_var', torch.rand(cout) + 0.5)

    def forward(self, x):
        y = F.conv2d(x, self.weight, padding=self.k // 2)
        y = F.batch_norm(y, self.running_mean, self.running_var, self.bn_weight, self.bn_bias, self.training)
        return F.relu(y)


register_layer(WSConv2d, like=nn.Conv2d, inputs=False)
register_layer(ClaimsInputs, like=nn.Conv2d)
register_layer(ConvBNReLU, like=nn.Conv2d, vectors=('bn_weight', 'bn_bias'), buffers=('running_mean', 'running_var'))


class Net(nn.Module):
    def __init__(self, conv=WSConv2d):
        super().__init__()
        self.stem = ConvBNReLU(3, 16)
        self.ws, self.bn = conv(16, 24, 3, padding=1), nn.BatchNorm2d(24)
        self.fused = ConvBNReLU(24, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.fused(F.relu(self.bn(self.ws(x))))
        return self.head(x.mean((2, 3)))


def test_registered_layers_sparsify_and_prune_exactly():
    torch.manual_seed(0)
    model = randomize_norms(Net())
    groups = trace(model, SHAPE).groups
    stem = next(g for g in groups if any(s.module == 'stem' and s.role == 'out' for s in g.slices))
    assert not stem.prunable and 'inputs=False' in stem.frozen[0]   # read by the standardised conv
    Sparsifier(model, 'filter', layer_type=(nn.Conv2d, ConvBNReLU), example_input=SHAPE).sparsify(50)
    pruned = Pruner(example_input=SHAPE).prune_model(model)   # verifies both modes itself
    assert (pruned.stem.out_channels, pruned.ws.in_channels, pruned.ws.out_channels) == (16, 16, 12)
    assert (pruned.fused.in_channels, pruned.fused.out_channels, pruned.head.in_features) == (12, 16, 16)
    assert pruned.fused.weight.shape == (16, 12, 3, 3) and pruned.fused.running_var.shape == (16,)
    for training in (False, True):
        assert mismatch(outputs(model, SHAPE, training), outputs(pruned, SHAPE, training)) is None
    config = pruned_config(pruned)   # export reads the same description
    assert config['fused']['attrs'] == {'out_channels': 16, 'in_channels': 12, 'groups': 1}
    fresh = rebuild_pruned(Net(), config)
    fresh.load_state_dict(pruned.state_dict())


def test_a_wrong_registration_is_caught_by_verify():
    torch.manual_seed(0)
    model = randomize_norms(Net(conv=ClaimsInputs))
    Sparsifier(model, 'filter', layer_type=(nn.Conv2d, ConvBNReLU), example_input=SHAPE).sparsify(50)
    with pytest.raises(PruningError, match='differs from the sparse one'):
        Pruner(example_input=SHAPE).prune_model(model)


class Unknown(nn.Conv2d):
    "A subclass nobody registered."
    def forward(self, x): return super().forward(x) * 2


def test_an_unknown_subclass_is_frozen_with_how_to_register_it():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), Unknown(8, 4, 1))
    text = str(trace(model, SHAPE))
    assert "is a subclass of Conv2d that fasterai does not know" in text
    assert 'fasterai.register_layer(Unknown, like=nn.Conv2d)' in text
    assert not any(g.prunable for g in trace(model, SHAPE).groups)


@pytest.mark.parametrize('args,kwargs,match', [
    ((int,), {'like': nn.Conv2d}, 'takes an nn.Module subclass'),
    ((Unknown,), {'like': nn.LSTM}, 'like must be a registered layer type'),
    ((Unknown,), {'like': nn.Conv2d, 'input': False}, r"unknown LayerKind fields \['input'\]"),
    ((Unknown,), {'inputs': False}, 'needs like=<a registered type> or every required LayerKind field'),
])
def test_register_layer_refuses_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        register_layer(*args, **kwargs)
    assert Unknown not in LAYERS


def test_the_built_in_kinds_describe_their_tensors():
    assert kind_of(nn.ConvTranspose2d(4, 8, 3)).rows('out') == [('weight', 1), ('bias', 0)]
    assert kind_of(nn.BatchNorm2d(4)).rows('norm') == [('weight', 0), ('bias', 0)]
    bn = nn.BatchNorm2d(4, affine=False)
    assert [n for n, _ in kind_of(bn).zero_when_dead(bn, 'norm')] == ['running_mean']
    assert kind_of(nn.GroupNorm(4, 4)).channels(nn.GroupNorm(4, 4), 'norm') == 4
    assert kind_of(Unknown(3, 4, 1)) is None


class Squares(nn.Module):
    "Squares its channels with a function and with a method: both keep a zero channel zero."
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(self.b(torch.square(self.a(x))).square())


def test_register_op_teaches_a_function_and_a_method():
    from fasterai.ops import FUNCTION_RULES, METHOD_RULES
    saved = dict(FUNCTION_RULES), dict(METHOD_RULES)
    try:
        assert not any(g.prunable for g in trace(Squares(), SHAPE).groups)   # unknown: frozen
        register_op(torch.square, like=F.relu); register_op('square', like='relu')
        torch.manual_seed(0)
        model = Squares()
        Sparsifier(model, 'filter', example_input=SHAPE).sparsify(50)
        pruned = Pruner(example_input=SHAPE).prune_model(model)
        assert (pruned.a.out_channels, pruned.b.out_channels) == (4, 4)
        with pytest.raises(ValueError, match='like must be a function or method name fasterai knows'):
            register_op(torch.square, like=torch.square_)
    finally:
        FUNCTION_RULES.clear(); FUNCTION_RULES.update(saved[0]); METHOD_RULES.clear(); METHOD_RULES.update(saved[1])


def test_an_unknown_layer_reading_the_input_is_reported():
    "No tracked channel reaches the first layer: its reason is still recorded, with the hint."
    model = nn.Sequential(Unknown(3, 8, 3), nn.ReLU(), Unknown(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match=r"'0': .*register_layer\(Unknown, like=nn.Conv2d\)"):
        Sparsifier(model, 'filter', example_input=SHAPE)
    assert 'not followed' in str(trace(model, SHAPE))


def test_parametrized_and_lazy_layers_get_a_clear_refusal():
    from torch.nn.utils import parametrize

    class Identity(nn.Module):
        def forward(self, w): return w
    conv = nn.Conv2d(8, 4, 1)
    parametrize.register_parametrization(conv, 'weight', Identity())
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), conv)
    assert 'remove the parametrizations' in str(trace(model, SHAPE))
    with pytest.raises(ValueError, match='parametrize makes for one module'):
        register_layer(type(conv), like=nn.Conv2d)
    with pytest.raises(ValueError, match='not initialised yet .*run one forward pass first'):
        Pruner(example_input=SHAPE).prune_model(nn.Sequential(nn.LazyConv2d(4, 3)))


def test_sync_batchnorm_is_a_batchnorm():
    "What fastai's distrib_ctx(sync_bn=True) makes of a model: its SyncBatchNorms follow channels as BatchNorms do."
    from conftest import max_rel_diff, randomize_norms
    from fasterai.examples import Net
    torch.manual_seed(0)
    model = randomize_norms(nn.SyncBatchNorm.convert_sync_batchnorm(Net(3)))
    assert type(model.bn1) is nn.SyncBatchNorm
    Sparsifier(model, 'filter', 'local', 'l1').sparsify(40)
    pruned = Pruner().prune_model(model)   # outside a process group it runs on the CPU in both modes
    assert (pruned.conv1.out_channels, pruned.bn1.num_features) == (12, 12) and type(pruned.bn1) is nn.SyncBatchNorm
    x = torch.randn(2, 3, 64, 64)
    model.eval(); pruned.eval()
    assert max_rel_diff(model(x), pruned(x)) < 1e-5
