"""Attention heads of torch's and torchvision's modules prune exactly, or stay with the reason: nn.MultiheadAttention
(torchvision's ViT, torch.nn's transformer blocks), torchvision's Swin and MaxViT attention. (timm's: test_timm.py.)"""
import copy

import pytest
import torch
import torch.nn as nn
from conftest import max_rel_diff

from fasterai.export import pruned_config, rebuild_pruned
from fasterai.graph import trace
from fasterai.mha import PrunedMultiheadAttention, as_pruned
from fasterai.pruner import Pruner, kept_entries
from fasterai.sparsifier import Sparsifier


class Block(nn.Module):
    "Tokens (N, L, 12) embedded to 16, self-attention with 4 heads of 4 added back, an MLP, a head on token 0."
    def __init__(self, batch_first=True, call=None, dropout=0.0, residual=True):
        super().__init__()
        self.embed, self.attn = nn.Linear(12, 16), nn.MultiheadAttention(16, 4, dropout=dropout, batch_first=batch_first)
        self.mlp, self.head = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)), nn.Linear(16, 3)
        self.batch_first, self.residual = batch_first, residual
        self.call = call or (lambda attn, x: attn(x, x, x, need_weights=False)[0])

    def forward(self, x):
        x = self.embed(x if self.batch_first else x.transpose(0, 1))
        a = self.call(self.attn, torch.relu(x) if not self.residual else x)
        x = x + a if self.residual else a
        x = x + self.mlp(x)
        return self.head(x[:, 0] if self.batch_first else x[0])


def heads_group(g, name='attn'):
    return next(grp for grp in g.groups if any(s.module == name and s.role == 'heads' for s in grp.slices))


@pytest.mark.parametrize('batch_first, call', [
    (True, None),
    (False, None),
    (True, lambda attn, x: attn(x, x, x)[0]),   # need_weights left True, the weights never read
])
def test_multihead_attention_loses_whole_heads_exactly(batch_first, call):
    torch.manual_seed(0)
    model, x = Block(batch_first, call).eval(), torch.randn(2, 5, 12)
    g = heads_group(trace(model, x))
    assert g.prunable and (g.size, g.tie, g.width, g.units) == (48, 3, 4, 4)
    assert {(s.module, s.role, s.start, s.length) for s in g.slices} == {
        ('attn', 'out', 0, 48), ('attn.out_proj', 'in', 32, 16), ('attn', 'heads', 32, 16)}
    Sparsifier(model, 'filter', 'local', 'l1', nn.Linear, example_input=x).sparsify(50)
    rows = (model.attn.in_proj_weight != 0).any(1).view(3, 4, 4)
    assert (rows == rows[:1, :, :1]).all() and rows[0, :, 0].sum() == 2   # whole heads, the same in q, k and v
    pruned = Pruner(example_input=x).prune_model(model)   # verified in eval and train mode
    a = pruned.attn
    assert type(a) is PrunedMultiheadAttention and type(model.attn) is nn.MultiheadAttention
    assert (a.num_heads, a.head_dim, a.embed_dim, tuple(a.in_proj_weight.shape), tuple(a.out_proj.weight.shape)) == \
        (2, 4, 8, (24, 8), (8, 8))   # the residual stream lost half its features too
    with torch.no_grad():
        y = torch.randn(3, 7, 12)   # another batch size and length: nothing of the example's is baked in
        for t in (x, y): assert max_rel_diff(model(t), pruned(t)) < 1e-5


def test_input_features_of_multihead_attention_prune_with_its_heads():
    "Not residual: the embedding's features are the attention's inputs, its in-projection's columns go with them."
    torch.manual_seed(0)
    model, x = Block(residual=False).eval(), torch.randn(2, 5, 12)
    (embed,) = [grp for grp in trace(model, x).groups if any(s.module == 'embed' and s.role == 'out' for s in grp.slices)]
    assert embed.prunable and ('attn', 'in') in {(s.module, s.role) for s in embed.slices}
    Sparsifier(model, 'filter', 'local', 'l1', nn.Linear, example_input=x).sparsify(50)
    pruned = Pruner(example_input=x).prune_model(model)
    assert (pruned.embed.out_features, pruned.attn.embed_dim, tuple(pruned.attn.in_proj_weight.shape)) == (8, 8, (24, 8))
    with torch.no_grad(): assert max_rel_diff(model(x), pruned(x)) < 1e-5


@pytest.mark.parametrize('call, reason', [
    (lambda attn, x: attn(x, torch.flip(x, [1]), torch.flip(x, [1]), need_weights=False)[0],
     'attends to a key or value other than its query'),
    (lambda attn, x: attn(x, x, x, need_weights=False, attn_mask=torch.zeros(x.shape[1], x.shape[1]))[0],
     'is called with a mask'),
    (lambda attn, x: (lambda o: o[0] + o[1].sum(-1, keepdim=True))(attn(x, x, x)),
     'returns attention weights averaged over its heads, which are read'),
])
def test_multihead_attention_kept_whole_with_the_reason(call, reason):
    model = Block(call=call).eval()
    g = trace(model, torch.randn(2, 5, 12))
    assert any(reason in r for r in g.unfollowed.values()), g.unfollowed
    assert not any(s.role == 'heads' for grp in g.groups for s in grp.slices)
    Sparsifier(model, 'filter', 'local', 'l1', nn.Linear, example_input=(2, 5, 12)).sparsify(50)
    pruned = Pruner(example_input=(2, 5, 12)).prune_model(model)
    assert type(pruned.attn) is nn.MultiheadAttention and pruned.attn.in_proj_weight.shape == (48, 16)


def test_heads_prune_with_attention_dropout_in_train_mode():
    torch.manual_seed(0)
    model, x = Block(dropout=0.2), torch.randn(2, 5, 12)
    Sparsifier(model, 'head', example_input=x).sparsify(50)
    assert (model.mlp[0].weight != 0).all()   # 'head' leaves the MLP dense
    pruned = Pruner(example_input=x).prune_model(model)   # verify turns the attention's dropout off in train mode
    assert pruned.attn.num_heads == 2 and pruned.mlp[0].out_features == 32


def test_pruned_attention_saves_and_rebuilds():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 5, 12)
    Sparsifier(model, 'head', example_input=x).sparsify(50)
    pruned = Pruner(example_input=x).prune_model(model)
    config = pruned_config(pruned)
    assert config['attn']['attrs']['num_heads'] == 2
    fresh = rebuild_pruned(Block().eval(), config)
    assert type(fresh.attn) is PrunedMultiheadAttention and type(fresh.mlp[0]) is nn.Linear
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad(): assert max_rel_diff(pruned(x), fresh(x)) < 1e-6
    same = rebuild_pruned(Block().eval(), pruned_config(Block()))   # nothing pruned: torch's own module stays
    assert type(same.attn) is nn.MultiheadAttention


@pytest.mark.parametrize('batch_first', [True, False])
def test_pruned_attention_computes_what_torch_does(batch_first):
    "Before any head goes, PrunedMultiheadAttention is torch's module: the same outputs and weights, masks and all."
    torch.manual_seed(0)
    m = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    p = as_pruned(copy.deepcopy(m))
    x, kv = torch.randn(3, 5, 16), torch.randn(3, 5, 16) if batch_first else torch.randn(7, 5, 16)
    n, l, s = (3, 5, 5) if batch_first else (5, 3, 7)
    pad = torch.rand(n, s) > 0.6
    pad[:, 0] = False
    calls = [dict(), dict(key_padding_mask=pad), dict(key_padding_mask=pad.float() * -2.),
             dict(attn_mask=torch.randn(l, s)), dict(attn_mask=torch.rand(l, s) > 0.7),
             dict(attn_mask=torch.randn(n * 4, l, s), average_attn_weights=False),
             dict(need_weights=False, attn_mask=torch.randn(l, s), key_padding_mask=pad.float())]
    with torch.no_grad():
        for kw in calls:
            (a, wa), (b, wb) = m(x, kv, kv, **kw), p(x, kv, kv, **kw)
            assert max_rel_diff(a, b) < 1e-5, kw
            assert (wa is None) == (wb is None) and (wa is None or max_rel_diff(wa, wb) < 1e-5), kw
        (a, wa), (b, wb) = m(x[0], x[0], x[0]), p(x[0], x[0], x[0])   # unbatched
        assert max_rel_diff(a, b) < 1e-5 and max_rel_diff(wa, wb) < 1e-5


def test_torchvision_vit_loses_heads():
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight)   # torchvision starts it at zero
    x = torch.randn(2, 3, 32, 32)
    sp = Sparsifier(model, 'filter', 'local', 'l1', (nn.Conv2d, nn.Linear), example_input=x)
    assert 'encoder.layers.encoder_layer_0.self_attention' in sp.layers
    sp.sparsify(50)
    pruned = Pruner(example_input=x).prune_model(model)
    assert [l.self_attention.num_heads for l in pruned.encoder.layers] == [2, 2]
    assert [l.mlp[0].out_features for l in pruned.encoder.layers] == [32, 32]
    with torch.no_grad(): assert max_rel_diff(model(x), pruned(x)) < 1e-5


class Encoder(nn.Module):
    "nn.TransformerEncoder of two layers (4 heads of 8, a feed-forward of 64) between a token embedding and a head."
    def __init__(self, norm_first=False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True, norm_first=norm_first)
        self.embed, self.enc, self.head = nn.Linear(12, 32), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(32, 3)

    def forward(self, x): return self.head(self.enc(self.embed(x))[:, 0])


@pytest.mark.parametrize('norm_first', [False, True])
def test_transformer_encoder_loses_heads_and_feed_forward_width(norm_first):
    "torch.nn's transformer blocks are followed inside; in inference the pruned ones take the plain path, not the fused one."
    torch.manual_seed(0)
    model, x = Encoder(norm_first).eval(), torch.randn(2, 5, 12)
    Sparsifier(model, 'filter', 'local', 'l1', nn.Linear, example_input=x).sparsify(50)
    pruned = Pruner(example_input=x).prune_model(model)
    assert [(l.self_attn.num_heads, l.linear1.out_features) for l in pruned.enc.layers] == [(2, 32), (2, 32)]
    with torch.no_grad():
        y = torch.randn(3, 9, 12)
        for t in (x, y): assert max_rel_diff(model(t), pruned(t)) < 1e-5
    again = Sparsifier(pruned, 'head', example_input=x)   # a pruned attention is traced and pruned again
    again.sparsify(50)
    twice = Pruner(example_input=x).prune_model(pruned)
    assert [l.self_attn.num_heads for l in twice.enc.layers] == [1, 1]
    with torch.no_grad(): assert max_rel_diff(pruned(x), twice(x)) < 1e-5


def test_transformer_decoder_cross_attention_stays_with_the_reason():
    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.t = nn.Linear(12, 32), nn.Transformer(32, 4, 1, 1, 64, batch_first=True)
            self.head = nn.Linear(32, 3)

        def forward(self, x):
            e = self.embed(x)
            return self.head(self.t(e, e)[:, 0])

    torch.manual_seed(0)
    model, x = Seq2Seq().eval(), torch.randn(2, 5, 12)
    sp = Sparsifier(model, 'filter', 'local', 'l1', nn.Linear, example_input=x)
    assert 'attends to a key or value other than its query' in sp.frozen['t.decoder.layers.0.multihead_attn']
    sp.sparsify(50)
    pruned = Pruner(example_input=x).prune_model(model)
    layer = pruned.t.decoder.layers[0]
    assert (layer.self_attn.num_heads, layer.multihead_attn.num_heads, type(layer.multihead_attn)) == \
        (2, 4, nn.MultiheadAttention)
    with torch.no_grad(): assert max_rel_diff(model(x), pruned(x)) < 1e-5



def _swin(v2):
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
    kw = {'block': SwinTransformerBlockV2, 'downsample_layer': PatchMergingV2} if v2 else {}
    return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10, **kw).eval()   # block 1 of each stage shifts its windows


def _maxvit():
    from torchvision.models.maxvit import MaxVit
    return MaxVit(input_size=(64, 64), stem_channels=16, partition_size=4, block_channels=[32, 64], block_layers=[1, 1],
                  head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval()   # 4 heads, then 8; window and grid


@pytest.mark.parametrize('name', ['swin', 'swin_v2', 'maxvit'])
def test_window_attention_loses_whole_heads_and_rebuilds(name):
    """torchvision's Swin (V1: a bias table per head; V2: logit scales and a bias MLP per head) and MaxViT (a bias
    table per head) in their pruned classes, which run with fewer heads than their input's width implies."""
    from fasterai.torchvision_attention import _PRUNED, heads_of
    make, size = (_maxvit, 64) if name == 'maxvit' else ((lambda: _swin(name == 'swin_v2')), 32)
    torch.manual_seed(0)
    model, x = make(), torch.randn(2, 3, size, size)
    Sparsifier(model, 'head', example_input=x).sparsify(50)
    pruner = Pruner(example_input=x)
    pruned = pruner.prune_model(model)
    attn = [m for m in pruned.modules() if type(m) in _PRUNED.values()]
    carried = kept_entries(model, pruner.kept)   # what learn.prune carries of the optimizer's state: per-head rows too
    per_head = 'cpb_mlp.2.weight' if name == 'swin_v2' else 'relative_position_bias_table'
    assert sum(k.endswith(per_head) for k in carried) == 4
    before, after = dict(model.named_parameters()), dict(pruned.named_parameters())
    for k, idx in carried.items():   # the entries carried are the ones the pruned model holds
        assert torch.equal(before[k].detach().flatten()[idx], after[k].detach().flatten()), k
    dense = [m for m in model.modules() if type(m) in _PRUNED]
    assert len(attn) == len(dense) == 4 and not any(type(m) in _PRUNED for m in pruned.modules())
    assert [heads_of(a) for a in attn] == [(h // 2, d) for h, d in map(heads_of, dense)]
    for a in attn:
        if name == 'swin_v2': assert (a.logit_scale.shape[0], a.cpb_mlp[2].out_features) == (a.num_heads,) * 2
        else: assert a.relative_position_bias_table.shape[1] == heads_of(a)[0]
    with torch.no_grad(): assert max_rel_diff(model(x), pruned(x)) < 1e-5
    fresh = rebuild_pruned(make(), pruned_config(pruned))
    assert [type(m) for m in fresh.modules() if type(m) in _PRUNED.values()] == [type(a) for a in attn]
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad(): assert max_rel_diff(pruned(x), fresh(x)) < 1e-6
    assert not any(type(m) in _PRUNED.values() for m in rebuild_pruned(make(), pruned_config(make())).modules())


def test_heads_in_an_encoder_that_nests_padded_batches_stay_with_the_reason():
    "nn.TransformerEncoder(enable_nested_tensor=True) runs padded batches as nested tensors, in torch's fused kernel only."
    torch.manual_seed(0)
    model, x = Encoder().eval(), torch.randn(2, 5, 12)
    model.enc.use_nested_tensor = True   # (torch's default when the layers allow it)
    sp = Sparsifier(model, 'filter', 'local', 'l1', nn.Linear, example_input=x)
    assert "turns a padded batch into nested tensors" in sp.frozen['enc.layers.0.self_attn']
    sp.sparsify(50)
    pruned = Pruner(example_input=x).prune_model(model)
    assert [type(l.self_attn) for l in pruned.enc.layers] == [nn.MultiheadAttention] * 2
    assert [l.linear1.out_features for l in pruned.enc.layers] == [32, 32]   # the feed-forward width still prunes
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():   # the nested path, in both
        a = model.enc(model.embed(x), src_key_padding_mask=pad)
        b = pruned.enc(pruned.embed(x), src_key_padding_mask=pad)
    assert max_rel_diff(a, b) < 1e-5


@pytest.mark.parametrize('make', [Block, Encoder])
@pytest.mark.parametrize('budget', ['macs', 'params'])
def test_budget_cost_of_attention_is_the_pruned_models(make, budget):
    "The cost model splits nn.MultiheadAttention's MACs: in-projection, out-projection, the heads' attention."
    from fasterai.report import count_macs, count_params
    from fasterai.sparsifier import MACs, Params
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(2, 5, 12)
    b = MACs(0.5) if budget == 'macs' else Params(0.5)
    cost = (lambda m: count_macs(m, x)) if budget == 'macs' else count_params
    sp = Sparsifier(model, 'filter', 'local', 'l1', nn.Linear, example_input=x)
    sp.sparsify(b)
    predicted = sp.cost_ratio(b)
    pruned = Pruner(example_input=x).prune_model(model)
    assert [type(m) for m in pruned.modules() if isinstance(m, nn.MultiheadAttention)] and \
        all(type(m) is PrunedMultiheadAttention for m in pruned.modules() if isinstance(m, nn.MultiheadAttention))
    assert abs(predicted - cost(pruned) / cost(make().eval())) < 1e-9


def test_n_m_over_linear_leaves_the_packed_projection_alone():
    model = Block().eval()
    sp = Sparsifier(model, '2:4', 'local', 'l1', nn.Linear, example_input=(2, 5, 12))
    assert 'attn' not in sp.layers and 'attn.out_proj' in sp.layers
    assert 'attn' in Sparsifier(Block(), 'weight', 'local', 'l1', nn.Linear, example_input=(2, 5, 12)).layers


def test_pruned_attention_refuses_a_per_head_mask_for_other_heads():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 5, 12)
    Sparsifier(model, 'head', example_input=x).sparsify(50)
    attn = Pruner(example_input=x).prune_model(model).attn   # 2 heads of 4 kept
    h = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r'attn_mask has 8 per-head rows; this attention has 2 heads \(pruned: give 4'):
        attn(h, h, h, attn_mask=torch.zeros(8, 5, 5))
    assert attn(h, h, h, attn_mask=torch.zeros(4, 5, 5))[0].shape == (2, 5, 16)


def test_latency_table_times_attention_called_by_keyword_and_with_its_inputs_cut():
    "Timing halves: nn.MultiheadAttention called with query=, key=, value=; its input features cut in all three."
    from fasterai.sparsifier import Latency
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12)
    for model, exclude in ((Block(call=lambda a, t: a(query=t, key=t, value=t, need_weights=False)[0]), ()),
                           (Block(residual=False), ('attn',))):   # heads left whole, the input features cut
        sp = Sparsifier(model.eval(), 'filter', 'local', 'l1', nn.Linear, example_input=x, exclude=exclude)
        assert sp.cost_model(Latency(0.8, batch_size=4)).dense > 0


def test_prune_every_keeps_pruning_attention_heads_through_a_fit():
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from torch.utils.data import TensorDataset

    from fasterai.callback import SparsifyCallback
    torch.manual_seed(0)
    ds = lambda n: TensorDataset(torch.randn(n, 5, 12), torch.randint(0, 3, (n,)))
    learn = Learner(DataLoaders.from_dsets(ds(64), ds(16), bs=16), Encoder(), loss_func=nn.CrossEntropyLoss())
    learn.fit(2, 1e-3, cbs=SparsifyCallback(50, 'head', prune_every=1))
    assert [l.self_attn.num_heads for l in learn.model.enc.layers] == [2, 2]
    assert all(type(l.self_attn) is PrunedMultiheadAttention for l in learn.model.enc.layers)
