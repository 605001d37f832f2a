"""Wrong calls get a clear exception that names the problem, and the user's model is left as it was."""
import contextlib
import io

import fastai.callback.progress  # noqa: F401 (Learner.no_bar)
import pytest
import torch
import torch.nn as nn
from fastai.callback.core import Callback
from fastai.learner import Learner
from test_resume import dls

from fasterai.errors import TraceError
from fasterai.examples import Net
from fasterai.pruner import Pruner
from fasterai.sparsifier import Sparsifier, SparsifyCallback


def nan_net(in_channels=1):
    m = Net(in_channels)
    with torch.no_grad(): m.conv2.weight[3, 1, 2, 2] = float('nan')
    return m


def inf_net(in_channels=1):
    m = Net(in_channels)
    with torch.no_grad(): m.fc1.bias[0] = float('inf')
    return m


class Branchy(Net):
    "fx cannot trace a branch on a tensor's value."
    def forward(self, x):
        return super().forward(x) if x.sum() > 0 else super().forward(-x)


CALLS = {  # name: (model factory, call, exception type, message regex)
    'sparsifier granularity type': (Net, lambda m: Sparsifier(m, 3), ValueError, 'unknown granularity 3: choose one of'),
    'sparsifier granularity dims': (Net, lambda m: Sparsifier(m, (0, 0)), ValueError, r'unknown granularity \(0, 0\)'),
    'sparsifier method': (Net, lambda m: Sparsifier(m, method=None), ValueError, r"unknown method None.*\['global', 'local'\]"),
    'sparsifier criteria': (Net, lambda m: Sparsifier(m, criteria=5), ValueError, r"unknown criteria 5.*'l1'"),
    'sparsifier layer_type': (Net, lambda m: Sparsifier(m, layer_type='Conv2d'), ValueError, 'layer_type must be an nn.Module subclass'),
    'sparsifier exclude': (Net, lambda m: Sparsifier(m, exclude=[3]), ValueError, 'exclude must name modules of Net'),
    'sparsifier model type': (Net, lambda m: Sparsifier(m.state_dict()), TypeError, 'expected a torch.nn.Module'),
    'sparsity negative': (Net, lambda m: Sparsifier(m).sparsify(-5), ValueError, r'sparsity must be a percentage in \[0, 100\]'),
    'sparsity above 100': (Net, lambda m: Sparsifier(m).sparsify(101), ValueError, r'sparsity must be a percentage'),
    'sparsity string': (Net, lambda m: Sparsifier(m).sparsify('30%'), ValueError, r'sparsity must be a percentage'),
    'sparsity NaN': (Net, lambda m: Sparsifier(m).sparsify(float('nan')), ValueError, r'sparsity must be a percentage'),
    'sparsity dict unknown layer': (Net, lambda m: Sparsifier(m).sparsify({'fc9': 10}), ValueError, r"not targeted: \['fc9'\]"),
    'N:M above its maximum': (Net, lambda m: Sparsifier(m, '1:2', layer_type=nn.Linear).sparsify(60), ValueError,
                              '1:2 sparsity keeps 1 of every 2 weights: at most 50% can be zero'),
    'NaN weights, sparsifier': (nan_net, lambda m: Sparsifier(m, 'filter').sparsify(30), ValueError,
                                "layer 'conv2' has NaN or inf weights"),
    'NaN weights, weight granularity': (nan_net, lambda m: Sparsifier(m, 'weight').sparsify(30), ValueError,
                                        "layer 'conv2' has NaN or inf weights"),
    'inf bias, pruner': (inf_net, lambda m: Pruner().prune_model(m), ValueError, "parameter 'fc1.bias' holds NaN or inf"),
    'NaN weights, one-shot pruner': (nan_net, lambda m: Pruner(sparsity=30).prune_model(m), ValueError,
                                     "parameter 'conv2.weight' holds NaN or inf"),
    'pruner sparsity': (Net, lambda m: Pruner(sparsity=150), ValueError, 'sparsity must be a percentage'),
    'pruner verify': (Net, lambda m: Pruner(verify='yes'), ValueError, 'verify must be True or False'),
    'pruner criteria needing training': (Net, lambda m: Pruner(sparsity=20, criteria='movement'), ValueError,
                                         "criteria 'movement' needs training"),
    'pruner model type': (Net, lambda m: Pruner().prune_model([m]), TypeError, 'expected a torch.nn.Module to sparsify or prune, got list'),
    'example_input type': (Net, lambda m: Pruner(example_input='28x28').prune_model(m), ValueError,
                           'example_input must be a tensor, a tuple of tensors .one per input of the model. or a shape of positive ints'),
    'example_input zero size': (Net, lambda m: Pruner(example_input=(0, 1, 28, 28)).prune_model(m), ValueError,
                                'example_input must be a tensor, a tuple of tensors .one per input of the model. or a shape of positive ints'),
    'example_input dtype': (Net, lambda m: Pruner(example_input=torch.randn(2, 1, 28, 28).double()).prune_model(m),
                            ValueError, 'example_input is torch.float64 but the model computes in torch.float32'),
    'example_input device': (Net, lambda m: Pruner(example_input=torch.empty(2, 1, 28, 28, device='meta')).prune_model(m),
                             ValueError, 'example_input is on meta but the model is on cpu'),
    'example_input channels': (Net, lambda m: Pruner(example_input=(2, 3, 28, 28)).prune_model(m), TraceError,
                               r'running Net in eval mode on an input of shape \(2, 3, 28, 28\) failed'),
    'leaf_modules type': (Net, lambda m: Pruner(leaf_modules=3).prune_model(m), ValueError,
                          'leaf_modules must be a list of qualified module names'),
    'leaf_modules unknown': (Net, lambda m: Pruner(leaf_modules=['encoder']).prune_model(m), ValueError,
                             r"leaf_modules names modules that Net does not have: \['encoder'\]"),
    'untraceable model': (Branchy, lambda m: Pruner().prune_model(m), TraceError, 'torch.fx cannot trace Branchy'),
    'callback sparsity': (Net, lambda m: SparsifyCallback(sparsity='30'), ValueError, 'sparsity must be a percentage'),
    'callback schedule': (Net, lambda m: SparsifyCallback(30, sched_func='cosine'), ValueError, "unknown schedule 'cosine'"),
    'callback epochs': (Net, lambda m: SparsifyCallback(30, start_epoch='1'), ValueError, 'start_epoch must be a number of epochs'),
}


@pytest.mark.parametrize('name', list(CALLS))
def test_bad_call_raises_and_leaves_the_model_alone(name):
    make, call, exc, match = CALLS[name]
    torch.manual_seed(0)
    model = make(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    with pytest.raises(exc, match=match):
        call(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) or  # NaN != NaN
                                                 torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)
    assert [m.training for m in model.modules()] == modes


def test_sparsity_100_keeps_one_channel_per_layer():
    torch.manual_seed(0)
    model = Net(1).eval()
    pruned = Pruner(sparsity=100, layer_type=(nn.Conv2d, nn.Linear)).prune_model(model)
    assert [pruned.conv1.out_channels, pruned.conv2.out_channels, pruned.conv3.out_channels, pruned.fc1.out_features] == [1, 1, 1, 1]
    assert pruned(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_a_model_without_zeros_comes_back_as_an_equal_copy():
    torch.manual_seed(0)
    model = Net(1).eval()
    pruned = Pruner().prune_model(model)
    assert pruned is not model and pruned.conv1.weight is not model.conv1.weight
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pruned.state_dict().values()))


def test_pruner_called_in_the_middle_of_training():
    class PruneMidway(Callback):
        "Prunes a copy after the 3rd batch, while SparsifyCallback is training the model."
        order = SparsifyCallback.order + 1
        def after_batch(self):
            if self.train_iter == 3:
                self.ids = [id(p) for p in self.learn.model.parameters()]
                self.pruned = Pruner().prune_model(self.learn.model)
                self.still_training = self.learn.model.training

    torch.manual_seed(0)
    learn = Learner(dls(), Net(1), loss_func=nn.CrossEntropyLoss())
    midway, cb = PruneMidway(), SparsifyCallback(50, 'filter')
    with contextlib.redirect_stdout(io.StringIO()), learn.no_bar(), learn.no_logging():
        learn.fit(2, 1e-3, cbs=[cb, midway])
    assert midway.still_training and [id(p) for p in learn.model.parameters()] == midway.ids
    assert midway.pruned.conv2.out_channels < 50 and cb.sparsifier.sparsity() == 50


def test_first_nonfinite_names_the_parameter_and_survives_overflowing_sums():
    from fasterai.tracing import first_nonfinite
    big = torch.full((1000,), 60000., dtype=torch.float16)   # finite, but its fp16 sum overflows
    named = [('a', torch.ones(3)), ('big', big), ('c', torch.tensor([1., float('inf')])), ('d', torch.tensor([float('nan')]))]
    assert first_nonfinite(named) == 'c'
    assert first_nonfinite(named[:2]) is None and first_nonfinite([('i', torch.arange(3))]) is None
