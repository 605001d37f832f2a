"""Shape values where Python or PyTorch needs plain numbers (`int(n ** .5)`, `len(x.shape)`, `torch.ones(B, n)`,
`t.expand(B, -1)`), forward parameters left at their defaults (`mask=None`) and item assignment are traced with
the example's shapes, recorded in `graph.branches`; values computed from tensor contents keep a clear TraceError."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import max_rel_diff, randomize_norms

from fasterai.errors import TraceError
from fasterai.graph import trace
from fasterai.pruner import Pruner
from fasterai.sparsifier import Sparsifier
from fasterai.tracing import Leaves, hooks_taken_out, input_specs, symbolic_trace


class Tokens(nn.Module):
    "A token mixer in the style of timm's Nest and ConViT: sizes read back as ints, plain tensors sized by them."
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc, self.out = nn.Linear(8, 12), nn.Linear(12, 4)
        self.register_buffer('gate', torch.full((1, 1, 1), 0.5))

    def forward(self, x, mask=None, scale=1.0):
        y = F.relu(self.b(self.a(x)))
        t = y.flatten(2).transpose(1, 2)               # (B, HW, C)
        B, N, C = t.shape
        side = int(math.sqrt(N))                       # int() of a float computed from a size
        assert len(t.shape) == 3 and len(t) == B       # len() of a shape and of a tensor
        ones = torch.ones(B, side * side, 1)           # a factory sized by traced values, as separate arguments
        gate = self.gate.expand(B, -1, -1)             # a plain tensor's method sized by a traced value
        if mask is not None: t = t * mask              # a parameter at its default: that branch is not taken
        h = F.relu(self.fc(t * ones * gate * scale))
        return self.out(h).mean(1)


def test_shape_values_become_the_example_s_numbers_and_are_recorded():
    model = randomize_norms(Tokens()).eval()
    g = trace(model, (2, 3, 6, 6))
    assert "forward: 'mask' is None, its default" in g.branches
    assert "forward: 'sqrt' is 6 as int() for the example's shapes" in g.branches
    assert "forward: 'getattr_2' has len() 3 for the example's shapes" in g.branches   # len(t.shape)
    assert "forward: 'transpose' has len() 2 for the example's shapes" in g.branches   # len(t)
    assert "forward: 'getitem' is 2 as an index for the example's shapes" in g.branches   # torch.ones(B, ...)
    with hooks_taken_out(model) as hooks:
        fxg = symbolic_trace(model, Leaves(()), hooks, input_specs(model, (2, 3, 6, 6)))
    assert [n.name for n in fxg.nodes if n.op == 'placeholder'] == ['x']   # mask and scale are not inputs
    assert not any('assert' in str(n.target) for n in fxg.nodes)           # nor fx's checks of their values
    assert [grp.prunable for grp in g.groups][:2] == [True, True]   # a's filters and fc's rows
    sp = Sparsifier(model, 'filter', 'local', 'l1', (nn.Conv2d, nn.Linear), example_input=(2, 3, 6, 6))
    sp.sparsify(50)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad(): ref = model(x)
    pruned = Pruner(example_input=x).prune_model(model)
    assert pruned.a.out_channels == 4 and pruned.fc.out_features == 6
    with torch.no_grad(): assert max_rel_diff(ref, pruned(x)) < 1e-5


class Written(nn.Module):
    "Item assignment: channels written into a new tensor, and a slice of tracked channels overwritten."
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.c, self.d = nn.Conv2d(10, 4, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y, z = self.a(x), self.b(x)
        B, C, H, W = y.shape
        buf = torch.zeros(B, 10, H, W)
        buf[:, :8] = y                                 # y's channels are written where pruning cannot follow
        z[:, 0] = 1.0                                  # z's channels are overwritten in place
        return self.c(buf) + self.d(z)


def test_item_assignment_is_recorded_and_the_channels_it_writes_stay():
    model = Written()
    g = trace(model, (2, 3, 5, 5))
    frozen = {s.module: grp.frozen for grp in g.groups for s in grp.slices if s.role == 'out'}
    assert any("writes into a tensor in place (x[...] = v)" in r for r in frozen['a'])
    assert any("writes into a tensor in place (x[...] = v)" in r for r in frozen['b'])
    with torch.no_grad(): model.a.weight[:3] = 0; model.a.bias[:3] = 0; model.b.weight[:2] = 0; model.b.bias[:2] = 0
    x = torch.randn(2, 3, 5, 5)
    pruned = Pruner(example_input=x).prune_model(model)
    assert pruned.a.out_channels == 8 and pruned.b.out_channels == 6
    with torch.no_grad(): assert max_rel_diff(model(x), pruned(x)) < 1e-6


class ValueInt(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.a(x)
        return y[:, :int(y.abs().sum() > 0) + 1]      # a number read from tensor values: no example decides it


class GradSized(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.a(x)
        return y * torch.ones(int(y.requires_grad) + 1, 1, 1, 1)   # no example says whether it needs a gradient


class ValueLen(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.a(x)
        return y[:len(y.nonzero())]                    # the length of a value-dependent tensor is still its shape


@pytest.mark.parametrize('model, match', [(ValueInt(), "int\\(\\) of 'gt', a value that is not computed from shapes"),
                                          (GradSized(), "int\\(\\) of 'getattr_1', a value that is not computed from shapes"),
                                          (ValueLen(), "'len' is not supported in symbolic tracing")])
def test_numbers_read_from_values_or_requires_grad_keep_a_clear_error(model, match):
    with pytest.raises(TraceError, match=match):
        trace(model, (2, 3, 8, 8))


def test_a_device_read_only_to_place_a_tensor_resolves():
    class Placed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3)
        def forward(self, x):
            y = self.a(x)
            ones = torch.ones(1, 8, 1, 1).to(y.device)
            return y * ones if ones.shape[0] == 1 else y
    g = trace(Placed(), (2, 3, 8, 8))
    assert g.branches == ["forward: 'eq' is True for the example's shapes"]


class PerImage(nn.Module):
    "A loop over the batch, as detection models loop over their images."
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return torch.cat([self.b(F.relu(self.a(img[None]))) for img in x])


def test_a_loop_over_a_tensor_runs_for_the_example_s_length():
    model = PerImage()
    g = trace(model, (3, 3, 6, 6))
    assert g.branches == ["forward: 'x' is iterated over 3 entries for the example's shapes"]
    with torch.no_grad(): model.a.weight[:3] = 0; model.a.bias[:3] = 0
    x = torch.randn(3, 3, 6, 6)
    pruned = Pruner(example_input=x).prune_model(model)
    y = torch.randn(5, 3, 6, 6)   # another batch size: the loop is the model's own
    with torch.no_grad(): assert pruned.a.out_channels == 5 and max_rel_diff(model(y), pruned(y)) < 1e-5


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1)

    def forward(self, x, shift: bool = False):
        a = F.relu(self.c1(x))
        if shift: a = a + 1.0   # code the default does not run
        return self.head(a)


def test_parameters_taken_at_their_defaults_are_told():
    import fasterai.tracing as tracing
    tracing._TOLD.clear()
    with pytest.warns(UserWarning, match=r"traced Flagged with shift=False: the defaults of the forward parameters"):
        g = trace(Flagged(), (2, 3, 8, 8))
    assert g.branches == ["forward: 'shift' is False, its default"]


class CountAsNumber(nn.Module):
    "A width read as a number (muP's 1/sqrt(width), an expand to the width): pruning changes it, so it stays."
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        g = F.relu(self.fc3(x))
        e = g.unsqueeze(-1).expand(-1, -1, int(g.shape[1])).sum(-1)
        return self.fc2(h * float(h.shape[-1]) ** -0.5) + self.fc4(e)


def test_a_channel_count_read_as_a_number_freezes_its_channels():
    model, x = CountAsNumber(), torch.randn(4, 6)
    g = trace(model, x)
    frozen = {s.module: grp.frozen for grp in g.groups for s in grp.slices if s.role == 'out'}
    assert any('is read as a plain number (int(), float(), len(), an index)' in r for r in frozen['fc1'])
    assert any('is read as a plain number' in r for r in frozen['fc3'])
    with torch.no_grad(): model.fc1.weight[:4] = 0; model.fc1.bias[:4] = 0
    pruned = Pruner(example_input=x).prune_model(model)
    assert pruned.fc1.out_features == 8
    with torch.no_grad(): assert max_rel_diff(model(x), pruned(x)) < 1e-6


class Factories(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        return y + torch.zeros(y.size()) + torch.ones(y.shape[:2])[..., None, None]   # a whole size, one argument


def test_factories_given_a_whole_size_still_trace():
    g = trace(Factories(), (2, 3, 5, 5))
    assert len(g.groups) == 1


class HookWrites(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1)
        def write(m, i, out): out[:, 1] = 0.5
        self.a.register_forward_hook(write)

    def forward(self, x):
        return self.b(self.a(x))


def test_item_assignment_in_a_hook_is_not_dropped_as_observation():
    g = trace(HookWrites(), (2, 3, 5, 5))
    assert not g.groups[0].prunable and 'writes into a tensor in place' in g.groups[0].frozen[0]


class TwoInputs(nn.Module):
    "The second input is read first: the inputs bind by position, not in the order the branch needs them."
    def __init__(self):
        super().__init__()
        self.conv, self.side = nn.Conv2d(3, 4, 3), nn.Linear(5, 4)

    def forward(self, img, feats):
        h = F.relu(self.conv(img)).mean((2, 3))
        if feats.shape[1] == 5: h = h + self.side(feats)
        return h


class Rewritten(nn.Module):
    "A tensor changed in place before a branch reads its shape: the branch sees what the real run sees."
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1)

    def forward(self, x):
        y = x.mean(1, keepdim=True)
        y.squeeze_(1)
        return self.a(x) if y.dim() == 4 else self.b(x)


def test_branches_see_the_inputs_by_position_and_earlier_writes():
    g = trace(TwoInputs(), (torch.randn(2, 3, 6, 6), torch.randn(2, 5)))
    assert g.branches == ["forward: 'eq' is True for the example's shapes"]
    assert any(s.module == 'side' for grp in g.groups for s in grp.slices)
    g = trace(Rewritten(), (2, 3, 8, 8))
    assert g.branches == ["forward: 'eq' is False for the example's shapes"]
    assert {s.module for grp in g.groups for s in grp.slices} == {'b'}


class WriteThenBranch(nn.Module):
    "An item assignment upstream of a shape branch (as in MViTv2's attention): the branch still resolves."
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x) * 1.0
        y[:, :, 0] = 0.0
        z = self.b(y)
        return z if z.shape[-1] > 3 else z * 2


def test_a_write_upstream_of_a_shape_branch_does_not_block_it():
    g = trace(WriteThenBranch(), (2, 3, 6, 6))
    assert g.branches == ["forward: 'gt' is True for the example's shapes"]
