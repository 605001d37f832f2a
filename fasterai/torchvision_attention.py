"""torchvision's Swin and MaxViT attention after the Pruner removed whole heads.

torchvision's `shifted_window_attention` takes each head as `C // num_heads` wide, C being its input's width, and
MaxViT's attention reshapes its joined heads to its input's width D, so neither can run once heads are gone while
the block keeps its width. `PrunedShiftedWindowAttention` (and its V2) and `PrunedRelativePositionalMultiHeadAttention`
are the same modules (subclasses: the same layers, tables, window and shift), whose forward computes what
torchvision's computes for the heads they keep. The Pruner makes every one it resizes one (`export.rebuild_pruned`
too).
"""
import math

import torch
import torch.nn.functional as F
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

__all__ = ['PrunedShiftedWindowAttention', 'PrunedShiftedWindowAttentionV2', 'PrunedRelativePositionalMultiHeadAttention',
           'window_attention', 'as_pruned', 'heads_of']


def window_attention(m, input, relative_position_bias, logit_scale=None):
    """torchvision's `shifted_window_attention` for module `m`, with heads of `m.head_dim` joined into
    `m.num_heads * m.head_dim` features for `m.proj` (the same operations in the same order otherwise)."""
    window_size, shift_size, num_heads, d = m.window_size, list(m.shift_size), m.num_heads, m.head_dim
    qkv_bias, proj_bias, training = m.qkv.bias, m.proj.bias, m.training
    B, H, W, C = input.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    if window_size[0] >= pad_H: shift_size[0] = 0   # a window as large as the map: no shift
    if window_size[1] >= pad_W: shift_size[1] = 0
    if sum(shift_size) > 0: x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)
    if logit_scale is not None and qkv_bias is not None:   # V2: no bias on k
        qkv_bias = qkv_bias.clone()
        length = qkv_bias.numel() // 3
        qkv_bias[length:2 * length].zero_()
    qkv = F.linear(x, m.qkv.weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:   # cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * d ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift_size) > 0:
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0]:h[1], w[0]:w[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=m.attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), num_heads * d)
    x = F.linear(x, m.proj.weight, proj_bias)
    x = F.dropout(x, p=m.dropout, training=training)
    C = x.shape[-1]
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0: x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


class PrunedShiftedWindowAttention(ShiftedWindowAttention):
    "torchvision's `ShiftedWindowAttention` with `num_heads` heads of `head_dim` (see the module docstring)."
    def forward(self, x): return window_attention(self, x, self.get_relative_position_bias())


class PrunedShiftedWindowAttentionV2(ShiftedWindowAttentionV2):
    "torchvision's `ShiftedWindowAttentionV2` with `num_heads` heads of `head_dim` (see the module docstring)."
    def forward(self, x): return window_attention(self, x, self.get_relative_position_bias(), self.logit_scale)


class PrunedRelativePositionalMultiHeadAttention(RelativePositionalMultiHeadAttention):
    "torchvision's MaxViT attention with `n_heads` heads of `head_dim`, joined into `n_heads * head_dim` features."
    def forward(self, x):
        B, G, P, D = x.shape
        H, DH = self.n_heads, self.head_dim
        q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
        q, k, v = (t.reshape(B, G, P, H, DH).permute(0, 1, 3, 2, 4) for t in (q, k, v))
        k = k * self.scale_factor
        dot_prod = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k)
        dot_prod = F.softmax(dot_prod + self.get_relative_positional_bias(), dim=-1)
        out = torch.einsum("B G H I J, B G H J D -> B G H I D", dot_prod, v)
        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(B, G, P, H * DH))


_PRUNED = {ShiftedWindowAttention: PrunedShiftedWindowAttention, ShiftedWindowAttentionV2: PrunedShiftedWindowAttentionV2,
           RelativePositionalMultiHeadAttention: PrunedRelativePositionalMultiHeadAttention}


def heads_of(m):
    "(heads, channels per head) of a torchvision Swin or MaxViT attention module, pruned or not."
    if isinstance(m, RelativePositionalMultiHeadAttention): return m.n_heads, m.head_dim
    return m.num_heads, getattr(m, 'head_dim', None) or m.proj.in_features // m.num_heads


def as_pruned(m):
    "Make torchvision's Swin or MaxViT attention `m` its pruned class in place, its head size an attribute; returns it."
    if type(m) in _PRUNED:
        m.head_dim = heads_of(m)[1]
        m.__class__ = _PRUNED[type(m)]
    return m
