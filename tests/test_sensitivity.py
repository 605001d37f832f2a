"""Sensitivity analysis: one row per group and ratio, each the loss of the model pruned so (a residual stream's whole
group, not one layer), weights put back, and per-layer sparsities that meet a budget where the damage is least."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import randomize_norms
from test_architectures import Residual
from fasterai.budget import MACs
from fasterai.pruner import Pruner
from fasterai.report import count_macs
from fasterai.sensitivity import sensitivity
from fasterai.sparsifier import Sparsifier

SHAPE = (8, 3, 16, 16)


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(SHAPE, generator=g), torch.randint(0, 10, (SHAPE[0],), generator=g)) for _ in range(n)]


@pytest.fixture(scope='module')
def residual():
    torch.manual_seed(0)
    model = randomize_norms(Residual()).eval()
    before = copy.deepcopy(model.state_dict())
    sens = sensitivity(model, ratios=(0.25, 0.5), data=batches())
    return model, before, sens


def test_one_row_per_group_and_ratio_and_weights_put_back(residual):
    model, before, sens = residual
    targets = sens.sparsifier.targets
    assert len(sens.rows) == 2 * len(targets) and [r['ratio'] for r in sens.rows[:2]] == [0.25, 0.5]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    base = sum(F.cross_entropy(model(x), y).item() for x, y in batches()) / 2
    assert abs(sens.base - base) < 1e-6
    stream = next(t for t in targets if 'down.0' in t.layers)   # the residual stream: every producer adding into it
    assert {'b2.1', 'down.0'} <= set(stream.layers)
    assert stream.name in repr(sens) and 'damage' in repr(sens)


def test_each_value_is_the_pruned_models_loss(residual):
    "Faithful for residual-coupled layers: the whole stream group goes, so the row is the pruned model's loss."
    model, _, sens = residual
    sp = Sparsifier(copy.deepcopy(model), 'filter', 'local', 'l1', (nn.Conv2d, nn.Linear), example_input=SHAPE)
    for t in sp.targets:
        if 'down.0' not in t.layers: continue
        row = next(r for r in sens.rows if r['group'] == t.name and r['ratio'] == 0.5)
        sp.sparsify({n: 50 for n in t.layers})
        pruned = Pruner(example_input=SHAPE).prune_model(sp.model)
        assert pruned.down[0].out_channels == 32 - row['dropped'] == 16
        loss = sum(F.cross_entropy(pruned(x), y).item() for x, y in batches()) / 2
        assert abs(loss - row['value']) < 1e-5 and row['damage'] == pytest.approx(row['value'] - sens.base)


def test_sparsities_meet_a_budget_and_spare_the_sensitive_group(residual):
    model, _, sens = residual
    for row in sens.rows:   # make the residual stream by far the most sensitive group
        if 'down.0' in row['layers']: row['damage'] = 10 * (1 + row['ratio'])
    per_layer = sens.sparsities(MACs(0.6))
    assert per_layer['down.0'] == per_layer['b2.1'] == 0
    probe = copy.deepcopy(model)
    sp = Sparsifier(probe, 'filter', 'local', 'l1', (nn.Conv2d, nn.Linear), example_input=SHAPE)
    sp.sparsify(per_layer)
    pruned = Pruner(example_input=SHAPE).prune_model(probe)
    ratio = count_macs(pruned, SHAPE) / count_macs(model, SHAPE)
    assert 0.55 <= ratio <= 0.6, ratio
    with pytest.raises(ValueError, match=r'MACs\(0.05\) cannot be reached with at most 50% of each group'):
        sens.sparsities(MACs(0.05))


def test_with_a_learner_and_a_metric():
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    from fasterai.examples import Net, fashion_mnist_dls
    dls = fashion_mnist_dls(n_train=256, n_valid=128, bs=32)
    learn = Learner(dls, Net(in_channels=1))
    sens = sensitivity(learn, ratios=(0.5,), metric=accuracy, lower_is_better=False, n_batches=2)
    assert 0 <= sens.base <= 1 and len(sens.rows) == len(sens.sparsifier.targets)
    assert all(r['damage'] == pytest.approx(sens.base - r['value']) for r in sens.rows)


@pytest.mark.parametrize('kwargs,match', [(dict(ratios=(0.5, 0.25)), 'increasing shares'),
                                          (dict(ratios=(1.0,)), 'increasing shares'), (dict(data=None), 'needs data')])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match): sensitivity(Residual(), **{'data': batches(1), **kwargs})


def test_sparsities_take_the_least_damage_not_the_most_saving(residual):
    "Every group but the one that saves the least is made very sensitive: the budget it alone can meet is met by it."
    model, _, sens = residual
    sp = sens.sparsifier
    costs = sp.cost_model(MACs(1))
    one = lambda t: costs.ratio([min(u.count(25), u.units - 1) if u is t else 0 for u in sp.targets])
    cheap = max(sp.targets, key=one)   # the group whose 25% saves the fewest MACs
    for row in sens.rows: row['damage'] = 0. if row['group'] == cheap.name else 10 + row['ratio']
    per_layer = sens.sparsities(MACs(one(cheap)))
    assert all(p == 0 for n, p in per_layer.items() if n not in cheap.layers), per_layer
    assert all(0 < per_layer[n] <= 25 for n in cheap.layers)
