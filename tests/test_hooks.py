"""Forward hooks are traced where PyTorch runs them: observers leave nothing, output changes and stored outputs
(fastai's Hook, read by a later module as DynamicUnet does) are followed, and nothing a hook stored survives."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import max_rel_diff, randomize_norms
from fastai.callback.hook import Hook, hook_outputs

from fasterai.errors import TraceError
from fasterai.examples import Net
from fasterai.graph import trace
from fasterai.pruner import Pruner
from fasterai.sparsifier import Sparsifier


def signature(g):
    return [(grp.size, sorted((s.module, s.role, s.offset, s.length) for s in grp.slices), grp.frozen) for grp in g.groups]


def test_observing_hooks_leave_the_graph_as_it_is_and_are_given_back():
    model, seen = Net(3), []
    plain = signature(trace(model))
    stats = [Hook(m, lambda m, i, o: {'mean': o.mean().item(), 'std': o.std().item(),
                                      'near_zero': (o <= 0.05).long().sum().item() / o.numel()})
             for m in (model.conv1, model.bn2, model.conv3, model.fc1)]   # what fastai's ActivationStats computes
    model.conv2.register_forward_pre_hook(lambda m, args: seen.append(len(args)))
    model.register_forward_hook(lambda m, i, o: None)
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)   # a global one too
    try:
        assert signature(trace(model)) == plain
        assert all(h.stored is None for h in stats)   # nothing stored while tracing remains
        assert len(model.conv1._forward_hooks) == 1 and len(model.conv2._forward_pre_hooks) == 1
        assert len(nn.modules.module._global_forward_hooks) == 1
        model(torch.randn(2, 3, 28, 28))
        assert isinstance(stats[0].stored['mean'], float)   # the hooks still run for real
    finally:
        handle.remove()
        for h in stats: h.remove()


class Reads(nn.Module):
    "A decoder reading what a hook stored from the encoder (fastai's DynamicUnet does this with hook_outputs)."
    def __init__(self):
        super().__init__()
        self.enc1, self.enc2 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()), \
            nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.dec = nn.Conv2d(12 + 8, 4, 1)
        self.hooks = hook_outputs([self.enc1], detach=False)

    def forward(self, x):
        y = self.enc2(self.enc1(x))
        return self.dec(torch.cat([y, self.hooks.stored[0]], 1))


def test_an_output_a_hook_stores_for_a_later_module_is_followed():
    model = randomize_norms(Reads())
    g = trace(model, (2, 3, 8, 8))
    group = next(grp for grp in g.groups if ('enc1.0', 'out') in {(s.module, s.role) for s in grp.slices})
    assert group.prunable and ('dec', 'in', 12, 8) in {(s.module, s.role, s.offset, s.length) for s in group.slices}
    assert model.hooks.stored[0] is None   # the proxy stored while tracing is gone
    sp = Sparsifier(model, 'filter', 'local', 'l1', example_input=(2, 3, 8, 8))
    sp.sparsify(50)
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    with torch.no_grad(): ref = model(x)
    pruned = Pruner().prune_model(model)
    assert pruned.enc1[0].out_channels == 4 and pruned.dec.in_channels == 6 + 4
    with torch.no_grad(): assert max_rel_diff(ref, pruned.eval()(x)) < 1e-5


class Doubled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 2, 3)
        self.a.register_forward_hook(lambda m, i, o: torch.cat([o, o.flip(1)], 1)[:, :6] * 2)
        self.b.register_forward_pre_hook(lambda m, args: (F.relu(args[0]),))

    def forward(self, x): return self.b(self.a(x))


def test_hooks_that_change_outputs_are_traced_and_pruning_stays_exact():
    model = Doubled()
    g = trace(model, (2, 3, 8, 8))
    assert not any(grp.prunable for grp in g.groups)   # the flip couples channel i with 5 - i: not followed
    with torch.no_grad(): model.a.weight[0] = 0; model.a.bias[0] = 0
    pruned = Pruner(example_input=(2, 3, 8, 8)).prune_model(model)   # nothing to remove, and the check passes
    x = torch.randn(2, 3, 8, 8)
    assert max_rel_diff(model(x), pruned(x)) < 1e-6


def test_a_hook_that_cannot_be_traced_names_the_module():
    model = Net(3)
    model.conv2.register_forward_hook(lambda m, i, o: o.relu() if o.sum() > 0 else None)   # on a value
    with pytest.raises(TraceError, match=r"inside module 'conv2' \(Conv2d\) or its forward hooks"):
        trace(model)
    assert len(model.conv2._forward_hooks) == 1


class TwoInputs(nn.Module):
    "Category codes into embeddings plus continuous features, as fastai's TabularModel takes them."
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.bn = nn.BatchNorm1d(2)
        self.l1, self.l2 = nn.Linear(3 + 2, 16), nn.Linear(16, 2)

    def forward(self, x_cat, x_cont=None):
        x = torch.cat([self.emb(x_cat[:, 0]), self.bn(x_cont)], 1)
        return self.l2(F.relu(self.l1(x)))


def test_an_example_of_several_inputs_of_any_dtype():
    model = TwoInputs()
    example = (torch.randint(0, 5, (4, 1)), torch.randn(4, 2))
    sp = Sparsifier(model, 'filter', 'local', 'l1', nn.Linear, example_input=example)
    sp.sparsify(50)
    assert (model.l1.weight.abs().sum(1) == 0).sum() == 8
    pruned = Pruner(example_input=example).prune_model(model)
    assert pruned.l1.out_features == 8 and pruned.l2.in_features == 8
    model.eval(); pruned.eval()
    assert max_rel_diff(model(*example), pruned(*example)) < 1e-5
    with pytest.raises(ValueError, match=r'example_input\[1\] is torch.float64'):
        trace(model, (example[0], example[1].double()))
    with pytest.raises(ValueError, match='a tuple of tensors .* got a tuple of Tensor, int'):
        trace(model, (example[0], 3))


class ShapeBranches(nn.Module):
    "Branches on shapes, as fastai's UnetBlock and ResizeToOrig have them; and a loop over a shape."
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2), nn.Conv2d(16, 2, 1)

    def forward(self, x):
        y, z = self.a(x), self.b(self.a(x))
        if y.shape[-2:] != z.shape[-2:]: z = F.interpolate(z, y.shape[-2:])
        n = 1
        for d in z.shape[2:]: n = n * d
        return self.c(torch.cat([y, z], 1)) / n


class ValueBranch(Net):
    def forward(self, x):
        y = self.conv1(x)
        return y.relu() if y.sum() > 0 else y


def test_branches_on_shapes_are_resolved_with_the_example_and_on_values_refused():
    model = randomize_norms(ShapeBranches())
    g = trace(model, (2, 3, 9, 9))
    assert g.branches == ["forward: 'ne' is True for the example's shapes"]
    assert "branch on shapes: forward: 'ne' is True" in str(g)
    assert [grp.prunable for grp in g.groups] == [True, True, False]   # a's, b's, and the output
    with torch.no_grad(): model.a.weight[:3] = 0; model.a.bias[:3] = 0
    pruned = Pruner(example_input=(2, 3, 9, 9)).prune_model(model)
    x = torch.randn(2, 3, 9, 9)
    assert pruned.a.out_channels == 5 and max_rel_diff(model(x), pruned(x)) < 1e-5
    with pytest.raises(TraceError, match='cannot be used as inputs to control flow'):
        trace(ValueBranch(3))


class Stores(nn.Module):
    "Forward code that keeps what it computed on the module (as a recurrent model keeps its hidden state)."
    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1)
        self.seen, self.calls = None, 0

    def forward(self, x):
        y = self.c(x)
        self.seen, self.calls = y.detach(), self.calls + 1
        return self.d(F.relu(y))


def test_what_forward_code_stores_is_put_back_by_tracing_and_verify():
    model, x = Stores(), torch.randn(2, 3, 8, 8)
    with torch.no_grad(): model(x)
    seen = model.seen
    trace(model, (2, 3, 8, 8))   # the trace runs forward on proxies, shape propagation on meta tensors
    assert model.seen is seen and model.calls == 1
    with torch.no_grad(): model.c.weight[:3] = 0; model.c.bias[:3] = 0
    pruned = Pruner(example_input=x).prune_model(model)   # verify runs it for real, in both modes
    assert model.seen is seen and model.calls == 1 and pruned.c.out_channels == 5


def test_an_observer_hook_does_not_block_a_later_shape_branch():
    "Only what a branch reads runs on meta tensors: an observer's .item() (ActivationStats) earlier is no obstacle."
    model, stats = ShapeBranches(), []
    model.a.register_forward_hook(lambda m, i, o: stats.append(o.mean().item()))
    g = trace(model, (2, 3, 9, 9))
    assert g.branches == ["forward: 'ne' is True for the example's shapes"]


class DeviceBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        z = self.b(y)
        if z.device.type == 'cpu': z = z + y   # the example's device, not the meta tensors' 'meta'
        if z.requires_grad: z = z * 2          # no example says: fx's error
        return z


def test_a_branch_on_a_device_takes_the_example_s_and_on_requires_grad_keeps_fx_error():
    with pytest.raises(TraceError, match='cannot be used as inputs to control flow'):
        trace(DeviceBranch(), (2, 3, 8, 8))
    g = trace(DeviceOnly(), (2, 3, 8, 8))
    assert g.branches == ["'b.device.type' is 'cpu', the example's"]
    assert [grp.prunable for grp in g.groups] == [False]   # a and b united by the add, at the output


class DeviceOnly(DeviceBranch):
    def forward(self, x):
        y = self.a(x)
        z = self.b(y)
        return z + y if z.device.type == 'cpu' else z


def test_hooks_that_remove_themselves_while_tracing_come_back():
    model, seen = Net(3), []
    def once(m, i, o):
        seen.append(type(o).__name__)
        handle.remove()
    handle = model.conv1.register_forward_hook(once)
    trace(model)
    assert len(model.conv1._forward_hooks) == 1
    model(torch.randn(2, 3, 28, 28))
    assert seen[-1] == 'Tensor' and len(model.conv1._forward_hooks) == 0   # fired for real, once


def test_a_fastai_hook_inside_a_module_kept_whole_feeds_no_stale_tensor():
    model = randomize_norms(Reads())
    model.hooks.remove()
    model.hooks = hook_outputs([model.enc1[2]], detach=False)   # inside enc1, which the tracer keeps whole
    model(torch.randn(2, 3, 8, 8))   # a real forward leaves a real tensor in the hook's `stored`
    trace(model, (2, 3, 8, 8))       # traced through enc1: the hook runs on the proxy
    with pytest.raises(TraceError, match='NoneType'):
        trace(model, (2, 3, 8, 8), leaf_modules=['enc1'])   # the hook cannot run: no stale constant in the graph
    assert isinstance(model.hooks.stored[0], torch.Tensor)
