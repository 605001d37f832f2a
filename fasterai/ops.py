"""How each traced operation moves channels: the rules `graph.trace` dispatches to, by identity.

A rule takes the trace context and an fx node and returns the node's output `Layout` (None when the
output carries no tracked channels). Rules are looked up by exact module type, function object or method
name; anything else that touches tracked channels is refused by the graph with the node's name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import UnsupportedOperationError

__all__ = ['Layout', 'MODULE_RULES', 'FUNCTION_RULES', 'METHOD_RULES', 'ZERO_KEEPING', 'ZERO_MOVING']


@dataclass(frozen=True)
class Layout:
    """Where a traced tensor carries group channels: its channel dim, the pieces along it, and the block."""
    dim: int         # the channel dimension (non-negative)
    pieces: tuple    # ((space, start, stop), ...) in order along `dim`
    block: int = 1   # consecutive elements per channel along `dim` (H*W after a flatten)

    @property
    def channels(self):
        return sum(stop - start for _, start, stop in self.pieces)


def _refuse(node, why):
    raise UnsupportedOperationError(f"node '{node.name}' ({node.op} {node.target}): {why}")


def _in(ctx, node):
    "The layout of the node's first input, refusing any other tracked tensor among its arguments."
    lay = ctx.layout(node)
    if len(ctx.tracked((node.args[1:], node.kwargs))) > 0:
        _refuse(node, 'combines tracked channels with another tensor, which the channel graph does not handle yet')
    return lay


def _keep_shape(ctx, node, lay):
    "Check the op kept the channel dim where it was and as long as it was."
    if lay is None: return None
    src, out = ctx.shape(node.args[0]), ctx.shape(node)
    if out is None or len(out) != len(src) or out[lay.dim] != src[lay.dim]:
        _refuse(node, f'changes the channel dimension {lay.dim} (shape {tuple(src)} -> '
                      f'{None if out is None else tuple(out)})')
    return lay


def keep(ctx, node):
    "Zero-keeping element-wise or per-channel op (f(0) = 0), pooling, dropout: channels pass through."
    return _keep_shape(ctx, node, _in(ctx, node))


def moves_zero(ctx, node):
    "An activation with f(0) != 0: a removed channel would feed a constant downstream, so freeze it."
    lay = _keep_shape(ctx, node, _in(ctx, node))
    if lay is not None: ctx.freeze(lay, f"'{node.name}' maps 0 to a non-zero value")
    return lay


def mixes(ctx, node):
    "An op that mixes channels (softmax over them): keep shape, freeze the channels."
    lay = _keep_shape(ctx, node, _in(ctx, node))
    if lay is not None: ctx.freeze(lay, f"'{node.name}' mixes channels")
    return lay


def no_tensor(ctx, node):
    "Ops that return sizes, dtypes or devices: no channels flow through them."
    return None


def conv(ctx, node):
    "Conv2d with groups=1: reads its input channels, writes a new space of output channels."
    m, lay = ctx.module(node), _in(ctx, node)
    if m.groups != 1:
        _refuse(node, f'grouped convolution (groups={m.groups}) is not handled yet')
    if lay is not None:
        if lay.dim != len(ctx.shape(node.args[0])) - 3 or lay.block != 1:
            _refuse(node, 'the convolution does not read the tracked channels as its input channels')
        ctx.record(lay, node, 'in')
    out = ctx.new_space(node, m.out_channels, len(ctx.shape(node)) - 3)
    ctx.record(out, node, 'out')
    return out


def linear(ctx, node):
    "Linear: reads the last dim (a flattened map reads blocks of features), writes a new space."
    m, lay = ctx.module(node), _in(ctx, node)
    if lay is not None:
        if lay.dim != len(ctx.shape(node.args[0])) - 1 or lay.channels * lay.block != m.in_features:
            _refuse(node, 'the Linear layer does not read the tracked channels as its input features')
        ctx.record(lay, node, 'in')
    out = ctx.new_space(node, m.out_features, len(ctx.shape(node)) - 1)
    ctx.record(out, node, 'out')
    return out


def batchnorm(ctx, node):
    "BatchNorm: a per-channel layer on dim 1, sliced with the channels it normalises."
    lay = keep(ctx, node)
    if lay is None: return None
    if lay.dim != 1 or lay.block != 1:
        _refuse(node, 'BatchNorm normalises dim 1, which does not hold the tracked channels')
    ctx.record(lay, node, 'norm')
    return lay


def prelu(ctx, node):
    "PReLU with one shared slope keeps zeros; one slope per channel is not handled yet."
    if ctx.module(node).num_parameters != 1:
        _refuse(node, 'PReLU with one slope per channel is not handled yet')
    return keep(ctx, node)


def _size_args(node):
    "The size arguments of a view/reshape call, as a flat list (ints and nodes)."
    args = list(node.args[1:]) or list(node.kwargs.get('shape', node.kwargs.get('size', ())))
    if len(args) == 1 and isinstance(args[0], (list, tuple)): args = list(args[0])
    return args


def reshape(ctx, node):
    "view/reshape/flatten: keeps the channel dim, or flattens it with the dims after it into blocks."
    lay = _in(ctx, node)
    if lay is None: return None
    src, out, d = tuple(ctx.shape(node.args[0])), tuple(ctx.shape(node)), lay.dim
    sizes = _size_args(node) if node.target in ('view', 'reshape', torch.reshape) else []
    if len(sizes) > d and isinstance(sizes[d], int) and sizes[d] != -1:
        _refuse(node, f'hard-codes size {sizes[d]} for the channel dimension, which pruning changes; '
                      'compute it from the tensor (x.view(x.size(0), -1)) instead')
    if out[:d + 1] == src[:d + 1]:
        return lay
    if len(out) == d + 1 and out[:d] == src[:d] and out[d] == math.prod(src[d:]):
        return Layout(d, lay.pieces, lay.block * math.prod(src[d + 1:]))
    _refuse(node, f'reshapes {src} -> {out} in a way that moves the channel dimension {d}')


def getattr_rule(ctx, node):
    "x.shape, x.dtype, x.device carry no channels; other attributes are refused."
    if ctx.layout(node) is None or node.args[1] in ('shape', 'dtype', 'device', 'ndim', 'is_cuda'): return None
    _refuse(node, f"reads attribute '{node.args[1]}' of a tracked tensor")


ZERO_KEEPING = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.GELU, nn.Hardswish,
                nn.Mish, nn.Tanh, nn.Hardtanh, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink,
                nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity,
                nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
"Module types that map a zero channel to a zero channel of the same index."
ZERO_MOVING = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid)
"Module types that map zero to a non-zero constant."

MODULE_RULES = {
    nn.Conv2d: conv, nn.Linear: linear, nn.BatchNorm1d: batchnorm, nn.BatchNorm2d: batchnorm,
    nn.PReLU: prelu, nn.Flatten: reshape, nn.Softmax: mixes, nn.LogSoftmax: mixes, nn.Softmax2d: mixes,
    **{t: keep for t in ZERO_KEEPING}, **{t: moves_zero for t in ZERO_MOVING},
}

FUNCTION_RULES = {
    **{f: keep for f in (F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu,
                         F.celu, F.silu, F.gelu, F.hardswish, F.mish, F.tanh, torch.tanh, F.hardtanh,
                         F.softsign, F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout,
                         F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                         F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d)},
    **{f: moves_zero for f in (F.sigmoid, torch.sigmoid, F.hardsigmoid, F.softplus, F.logsigmoid)},
    **{f: mixes for f in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax)},
    torch.flatten: reshape, torch.reshape: reshape, getattr: getattr_rule,
}

METHOD_RULES = {
    **{m: keep for m in ('relu', 'relu_', 'tanh', 'tanh_', 'contiguous', 'clone', 'float', 'double', 'half',
                         'bfloat16', 'to', 'type_as', 'detach')},
    **{m: moves_zero for m in ('sigmoid', 'sigmoid_')},
    **{m: mixes for m in ('softmax', 'log_softmax')},
    **{m: reshape for m in ('view', 'reshape', 'flatten')},
    **{m: no_tensor for m in ('size', 'dim')},
}
