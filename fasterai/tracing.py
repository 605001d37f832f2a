"""Tracing a model with torch.fx: leaf modules, train/eval modes, and shapes from meta tensors."""
import functools
import inspect
import operator
import random
import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .errors import TraceError
from .layers import known_base, kind_of
from .third_party import load_for
from .ops import MODULE_RULES, ZERO_KEEPING, ZERO_MOVING, is_inplace

__all__ = ['MODES', 'hooks_taken_out', 'training_mode', 'buffers_kept', 'state_kept', 'seeded', 'device_dtype', 'unwrap', 'is_tensors', 'example_args', 'example_tensor', 'Leaves',
           'check_model', 'finite', 'first_nonfinite', 'check_example_input', 'symbolic_trace',
           'input_shape', 'input_specs', 'propagate_shapes']

MODES = (False, True)
"The modes a model is traced and verified in: eval (False) and train (True)."


class _Hooks:
    """Every forward and backward hook of a model, and the global ones, taken out of the modules for a while (fx
    does not run them, and the traced graph must hold what they do): `_Tracer` runs the forward ones on the
    graph's proxies where PyTorch would call them, so a hook that changes an output, or stores it for a later
    module to read (fastai's `Hook.stored`, as in `DynamicUnet`), is traced like the forward code, and one that
    only observes leaves nothing in the graph. The hooks (a hook that removes itself included) and the attributes
    of the objects they belong to (`_owners`: fastai's `Hook`, whose `stored` is cleared while tracing) come back
    afterwards."""
    _KEYS = ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks')
    _GLOBAL = ('_global_forward_hooks', '_global_forward_pre_hooks', '_global_backward_hooks',
               '_global_backward_pre_hooks')

    def __init__(self, model):
        self.modules, self.taken, self.glob, self.owners, self.items = list(model.modules()), {}, {}, {}, []

    def __enter__(self):
        g = nn.modules.module
        dicts = [getattr(g, k) for k in self._GLOBAL] + [getattr(m, k) for m in self.modules for k in self._KEYS]
        self.items = [(d, list(d.items())) for d in dicts if d]   # a hook that removes itself comes back
        for obj in {id(o): o for d in dicts for h in d.values() for o in _owners(h)}.values():
            self.owners[id(obj)] = (obj, dict(vars(obj)))
            if _is_fastai_hook(obj): obj.stored = None   # a hook inside a module kept whole must not feed a stale one
        for k in self._GLOBAL:
            self.glob[k] = getattr(g, k).copy(); getattr(g, k).clear()
        for m in self.modules:
            d = {k: getattr(m, k) for k in self._KEYS}
            if any(d.values()):
                self.taken[id(m)] = d
                for k in self._KEYS: setattr(m, k, type(d[k])())   # the user's dicts (their handles) come back
        return self

    def __exit__(self, *exc):
        g = nn.modules.module
        for k, v in self.glob.items(): getattr(g, k).update(v)
        for m in self.modules:
            for k, v in self.taken.get(id(m), {}).items(): setattr(m, k, v)
        for d, items in self.items:
            d.clear(); d.update(items)
        for obj, state in self.owners.values():
            vars(obj).clear(); vars(obj).update(state)

    def forward_pre(self, m):
        "(hook, with_kwargs) of each forward pre-hook PyTorch would run on a call of `m`, in its order."
        own = self.taken.get(id(m), {}).get('_forward_pre_hooks', {})
        return [(h, k in m._forward_pre_hooks_with_kwargs)
                for k, h in (*self.glob['_global_forward_pre_hooks'].items(), *own.items())]

    def forward(self, m):
        "(hook, with_kwargs) of each forward hook PyTorch would run after a call of `m`, in its order."
        g = nn.modules.module
        own = self.taken.get(id(m), {}).get('_forward_hooks', {})
        return [(h, k in m._forward_hooks_with_kwargs or k in g._global_forward_hooks_with_kwargs)
                for k, h in (*self.glob['_global_forward_hooks'].items(), *own.items())]


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


def _owners(hook):
    """The objects whose attributes `hook` may set: the object it is a method of (fastai's `Hook`, a module outside
    the model), that of a `functools.partial`'s function, or a callable object itself. (A closure's cells cannot be
    put back: a hook that appends to a list it closes over will find proxies there.)"""
    for f in (hook, getattr(hook, 'func', None)):
        obj = getattr(f, '__self__', None)
        if obj is not None and hasattr(obj, '__dict__'): yield obj
    if not (inspect.isfunction(hook) or inspect.ismethod(hook) or inspect.isbuiltin(hook)) and hasattr(hook, '__dict__'):
        yield hook


def _is_fastai_hook(obj):
    try:
        from fastai.callback.hook import Hook
    except ImportError:
        return False
    return isinstance(obj, Hook)


def _stores_output(owner, hook):
    "Whether `hook` is fastai's `Hook.hook_fn` storing the module's output as it is (`hook_outputs`, DynamicUnet)."
    try:
        from fastai.callback.hook import Hook, _hook_inner
    except ImportError:
        return False
    return (isinstance(owner, Hook) and getattr(hook, '__func__', None) is Hook.hook_fn and
            owner.hook_func is _hook_inner)


def hooks_taken_out(model):
    "A context in which `model`'s hooks (and the global ones) are taken out; yields them for `symbolic_trace`."
    return _Hooks(model)


TRACED_THROUGH = {nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder, nn.TransformerDecoder,
                  nn.Transformer}
"""torch.nn modules the tracer follows inside: their code calls layers the graph knows (nn.MultiheadAttention,
Linear, LayerNorm); their fused inference paths test `has_torch_function`, which a traced tensor has, so the
traced code is the plain one."""


class _Tracer(fx.Tracer):
    """fx's tracer, keeping `leaves` whole, running the forward hooks of `hooks` (a `_Hooks`, entered) where PyTorch
    would, and remembering which module it was inside when tracing failed."""
    def __init__(self, leaves, hooks, inputs=(), device=None):
        super().__init__()
        self.leaves, self.hooks, self.stack, self.failed, self.in_hook, self.hook_nodes = leaves, hooks, [], None, 0, set()
        self.inputs, self.meta, self.branches = inputs, None, []   # meta inputs; their interpreter; branches taken
        self.device = device   # the device the example and the model are on

    # Python control flow on shapes (`if x.shape[-2:] != y.shape[-2:]`, `for n in x.shape`) is resolved with the
    # example's concrete shapes: the nodes it reads are run on meta tensors (no compute) when it is met, and the
    # branch taken is recorded. A branch on tensor values has no concrete answer on meta tensors: fx's error.
    def to_bool(self, obj):
        value = self._concrete(obj.node)
        if isinstance(value, (bool, int)):
            self._record(obj.node, f'is {bool(value)}')
            return bool(value)
        return super().to_bool(obj)

    def iter(self, obj):
        value = self._concrete(obj.node, tensors=True)   # a shape, or a tensor iterated along its first dim
        n = _length(value)
        if n is None: return super().iter(obj)
        if isinstance(value, torch.Tensor):
            self._record(obj.node, f'is iterated over {n} entries')
            obj.node.meta['concrete'] = True
        return iter([obj[i] for i in range(n)])

    def proxy(self, node):
        return _ShapeProxy(node, self)

    def concrete_int(self, proxy, what):
        "A size as a Python int (`int(n)`, `range(n)`, `t.expand(n, -1)` on a plain tensor): the example's, recorded."
        value = self._concrete(proxy.node)
        if isinstance(value, float) and what != 'an index': value = int(value) if what == 'int()' else value
        if not isinstance(value, (int, float)) or (isinstance(value, float) and what == 'an index'):
            raise TypeError(f"{what} of '{proxy.node.name}', a value that is not computed from shapes alone")
        value = value if isinstance(value, float) else int(value)   # a bool is an int: int(h > w)
        self._record(proxy.node, f'is {value} as {what}')
        proxy.node.meta['concrete'] = True   # the channel graph freezes a channel count read so
        return value

    def concrete_len(self, proxy):
        "`len()` of a shape or a tensor: the example's, recorded."
        value = self._concrete(proxy.node, tensors=True)
        n = _length(value)
        if n is None: return fx.Proxy.__len__(proxy)   # fx's error
        self._record(proxy.node, f'has len() {n}')
        proxy.node.meta['concrete'] = True
        return n

    def _record(self, node, what):
        where = self.stack[-1] if self.stack else ''
        self.branches.append(f"{where or 'forward'}: '{node.name}' {what} for the example's shapes")

    def _concrete(self, node, tensors=False):
        """The value of `node` on the example's meta tensors when it is computed from shapes alone (a size, a
        comparison of sizes), else None. Only the nodes it depends on run; every step from a tensor to a plain
        value must read its shape (`x.shape`, `x.size()`, `x.dim()`, `x.numel()`, `x.dtype`) or its device, which
        is read as the example's (the model's), not 'meta': `requires_grad` or a value has none the real run has."""
        if not self.inputs or _unpatched is None: return None
        seen = _needed(self.graph, node)
        try:
            with _unpatched():   # fx's patches off (a module call must not record a node), back on afterwards
                if self.meta is None:
                    self.meta = _Shapes(self.root, self.graph, meta=True)
                    self.meta.args_iter = iter(self.inputs)
                for n in self.graph.nodes:
                    if n not in seen or n in self.meta.env: continue
                    placed = self.device is not None and _reads_device(n) and not _only_places(n)
                    self.meta.env[n] = self.device if placed else self.meta.run_node(n)
        except Exception:
            return None
        env = self.meta.env
        for n in seen:
            reads = [i for i in n.all_input_nodes if _holds_tensor(env[i])]
            if reads and not _holds_tensor(env[n]) and not (_reads_shape(n) or _reads_device(n) or _writes(n)):
                return None   # (a write returns nothing: what it wrote into is the tensor read on)
        value = env[node]
        if tensors and isinstance(value, torch.Tensor): return value   # only its shape may be read
        return None if isinstance(value, (torch.Tensor, fx.Proxy)) else value

    def is_leaf_module(self, m, qualname):
        """Kept whole: what the user names, every layer kind and module with a rule, and unregistered subclasses of
        them; torch.nn's transformer blocks are followed inside (fx keeps every torch.nn module whole)."""
        if type(m) in TRACED_THROUGH and not self.leaves.covers(qualname, m): return False
        return (self.leaves.covers(qualname, m) or kind_of(m) is not None or known_base(m) is not None or
                type(m) in MODULE_RULES or super().is_leaf_module(m, qualname))

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        if self.in_hook: self.hook_nodes.add(node)
        return node

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            for hook, with_kwargs in self.hooks.forward_pre(m):   # as nn.Module._call_impl runs them
                res = self._hook(hook, m, (args, kwargs) if with_kwargs else (args,))
                if res is not None and with_kwargs: args, kwargs = res
                elif res is not None: args = res if isinstance(res, tuple) else (res,)
            out = super().call_module(m, forward, args, kwargs)
            for hook, with_kwargs in self.hooks.forward(m):
                res = self._hook(hook, m, (args, kwargs, out) if with_kwargs else (args, out))
                if res is not None: out = res
            return out
        except Exception:
            if self.failed is None: self.failed = (self.stack[-1], type(m).__name__)
            raise
        finally:
            self.stack.pop()

    def _hook(self, hook, m, args):
        self.in_hook += 1
        try:
            owner = getattr(hook, '__self__', None)
            if _stores_output(owner, hook):   # what it does, stated: `_hook_inner` cannot run on a proxy
                owner.stored = args[-1]
                return None
            return hook(m, *args)
        finally:
            self.in_hook -= 1

    def drop_dead_hook_nodes(self, graph):
        "What a hook computed only to observe (fastai's ActivationStats: means, stds) is not part of the model."
        for node in reversed(list(graph.nodes)):
            if node in self.hook_nodes and not node.users and node.op != 'output' and not is_inplace(node):
                graph.erase_node(node)


class _Concrete:
    """What fx's proxies gain while tracing: a Python int where Python or torch needs one (`int(n)`, `range(n)`, an
    index, a size passed to a plain tensor's method) and a `len()`, when the value is computed from the example's
    shapes; item assignment is recorded."""
    def __index__(self): return self.tracer.concrete_int(self, 'an index')
    def __int__(self): return self.tracer.concrete_int(self, 'int()')
    def __float__(self): return float(self.tracer.concrete_int(self, 'float()'))
    def __len__(self): return self.tracer.concrete_len(self)

    def __setitem__(self, key, value):   # x[..., 2] = v: recorded; the graph freezes the channels it writes
        self.tracer.create_proxy('call_function', operator.setitem, (self, key, value), {})

    def __getattr__(self, k):   # `x.shape`: fx's Attribute, with the same abilities
        if k == 'type' and isinstance(self, fx.proxy.Attribute) and self.attr == 'device' and self.tracer.device:
            self.tracer.branches.append(f"'{self.root.node.name}.device.type' is '{self.tracer.device.type}', "
                                        "the example's")   # autocast(device_type=x.device.type) needs a str
            return self.tracer.device.type
        return _ShapeAttribute(self, k)


class _ShapeProxy(_Concrete, fx.Proxy):
    pass


class _ShapeAttribute(_Concrete, fx.proxy.Attribute):
    pass


def _needed(graph, node):
    """The nodes that computing `node` runs: its ancestors, every input (they bind by position), and whatever wrote
    into one of them in place before it (`feats[0] = f(feats[0])`, `x.unsqueeze_(0)`), with their own ancestors."""
    seen, stack = set(), [node, *(n for n in graph.nodes if n.op == 'placeholder')]
    while True:
        while stack:
            n = stack.pop()
            if n not in seen: seen.add(n); stack.extend(n.all_input_nodes)
        for n in graph.nodes:
            if n is node: break
            if n not in seen and _writes(n) and n.args and n.args[0] in seen: stack.append(n)
        if not stack: return seen


def _writes(node):
    "Whether `node` writes into its first operand: item assignment, an in-place op or method (`add_`, `unsqueeze_`)."
    return is_inplace(node) or (node.op == 'call_method' and node.target.endswith('_') and
                                not node.target.startswith('_'))   # (ops.INPLACE holds operator.setitem)


def _length(value):
    "`len()` of a concrete value: a tensor's first dim (None for a 0-dim one), a shape's or tuple's length, else None."
    if isinstance(value, torch.Tensor): return value.shape[0] if value.dim() else None
    return len(value) if isinstance(value, (tuple, list)) else None


def _holds_tensor(value):
    "Whether `value` is a tensor or a tuple, list or dict holding one (`x.unbind(0)`: its parts' shapes may be read)."
    if isinstance(value, torch.Tensor): return True
    if isinstance(value, dict): value = value.values()
    return isinstance(value, (tuple, list, type({}.values()))) and any(_holds_tensor(v) for v in value)


def _reads_device(node):
    return node.op == 'call_function' and node.target is getattr and node.args[1] == 'device'


def _only_places(node):
    "Whether `node` reads a device that is only used to place tensors (`t.to(x.device)`): on meta tensors, 'meta'."
    return (_reads_device(node) and
            all((u.op == 'call_method' and u.target == 'to' and node not in u.args[2:]) or
                (u.kwargs.get('device') is node and node not in u.args) for u in node.users))


def _reads_shape(node):
    "Whether `node` reads a tensor's shape, number of dims or elements, dtype, or whether it is nested (what meta tensors hold exactly)."
    if node.op == 'call_method': return node.target in ('size', 'dim', 'ndimension', 'numel')
    return node.op == 'call_function' and node.target is getattr and node.args[1] in ('shape', 'ndim', 'dtype', 'is_nested')


_unpatched = getattr(fx._symbolic_trace, '_maybe_revert_all_patches', None)
"fx's context that lifts its tracing patches for a while (without it, shapes do not resolve branches)."


def symbolic_trace(model, leaves, hooks, specs=()):
    """The fx graph of `model` (its modules are `model`'s own: no GraphModule is built, no code generated), inside
    `hooks` (an entered `_Hooks` of `model`): the forward hooks are traced where PyTorch would run them. `specs`
    (from `input_specs`): the example's shapes, which resolve Python branches on shapes; `graph.branches` lists
    the branches taken."""
    device = next((t.device for _, _, t in specs if t is not None), device_dtype(model)[0])
    tracer = _Tracer(leaves, hooks, tuple(torch.empty(s, dtype=d, device='meta') for s, d, _ in specs), device)
    fixed = _defaults_after(model, len(specs)) if specs else {}
    try:
        with _sizes_as_tuples():
            graph = tracer.trace(model, concrete_args=fixed or None)
    except Exception as e:
        where = (f" inside module '{tracer.failed[0]}' ({tracer.failed[1]})" if tracer.failed and tracer.failed[0]
                 else '')
        hooked = ' or its forward hooks' if where and hooks.taken.get(id(model.get_submodule(tracer.failed[0]))) else ''
        parts = [n for n, c in model.named_children() if any(True for _ in c.parameters())]
        fix = (f"pass leaf_modules=['{tracer.failed[0]}'] to keep that module whole (its channels then stay), or "
               if where else f"sparsify and prune a part of it that traces alone (one of its children: "
               f"{', '.join(repr(n) for n in parts)}), or " if parts else '')
        raise TraceError(f'torch.fx cannot trace {type(model).__name__}{where}{hooked}: {type(e).__name__}: {e}. '
                         f'To go on, {fix}rewrite the code without branches that depend on tensor values.') from e
    tracer.drop_dead_hook_nodes(graph)
    _drop_fixed_inputs(graph, len(specs))
    _tell_fixed(model, fixed)
    graph.branches = tracer.branches + [f"forward: '{k}' is {v!r}, its default" for k, v in fixed.items()]
    return graph


_SIZED = {torch: ('zeros', 'ones', 'empty', 'rand', 'randn'),
          torch.Tensor: ('expand', 'repeat', 'view', 'reshape', 'new_zeros', 'new_ones', 'new_empty')}
"""Functions and methods taking sizes as separate arguments (`torch.ones(B, n)`), which PyTorch's argument parser
does not pass to fx when the first size is traced: given them as one tuple, they are recorded."""


@contextmanager
def _sizes_as_tuples():
    "While tracing, `torch.ones(B, n)` and `t.expand(B, -1)` with traced sizes become `torch.ones((B, n))`."
    def tupled(f, first):
        @functools.wraps(f)
        def call(*args, **kwargs):
            sizes = args[first:]
            if (len(sizes) > 1 and any(isinstance(v, fx.Proxy) for v in sizes)   # one argument may be a whole size
                    and all(isinstance(v, (int, fx.Proxy)) for v in sizes)):
                args = (*args[:first], tuple(sizes))
            return f(*args, **kwargs)
        return call
    saved = [(owner, name, getattr(owner, name)) for owner, names in _SIZED.items() for name in names]
    try:
        for owner, name, f in saved: setattr(owner, name, tupled(f, 1 if owner is torch.Tensor else 0))
        yield
    finally:
        for owner, name, f in saved: setattr(owner, name, f)


def _defaults_after(model, n):
    """The parameters of `model.forward` after the example's `n` inputs that have defaults, with them: the model runs
    with them (`mask=None`), so they are traced as constants and `if mask is not None` takes the branch it takes."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    if any(p.kind is p.VAR_POSITIONAL for p in params[:n + 1]): return {}
    return {p.name: p.default for p in params[n:] if p.kind is not p.VAR_KEYWORD and
            (p.default is None or type(p.default) in (bool, int, float, str))}


_TOLD = set()


def _tell_fixed(model, fixed):
    "Warn, once per model class and parameters, that a trace took forward parameters at their defaults."
    key = (type(model), tuple(fixed))
    if not fixed or key in _TOLD: return
    _TOLD.add(key)
    shown = ', '.join(f'{k}={v!r}' for k, v in fixed.items())
    warnings.warn(f'fasterai traced {type(model).__name__} with {shown}: the defaults of the forward parameters the '
                  'example does not give. Channels are followed, and pruning checked, for calls that leave them so; '
                  'a call with other values may take code the trace did not see (graph.branches lists them)',
                  stacklevel=3)


_FIXED_CHECKS = (fx._symbolic_trace._assert_is_none, torch._assert, operator.eq)


def _drop_fixed_inputs(graph, n):
    "The inputs fx adds for the fixed parameters, and the checks it adds on them: not part of the model."
    for ph in [p for p in graph.nodes if p.op == 'placeholder'][n:]:
        users, stack = [], [ph]
        while stack:
            for u in stack.pop().users:
                if u not in users: users.append(u); stack.append(u)
        if all(u.op == 'call_function' and u.target in _FIXED_CHECKS for u in users):
            for u in sorted(users, key=lambda u: -_position(graph, u)): graph.erase_node(u)
            graph.erase_node(ph)


def _position(graph, node):
    return next(i for i, n in enumerate(graph.nodes) if n is node)


def device_dtype(model):
    "The device and dtype `model` computes in: its first floating parameter's, or the CPU and float32 without one."
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (p.device, p.dtype) if p is not None else (torch.device('cpu'), torch.float32)


def unwrap(model):
    "The module a DataParallel or DistributedDataParallel model wraps (any other model itself)."
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def is_tensors(example):
    "Whether `example` is real input: a tensor, or a tuple or list of them (a model of several inputs)."
    return isinstance(example, torch.Tensor) or (isinstance(example, (tuple, list)) and len(example) > 0 and
                                                 all(isinstance(t, torch.Tensor) for t in example))


def example_args(model, example):
    """The positional inputs `example` stands for: the tensor itself, the tuple of tensors, or for a shape one seeded
    random input of that shape on the model's device and dtype."""
    if isinstance(example, torch.Tensor): return (example,)
    if is_tensors(example): return tuple(example)
    device, dtype = device_dtype(model)
    return (torch.randn(tuple(example), generator=torch.Generator().manual_seed(0)).to(device, dtype),)


def example_tensor(model, example):
    "The first input `example_args` gives."
    return example_args(model, example)[0]


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
def state_kept(model):
    """Put every module's attributes back afterwards (and the entries of its parameter, buffer and child dicts):
    forward code run on proxies or meta tensors may store what it computed (a recurrent layer's hidden state,
    fastai's WeightDropout its weights), which must not outlive the trace."""
    saved = [(m, dict(vars(m)), {k: dict(vars(m)[k]) for k in ('_parameters', '_buffers', '_modules')})
             for m in model.modules()]
    try:
        yield model
    finally:
        for m, attrs, dicts in saved:
            d = vars(m)
            for k in [k for k in d if k not in attrs]: del d[k]
            d.update(attrs)
            for k, items in dicts.items():
                d[k].clear(); d[k].update(items)


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
    "A TypeError unless `model` is an nn.Module; the layers of the libraries its modules come from get known."
    if not isinstance(model, nn.Module):
        raise TypeError(f'expected a torch.nn.Module to sparsify or prune, got {type(model).__name__}')
    load_for(model)
    lazy = next((n for n, p in model.named_parameters() if nn.parameter.is_lazy(p)), None)
    if lazy is not None:
        raise ValueError(f"parameter '{lazy}' of {type(model).__name__} is not initialised yet (a lazy module): run "
                         'one forward pass first, so that every layer knows its size')


def check_example_input(model, example_input):
    """A ValueError unless `example_input` is None, a shape (positive ints, batch first), a tensor, or a tuple or list
    of tensors (a model of several inputs, any dtype: integer category codes for embeddings); floating ones must
    have the model's dtype, and all must be on the model's device."""
    if example_input is None: return
    if is_tensors(example_input):
        tensors = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
        if not any(p.is_floating_point() for p in model.parameters()): return
        device, dtype = device_dtype(model)
        for i, t in enumerate(tensors):
            what = 'example_input' if t is example_input else f'example_input[{i}]'
            if t.is_floating_point() and t.dtype != dtype:
                raise ValueError(f'{what} is {t.dtype} but the model computes in {dtype}: pass a tensor of dtype '
                                 f'{dtype}, or a shape')
            if t.device != device:
                raise ValueError(f'{what} is on {t.device} but the model is on {device}: move one of them, or '
                                 'pass a shape')
        return
    if (not isinstance(example_input, (tuple, list, torch.Size)) or len(example_input) < 2 or
            not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in example_input)):
        raise ValueError(f'example_input must be a tensor, a tuple of tensors (one per input of the model) or a '
                         f'shape of positive ints with the batch first, such as (2, 3, 224, 224), got '
                         f'{_describe(example_input)}')


def _describe(x):
    if isinstance(x, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in x):
        return f"a {type(x).__name__} of {', '.join(type(t).__name__ for t in x)}"
    return repr(x)


def input_shape(model, example_input):
    "The shape of the (first) input: `example_input`'s, or guessed from the first layer when it is None."
    if example_input is None: return default_input_shape(model)
    if is_tensors(example_input): return tuple(example_tensor(model, example_input).shape)
    return tuple(example_input)


def input_specs(model, example_input):
    "One (shape, dtype, tensor or None) per input of `model`, for tracing."
    if is_tensors(example_input):
        return tuple((tuple(t.shape), t.dtype, t) for t in example_args(model, example_input))
    return ((input_shape(model, example_input), device_dtype(model)[1], None),)


def propagate_shapes(graph, model, specs, guessed):
    """Shapes of every node of `model`'s `graph` on meta tensors of `specs` (from `input_specs`); code that needs
    real tensors runs on the example's tensors, or zeros (its buffers, such as BatchNorm statistics in train mode,
    and the random state are put back afterwards)."""
    try:
        try:
            with state_kept(model):   # what the meta run stores must not reach the real one
                _Shapes(model, graph, meta=True).run(*(torch.empty(s, dtype=d, device='meta') for s, d, _ in specs))
        except Exception:
            device = device_dtype(model)[0]
            real = [t.clone() if t is not None else torch.zeros(s, dtype=d, device=device) for s, d, t in specs]
            with torch.no_grad(), buffers_kept(model), seeded(model):
                _Shapes(model, graph, meta=False).run(*real)
    except Exception as e:
        mode = 'train' if model.training else 'eval'
        shape = specs[0][0] if len(specs) == 1 else tuple(s for s, _, _ in specs)
        hint = (f'the shape was guessed: pass an example_input {type(model).__name__} runs on in train and eval mode'
                if guessed else f'pass an example_input {type(model).__name__} runs on in train and eval mode')
        why = (str(e).strip().splitlines() or [''])[0]   # fx appends the graph node and more lines
        raise TraceError(f'running {type(model).__name__} in {mode} mode on an input of shape {shape} failed '
                         f'({type(e).__name__}: {why}). Pruning must follow both modes (a branch that runs only in '
                         f'training reads channels too): {hint}') from e
