"""The Pruner's safety net: the pruned model must compute what the sparse one computed, in eval and in train
mode, on every output (tuples, lists, dicts and namedtuples, nested), or the Pruner raises PruningError."""
import dataclasses
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .errors import PruningError, TraceError
from .tracing import MODES, buffers_kept, example_args, seeded, state_kept, training_mode

__all__ = ['MODES', 'outputs', 'mismatch', 'reference_outputs', 'check_same_function']

_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
             torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout}


class _NoDropout(TorchFunctionMode):
    """Dropout as the identity: pruning changes the shape of the tensors it draws masks for, so two models could
    never draw the same masks; every other random draw (stochastic depth, by batch row) is seeded alike."""
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUTS:   # a new tensor, as dropout in training gives (fastai's WeightDropout stores it)
            x = args[0] if args else kwargs['input']
            return x if kwargs.get('inplace') or (len(args) > 3 and args[3]) else x.clone()
        if func is F.scaled_dot_product_attention:   # its dropout draws per head: off, as dropout is
            if len(args) > 4: args = (*args[:4], 0.0, *args[5:])
            else: kwargs = {**kwargs, 'dropout_p': 0.0}
        if func is F.multi_head_attention_forward:   # nn.MultiheadAttention: its dropout runs inside, unseen by a mode
            if len(args) > 13: args = (*args[:13], False, *args[14:])
            else: kwargs = {**kwargs, 'training': False}   # (training only turns its dropout on)
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
    """What `model` returns on `example` (a tensor or a tuple of them, copied so that an in-place forward cannot
    change them, or a shape for one seeded random input) in eval or train mode: every module's mode, attributes (a
    recurrent layer's hidden state) and buffers (BatchNorm statistics) are put back afterwards, the caller's random
    state is left alone, and in train mode dropout is off and the other random draws are seeded."""
    args = [x.clone() for x in example_args(model, example)]
    if float64: args = [x.double() if x.is_floating_point() else x for x in args]
    with training_mode(model, training), buffers_kept(model), state_kept(model), seeded(model), \
            (_NoDropout() if training else nullcontext()), (_float64(model) if float64 else nullcontext()):
        return model(*args)


def _flatten(v, path='output'):
    """(structure, leaves) of an output: its containers (tuples, lists, dicts and their subclasses, namedtuples,
    dataclasses) as (path, type, keys or length), and its leaves as (path, value)."""
    if isinstance(v, torch.Tensor): return [], [(path, v)]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        items = [(f.name, getattr(v, f.name)) for f in dataclasses.fields(v)]
        step = lambda k: f'{path}.{k}'
    elif isinstance(v, Mapping):
        items, step = list(v.items()), (lambda k: f'{path}[{k!r}]')
    elif isinstance(v, (tuple, list)):
        fields = getattr(v, '_fields', None)   # a namedtuple
        items = list(zip(fields, v)) if fields else list(enumerate(v))
        step = (lambda k: f'{path}.{k}') if fields else (lambda k: f'{path}[{k}]')
    else:
        return [], [(path, v)]
    structure, leaves = [(path, type(v).__name__, tuple(k for k, _ in items))], []
    for k, x in items:
        s, l = _flatten(x, step(k))
        structure += s; leaves += l
    return structure, leaves


def mismatch(ref, got, rtol=1e-4):
    """Why output `got` is not `ref` (a sentence), or None when they match: the same structure (tuples, lists,
    dicts, namedtuples, dataclasses, their types and keys), each tensor of the same shape and dtype within `rtol`
    of its scale (its largest finite magnitude; NaN and infinities in the same places), numbers within `rtol`,
    anything else equal."""
    (ref_s, ref_l), (got_s, got_l) = _flatten(ref), _flatten(got)
    if ref_s != got_s or [p for p, _ in ref_l] != [p for p, _ in got_l]:
        return f'its output is structured differently: {_shape(got_s, got_l)} where the sparse model gives ' \
               f'{_shape(ref_s, ref_l)}'
    for (where, a), (_, b) in zip(ref_l, got_l):
        why = _leaf_mismatch(a, b, rtol)
        if why: return f'{where} {why}'
    return None


def _shape(structure, leaves):
    "A short description of an output's structure, for messages."
    return '; '.join([f'{p}: {t} {list(k)}' for p, t, k in structure] + [f'{p}: {type(v).__name__}' for p, v in leaves])


def _leaf_mismatch(a, b, rtol):
    "Why leaf `b` is not leaf `a`, or None."
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor): return _tensor_mismatch(a, b, rtol)
    if type(a) is not type(b): return f'is {_say(b)} where the sparse model gives {_say(a)}'
    if isinstance(a, float): return _tensor_mismatch(torch.tensor(a), torch.tensor(b), rtol)
    if hasattr(a, '__array__') and not isinstance(a, (str, bytes)):   # numpy arrays and the like
        return _tensor_mismatch(torch.as_tensor(a), torch.as_tensor(b), rtol)
    try:
        same = bool(a == b)
    except Exception as e:
        return f'is a {type(a).__name__}, which cannot be compared ({type(e).__name__}: {e})'
    return None if same else f'is {_say(b)} where the sparse model gives {_say(a)}'


def _tensor_mismatch(a, b, rtol):
    if a.shape != b.shape: return f'has shape {tuple(b.shape)} where the sparse model gives {tuple(a.shape)}'
    if a.dtype != b.dtype: return f'is {b.dtype} where the sparse model gives {a.dtype}'
    if not (a.is_floating_point() or a.is_complex()):
        return None if torch.equal(a, b) else 'differs from the sparse one'
    finite = torch.isfinite(a)
    if not torch.equal(finite, torch.isfinite(b)) or not torch.equal(a[~finite].nan_to_num(0., 1., -1.),
                                                                     b[~finite].nan_to_num(0., 1., -1.)):
        return 'holds NaN or infinities in other places than the sparse one'
    a, b = a[finite], b[finite]
    scale = a.abs().max().item() if a.numel() else 0.
    diff = (a - b).abs().max().item() if a.numel() else 0.
    if diff <= rtol * max(scale, 1e-12): return None
    return f'differs from the sparse one by {diff:.3g} (output scale {scale:.3g})'


def _say(v):
    return f'a tensor of shape {tuple(v.shape)}' if isinstance(v, torch.Tensor) else repr(v)


def _first_line(e):
    return (str(e).strip().splitlines() or [''])[0]


def check_same_function(reference, pruned, example, rtol=1e-4, modes=MODES):
    """Raise PruningError unless `pruned` gives the outputs of `reference` in every mode of `modes` (False: eval,
    True: train) on `example` (a tensor, or a shape for a random input), within `rtol` of each output's scale.

    `reference`: the sparse model, or a function `(training, float64) -> outputs` (the Pruner's, which masks the
    user's model while it runs). A difference in float32 is checked again in float64, so that rounding
    amplified by batch statistics on a small example batch is not taken for a wrong model; a model that fails to
    run on the example in a mode raises TraceError."""
    run = reference if callable(reference) and not isinstance(reference, torch.nn.Module) else \
        lambda training, float64=False: outputs(reference, example, training, float64)
    name, expected = type(pruned).__name__, reference_outputs(run, modes)
    for training in modes:
        mode = 'train' if training else 'eval'
        why = _compare(expected[training], pruned, example, training, rtol, False)
        if why is None: continue
        try:   # rounding, or a real difference? float64 tells
            ref64 = run(training, True)
            if _compare(ref64, pruned, example, training, rtol / 100, True) is None: continue
        except Exception as e:
            why += f' (a float64 re-check, to rule out rounding, could not run: {type(e).__name__}: {_first_line(e)})'
        hint = ('; in train mode only, a random draw that is not seeded alike (Python\'s random, NumPy) or whose shape '
                'depends on the channels can cause this: verify=False skips the check') if training else ''
        raise PruningError(f'the pruned {name} does not compute what the sparse one computes in {mode} mode: '
                           f'{why}{hint}. Nothing was returned; please report this model')


def reference_outputs(run, modes=MODES):
    """{training: outputs} of the reference function `run(training, float64)` in each mode; a TraceError when it
    cannot run on the example in a mode."""
    out = {}
    for training in modes:
        try:
            out[training] = run(training, False)
        except Exception as e:
            mode = 'train' if training else 'eval'
            raise TraceError(f'the sparse model fails to run in {mode} mode on the example input ({type(e).__name__}: '
                             f'{_first_line(e)}): pass an example_input it runs on in both modes (a batch of two or '
                             'more where BatchNorm sees one value per channel), or verify=False') from e
    return out


def _compare(ref, pruned, example, training, rtol, float64):
    "Why `pruned` does not give `ref` in one mode and precision, or None."
    try:
        got = outputs(pruned, example, training, float64)
    except Exception as e:
        return f'it fails to run ({type(e).__name__}: {_first_line(e)})'
    return mismatch(ref, got, rtol)
