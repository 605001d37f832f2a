"""Mixed and low precision: masks hold, zeros stay exactly zero, and the pruned model matches."""
import contextlib
import io

import pytest
import torch
import torch.nn as nn
from conftest import randomize_norms
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision  # also Learner.to_fp16, to_bf16
from fastai.learner import Learner
from test_resume import dls

from fasterai.examples import Net
from fasterai.pruner import Pruner
from fasterai.sparsifier import Sparsifier, SparsifyCallback


def held(sp):
    "Every masked entry is exactly zero."
    params = dict(sp.model.named_parameters())
    return all((params[k].detach()[(~m).expand_as(params[k])] == 0).all() for k, m in sp.masks.items())


class PredDtypes(Callback):
    "Records the dtype of the model's output in every batch, before MixedPrecision's after_pred casts it to float."
    order = MixedPrecision.order - 1
    def before_fit(self): self.dtypes = set()
    def after_pred(self): self.dtypes.add(self.pred.dtype)


class CPUAutocastBF16(Callback):
    """fastai's MixedPrecision with CPU autocast in bfloat16 (fastai's own autocasts 'cuda' only): the forward pass
    and the loss run under `torch.autocast('cpu', dtype=torch.bfloat16)`, the prediction is cast back to float."""
    order = MixedPrecision.order
    def before_batch(self):
        self.autocast = torch.autocast('cpu', dtype=torch.bfloat16)
        self.autocast.__enter__()
    def after_pred(self): self.learn.pred = self.pred.float()
    def after_loss(self): self.autocast.__exit__(None, None, None)


def sparse_fit(learn, *cbs):
    "Two epochs of `fit_one_cycle` with `SparsifyCallback(50, 'filter')` and `cbs`, quietly; the SparsifyCallback."
    cb = SparsifyCallback(50, 'filter')
    with contextlib.redirect_stdout(io.StringIO()), learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(2, 1e-2, cbs=[cb, *cbs])
    return cb


@pytest.mark.parametrize('mode', ['to_fp16', 'to_bf16'])
def test_fastai_mixed_precision_is_inert_on_cpu(mode):
    """fastai's MixedPrecision around SparsifyCallback on a model and data on the CPU: it enters
    `autocast('cuda')` and a `GradScaler('cuda')`, which leave CPU operations alone (and disable themselves
    without CUDA), so the fit runs in float32. This documents the limit and fails if fastai starts acting on CPU."""
    torch.manual_seed(0)
    learn = getattr(Learner(dls(), Net(1), loss_func=nn.CrossEntropyLoss()), mode)()
    rec = PredDtypes()
    cb = sparse_fit(learn, rec)
    assert rec.dtypes == {torch.float32}   # inert: no mixed precision happened
    assert held(cb.sparsifier) and cb.sparsifier.sparsity() == 50
    pruned = Pruner().prune_model(learn.model)   # verifies sparse == pruned itself
    assert pruned.conv2.out_channels == 25


def test_cpu_autocast_bfloat16_inside_fastai_fit():
    "Mixed precision that acts on CPU (autocast in bfloat16, in a fastai callback) while SparsifyCallback trains."
    torch.manual_seed(0)
    learn = Learner(dls(), Net(1), loss_func=nn.CrossEntropyLoss())
    rec = PredDtypes()
    cb = sparse_fit(learn, CPUAutocastBF16(), rec)
    assert rec.dtypes == {torch.bfloat16}   # every forward pass, training and validation, ran in bfloat16
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())   # the weights stay float32
    assert held(cb.sparsifier) and cb.sparsifier.sparsity() == 50
    pruned = Pruner().prune_model(learn.model)   # verifies sparse == pruned itself
    assert pruned.conv2.out_channels == 25


def test_cpu_autocast_bfloat16_training():
    torch.manual_seed(0)
    model, data = Net(1), dls()
    sp = Sparsifier(model, 'filter', example_input=(2, 1, 28, 28))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for i, (x, y) in enumerate(data.train):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
            loss = nn.functional.cross_entropy(out, y)
        assert out.dtype == torch.bfloat16   # the convs and linears ran in bfloat16
        opt.zero_grad(); loss.backward(); opt.step()
        sp.sparsify(10 * (i + 1))
        assert held(sp)
    pruned = Pruner().prune_model(model)
    assert pruned.conv3.out_channels == 40


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_low_precision_models_sparsify_and_prune_exactly(dtype):
    torch.manual_seed(0)
    model = randomize_norms(Net(1)).to(dtype).eval()
    sp = Sparsifier(model, 'filter')
    sp.sparsify(50)
    assert held(sp) and all(p.dtype == dtype for p in model.parameters())
    pruned = Pruner().prune_model(model)
    x = torch.randn(8, 1, 28, 28, dtype=dtype)
    out = pruned(x)
    assert out.dtype == dtype and torch.equal(out, model(x))   # the removed channels added exact zeros
