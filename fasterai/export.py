"""Save and rebuild pruned models: a plain record of the pruned layer sizes, to rebuild the architecture from
the original class and then load an ordinary `state_dict`.

    torch.save({'config': pruned_config(pruned), 'state_dict': pruned.state_dict()}, 'pruned.pth')
    ckpt = torch.load('pruned.pth', weights_only=True)
    model = rebuild_pruned(Net(1), ckpt['config']); model.load_state_dict(ckpt['state_dict'])
"""
import torch
import torch.nn as nn

from .layers import kind_of, resize_splits
from .third_party import load_for

__all__ = ['pruned_config', 'rebuild_pruned']

def pruned_config(model):
    """Qualified name -> {'attrs': size attributes, 'shapes': parameter and buffer shapes} for every layer the
    Pruner can resize; plain ints and lists, so it saves with `torch.save` and loads with `weights_only=True`."""
    out = {}
    load_for(model)   # (the layer kinds of timm's and torchvision's modules)
    for name, m in model.named_modules():
        kind = kind_of(m)
        if kind is None: continue
        tensors = {**dict(m.named_parameters(recurse=False)), **dict(m.named_buffers(recurse=False))}
        out[name] = {'attrs': {a: getattr(m, a) for a in kind.size_attrs() if hasattr(m, a)},
                     'shapes': {k: list(t.shape) for k, t in tensors.items() if t is not None}}
    return out


@torch.no_grad()
def rebuild_pruned(model, config):
    """Resize the layers of `model` (a fresh instance of the original class) in place to the sizes `config`
    records (see `pruned_config`), ready for `load_state_dict`; returns `model`. Resized tensors are new and
    uninitialised (load the pruned weights next); those the config keeps at their size keep their values (a buffer
    left out of the state dict, such as TinyViT's bias index, stays right)."""
    load_for(model)
    modules = dict(model.named_modules())
    missing = [n for n in config if n not in modules]
    if missing: raise ValueError(f'{type(model).__name__} has no layer {missing[0]!r} that the config records: '
                                 'rebuild from an instance of the class the pruned model came from')
    for name, rec in config.items():
        m, kind = modules[name], kind_of(modules[name])
        if kind is None:
            raise ValueError(f"layer {name!r} is a {type(m).__name__}, not one the Pruner resizes")
        for a, v in rec['attrs'].items(): setattr(m, a, v)
        for k, shape in rec['shapes'].items():
            old = getattr(m, k)
            if old is not None and list(old.shape) == shape: continue   # unchanged: a buffer not saved keeps its values
            new = torch.empty(shape, dtype=old.dtype, device=old.device)
            if isinstance(old, nn.Parameter): setattr(m, k, nn.Parameter(new, requires_grad=old.requires_grad))
            else: setattr(m, k, new)
        if kind.rebuilt is not None: kind.rebuilt(m)
    resize_splits(model)
    return model
