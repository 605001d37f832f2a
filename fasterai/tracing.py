"""Tracing a model with torch.fx: leaf modules, train/eval modes, and shapes from meta tensors."""
import random
from contextlib import contextmanager

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .errors import TraceError
from .layers import known_base, kind_of
from .ops import ZERO_KEEPING, ZERO_MOVING

__all__ = ['MODES', 'training_mode', 'buffers_kept', 'seeded', 'device_dtype', 'unwrap', 'example_tensor', 'Leaves',
           'check_hooks', 'check_model', 'finite', 'first_nonfinite', 'check_example_input', 'symbolic_trace',
           'input_shape', 'input_dtype', 'propagate_shapes']

MODES = (False, True)
"The modes a model is traced and verified in: eval (False) and train (True)."


def check_hooks(model, leaves):
    for name, m in model.named_modules():
        if (m._forward_hooks or m._forward_pre_hooks) and not leaves.covers(name, m):
            raise TraceError(f"module '{name or type(model).__name__}' has forward hooks; torch.fx does not run "
                             "hooks, so its traced graph would not be the model's real computation. Remove the "
                             f"hooks, or pass leaf_modules=['{name}'] to keep it whole (its channels then stay).")


class Leaves:
    "Modules the tracer keeps whole, by qualified name (and everything under it) or by type."
    def __init__(self, leaf_modules):
        if not isinstance(leaf_modules, (str, type, list, tuple, set, frozenset)) and leaf_modules is not None:
            raise ValueError(f'leaf_modules must be a list of qualified module names or nn.Module types, got {leaf_modules!r}')
        items = [leaf_modules] if isinstance(leaf_modules, (str, type)) else list(leaf_modules or ())
        bad = [x for x in items if not (isinstance(x, str) or (isinstance(x, type) and issubclass(x, nn.Module)))]
        if bad: raise ValueError(f'leaf_modules must hold qualified module names or nn.Module types, got {bad[0]!r}')
        self.names, self.types = {x for x in items if isinstance(x, str)}, tuple(x for x in items if isinstance(x, type))

    def covers(self, name, module):
        return isinstance(module, self.types) or any(name == n or name.startswith(n + '.') for n in self.names)


class _Tracer(fx.Tracer):
    "fx's tracer, keeping `leaves` whole and remembering which module it was inside when tracing failed."
    def __init__(self, leaves):
        super().__init__()
        self.leaves, self.stack, self.failed = leaves, [], None

    def is_leaf_module(self, m, qualname):
        "Kept whole: what the user names, every registered layer kind, and subclasses of them not registered."
        return (self.leaves.covers(qualname, m) or kind_of(m) is not None or known_base(m) is not None or
                super().is_leaf_module(m, qualname))

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None: self.failed = (self.stack[-1], type(m).__name__)
            raise
        finally:
            self.stack.pop()


def symbolic_trace(model, leaves):
    "The fx graph of `model` (its modules are `model`'s own: no GraphModule is built, no code generated)."
    tracer = _Tracer(leaves)
    try:
        return tracer.trace(model)
    except Exception as e:
        where = (f" inside module '{tracer.failed[0]}' ({tracer.failed[1]})" if tracer.failed and tracer.failed[0]
                 else '')
        fix = (f"pass leaf_modules=['{tracer.failed[0]}'] to keep that module whole (its channels then stay), or "
               if where else '')
        raise TraceError(f'torch.fx cannot trace {type(model).__name__}{where}: {type(e).__name__}: {e}. '
                         f'To go on, {fix}rewrite the code without branches that depend on tensor values.') from e


def device_dtype(model):
    "The device and dtype `model` computes in: its first floating parameter's, or the CPU and float32 without one."
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (p.device, p.dtype) if p is not None else (torch.device('cpu'), torch.float32)


def unwrap(model):
    "The module a DataParallel or DistributedDataParallel model wraps (any other model itself)."
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def example_tensor(model, example):
    "`example` if it is a tensor, else one seeded random input of that shape on the model's device and dtype."
    if isinstance(example, torch.Tensor): return example
    device, dtype = device_dtype(model)
    return torch.randn(tuple(example), generator=torch.Generator().manual_seed(0)).to(device, dtype)


@contextmanager
def training_mode(model, training):
    "Set `model` to train or eval mode for a while; every submodule gets its own flag back afterwards."
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        model.train(flags[0][1])   # a train() of the model's own runs again (it may set more than the flags)
        for m, flag in flags: m.training = flag


@contextmanager
def buffers_kept(model):
    "Run `model` for a while (in train mode, say) without a lasting change to its buffers (BatchNorm statistics)."
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        yield model
    finally:
        with torch.no_grad():
            for b, value in saved: b.copy_(value)


@contextmanager
def seeded(model, seed=0):
    """Seed the random draws on `model`'s devices (the CPU, and the CUDA devices of its parameters), Python's
    `random` and NumPy's for a while; their states come back afterwards, so the caller's streams are left alone."""
    cuda = sorted({t.device.index for t in model.parameters() if t.is_cuda})
    state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            for i in cuda: torch.cuda.default_generators[i].manual_seed(seed)
            random.seed(seed); np.random.seed(seed)
            yield
    finally:
        random.setstate(state[0]); np.random.set_state(state[1])


SAME_SHAPE = {*ZERO_KEEPING, *ZERO_MOVING, nn.Hardtanh, nn.BatchNorm3d, nn.LayerNorm}
"""Module types other than the layer kinds whose output has their input's shape, dtype and layout: shape
propagation passes them through (and the layer kinds marked `same_shape`)."""


def _same_shape(m):
    kind = kind_of(m)
    return kind.same_shape if kind is not None else type(m) in SAME_SHAPE


def _fits(m, x):
    "Whether `x` has the shape `m` checks for (a norm's channel count): otherwise run `m` to raise its error."
    if not isinstance(x, torch.Tensor): return False
    if isinstance(m, nn.LayerNorm): return tuple(x.shape[-len(m.normalized_shape):]) == tuple(m.normalized_shape)
    n = getattr(m, 'num_features', getattr(m, 'num_channels', None))
    return n is None or (x.dim() >= 2 and x.shape[1] == n)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ADAPTIVE = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}   # -> pooled dims
def _hooked(m):
    "Whether calling `m` runs forward hooks (its own or global ones)."
    return bool(m._forward_hooks or m._forward_pre_hooks or nn.modules.module._global_forward_hooks or
                nn.modules.module._global_forward_pre_hooks)


class _Shapes(fx.Interpreter):
    """Runs the traced graph and records each node's output shape (`node.meta['shape']`, a tuple of them for
    a tuple output); on meta tensors no weight is read."""
    def __init__(self, root, graph, meta):
        super().__init__(root, graph=graph)
        self.meta = meta

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor): n.meta['shape'] = out.shape
        elif isinstance(out, (tuple, list)) and not isinstance(out, torch.Size):
            n.meta['shape'] = tuple(v.shape if isinstance(v, torch.Tensor) else None for v in out)
        return out

    def call_module(self, target, args, kwargs):
        if not self.meta: return super().call_module(target, args, kwargs)
        m = self.fetch_attr(target)
        meta = lambda t: None if t is None else torch.empty_like(t, device='meta')
        # shortcuts for one meta tensor into a hook-free module (a hook on a leaf module may change the output)
        x = (args[0] if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) and args[0].is_meta
             and not _hooked(m) else None)
        if x is not None and _same_shape(m) and _fits(m, x):
            return x   # shape, dtype and layout pass through: no need to run it, even on meta tensors
        if x is not None and type(m) in _CONVS:   # the op itself checks and sizes: much cheaper
            return m._conv_forward(x, meta(m.weight), meta(m.bias))
        if (x is not None and type(m) is nn.Linear and x.dim() >= 1 and x.shape[-1] == m.in_features and
                x.dtype == m.weight.dtype):
            return x.new_empty((*x.shape[:-1], m.out_features))   # a matmul on meta runs slow decompositions
        d = _ADAPTIVE.get(type(m))
        if d is not None and x is not None and x.dim() in (d + 1, d + 2) and x.is_floating_point():
            size = (m.output_size,) * d if isinstance(m.output_size, int) else tuple(m.output_size)
            return x.new_empty((*x.shape[:-d], *(i if o is None else o for o, i in zip(size, x.shape[-d:]))))
        state = {k: meta(v) for k, v in (*m.named_parameters(), *m.named_buffers())}
        if not state: return m(*args, **kwargs)   # nothing to swap for meta tensors
        return torch.func.functional_call(m, state, args, kwargs)

    def get_attr(self, target, args, kwargs):
        v = super().get_attr(target, args, kwargs)
        return torch.empty_like(v, device='meta') if self.meta and isinstance(v, torch.Tensor) else v


def default_input_shape(model):
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if isinstance(first, nn.Conv2d): return (2, first.in_channels, 224, 224)
    if isinstance(first, nn.Linear): return (2, first.in_features)
    raise TraceError(f'cannot guess the input shape of {type(model).__name__}: pass example_input')


def finite(t):
    "Whether tensor `t` holds no NaN or inf (a sum first: one cheap pass; element-wise only if it is not finite)."
    if not t.is_floating_point(): return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def first_nonfinite(named):
    "The name of the first (name, tensor) pair of `named` whose tensor holds NaN or inf, or None."
    return next((n for n, t in named if not finite(t.detach())), None)


def check_model(model):
    "A TypeError unless `model` is an nn.Module."
    if not isinstance(model, nn.Module):
        raise TypeError(f'expected a torch.nn.Module to sparsify or prune, got {type(model).__name__}')
    lazy = next((n for n, p in model.named_parameters() if nn.parameter.is_lazy(p)), None)
    if lazy is not None:
        raise ValueError(f"parameter '{lazy}' of {type(model).__name__} is not initialised yet (a lazy module): run "
                         'one forward pass first, so that every layer knows its size')


def check_example_input(model, example_input):
    """A ValueError unless `example_input` is None, a shape (positive ints, batch first) or a tensor of the
    model's floating dtype on the model's device."""
    if example_input is None: return
    if isinstance(example_input, torch.Tensor):
        if not any(p.is_floating_point() for p in model.parameters()): return
        device, dtype = device_dtype(model)
        if example_input.is_floating_point() and example_input.dtype != dtype:
            raise ValueError(f'example_input is {example_input.dtype} but the model computes in {dtype}: pass a '
                             f'tensor of dtype {dtype}, or a shape')
        if example_input.device != device:
            raise ValueError(f'example_input is on {example_input.device} but the model is on {device}: move one '
                             'of them, or pass a shape')
        return
    if (not isinstance(example_input, (tuple, list, torch.Size)) or len(example_input) < 2 or
            not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in example_input)):
        raise ValueError(f'example_input must be a tensor or a shape of positive ints with the batch first, such as '
                         f'(2, 3, 224, 224), got {example_input!r}')


def input_shape(model, example_input):
    if example_input is None: return default_input_shape(model)
    return tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else tuple(example_input)


def propagate_shapes(graph, model, shape, dtype, guessed):
    """Shapes of every node of `model`'s `graph` on meta tensors; code that needs real tensors runs on zeros (its
    buffers, such as BatchNorm statistics in train mode, and the random state are put back afterwards)."""
    try:
        try:
            _Shapes(model, graph, meta=True).run(torch.empty(shape, dtype=dtype, device='meta'))
        except Exception:
            with torch.no_grad(), buffers_kept(model), seeded(model):
                _Shapes(model, graph, meta=False).run(torch.zeros(shape, dtype=dtype, device=device_dtype(model)[0]))
    except Exception as e:
        mode = 'train' if model.training else 'eval'
        hint = (f'the shape was guessed: pass an example_input {type(model).__name__} runs on in train and eval mode'
                if guessed else f'pass an example_input {type(model).__name__} runs on in train and eval mode')
        why = (str(e).strip().splitlines() or [''])[0]   # fx appends the graph node and more lines
        raise TraceError(f'running {type(model).__name__} in {mode} mode on an input of shape {shape} failed '
                         f'({type(e).__name__}: {why}). Pruning must follow both modes (a branch that runs only in '
                         f'training reads channels too): {hint}') from e


def input_dtype(model, example_input):
    return example_input.dtype if isinstance(example_input, torch.Tensor) else device_dtype(model)[1]
