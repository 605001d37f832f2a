"""Latency on this machine: a table of each layer timed alone at full and half widths (the terms of a `Latency`
budget's `CostModel`), and the measured latency ratio of two models, timed interleaved in one process.

A layer's time is not its MACs' share: a BatchNorm, an activation or a depthwise conv costs time in proportion to
its channels with few MACs, and a 1x1 conv at small width is dominated by overheads. So each layer that a channel
group changes is timed alone on the input it sees in the model (at the budget's batch size and threads), at its
full width and with each side it can lose halved, and its time is fitted as a + b*f_in + c*f_out + d*f_in*f_out
(f: the kept fraction of each side); the rest of the model's time (activations, adds, pooling that no layer kind
holds) is spread over the layers in proportion to their time. The model ranks channels; the ratio reached is then
checked by timing pruned copies (`Sparsifier.calibrate`).
"""
import contextlib
import copy
import functools
import hashlib
import itertools
import json
import math
import os
import platform
import warnings

import torch
from torch.utils.benchmark import Timer

from .layers import kind_of, shrink
from .ops import linear, mha
from .tracing import example_args, training_mode

__all__ = ['latency_ratio', 'latency_terms', 'batch_of', 'warm_allocator', 'steady_allocator', 'without_denormals', 'cache_file']

_TABLE = {}
"Cache of the layer timings: (layer, input shapes, dtype, threads, widths) -> seconds, this process's and `cache_file`'s."
_LOADED = set()   # the cache files read into _TABLE


def cache_file():
    """The file the layer timings persist in between processes: in the folder $FASTERAI_CACHE (set it empty for
    none), else ~/.cache/fasterai; one file per machine and torch build (CPU model, architecture, torch version), so
    a table timed elsewhere is never read. Delete it to time the layers again; `Sparsifier.calibrate` times pruned
    copies of the model whatever the table says."""
    root = os.environ.get('FASTERAI_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'fasterai'))
    return os.path.join(root, f'latency-{_machine()}.json') if root else None


@functools.cache
def _machine():
    "A key of this machine and torch build: the CPU model, the architecture, torch's version (read once)."
    cpu = platform.processor()
    try:
        with open('/proc/cpuinfo') as f: cpu = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), cpu)
    except OSError: pass
    return hashlib.sha256(f'{cpu}|{platform.machine()}|{torch.__version__}'.encode()).hexdigest()[:16]


def _load(path):
    "Read the table file at `path` into _TABLE, once per process (no file yet, or one cut short: timed again)."
    if path is None or path in _LOADED: return
    _LOADED.add(path)
    try:
        with open(path) as f: _TABLE.update({k: v for k, v in json.load(f).items() if isinstance(v, float)})
    except (OSError, ValueError): pass


def _save(path, new):
    """Add the timings `new` (keys of _TABLE) to the table file at `path`, merged with what another process may have
    written since; written whole or not at all (a process reading it never sees half a file)."""
    if path is None or not new: return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path) as f: old = json.load(f)
        except (OSError, ValueError): old = {}
        tmp = f'{path}.{os.getpid()}.tmp'
        with open(tmp, 'w') as f: json.dump({**old, **{k: _TABLE[k] for k in new}}, f)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f'fasterai could not write its latency table to {path} ({e}): set FASTERAI_CACHE to a '
                      'writable folder, or empty to keep timings in this process only', stacklevel=3)


def _timed(key, time, new):
    "The seconds of layer timing `key`: from _TABLE, else `time()` (then kept there and its key added to `new`)."
    k = repr(key)
    if k not in _TABLE:
        _TABLE[k] = time()
        new.add(k)
    return _TABLE[k]


def batch_of(model, example_input, batch_size):
    "The example's inputs at `batch_size` (repeated, or cut, along the batch dim)."
    out = []
    for x in example_args(model, example_input):
        reps = math.ceil(batch_size / x.shape[0])
        out.append(x.repeat(reps, *[1] * (x.dim() - 1))[:batch_size].contiguous())
    return tuple(out)


def _denormal(t):
    "Whether floating tensor `t` holds a value below the smallest normal number of its dtype (zero aside)."
    return t.is_floating_point() and bool(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).any())


def without_denormals(model):
    """`model` itself, or a copy whose parameters and buffers below the smallest normal float are zero, for timing.
    A weight the masks hold at zero turns denormal between an optimizer step and the masks' re-application (the
    momentum of its zero gradient decays through the denormal range), and on x86 every multiply by one is tens of
    times slower (a conv with a few denormal rows: 6 ms -> 170 ms at batch 64): timed as it is, the model would
    measure that moment, not its architecture. `torch.set_flush_denormal` does not help: it sets the calling
    thread's mode only, not the intra-op threads'."""
    if not any(_denormal(t) for t in itertools.chain(model.parameters(), model.buffers())): return model
    from .pruner import _computed, copy_modules
    out = copy_modules(model, _computed(model))
    with torch.no_grad():
        for t in itertools.chain(out.parameters(), out.buffers()):
            if t.is_floating_point(): t.masked_fill_(t.abs() < torch.finfo(t.dtype).tiny, 0.)
    return out


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20
"The block size above which glibc's malloc maps fresh pages while timing: the largest its own rule sets (64-bit)."


@functools.cache
def _glibc():
    "glibc's C library (for `mallopt`), or None elsewhere."
    import ctypes
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc': return None
    try: libc = ctypes.CDLL(None)
    except OSError: return None
    return libc if hasattr(libc, 'mallopt') else None


@contextlib.contextmanager
def steady_allocator():
    """While timing, glibc's malloc keeps the memory it frees (blocks below `MMAP_THRESHOLD` come from its heap, and
    the heap is not trimmed), so that a forward pass reuses the pages of the last one instead of faulting fresh ones
    in. By default glibc maps every block above a threshold that moves with what the process freed before, and
    returns the heap's top to the system; so the same pair of models timed at different moments of one process read
    different ratios (a small ResNet pruned to a quarter of its channels: 0.25 of the dense model's latency, then
    0.10 a minute later, the dense model paying the faults). On leaving, the heap is trimmed again past twice
    `MMAP_THRESHOLD` and the mmap threshold stays at `MMAP_THRESHOLD` (the values glibc's own rule moves towards
    once large blocks are freed). Elsewhere than glibc, nothing changes."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try: yield
    finally:
        if libc is not None: libc.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)


def warm_allocator(model, args):
    """Run one forward and backward pass of a copy of `model` on `args`, so that the timings that follow see the memory
    allocator as a process that has trained does. glibc's malloc maps fresh pages for every block above its mmap
    threshold and raises that threshold only when such a block is freed; until a pass has freed blocks as large as
    its activations, every forward pass page-faults its activations in, and a small CNN at batch 64 runs about twice
    as slowly (a fresh process or one that only ran inference) as after one backward pass. Timings taken before and
    after training would not compare; warmed, they do."""
    from .pruner import _computed, copy_modules
    probe = copy_modules(model, _computed(model))
    with torch.enable_grad(), training_mode(probe, False):
        out = probe(*[a.detach().clone() for a in args])
        leaves = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        loss = sum(o.float().sum() for o in leaves if o.requires_grad)
        if isinstance(loss, torch.Tensor): loss.backward()


def _median_time(fn, threads, min_run_time):
    "Median seconds of one call of `fn()` (torch.utils.benchmark)."
    t = Timer('fn()', globals={'fn': fn}, num_threads=threads)
    return t.blocked_autorange(min_run_time=min_run_time).median


@torch.inference_mode()
def latency_ratio(model, reference, example_input, threads=None, rounds=7, min_run_time=0.2):
    """The median, over `rounds` interleaved timings, of `model`'s eval-mode latency over `reference`'s on
    `example_input` (so that a machine's drifting speed hits both alike)."""
    threads = threads or torch.get_num_threads()
    args = example_args(model, example_input)
    ratios = []
    with steady_allocator():
        with torch.inference_mode(False):
            model, reference = without_denormals(model), without_denormals(reference)
            warm_allocator(reference, args)
        with training_mode(model, False), training_mode(reference, False):
            for i in range(rounds):
                pair = [(model, None), (reference, None)] if i % 2 else [(reference, None), (model, None)]
                times = {id(m): _median_time(lambda m=m: m(*args), threads, min_run_time) for m, _ in pair}
                ratios.append(times[id(model)] / times[id(reference)])
    return sorted(ratios)[len(ratios) // 2]


def _inputs(model, names, args):
    """Module name -> (positional, keyword) inputs of its first call, for `names` (one real forward pass with hooks);
    a tensor passed several times (self-attention's query, key and value) stays one tensor."""
    seen, hooks = {}, []
    for n in names:
        def pre(m, a, kw, n=n):
            if n in seen: return
            memo = {}
            take = lambda x: (memo.setdefault(id(x), x.detach().clone()) if id(x) not in memo else memo[id(x)]) \
                if isinstance(x, torch.Tensor) else x
            seen[n] = (tuple(take(x) for x in a), {k: take(v) for k, v in kw.items()})
        hooks.append(model.get_submodule(n).register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.inference_mode(): model(*args)
    finally:
        for h in hooks: h.remove()
    return seen


def _half(m, role, n):
    "Kept channel indices that halve side `role` of `m` (`n` channels; every group keeps the same), or None."
    groups = getattr(m, 'groups', 1) if role in ('in', 'out') else 1
    per = n // groups
    if per < 2: return None
    return (torch.arange(groups)[:, None] * per + torch.arange(per // 2)).flatten()


def _cut(m, call, role, keep):
    """The inputs (positional, keyword) with the channels of side `role` cut to `keep` (its input channels: dim 1; a
    Linear's or an attention's last), wherever its first input is passed (self-attention's query, key and value)."""
    if role == 'out': return call
    args, kwargs = call
    dim = -1 if kind_of(m).rule in (linear, mha) else 1
    x = args[0] if args else kwargs.get('query', kwargs.get('input'))
    cut = x.index_select(dim, keep)
    swap = lambda t: cut if t is x else t
    return tuple(map(swap, args)), {k: swap(v) for k, v in kwargs.items()}


def _fit(m, call, roles, threads, min_run_time, new):
    """(coefficient, roles) terms of `m`'s time on `call` (its positional and keyword inputs): timed at full width and
    with each subset of `roles` halved, fitted as a sum over subsets S of c_S times the product of the kept fractions
    of S. `new`: the keys of the timings taken (see `_timed`)."""
    kind, sides = kind_of(m), []
    for r in roles:
        n = kind.channels(m, r)
        keep = _half(m, r, n)
        if keep is not None: sides.append((r, keep, len(keep) / n))
    points, times = [], []
    for pick in itertools.product((False, True), repeat=len(sides)):
        probe, x = copy.deepcopy(m), call
        for (r, keep, _), halve in zip(sides, pick):
            if halve:
                shrink(probe, {r: keep})
                x = _cut(m, x, r, keep)
        tensors = [a for a in (*call[0], *call[1].values()) if isinstance(a, torch.Tensor)]
        key = (repr(m), tuple(tuple(a.shape) for a in tensors), str(tensors[0].dtype), str(tensors[0].device),
               tuple(call[1]), threads, pick)
        def time(probe=probe, x=x):
            with training_mode(probe, False), torch.inference_mode():
                return _median_time(lambda: probe(*x[0], **x[1]), threads, min_run_time)
        points.append([math.prod(f for (_, _, f), halve, i in zip(sides, pick, inc) if halve and i)
                       for inc in itertools.product((False, True), repeat=len(sides))])
        times.append(_timed(key, time, new))
    coef = torch.linalg.solve(torch.tensor(points, dtype=torch.float64), torch.tensor(times, dtype=torch.float64))
    # noisy or stepped timings can fit a term below zero (a layer timed faster at full width than at half): kept at
    # zero and the rest scaled to the full-width time, so that the model never costs more for fewer channels
    full = float(coef.sum())
    coef = coef.clamp_min(0)
    if coef.sum() > 0: coef = coef * (full / float(coef.sum()))
    return [(float(c), tuple(r for (r, _, _), i in zip(sides, inc) if i))
            for c, inc in zip(coef, itertools.product((False, True), repeat=len(sides)))]


def latency_terms(model, roles, budget, example, min_run_time=0.05):
    """(seconds, columns) terms of `model`'s latency for a `Latency` budget: each layer in `roles` (module name ->
    {role: column}) from the timing table, its attention heads (role 'heads') in proportion to its own time; the
    rest of the model's time as one constant term."""
    threads = budget.threads or torch.get_num_threads()
    args = batch_of(model, example, budget.batch_size)
    model = without_denormals(model)
    path, new = cache_file(), set()
    _load(path)
    with steady_allocator(), training_mode(model, False):
        warm_allocator(model, args)
        inputs = _inputs(model, list(roles), args)
        terms, timed = [], 0.
        for n, mine in roles.items():
            m = model.get_submodule(n)
            if n not in inputs: continue   # never called: no time
            if 'heads' in mine:   # attention: its own time (its layers' aside) scales with its heads
                with torch.inference_mode():
                    run = lambda c, k: c(*inputs[k][0], **inputs[k][1])
                    inner = sum(_median_time(lambda c=c, k=k: run(c, f'{n}.{k}'), threads, min_run_time)
                                for k, c in m.named_modules() if k and f'{n}.{k}' in inputs)
                    own = max(_median_time(lambda: run(m, n), threads, min_run_time) - inner, 0.)
                terms.append((own, (mine['heads'],)))
                timed += own
                continue
            fit = _fit(m, inputs[n], list(mine), threads, min_run_time, new)
            terms += [(c, tuple(mine[r] for r in rs)) for c, rs in fit]
            timed += sum(c for c, _ in fit)
        with torch.inference_mode():
            total = _median_time(lambda: model(*args), threads, 5 * min_run_time)
    _save(path, new)   # (once, with every layer timed here)
    # the time no layer kind holds (activations, adds, pooling) is spread over the layers in proportion to theirs:
    # it runs on the same channels (the calibration on timed pruned copies corrects what this misses)
    scale = total / timed if timed > 0 else 1.
    return [(c * scale, cols) for c, cols in terms] + ([(total, ())] if timed <= 0 else [])
