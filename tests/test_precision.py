"""Mixed and low precision: masks hold, zeros stay exactly zero, and the pruned model matches."""
import contextlib
import io

import fastai.callback.fp16  # noqa: F401 (Learner.to_fp16, to_bf16)
import pytest
import torch
import torch.nn as nn
from conftest import randomize_norms
from fastai.learner import Learner
from test_resume import dls

from fasterai.examples import Net
from fasterai.pruner import Pruner
from fasterai.sparsifier import Sparsifier, SparsifyCallback


def held(sp):
    "Every masked entry is exactly zero."
    params = dict(sp.model.named_parameters())
    return all((params[k].detach()[(~m).expand_as(params[k])] == 0).all() for k, m in sp.masks.items())


@pytest.mark.parametrize('mode', ['to_fp16', 'to_bf16'])
def test_fastai_mixed_precision(mode):
    """fastai's MixedPrecision callback around SparsifyCallback (on a CPU-only machine fastai's autocast is a
    CUDA one and does nothing; on a GPU the same test runs in mixed precision)."""
    torch.manual_seed(0)
    learn = getattr(Learner(dls(), Net(1), loss_func=nn.CrossEntropyLoss()), mode)()
    cb = SparsifyCallback(50, 'filter')
    with contextlib.redirect_stdout(io.StringIO()), learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(2, 1e-2, cbs=cb)
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
