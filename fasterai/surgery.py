"""Surgery on one layer: keep a subset of its output, input or normalised channels, in place."""
import torch
import torch.nn as nn

__all__ = ['shrink', 'out_dim', 'SHRINKERS']


def _take(module, pname, dim, idx):
    "Replace parameter or buffer `pname` by its entries `idx` along `dim`."
    t = getattr(module, pname, None)
    if t is None: return
    new = t.detach().index_select(dim, idx.to(t.device))
    if isinstance(t, nn.Parameter): setattr(module, pname, nn.Parameter(new, requires_grad=t.requires_grad))
    else: setattr(module, pname, new)


def shrink_conv(m, out=None, inp=None, dw=None):
    """Conv2d: keep output channels `out` (weight rows, bias) and input channels `inp`; depthwise: channels `dw`.
    A grouped conv keeps as many channels in each group (the channel graph ties them)."""
    if dw is not None:
        _take(m, 'weight', 0, dw); _take(m, 'bias', 0, dw)
        m.in_channels = m.out_channels = m.groups = len(dw)
    if out is not None:
        _take(m, 'weight', 0, out); _take(m, 'bias', 0, out); m.out_channels = len(out)
    if inp is not None:
        # a grouped conv's weight holds the columns of one group; every group keeps the same positions
        local = inp.view(m.groups, -1) - torch.arange(m.groups)[:, None] * (m.in_channels // m.groups)
        if not (local == local[0]).all():
            raise ValueError(f'the groups of a grouped conv must keep the same input positions, got {inp.tolist()}')
        _take(m, 'weight', 1, local[0]); m.in_channels = len(inp)


def out_dim(module, pname='weight'):
    "The dim of `module`'s parameter `pname` that holds its output channels: 1 for a transposed conv's weight."
    return 1 if pname == 'weight' and type(module) is nn.ConvTranspose2d else 0


def _shrink_out_in(m, out, inp, out_attr, in_attr):
    "Keep outputs `out` (weight along `out_dim`, bias) and inputs `inp` (the weight's other leading dim)."
    o = out_dim(m)
    if out is not None:
        _take(m, 'weight', o, out); _take(m, 'bias', 0, out); setattr(m, out_attr, len(out))
    if inp is not None:
        _take(m, 'weight', 1 - o, inp); setattr(m, in_attr, len(inp))


def shrink_conv_transpose(m, out=None, inp=None):
    "ConvTranspose2d (groups=1): its weight is input x output x k x k."
    _shrink_out_in(m, out, inp, 'out_channels', 'in_channels')


def shrink_linear(m, out=None, inp=None):
    "Linear: keep output features `out` (weight rows, bias) and input features `inp`."
    _shrink_out_in(m, out, inp, 'out_features', 'in_features')


def shrink_norm(m, norm=None):
    "BatchNorm, InstanceNorm: keep channels `norm` of the affine parameters and running statistics."
    for p in ('weight', 'bias', 'running_mean', 'running_var'): _take(m, p, 0, norm)
    m.num_features = len(norm)


def shrink_groupnorm(m, norm=None):
    "GroupNorm with one channel per group: keep channels `norm`."
    for p in ('weight', 'bias'): _take(m, p, 0, norm)
    m.num_channels = m.num_groups = len(norm)


SHRINKERS = {nn.Conv2d: shrink_conv, nn.ConvTranspose2d: shrink_conv_transpose, nn.Linear: shrink_linear, nn.BatchNorm1d: shrink_norm, nn.BatchNorm2d: shrink_norm,
             nn.InstanceNorm1d: shrink_norm, nn.InstanceNorm2d: shrink_norm, nn.GroupNorm: shrink_groupnorm}
"Exact layer type -> function(module, **{role: kept indices}) that shrinks it in place."


def shrink(module, keep):
    "Shrink `module` in place to the channels `keep` gives per role ('out', 'in', 'norm')."
    f = SHRINKERS.get(type(module))
    if f is None:
        raise TypeError(f'cannot shrink a {type(module).__name__}: only {[t.__name__ for t in SHRINKERS]}')
    with torch.no_grad():
        f(module, **{'inp' if r == 'in' else r: idx for r, idx in keep.items()})
