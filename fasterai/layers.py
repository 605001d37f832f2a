"""One registry of layer kinds: everything the library knows of a layer type, in one place.

A `LayerKind` says how a call of the layer maps channels (its channel-graph rule), which of its tensors hold a
channel (the weight's rows along `out_dim`, the per-channel `vectors` and `buffers` that go with them), which
attributes count its channels, whether its output has its input's shape, and whether it may lose input channels.
The channel graph, shape propagation, the Sparsifier, the Pruner and `export` all read `kind_of(module)`.

Types match exactly. A subclass of a known layer is not its base (its own forward may standardise the weight,
fuse an activation, ...): the tracer keeps it whole and freezes its channels, saying how to register it. Teach
the library a layer with `register_layer`:

    register_layer(MyConv, like=nn.Conv2d)                  # maps channels as its base does
    register_layer(WSConv2d, like=nn.Conv2d, inputs=False)  # weight standardisation: its inputs must all stay
    register_layer(FusedConvBN, like=nn.Conv2d, vectors=('bn_weight', 'bn_bias'),
                   buffers=('running_mean', 'running_var'))  # per-channel tensors of its own
"""
import inspect
from dataclasses import dataclass, fields, replace
from typing import Callable, Optional

import torch
import torch.nn as nn

from .mha import PrunedMultiheadAttention, rebuilt
from .ops import FUNCTION_RULES, METHOD_RULES, batchnorm, conv, groupnorm, linear, mha
from .surgery import shrink_conv, shrink_groupnorm, shrink_mha, shrink_sliced

__all__ = ['LayerKind', 'LAYERS', 'SPLITS', 'kind_of', 'register_layer', 'register_op', 'register_split', 'resize_splits',
           'known_base', 'shrink', 'param_dim']


@dataclass(frozen=True)
class LayerKind:
    """What the library knows of one layer type (see the module docstring)."""
    rule: Callable                  # the channel-graph rule of a call: `ops.conv`, `ops.linear`, `ops.batchnorm`...
    sizes: dict                     # role ('out', 'in', 'norm') -> the attribute that counts its channels
                                    # (or a function of the module that counts them)
    weight: Optional[str] = 'weight'   # the parameter whose rows are output channels (None: a norm)
    out_dim: int = 0                # the dim of `weight` holding the output channels (1: transposed convolutions)
    vectors: tuple = ('bias',)      # per-channel parameters that go with a channel (a norm's scale and shift)
    buffers: tuple = ()             # per-channel buffers sliced with a channel (running statistics)
    same_shape: bool = False        # its output has its input's shape, dtype and layout
    inputs: bool = True             # removing a zero input channel leaves its output unchanged (False:
                                    # weight standardisation normalises each row over all its inputs)
    shrink: Callable = shrink_sliced   # (module, kind, **{role: kept indices}): keep those channels, in place
    rebuilt: Optional[Callable] = None   # (module): make a module given recorded sizes compute with them (export)
    heads_of: Optional[Callable] = None   # (module) -> (heads, channels per head) of an attention module, read
                                          # from what pruning its children leaves alone
    per_head: tuple = ()            # (parameter name, dim) of an attention module's tensors with an entry per head

    @property
    def in_dim(self):
        "The dim of `weight` holding the input channels."
        return 1 - self.out_dim

    def rows(self, role):
        "(parameter name, dim) of every parameter holding the channels of `role` ('out', 'dw' or 'norm'; 'heads': none)."
        if role == 'heads': return []
        own = [(self.weight, self.out_dim)] if self.weight and role != 'norm' else []
        return own + [(v, 0) for v in self.vectors]

    def zero_when_dead(self, module, role):
        """(name, tensor) of the per-channel tensors that must be zero for a channel of `role` to go: the vectors;
        a norm without them (no affine parameters) must have a zero running mean."""
        out = [(v, getattr(module, v)) for v in self.vectors if getattr(module, v, None) is not None]
        if out or role != 'norm': return out
        return [(b, getattr(module, b)) for b in self.buffers[:1] if getattr(module, b, None) is not None]

    def channels(self, module, role):
        "How many channels `module` has on the side of `role`."
        size = self.sizes['out' if role == 'dw' else role]
        return size(module) if callable(size) else getattr(module, size)

    def size_attrs(self):
        "The attributes a shrink may change (what export records)."
        named = (a for a in self.sizes.values() if isinstance(a, str))
        return tuple(dict.fromkeys((*named, 'groups', 'num_groups', 'num_heads', 'n_heads', 'head_dim', 'kdim',
                                    'vdim')))   # (head counts: torchvision's MaxViT names its n_heads)


_CONV = LayerKind(conv, {'out': 'out_channels', 'in': 'in_channels'}, shrink=shrink_conv)
_MHA = LayerKind(mha, {'in': 'embed_dim', 'out': lambda m: m.in_proj_weight.shape[0],
                       'heads': lambda m: m.num_heads * m.head_dim},
                 weight='in_proj_weight', vectors=('in_proj_bias',), shrink=shrink_mha, rebuilt=rebuilt)
_NORM = LayerKind(batchnorm, {'norm': 'num_features'}, weight=None, vectors=('weight', 'bias'),
                  buffers=('running_mean', 'running_var'), same_shape=True)

LAYERS = {
    nn.Conv1d: _CONV, nn.Conv2d: _CONV, nn.Conv3d: _CONV,
    **{t: replace(_CONV, out_dim=1, shrink=shrink_sliced)
       for t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)},
    nn.Linear: LayerKind(linear, {'out': 'out_features', 'in': 'in_features'}),
    nn.BatchNorm1d: _NORM, nn.BatchNorm2d: _NORM, nn.BatchNorm3d: _NORM,
    nn.InstanceNorm1d: _NORM, nn.InstanceNorm2d: _NORM, nn.InstanceNorm3d: _NORM,
    nn.SyncBatchNorm: _NORM,   # fastai's distrib_ctx converts BatchNorms to it: per channel, as they are
    nn.MultiheadAttention: _MHA, PrunedMultiheadAttention: _MHA,   # self-attention: whole heads go
    nn.GroupNorm: replace(_NORM, rule=groupnorm, sizes={'norm': 'num_channels'}, buffers=(), shrink=shrink_groupnorm),
}
"Exact layer type -> its LayerKind. Extend it with `register_layer`."


def kind_of(module):
    """The LayerKind of `module`'s exact type, or of the registered base it only sets up differently (a subclass
    that defines `__init__` and nothing its calls run: torchvision's Conv3DSimple), or None."""
    cls = type(module)
    kind = LAYERS.get(cls)
    if kind is not None: return kind
    if cls not in _PLAIN: _PLAIN[cls] = _same_calls(cls)
    return LAYERS[known_base(module)] if _PLAIN[cls] else None


_PLAIN = {}
"Class -> whether `_same_calls` holds for it (cleared by `register_layer`)."


def known_base(module):
    "The nearest registered base class of an unregistered subclass of a known layer, or None."
    if type(module) in LAYERS: return None
    return next((c for c in type(module).__mro__[1:] if c in LAYERS), None)


def _same_calls(cls):
    """Whether `cls`, a subclass of a registered layer type, computes as that base does: the classes between them
    define no method (`__init__` and static or class methods aside) and no property, so calling one runs the
    base's code on the attributes `__init__` set, which the base's rule reads."""
    base = next((c for c in cls.__mro__[1:] if c in LAYERS), None)
    if base is None: return False
    for c in cls.__mro__[:cls.__mro__.index(base)]:
        for name, v in vars(c).items():
            if isinstance(v, property) or (inspect.isfunction(v) and name != '__init__'): return False
    return True


def param_dim(module, pname):
    "The dim of `module`'s parameter `pname` that holds its output channels (the weight's `out_dim`, else 0)."
    kind = kind_of(module)
    return kind.out_dim if kind is not None and pname == kind.weight else 0


def register_layer(cls, like=None, **changes):
    """Teach fasterai the layer type `cls` and return its LayerKind: `like` a registered type whose description it
    shares, with `changes` to any LayerKind field; without `like`, `changes` are a whole LayerKind's fields."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f'register_layer takes an nn.Module subclass, got {cls!r}')
    if cls.__name__ == 'Parametrized' + cls.__bases__[0].__name__:
        raise ValueError(f'{cls.__name__} is the class torch.nn.utils.parametrize makes for one module (its tensors are '
                         'computed): remove the parametrizations before sparsifying and pruning instead')
    names = {f.name for f in fields(LayerKind)}
    bad = sorted(set(changes) - names)
    if bad: raise ValueError(f'unknown LayerKind fields {bad}: choose from {sorted(names)}')
    if like is not None and like not in LAYERS:
        raise ValueError(f'like must be a registered layer type, got {like!r}: choose from '
                         f'{sorted(t.__name__ for t in LAYERS)}')
    try:
        kind = replace(LAYERS[like], **changes) if like is not None else LayerKind(**changes)
    except TypeError as e:
        raise ValueError(f'register_layer({cls.__name__}) needs like=<a registered type> or every required '
                         f'LayerKind field (rule, sizes): {e}') from None
    LAYERS[cls] = kind
    _PLAIN.clear()
    return kind


def register_op(op, like):
    """Teach fasterai a function, or a tensor method by name, that moves channels as the known `like` does:
    `register_op(torch.square, like=F.relu)` (keeps a zero channel zero, channel for channel), or
    `register_op('square', like='relu')` for the method. (fx records a function of your own as a call only when
    it is wrapped with `torch.fx.wrap`; otherwise it traces through it.)"""
    table = lambda f: METHOD_RULES if isinstance(f, str) else FUNCTION_RULES
    if not (isinstance(op, str) or callable(op)):
        raise ValueError(f'register_op takes a function or a method name, got {op!r}')
    rule = table(like).get(like)
    if rule is None:
        known = sorted(getattr(f, '__name__', str(f)) for f in table(like))
        raise ValueError(f'like must be a function or method name fasterai knows, got {like!r}: choose from {known}')
    table(op)[op] = rule
    return rule


SPLITS = {}
"""Module class -> `resize(module)`: modules whose forward splits channels into equal parts by sizes they hold (see
`register_split`)."""


def register_split(cls, resize):
    """Teach fasterai a module whose forward splits its channels into equal parts by a size it holds in an attribute
    (timm's CSP stages: `x.split(self.expand_chs // 2, dim=1)`; Res2Net: `torch.split(out, self.width, 1)`). fx sees
    only the number, which pruning would not change; inside `cls` the graph follows such a split as `chunk` (channel
    t of every part tied, so the parts keep equal counts), and once a model is pruned (or rebuilt from a pruned
    config) `resize(module)` sets the attribute from its layers' new sizes."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or not callable(resize):
        raise ValueError(f'register_split takes a module class and a function of a module, got {cls!r}, {resize!r}')
    SPLITS[cls] = resize


def resize_splits(model):
    "Set the split sizes of every module of `model` registered with `register_split` from its layers' sizes."
    for m in model.modules():
        if type(m) in SPLITS: SPLITS[type(m)](m)


def shrink(module, keep):
    "Shrink `module` in place to the channels `keep` gives per role ('out', 'in', 'norm', 'dw')."
    kind = kind_of(module)
    if kind is None:
        raise TypeError(f'cannot shrink a {type(module).__name__}: register it with fasterai.register_layer '
                        f'(registered: {sorted(t.__name__ for t in LAYERS)})')
    with torch.no_grad():
        kind.shrink(module, kind, **{'inp' if r == 'in' else r: idx for r, idx in keep.items()})
