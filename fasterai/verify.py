"""The Pruner's safety net: the pruned model must compute what the sparse one computed, in eval and in train
mode, on every output (tuples, lists, dicts and namedtuples, nested), or the Pruner raises PruningError."""
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import keystr, tree_flatten_with_path

from .errors import PruningError
from .tracing import MODES, buffers_kept, example_tensor, seeded, training_mode

__all__ = ['MODES', 'outputs', 'mismatch', 'check_same_function']

_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
             torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout}


class _NoDropout(TorchFunctionMode):
    """Dropout as the identity: pruning changes the shape of the tensors it draws masks for, so two models could
    never draw the same masks; every other random draw (stochastic depth, by batch row) is seeded alike."""
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUTS: return args[0] if args else kwargs['input']
        return func(*args, **kwargs)


@contextmanager
def _float64(model):
    "Compute `model` in float64 for a while: each floating tensor's data is swapped for a float64 copy, then back."
    saved = [(t, t.data) for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    try:
        for t, data in saved: t.data = data.double()
        yield
    finally:
        for t, data in saved: t.data = data


@torch.no_grad()
def outputs(model, example, training, float64=False):
    """What `model` returns on `example` (a tensor, or a shape for one seeded random input) in eval or train mode:
    every module's mode and every buffer (BatchNorm statistics) are put back afterwards, the caller's random
    state is left alone, and in train mode dropout is off and the other random draws are seeded."""
    x = example_tensor(model, example)
    with training_mode(model, training), buffers_kept(model), seeded(model), \
            (_NoDropout() if training else nullcontext()), (_float64(model) if float64 else nullcontext()):
        return model(x.double() if float64 and x.is_floating_point() else x)


def mismatch(ref, got, rtol=1e-4):
    """Why output `got` is not `ref` (a sentence), or None when they match: the same structure (tuples, lists,
    dicts, namedtuples), and each tensor of the same shape within `rtol` of its scale (its largest magnitude)."""
    (ref_leaves, ref_spec), (got_leaves, got_spec) = tree_flatten_with_path(ref), tree_flatten_with_path(got)
    if ref_spec != got_spec:
        return f'its output is structured differently: {got_spec} where the sparse model gives {ref_spec}'
    for (path, a), (_, b) in zip(ref_leaves, got_leaves):
        where = f'output{keystr(path)}'
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            if type(a) is not type(b) or a != b: return f'{where} is {_say(b)} where the sparse model gives {_say(a)}'
            continue
        if a.shape != b.shape: return f'{where} has shape {tuple(b.shape)} where the sparse model gives {tuple(a.shape)}'
        if a.dtype != b.dtype: return f'{where} is {b.dtype} where the sparse model gives {a.dtype}'
        if not a.is_floating_point():
            if not torch.equal(a, b): return f'{where} differs from the sparse one'
            continue
        scale = a.abs().max().item() if a.numel() else 0.
        diff = (a - b).abs().max().item() if a.numel() else 0.
        if not diff <= rtol * max(scale, 1e-12):
            return f'{where} differs from the sparse one by {diff:.3g} (output scale {scale:.3g})'
    return None


def _say(v):
    return f'a tensor of shape {tuple(v.shape)}' if isinstance(v, torch.Tensor) else repr(v)


def check_same_function(reference, pruned, example, rtol=1e-4, modes=MODES):
    """Raise PruningError unless `pruned` gives the outputs of `reference` in every mode of `modes` (False: eval,
    True: train) on `example` (a tensor, or a shape for a random input), within `rtol` of each output's scale.

    `reference`: the sparse model, or a function `(training, float64) -> outputs` (the Pruner's, which masks the
    user's model while it runs). A difference in float32 is checked again in float64, so that rounding
    amplified by batch statistics on a small example batch is not taken for a wrong model."""
    run = reference if callable(reference) and not isinstance(reference, torch.nn.Module) else \
        lambda training, float64=False: outputs(reference, example, training, float64)
    name = type(pruned).__name__
    for training in modes:
        mode = 'train' if training else 'eval'
        why = _why(run, pruned, example, training, rtol, False, mode)
        if why is not None and _why(run, pruned, example, training, rtol, True, mode) is not None:
            raise PruningError(f'the pruned {name} does not compute what the sparse one computes in {mode} mode: '
                               f'{why}. Nothing was returned; please report this model')


def _why(run, pruned, example, training, rtol, float64, mode):
    "Why `pruned` does not match the reference in one mode and precision, or None."
    try:
        ref = run(training, float64)
    except Exception as e:
        raise PruningError(f'the sparse model fails to run in {mode} mode on the example input ({type(e).__name__}: '
                           f'{e}); pass an example_input it runs on in both modes') from e
    try:
        got = outputs(pruned, example, training, float64)
    except Exception as e:
        return f'it fails to run ({type(e).__name__}: {e})'
    return mismatch(ref, got, rtol if not float64 else rtol / 100)
