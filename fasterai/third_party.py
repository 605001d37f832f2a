"""Layers of other libraries that fasterai knows: timm's norm-act layers, same-padding and weight-standardised
convolutions, its Linear and DropPath, its attention (ViT's, Swin's windows), torchvision's Swin attention, fastai's
ToTensorBase. Each library's layers are registered (through the one registry,
`layers.register_layer`, and the rule tables of `ops`) the first time a model holding its modules is checked, so
importing fasterai imports neither library."""
import math

import torch.nn as nn

from .layers import register_layer, register_split
from .ops import MODULE_RULES, ZERO_KEEPING, ZERO_MOVING, Unhandled, attention, batchnorm, groupnorm, keep
from .surgery import shrink_heads

__all__ = ['load_for', 'norm_act', 'ACT_KEEPS', 'ACT_MOVES']

ACT_KEEPS, ACT_MOVES = set(ZERO_KEEPING), set(ZERO_MOVING)
"Activation module types that map 0 to 0 (keep a zero channel zero), and those that map it elsewhere."


def norm_act(rule):
    """The rule of a norm followed by its own dropout and activation (timm's BatchNormAct2d, GroupNormAct): the norm's
    `rule`, then `drop` and `act` keep the zeros or move them (a sigmoid), by their type."""
    def normact(ctx, node):
        lay, m = rule(ctx, node), ctx.module(node)
        for part in (getattr(m, 'drop', None), getattr(m, 'act', None)):
            if lay is None or part is None: continue
            if type(part) in ACT_MOVES: lay = lay.marked(node.name)
            elif type(part) not in ACT_KEEPS:
                raise Unhandled(f'{type(m).__name__} ends in {type(part).__name__}, not known to keep zeros zero '
                                '(fasterai.third_party.ACT_KEEPS lists those that do)')
        return lay
    normact.__name__ = f'{rule.__name__}_act'
    return normact


def _timm():
    from timm.layers import activations as act
    from timm.layers import norm_act as na
    from timm.layers import std_conv as sc
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.drop import DropPath
    from timm.layers.linear import Linear
    bn_act, gn_act = norm_act(batchnorm), norm_act(groupnorm)
    register_layer(na.BatchNormAct2d, like=nn.BatchNorm2d, rule=bn_act)
    register_layer(na.SyncBatchNormAct, like=nn.BatchNorm2d, rule=bn_act)
    register_layer(na.GroupNormAct, like=nn.GroupNorm, rule=gn_act)
    register_layer(na.GroupNorm1Act, like=nn.GroupNorm, rule=gn_act)   # one group: frozen by groupnorm's rule
    register_layer(Conv2dSame, like=nn.Conv2d)   # pads like TensorFlow, then convolves: channels as a Conv2d
    register_layer(Linear, like=nn.Linear)   # casts its weight for torchscript, else F.linear: a Linear
    # weight standardisation: a zero row stays zero ((0 - 0) / sqrt(0 + eps)), but each row is normalised over
    # all its inputs, so no input column may go; ScaledStdConv2d's per-row gain goes with its row
    for cls in (sc.StdConv2d, sc.StdConv2dSame):
        register_layer(cls, like=nn.Conv2d, inputs=False)
    for cls in (sc.ScaledStdConv2d, sc.ScaledStdConv2dSame):
        register_layer(cls, like=nn.Conv2d, inputs=False, vectors=('bias', 'gain'))
    MODULE_RULES[DropPath] = keep   # scales whole samples: zeros stay zero
    from timm.layers.attention import Attention
    from timm.layers.norm import LayerNorm
    _PER_HEAD_NORMS.add(LayerNorm)   # F.layer_norm over the last dim, as nn.LayerNorm
    heads = lambda m: (m.num_heads, m.head_dim)
    register_layer(Attention, rule=attention(heads, _timm_attention_differs), sizes={'heads': 'attn_dim'},
                   weight=None, vectors=(), shrink=shrink_heads, heads_of=heads)
    from timm.models.swin_transformer import WindowAttention
    window = lambda m: (m.num_heads, round(m.scale ** -2))   # (its head_dim is only in its scale, head_dim ** -0.5)
    register_layer(WindowAttention, rule=attention(window, _window_attention_differs, masks=True),
                   sizes={'heads': lambda m: window(m)[0] * window(m)[1]}, weight=None, vectors=(),
                   shrink=shrink_heads, heads_of=window, per_head=(('relative_position_bias_table', 1),))
    from timm.models.tiny_vit import Attention as TinyAttention
    tiny = lambda m: (m.num_heads, m.val_dim)
    register_layer(TinyAttention, rule=attention(tiny, _tiny_attention_differs, parts_of=lambda m: (
                       m.key_dim, m.key_dim, m.val_dim), norm='norm'), sizes={'heads': 'out_dim'}, weight=None,
                   vectors=(), shrink=_shrink_tiny_heads, heads_of=tiny, per_head=(('attention_biases', 0),))
    ACT_KEEPS.update({act.Swish, act.Mish, act.Tanh, act.HardSwish, act.HardMish, act.GELU, act.GELUTanh,
                      act.QuickGELU})
    ACT_MOVES.update({act.Sigmoid, act.HardSigmoid})
    # splits sized by an attribute: CSP stages halve their expanded channels, Res2Net cuts `scale` parts of `width`
    from timm.models.cspnet import CrossStage, CrossStage3
    from timm.models.res2net import Bottle2neck
    for cls in (CrossStage, CrossStage3):
        register_split(cls, lambda m: setattr(m, 'expand_chs', _out_channels(m.conv_exp)))
    register_split(Bottle2neck, lambda m: setattr(m, 'width', m.conv1.out_channels // m.scale))


def _out_channels(m):
    "The channels a conv block writes (timm's ConvNormAct holds its conv as `.conv`)."
    return getattr(m, 'conv', m).out_channels


_PER_HEAD_NORMS = {nn.LayerNorm}
"Norm types an attention module may apply to each head's q or k (over head_dim): timm adds its LayerNorm."


def _timm_attention_differs(m):
    "Why timm's Attention `m` computes anything but independent heads (a gate, a norm across heads), or None."
    if getattr(m, 'gate', None) is not None: return 'gates its heads with another Linear layer'
    if type(m.norm) is not nn.Identity: return f'normalises across its heads ({type(m.norm).__name__})'
    for qk in (m.q_norm, m.k_norm):   # a norm over each head's own features is shared by every head: it stays
        if not (type(qk) is nn.Identity or
                (type(qk) in _PER_HEAD_NORMS and tuple(qk.normalized_shape) == (m.head_dim,))):
            return f'normalises q or k with {type(qk).__name__}, not known to act per head'
    return None


def _window_attention_differs(m):
    "Why timm's Swin `WindowAttention` `m` computes anything but independent heads with a bias per head, or None."
    if tuple(m.relative_position_bias_table.shape[1:]) != (m.num_heads,):
        return 'has a relative-position bias table that is not one column per head'
    if type(m.softmax) is not nn.Softmax or m.softmax.dim not in (-1, 3):
        return 'normalises its scores otherwise than a softmax over the keys'
    return None


def _torchvision():
    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention as MaxViTAttention
    from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

    from .torchvision_attention import _PRUNED, heads_of
    for cls, per_head, names in (
            (ShiftedWindowAttention, (('relative_position_bias_table', 1),), ('qkv', 'proj')),
            (ShiftedWindowAttentionV2, (('logit_scale', 0), ('cpb_mlp.2.weight', 0)), ('qkv', 'proj')),
            (MaxViTAttention, (('relative_position_bias_table', 1),), ('to_qkv', 'merge'))):
        register_layer(cls, rule=attention(heads_of, qkv=names[0], proj=names[1]), weight=None, vectors=(),
                       sizes={'heads': lambda m: math.prod(heads_of(m))}, shrink=_shrink_tv_heads, heads_of=heads_of,
                       per_head=per_head, rebuilt=_rebuilt_tv)
        register_layer(_PRUNED[cls], like=cls)


def _shrink_tv_heads(m, kind, heads=None):
    """torchvision's Swin or MaxViT attention loses whole heads: it becomes its pruned class (`torchvision_attention`),
    which keeps its head size as `head_dim`, then its head count, bias table (Swin V1, MaxViT) or logit scales and
    bias MLP rows (Swin V2) follow the heads."""
    from .torchvision_attention import as_pruned
    as_pruned(m)
    shrink_heads(m, kind, heads, count='n_heads' if hasattr(m, 'n_heads') else 'num_heads')
    if hasattr(m, 'cpb_mlp'): m.cpb_mlp[-1].out_features = m.num_heads


def _rebuilt_tv(m):
    """A Swin or MaxViT attention module given a pruned config as its pruned class, when its joined heads are no
    longer as wide as its input (torchvision's forward then cannot run)."""
    from .torchvision_attention import as_pruned, heads_of
    width = (m.qkv if hasattr(m, 'qkv') else m.to_qkv).in_features
    if math.prod(heads_of(m)) != width: as_pruned(m)
    return m


def _tiny_attention_differs(m):
    "Why TinyViT's `Attention` `m` computes anything but independent heads with a bias per head, or None."
    if tuple(m.attention_biases.shape[:1]) != (m.num_heads,): return 'has attention biases that are not one row per head'
    if type(m.norm) is not nn.LayerNorm: return f'normalises its input with {type(m.norm).__name__}'
    return None


def _shrink_tiny_heads(m, kind, heads=None):
    "TinyViT's attention loses whole heads (with their rows of `attention_biases`); its cached biases are dropped."
    shrink_heads(m, kind, heads)
    m.attention_bias_cache = {}   # (its train() and _apply() clear it too; the Pruner's tracing switches modes)


def _fastai():
    from fastai.layers import ToTensorBase
    MODULE_RULES[ToTensorBase] = keep   # changes the tensor's class, not its values (DynamicUnet's last layer)


_LOADERS = {'timm': _timm, 'fastai': _fastai, 'torchvision': _torchvision}
_LOADED = set()


def load_for(model):
    "Register the layers of the libraries `model`'s modules come from (timm, fastai), once per process."
    for lib in {type(m).__module__.partition('.')[0] for m in model.modules()} & set(_LOADERS) - _LOADED:
        _LOADERS[lib]()
        _LOADED.add(lib)
