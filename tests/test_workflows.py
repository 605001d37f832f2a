"""The fastai workflows people run, end to end on small data: fine_tune, several fits, other callbacks, tabular
learners, save and load, learn.prune() and training on, export."""
import contextlib
import io
import random
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from conftest import max_rel_diff
from fastai.callback.core import Callback
from fastai.callback.hook import ActivationStats
from fastai.callback.progress import ShowGraphCallback
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback
from fastai.callback.training import GradientAccumulation
from fastai.data.core import DataLoaders
from fastai.learner import Learner, load_learner
from fastai.metrics import accuracy
from fastai.tabular.all import Categorify, CategoryBlock, Normalize, RandomSplitter, TabularPandas, tabular_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.text.models.awdlstm import AWD_LSTM, WeightDropout
from fastai.text.learner import text_classifier_learner
from fastai.vision.learner import unet_learner, vision_learner
from torchvision.models import resnet18

from fasterai.examples import LabelledTensors, Net
from fasterai.pruner import Pruner
from fasterai.sparsifier import SparsifyCallback


def images(n=64, c=3, size=32, bs=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, size, size, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    k = n * 3 // 4
    return DataLoaders.from_dsets(LabelledTensors(x[:k], y[:k]), LabelledTensors(x[k:], y[k:]), bs=bs,
                                  device='cpu', num_workers=0)


def run(learn, method, *args, bar=False, **kwargs):
    "Call learn.<method>(...) quietly; returns what it printed."
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings(), \
            (contextlib.nullcontext() if bar else learn.no_bar()), learn.no_logging():
        warnings.simplefilter('ignore')
        getattr(learn, method)(*args, **kwargs)
    return out.getvalue()


class ZeroRows(Callback):
    "Records the zero output channels of one layer after every training batch (after SparsifyCallback)."
    order, run_valid = SparsifyCallback.order + 1, False
    def __init__(self, layer): self.layer, self.seen = layer, []
    def after_batch(self):
        w = self.learn.model.get_submodule(self.layer).weight.detach()
        self.seen.append(set((w.flatten(1).abs().sum(1) == 0).nonzero().flatten().tolist()))


def never_released(seen):
    return all(a <= b for a, b in zip(seen, seen[1:]))


def seed_learner(path=None, **kw):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 1, 28, 28, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, :, :14].mean((1, 2, 3)) > 0).long()
    d = DataLoaders.from_dsets(LabelledTensors(x[:64], y[:64]), LabelledTensors(x[64:], y[64:]), bs=16,
                               device='cpu', num_workers=0)
    return Learner(d, Net(1), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, path=path or '.', **kw)


# ---------------------------------------------------------------- 1. vision_learner + fine_tune
@pytest.mark.parametrize('arch', [resnet18, 'resnet18'], ids=['torchvision', 'timm'])
def test_fine_tune_holds_the_frozen_phase_and_ramps_once(arch):
    torch.manual_seed(0)
    learn = vision_learner(images(), arch, pretrained=False, n_out=2, normalize=False,
                           loss_func=nn.CrossEntropyLoss())
    first = next(n for n, m in learn.model.named_modules() if isinstance(m, nn.Conv2d))
    cb, rows = SparsifyCallback(30, 'filter'), ZeroRows(first)
    printed = run(learn, 'fine_tune', 2, freeze_epochs=1, cbs=[cb, rows])
    assert printed.count('Sparsity held in this fit') == 1 and printed.count('Pruning of filter until') == 1
    assert printed.count('Final Sparsity: 30.') == 1 and 'Found a sparsity' not in printed
    frozen, unfrozen = rows.seen[:3], rows.seen[3:]
    assert all(not s for s in frozen)                    # nothing zeroed while the body could not train
    assert len(unfrozen) == 6 and never_released(rows.seen)
    assert len(unfrozen[-1]) == round(0.3 * 64) and len(unfrozen[0]) < len(unfrozen[-1])
    assert [round(h[1], 6) for h in cb.history] == sorted(round(h[1], 6) for h in cb.history)
    x = images().one_batch()[0][:4]
    pruned = Pruner(example_input=x).prune_model(learn.model)
    assert pruned.get_submodule(first).out_channels == 64 - 19
    learn.model.eval(); pruned.eval()
    with torch.no_grad(): assert max_rel_diff(learn.model(x), pruned(x)) < 1e-4


# ---------------------------------------------------------------- 2. several fits in a row
def test_a_second_fit_starts_from_the_sparsity_it_finds_and_releases_nothing(tmp_path):
    learn = seed_learner(tmp_path)
    first, rows = SparsifyCallback(20, 'filter'), ZeroRows('conv2')
    run(learn, 'fit_one_cycle', 2, 1e-2, cbs=[first, rows])
    before = rows.seen[-1]
    second = SparsifyCallback(40, 'filter', criteria='random')   # zeros found are not the lowest scores here
    printed = run(learn, 'fit_one_cycle', 2, 1e-2, cbs=[second, rows])
    assert 'Found a sparsity of 20.' in printed and 'the schedule starts from it' in printed
    assert abs(second.history[0][1] - 20) < 2 and second.history[-1][1] == 40
    assert never_released(rows.seen) and before <= rows.seen[-1] and len(rows.seen[-1]) == 20
    assert len(second.history) == 8   # this fit's batches only
    # a fit without the callback lets the zeros regrow, and print_sparsity shows it
    run(learn, 'fit_one_cycle', 1, 1e-2)
    out = io.StringIO()
    with contextlib.redirect_stdout(out): second.sparsifier.print_sparsity()
    assert second.sparsifier.sparsity() < 1 and 'Sparsity of the targeted layers: 0.' in out.getvalue()


# ---------------------------------------------------------------- 3. with fastai's own callbacks
OTHERS = {
    'ActivationStats': lambda: [ActivationStats(with_hist=True)],
    'SaveModelCallback': lambda: [SaveModelCallback(monitor='valid_loss')],
    'SaveModelCallback-with_opt': lambda: [SaveModelCallback(monitor='valid_loss', with_opt=True)],
    'EarlyStoppingCallback': lambda: [EarlyStoppingCallback(monitor='valid_loss', patience=0, min_delta=10)],
    'GradientAccumulation': lambda: [GradientAccumulation(n_acc=32)],
    'ShowGraphCallback': lambda: [ShowGraphCallback()],
}


@pytest.mark.parametrize('name', list(OTHERS))
def test_with_fastai_callbacks(tmp_path, name):
    learn = seed_learner(tmp_path)
    others = OTHERS[name]()
    cb, rows = SparsifyCallback(30, 'filter'), ZeroRows('conv2')
    run(learn, 'fit_one_cycle', 3, 1e-2, cbs=[cb, rows, *others], bar=name == 'ShowGraphCallback')
    assert never_released(rows.seen)
    if name == 'EarlyStoppingCallback':   # stopped after the second epoch, at the sparsity planned by then
        assert len(cb.history) == 8 and cb.history[-1][2] == pytest.approx(cb.history[-1][1], abs=1)
        assert cb.history[-1][1] < 29
    elif name.startswith('SaveModelCallback'):   # the best epoch was loaded back at the end: sparse, not denser
        assert len(rows.seen[-1]) >= 1
    else:
        assert len(rows.seen[-1]) == 15 and cb.sparsifier.sparsity() == pytest.approx(30, abs=0.5)
    if name == 'ActivationStats':
        assert len(others[0].stats) == 12 and all(isinstance(s[0]['mean'], float) for s in others[0].stats)
    x = torch.randn(4, 1, 28, 28)
    pruned = Pruner(example_input=x).prune_model(learn.model)
    assert pruned.conv2.out_channels == 50 - len(rows.seen[-1]) or name.startswith('SaveModelCallback')
    learn.model.eval(); pruned.eval()
    with torch.no_grad(): assert max_rel_diff(learn.model(x), pruned(x)) < 1e-4


def test_lr_find_leaves_the_sparsity_alone_with_the_callback_attached_or_not(tmp_path):
    cb = SparsifyCallback(30, 'filter')
    learn = seed_learner(tmp_path, cbs=[cb])   # attached for every fit, lr_find's included
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    printed = run(learn, 'lr_find', num_it=10, show_plot=False)
    assert cb.sparsifier is None and 'Pruning' not in printed   # the range test measured the dense model
    assert all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items())
    run(learn, 'fit_one_cycle', 2, 1e-2)
    zero = learn.model.conv2.weight.detach().flatten(1).abs().sum(1) == 0
    assert int(zero.sum()) == 15
    learn.remove_cb(cb)
    run(learn, 'lr_find', num_it=10, show_plot=False)   # without it: the weights come back, zeros included
    assert torch.equal(learn.model.conv2.weight.detach().flatten(1).abs().sum(1) == 0, zero)
    assert not list((tmp_path / 'models').glob('**/*.sparsify.pth'))


# ---------------------------------------------------------------- 4. tabular_learner
def tabular(n=256):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({'a': rng.choice(['x', 'y', 'z'], n), 'b': rng.choice(['p', 'q'], n),
                       'c': rng.normal(size=n), 'd': rng.normal(size=n)})
    df['y'] = ((df.c + (df.a == 'x')) > 0.5).astype(int)
    to = TabularPandas(df, procs=[Categorify, Normalize], cat_names=['a', 'b'], cont_names=['c', 'd'],
                       y_names='y', y_block=CategoryBlock(), splits=RandomSplitter(seed=0)(range(n)))
    return to.dataloaders(bs=32, device='cpu', num_workers=0)


def test_tabular_learner_rows_of_its_linear_layers():
    torch.manual_seed(0)
    learn = tabular_learner(tabular(), layers=[32, 16], metrics=accuracy)
    cb = SparsifyCallback(50, 'filter', layer_type=nn.Linear)
    run(learn, 'fit_one_cycle', 2, 1e-2, cbs=cb)
    assert cb.sparsifier.layer_sparsity() == {'layers.0.0': 50., 'layers.1.0': 50.}   # the targeted ones
    assert 'reaches the model output' in cb.sparsifier.frozen['layers.2.0']
    xb = learn.dls.valid.one_batch()[:2]
    assert xb[0].dtype == torch.int64 and xb[1].is_floating_point()
    learn.model.eval()
    with torch.no_grad(): ref = learn.model(*xb)
    pruned = learn.prune()
    assert [m.out_features for m in pruned.modules() if isinstance(m, nn.Linear)] == [16, 8, 2]
    with torch.no_grad(): assert max_rel_diff(ref, pruned.eval()(*xb)) < 1e-5
    run(learn, 'fit_one_cycle', 1, 1e-3)   # and it trains on


# ---------------------------------------------------------------- 7. saving
def test_save_writes_the_state_only_while_it_describes_the_model(tmp_path):
    learn = seed_learner(tmp_path)
    run(learn, 'save', 'dense')   # never trained with the callback: nothing beside the model
    learn.load('dense')
    assert learn._sparsify_resume is None
    cb = SparsifyCallback(30, 'filter')
    run(learn, 'fit_one_cycle', 2, 1e-2, cbs=cb)
    learn.save('sparse')
    assert (tmp_path / 'models' / 'sparse.sparsify.pth').exists()
    run(learn, 'fit_one_cycle', 1, 1e-2)   # without the callback: the zeros regrow
    learn.save('regrown')
    assert not (tmp_path / 'models' / 'regrown.sparsify.pth').exists()
    learn.load('sparse')
    again = SparsifyCallback(30, 'filter')
    printed = run(learn, 'fit_one_cycle', 2, 1e-2, cbs=again)   # a new run from the loaded model, not a resume
    assert 'Found a sparsity of 30.' in printed and len(again.history) == 8
    assert getattr(learn, '_sparsify_resume', None) is None


# ---------------------------------------------------------------- 8. train on after pruning
def test_learn_prune_carries_the_optimizer_state_and_trains_on(tmp_path):
    learn = seed_learner(tmp_path)
    cb = SparsifyCallback(40, 'filter')
    run(learn, 'fit_one_cycle', 2, 1e-2, cbs=cb)
    old_w, old_state = learn.model.conv2.weight, learn.opt.state[learn.model.conv2.weight]
    kept = (old_w.detach().flatten(1).abs().sum(1) != 0).nonzero().flatten()
    kept_in = (learn.model.conv1.weight.detach().flatten(1).abs().sum(1) != 0).nonzero().flatten()
    x = torch.randn(4, 1, 28, 28)
    learn.model.eval()
    with torch.no_grad(): ref = learn.model(x)
    pruned = learn.prune(example_input=x)
    assert learn.model is pruned and pruned.conv2.out_channels == 30 and pruned.conv3.in_channels == 30
    new_state = learn.opt.state[pruned.conv2.weight]
    for k in ('grad_avg', 'sqr_avg'):   # Adam's moments, sliced to the kept filters
        assert new_state[k].shape == pruned.conv2.weight.shape and torch.equal(new_state[k], old_state[k][kept][:, kept_in])
    assert new_state['step'] == old_state['step']
    conv3_in = learn.opt.state[pruned.conv3.weight]['grad_avg']
    assert conv3_in.shape == pruned.conv3.weight.shape
    assert {id(p) for g in learn.opt.param_lists for p in g} == {id(p) for p in pruned.parameters()}
    with torch.no_grad(): assert max_rel_diff(ref, pruned.eval()(x)) < 1e-5
    run(learn, 'fit_one_cycle', 1, 1e-3)   # fine-tunes the smaller model
    assert learn.model.conv2.weight.shape[0] == 30
    learn.export(tmp_path / 'pruned.pkl')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        back = load_learner(tmp_path / 'pruned.pkl')
    learn.model.eval(); back.model.eval()
    with torch.no_grad(): assert torch.equal(learn.model(x), back.model(x))


# ---------------------------------------------------------------- 5. unet_learner (DynamicUnet)
def segmentation(n=32, size=32, bs=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    k = n * 3 // 4
    return DataLoaders.from_dsets(LabelledTensors(x[:k], y[:k]), LabelledTensors(x[k:], y[k:]), bs=bs,
                                  device='cpu', num_workers=0)


def test_unet_learner_follows_its_hooks_and_shape_branches():
    "DynamicUnet: hooks store encoder outputs for the decoder, UnetBlock branches on shapes, PixelShuffle upsamples."
    torch.manual_seed(0)
    learn = unet_learner(segmentation(), resnet18, pretrained=False, n_out=3, loss_func=CrossEntropyLossFlat(axis=1))
    cb = SparsifyCallback(30, 'filter')
    run(learn, 'fit_one_cycle', 1, 1e-3, cbs=cb)
    g = cb.sparsifier.graph
    assert any("is False for the example's shapes" in b for b in g.branches)
    frozen = {r for grp in g.groups for r in grp.frozen}
    assert any("PixelShuffle" in r for r in frozen)   # its channel blocks are not followed: those convs stay
    skip = next(grp for grp in g.groups if any(s.module == 'layers.0.4.1.conv2' and s.role == 'out' for s in grp.slices))
    assert skip.prunable and any(s.role == 'in' and not s.module.startswith('layers.0.') for s in skip.slices)   # hook
    xb = learn.dls.valid.one_batch()[0][:4]
    learn.model.eval()
    with torch.no_grad(): ref = learn.model(xb)
    before = sum(p.numel() for p in learn.model.parameters())
    pruned = learn.prune()
    assert sum(p.numel() for p in pruned.parameters()) < 0.8 * before
    with torch.no_grad(): assert max_rel_diff(ref, pruned.eval()(xb)) < 1e-4
    run(learn, 'fit_one_cycle', 1, 1e-4)   # the pruned U-Net trains on, its hooks feeding the decoder


# ---------------------------------------------------------------- 6. text_classifier_learner (AWD_LSTM)
def test_text_classifier_weights_of_every_kind_and_the_lstm_limit():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, 60, (64, 24), generator=g)
    d = DataLoaders.from_dsets(LabelledTensors(x[:48], (x[:48, 0] > 30).long()),
                               LabelledTensors(x[48:], (x[48:, 0] > 30).long()), bs=16, device='cpu', num_workers=0)
    d.vocab = [f'w{i}' for i in range(60)]
    torch.manual_seed(0)
    learn = text_classifier_learner(d, AWD_LSTM, pretrained=False, n_out=2, loss_func=nn.CrossEntropyLoss(),
                                    config=dict(emb_sz=40, n_hid=64, n_layers=2))
    cb = SparsifyCallback(50, 'weight', layer_type=(nn.LSTM, WeightDropout, nn.Embedding, nn.Linear))
    run(learn, 'fit_one_cycle', 1, 1e-3, cbs=cb)
    params = dict(learn.model.named_parameters())
    names = ['0.module.encoder.weight', '0.module.rnns.0.module.weight_ih_l0', '0.module.rnns.0.weight_hh_l0_raw',
             '0.module.rnns.1.module.weight_ih_l0', '0.module.rnns.1.weight_hh_l0_raw', '1.layers.0.2.weight']
    for n in names:   # every kind it targets: embeddings, both LSTM weights (the recurrent one behind WeightDropout)
        assert (params[n] == 0).sum().item() == params[n].numel() // 2, n
    assert set(names) <= set(cb.sparsifier.masks)
    lstm = learn.model[0].module.rnns[0]
    learn.model.eval()
    with torch.no_grad():
        learn.model(x[:2])
        assert (lstm.module.weight_hh_l0 == 0).sum().item() == lstm.module.weight_hh_l0.numel() // 2   # as it runs
    with pytest.raises(ValueError, match="LSTM is not a layer kind whose filters fasterai can remove"):
        run(learn, 'fit_one_cycle', 1, 1e-3, cbs=SparsifyCallback(50, 'filter', layer_type=nn.LSTM))
    # whole hidden units of the classifier head, the encoder kept whole (AWD_LSTM, then SentenceEncoder, branch on values)
    with pytest.raises(Exception, match=r"pass leaf_modules=\['0.module'\]"):   # AWD_LSTM branches on values
        run(learn, 'fit_one_cycle', 1, 1e-3, cbs=SparsifyCallback(50, 'filter', layer_type=nn.Linear))
    head = SparsifyCallback(50, 'filter', layer_type=nn.Linear, leaf_modules=['0'])
    run(learn, 'fit_one_cycle', 1, 1e-3, cbs=head)
    xb = x[48:52]
    learn.model.eval()
    with torch.no_grad(): ref = learn.model(xb)[0]
    pruned = learn.prune(leaf_modules=['0'])
    assert pruned[1].layers[0][2].out_features == 25
    with torch.no_grad(): assert max_rel_diff(ref, pruned.eval()(xb)[0]) < 1e-5
    run(learn, 'fit_one_cycle', 1, 1e-3)


# ---------------------------------------------------------------- 9. shrink while training
def test_prune_every_shrinks_the_model_as_it_trains():
    random.seed(0)
    learn = seed_learner()
    cb, sizes = SparsifyCallback(50, 'filter', prune_every=1), []
    class Size(Callback):
        order = SparsifyCallback.order + 1
        def after_epoch(self): sizes.append(sum(p.numel() for p in self.learn.model.parameters()))
    printed = run(learn, 'fit_one_cycle', 3, 1e-3, cbs=[cb, Size()])
    assert printed.count('Pruned after epoch') == 3 and 'Final Sparsity: 50.00' in printed
    assert sizes[0] > sizes[1] > sizes[2] and sizes[0] < 156570
    m = learn.model
    assert (m.conv1.out_channels, m.conv2.out_channels, m.conv3.out_channels) == (10, 25, 50)
    assert m.conv2.in_channels == 10 and m.fc1.in_features == 50
    assert [round(h[1], 6) for h in cb.history] == [round(cb.planned(h[0], 3), 6) for h in cb.history]
    assert {id(p) for g in learn.opt.param_lists for p in g} == {id(p) for p in m.parameters()}
    assert all(s['grad_avg'].shape == p.shape for p, s in learn.opt.state.items() if 'grad_avg' in s)


def test_prune_every_refuses_what_it_cannot_carry():
    for kw, match in ((dict(granularity='weight'), "needs granularity='filter'"), (dict(lth=True), 'lth=True'),
                      (dict(criteria='large_init'), 'compares with the weights of the dense model'),
                      (dict(prune_every=0), 'prune_every must be a number of epochs >= 1')):
        with pytest.raises(ValueError, match=match):
            SparsifyCallback(50, **{'granularity': 'filter', 'prune_every': 1, **kw})


class ZeroInit(nn.Module):
    "A residual branch whose last layer starts at zero (as LoRA's B or a Fixup residual): it must learn."
    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(784, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        nn.init.zeros_(self.down.weight)

    def forward(self, x):
        h = torch.relu(self.up(x.flatten(1)))
        return self.head(h + self.down(h))


def test_weights_initialised_at_zero_are_not_held():
    "Zeros are held when they come from sparsifying (an earlier fit, a loaded state), not from a zero init."
    learn = seed_learner()
    learn.model = ZeroInit()
    cb = SparsifyCallback(30, 'weight', layer_type=nn.Linear)
    printed = run(learn, 'fit_one_cycle', 2, 1e-2, cbs=cb)
    assert 'Found a sparsity' not in printed
    assert (learn.model.down.weight != 0).float().mean().item() == pytest.approx(0.7, abs=0.01)


# ---------------------------------------------------------------- attention heads of a timm ViT
def test_vision_learner_vit_loses_heads_in_fine_tune_and_trains_on():
    torch.manual_seed(0)
    learn = vision_learner(images(), 'vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, n_out=2,
                           loss_func=nn.CrossEntropyLoss())
    out = run(learn, 'fine_tune', 1, freeze_epochs=1, cbs=SparsifyCallback(50, 'head'))
    assert "'0.model.blocks.0.attn.qkv'" in out and 'Final Sparsity: 66.67' in out   # 2 of 3 heads per block
    xb = learn.dls.valid.one_batch()[0][:4]
    learn.model.eval()
    with torch.no_grad(): ref = learn.model(xb)
    pruned = learn.prune()
    assert [b.attn.num_heads for b in pruned[0].model.blocks] == [1] * 12
    with torch.no_grad(): assert max_rel_diff(ref, pruned.eval()(xb)) < 1e-5
    run(learn, 'fit_one_cycle', 1, 1e-4)   # the pruned ViT trains on
