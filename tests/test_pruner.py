import io

import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import FlatNet, max_rel_diff, randomize_norms

from fasterai.errors import PruningError
from fasterai.examples import Net
from fasterai.pruner import Pruner
from fasterai.verify import check_same_function
from fasterai.report import count_params
from fasterai.sparsifier import Sparsifier


def params_by_layer(model):
    return {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_children()}


def test_seed_net_parameter_counts():
    torch.manual_seed(0)
    model = randomize_norms(Net(3))
    Sparsifier(model, 'filter', 'local', 'l1').sparsify(30)
    pruned = Pruner().prune_model(model)
    counts = params_by_layer(pruned)
    assert {k: counts[k] for k in ('conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3')} == \
        dict(conv1=1064, bn1=28, conv2=12285, bn2=70, conv3=61320, bn3=140)
    assert pruned.fc1.in_features == 70 and pruned.fc1.weight.shape == (50, 70)
    assert type(pruned) is Net


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_pruned_computes_the_sparse_function(mode):
    torch.manual_seed(0)
    model = randomize_norms(Net(3))
    Sparsifier(model, 'filter', 'global', 'l2').sparsify(45)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = Pruner().prune_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), 'input model changed'
    assert count_params(pruned) < count_params(model)
    getattr(model, mode)(); getattr(pruned, mode)()
    x = torch.randn(8, 3, 32, 32) * 3
    assert max_rel_diff(model(x), pruned(x)) < 1e-5


def test_flatten_into_linear_and_batchnorm1d():
    torch.manual_seed(0)
    model = randomize_norms(FlatNet())
    Sparsifier(model, 'filter', 'local', layer_type=(nn.Conv2d, nn.Linear), example_input=(2, 3, 8, 8)).sparsify(40)
    pruned = Pruner(example_input=(2, 3, 8, 8)).prune_model(model).eval()
    assert pruned.conv2.out_channels == 7 and pruned.head[1].in_features == 7 * 16
    assert pruned.head[1].out_features == 12 and pruned.head[2].num_features == 12
    x = torch.randn(4, 3, 8, 8)
    assert max_rel_diff(model.eval()(x), pruned(x)) < 1e-5


def test_no_zeros_gives_an_equal_copy():
    model = Net(3).eval()
    pruned = Pruner().prune_model(model)
    assert pruned is not model and params_by_layer(pruned) == params_by_layer(model)
    x = torch.randn(2, 3, 28, 28)
    assert torch.equal(model(x), pruned(x))
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), pruned.parameters()))


def test_live_norm_keeps_the_channel():
    "A zero conv row whose BatchNorm still adds a shift feeds a constant: removing it would change outputs."
    torch.manual_seed(0)
    model = randomize_norms(Net(3)).eval()
    with torch.no_grad():
        model.conv2.weight[:5] = 0; model.conv2.bias[:5] = 0       # bn2 beta stays non-zero
        model.conv3.weight[:4] = 0; model.conv3.bias[:4] = 0
        model.bn3.bias[:4] = 0; model.bn3.weight[:2] = 0
    pruned = Pruner().prune_model(model)
    assert pruned.conv2.out_channels == 50 and pruned.conv3.out_channels == 98
    x = torch.randn(2, 3, 28, 28)
    assert max_rel_diff(model(x), pruned.eval()(x)) < 1e-5


@pytest.mark.parametrize('arch', ['vgg16', 'vgg16_bn'])
@pytest.mark.parametrize('method', ['local', 'global'])
def test_vgg(arch, method):
    torch.manual_seed(0)
    model = randomize_norms(getattr(torchvision.models, arch)(weights=None)).eval()
    shape = (2, 3, 32, 32)
    Sparsifier(model, 'filter', method, 'l1', example_input=shape).sparsify(30)
    pruned = Pruner(example_input=shape).prune_model(model)
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    if method == 'local':
        assert [c.out_channels for c in convs] == [45, 45, 90, 90, 179, 179, 179, 358, 358, 358, 358, 358, 358]
    assert pruned.classifier[0].in_features == convs[-1].out_channels * 49
    assert count_params(pruned) < 0.8 * count_params(model)
    x = torch.randn(shape)
    assert max_rel_diff(model(x), pruned(x)) < 1e-4


def test_check_same_function_catches_a_wrong_model():
    a, b = Net(3), Net(3)
    with pytest.raises(PruningError, match='in eval mode: output differs from the sparse one'):
        check_same_function(a, b, (2, 3, 28, 28))
    c = Net(3)
    c.fc1 = nn.Linear(99, 50)
    with pytest.raises(PruningError, match='fails to run'):
        check_same_function(a, c, (2, 3, 28, 28))


def test_pruned_model_saves_and_loads():
    torch.manual_seed(0)
    model = Net(3)
    Sparsifier(model).sparsify(50)
    pruned = Pruner().prune_model(model).eval()
    buf = io.BytesIO()
    torch.save(pruned, buf); buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 3, 28, 28)
    assert torch.equal(loaded(x), pruned(x))


def test_one_shot_pruning_reuses_the_sparsifier_scoring():
    torch.manual_seed(0)
    model = randomize_norms(Net(3))
    pruned = Pruner(sparsity=30, criteria='l1').prune_model(model)
    assert [pruned.conv1.out_channels, pruned.conv2.out_channels, pruned.conv3.out_channels] == [14, 35, 70]
    assert (model.conv1.weight != 0).all(), 'the input model stays dense'
    ref = Net(3)
    ref.load_state_dict(model.state_dict())
    Sparsifier(ref, 'filter', 'local', 'l1').sparsify(30)
    x = torch.randn(4, 3, 28, 28)
    assert max_rel_diff(ref.eval()(x), pruned.eval()(x)) < 1e-5
    with pytest.raises(ValueError, match='unknown criteria'):
        Pruner(sparsity=30, criteria='l0')
    with pytest.raises(ValueError, match='sparsity must be a percentage'):
        Pruner(sparsity=300)


def test_one_shot_leaves_the_model_and_shares_no_tensor():
    torch.manual_seed(0)
    model = Net(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = Pruner(sparsity=40, layer_type=(nn.Conv2d, nn.Linear)).prune_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    mine = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert not mine & {t.untyped_storage().data_ptr() for t in pruned.state_dict().values()}
    assert pruned.conv2.out_channels == 30 and model.conv2.out_channels == 50


def test_masked_values_come_back_after_an_error():
    from fasterai.pruner import _masked
    model = Net(3)
    before = model.conv1.weight.detach().clone()
    keep = torch.ones(20, 1, 1, 1, dtype=torch.bool)
    keep[:5] = False
    with pytest.raises(RuntimeError, match='boom'):
        with _masked(model, {'conv1.weight': keep}):
            assert (model.conv1.weight[:5] == 0).all()
            raise RuntimeError('boom')
    assert torch.equal(model.conv1.weight, before)


class ConvNormConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn, self.d = nn.Conv2d(3, 10, 3), nn.BatchNorm2d(10), nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.d(torch.relu(self.bn(self.c(x))))


def test_copy_zeroes_the_masked_rows_it_must_keep():
    """Pruning from masks never applies them to the user's model: the rows they drop count as zero. A masked
    row the copy keeps is zeroed in it. Here masks drop channels 0-4 and channels 5-9 are zero already, so
    every channel is dead and the layer keeps its first one, a masked one, which must be zero in the copy."""
    from fasterai.graph import trace
    from fasterai.pruner import _pruned_copy, plan
    torch.manual_seed(0)
    model = randomize_norms(ConvNormConv()).eval()
    with torch.no_grad():
        for t in (model.c.weight, model.c.bias, model.bn.weight, model.bn.bias): t[5:] = 0
    keep = torch.arange(10) >= 5
    masks = {'c.weight': keep.view(-1, 1, 1, 1), 'c.bias': keep, 'bn.weight': keep, 'bn.bias': keep}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = _pruned_copy(model, plan(trace(model, (2, 3, 8, 8)), masks), masks)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert pruned.c.out_channels == 1 and not pruned.c.weight.any() and not pruned.bn.weight.any()
    sparse = ConvNormConv().eval()
    sparse.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, k in masks.items(): sparse.get_parameter(name).mul_(k)
    x = torch.randn(4, 3, 8, 8)
    assert max_rel_diff(sparse(x), pruned.eval()(x)) < 1e-5


class _Odd(nn.Module):
    "A module with its own copy protocol, a shared child, a list holding a child, and a plain attribute."
    copies = 0

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.again, self.chain, self.sizes = self.a, [self.a], [1, 2]

    def __deepcopy__(self, memo):
        _Odd.copies += 1
        new = _Odd()
        memo[id(self)] = new
        return new


def test_copy_modules_copies_as_deepcopy_does():
    from fasterai.pruner import copy_modules
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
            self.tied, self.stages, self.meta = self.body[0], [self.body], {'k': [1, 2]}
            self.odd = _Odd()
            self.register_buffer('steps', torch.zeros(1))
            self.body.register_forward_hook(lambda m, i, o: None)
    model = Holder()
    copied = copy_modules(model, {})
    assert copied.tied is copied.body[0] and copied.stages[0] is copied.body and copied.body is not model.body
    assert copied.body[0].weight is not model.body[0].weight and torch.equal(copied.body[0].weight, model.body[0].weight)
    assert copied.meta == model.meta and copied.meta['k'] is not model.meta['k']
    assert _Odd.copies == 1 and copied.odd is not model.odd   # its own __deepcopy__ ran
    assert len(copied.body._forward_hooks) == 1 and copied.body._forward_hooks is not model.body._forward_hooks
    shared = {id(model.body[0].weight): model.body[0].weight}
    assert copy_modules(model, shared).body[0].weight is model.body[0].weight   # what the memo holds is kept
    assert str(copied) == str(model) and set(copied.state_dict()) == set(model.state_dict())
