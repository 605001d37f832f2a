"""Measure a model: parameters, MACs (torch.utils.flop_counter), CPU latency (torch.utils.benchmark), shapes."""
import torch
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode

from .tracing import example_args, input_shape, training_mode
from .targets import weights_of

__all__ = ['count_params', 'count_macs', 'macs_by_module', 'latency_ms', 'layer_shapes', 'compare_models', 'SparsityReport']


def count_params(model):
    "Number of parameters."
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _flops(model, example_input):
    "The FlopCounterMode of one eval-mode forward pass (on meta tensors when the model allows it)."
    args = example_args(model, example_input)
    meta = {k: torch.empty_like(v, device='meta') for k, v in (*model.named_parameters(), *model.named_buffers())}
    with training_mode(model, False):
        try:
            with FlopCounterMode(display=False) as counter:
                torch.func.functional_call(model, meta, tuple(torch.empty_like(x, device='meta') for x in args))
        except Exception:
            with FlopCounterMode(display=False) as counter:
                model(*args)
    return counter


def count_macs(model, example_input):
    """Multiply-accumulates of one eval-mode forward pass on `example_input` (a tensor, a tuple of them, or a shape).

    Counted on meta tensors (shapes only, no arithmetic); a model that builds real tensors in its forward
    is run for real instead."""
    return _flops(model, example_input).get_total_flops() // 2


def macs_by_module(model, example_input):
    """Qualified module name -> the multiply-accumulates its own forward code does (its submodules' excluded; ''
    for the model's own), summing to `count_macs`."""
    counts = {k: sum(v.values()) for k, v in _flops(model, example_input).get_flop_counts().items()}
    root = type(model).__name__
    total = {n: counts.get(f'{root}.{n}' if n else root, 0) for n, _ in model.named_modules()}
    own = dict(total)
    for n, m in model.named_modules():
        for c, _ in m.named_children(): own[n] -= total.get(f'{n}.{c}' if n else c, 0)
    own[''] += counts.get('Global', 0) - total['']   # what ran outside the model's own forward (none, usually)
    return {n: v // 2 for n, v in own.items() if v}


def latency_ms(model, example_input, min_run_time=1.0, threads=None):
    """Median CPU latency in milliseconds of one eval-mode forward pass (torch.utils.benchmark), after one forward and
    backward pass of a copy (`latency.warm_allocator`: the allocator in the state training leaves it in); denormal
    weights are timed as zeros (`latency.without_denormals`)."""
    from .latency import steady_allocator, warm_allocator, without_denormals
    model = without_denormals(model)   # (a masked weight the optimizer moved: see there)
    with steady_allocator(), training_mode(model, False):
        warm_allocator(model, example_args(model, example_input))
        with torch.inference_mode():
            timer = Timer('model(*x)', globals={'model': model, 'x': example_args(model, example_input)},
                          num_threads=threads or torch.get_num_threads())
            return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def layer_shapes(model):
    "Qualified name -> (type name, weight shape, parameters) for every layer that holds parameters itself."
    out = {}
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if not own: continue
        w = getattr(m, 'weight', None)
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else tuple(own[0].shape)
        out[name] = (type(m).__name__, shape, sum(p.numel() for p in own))
    return out


def _table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return '\n'.join('  '.join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def compare_models(dense, pruned, example_input, latency_input=None, extra=(), min_run_time=1.0, budget=None):
    """A printable before/after table: `extra` rows (name, before, after), params, MACs, latency, layer shapes.

    MACs are counted on `example_input`; latency is timed on `latency_input` (default: `example_input`), and its
    ratio is the median of interleaved timings (`latency.latency_ratio`), so that a drifting machine hits both alike.
    `budget` (a `MACs`, `Params` or `Latency` budget): a row with the ratio it asked and the ratio reached.
    """
    from .latency import latency_ratio
    lat_in = latency_input if latency_input is not None else example_input
    lat_batch = _batch(lat_in)
    p0, p1 = count_params(dense), count_params(pruned)
    m0, m1 = count_macs(dense, example_input), count_macs(pruned, example_input)
    t0, t1 = latency_ms(dense, lat_in, min_run_time), latency_ms(pruned, lat_in, min_run_time)
    ratio = latency_ratio(pruned, dense, lat_in, rounds=5, min_run_time=min_run_time / 5)
    rows = [('', 'before', 'after', 'after/before'), *extra,
            ('parameters', f'{p0:,}', f'{p1:,}', f'{p1 / p0:.3f}'),
            ('MACs per image', f'{m0 // _batch(example_input):,}', f'{m1 // _batch(example_input):,}', f'{m1 / m0:.3f}'),
            (f'CPU latency, batch {lat_batch} (median ms)', f'{t0:.2f}', f'{t1:.2f}', f'{ratio:.3f}')]
    if budget is not None:
        from .budget import reached
        got = {'MACs': m1 / m0, 'parameters': p1 / p0}.get(budget.metric)
        if got is None: got = reached(budget, dense, pruned, lat_in)
        rows.append((f'budget {budget!r}', 'asked', f'{budget.ratio:g}', f'reached {got:.3f}'))
    s0, s1 = layer_shapes(dense), layer_shapes(pruned)
    layers = [('layer', 'before', 'after', 'params after')]
    for name, (kind, shape, _) in s0.items():
        after = s1.get(name)
        layers.append((f'{name} ({kind})', 'x'.join(map(str, shape)),
                       'x'.join(map(str, after[1])) if after else 'removed', f'{after[2]:,}' if after else '0'))
    return _table(rows) + '\n\n' + _table(layers)


def _batch(example_input):
    "The batch size of an example input (a tensor, a tuple of them, or a shape)."
    return input_shape(None, example_input)[0]


class SparsityReport:
    """The Sparsifier's reports (a mixin: it reads `layers`, `targets` and `frozen`): measured sparsity by layer and
    over the targeted layers, and a printed table."""
    def _targeted(self):
        "Name -> layer for every layer of `layer_type` that some target sparsifies."
        return {n: self.layers[n] for t in self.targets for n in t.layers}

    def layer_sparsity(self):
        "Targeted layer name -> percentage of exactly-zero weights (over all its weights: an LSTM has several)."
        out = {}
        for n, m in self._targeted().items():
            ws = [getattr(m, w).detach() for w in weights_of(m)]
            out[n] = 100 * sum((w == 0).sum().item() for w in ws) / sum(w.numel() for w in ws)
        return out

    def sparsity(self):
        "Measured percentage of exactly-zero weights over all targeted layers."
        ws = [getattr(m, w).detach() for m in self._targeted().values() for w in weights_of(m)]
        nonzero = torch.stack([torch.count_nonzero(w).to(ws[0].device) for w in ws]).sum().item()   # one sync
        total = sum(w.numel() for w in ws)
        return 100 * (total - nonzero) / total

    def print_sparsity(self):
        "Print each weight of each layer of `layer_type`: its shape, zero weights and sparsity, then the targeted total."
        rows = [('Layer', 'Type', 'Weight shape', 'Zeros', 'Sparsity')]
        for n, m in self.layers.items():
            note = f'  (frozen: {self.frozen[n]})' if n in self.frozen else ''
            for w in weights_of(m):
                t = getattr(m, w)
                z, total = (t == 0).sum().item(), t.numel()
                rows.append((n if w == 'weight' else f'{n}.{w}', type(m).__name__, 'x'.join(map(str, t.shape)),
                             f'{z:,}/{total:,}', f'{100 * z / total:.2f}%{note}'))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows: print('  '.join(c.ljust(w) for c, w in zip(r, widths)) + '  ' + r[4])
        print(f'Sparsity of the targeted layers: {self.sparsity():.2f}%')
