"""The fast paths agree with the slow ones: shape shortcuts, module copy, mask bookkeeping and application."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import max_rel_diff, randomize_norms

from fasterai.examples import Net
from fasterai.graph import trace
from fasterai.pruner import Pruner, copy_modules, plan
from fasterai.sparsifier import Sparsifier
from fasterai.tracing import Leaves, _Shapes, hooks_taken_out, symbolic_trace


# ------------------------------------------------------------------ shapes
class _Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.lin, self.b = nn.Conv2d(3, 8, 1), nn.Linear(8, 8), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        h = self.lin(self.a(x).permute(0, 2, 3, 1))
        return self.b(h.permute(0, 3, 1, 2))


def test_a_hook_on_a_leaf_module_shapes_its_output():
    "A forward hook that changes a leaf's output is traced after it: the shapes are the module's, then the hook's."
    model = _Hooked().eval()
    model.lin.register_forward_hook(lambda m, i, o: o[..., :6])
    with hooks_taken_out(model) as hooks:
        graph = symbolic_trace(model, Leaves(['lin']), hooks)
        _Shapes(model, graph, meta=True).run(torch.empty(2, 3, 5, 5, device='meta'))
    assert len(model.lin._forward_hooks) == 1   # given back
    lin = next(n for n in graph.nodes if n.target == 'lin')
    assert lin.meta['shape'] == (2, 5, 5, 8) and next(iter(lin.users)).meta['shape'] == (2, 5, 5, 6)
    trace(model, (2, 3, 5, 5), leaf_modules=['lin'])   # and the whole trace goes through
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad(): model.a.weight[:3] = 0; model.a.bias[:3] = 0
    pruned = Pruner().prune_model(model)   # verify runs the real model, hook included
    assert pruned.a.out_channels == 5 and max_rel_diff(model(x), pruned(x)) < 1e-5


# ------------------------------------------------------------------ the module copy
def test_copy_modules_leaves_out_a_compiled_call_and_keeps_shared_empty_dicts_shared():
    class Encoder(nn.Module):
        def __init__(self, store):
            super().__init__()
            self.c, self.store = nn.Conv2d(3, 4, 3), store

        def forward(self, x):
            self.store['skip'] = x
            return self.c(x)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            store = {}
            self.enc, self.store = Encoder(store), store

    model = Pair()
    model._compiled_call_impl = model._call_impl   # what an in-place model.compile() leaves
    copied = copy_modules(model, {})
    assert '_compiled_call_impl' not in vars(copied) and '_compiled_call_impl' not in vars(copy.deepcopy(model))
    assert copied.store is copied.enc.store and copied.store is not model.store


# ------------------------------------------------------------------ masks
def test_pruning_from_masks_refuses_masks_that_do_not_drop_whole_channels():
    model = Net(3)
    keep = torch.ones_like(model.conv1.weight, dtype=torch.bool)
    keep[0, 0, 0, 0] = False
    with pytest.raises(ValueError, match="mask of 'conv1.weight'.*does not drop whole channels"):
        plan(trace(model, (2, 3, 28, 28)), {'conv1.weight': keep})


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.c2, self.head = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = self.bn(self.stem(x))
        return self.head(h + self.c2(F.relu(self.c1(h))))


def test_incremental_mask_combination_equals_a_full_one():
    "Re-scoring one layer at a time (a dict of sparsities) recombines only its parameters: the same masks."
    sp = Sparsifier(_Residual(), 'filter', 'local', 'l1', nn.Conv2d, (2, 3, 8, 8))
    for step in ({'c1': 25}, {'c1': 50}, {'c1': 50, 'stem': 25}, {'c1': 12.5, 'stem': 50}, {'stem': 0}):
        sp.sparsify(step)
        incremental = {k: v.clone() for k, v in sp.masks.items()}
        drops = {k: (d, i.clone()) for k, (d, i) in sp.maskset.drops.items()}
        sp.maskset.combine()
        assert incremental.keys() == sp.masks.keys() and all(torch.equal(incremental[k], sp.masks[k]) for k in incremental)
        assert drops.keys() == sp.maskset.drops.keys()


@pytest.mark.parametrize('make,granularity,layer_type', [
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 6, 2, stride=2), nn.ReLU(),
                           nn.Conv2d(6, 2, 1)), 'filter', (nn.Conv2d, nn.ConvTranspose2d)),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 4)), 'column', nn.Linear),
    (lambda: Net(3), 'kernel', nn.Conv2d)])
def test_masks_applied_by_index_equal_masks_applied_by_broadcast(make, granularity, layer_type):
    torch.manual_seed(0)
    model = make()
    shape = (2, 3, 28, 28) if granularity == 'kernel' else (2, 3, 4, 4)
    sp = Sparsifier(model, granularity, 'local', 'l1', layer_type, shape)
    sp.sparsify(40)
    with torch.no_grad():
        for p in model.parameters(): p.add_(1.)   # an optimizer step that brings every masked entry back
    sp.apply_masks()
    for name, keep in sp.masks.items():
        p = model.get_parameter(name)
        assert not p[~keep.expand_as(p)].any() and p[keep.expand_as(p)].all()
    if granularity == 'filter':
        pruned = Pruner(example_input=shape).prune_model(model)
        x = torch.randn(shape)
        assert max_rel_diff(model.eval()(x), pruned.eval()(x)) < 1e-5


@pytest.mark.parametrize('criteria', ['l1', 'l2', 'large_init_large_final', 'taylor'])
def test_row_scores_by_blocks_equal_the_full_scores(criteria, monkeypatch):
    import fasterai.scoring as S
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 6, 2, stride=2), nn.ReLU(),
                          nn.Conv2d(6, 2, 1))
    sp = Sparsifier(model, 'filter', 'local', criteria, (nn.Conv2d, nn.ConvTranspose2d), (2, 3, 6, 6))
    if sp.criterion.accumulate is not None:
        model(torch.randn(2, 3, 6, 6)).square().sum().backward()
        sp.accumulate()
    monkeypatch.setattr(S, '_BLOCK', 10)   # a few rows at a time
    for name, dim in (('0', 0), ('2', 1)):
        full = sp.score(name).movedim(dim, 0)[1:6].flatten(1).sum(1)
        torch.testing.assert_close(sp.row_scores(name, dim, 1, 5), full)


def test_one_shot_leaves_a_transposed_and_rounded_model_untouched():
    torch.manual_seed(0)
    model = randomize_norms(nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                                          nn.ConvTranspose2d(16, 12, 2, stride=2), nn.ReLU(), nn.Conv2d(12, 2, 1))).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = Pruner(sparsity=40, layer_type=(nn.Conv2d, nn.ConvTranspose2d), example_input=(2, 3, 8, 8),
                    round_to=4, verify=False).prune_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert pruned[0].out_channels % 4 == 0 and pruned[3].out_channels % 4 == 0 and pruned[0].out_channels < 16
    sparse = copy.deepcopy(model)
    Sparsifier(sparse, 'filter', 'local', 'l1', (nn.Conv2d, nn.ConvTranspose2d), (2, 3, 8, 8), round_to=4).sparsify(40)
    x = torch.randn(2, 3, 8, 8)
    assert max_rel_diff(sparse(x), pruned.eval()(x)) < 1e-5
