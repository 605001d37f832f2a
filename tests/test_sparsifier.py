import pytest
import torch
import torch.nn as nn
from conftest import FlatNet, randomize_norms
from torch.nn.utils import prune

from fasterai.examples import Net
from fasterai.sparsifier import Sparsifier
from fasterai.targets import n_zero


def test_rounding_is_half_up_and_exact():
    assert [n_zero(20, s) for s in (0, 7.5, 30, 50, 100)] == [0, 2, 6, 10, 20]
    assert n_zero(50, 29) == 15 and n_zero(100, 33.3) == 33 and n_zero(3, 50) == 2


@pytest.mark.parametrize('sparsity', [0, 12.5, 30, 77, 100])
def test_weight_l1_matches_torch_l1_unstructured(sparsity):
    torch.manual_seed(0)
    model, ref = Net(3), Net(3)
    ref.load_state_dict(model.state_dict())
    Sparsifier(model, 'weight', 'local', 'l1').sparsify(sparsity)
    for name in ('conv1', 'conv2', 'conv3'):
        m = getattr(ref, name)
        amount = n_zero(m.weight.numel(), sparsity)
        prune.l1_unstructured(m, 'weight', amount=amount)
        assert torch.equal(getattr(model, name).weight != 0, m.weight_mask.bool()), name


def test_filter_local_zeroes_exact_counts_with_bias_and_norm():
    torch.manual_seed(0)
    model = randomize_norms(Net(3))
    s = Sparsifier(model, 'filter', 'local', 'l1')
    for sparsity in (7.5, 30, 64):
        s.sparsify(sparsity)
        for conv, bn in (('conv1', 'bn1'), ('conv2', 'bn2'), ('conv3', 'bn3')):
            c, b = getattr(model, conv), getattr(model, bn)
            dead = (c.weight.flatten(1) == 0).all(1)
            assert dead.sum() == n_zero(c.out_channels, sparsity)
            assert (c.bias[dead] == 0).all() and (b.weight[dead] == 0).all() and (b.bias[dead] == 0).all()
            assert (c.weight.flatten(1)[~dead] != 0).all() and (b.bias[~dead] != 0).all()
    assert s.layer_sparsity() == {n: pytest.approx(100 * n_zero(k, 64) / k) for n, k in
                                  (('conv1', 20), ('conv2', 50), ('conv3', 100))}


@pytest.mark.parametrize('criteria,norm', [('l1', 1), ('l2', 2)])
def test_filter_criterion_picks_the_smallest_rows(criteria, norm):
    model = Net(3)
    with torch.no_grad():
        w = model.conv1.weight
        w.copy_(torch.randn_like(w).sign() * torch.arange(1, 21).float().view(-1, 1, 1, 1).flip(0))
        w[3, 0, 0, 0], w[7] = 1000., 0.5     # row 3 has a huge entry, row 7 is small everywhere
    expected = torch.topk(model.conv1.weight.flatten(1).norm(p=norm, dim=1), 6, largest=False).indices
    Sparsifier(model, 'filter', 'local', criteria).sparsify(30)
    assert set((model.conv1.weight.flatten(1) == 0).all(1).nonzero().flatten().tolist()) == set(expected.tolist())


def test_global_is_scale_invariant_and_never_empties_a_layer():
    torch.manual_seed(0)
    a, b = Net(3), Net(3)
    b.load_state_dict(a.state_dict())
    with torch.no_grad(): b.conv2.weight.mul_(1000)
    sa, sb = Sparsifier(a, 'filter', 'global'), Sparsifier(b, 'filter', 'global')
    sa.sparsify(40); sb.sparsify(40)
    assert sa.layer_sparsity() == sb.layer_sparsity()
    assert sum(round(v * n / 100) for v, n in zip(sa.layer_sparsity().values(), (20, 50, 100))) == n_zero(170, 40)
    sa.sparsify(100)
    for conv in (a.conv1, a.conv2, a.conv3):
        assert (conv.weight.flatten(1) != 0).any(1).sum() == 1


def test_local_filter_keeps_one_filter_at_100():
    model = Net(3)
    Sparsifier(model, 'filter').sparsify(100)
    for conv in (model.conv1, model.conv2, model.conv3):
        assert (conv.weight.flatten(1) != 0).any(1).sum() == 1


def test_masks_hold_and_rescore_only_when_counts_change():
    torch.manual_seed(0)
    model = Net(3)
    keys = list(model.state_dict())
    s = Sparsifier(model, 'filter')
    s.sparsify(30)
    dead = (model.conv2.weight.flatten(1) == 0).all(1)
    with torch.no_grad():
        model.conv2.weight.fill_(float('nan'))          # an optimizer step gone wild
        model.conv2.weight[~dead] = 1e-9                # live rows now look least important
    s.sparsify(30.4)                                    # same counts: masks kept, only re-applied
    assert torch.equal((model.conv2.weight.flatten(1) == 0).all(1), dead)
    assert not torch.isnan(model.conv2.weight[dead]).any()
    s.sparsify(40)                                      # counts change: re-scored, old zeros stay lowest
    now = (model.conv2.weight.flatten(1) == 0).all(1)
    assert now.sum() == 20 and now[dead].all()
    assert list(model.state_dict()) == keys


def test_linear_layers_and_flatten_blocks():
    torch.manual_seed(0)
    model = randomize_norms(FlatNet())
    s = Sparsifier(model, 'filter', 'local', 'l1', layer_type=(nn.Conv2d, nn.Linear), example_input=(2, 3, 8, 8))
    assert sorted(t.name for t in s.targets) == ['conv1', 'conv2', 'head.1']
    s.sparsify(50)
    assert (model.head[1].weight.flatten(1) == 0).all(1).sum() == 10
    assert (model.head[2].weight == 0).sum() == 10 and model.head[5].weight.count_nonzero() == 100


BAD = [
    (dict(granularity='filters'), r"unknown granularity 'filters'.*\['column', 'filter', 'head', 'kernel', 'row', 'vector', 'weight'\].*'2:4'"),
    (dict(method='layer'), r"unknown method 'layer'.*\['global', 'local'\]"),
    (dict(criteria='l3'), r"unknown criteria 'l3'.*\['l1', 'l2', 'large_final', 'large_init'"),
    (dict(granularity='4:2'), r"unknown granularity '4:2'"),
    (dict(granularity='2:4', method='global'), "N:M sparsity is the same count in every block"),
    (dict(granularity='kernel', layer_type=nn.Linear), r"does not apply to layer 'fc1'.*\['column', 'filter', 'head', 'row', 'weight'\]"),
    (dict(exclude=['conv9']), "exclude must name modules of Net"),
    (dict(exclude=['conv1', 'conv2', 'conv3']), "no layer of layer_type Conv2d to sparsify outside exclude"),
    (dict(layer_type=nn.Conv1d), 'Net has no layer of layer_type Conv1d'),
    (dict(layer_type='conv'), 'layer_type must be an nn.Module subclass'),
    (dict(granularity=(4,)), r"granularity dims \(4,\) do not fit layer 'conv1'"),
]


@pytest.mark.parametrize('kwargs,match', BAD)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    model = Net(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        Sparsifier(model, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize('sparsity', [-1, 100.5, '30', None, True, float('nan')])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match='sparsity must be a percentage in \\[0, 100\\]'):
        Sparsifier(Net(3), 'weight').sparsify(sparsity)


def test_print_sparsity(capsys):
    s = Sparsifier(Net(3), 'filter')
    s.sparsify(30)
    s.print_sparsity()
    out = capsys.readouterr().out
    assert 'conv2  Conv2d  50x20x5x5' in out and '7,500/25,000' in out
    assert out.count('30.00%') == 4 and 'Sparsity of the targeted layers: 30.00%' in out


def test_kernel_granularity():
    torch.manual_seed(0)
    model = Net(3)
    Sparsifier(model, 'kernel', 'local').sparsify(25)
    k = (model.conv2.weight == 0).all(-1).all(-1)
    assert k.sum() == n_zero(1000, 25) and ((model.conv2.weight == 0).sum() == 25 * k.sum())


@pytest.mark.parametrize('granularity,method', [('filter', 'local'), ('filter', 'global'), ('weight', 'local'),
                                                ('kernel', 'global')])
def test_zeros_found_are_held_whatever_the_criterion(granularity, method):
    "Units already zero are zeroed first and never released, even by a criterion that scores them high."
    torch.manual_seed(0)
    model = randomize_norms(Net(3))
    first = Sparsifier(model, granularity, method, 'l1')
    first.sparsify(30)
    zero = {k: (p == 0) for k, p in model.named_parameters()}
    second = Sparsifier(model, granularity, method, lambda w: -w.abs())   # zeros score highest
    found = second.hold_zeros()
    assert found == pytest.approx(first.sparsity())
    for s in (10, 30, 50):   # below, at and above what was found
        second.sparsify(s)
        for k, p in model.named_parameters():
            if k.endswith('weight') and k in second.masks: assert (p[zero[k]] == 0).all(), (k, s)
    assert second.sparsity() == pytest.approx(first.sparsity(), abs=0.01) or second.sparsity() > first.sparsity()
    assert Sparsifier(model, granularity, method, 'l1').hold_zeros() >= found
