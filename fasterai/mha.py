"""`nn.MultiheadAttention` after the Pruner removed whole heads.

torch's own forward (`F.multi_head_attention_forward`) takes each head's width as `embed_dim // num_heads` and splits
the in-projection into thirds of `embed_dim` rows, so it cannot run once heads are gone while the input and output
keep `embed_dim` features. `PrunedMultiheadAttention` is the same module (a subclass: the same parameters,
`out_proj`, `batch_first`, dropout), whose forward computes what torch's computes for the heads it keeps:
`num_heads` heads of `head_dim`, joined into `num_heads * head_dim` features that `out_proj` reads. The Pruner
makes every `nn.MultiheadAttention` it resizes one (`export.rebuild_pruned` too).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['PrunedMultiheadAttention', 'as_pruned', 'rebuilt']


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """An `nn.MultiheadAttention` with `num_heads` heads of `head_dim` whose joined width need not be `embed_dim`
    (now the width of its input). Same call as torch's (masks, `need_weights`, `batch_first`, unbatched input);
    returned attention weights are those of the heads it keeps (averaged over them with `average_attn_weights`).
    Only the packed in-projection of self-attention sized modules (`kdim == vdim == embed_dim`) without `bias_k`,
    `bias_v` or `add_zero_attn` is pruned, so those are all this forward computes."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched = query.dim() == 3
        to_nle = lambda t: t.unsqueeze(0) if not batched else (t if self.batch_first else t.transpose(0, 1))
        q, k, v = (F.linear(to_nle(t), w, b) for t, w, b in
                   zip((query, key, value), self.in_proj_weight.chunk(3), _thirds(self.in_proj_bias)))
        n, h, d = q.shape[0], self.num_heads, self.head_dim
        q, k, v = (t.reshape(n, -1, h, d).transpose(1, 2) for t in (q, k, v))   # (N, H, L or S, D)
        mask = _additive(attn_mask, key_padding_mask, q, k.shape[2], batched)
        p = self.dropout if self.training else 0.0
        if need_weights:
            w = torch.softmax(q @ k.transpose(-2, -1) * d ** -0.5 + (0 if mask is None else mask), dim=-1)
            if p > 0: w = F.dropout(w, p=p)
            out = w @ v
            weights = w.mean(1) if average_attn_weights else w
            if not batched: weights = weights.squeeze(0)
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p), None
        out = self.out_proj(out.transpose(1, 2).reshape(n, -1, h * d))
        if not batched: return out.squeeze(0), weights
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _thirds(bias):
    return (None,) * 3 if bias is None else bias.chunk(3)


def _additive(attn_mask, key_padding_mask, q, s, batched):
    """One float mask added to the (N, H, L, S) scores, from torch's `attn_mask` ((L, S) or (N * H, L, S); True or
    -inf: not attended) and `key_padding_mask` ((N, S): True or -inf ignores that key), or None."""
    n, h, l = q.shape[:3]
    as_float = lambda m: None if m is None else (
        torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(m, float('-inf')) if m.dtype == torch.bool
        else m.to(q.dtype))
    out = None
    if attn_mask is not None and attn_mask.dim() == 3 and attn_mask.shape[0] != (n * h if batched else h):
        raise ValueError(f'attn_mask has {attn_mask.shape[0]} per-head rows; this attention has {h} heads (pruned: '
                         f'give {n * h if batched else h} rows, for the heads it keeps, or a 2-D mask for all)')
    if attn_mask is not None:
        m = as_float(attn_mask)
        out = m.view(n, h, l, s) if m.dim() == 3 and batched else m.view(1, -1, l, s) if m.dim() == 3 else m
    if key_padding_mask is not None:
        m = as_float(key_padding_mask).view(n, 1, 1, s)
        out = m if out is None else out + m
    return out


def as_pruned(m):
    "Make the `nn.MultiheadAttention` `m` a `PrunedMultiheadAttention` in place (it computes the same); returns it."
    if type(m) is nn.MultiheadAttention:
        m.__class__ = PrunedMultiheadAttention
        m._qkv_same_embed_dim = False   # torch's fused paths (nn.TransformerEncoderLayer in inference) read the
                                        # packed weights as (3 * embed_dim, embed_dim) when this is True: kept off
    return m


def rebuilt(m):
    """`m` (resized to recorded sizes by `export.rebuild_pruned`) as a `PrunedMultiheadAttention` when its
    in-projection no longer has torch's (3 * embed_dim, embed_dim) shape; returns it."""
    if tuple(m.in_proj_weight.shape) != (3 * m.embed_dim, m.embed_dim) or m.num_heads * m.head_dim != m.embed_dim:
        as_pruned(m)
    return m
