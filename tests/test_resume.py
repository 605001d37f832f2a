"""Training with SparsifyCallback saved mid-schedule and resumed ends where the uninterrupted run ends."""
import contextlib
import io

import fastai.callback.progress  # noqa: F401 (Learner.no_bar)
import fastai.callback.schedule  # noqa: F401 (fit_one_cycle)
import pytest
import torch
import torch.nn as nn
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import SaveModelCallback
from fastai.data.core import DataLoaders
from fastai.learner import Learner

from fasterai.examples import LabelledTensors, Net
from fasterai.sparsifier import SparsifyCallback

EPOCHS = 4


def dls():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(192, 1, 28, 28, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, :, :14].mean((1, 2, 3)) > 0).long()
    ds = LabelledTensors(x, y)
    return DataLoaders.from_dsets(ds, ds, bs=32, shuffle=False, device='cpu', num_workers=0)


class StopAfter(Callback):
    "Stops training after epoch `n` (a crash), once SaveModelCallback has saved it."
    order = SaveModelCallback.order + 1
    def __init__(self, n): self.n = n
    def after_epoch(self):
        if self.epoch == self.n: raise CancelFitException


def learner(path):
    torch.manual_seed(0)
    return Learner(dls(), Net(1), loss_func=nn.CrossEntropyLoss(), path=path)


def fit(learn, cbs, **kw):
    with contextlib.redirect_stdout(io.StringIO()), learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(EPOCHS, 1e-2, cbs=cbs, **kw)


SETTINGS = {
    'filter-l1': dict(sparsity=50, granularity='filter'),
    'weight-global-taylor': dict(sparsity=60, granularity='weight', method='global', criteria='taylor'),
    'filter-dsd': dict(sparsity=50, granularity='filter', sched_func='dsd'),   # gives back filters after the crash
    'kernel-init-lth': dict(sparsity=40, granularity='kernel', criteria='large_init', lth=True,
                            sched_func='one_shot', end_epoch=3),
}


@pytest.mark.parametrize('name', list(SETTINGS))
def test_resume_matches_the_uninterrupted_run(tmp_path, name):
    full = learner(tmp_path)
    cb_full = SparsifyCallback(**SETTINGS[name])
    fit(full, [cb_full])

    crashed = learner(tmp_path)
    fit(crashed, [SparsifyCallback(**SETTINGS[name]), SaveModelCallback(every_epoch=True, with_opt=True), StopAfter(1)])
    assert (tmp_path / 'models' / 'model_1.sparsify.pth').exists()

    resumed = learner(tmp_path)
    resumed.load('model_1')
    cb = SparsifyCallback(**SETTINGS[name])
    keys = list(resumed.model.state_dict())
    fit(resumed, [cb], start_epoch=2)

    assert list(resumed.model.state_dict()) == keys
    assert cb.sparsifier.masks.keys() == cb_full.sparsifier.masks.keys()
    for k, m in cb_full.sparsifier.masks.items():
        assert torch.equal(cb.sparsifier.masks[k], m), k
    assert cb.sparsifier.sparsity() == cb_full.sparsifier.sparsity()
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-4), k
    assert [h[:2] for h in cb.history] == [h[:2] for h in cb_full.history]


def test_a_state_that_does_not_fit_is_refused(tmp_path):
    learn = learner(tmp_path)
    fit(learn, [SparsifyCallback(30, 'weight')])
    learn.save('net')
    other = Learner(dls(), nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(2704, 4)),
                    loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    # what other.load('net') leaves for the next SparsifyCallback (the model weights would not load either)
    other._sparsify_resume = torch.load(tmp_path / 'models' / 'net.sparsify.pth', weights_only=True)
    with pytest.raises(ValueError, match='the saved sparsity state does not fit this model'):
        fit(other, [SparsifyCallback(30, 'weight')], start_epoch=1)   # a resumed fit reads it
