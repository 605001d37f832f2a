"""End to end: a real fastai Learner on Fashion-MNIST, sparsified while training, then pruned."""
import contextlib
import io
import re

import fastai.callback.schedule  # noqa: F401 (fit_one_cycle)
import pytest
import torch
import torch.nn as nn
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.metrics import accuracy

from fasterai.examples import Net, fashion_mnist_dls
from fasterai.pruner import Pruner
from fasterai.sparsifier import SparsifyCallback, annealing_cos


class MaskProbe(Callback):
    "Checks after every optimizer step (and the callback's after_batch) that masked entries are zero."
    order = SparsifyCallback.order + 1
    run_valid = False

    def before_fit(self): self.checked, self.bad = 0, []

    def after_batch(self):
        sp = self.learn.sparsify.sparsifier
        params = dict(self.learn.model.named_parameters())
        for name, keep in sp.masks.items():
            if (params[name].detach()[(~keep).expand_as(params[name])] != 0).any(): self.bad.append((self.iter, name))
        self.checked += 1


@pytest.fixture(scope='module')
def trained():
    dls = fashion_mnist_dls(n_train=2048, n_valid=512, bs=64)
    learn = Learner(dls, Net(in_channels=1), metrics=accuracy)
    keys = list(learn.model.state_dict())
    probe = MaskProbe()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), learn.no_bar():
        learn.fit_one_cycle(3, 1e-3, cbs=[SparsifyCallback(sparsity=30, granularity='filter', method='local',
                                                           criteria='l1', sched_func=annealing_cos), probe])
    return learn, out.getvalue(), probe, keys


def test_printed_lines(trained):
    _, out, _, _ = trained
    lines = [l for l in out.splitlines() if re.match(r'(Pruning|Sparsity at|Final)', l)]
    assert lines[0] == 'Pruning of filter until a sparsity of 30%'
    values = [float(re.fullmatch(r'Sparsity at epoch (\d): (\d+\.\d\d)%', l).group(2)) for l in lines[1:4]]
    assert [re.match(r'Sparsity at epoch (\d)', l).group(1) for l in lines[1:4]] == ['0', '1', '2']
    assert 6 < values[0] < 9.5 and 20 < values[1] < 24.5 and values[2] == 30.00   # cos: 7.5%, 22.5%, 30%
    assert lines[4] == 'Final Sparsity: 30.00' and len(lines) == 5


def test_each_conv_at_exactly_30_percent_and_masks_held(trained):
    learn, _, probe, keys = trained
    for conv in (learn.model.conv1, learn.model.conv2, learn.model.conv3):
        assert 10 * (conv.weight == 0).sum().item() == 3 * conv.weight.numel()
    assert probe.checked == 3 * 32 and probe.bad == []
    assert list(learn.model.state_dict()) == keys


def test_pruned_matches_sparse_and_has_seed_counts(trained):
    learn, _, _, _ = trained
    pruned = Pruner().prune_model(learn.model)
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in pruned.named_children()}
    assert counts['conv1'] == 14 * 25 + 14 and counts['bn1'] == 28 and counts['conv2'] == 12285
    assert counts['bn2'] == 70 and counts['conv3'] == 61320 and counts['bn3'] == 140
    assert pruned.fc1.in_features == 70
    x, _ = learn.dls.valid.one_batch()
    learn.model.eval(); pruned.eval()
    with torch.no_grad():
        ref, got = learn.model(x), pruned(x)
    assert ((ref - got).abs().max() / ref.abs().max()).item() < 1e-5
    with learn.no_bar():
        acc0 = learn.validate()[1]
        plearn = Learner(learn.dls, pruned, metrics=accuracy)
        with plearn.no_bar(): acc1 = plearn.validate()[1]
    assert acc0 > 0.5 and abs(acc0 - acc1) <= 1 / 512


@pytest.mark.parametrize('kwargs,match', [
    (dict(sparsity=130), r'sparsity must be a percentage in \[0, 100\], got 130'),
    (dict(sparsity=30, granularity='filtre'), "unknown granularity 'filtre'"),
    (dict(sparsity=30, method='locale'), "unknown method 'locale'"),
    (dict(sparsity=30, criteria='L1'), "unknown criteria 'L1'"),
    (dict(sparsity=30, sched_func='cosine'), "unknown schedule 'cosine'"),
])
def test_bad_callback_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsifyCallback(**kwargs)


def test_model_without_the_layer_type():
    dls = fashion_mnist_dls(n_train=64, n_valid=64, bs=32)
    learn = Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), metrics=accuracy)
    with pytest.raises(ValueError, match='Sequential has no layer of layer_type Conv2d'), learn.no_bar():
        learn.fit(1, cbs=SparsifyCallback(30))
