"""Surgery on one layer: keep a subset of its output, input or normalised channels, in place.

Each function takes the module, its `layers.LayerKind` (which tensors hold the channels, which attributes count
them) and the kept indices per role; `layers.shrink` picks the function of a module's kind.
"""
import torch
import torch.nn as nn

__all__ = ['shrink_sliced', 'shrink_conv', 'shrink_groupnorm', 'shrink_heads', 'shrink_mha']


def _take(module, pname, dim, idx):
    "Replace parameter or buffer `pname` (of a submodule: 'mlp.2.weight') by its entries `idx` along `dim`."
    owner, _, pname = pname.rpartition('.')
    if owner: module = module.get_submodule(owner)
    t = getattr(module, pname, None)
    if t is None: return
    new = t.detach().index_select(dim, idx.to(t.device))
    if isinstance(t, nn.Parameter): setattr(module, pname, nn.Parameter(new, requires_grad=t.requires_grad))
    else: setattr(module, pname, new)


def _keep_rows(m, kind, role, idx):
    "Keep channels `idx` of `role` in every tensor that holds them (the weight's rows, vectors, buffers)."
    for pname, dim in kind.rows(role): _take(m, pname, dim, idx)
    for b in kind.buffers: _take(m, b, 0, idx)


def shrink_sliced(m, kind, out=None, inp=None, norm=None, dw=None):
    """Keep output channels `out`, input channels `inp`, normalised channels `norm`, or the channels `dw` of a
    depthwise layer (its input and output), slicing the tensors its kind names and setting its size attributes."""
    if out is not None:
        _keep_rows(m, kind, 'out', out); setattr(m, kind.sizes['out'], len(out))
    if dw is not None:
        _keep_rows(m, kind, 'dw', dw)
        setattr(m, kind.sizes['out'], len(dw)); setattr(m, kind.sizes['in'], len(dw)); m.groups = len(dw)
    if inp is not None:
        _take(m, kind.weight, kind.in_dim, inp); setattr(m, kind.sizes['in'], len(inp))
    if norm is not None:
        _keep_rows(m, kind, 'norm', norm); setattr(m, kind.sizes['norm'], len(norm))


def shrink_conv(m, kind, out=None, inp=None, dw=None):
    """A convolution: as `shrink_sliced`, but a grouped conv's weight holds the input columns of one group, and
    every group keeps the same positions (the channel graph ties them)."""
    shrink_sliced(m, kind, out=out, dw=dw)
    if inp is not None:
        local = inp.view(m.groups, -1) - torch.arange(m.groups)[:, None] * (m.in_channels // m.groups)
        if not (local == local[0]).all():
            raise ValueError(f'the groups of a grouped conv must keep the same input positions, got {inp.tolist()}')
        _take(m, kind.weight, kind.in_dim, local[0]); setattr(m, kind.sizes['in'], len(inp))


def shrink_groupnorm(m, kind, norm=None):
    "GroupNorm with one channel per group: keep channels `norm` (as many groups)."
    shrink_sliced(m, kind, norm=norm)
    m.num_groups = len(norm)


def shrink_heads(m, kind, heads=None, count='num_heads'):
    """A self-attention module whose qkv and proj layers lost whole heads (they are shrunk as Linear layers): keep
    the channels `heads` of its joined heads, so that its head count (attribute `count`) and width attributes say
    so, and the entries of the kept heads in its per-head tensors (`kind.per_head`: a relative-position bias
    table's columns)."""
    d = kind.heads_of(m)[1]
    setattr(m, count, _whole_heads(heads, d))
    for pname, dim in kind.per_head: _take(m, pname, dim, heads[::d] // d)
    if isinstance(kind.sizes['heads'], str): setattr(m, kind.sizes['heads'], len(heads))


def _whole_heads(heads, d):
    if len(heads) % d or not (heads.view(-1, d) - heads.view(-1, d)[:, :1] == torch.arange(d)).all():
        raise ValueError(f'an attention module loses whole heads of {d} channels, got {heads.tolist()}')
    return len(heads) // d


def shrink_mha(m, kind, out=None, inp=None, heads=None):
    """An nn.MultiheadAttention: keep the in-projection rows `out` (q, k and v of the heads kept), the input
    features `inp` (its columns), and set the head count from the joined heads kept (`heads`); it becomes a
    `mha.PrunedMultiheadAttention`, whose forward runs with heads of `head_dim` whatever `embed_dim` is."""
    from .mha import as_pruned
    as_pruned(m)
    if heads is not None: m.num_heads = _whole_heads(heads, m.head_dim)
    if out is not None: _keep_rows(m, kind, 'out', out)
    if inp is not None:
        _take(m, kind.weight, kind.in_dim, inp)
        m.embed_dim = m.kdim = m.vdim = len(inp)

