"""How each traced operation moves channels: the rules `graph.trace` dispatches to, by identity.

A rule takes the trace context and an fx node and returns the node's output `Layout` (None when the output
carries no tracked channels, a tuple of layouts for ops that return several tensors). Rules are looked up
by exact module type, function object or method name. A rule that meets a case it cannot follow raises
`Unhandled`; the graph then freezes every group the node touches, with the reason.

Each piece of a layout also says whether its channels are exactly zero once their group is zeroed upstream
(`nonzero` is None) or which node makes them non-zero (a sigmoid, an added constant). A layer that reads a
non-zero piece freezes its group: removing those channels would change what it computes.
"""
from __future__ import annotations

import inspect
import itertools
import math
import operator
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .routing import Cat, Chunk, Parts, Shuffle, route_of

__all__ = ['Piece', 'Layout', 'SizeOf', 'Count', 'Unhandled', 'COUNT_RULES', 'MODULE_RULES', 'FUNCTION_RULES',
           'METHOD_RULES', 'INPLACE', 'is_inplace', 'conv', 'linear', 'batchnorm', 'groupnorm', 'attention']


class Unhandled(Exception):
    "A rule cannot follow the channels through this node: the graph freezes what the node touches."


class Piece(NamedTuple):
    "Channels [start, stop) of one channel space, in order."
    space: int
    start: int
    stop: int
    nonzero: Optional[str] = None   # the node that makes them non-zero when their group is zeroed, if any


@dataclass(frozen=True)
class Layout:
    """Where a traced tensor carries group channels: its channel dim, the pieces along it, and the block."""
    dim: int         # the channel dimension (non-negative)
    pieces: tuple    # Pieces in order along `dim`
    block: int = 1   # consecutive elements per channel along `dim` (H*W after a flatten)
    route: object = field(default=None, compare=False)   # how a channel shuffle laid them out (`routing`), or None

    @property
    def channels(self):
        return sum(p.stop - p.start for p in self.pieces)

    def moved(self, dim): return replace(self, dim=dim)

    def marked(self, who):
        "The same channels, now non-zero because of node `who` (kept if already marked)."
        return replace(self, pieces=tuple(p if p.nonzero else p._replace(nonzero=who) for p in self.pieces))

    def cleared(self):
        "The same channels, exactly zero again (a zeroed per-channel affine layer rewrites them)."
        return replace(self, pieces=tuple(p._replace(nonzero=None) for p in self.pieces))


class SizeOf(NamedTuple):
    "A traced tensor's size: indexing it at the channel dim reads a `Count`."
    layout: Layout
    ndim: int


class Count(NamedTuple):
    """A traced tensor's channel count read as a number (`b, c, h, w = x.size()`): pruning changes it, so it
    may only size the channel dim of a reshape or expand of tensors whose channels become the same ones. `div`:
    the count divided by that (`c // groups`), which may only size the channels of a reshape into `div` parts."""
    layout: Layout
    div: int = 1


# ---------------------------------------------------------------- helpers
def _arg(node, i, name, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _dim(d, ndim):
    return d + ndim if d < 0 else d


def _only_first(ctx, node):
    "The layout of the node's first input; any other tracked tensor among the arguments is unhandled."
    if ctx.tracked((node.args[1:], node.kwargs)):
        raise Unhandled('combines the channels with another tracked tensor')
    return ctx.layout(node)


def _same_channels(ctx, node, lay):
    "Check the op kept the channel dim where it was and as long as it was."
    src, out = ctx.shape(node.args[0]), ctx.shape(node)
    if out is None or len(out) != len(src) or out[lay.dim] != src[lay.dim]:
        raise Unhandled(f'changes the channel dim {lay.dim} ({tuple(src)} -> {None if out is None else tuple(out)})')
    return lay


# ---------------------------------------------------------------- element-wise and per-channel
def keep(ctx, node):
    "f(0) = 0 element-wise, pooling, dropout, casts: channels pass through unchanged."
    lay = _only_first(ctx, node)
    return None if lay is None else _same_channels(ctx, node, lay)


def _acts_on(k):
    def spatial(ctx, node):
        """Pooling or interpolation over the last `k` dims (all dims after 1 when k is None): the channels
        must lie before them, unflattened."""
        lay = _only_first(ctx, node)
        if lay is None: return None
        n = len(ctx.shape(node.args[0]))
        if lay.block != 1 or lay.dim >= (2 if k is None else n - k):
            raise Unhandled('pools or resizes along the channels')
        return _same_channels(ctx, node, lay)
    spatial.__name__ = f'spatial_{k}'
    return spatial


pool1d, pool2d, pool3d, resize = _acts_on(1), _acts_on(2), _acts_on(3), _acts_on(None)


def moves_zero(ctx, node):
    "f(0) != 0 (sigmoid, softplus): the channels pass through but are no longer zero."
    lay = keep(ctx, node)
    return None if lay is None else lay.marked(node.name)


def softmax(ctx, node):
    "Softmax over the channels mixes them; over another dim a zero channel becomes uniform, not zero."
    lay = _only_first(ctx, node)
    if lay is None: return None
    dim = _arg(node, 1, 'dim')
    if dim is None or _dim(dim, len(ctx.shape(node))) == lay.dim: raise Unhandled('softmax mixes the channels')
    return _same_channels(ctx, node, lay).marked(node.name)


def no_tensor(ctx, node):
    "Sizes, dtypes, devices: no channels flow through."
    return None


def batchnorm(ctx, node):
    """BatchNorm (and InstanceNorm, GroupNorm with a group per channel) on dim 1: sliced with its channels; with its scale and shift zeroed it
    outputs exact zeros."""
    lay = keep(ctx, node)
    if lay is None: return ctx.record(None, node, 'norm')   # all its channels stay, in every call
    m = ctx.module(node)
    if lay.dim != 1 or lay.block != 1: raise Unhandled(f'{type(m).__name__} normalises dim 1, not the tracked channels')
    ctx.record(lay, node, 'norm')
    if m.affine: return lay.cleared()
    # without scale and shift: (0 - running mean) / std in eval mode, 0 when only batch statistics are used
    return lay.marked(node.name) if getattr(m, 'track_running_stats', False) else lay


def groupnorm(ctx, node):
    """GroupNorm computes statistics across the channels of each group: frozen, unless each group is one
    channel (num_groups == num_channels), which is a per-channel norm like BatchNorm."""
    m = ctx.module(node)
    if m.num_groups != m.num_channels and ctx.layout(node) is not None:
        raise Unhandled(f'GroupNorm computes its statistics across the channels of each of its {m.num_groups} groups')
    return batchnorm(ctx, node)


def layernorm(ctx, node):
    "LayerNorm over the channels computes statistics across them: freeze; over other dims, pass through."
    lay = keep(ctx, node)
    if lay is None: return None
    if lay.dim >= len(ctx.shape(node)) - len(ctx.module(node).normalized_shape):
        raise Unhandled('LayerNorm computes its statistics across the channels')
    return lay.marked(node.name)


def _over_last(what, keeps_zero):
    """The rule of a norm over the last dims (F.layer_norm, F.rms_norm, nn.RMSNorm): over the channels it computes
    statistics across them (unhandled); over other dims a zero channel stays zero where `keeps_zero(ctx, node)`
    (no shift added), else it is marked non-zero."""
    def rule(ctx, node):
        lay = keep(ctx, node)
        if lay is None: return None
        shape = ctx.module(node).normalized_shape if node.op == 'call_module' else _arg(node, 1, 'normalized_shape')
        if lay.dim >= len(ctx.shape(node)) - (1 if isinstance(shape, int) else len(shape)):
            raise Unhandled(f'{what} computes its statistics across the channels')
        return lay if keeps_zero(ctx, node) else lay.marked(node.name)
    rule.__name__ = what.replace(' ', '_')
    return rule


layer_norm = _over_last('layer_norm', lambda ctx, node: _arg(node, 3, 'bias') is None)
rms_norm = _over_last('RMS norm', lambda ctx, node: True)   # x / sqrt(mean(x^2) + eps) * weight: 0 stays 0


def power(ctx, node):
    "x ** p (pow): zeros stay zero for a positive exponent; any other exponent makes them non-zero (or infinite)."
    p = _arg(node, 1, 'exponent')
    if isinstance(p, fx.Node): raise Unhandled('raises the channels to a tensor power')
    return keep(ctx, node) if isinstance(p, (int, float)) and p > 0 else moves_zero(ctx, node)


def hardtanh(ctx, node):
    "Hardtanh keeps zeros when 0 lies in [min_val, max_val]."
    lo, hi = ((ctx.module(node).min_val, ctx.module(node).max_val) if node.op == 'call_module'
              else (_arg(node, 1, 'min_val', -1.), _arg(node, 2, 'max_val', 1.)))
    return keep(ctx, node) if lo <= 0 <= hi else moves_zero(ctx, node)


def clamp(ctx, node):
    """clamp/clip keeps zeros when 0 lies between its bounds: numbers, or one-value tensors a module holds (read at
    trace time: Gemma 4's clippable Linear); bounds per channel are not followed."""
    def value(b):
        if isinstance(b, fx.Node):
            t = ctx.tensor_attr(b)
            if t is None or t.numel() != 1: raise Unhandled('clamps the channels to bounds computed in the forward or per channel')
            return float(t)
        return b
    lo, hi = (value(_arg(node, i, k)) for i, k in ((1, 'min'), (2, 'max')))
    return keep(ctx, node) if (lo is None or lo <= 0) and (hi is None or hi >= 0) else moves_zero(ctx, node)


def prelu(ctx, node):
    "PReLU keeps zeros; one slope per channel is not sliced yet."
    if ctx.module(node).num_parameters != 1: raise Unhandled('PReLU with one slope per channel')
    return keep(ctx, node)


# ---------------------------------------------------------------- layers that write channels
def _inputs(ctx, node, lay):
    """Record `lay` as the input channels of the layer called at `node`; a layer whose kind may not lose inputs
    (weight standardisation normalises each row over all of them) freezes them instead."""
    if lay is None or ctx.kind(node).inputs: return ctx.record(lay, node, 'in')
    ctx.freeze(lay, f"'{node.target}' ({type(ctx.module(node)).__name__}) is registered with inputs=False: removing "
                    'even a zero input channel changes what it computes')


def conv(ctx, node):
    """Conv1d/2d/3d, ConvTranspose1d/2d/3d: groups=1 reads its input channels and writes new ones; depthwise maps channel i to channel i;
    grouped convolutions tie the channels of their groups (each group keeps the same positions)."""
    m, lay = ctx.module(node), _only_first(ctx, node)
    spatial = getattr(m, ctx.kind(node).weight).dim() - 1   # dims after the channels' (Conv1d: 2, Conv3d: 4)
    if lay is not None and (lay.dim != len(ctx.shape(node.args[0])) - spatial or lay.block != 1 or
                            lay.channels != m.in_channels):
        raise Unhandled('the convolution does not read the tracked channels as its input channels')
    if ctx.kind(node).out_dim == 1 and m.groups != 1:
        raise Unhandled(f'grouped transposed convolution (groups={m.groups}) is not pruned')
    if m.groups == 1:
        _inputs(ctx, node, lay)
        out = ctx.new_layout(m.out_channels, len(ctx.shape(node)) - spatial)
        ctx.record(out, node, 'out')
        return out
    if m.groups == m.in_channels == m.out_channels and lay is not None:
        ctx.record(lay, node, 'dw')
        return lay.cleared()
    # grouped: conv group g reads input block g and writes output block g. Every block must keep the same
    # positions, so channel u of each block is tied to channel u of the others, on both sides.
    if lay is not None:
        per, sizes = m.in_channels // m.groups, {p.stop - p.start for p in lay.pieces}
        if len(lay.pieces) == 1 and not ctx.whole(lay.pieces[0]):   # a part of a space (Res2Net's split): every
            r = ctx.spaces.find(lay.pieces[0].space)                # channel tied to the one `per` further on
            size = ctx.spaces.size[r]
            ctx.spaces.tie_space(r, size // math.gcd(size, per), f"grouped conv '{node.target}' ties them")
        elif len(sizes) != 1 or not all(ctx.whole(p) for p in lay.pieces) or next(iter(sizes)) % per:
            raise Unhandled(f'grouped convolution (groups={m.groups}) reads channels whose blocks it cannot tie')
        else:
            for p in lay.pieces[1:]: ctx.spaces.unite(lay.pieces[0].space, p.space)
            ctx.spaces.tie_space(lay.pieces[0].space, next(iter(sizes)) // per, f"grouped conv '{node.target}' ties them")
    _inputs(ctx, node, lay)
    out = ctx.new_layout(m.out_channels, len(ctx.shape(node)) - spatial)
    ctx.spaces.tie_space(out.pieces[0].space, m.groups, f"grouped conv '{node.target}' ties them")
    ctx.record(out, node, 'out')
    return out


def linear(ctx, node):
    "Linear: reads the last dim (a flattened map reads blocks of features), writes a new space."
    m, lay = ctx.module(node), _only_first(ctx, node)
    if lay is not None and (lay.dim != len(ctx.shape(node.args[0])) - 1 or lay.channels * lay.block != m.in_features):
        raise Unhandled('the Linear layer does not read the tracked channels as its input features')
    _inputs(ctx, node, lay)
    out = ctx.new_layout(m.out_features, len(ctx.shape(node)) - 1)
    ctx.record(out, node, 'out')
    return out


class _Call(NamedTuple):
    "A call of a submodule inside a module kept whole, as `_Context.record` takes it."
    target: str
    name: str


def attention(heads_of, why_not=lambda m: None, qkv='qkv', proj='proj', masks=False, parts_of=None, norm=None):
    """The rule of a self-attention module kept whole: for x (..., C), Linear `qkv` writes 3 * H * D features, a
    q, k and v third each made of H heads of D; each head attends with its own q, k, v; Linear `proj` reads the
    heads joined (H * D). Its units are whole heads: head h is rows [h*D, (h+1)*D) of each third of `qkv` and those
    columns of `proj`. A head whose v rows are zero adds zero whatever its q and k, so removing it is exact.
    `heads_of(m)`: (H, D); `why_not(m)`: why this module computes anything else (a norm across the heads), or None;
    `masks`: its other arguments are masks added to every head's scores alike (Swin's shifted windows), allowed
    when they carry no tracked channels. `parts_of(m)`: (q, k, v widths) of a head when `qkv` writes each head's
    q, k and v together, head after head (TinyViT), instead of all q, then all k, then all v; D is then v's width.
    `norm`: the name of a norm it applies to its input across the channels first (its input channels stay)."""
    def rule(ctx, node):
        m = ctx.module(node)
        if masks:
            if ctx.tracked((node.args[1:], node.kwargs)): raise Unhandled('is called with tracked channels as a mask')
        elif any(a is not None and a is not False for a in (*node.args[1:], *node.kwargs.values())):
            raise Unhandled('is called with a mask or other arguments')   # (attn_mask=None is_causal=False are none)
        reason = why_not(m)
        if reason: raise Unhandled(reason)
        lay = _only_first(ctx, node)
        n = len(ctx.shape(node.args[0]))
        q, p, (h, d) = m.get_submodule(qkv), m.get_submodule(proj), heads_of(m)
        if not all(getattr(ctx.kind(_Call(f'{node.target}.{r}', '')), 'rule', None) is linear for r in (qkv, proj)):
            raise Unhandled(f'has {qkv} and {proj} that are not Linear layers')
        parts = parts_of(m) if parts_of else None
        rows = h * sum(parts) if parts else 3 * h * d
        if q.out_features != rows or p.in_features != h * d:
            raise Unhandled(f'has {q.out_features} qkv features and {p.in_features} proj inputs, not {rows} and '
                            f'{h} heads of {d}')
        if lay is not None and (lay.dim != n - 1 or lay.block != 1 or lay.channels != q.in_features):
            raise Unhandled('does not read the tracked channels as its features')
        names = {r: f'{node.target}.{r}' for r in (qkv, proj)}
        hooked = [n for n, x in m.named_modules() if x._forward_hooks or x._forward_pre_hooks]
        if hooked: raise Unhandled(f"has forward hooks on '{hooked[0]}' inside, which the rule would not run")
        if norm is not None and lay is not None:
            ctx.freeze(lay, f"'{node.target}' normalises its input across the channels ({type(m.get_submodule(norm)).__name__})")
        elif norm is None:
            _inputs(ctx, _Call(names[qkv], node.name), lay)
        return _heads(ctx, node, (h, d), _Call(names[qkv], node.name), _Call(names[proj], node.name), p, n - 1, parts)
    return rule


def _heads(ctx, node, hd, qkv, proj, p, dim, parts=None):
    """Record the heads of the attention module called at `node`: `hd` = (H, D); `qkv` writes their q, k and v
    rows (tied in three blocks, in runs of D; with `parts`, the (q, k, v) widths of a head, each head's rows
    together, in runs of their sum), `proj` (the Linear `p`) reads their v part joined and writes the output,
    along `dim`; the module's 'heads' role follows the v part. Returns the output layout."""
    h, d = hd
    if (node.target, 'heads') not in ctx.owner:   # its heads, once (a second call computes with the same rows)
        w = sum(parts) if parts else 3 * d
        inner = ctx.new_layout(h * w, dim)
        space = inner.pieces[0].space
        if parts:   # head after head: q, k, v of one head together
            ctx.spaces.run_space(space, w, f"'{node.target}' keeps whole heads")
            v = Layout(dim, tuple(Piece(space, i * w + w - parts[-1], (i + 1) * w) for i in range(h)))
        else:
            ctx.spaces.tie_space(space, 3, f"'{node.target}' ties each head's q, k and v")
            ctx.spaces.run_space(space, d, f"'{node.target}' keeps whole heads")
            v = Layout(dim, (Piece(space, 2 * h * d, 3 * h * d),))
        ctx.record(inner, qkv, 'out')
        ctx.record(v, proj, 'in')
        ctx.record(v, node, 'heads')
    out = ctx.new_layout(p.out_features, dim)
    ctx.record(out, proj, 'out')
    return out


_MHA_CALL = inspect.signature(nn.MultiheadAttention.forward)


def mha(ctx, node):
    """nn.MultiheadAttention as self-attention (query, key and value the same tensor, no mask): its packed
    in-projection writes H heads of D for each of q, k and v; `out_proj` reads the heads joined. Units are whole
    heads, as for `attention`; the Pruner makes the module a `mha.PrunedMultiheadAttention`, which runs with
    fewer heads. It returns (output, weights): weights averaged over the heads change when heads go, so a call
    that needs them is frozen unless nothing reads them."""
    m = ctx.module(node)
    try: call = _MHA_CALL.bind(m, *node.args, **node.kwargs).arguments
    except TypeError as e: raise Unhandled(f'is called with arguments nn.MultiheadAttention does not take ({e})')
    if not (call['query'] is call['key'] is call['value']):
        raise Unhandled('attends to a key or value other than its query: only self-attention is followed')
    if call.get('key_padding_mask') is not None or call.get('attn_mask') is not None:
        raise Unhandled('is called with a mask')
    parts = node.target.split('.')
    for i in range(len(parts) - 1, -1, -1):
        owner = ctx.modules.get('.'.join(parts[:i]))
        if isinstance(owner, nn.TransformerEncoder) and getattr(owner, 'use_nested_tensor', False):
            raise Unhandled(f"sits in nn.TransformerEncoder '{'.'.join(parts[:i])}', which turns a padded batch into "
                            "nested tensors in inference that only torch's fused kernel runs (enable_nested_tensor=True): "
                            'set its use_nested_tensor = False (or build it with enable_nested_tensor=False) to prune '
                            'these heads')
    if m.in_proj_weight is None or m.bias_k is not None or m.add_zero_attn:
        raise Unhandled('has separate q, k, v projections, bias_k/bias_v or add_zero_attn, which are not pruned')
    weights = [u for u in node.users if not (u.target is operator.getitem and (u.args[1] == 0 or not u.users))]
    if call.get('need_weights', True) is not False and weights:
        raise Unhandled('returns attention weights averaged over its heads, which are read (need_weights=False '
                        'lets its heads go)')
    hooked = [n for n, x in m.named_modules() if n and (x._forward_hooks or x._forward_pre_hooks)]
    if hooked: raise Unhandled(f"has forward hooks on '{hooked[0]}' inside, which the rule would not run")
    q = call['query']
    lay = ctx.env.get(q) if isinstance(q, fx.Node) else None
    if isinstance(lay, (tuple, SizeOf, Count)): raise Unhandled('reads a tuple of tensors or sizes')
    n = len(ctx.shape(q))
    h, d = m.num_heads, m.head_dim
    if m.in_proj_weight.shape[0] != 3 * h * d:
        raise Unhandled(f'has {m.in_proj_weight.shape[0]} in-projection rows, not 3 x {h} heads of {d}')
    if lay is not None and (lay.dim != n - 1 or lay.block != 1 or lay.channels != m.in_proj_weight.shape[1]):
        raise Unhandled('does not read the tracked channels as its features')
    if not getattr(ctx.kind(_Call(f'{node.target}.out_proj', '')), 'rule', None) is linear:
        raise Unhandled('has an out_proj that is not a Linear layer')
    _inputs(ctx, node, lay)
    out = _heads(ctx, node, (h, d), node,
                 _Call(f'{node.target}.out_proj', node.name), m.out_proj, n - 1)
    return out, None


# ---------------------------------------------------------------- shapes
def _size_args(node):
    args = list(node.args[1:]) or list(node.kwargs.get('shape', node.kwargs.get('size', ())))
    if len(args) == 1 and isinstance(args[0], (list, tuple)): args = list(args[0])
    return args


def _counts(ctx, sizes):
    "Position -> Count for the sizes of a reshape or expand that are channel counts read from a tensor."
    return {i: ctx.env[a] for i, a in enumerate(sizes) if isinstance(a, fx.Node) and isinstance(ctx.env.get(a), Count)}


def _sized(ctx, lay, d, sizes, counts):
    """Check the size given for output channel dim `d`: computed from a tensor, not hard-coded; a channel
    count read from another tensor (`counts`, by position) makes both tensors' channels the same ones (united)."""
    if set(counts) - {d}: raise Unhandled('uses a channel count to size another dim')
    if d in counts and counts[d].div != 1: raise Unhandled('sizes the channel dim with a divided channel count')
    if d in counts:
        unite(ctx, counts[d].layout, lay, lambda x, y: x)
    elif len(sizes) > d and sizes[d] != -1:
        if isinstance(sizes[d], int):
            raise Unhandled(f'hard-codes size {sizes[d]} for the channel dim, which pruning changes; '
                            'compute it from the tensor (x.view(x.size(0), -1)) instead')
        raise Unhandled('sizes the channel dim with a number computed elsewhere, which pruning would not change; '
                        'use -1 or the channel count of the same tensor')


def _first_and_sizes(ctx, node):
    """The first input's layout, the size arguments and the channel counts among them; a tracked tensor other
    than the first is unhandled."""
    sizes = _size_args(node) if node.target in ('view', 'reshape', 'expand', torch.reshape) else []
    counts = _counts(ctx, sizes)
    allowed = {id(c.layout) for c in counts.values()}
    if any(id(l) not in allowed for l in ctx.tracked((node.args[1:], node.kwargs))):
        raise Unhandled('combines the channels with another tracked tensor')
    lay = ctx.layout(node)
    if lay is None and counts: raise Unhandled('sizes an untracked tensor by a channel count')
    return lay, sizes, counts


def reshape(ctx, node):
    """view/reshape/flatten: keep the channel dim, merge or split only the dims before it (tokens of a batch, as
    LeViT's `x.flatten(0, 1)`), or flatten it with the dims after it into blocks."""
    lay, sizes, counts = _first_and_sizes(ctx, node)
    if lay is None: return None
    if isinstance(lay.route, Parts):
        shuffled = _flatten_back(ctx, lay, node, sizes, counts)
        if shuffled is not None: return shuffled
        lay = settle(ctx, lay)
    src, out, d = tuple(ctx.shape(node.args[0])), tuple(ctx.shape(node)), lay.dim
    if out[:d + 1] == src[:d + 1]:
        _sized(ctx, lay, d, sizes, counts)
        return lay
    e = len(out) - (len(src) - d)   # the channel dim, and every dim after it, unchanged at the end
    if e >= 0 and out[e:] == src[d:] and math.prod(out[:e]) == math.prod(src[:d]):
        _sized(ctx, lay, e, sizes, counts)
        return lay.moved(e)
    if (len(out) == len(src) + 1 and out[:d] == src[:d] and out[d + 2:] == src[d + 1:] and out[d] > 1
            and out[d] * out[d + 1] == src[d]):
        return _into_parts(ctx, lay, d, out[d], sizes, counts)
    if counts: raise Unhandled('uses a channel count in a reshape that flattens the channels')
    _sized(ctx, lay, d, sizes, counts)
    if len(out) == d + 1 and out[:d] == src[:d] and out[d] == math.prod(src[d:]):
        return replace(lay, block=lay.block * math.prod(src[d + 1:]))
    raise Unhandled(f'reshapes {src} -> {out} across the channel dim {d}')


def _into_parts(ctx, lay, d, parts, sizes, counts):
    """A reshape of channel dim `d` into (`parts`, channels // parts) (SKNet's per-path attention, a channel shuffle's
    first step): channel t of each part lives or dies with channel t of the first (tied, as chunk ties them), so
    the parts keep equal counts and positions; the channels are then part 0's, along the inner dim."""
    if lay.block != 1 or lay.channels % parts: raise Unhandled(f'reshapes {lay.channels} channels into {parts} parts')
    if sizes:   # the number of parts is a plain number; the part size -1, or the channel count // parts
        if set(counts) - {d + 1} or (len(sizes) > d and sizes[d] != parts):
            raise Unhandled('reshapes the channels into parts sized by a channel count')
        if d + 1 in counts:
            c = counts[d + 1]
            if c.div != parts or ctx.ids(c.layout) != ctx.ids(lay):
                raise Unhandled('sizes the parts of the channels by another channel count')
        elif len(sizes) > d + 1 and sizes[d + 1] != -1:
            raise Unhandled(f'hard-codes size {sizes[d + 1]} for the parts of the channels, which pruning changes; '
                            'use -1 or the channel count // parts')
    # the parts are tied when something reads them (`settle`), unless a transpose and the flatten back make a shuffle
    return replace(lay, dim=d + 1, pieces=tuple(_cut(lay.pieces, 0, lay.channels // parts)),
                   route=Parts(lay, parts, d))


def settle(ctx, lay):
    "A layout reshaped into parts, as anything but a channel shuffle reads it: channel t of each part tied."
    if lay is None or not isinstance(lay.route, Parts): return lay
    if lay.route.src.route is not None: raise Unhandled('reshapes channels a channel shuffle laid out into parts')
    _tied_parts(ctx, lay.route.src, lay.route.parts)
    return replace(lay, route=None)


def _flatten_back(ctx, lay, node, sizes, counts):
    """The reshape that merges the parts dim and the channel dim of a layout reshaped into parts back into one:
    in their order, the channels as they were; transposed, a channel shuffle (`routing.Shuffle`). None for any
    other reshape."""
    src, out, (pd, cd) = tuple(ctx.shape(node.args[0])), tuple(ctx.shape(node)), (lay.route.parts_dim, lay.dim)
    lo = min(pd, cd)
    if abs(pd - cd) != 1 or out != src[:lo] + (src[lo] * src[lo + 1],) + src[lo + 2:]: return None
    before = lay.route.src
    if set(counts) - {lo} or (lo in counts and ctx.ids(counts[lo].layout) != ctx.ids(before)):
        raise Unhandled('sizes the shuffled channels by another channel count')
    if lo not in counts and len(sizes) > lo and sizes[lo] != -1:
        raise Unhandled(f'hard-codes size {sizes[lo]} for the shuffled channels, which pruning changes')
    if pd < cd: return before.moved(lo)   # (parts, channels) flattened in order: the channels as they were
    g, one = lay.route.parts, [q._replace(start=q.start + i, stop=q.start + i + 1) for q in before.pieces
                                for i in range(q.stop - q.start)]
    n = len(one) // g
    pieces = _joined(ctx, [one[i * n + j] for j in range(n) for i in range(g)])   # output j*g + i is input i*n + j
    return Layout(lo, tuple(pieces), route=Shuffle(route_of(before), g))


def expand(ctx, node):
    """expand / expand_as: broadcast other dims; the channels stay. expand_as (reshape_as, view_as) a tracked
    tensor makes both tensors' channels the same ones (united): pruning must keep their counts equal."""
    if node.target in ('expand_as', 'reshape_as', 'view_as'):
        lay, other = ctx.layout(node), ctx.env.get(node.args[1]) if isinstance(node.args[1], fx.Node) else None
        if lay is None and other is None: return None
        if lay is None or other is None: raise Unhandled('expands tracked channels to or from an untracked shape')
        if len(ctx.shape(node.args[0])) - lay.dim != len(ctx.shape(node.args[1])) - other.dim:
            raise Unhandled('expands channels onto a dim of the other tensor that is not its channels')
        lay = unite(ctx, lay, other, lambda x, y: x)
    else:
        lay, sizes, counts = _first_and_sizes(ctx, node)
        if lay is None: return None
        _sized(ctx, lay, len(sizes) - (len(ctx.shape(node.args[0])) - lay.dim), sizes, counts)
    if lay.block != 1: raise Unhandled('expands flattened channels')
    if node.target in ('reshape_as', 'view_as'):   # the other tensor's shape, whose channels are these
        if tuple(ctx.shape(node.args[0]))[lay.dim:] != tuple(ctx.shape(node.args[1]))[other.dim:]:
            raise Unhandled('reshapes the channels into a tensor whose dims after them differ')
        return lay.moved(other.dim)
    return lay.moved(len(ctx.shape(node)) - (len(ctx.shape(node.args[0])) - lay.dim))


def permute(ctx, node):
    "permute / transpose / swapaxes: the channel dim moves with the permutation."
    lay = _only_first(ctx, node)
    if lay is None: return None
    if lay.block != 1: raise Unhandled('permutes flattened channels')
    n = len(ctx.shape(node))
    if node.target in ('permute', torch.permute):
        dims = [_dim(d, n) for d in (_size_args(node) if node.target == 'permute' else list(_arg(node, 1, 'dims')))]
        where = dims.index
    else:
        a, b = _dim(_arg(node, 1, 'dim0'), n), _dim(_arg(node, 2, 'dim1'), n)
        where = lambda d: {a: b, b: a}.get(d, d)
    if isinstance(lay.route, Parts):   # the parts dim moves too (a channel shuffle's transpose)
        return replace(lay, dim=where(lay.dim), route=lay.route._replace(parts_dim=where(lay.route.parts_dim)))
    return lay.moved(where(lay.dim))


def unsqueeze(ctx, node):
    "unsqueeze: a new dim before the channels shifts them."
    lay = _only_first(ctx, node)
    if lay is None: return None
    p = _dim(_arg(node, 1, 'dim'), len(ctx.shape(node)))
    return lay.moved(lay.dim + 1) if p <= lay.dim else lay


def reduce(ctx, node):
    "mean / sum / amax over dims other than the channels (zeros reduce to zero)."
    lay = _only_first(ctx, node)
    if lay is None: return None
    dims, keepdim, n = _arg(node, 1, 'dim'), _arg(node, 2, 'keepdim', False), len(ctx.shape(node.args[0]))
    if dims is None: raise Unhandled('reduces over every dim, channels included')
    dims = {_dim(d, n) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    if lay.dim in dims: raise Unhandled('reduces over the channels')
    if lay.block != 1: raise Unhandled('reduces flattened channels')
    return lay if keepdim else lay.moved(lay.dim - sum(d < lay.dim for d in dims))


def floordiv(ctx, node):
    "A channel count divided by a number of parts (`c // groups`), or tracked channels floor-divided by a constant."
    a, b = node.args[0], node.args[1]
    v = ctx.env.get(a) if isinstance(a, fx.Node) else None
    if isinstance(b, fx.Node) and ctx.env.get(b) is not None: raise Unhandled('divides by a channel count or channels')
    if isinstance(v, Count):
        if not isinstance(b, int) or b < 1: raise Unhandled('divides a channel count by something else than a number of parts')
        return v._replace(div=v.div * b)
    if v is None: return None
    if isinstance(b, fx.Node) or not b: raise Unhandled('floor-divides the channels by a tensor or by zero')
    return keep(ctx, node)   # 0 // b == 0


def getattr_rule(ctx, node):
    "x.shape is a size whose channel entry pruning changes; x.dtype, x.device, x.is_nested carry no channels."
    lay = ctx.layout(node)
    if lay is None or node.args[1] in ('dtype', 'device', 'ndim', 'is_cuda', 'is_nested'): return None
    if node.args[1] == 'shape': return SizeOf(lay, len(ctx.shape(node.args[0])))
    raise Unhandled(f"reads attribute '{node.args[1]}'")


def size(ctx, node):
    "x.size() is a size (see getattr_rule); x.size(d) for another dim than the channels is a plain number."
    lay = _only_first(ctx, node)
    if lay is None: return None
    d = _arg(node, 1, 'dim')
    if d is None: return SizeOf(lay, len(ctx.shape(node.args[0])))
    if _dim(d, len(ctx.shape(node.args[0]))) == lay.dim:
        if lay.block != 1: raise Unhandled('reads the size of flattened channels')
        return Count(lay)
    return None


def _takes_all(i, n):
    """Whether index `i` along `n` channels takes them all, in order, however many pruning leaves: `:`, or `:stop`
    with stop >= n (GhostNet's `out[:, :self.out_chs]` when the concatenation is out_chs wide)."""
    return isinstance(i, slice) and i.start in (None, 0) and i.step in (None, 1) and (i.stop is None or
                                                                                      (isinstance(i.stop, int) and i.stop >= n))


def getitem(ctx, node):
    "One output of a split, or basic indexing that leaves the channel dim whole."
    src = ctx.env.get(node.args[0])
    if isinstance(src, SizeOf):   # (a tuple too: test it first)
        dims = range(src.ndim)[node.args[1]]
        if dims == src.layout.dim and src.layout.block == 1: return Count(src.layout)
        if src.layout.dim in (dims if isinstance(dims, range) else [dims]):
            raise Unhandled('reads the channel count in a way the graph does not follow')
        return None
    if isinstance(src, tuple): return src[node.args[1]]
    lay = _only_first(ctx, node)
    if lay is None: return None
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if any(not isinstance(i, (int, slice)) for i in idx): raise Unhandled('advanced indexing')
    before = idx[:lay.dim]
    if any(isinstance(i, slice) and i != slice(None) for i in before): raise Unhandled('slices before the channels')
    if lay.block != 1 and len(idx) > lay.dim: raise Unhandled('indexes flattened channels')
    if len(idx) > lay.dim and not _takes_all(idx[lay.dim], lay.channels):
        raise Unhandled('indexes the channels at positions pruning would change')
    return lay.moved(lay.dim - sum(isinstance(i, int) for i in before))


# ---------------------------------------------------------------- merges
def _joined(ctx, pieces):
    "`pieces` with each run of consecutive channels of one space (and one nonzero mark) made one piece."
    out = []
    for q in pieces:
        last = out[-1] if out else None
        if last is not None and (ctx.spaces.find(last.space), last.stop, last.nonzero) == \
                (ctx.spaces.find(q.space), q.start, q.nonzero):
            out[-1] = last._replace(space=ctx.spaces.find(q.space), stop=q.stop)
        else: out.append(q)
    return out


def _first_block(ctx, p):
    """Piece `p` moved back by whole blocks, when its space is tied in blocks: channel c and channel c + block are one
    unit, so the moved piece names the same units in the same order (part i of a split as part 0: Res2Net's
    `sp + spx[i]`)."""
    r = ctx.spaces.find(p.space)
    block = ctx.spaces.size[r] // ctx.spaces.tie[r]
    if ctx.spaces.tie[r] == 1 or ctx.spaces.width[r] != 1 or p.start < block: return p
    return p._replace(space=r, start=p.start % block, stop=p.start % block + p.stop - p.start)


def unite(ctx, a, b, combine):
    """Unite two layouts of the same channels position by position (cut where either's pieces end); `combine` merges
    the two pieces' nonzero marks. A space met twice at different positions (GhostNet's `cat([x, dw(x)])` added to
    a shortcut) has its channels tied at that distance."""
    if a.channels != b.channels or a.block != b.block: raise Unhandled('merges channels laid out differently')
    bounds = sorted({0, *itertools.accumulate(p.stop - p.start for p in a.pieces),
                     *itertools.accumulate(q.stop - q.start for q in b.pieces)})
    pieces = []
    for lo, hi in zip(bounds, bounds[1:]):
        (p,), (q,) = _cut(a.pieces, lo, hi), _cut(b.pieces, lo, hi)
        p, q = _first_block(ctx, p), _first_block(ctx, q)
        if (p.space, p.start) == (q.space, q.start) or (ctx.whole(p) and ctx.whole(q)): space = ctx.spaces.unite(p.space, q.space)
        elif p.start == q.start == 0 and (ctx.whole(p) or ctx.whole(q)):   # a whole space and the first part of another
            space = ctx.spaces.unite_prefix(*((p.space, q.space) if ctx.whole(p) else (q.space, p.space)))
        elif ctx.spaces.find(p.space) == ctx.spaces.find(q.space):   # one space at two positions: tie them
            space, size = ctx.spaces.find(p.space), ctx.spaces.size[ctx.spaces.find(p.space)]
            ctx.spaces.tie_space(space, size // math.gcd(size, abs(q.start - p.start)),
                                 'are merged with their own channels at another position')
        else: raise Unhandled('merges parts of different channel spaces')
        last = pieces[-1] if pieces else None
        at = q if last is not None and q.start == last.stop and ctx.spaces.find(q.space) == space else p
        pieces.append(Piece(space, at.start, at.stop, combine(p.nonzero, q.nonzero)))   # (either names these channels)
    return replace(a, pieces=tuple(_joined(ctx, pieces)))   # (cut above, whole again: one piece)


ADDITIVE = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub,
            'add', 'sub', 'add_', 'sub_'}
MULTIPLICATIVE = {operator.mul, operator.imul, torch.mul, 'mul', 'mul_'}
DIVIDING = {operator.truediv, operator.itruediv, torch.div, 'div', 'div_'}


def arith(ctx, node):
    """a + b, a - b, a * b, a / b: tracked operands unite their channels (residuals, gates).

    A sum is zero where both operands are, a product where either is. A constant added per position
    makes the channels non-zero; a tensor with one value per channel cannot be sliced, so it is unhandled.
    """
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get('other')
    la, lb = ctx.env.get(a) if isinstance(a, fx.Node) else None, ctx.env.get(b) if isinstance(b, fx.Node) else None
    if la is None and lb is None: return None
    out_n = len(ctx.shape(node))
    kind = 'add' if node.target in ADDITIVE else 'mul' if node.target in MULTIPLICATIVE else 'div'
    if la is not None and lb is not None:
        if kind == 'div': raise Unhandled('divides tracked channels by tracked channels')
        if len(ctx.shape(a)) - la.dim != len(ctx.shape(b)) - lb.dim:
            raise Unhandled('merges tensors whose channels sit in different dims')
        both = unite(ctx, la, lb, (lambda x, y: x or y) if kind == 'add' else (lambda x, y: x and y))
        return both.moved(out_n - (len(ctx.shape(a)) - la.dim))
    lay, other, tracked = (la, b, a) if la is not None else (lb, a, b)
    if kind == 'div' and lay is lb: raise Unhandled('divides by tracked channels')
    out = lay.moved(out_n - (len(ctx.shape(tracked)) - lay.dim))
    if isinstance(other, fx.Node) and ctx.shape(other) is not None:
        shape, pos = ctx.shape(other), len(ctx.shape(other)) - (out_n - out.dim)
        if pos >= 0 and shape[pos] != 1: raise Unhandled('combines the channels with an untracked per-channel tensor')
        return out.marked(node.name) if kind == 'add' else out
    if kind == 'add' and other != 0: return out.marked(node.name)
    return out


def cat(ctx, node):
    "torch.cat along the channels: the pieces follow each other; along another dim: operands unite."
    tensors, n = list(_arg(node, 0, 'tensors')), len(ctx.shape(node))
    dim = _dim(_arg(node, 1, 'dim', 0), n)
    lays = [ctx.env.get(t) for t in tensors]
    if all(l is None for l in lays): return None
    if any(l is not None and l.dim == dim for l in lays):
        pieces = []
        for t, l in zip(tensors, lays):
            if l is None:   # channels nobody here writes (the input, a constant): a frozen space of their own
                l = ctx.new_layout(ctx.shape(t)[dim], dim)
                ctx.freeze(l, f"'{node.name}' concatenates them with channels no layer here writes")
            if l.dim != dim or l.block != 1: raise Unhandled('concatenates tensors whose channels sit in different dims')
            pieces += l.pieces
        if any(l is not None and l.route is not None for l in lays):
            if any(l is None for l in lays): raise Unhandled('concatenates shuffled channels with untracked ones')
            return Layout(dim, tuple(pieces), route=Cat(tuple(route_of(l) for l in lays)))
        return Layout(dim, tuple(pieces))
    if any(l is None for l in lays): raise Unhandled('concatenates tracked channels with an untracked tensor')
    if len({(l.dim, l.block) for l in lays}) != 1: raise Unhandled('concatenates tensors whose channels sit in different dims')
    out = lays[0]
    for l in lays[1:]: out = unite(ctx, out, l, lambda x, y: x or y)
    return out


def stack(ctx, node):
    "torch.stack: a new dim; the operands' channels unite (paths stacked to be weighed and summed, as in SKNet)."
    tensors = list(_arg(node, 0, 'tensors'))
    lays = [ctx.env.get(t) if isinstance(t, fx.Node) else None for t in tensors]
    if all(l is None for l in lays): return None
    if any(l is None or isinstance(l, (tuple, SizeOf, Count)) for l in lays):
        raise Unhandled('stacks tracked channels with an untracked tensor')
    if len({(len(ctx.shape(t)) - l.dim, l.block) for t, l in zip(tensors, lays)}) != 1:
        raise Unhandled('stacks tensors whose channels sit in different dims')
    out = lays[0]
    for l in lays[1:]: out = unite(ctx, out, l, lambda x, y: x or y)
    new = _dim(_arg(node, 1, 'dim', 0), len(ctx.shape(node)))
    return out.moved(out.dim + 1) if new <= out.dim else out


def split(ctx, node):
    """split / chunk / unbind along another dim: every output carries the same channels. chunk(n) along the
    channels: part i's channel t lives or dies with part 0's channel t (tied: same unit), so that every part keeps
    as many channels and chunk(n) of the pruned tensor cuts it where the parts now end (a packed gate and value,
    GLU)."""
    lay = _only_first(ctx, node)
    if lay is None: return None
    n = len(ctx.shape(node.args[0]))
    dim = _dim(_arg(node, 1 if node.target in ('unbind', torch.unbind) else 2, 'dim', 0), n)
    if dim == lay.dim:
        parts, c = (_arg(node, 1, 'chunks') if node.target in ('chunk', torch.chunk) else
                    _sized_split(ctx, node, lay.channels)), lay.channels
        if lay.block != 1 or not isinstance(parts, int) or c % parts:
            raise Unhandled(f'chunks {c} channels into {parts} parts of unequal sizes')
        if lay.route is not None:   # channels a shuffle laid out: each part routed, untied (see `routing`)
            return tuple(replace(lay, pieces=tuple(_cut(lay.pieces, i * c // parts, (i + 1) * c // parts)),
                                 route=Chunk(lay.route, parts, i)) for i in range(parts))
        return tuple(replace(lay, pieces=tuple(p)) for p in _tied_parts(ctx, lay, parts))
    if node.target in ('unbind', torch.unbind) and dim < lay.dim: lay = lay.moved(lay.dim - 1)
    return tuple(lay for _ in node.meta['shape'])


def _sized_split(ctx, node, c):
    """The number of equal parts a split by sizes makes of `c` channels, when a module registered with
    `layers.register_split` holds those sizes (it resizes them once pruned); unhandled otherwise."""
    from .layers import SPLITS
    stack = [('', type(ctx.modules['']))] + [(path, cls) for path, (_, cls) in node.meta.get('nn_module_stack', {}).items()]
    owner = next((path for path, cls in reversed(stack) if cls in SPLITS), None)   # (the innermost; the model last)
    if owner is None:
        raise Unhandled('splits the channels into parts whose sizes pruning would change (sizes given as numbers; '
                        'chunk(n) is followed, and fasterai.register_split teaches a module that resizes its own)')
    size = _arg(node, 1, 'split_size_or_sections', _arg(node, 1, 'split_size'))
    sizes = [size] * (c // size) if isinstance(size, int) and size > 0 and c % size == 0 else \
        list(size) if isinstance(size, (list, tuple)) else None
    if not sizes or len(set(sizes)) != 1 or sum(sizes) != c:
        raise Unhandled(f"splits the channels into parts {size} that are not equal, inside '{owner}'")
    return len(sizes)


def _cut(pieces, lo, hi):
    "The pieces that cover channels [lo, hi) of a layout, cut where the range ends."
    out, at = [], 0
    for p in pieces:
        a, b = max(lo, at), min(hi, at + p.stop - p.start)
        if a < b: out.append(p._replace(start=p.start + a - at, stop=p.start + b - at))
        at += p.stop - p.start
    return out


def _tied_parts(ctx, lay, parts):
    "`lay`'s pieces cut into `parts` equal parts, channel t of each tied to channel t of the first (chunk, reshape)."
    c = lay.channels
    cut = [_cut(lay.pieces, i * c // parts, (i + 1) * c // parts) for i in range(parts)]
    for other in cut[1:]: _tie_parts(ctx, cut[0], other)
    return cut


def _tie_parts(ctx, first, other):
    """Make channel t of the pieces `other` live or die with channel t of `first` (equal lengths): two whole spaces
    are united; two ranges of one space are tied (the space in blocks whose size divides their distance)."""
    bounds = sorted({0, *itertools.accumulate(p.stop - p.start for p in first),
                     *itertools.accumulate(q.stop - q.start for q in other)})
    for lo, hi in zip(bounds, bounds[1:]):
        (p,), (q,) = _cut(first, lo, hi), _cut(other, lo, hi)
        a, b = ctx.spaces.find(p.space), ctx.spaces.find(q.space)
        if a != b:
            if not (ctx.whole(p) and ctx.whole(q) and p.stop == q.stop):
                raise Unhandled('chunks channels whose parts come from parts of different channel spaces')
            ctx.spaces.unite(a, b)
        elif p.start != q.start:
            size = ctx.spaces.size[a]
            ctx.spaces.tie_space(a, size // math.gcd(size, abs(q.start - p.start)),
                                 f"'chunk' ties the channels of its parts")


def setitem(ctx, node):
    "x[i] = v (recorded by the tracer): a write in place the graph does not follow; the channels it touches stay."
    if ctx.tracked((node.args, node.kwargs)): raise Unhandled('writes into a tensor in place (x[...] = v)')
    return None


def pad(ctx, node):
    "F.pad with zeros on dims other than the channels."
    lay = _only_first(ctx, node)
    if lay is None: return None
    if _arg(node, 2, 'mode', 'constant') != 'constant' or (_arg(node, 3, 'value', None) or 0) != 0:
        raise Unhandled('pads with non-zero values')
    widths, n = list(_arg(node, 1, 'pad')), len(ctx.shape(node.args[0]))
    k = n - 1 - lay.dim   # the channel dim's pair, counting pairs from the last dim
    if lay.block != 1 or (2 * k + 1 < len(widths) and (widths[2 * k], widths[2 * k + 1]) != (0, 0)):
        raise Unhandled('pads along the channels')
    return _same_channels(ctx, node, lay)


def roll(ctx, node):
    "torch.roll over dims other than the channels."
    lay = _only_first(ctx, node)
    if lay is None: return None
    dims = _arg(node, 2, 'dims')
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if not dims or lay.dim in [_dim(d, len(ctx.shape(node))) for d in dims]: raise Unhandled('rolls the channels')
    return lay


# ---------------------------------------------------------------- tables
ZERO_KEEPING = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.GELU, nn.Hardswish,
                nn.Mish, nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink,
                nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
"Module types that map a zero channel to a zero channel of the same index."
ZERO_MOVING = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid, nn.AlphaDropout)
"Module types that map zero to a non-zero value (AlphaDropout: in training)."

MODULE_RULES = {   # the layers with channels of their own are in `layers.LAYERS`
    nn.LayerNorm: layernorm, nn.RMSNorm: rms_norm, nn.PReLU: prelu, nn.Flatten: reshape, nn.Hardtanh: hardtanh,
    nn.Softmax: softmax, nn.LogSoftmax: softmax, nn.Upsample: resize,
    **{t: pool1d for t in (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)},
    **{t: pool2d for t in (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)},
    **{t: pool3d for t in (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)},
    **{t: keep for t in ZERO_KEEPING}, **{t: moves_zero for t in ZERO_MOVING},
}

FUNCTION_RULES = {
    **{f: keep for f in (F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu,
                         F.celu, F.silu, F.gelu, F.hardswish, F.mish, F.tanh, torch.tanh,
                         F.softsign, F.dropout, F.dropout1d, F.dropout2d, torch.clone)},
    **{f: pool1d for f in (F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d)},
    **{f: pool2d for f in (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d)},
    **{f: pool3d for f in (F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d)},
    F.interpolate: resize, F.layer_norm: layer_norm, F.rms_norm: rms_norm,
    **{f: power for f in (torch.pow, operator.pow)},
    F.hardtanh: hardtanh, F.hardtanh_: hardtanh, **{f: clamp for f in (torch.clamp, torch.clip)},
    **{f: moves_zero for f in (F.sigmoid, torch.sigmoid, F.hardsigmoid, F.softplus, F.logsigmoid, F.alpha_dropout)},
    **{f: softmax for f in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax)},
    **{f: arith for f in ADDITIVE | MULTIPLICATIVE | DIVIDING if not isinstance(f, str)},
    **{f: reduce for f in (torch.mean, torch.sum, torch.amax, torch.amin)},
    operator.floordiv: floordiv, torch.stack: stack,
    torch.flatten: reshape, torch.reshape: reshape, torch.permute: permute, torch.transpose: permute,
    torch.swapaxes: permute, torch.unsqueeze: unsqueeze, torch.cat: cat, torch.concat: cat,
    torch.concatenate: cat, torch.split: split, torch.chunk: split, torch.unbind: split, F.pad: pad,
    torch.roll: roll, getattr: getattr_rule, operator.getitem: getitem, operator.setitem: setitem,
}

METHOD_RULES = {
    **{m: keep for m in ('relu', 'relu_', 'tanh', 'tanh_', 'contiguous', 'clone', 'float', 'double', 'half',
                         'bfloat16', 'to', 'type_as', 'detach')},
    **{m: moves_zero for m in ('sigmoid', 'sigmoid_')},
    **{m: softmax for m in ('softmax', 'log_softmax')},
    **{m: arith for m in ADDITIVE | MULTIPLICATIVE | DIVIDING if isinstance(m, str)},
    **{m: reduce for m in ('mean', 'sum', 'amax', 'amin')},
    **{m: reshape for m in ('view', 'reshape', 'flatten')},
    **{m: permute for m in ('permute', 'transpose', 'swapaxes')},
    **{m: split for m in ('split', 'chunk', 'unbind')},
    **{m: clamp for m in ('clamp', 'clip', 'clamp_', 'clip_')},
    'pow': power, 'unsqueeze': unsqueeze, 'roll': roll, 'expand': expand, 'expand_as': expand, 'reshape_as': expand,
    'view_as': expand,
    'size': size, 'dim': no_tensor,
}

ROUTE_RULES = {cat, split, reshape, permute, getitem}
"The rules that lay out channels a channel shuffle moved themselves (`routing`); the graph checks every other."

COUNT_RULES = {reshape, expand, floordiv}
"The rules that accept a `Count` among their arguments; any other use of one is unhandled."

INPLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem, F.relu_, torch.relu_,
           F.hardtanh_,
           'add_', 'sub_', 'mul_', 'div_', 'relu_', 'tanh_', 'sigmoid_'}
"Ops that overwrite their first operand (so do modules and functions called with inplace=True)."


def is_inplace(node, module=None):
    "Whether `node` overwrites its first operand."
    return (node.target in INPLACE or node.kwargs.get('inplace') is True
            or (module is not None and getattr(module, 'inplace', False) is True))

try:   # torchvision's stochastic depth scales whole samples: zeros stay zero
    from torchvision.ops import stochastic_depth
    FUNCTION_RULES[stochastic_depth] = keep
except ImportError:
    pass
