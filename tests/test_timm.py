"""timm's own layers and 1d/3d layers: norm-act layers, same-padding and weight-standardised convolutions, DropPath,
Conv1d/Conv3d models, and subclasses of known layers that only set them up differently."""
import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from conftest import max_rel_diff, randomize_norms
from timm.layers import BatchNormAct2d, GroupNormAct, ScaledStdConv2d, StdConv2d

from fasterai.graph import trace
from fasterai.layers import kind_of
from fasterai.pruner import Pruner
from fasterai.sparsifier import Sparsifier

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prune_30(model, x, layer_type=LAYERS):
    "Sparsify 30% of filters, prune (verified in both modes); returns the pruned model and its parameter ratio."
    torch.manual_seed(0)
    Sparsifier(model, 'filter', 'local', 'l1', layer_type, example_input=x).sparsify(30)
    pruned = Pruner(example_input=x).prune_model(model)
    model.eval(); pruned.eval()
    with torch.no_grad(): assert max_rel_diff(model(x), pruned(x)) < 1e-4
    return pruned, sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('name,ratio', [('efficientnet_lite0', 0.6),    # BatchNormAct2d with ReLU6
                                        ('tf_mobilenetv3_small_minimal_100', 0.75),   # Conv2dSame, hard-swish
                                        ('convnext_atto', 0.8)])        # LayerNorm2d: the MLP hidden width prunes
def test_timm_models_prune_through_their_own_layers(name, ratio):
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(name, pretrained=False, num_classes=10, drop_path_rate=0.1))
    _, kept = prune_30(model, torch.randn(2, 3, 64, 64))   # drop path in train mode: verified with the same draws
    assert kept < ratio


class Standardised(nn.Module):
    "A BiT-like block: weight-standardised convolutions, GroupNorm with an activation."
    def __init__(self, conv=StdConv2d):
        super().__init__()
        self.c1, self.n1 = conv(3, 16, 3, padding=1), GroupNormAct(16, 16)
        self.c2, self.n2 = conv(16, 16, 3, padding=1), GroupNormAct(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x): return self.head(self.n2(self.c2(self.n1(self.c1(x)))).mean((2, 3)))


def test_weight_standardised_convs_lose_rows_never_input_columns():
    model = randomize_norms(Standardised())
    g = trace(model, (2, 3, 8, 8))
    inner = next(grp for grp in g.groups if any(s.module == 'c1' and s.role == 'out' for s in grp.slices))
    assert not inner.prunable and 'inputs=False' in ' '.join(inner.frozen)   # c2 standardises over its inputs
    last = next(grp for grp in g.groups if any(s.module == 'c2' and s.role == 'out' for s in grp.slices))
    assert last.prunable   # its rows: a zero row stays zero once standardised, and Linear may lose inputs
    pruned, _ = prune_30(model, torch.randn(2, 3, 8, 8))
    assert pruned.c2.out_channels == 11 and pruned.n2.num_channels == 11 and pruned.c1.out_channels == 16
    scaled = randomize_norms(Standardised(ScaledStdConv2d))
    pruned, _ = prune_30(scaled, torch.randn(2, 3, 8, 8))
    assert pruned.c2.gain.shape[0] == pruned.c2.out_channels == 11   # the per-row gain goes with its row


def test_a_norm_act_with_an_activation_that_moves_zeros_or_is_unknown():
    class Odd(nn.Module):
        def forward(self, x): return x + 1
    for act, why in ((nn.Sigmoid, 'makes them non-zero'), (Odd, 'not known to keep zeros zero')):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=act), nn.Conv2d(8, 4, 3))
        g = trace(model, (2, 3, 8, 8))
        assert not g.groups[0].prunable and why in ' '.join(g.groups[0].frozen), g.groups[0]


@pytest.mark.parametrize('name', ['r3d_18', 'r2plus1d_18'])
def test_video_models_conv3d(name):
    model = randomize_norms(getattr(torchvision.models.video, name)(num_classes=5))
    assert kind_of(model.stem[0]) is kind_of(nn.Conv3d(1, 1, 1))   # torchvision's Conv3DSimple and the like
    _, kept = prune_30(model, torch.randn(2, 3, 4, 32, 32))
    assert kept < 0.55


def test_conv1d_sequence_model():
    model = randomize_norms(nn.Sequential(
        nn.Conv1d(2, 16, 9, padding=4), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(16, 32, 5), nn.BatchNorm1d(32), nn.ReLU(), nn.Conv1d(32, 32, 3, groups=32), nn.BatchNorm1d(32),
        nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 4)))
    pruned, kept = prune_30(model, torch.randn(2, 2, 64))
    assert (pruned[0].out_channels, pruned[4].out_channels, pruned[7].groups) == (11, 22, 22) and kept < 0.6


def test_a_subclass_is_its_base_only_when_it_runs_the_base_code():
    class Simple(nn.Conv3d):
        def __init__(self, i, o): super().__init__(i, o, 3, padding=1)
        @staticmethod
        def stride_of(): return 1
    class OwnForward(nn.Conv2d):
        def forward(self, x): return super().forward(x) * 2
    class OwnProperty(nn.Conv2d):
        @property
        def scale(self): return 2
    assert kind_of(Simple(2, 4)) is not None
    assert kind_of(OwnForward(2, 4, 3)) is None and kind_of(OwnProperty(2, 4, 3)) is None


def test_timm_linear_is_a_linear():
    from timm.layers import Linear
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), Linear(8, 16),
                          nn.ReLU(), Linear(16, 4))
    pruned, _ = prune_30(model, torch.randn(2, 3, 8, 8))
    assert (pruned[0].out_channels, pruned[4].out_features, pruned[6].in_features) == (6, 11, 11)


def small_vit(**kw):
    "A 4-head ViT on 32 x 32 inputs (16 tokens and a class token), heads of 16."
    return timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                             depth=2, num_heads=4, num_classes=10, **kw).eval()


@pytest.mark.parametrize('fused, qk_norm', [(True, False), (False, True)])
def test_attention_loses_whole_heads_exactly(fused, qk_norm):
    "timm's Attention: a head is its q, k and v rows of qkv and its columns of proj; num_heads and attn_dim follow."
    torch.manual_seed(0)
    model, x = small_vit(qk_norm=qk_norm), torch.randn(2, 3, 32, 32)
    for b in model.blocks: b.attn.fused_attn = fused
    g = trace(model, x)
    heads = next(grp for grp in g.groups if any(s.module == 'blocks.0.attn.qkv' and s.role == 'out' for s in grp.slices))
    assert heads.prunable and (heads.size, heads.tie, heads.width, heads.units) == (192, 3, 16, 4)
    assert {(s.module, s.role, s.start, s.length) for s in heads.slices} == {
        ('blocks.0.attn.qkv', 'out', 0, 192), ('blocks.0.attn.proj', 'in', 128, 64), ('blocks.0.attn', 'heads', 128, 64)}
    Sparsifier(model, 'filter', 'local', 'l1', nn.Linear, example_input=x).sparsify(50)
    rows = (model.blocks[0].attn.qkv.weight != 0).any(1).view(3, 4, 16)
    assert (rows == rows[:1, :, :1]).all() and rows[0, :, 0].sum() == 2   # whole heads, the same in q, k and v
    pruned = Pruner(example_input=x).prune_model(model)
    attn = pruned.blocks[0].attn
    assert (attn.num_heads, attn.attn_dim, attn.qkv.out_features, attn.proj.in_features) == (2, 32, 96, 32)
    with torch.no_grad():
        assert max_rel_diff(model(x), pruned(x)) < 1e-5
        y = torch.randn(5, 3, 32, 32)   # another batch size: nothing of the example's is baked in
        assert max_rel_diff(model(y), pruned(y)) < 1e-5


def test_attention_that_mixes_its_heads_keeps_them_with_the_reason():
    model = small_vit()
    model.blocks[0].attn.norm = nn.LayerNorm(64)   # a norm across the joined heads: removing one changes it
    g = trace(model, torch.randn(2, 3, 32, 32))
    assert "Attention 'blocks.0.attn' at 'blocks_0_attn' normalises across its heads (LayerNorm)" in g.unfollowed.values()
    assert not any(s.module == 'blocks.0.attn.qkv' and s.role == 'out' for grp in g.groups if grp.prunable
                   for s in grp.slices)
    assert any(s.module == 'blocks.1.attn.qkv' and grp.prunable for grp in g.groups for s in grp.slices)


def test_head_granularity_sparsifies_attention_heads_alone():
    torch.manual_seed(0)
    model, x = small_vit(), torch.randn(2, 3, 32, 32)
    sp = Sparsifier(model, 'head', 'local', 'l1', example_input=x)   # layer_type does not apply: heads' Linear layers
    assert sorted(sp.layers)[:2] == ['blocks.0.attn.proj', 'blocks.0.attn.qkv']
    assert [t.name for t in sp.targets] == ['blocks.0.attn.qkv', 'blocks.1.attn.qkv']
    sp.sparsify(50)
    assert (model.blocks[0].mlp.fc1.weight != 0).all()   # the MLP is left dense
    pruned = Pruner(example_input=x).prune_model(model)
    assert [b.attn.num_heads for b in pruned.blocks] == [2, 2] and pruned.blocks[0].mlp.fc1.out_features == 256
    with torch.no_grad(): assert max_rel_diff(model(x), pruned(x)) < 1e-5
    model.blocks[1].attn.norm = nn.LayerNorm(64)
    sp = Sparsifier(model, 'head', 'local', 'l1', example_input=x)
    assert [t.name for t in sp.targets] == ['blocks.0.attn.qkv']
    assert sp.frozen == {'blocks.1.attn': "Attention 'blocks.1.attn' at 'blocks_1_attn' normalises across its heads (LayerNorm)"}
    with pytest.raises(ValueError, match="no attention head of ResNet can be sparsified: it has no attention module "
                                         "fasterai knows"):
        Sparsifier(torchvision.models.resnet18(), 'head', example_input=(1, 3, 32, 32))


def test_heads_prune_with_attention_dropout_in_train_mode():
    "Fused attention draws its dropout per head inside scaled_dot_product_attention: verify turns it off too."
    torch.manual_seed(0)
    model, x = small_vit(attn_drop_rate=0.1), torch.randn(2, 3, 32, 32)
    assert model.blocks[0].attn.fused_attn
    Sparsifier(model, 'head', example_input=x).sparsify(50)
    pruned = Pruner(example_input=x).prune_model(model)   # verified in train mode too
    assert pruned.blocks[0].attn.num_heads == 2


def test_swin_window_attention_loses_whole_heads_with_their_bias_columns():
    "timm's Swin: heads of WindowAttention go with their relative-position bias column; shifted windows' masks allowed."
    torch.manual_seed(0)
    model = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, img_size=56, window_size=7,
                              embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10).eval()
    x = torch.randn(2, 3, 56, 56)
    sp = Sparsifier(model, 'head', example_input=x)
    assert [t.name for t in sp.targets] == [f'layers.{i}.blocks.{j}.attn.qkv' for i in (0, 1) for j in (0, 1)]
    sp.sparsify(50)
    pruned = Pruner(example_input=x).prune_model(model)   # block 1 of each stage shifts its windows (a mask)
    attn = [b.attn for layer in pruned.layers for b in layer.blocks]
    assert [(a.num_heads, tuple(a.relative_position_bias_table.shape), a.proj.in_features) for a in attn] == \
        [(1, (169, 1), 16), (1, (169, 1), 16), (2, (169, 2), 32), (2, (169, 2), 32)]
    kept = model.layers[1].blocks[0].attn.qkv.weight.detach().view(3, 4, 16, -1)[2].flatten(1).any(1)
    assert torch.equal(pruned.layers[1].blocks[0].attn.relative_position_bias_table,
                       model.layers[1].blocks[0].attn.relative_position_bias_table[:, kept])
    with torch.no_grad(): assert max_rel_diff(model(x), pruned(x)) < 1e-5


def test_tiny_vit_attention_loses_whole_heads_and_rebuilds():
    """TinyViT's attention writes each head's q, k and v together (head after head) and normalises its input first:
    heads go with their row of attention biases, the cached biases are dropped, the input channels stay."""
    from timm.models.tiny_vit import TinyVit
    from fasterai.export import pruned_config, rebuild_pruned
    make = lambda: TinyVit(embed_dims=(16, 32, 64, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 4),
                           window_sizes=(4, 4, 4, 4), num_classes=10).eval()
    torch.manual_seed(0)
    model, x = make(), torch.randn(2, 3, 64, 64)
    with torch.no_grad(): model(x)   # eval mode caches each attention's biases
    assert any("'stages.1.blocks.0.attn' normalises its input across the channels (LayerNorm)" in r
               for g in trace(model, x).groups for r in g.frozen)
    sp = Sparsifier(model, 'head', example_input=x)
    assert [t.name for t in sp.targets] == ['stages.1.blocks.0.attn.qkv', 'stages.2.blocks.0.attn.qkv',
                                            'stages.3.blocks.0.attn.qkv']
    sp.sparsify(50)
    pruned = Pruner(example_input=x).prune_model(model)
    attn = [pruned.stages[i].blocks[0].attn for i in (1, 2, 3)]
    assert [(a.num_heads, a.out_dim, a.attention_biases.shape[0], a.qkv.out_features) for a in attn] == \
        [(1, 16, 1, 48), (2, 32, 2, 96), (2, 32, 2, 96)]   # heads of 16: q, k and v 48 rows
    assert all(a.qkv.in_features == b.qkv.in_features for a, b in zip(attn, [model.stages[i].blocks[0].attn for i in (1, 2, 3)]))
    with torch.no_grad(): assert max_rel_diff(model(x), pruned(x)) < 1e-5
    unchecked = Pruner(example_input=x, verify=False).prune_model(model)   # never switched mode: no cache left
    with torch.no_grad(): assert max_rel_diff(model(x), unchecked(x)) < 1e-5
    fresh = rebuild_pruned(make(), pruned_config(pruned))
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad(): assert max_rel_diff(pruned(x), fresh(x)) < 1e-6


@pytest.mark.parametrize('name, ratio', [('cs3darknet_s', 0.6), ('res2next50', 0.6), ('ghostnet_050', 0.65)])
def test_splits_sized_by_an_attribute_and_ghost_modules_prune(name, ratio):
    """CSP stages split by `self.expand_chs // 2`, Res2Net by `self.width` (grouped convs on each part, each part added
    to the last one's output): the parts are tied and the sizes reset once pruned. GhostNet's modules add a conv's
    channels and their depthwise copy to a shortcut."""
    from fasterai.export import pruned_config, rebuild_pruned
    torch.manual_seed(0)
    model, x = randomize_norms(timm.create_model(name, pretrained=False, num_classes=10)), torch.randn(2, 3, 64, 64)
    pruned, kept = prune_30(model, x)
    assert kept < ratio
    stage = next((m for m in pruned.modules() if hasattr(m, 'expand_chs') or hasattr(m, 'width')), None)
    if stage is not None and hasattr(stage, 'expand_chs'):
        assert stage.expand_chs == stage.conv_exp.conv.out_channels < model.stages[0].expand_chs
    if stage is not None and hasattr(stage, 'width'):
        assert stage.width * stage.scale == stage.conv1.out_channels
    fresh = rebuild_pruned(randomize_norms(timm.create_model(name, pretrained=False, num_classes=10)),
                           pruned_config(pruned))
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad(): assert max_rel_diff(pruned.eval()(x), fresh.eval()(x)) < 1e-6
