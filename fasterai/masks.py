"""The masks that hold a model sparse: each target's own keep-masks, their combination per parameter, how to zero
what they drop, and their saved state."""
import torch

__all__ = ['MaskSet', 'mask_drops']


def mask_drops(keep, p):
    """How to zero what keep-mask `keep` drops in parameter `p`: (dim, indices) when it drops whole slices along
    one dim (zeroed by index, a few times faster than a broadcast mask), else (None, the drop mask)."""
    drop, dims = ~keep, [d for d, n in enumerate(keep.shape) if n != 1]
    if len(dims) == 1 and keep.dim() == p.dim(): return dims[0], drop.flatten().nonzero().flatten()
    return None, drop


class MaskSet:
    """Keep-masks by parameter name over the parameters `params` (qualified name -> parameter), combined from
    the masks of `n` targets; a parameter several targets mask keeps what all of them keep."""
    def __init__(self, params, n):
        self.params, self.by_target = params, [None] * n   # each target's own masks, kept until its count changes
        self.masks, self.drops = {}, {}   # combined keep-masks; how `apply` zeroes what each drops

    def set(self, i, masks):
        "Target `i`'s new masks (the combination is updated by `combine`)."
        self.by_target[i] = masks

    def combine(self, names=None):
        "Recombine the masks of the parameters `names` (all when None) from every target's own masks."
        if names is None:
            names, self.masks, self.drops = {n for m in self.by_target for n in (m or {})}, {}, {}
        for name in names: self.masks.pop(name, None)
        for m in self.by_target:
            for name, keep in (m or {}).items():
                if name in names: self.masks[name] = self.masks[name] & keep if name in self.masks else keep
        for name in names:
            if (~self.masks[name]).any(): self.drops[name] = mask_drops(self.masks[name], self.params[name])
            else: self.drops.pop(name, None)

    @torch.no_grad()
    def apply(self):
        "Set every masked parameter entry to exactly zero (NaN and inf included)."
        for name, (dim, drop) in self.drops.items():
            if dim is None: self.params[name].masked_fill_(drop, 0)
            else: self.params[name].index_fill_(dim, drop, 0)

    def hold(self):
        "Whether every entry the masks drop is exactly zero in its parameter now."
        for name, (dim, drop) in self.drops.items():
            p = self.params[name].detach()
            dropped = p.index_select(dim, drop) if dim is not None else p[drop.expand_as(p)]
            if torch.count_nonzero(dropped): return False
        return True

    def check_state(self, saved, unfit):
        "A ValueError (starting with `unfit`) unless `saved` (each target's masks) fits these parameters."
        fits = lambda name, keep: name in self.params and keep.dim() == self.params[name].dim() and all(
            k in (1, p) for k, p in zip(keep.shape, self.params[name].shape))
        if len(saved) != len(self.by_target):
            raise ValueError(unfit + f'{len(saved)} targets saved, {len(self.by_target)} here')
        for masks in saved:
            bad = [n for n, keep in (masks or {}).items() if not fits(n, keep)]
            if bad: raise ValueError(unfit + f'mask {bad[0]!r} has no matching parameter')

    def load_state(self, saved):
        "Take each target's masks from `saved` (checked by `check_state`), on the parameters' devices; recombine."
        self.by_target = [None if m is None else {k: v.to(self.params[k].device) for k, v in m.items()} for m in saved]
        self.combine()
