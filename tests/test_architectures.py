"""Fixture models for each pattern real networks use: sparse == pruned, and the right channels couple."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import max_rel_diff, randomize_norms

from fasterai.graph import trace
from fasterai.pruner import Pruner
from fasterai.report import count_params
from fasterai.sparsifier import Sparsifier


def cbr(cin, cout, k=3, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class Residual(nn.Module):
    "A ResNet stage: two blocks adding into one stream, one with a downsampling shortcut."
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.b1 = nn.Sequential(cbr(16, 16), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.b2 = nn.Sequential(cbr(16, 24), nn.Conv2d(24, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2), nn.BatchNorm2d(32))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.b1(x))
        x = F.relu(self.b2(x) + self.down(x))
        return self.fc(x.mean([2, 3]))


class Dense(nn.Module):
    "DenseNet: each layer reads the concatenation of all before it, through a BatchNorm on the concat."
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.l1, self.l2 = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(14, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(20)
        self.head = nn.Linear(20, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, F.relu(self.l1(x))], 1)
        x = torch.cat([x, F.relu(self.l2(x))], 1)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1), 1))


class SE(nn.Module):
    "Squeeze-excitation: the gate (sigmoid of a conv) multiplies the stream, channel by channel."
    def __init__(self, c, r):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))


class MBConv(nn.Module):
    "MobileNet/EfficientNet: expand, depthwise, squeeze-excitation, project, residual."
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.expand, self.dw, self.se = cbr(16, 48, 1), cbr(48, 48, 3, groups=48), SE(48, 8)
        self.project = nn.Sequential(nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Conv2d(16, 10, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.se(self.dw(self.expand(x))))
        return self.head(x).mean((2, 3))


class Split(nn.Module):
    "A conv's output split in two halves (chunk): channel t of each half goes with channel t of the other (tied)."
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(6, 4, 1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        p, q = self.a(x).chunk(2, dim=1)
        return self.head(F.relu(torch.cat([self.b(F.relu(p)), self.c(q)], dim=1)))


class ChunkCat(nn.Module):
    "chunk(2) of a concatenation of two equal halves gives them back: their channels are united."
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        p, q = torch.cat([self.a(x), self.b(x)], 1).chunk(2, dim=1)
        return self.head(F.relu(p) + q)


class SelectiveKernel(nn.Module):
    """SKNet: paths stacked (torch.stack), weighed per path and channel by a softmax over the paths of one conv's
    output reshaped into (paths, channels // paths), and summed."""
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.paths = nn.ModuleList([cbr(8, 16, 3), cbr(8, 16, 5)])
        self.fc_reduce, self.fc_select = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 32, 1)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.stack([p(x) for p in self.paths], dim=1)
        a = self.fc_select(F.relu(self.fc_reduce(x.sum(1).mean((2, 3), keepdim=True))))
        b, c, h, w = a.shape
        a = torch.softmax(a.view(b, 2, c // 2, h, w), dim=1)
        return self.head((x * a).sum(1)).mean((2, 3))


class GLU(nn.Module):
    "A packed gated MLP (timm's GluMlp, SwiGLU): one Linear writes gate and value, chunk(2), silu(gate) * value."
    def __init__(self):
        super().__init__()
        self.embed, self.fc1, self.fc2 = nn.Linear(12, 16), nn.Linear(16, 2 * 24), nn.Linear(24, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x)
        gate, value = self.fc1(x).chunk(2, dim=-1)
        x = x + self.fc2(F.silu(gate) * value)
        return self.head(x.mean(1))


class Block(nn.Module):
    "ConvNeXt: depthwise conv, permute to channels-last, LayerNorm, MLP (Linear, GELU, Linear), residual."
    def __init__(self, c=16):
        super().__init__()
        self.dw, self.norm = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        return x + self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)


class ConvNeXtish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.blocks, self.head = nn.Conv2d(3, 16, 2, stride=2), nn.Sequential(Block(), Block()), nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean([-2, -1]))


class Attention(nn.Module):
    "A transformer block on tokens: multi-head attention (2 heads of 8) and an MLP, a LayerNorm across the stream."
    def __init__(self, d=16):
        super().__init__()
        self.embed, self.attn = nn.Linear(12, d), nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 64), nn.GELU(), nn.Linear(64, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.mlp(self.ln(x))
        return self.head(x[:, 0])


class ResNeXtish(nn.Module):
    "ResNeXt/RegNet: a bottleneck whose 3x3 conv is grouped (4 groups), widening 32 -> 64, in a residual."
    def __init__(self):
        super().__init__()
        self.stem, self.c1, self.c2 = cbr(3, 16), cbr(16, 32, 1), cbr(32, 64, 3, groups=4)
        self.c3, self.head = nn.Sequential(nn.Conv2d(64, 16, 1, bias=False), nn.BatchNorm2d(16)), nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.c3(self.c2(self.c1(x))))
        return self.head(x.mean((2, 3)))


class GroupedCat(nn.Module):
    "A grouped conv (2 groups) reading the concatenation of two convs: the two are tied to each other."
    def __init__(self):
        super().__init__()
        self.a, self.b, self.g = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1), nn.Conv2d(16, 6, 3, groups=2)

    def forward(self, x):
        return self.g(F.relu(torch.cat([self.a(x), self.b(x)], 1))).mean((2, 3))


class SizeSE(nn.Module):
    "The common hand-written squeeze-excitation: `b, c, _, _ = x.size()`, view, Linear gate, expand_as."
    def __init__(self):
        super().__init__()
        self.stem, self.fc = cbr(3, 16), nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 16), nn.Sigmoid())
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        b, c, _, _ = x.size()
        y = self.fc(F.adaptive_avg_pool2d(x, 1).view(b, c)).view(b, c, 1, 1)
        return self.head(x * y.expand_as(x)).mean((2, 3))


class Decoder(nn.Module):
    "A U-Net-style upsampling step: a transposed conv (weight in x out x k x k) between convs."
    def __init__(self):
        super().__init__()
        self.enc, self.up = cbr(3, 16), nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.bn, self.dec = nn.BatchNorm2d(8), nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return self.dec(F.relu(self.bn(self.up(self.enc(x)))))


class Ghost(nn.Module):
    "GhostNet's module: a conv's channels and a depthwise conv of them, concatenated, then cut to `out`."
    def __init__(self, cin, out):
        super().__init__()
        init = (out + 1) // 2
        self.out, self.primary, self.cheap = out, cbr(cin, init, 1), cbr(init, init, 3, groups=init)

    def forward(self, x):
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], 1)[:, :self.out]


class GhostNetish(nn.Module):
    """Ghost modules added to a conv shortcut and to themselves, and gated by squeeze-excitation: a channel of the
    primary conv meets its own depthwise copy half a stream away, so the stream's halves are tied."""
    def __init__(self):
        super().__init__()
        self.stem, self.g1, self.short = cbr(3, 8), Ghost(8, 16), cbr(8, 16, 1)
        self.gate, self.g2, self.fc = nn.Conv2d(16, 16, 1), Ghost(16, 16), nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.g1(x) + self.short(x)
        y = y * torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))
        return self.fc((self.g2(y) + y).mean((2, 3)))


CASES = {  # model, input shape, expected out_channels (or features) after 50% local, by module
    'residual': (Residual, (2, 3, 16, 16), {'stem.0': 8, 'b1.1': 8, 'b2.1': 16, 'down.0': 16, 'b2.0.0': 12}),
    'dense': (Dense, (2, 3, 8, 8), {'stem': 4, 'l1': 3, 'l2': 3}),
    'mbconv': (MBConv, (2, 3, 16, 16), {'expand.0': 24, 'dw.0': 24, 'se.reduce': 4, 'se.expand': 24, 'project.0': 8}),
    'split': (Split, (2, 3, 8, 8), {'a': 6, 'b': 2, 'c': 2}),
    'glu': (GLU, (2, 5, 12), {'fc1': 24, 'embed': 8, 'fc2': 8}),
    'chunk_cat': (ChunkCat, (2, 3, 8, 8), {'a': 4, 'b': 4}),
    'selective_kernel': (SelectiveKernel, (2, 3, 8, 8), {'paths.0.0': 8, 'paths.1.0': 8, 'fc_select': 16, 'fc_reduce': 4}),
    'convnext': (ConvNeXtish, (2, 3, 16, 16), {'blocks.0.fc1': 32, 'blocks.1.fc1': 32, 'stem': 16}),
    'attention': (Attention, (2, 5, 12), {'mlp.0': 32, 'embed': 16}),
    'resnext': (ResNeXtish, (2, 3, 8, 8), {'stem.0': 8, 'c1.0': 16, 'c2.0': 32, 'c3.0': 8}),
    'size_se': (SizeSE, (2, 3, 8, 8), {'stem.0': 8, 'fc.0': 2, 'fc.2': 8}),
    'decoder': (Decoder, (2, 3, 8, 8), {'enc.0': 8, 'up': 4}),
    'grouped_cat': (GroupedCat, (2, 3, 8, 8), {'a': 4, 'b': 4, 'g': 6}),
    'ghost': (GhostNetish, (2, 3, 8, 8), {'stem.0': 4, 'g1.primary.0': 4, 'g1.cheap.0': 4, 'short.0': 8, 'gate': 8,
                                          'g2.primary.0': 4}),
}


def out_size(m):
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


@pytest.mark.parametrize('method', ['local', 'global'])
@pytest.mark.parametrize('name', list(CASES))
def test_sparse_equals_pruned(name, method):
    cls, shape, expected = CASES[name]
    torch.manual_seed(0)
    model = randomize_norms(cls()).eval()
    sp = Sparsifier(model, 'filter', method, 'l1', layer_type=(nn.Conv2d, nn.ConvTranspose2d, nn.Linear),
                    example_input=shape)
    sp.sparsify(50)
    pruned = Pruner(example_input=shape).prune_model(model)
    assert count_params(pruned) < count_params(model)
    if method == 'local':
        assert {n: out_size(pruned.get_submodule(n)) for n in expected} == expected
    x = torch.randn(shape)
    for mode in ('eval', 'train'):
        getattr(model, mode)(); getattr(pruned, mode)()
        assert max_rel_diff(model(x), pruned(x)) < 1e-5, mode


def groups_with(graph, module, role='out'):
    return [g for g in graph.groups if any(s.module == module and s.role == role for s in g.slices)]


def test_residual_unites_every_producer_of_the_stream():
    g = trace(Residual(), (2, 3, 16, 16))
    (stream,) = groups_with(g, 'stem.0')
    assert {s.module for s in stream.by_role('out')} == {'stem.0', 'b1.1'}
    assert {s.module for s in stream.by_role('norm')} == {'stem.1', 'b1.2'}
    (second,) = groups_with(g, 'down.0')
    assert {s.module for s in second.by_role('out')} == {'b2.1', 'down.0'} and second.prunable


def test_concat_offsets_and_split_freezes():
    g = trace(Dense(), (2, 3, 8, 8))
    (l2,) = groups_with(g, 'l2')
    assert sorted((s.module, s.role, s.offset) for s in l2.slices) == [('bn', 'norm', 14), ('head', 'in', 14), ('l2', 'out', 0)]
    (a,) = groups_with(trace(Split(), (2, 3, 8, 8)), 'a')   # chunk(2): each half keeps the same positions
    assert a.prunable and a.tie == 2 and a.units == 6
    assert sorted((s.module, s.role, s.offset, s.start) for s in a.slices if s.role == 'in') == [('b', 'in', 0, 0), ('c', 'in', 0, 6)]
    (h,) = groups_with(trace(GLU(), (2, 5, 12)), 'fc1')   # gate t * value t: one unit
    assert h.prunable and h.tie == 2 and {(s.module, s.role) for s in h.slices} == {('fc1', 'out'), ('fc2', 'in')}
    class Sizes(Split):   # sizes given as numbers stay what they are when the channels shrink: frozen
        def forward(self, x):
            p, q = self.a(x).split(6, dim=1)
            return self.head(torch.cat([self.b(p), self.c(q)], dim=1))
    (a,) = groups_with(trace(Sizes(), (2, 3, 8, 8)), 'a')
    assert a.frozen and 'splits the channels into parts whose sizes pruning would change' in a.frozen[0]


def test_selective_kernel_ties_the_paths_weights_to_the_paths():
    g = trace(SelectiveKernel(), (2, 3, 8, 8))
    (paths,) = groups_with(g, 'paths.0.0')
    assert paths.prunable and paths.size == 32 and paths.tie == 2   # fc_select's rows: the paths' 16 twice
    assert {(s.module, s.role, s.start) for s in paths.by_role('out')} == {('paths.0.0', 'out', 0), ('paths.1.0', 'out', 0), ('fc_select', 'out', 0)}
    class Fixed(SelectiveKernel):   # the part size hard-coded: it would not shrink with the channels
        def forward(self, x):
            x = self.stem(x)
            x = torch.stack([p(x) for p in self.paths], dim=1)
            a = self.fc_select(F.relu(self.fc_reduce(x.sum(1).mean((2, 3), keepdim=True))))
            a = torch.softmax(a.view(a.shape[0], 2, 16, 1, 1), dim=1)
            return self.head((x * a).sum(1)).mean((2, 3))
    (sel,) = groups_with(trace(Fixed(), (2, 3, 8, 8)), 'fc_select')
    assert any('hard-codes size 16 for the parts of the channels' in r for r in sel.frozen)


def test_squeeze_excitation_couples_gate_and_stream():
    g = trace(MBConv(), (2, 3, 16, 16))
    (grp,) = groups_with(g, 'expand.0')
    assert {(s.module, s.role) for s in grp.slices} >= {('dw.0', 'dw'), ('se.expand', 'out'), ('se.reduce', 'in'), ('project.0', 'in')}
    assert grp.prunable


def test_layernorm_freezes_the_stream_but_not_the_mlp():
    g = trace(ConvNeXtish(), (2, 3, 16, 16))
    (stream,) = groups_with(g, 'stem')
    assert any('LayerNorm' in r for r in stream.frozen)
    (hidden,) = groups_with(g, 'blocks.0.fc1')
    assert hidden.prunable and [s.module for s in hidden.by_role('in')] == ['blocks.0.fc2']


class RMSMixer(nn.Module):
    """RMS norms: nn.RMSNorm and F.rms_norm over the channels (statistics across them: the stream is frozen), F.rms_norm
    and F.layer_norm over the tokens (a zero channel stays zero: the hidden width prunes), a squared activation."""
    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Linear(12, 16), nn.RMSNorm(16)
        self.fc1, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x)
        h = F.rms_norm(self.fc1(self.norm(x)).transpose(1, 2), (x.shape[1],)).transpose(1, 2)
        h = F.layer_norm(F.relu(h).pow(2).transpose(1, 2), (x.shape[1],)).transpose(1, 2)
        x = x + self.fc2(h)
        return self.head(F.rms_norm(x, (16,)).mean(1))


def test_rms_and_layer_norms_over_channels_freeze_over_tokens_pass():
    g = trace(RMSMixer(), (2, 5, 12))
    (stream,) = groups_with(g, 'embed')
    assert any('RMSNorm' in r and 'statistics across the channels' in r for r in stream.frozen)
    (hidden,) = groups_with(g, 'fc1')
    assert hidden.prunable and [s.module for s in hidden.by_role('in')] == ['fc2']
    torch.manual_seed(0)
    model = RMSMixer().eval()
    Sparsifier(model, 'filter', 'local', 'l1', nn.Linear, example_input=(2, 5, 12)).sparsify(50)
    pruned = Pruner(example_input=(2, 5, 12)).prune_model(model)
    x = torch.randn(2, 5, 12)
    assert pruned.fc1.out_features == 16 and max_rel_diff(model(x), pruned(x)) < 1e-5


def test_attention_heads_prune_while_the_normalised_stream_stays():
    g = trace(Attention(), (2, 5, 12))
    (embed,) = groups_with(g, 'embed')
    assert any('LayerNorm' in r and 'statistics across the channels' in r for r in embed.frozen)
    (heads,) = groups_with(g, 'attn')
    assert heads.prunable and heads.units == 2 and ('attn', 'heads') in {(s.module, s.role) for s in heads.slices}


class AuxHead(nn.Module):
    "A head that runs only in training (GoogLeNet, Inception-v3)."
    def __init__(self):
        super().__init__()
        self.a, self.b, self.aux = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.a(x))
        out = self.b(x).mean((2, 3))
        if self.training: return out, self.aux(x).mean((2, 3))
        return out


def test_train_only_branch_is_traced_too():
    torch.manual_seed(0)
    model = AuxHead()
    (grp,) = groups_with(trace(model, (2, 3, 8, 8)), 'a')
    assert {s.module for s in grp.by_role('in')} == {'b', 'aux'}
    Sparsifier(model, example_input=(2, 3, 8, 8)).sparsify(50)
    pruned = Pruner(example_input=(2, 3, 8, 8)).prune_model(model)
    x = torch.randn(2, 3, 8, 8)
    for p, q in zip(model.train()(x), pruned.train()(x)):
        assert max_rel_diff(p, q) < 1e-5


class Shift(nn.Module):
    "A channel that feeds a constant (bias + sigmoid) to a reader cannot go; a BatchNorm after it resets it."
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn, self.c = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = torch.sigmoid(self.a(x))
        return self.c(F.relu(self.bn(torch.sigmoid(self.b(y)))))


def test_nonzero_channels_freeze_only_where_read():
    g = trace(Shift(), (2, 3, 12, 12))
    (a,) = groups_with(g, 'a')
    (b,) = groups_with(g, 'b')
    assert a.frozen == ["'b' reads them after 'sigmoid', which makes them non-zero"]
    assert b.prunable   # the BatchNorm's zeroed scale and shift rewrite the sigmoid's 0.5 as 0


def test_grouped_conv_ties_the_positions_of_its_groups():
    g = trace(ResNeXtish(), (2, 3, 8, 8))
    (inner,) = groups_with(g, 'c1.0')
    (wide,) = groups_with(g, 'c2.0')
    assert (inner.tie, inner.units, wide.tie, wide.units) == (4, 8, 4, 16) and inner.prunable and wide.prunable
    assert 'tied in 4 blocks' in repr(inner)
    torch.manual_seed(0)
    model = ResNeXtish()
    Sparsifier(model, example_input=(2, 3, 8, 8)).sparsify(30)
    rows = (model.c1[0].weight.flatten(1) == 0).all(1).view(4, 8)
    assert (rows == rows[0]).all() and rows[0].sum() == 2   # round(30% of 8 units), the same in every block
    pruned = Pruner(example_input=(2, 3, 8, 8)).prune_model(model)
    assert (pruned.c2[0].in_channels, pruned.c2[0].groups, pruned.c2[0].weight.shape[1]) == (24, 4, 6)


def test_grouped_conv_on_unequal_pieces_freezes():
    class Unequal(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.g = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(12, 6, 1, groups=3)
        def forward(self, x):
            return self.g(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3))
    g = trace(Unequal(), (2, 3, 8, 8))
    (a,) = groups_with(g, 'a')
    assert a.frozen == ["Conv2d 'g' at 'g' grouped convolution (groups=3) reads channels whose blocks it cannot tie"]


def test_channel_count_read_from_the_size_sizes_views_of_the_same_channels():
    (grp,) = groups_with(trace(SizeSE(), (2, 3, 8, 8)), 'stem.0')
    assert grp.prunable and {s.module for s in grp.by_role('out')} == {'stem.0', 'fc.2'}


class CountMisuse(nn.Module):
    "Channel counts used where the graph cannot follow them: arithmetic, a new tensor, another dim."
    def __init__(self, how):
        super().__init__()
        self.how, self.a, self.b = how, nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)

    def forward(self, x):
        y = self.a(x)
        c = y.shape[1]
        if self.how == 'arith': return y.view(y.size(0), c * 4, -1).mean((1, 2))
        if self.how == 'new': return (y + torch.ones(1, c, 1, 1)).mean((2, 3))
        return y.view(y.size(0), y.size(1), c // 2, -1).mean((2, 3))


@pytest.mark.parametrize('how', ['arith', 'new', 'other_dim'])
def test_other_uses_of_a_channel_count_freeze(how):
    (a,) = groups_with(trace(CountMisuse(how), (2, 3, 4, 4)), 'a')
    assert any('channel count' in r for r in a.frozen), a.frozen


class SizeMisuse(nn.Module):
    "Reshapes whose channel size comes from arithmetic, or an expand onto the wrong dim (found in review)."
    def __init__(self, how):
        super().__init__()
        self.how, self.a, self.z, self.fc = how, nn.Conv2d(3, 4, 1), nn.Conv2d(3, 8, 1), nn.Linear(4, 8)
        self.head, self.flat = nn.Conv2d(8, 2, 1), nn.Linear(8 * 8 * 8, 2)

    def forward(self, x):
        a, z = self.a(x), self.z(x)
        n, c, h, w = a.shape
        if self.how == 'product': y = self.head(z.reshape(n, c * 2, h, w)).mean((2, 3))
        elif self.how == 'flatten': y = self.flat(z.reshape(n, 8 * h * w))
        else: y = self.head(z * self.fc(a.mean((2, 3))).expand_as(z)).mean((2, 3))   # features land on W
        return y + a.mean((2, 3)).sum(1, keepdim=True)


@pytest.mark.parametrize('how', ['product', 'flatten', 'expand_as'])
def test_sizes_from_arithmetic_and_misaligned_expands_freeze(how):
    shape = (8, 3, 8, 8) if how == 'expand_as' else (2, 3, 8, 8)   # a batch of 8 broadcasts onto H
    (z,) = groups_with(trace(SizeMisuse(how), shape), 'z')
    assert not z.prunable, z


@pytest.mark.parametrize('out, frozen', [(16, False), (15, True)])
def test_a_cut_of_every_channel_passes_and_one_that_drops_some_freezes(out, frozen):
    "GhostNet's `[:, :out]`: with out as wide as the concatenation it takes every channel however many are pruned."
    torch.manual_seed(0)
    model, shape = nn.Sequential(cbr(3, 8), Ghost(8, out), nn.Conv2d(out, 4, 1)).eval(), (2, 3, 8, 8)
    (g,) = groups_with(trace(model, shape), '1.primary.0')
    assert bool(g.frozen) == frozen
    if frozen: assert any('indexes the channels at positions pruning would change' in r for r in g.frozen)
    Sparsifier(model, 'filter', 'local', 'l1', nn.Conv2d, example_input=shape).sparsify(50)
    pruned = Pruner(example_input=shape).prune_model(model)
    x = torch.randn(shape)
    with torch.no_grad(): assert max_rel_diff(model(x), pruned(x)) < 1e-5
    assert (pruned[1].primary[0].out_channels < 8) != frozen


class HalfSplit(nn.Module):
    "A CSP-like block: its expanded channels split in halves by a size it holds, one half through a conv, rejoined."
    def __init__(self):
        super().__init__()
        self.exp, self.mid, self.out = cbr(3, 16, 1), cbr(8, 8), nn.Conv2d(16, 4, 1)
        self.half = 8

    def forward(self, x):
        a, b = self.exp(x).split(self.half, dim=1)
        return self.out(torch.cat([a, self.mid(b)], 1))


def test_a_split_sized_by_an_attribute_is_followed_once_registered():
    import fasterai
    from fasterai.layers import SPLITS
    torch.manual_seed(0)
    model, shape = randomize_norms(HalfSplit()).eval(), (2, 3, 8, 8)
    (g,) = groups_with(trace(model, shape), 'exp.0')
    assert any('fasterai.register_split' in r for r in g.frozen)   # the number alone: frozen, with the hint
    fasterai.register_split(HalfSplit, lambda m: setattr(m, 'half', m.exp[0].out_channels // 2))
    try:
        (g,) = groups_with(trace(model, shape), 'exp.0')
        assert g.prunable and g.tie == 2
        Sparsifier(model, 'filter', 'local', 'l1', nn.Conv2d, example_input=shape).sparsify(50)
        pruned = Pruner(example_input=shape).prune_model(model)
        assert pruned.exp[0].out_channels == 8 and pruned.half == 4
        x = torch.randn(shape)
        with torch.no_grad(): assert max_rel_diff(model(x), pruned(x)) < 1e-5
    finally:
        del SPLITS[HalfSplit]
    with pytest.raises(ValueError, match='register_split takes a module class'): fasterai.register_split('x', len)
