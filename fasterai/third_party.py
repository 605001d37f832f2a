"""Layers of other libraries that fasterai knows: timm's norm-act layers, same-padding and weight-standardised
convolutions, its Linear and DropPath, fastai's ToTensorBase. Each library's layers are registered (through the one registry,
`layers.register_layer`, and the rule tables of `ops`) the first time a model holding its modules is checked, so
importing fasterai imports neither library."""
import torch.nn as nn

from .layers import register_layer
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
    register_layer(Attention, rule=attention(lambda m: (m.num_heads, m.head_dim), _timm_attention_differs),
                   sizes={'heads': 'attn_dim'}, weight=None, vectors=(), shrink=shrink_heads)
    ACT_KEEPS.update({act.Swish, act.Mish, act.Tanh, act.HardSwish, act.HardMish, act.GELU, act.GELUTanh,
                      act.QuickGELU})
    ACT_MOVES.update({act.Sigmoid, act.HardSigmoid})


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


def _fastai():
    from fastai.layers import ToTensorBase
    MODULE_RULES[ToTensorBase] = keep   # changes the tensor's class, not its values (DynamicUnet's last layer)


_LOADERS = {'timm': _timm, 'fastai': _fastai}
_LOADED = set()


def load_for(model):
    "Register the layers of the libraries `model`'s modules come from (timm, fastai), once per process."
    for lib in {type(m).__module__.partition('.')[0] for m in model.modules()} & set(_LOADERS) - _LOADED:
        _LOADERS[lib]()
        _LOADED.add(lib)
