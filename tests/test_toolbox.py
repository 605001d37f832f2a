"""The sparsification toolbox: criteria, granularities, budgets, callback schedules and lottery tickets."""
import contextlib
import io

import fastai.callback.hook  # noqa: F401 (Learner.summary)
import fastai.callback.progress  # noqa: F401 (Learner.no_bar)
import fastai.callback.core
import matplotlib
import pytest
import torch
import torch.nn as nn
from fastai.data.core import DataLoaders
from fastai.learner import Learner

from fasterai.criteria import CRITERIA, resolve_criterion
from fasterai.examples import LabelledTensors, Net
from fasterai.pruner import Pruner
from fasterai.schedules import iterative, one_shot
from fasterai.sparsifier import Sparsifier, SparsifyCallback
from fasterai.targets import n_zero

matplotlib.use('Agg')


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(8, 16, 3), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def zeros(t): return (t == 0)


# ---------------------------------------------------------------- criteria
def test_criteria_by_hand():
    w, ref, acc = torch.tensor([[-3., 1., 0.5, -2.]]), torch.tensor([[1., -4., 2., 0.1]]), torch.tensor([[5., 1., 2., 3.]])
    expect = {
        'l1': [3, 1, 0.5, 2], 'large_final': [3, 1, 0.5, 2], 'l2': [9, 1, 0.25, 4], 'squared_final': [9, 1, 0.25, 4],
        'small_final': [-3, -1, -0.5, -2], 'large_init': [1, 4, 2, 0.1], 'small_init': [-1, -4, -2, -0.1],
        'large_init_large_final': [1, 1, 0.5, 0.1], 'magnitude_increase': [2, -3, -1.5, 1.9],
        'updating_magnitude_increase': [2, -3, -1.5, 1.9], 'movement': [5, 1, 2, 3], 'taylor': [5, 1, 2, 3],
    }
    assert set(expect) | {'random'} == set(CRITERIA)
    for name, e in expect.items():
        assert torch.allclose(CRITERIA[name](w, ref, acc), torch.tensor([e], dtype=torch.float)), name
    r = CRITERIA['random'](w)
    assert r.shape == w.shape and ((0 <= r) & (r < 1)).all() and torch.equal(r, CRITERIA['random'](w + 1))
    with pytest.raises(ValueError, match="'large_init' needs the reference weights"):
        CRITERIA['large_init'](w)


def test_init_based_criteria_score_against_the_reference():
    torch.manual_seed(0)
    model = Tiny()
    sp = Sparsifier(model, 'weight', criteria='magnitude_increase')
    with torch.no_grad():
        grown = torch.zeros_like(model.conv.weight, dtype=torch.bool).flatten()
        grown[torch.randperm(grown.numel())[:500]] = True
        model.conv.weight.view(-1)[grown] *= 3   # these grew: magnitude_increase keeps them
    sp.sparsify(50)
    assert (model.conv.weight.view(-1)[grown] != 0).all()


def test_movement_and_taylor_accumulate_over_steps():
    torch.manual_seed(0)
    for name, step in (('movement', lambda w, g: -w * g), ('taylor', lambda w, g: (w * g) ** 2)):
        model = Tiny()
        sp, total = Sparsifier(model, 'weight', criteria=name), 0
        for _ in range(3):
            model.zero_grad()
            model(torch.randn(4, 8, 6, 6)).square().sum().backward()
            sp.accumulate()
            total = total + step(model.conv.weight.detach(), model.conv.weight.grad)
        assert torch.allclose(sp.acc['conv'], total)
        expected = torch.topk(total.flatten(), n_zero(total.numel(), 40), largest=False).indices
        sp.sparsify(40)
        assert torch.equal(zeros(model.conv.weight).flatten().nonzero().flatten().sort().values, expected.sort().values)


def test_filter_scores_with_a_negative_criterion_keep_the_smallest():
    model = Net(3)
    Sparsifier(model, 'filter', criteria='small_final').sparsify(30)
    norms, dead = model.conv1.weight.flatten(1).abs().sum(1), zeros(model.conv1.weight.flatten(1)).all(1)
    assert norms[~dead].max() > 0 and dead.sum() == 6


def test_a_plain_function_is_a_criterion():
    c = resolve_criterion(lambda w: -w)
    assert torch.equal(c(torch.ones(2)), -torch.ones(2))


# ---------------------------------------------------------------- granularities
def test_vector_kernel_and_column_counts():
    torch.manual_seed(0)
    model = Tiny()
    Sparsifier(model, 'vector', layer_type=nn.Conv2d).sparsify(25)
    rows = zeros(model.conv.weight).all(-1)             # 16 x 8 x 3 kernel rows
    assert rows.sum() == n_zero(16 * 8 * 3, 25) and zeros(model.conv.weight).sum() == 3 * rows.sum()
    Sparsifier(model, 'column', layer_type=nn.Linear).sparsify(25)
    assert zeros(model.fc.weight).all(0).sum() == 4 and zeros(model.fc.weight).sum() == 4 * 8


def test_row_is_filter_for_linear_layers():
    torch.manual_seed(0)
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    layer = dict(layer_type=(nn.Conv2d, nn.Linear), example_input=(2, 8, 6, 6))
    Sparsifier(a, 'row', **layer).sparsify(25)
    Sparsifier(b, 'filter', **layer).sparsify(25)
    assert torch.equal(a.conv.weight, b.conv.weight) and zeros(a.conv.weight.flatten(1)).all(1).sum() == 4


@pytest.mark.parametrize('layer', ['conv', 'fc'])
def test_n_m_keeps_n_of_every_m_along_the_input_dim(layer):
    torch.manual_seed(0)
    model = Tiny()
    sp = Sparsifier(model, '2:4', layer_type=nn.Conv2d if layer == 'conv' else nn.Linear)
    w = getattr(model, layer).weight
    blocks = lambda: w.detach().movedim(1, -1).reshape(-1, 4)
    sp.sparsify(25)
    assert ((blocks() == 0).sum(1) == 1).all()
    sp.sparsify(50)
    assert ((blocks() == 0).sum(1) == 2).all()
    with pytest.raises(ValueError, match=r'2:4 sparsity keeps 2 of every 4 weights: at most 50% can be zero'):
        sp.sparsify(60)


def test_n_m_picks_the_smallest_of_each_block():
    model = nn.Linear(4, 2)
    with torch.no_grad(): model.weight.copy_(torch.tensor([[1., -5., 0.1, 3.], [-2., 0.5, 4., -0.2]]))
    Sparsifier(model, '2:4', layer_type=nn.Linear).sparsify(50)
    assert torch.equal(model.weight, torch.tensor([[0., -5., 0., 3.], [-2., 0., 4., 0.]]))


def test_n_m_needs_whole_blocks():
    with pytest.raises(ValueError, match=r"2:4 sparsity needs the input dim of layer 'conv1'.*multiple of 4"):
        Sparsifier(Net(3), '2:4')


# ---------------------------------------------------------------- budgets
def test_per_layer_sparsity_and_exclude():
    torch.manual_seed(0)
    model = Net(3)
    sp = Sparsifier(model, 'filter', exclude=['conv3'])
    sp.sparsify({'conv1': 50, 'conv2': 10})
    assert zeros(model.conv1.weight.flatten(1)).all(1).sum() == 10
    assert zeros(model.conv2.weight.flatten(1)).all(1).sum() == 5
    assert not zeros(model.conv3.weight).any() and 'conv3' not in sp.layer_sparsity()
    with pytest.raises(ValueError, match=r"not targeted: \['conv3'\]"):
        sp.sparsify({'conv3': 20})
    with pytest.raises(ValueError, match="a sparsity per layer needs method='local'"):
        Sparsifier(Net(3), 'filter', 'global').sparsify({'conv1': 20})


def test_exclude_by_module():
    model = Net(3)
    sp = Sparsifier(model, 'weight', exclude=[model.conv1])
    assert list(sp.layers) == ['conv2', 'conv3']


# ---------------------------------------------------------------- callback
def synthetic_dls(n=256, bs=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, :, :14].mean((1, 2, 3)) > 0).long()
    ds = LabelledTensors(x, y)
    return DataLoaders.from_dsets(ds, ds, bs=bs, device='cpu', num_workers=0)


def fit(cb, epochs=4, model=None):
    torch.manual_seed(0)
    learn = Learner(synthetic_dls(), model or Net(1), loss_func=nn.CrossEntropyLoss())
    with contextlib.redirect_stdout(io.StringIO()), learn.no_bar(), learn.no_logging():
        learn.fit(epochs, 1e-3, cbs=cb)
    return learn


def test_start_and_end_epochs_and_history():
    cb = SparsifyCallback(40, 'filter', sched_func='linear', start_epoch=1, end_epoch=3)
    fit(cb)
    hist = {round(e, 6): (p, m) for e, p, m in cb.history}
    assert len(cb.history) == 4 * 8
    assert hist[1.0] == (0, 0) and hist[2.0][0] == pytest.approx(20) and hist[3.0][0] == pytest.approx(40)
    assert hist[4.0] == (40, pytest.approx(cb.sparsifier.sparsity()))
    assert all(abs(m - p) < 3 for _, p, m in cb.history)   # measured follows planned up to rounding per layer
    assert cb.plot_schedule(4).lines and cb.plot_history().lines


def test_one_shot_at_a_chosen_epoch():
    cb = SparsifyCallback(50, 'weight', sched_func=one_shot, end_epoch=2)
    fit(cb, epochs=3)
    first = [e for e, p, m in cb.history if m > 0][0]
    assert first == pytest.approx(2.0) and cb.history[-1][2] == pytest.approx(50, abs=0.01)


def test_lottery_ticket_rewinds_survivors_to_the_rewind_epoch():
    class Snap(fastai.callback.core.Callback):
        order = SparsifyCallback.order - 1
        def before_epoch(self):
            if self.epoch == 1: self.w = self.learn.model.conv2.weight.detach().clone()

    snap = Snap()
    cb = SparsifyCallback(50, 'filter', sched_func=iterative(2), lth=True, rewind_epoch=1, start_epoch=1)
    learn = fit([snap, cb], epochs=3)
    # the last pruning step happened at the end of training: survivors are back at their epoch-1 values
    w = learn.model.conv2.weight.detach()
    dead = zeros(w.flatten(1)).all(1)
    assert dead.sum() == 25 and torch.equal(w[~dead], snap.w[~dead])


def test_learner_summary_works_dense_and_pruned():
    learn = fit(SparsifyCallback(30, 'filter'), epochs=1)
    dense = learn.summary()
    learn.model = Pruner().prune_model(learn.model)
    pruned = learn.summary()
    assert 'Total params' in dense and 'Total params' in pruned and dense != pruned


@pytest.mark.parametrize('kwargs,match', [
    (dict(sparsity=30, start_epoch=2, end_epoch=1), r'end_epoch \(1\) must come after start_epoch \(2\)'),
    (dict(sparsity=30, rewind_epoch=-1), 'rewind_epoch must be a number of epochs'),
    (dict(sparsity=30, lth='yes'), 'lth must be True or False'),
    (dict(sparsity={'conv1': 30}, method='global'), "a sparsity per layer needs method='local'"),
    (dict(sparsity={'conv1': 130}), 'sparsity must be a percentage'),
])
def test_bad_callback_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsifyCallback(**kwargs)


@pytest.mark.parametrize('criteria', ['taylor', 'large_init'])
def test_one_shot_pruning_refuses_criteria_that_need_training(criteria):
    with pytest.raises(ValueError, match=f"criteria '{criteria}' needs training"):
        Pruner(sparsity=30, criteria=criteria)


def test_scoring_without_gradients_warns():
    with pytest.warns(UserWarning, match="criteria 'movement' has no gradient statistics for 'conv1' yet"):
        Sparsifier(Net(3), 'weight', criteria='movement').sparsify(30)


def test_round_to_keeps_multiples_of_8():
    torch.manual_seed(0)
    model = Net(3)
    pruned = Pruner(sparsity=30, round_to=8).prune_model(model)
    # 20, 50, 100 filters; 30% gives 14, 35, 70 kept; rounded to the nearest multiple of 8: 16, 32, 72
    assert [pruned.conv1.out_channels, pruned.conv2.out_channels, pruned.conv3.out_channels] == [16, 32, 72]
    with pytest.raises(ValueError, match='round_to rounds the kept channels of each group'):
        Sparsifier(Net(3), 'weight', round_to=8)
    with pytest.raises(ValueError, match='round_to must be a positive int'):
        Pruner(sparsity=30, round_to=0)


def test_updating_reference_moves_only_for_rescored_layers():
    torch.manual_seed(0)
    model = Net(3)
    sp = Sparsifier(model, 'filter', criteria='updating_magnitude_increase')
    sp.sparsify(25)
    first = {k: v.clone() for k, v in sp.ref.items()}
    with torch.no_grad():
        for p in model.parameters(): p.add_(0.01)
    sp.sparsify(26)   # 26% changes only conv3's count (25 -> 26 of 100); conv1 (5 of 20) and conv2 (13 of 50) stay
    assert torch.equal(sp.ref['conv1'], first['conv1']) and torch.equal(sp.ref['conv2'], first['conv2'])
    assert torch.equal(sp.ref['conv3'], model.conv3.weight)


def test_a_state_that_does_not_fit_changes_nothing():
    sp = Sparsifier(Net(3), 'filter')
    sp.sparsify(30)
    masks, state = dict(sp.masks), sp.state_dict()
    other = Sparsifier(Net(3), 'filter')
    other.sparsify(50)
    before = dict(other.masks)
    bad = dict(state, target_masks=state['target_masks'][:1])
    with pytest.raises(ValueError, match='1 targets saved, 3 here'):
        other.load_state_dict(bad)
    assert all(torch.equal(before[k], v) for k, v in other.masks.items()) and masks.keys() == before.keys()


def test_data_parallel_models_prune_through_their_module():
    torch.manual_seed(0)
    pruned = Pruner(sparsity=30).prune_model(nn.DataParallel(Net(3)))
    assert isinstance(pruned, Net) and pruned.conv2.out_channels == 35


def test_the_last_callback_is_not_pickled_with_the_learner():
    import pickle
    learn = fit(SparsifyCallback(30, 'filter'), epochs=1)
    assert learn._sparsify_last.cb is not None
    assert pickle.loads(pickle.dumps(learn._sparsify_last)).cb is None
