"""A pruned model is an ordinary model: it saves, loads, exports (learner, ONNX, torch.export) and compiles."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import max_rel_diff, randomize_norms
from fastai.learner import Learner, load_learner
from test_architectures import ResNeXtish, Residual
from test_toolbox import synthetic_dls

from fasterai.examples import Net
from fasterai.export import pruned_config, rebuild_pruned
from fasterai.pruner import Pruner

SHAPE = (2, 1, 28, 28)


def pruned_pair(cls=Net, shape=SHAPE, sparsity=40, **kw):
    torch.manual_seed(0)
    model = randomize_norms(cls(**kw)).eval()
    return model, Pruner(sparsity=sparsity, example_input=shape).prune_model(model).eval()


@pytest.mark.parametrize('cls,shape,kw', [(Net, SHAPE, {'in_channels': 1}), (Residual, (2, 3, 16, 16), {}),
                                          (ResNeXtish, (2, 3, 8, 8), {})])
def test_state_dict_round_trip_through_a_rebuilt_model(tmp_path, cls, shape, kw):
    _, pruned = pruned_pair(cls, shape, **kw)
    torch.save({'config': pruned_config(pruned), 'state_dict': pruned.state_dict()}, tmp_path / 'p.pth')
    ckpt = torch.load(tmp_path / 'p.pth', weights_only=True)
    fresh = cls(**kw)
    with pytest.raises(RuntimeError, match='size mismatch'):
        fresh.load_state_dict(ckpt['state_dict'])
    model = rebuild_pruned(cls(**kw), ckpt['config'])   # a fresh model of the original class, resized
    model.load_state_dict(ckpt['state_dict'])
    x = torch.randn(shape)
    assert torch.equal(model.eval()(x), pruned(x))


def test_rebuild_refuses_another_class():
    _, pruned = pruned_pair(in_channels=1)
    with pytest.raises(ValueError, match="Residual has no layer 'conv1' that the config records"):
        rebuild_pruned(Residual(), pruned_config(pruned))


def test_learner_export_and_load_learner(tmp_path):
    learn = Learner(synthetic_dls(), Net(1), loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    _, learn.model = pruned_pair(in_channels=1)
    learn.export('pruned.pkl')
    back = load_learner(tmp_path / 'pruned.pkl')
    x = torch.randn(SHAPE)
    assert torch.equal(back.model.eval()(x), learn.model(x))


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    import onnxruntime as ort   # a dev dependency, installed by the set-up
    _, pruned = pruned_pair(in_channels=1)
    x = torch.randn(SHAPE)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(pruned, (x,), str(tmp_path / 'p.onnx'), input_names=['x'], dynamo=True)
    got = ort.InferenceSession(str(tmp_path / 'p.onnx')).run(None, {'x': x.numpy()})[0]
    assert np.abs(got - pruned(x).detach().numpy()).max() < 1e-4 * np.abs(got).max()


def test_torch_export_and_compile():
    _, pruned = pruned_pair(in_channels=1)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        expected = pruned(x)
        assert max_rel_diff(torch.export.export(pruned, (x,)).module()(x), expected) < 1e-5
        assert max_rel_diff(torch.compile(pruned)(x), expected) < 1e-5
