"""Break each part of the safety net once and show which tests fail: a check no test notices is not tested.

Each mutation replaces one line of the library (the file is put back afterwards, whatever happens), runs the
tests of the safety net and prints the tests that failed; every mutation must make at least one fail (exit 1
otherwise).

Run: `.venv/bin/python scripts/mutation_check.py [--only WORDS] [TEST FILES...]`
"""
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ['tests/test_verify.py', 'tests/test_pruner.py', 'tests/test_edge_cases.py', 'tests/test_layers.py',
         'tests/test_hooks.py', 'tests/test_workflows.py', 'tests/test_shape_values.py',
         'tests/test_timm.py', 'tests/test_budget.py', 'tests/test_sensitivity.py', 'tests/test_architectures.py',
         'tests/test_attention.py', 'tests/test_shuffle.py']
MUTATIONS = {   # name: (file, line as it is, line broken)
    'a space met at two positions of a merge: not tied': (
        'fasterai/ops.py', '            ctx.spaces.tie_space(space, size // math.gcd(size, abs(q.start - p.start)),\n                                 \'are merged',
        '            (lambda *a: None)(space, size // math.gcd(size, abs(q.start - p.start)),\n                                 \'are merged'),
    'a channel slice that drops channels taken as taking them all': (
        'fasterai/ops.py', '(isinstance(i.stop, int) and i.stop >= n))', 'True)'),
    'split sized by an attribute: the attribute not reset once pruned': (
        'fasterai/pruner.py', '        resize_splits(pruned)   #', '        pass   #'),
    'split sized by a number followed without a module that resizes it': (
        'fasterai/ops.py', '    if owner is None:\n        raise Unhandled(\'splits the channels', '    if False:\n        raise Unhandled(\'splits the channels'),
    'grouped conv on a part of a space: its groups not tied': (
        'fasterai/ops.py', '            ctx.spaces.tie_space(r, size // math.gcd(size, per), f"grouped conv \'{node.target}\' ties them")',
        '            pass'),
    'a part of a tied space not moved back to the first block': (
        'fasterai/ops.py', '    if ctx.spaces.tie[r] == 1 or ctx.spaces.width[r] != 1 or p.start < block: return p',
        '    return p'),
    'latency: the table file never read': (
        'fasterai/latency.py', "        with open(path) as f: _TABLE.update(", "        with open(os.devnull) as f: _TABLE.update("),
    'shuffle: layers sliced in sorted order, not the order the pruned shuffle lays out': (
        'fasterai/pruner.py', "                keep.setdefault(name, {})[role] = idx\n",
        "                keep.setdefault(name, {})[role] = idx.sort().values\n"),
    'shuffle: the cost model drops shuffled units one by one, not by feasible widths': (
        'fasterai/budget.py', "        self.cum = [t.cumulative(per, o) if hasattr(t, 'cumulative') else   # (the units a shuffle lays out go",
        "        self.cum = [t.cumulative(per, o) if False else   # (the units a shuffle lays out go"),
    'shuffle: the width chosen without the live channels': (
        'fasterai/routing.py', '        k = next(k for k in self.widths() if all(n <= self.quotas(k)[c] for c, n in need.items()))',
        '        k = self.widths()[len(self.widths()) // 2]'),
    'shuffle: the Sparsifier zeroes channels no feasible width removes': (
        'fasterai/targets.py', '    def masks(self, drop): return super().masks(self._feasible(drop))',
        '    def masks(self, drop): return super().masks(drop)'),
    'shuffle: shuffled channels merged with channels laid out otherwise': (
        'fasterai/graph.py', '        if len(routes) > 1 or any(isinstance(l, Layout) and l.route is None for l in tracked):',
        '        if False:'),
    'shuffle: parts of shuffled channels tied as if in place': (
        'fasterai/ops.py', "    if lay.route.src.route is not None: raise Unhandled('reshapes channels a channel shuffle laid out into parts')",
        '    pass'),
    'shuffle: spaces of different sizes shuffled together': (
        'fasterai/graph.py', "        why = ('a channel shuffle mixes channel spaces of different sizes' if len(sizes) > 1 else",
        "        why = ('a channel shuffle mixes channel spaces of different sizes' if False else"),
    'budget: a weight\'s inputs not costed': (
        'fasterai/budget.py', "    if role == 'in': return pname == kind.weight", "    if role == 'in': return False"),
    'budget: ranked by score alone, not per cost saved': (
        'fasterai/budget.py', '        s = s / save.clamp_min(1e-300)', '        s = s / 1'),
    "budget: 'global' ranks by score over the group's mean, not by the share of the scores it keeps": (
        'fasterai/budget.py', '    out[order] = v / v.flip(0).cumsum(0).flip(0).clamp_min(1e-300)',
        '    out[order] = v / v.mean().clamp_min(1e-300)'),
    'budget: after a prune_every pruning, the budget asked of the smaller model as it stands': (
        'fasterai/callback.py', '        return budget if self._scale == 1 else budget.at(min(budget.ratio * self._scale, 1.))',
        '        return budget'),
    'budget: held units released': (
        'fasterai/budget.py', '    lo, hi = int(torch.isneginf(flat).sum()), top', '    lo, hi = 0, top'),
    'budget: no unit put back after the plan stops below the ratio': (
        'fasterai/budget.py', '    for _ in range(most):\n        can = [i for i in ok if ks[i] > floor[i]]',
        '    for _ in range(0):\n        can = [i for i in ok if ks[i] > floor[i]]'),
    "budget: the final 'global' plan keeps the costly unit it stops on": (
        'fasterai/budget.py', '    if trade and method != \'local\': chosen', '    if False: chosen'),
    "budget: 'global' with round_to plans units one at a time": (
        'fasterai/budget.py', '            chosen = (_global_blocks if any(_steps(t) for t in costs.targets) else _global_prefix)',
        '            chosen = (_global_prefix)'),
    'latency: timed with the allocator as the process left it': (
        'fasterai/latency.py', '        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)\n        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)',
        '        pass'),
    'sensitivity: damage ignored': (
        'fasterai/sensitivity.py', '                per = max(damage[i][up[i]] - damage[i][level[i]], 0.) / saved',
        '                per = 1 / saved'),
    'sensitivity: one layer, not its group': (
        'fasterai/sensitivity.py', '            with _masked(model, t.masks(t.drop(scores, k))): v = value()',
        '            with _masked(model, dict(list(t.masks(t.drop(scores, k)).items())[:1])): v = value()'),
    'budget: the plan held for a budget re-planned every batch': (
        'fasterai/sparsifier.py', 'isinstance(sparsity, Budget) and sparsity == self.planned: return None',
        'isinstance(sparsity, Budget) and False: return None'),
    'budget: calibrate gives nothing back when one layer steps over the ratio': (
        'fasterai/sparsifier.py', '        if fast is not None and abs(closest[0] - ratio) > tol:',
        '        if False:'),
    'budget: calibrate times no finer plan between the closest two': (
        'fasterai/sparsifier.py', '                if m in (lo, hi): break', '                break'),
    'budget: the finer plan timed is not the plan pruned': (
        'fasterai/sparsifier.py', '        if round(budget.ratio, 9) in costs.plans: return costs.plans[round(budget.ratio, 9)]',
        '        if False: return costs.plans[round(budget.ratio, 9)]'),
    'budget: masked units of the timed copy made 1, not given the values they were dropped with': (
        'fasterai/sparsifier.py', '            for name, _, d, idx in t.state(zero & saved): self._put_back(name, tensors[name], d, idx)',
        '            pass'),
    'sparsify: the values of dropped units are not saved with the state': (
        'fasterai/sparsifier.py', "                'held': list(self.held), 'saved': dict(self._saved), 'saved_units': list(self._saved_units),",
        "                'held': list(self.held),"),
    'sparsify: values put aside only when the masks are planned anew (not after plan_masks)': (
        'fasterai/sparsifier.py', '        self._swap()   # (also when `plan_masks` planned these masks)',
        '        if rescored: self._swap()'),
    'sparsify: units a plan releases come back as zeros': (
        'fasterai/sparsifier.py', '            for name, x, d, idx in t.state(back): self._put_back(name, x, d, idx)',
        '            pass'),
    "budget: round_to='auto' never prunes the rounded plan": (
        'fasterai/sparsifier.py', '        if rounded is not None and self._pays(rounded[1], closest, ratio, tol):',
        '        if False:'),
    "budget: round_to='auto' prefers the plan keeping fewer MACs": (
        'fasterai/sparsifier.py', '        return macs.cost_of(macs.dropped(rounded[1])) > macs.cost_of(macs.dropped(other[1]))',
        '        return macs.cost_of(macs.dropped(rounded[1])) < macs.cost_of(macs.dropped(other[1]))'),
    'chunk: parts not tied': (
        'fasterai/ops.py', '            ctx.spaces.tie_space(a, size // math.gcd(size, abs(q.start - p.start)),',
        '            (lambda *a: None)(a, size // math.gcd(size, abs(q.start - p.start)),'),
    'chunk and reshape into parts: parts not tied': (
        'fasterai/ops.py', '    for other in cut[1:]: _tie_parts(ctx, cut[0], other)\n    return cut',
        '    return cut'),
    'a whole space merged with the first part of another: not united': (
        'fasterai/ops.py', '            space = ctx.spaces.unite_prefix(*((p.space, q.space) if ctx.whole(p) else (q.space, p.space)))',
        '            space = ctx.spaces.find(p.space)'),
    'latency: denormal weights timed as they are': (
        'fasterai/latency.py', '    if not any(_denormal(t) for t in itertools.chain(model.parameters(), model.buffers())): return model',
        '    return model'),
    'latency: a plan timed against the live model (its near-zero weights)': (
        'fasterai/sparsifier.py', '        return reached(budget, probe, pruned, self.example_input',
        '        return reached(budget, self.model, pruned, self.example_input'),
    'budget: calibration ignored': (
        'fasterai/budget.py', '    if len(pts) < 2: return ratio', '    return ratio'),
    'verify never raises': (
        'fasterai/verify.py', "        raise PruningError(f'the pruned {name} does not compute",
        "        if False: raise PruningError(f'the pruned {name} does not compute"),
    'verify in eval mode only': (
        'fasterai/verify.py', 'def check_same_function(reference, pruned, example, rtol=1e-4, modes=MODES):',
        'def check_same_function(reference, pruned, example, rtol=1e-4, modes=(False,)):'),
    'no float64 second opinion': (
        'fasterai/verify.py',
        '            if _compare(ref64, pruned, example, training, rtol / 100, True) is None: continue',
        '            pass'),
    'dropout left on in train mode': (
        'fasterai/verify.py', '        if func in _DROPOUTS:   # a new tensor', '        if False:   # a new tensor'),
    'buffers not put back': (
        'fasterai/verify.py', '    with training_mode(model, training), buffers_kept(model), state_kept',
        '    with training_mode(model, training), nullcontext(), state_kept'),
    'random draws not seeded alike': (
        'fasterai/verify.py', '    with training_mode(model, training), buffers_kept(model), state_kept(model), seeded(model), \\',
        '    with training_mode(model, training), buffers_kept(model), state_kept(model), nullcontext(), \\'),
    'the example tensor not copied': (
        'fasterai/verify.py', '    args = [x.clone() for x in example_args(model, example)]',
        '    args = list(example_args(model, example))'),
    'non-finite values compared as numbers': (
        'fasterai/verify.py', '    finite = torch.isfinite(a)', '    finite = torch.ones_like(a, dtype=torch.bool)'),
    "a model's own train() not run again": (
        'fasterai/tracing.py', '        model.train(flags[0][1])', '        pass'),
    'traced in eval mode only': ('fasterai/graph.py', '    for training in MODES:', '    for training in (False,):'),
    'the trace leaves buffers and random streams changed': (
        'fasterai/graph.py', '        with training_mode(model, training), buffers_kept(model), state_kept(model), seeded(model), \\',
        '        with training_mode(model, training), state_kept(model), \\'),
    'a failed train-mode trace dropped': (
        'fasterai/graph.py', '            propagate_shapes(graph, model, specs, example_input is None)',
        '            try: propagate_shapes(graph, model, specs, example_input is None)\n'
        '            except Exception:\n                if training: continue\n                raise'),
    'registered inputs=False ignored': (
        'fasterai/ops.py', '    if lay is None or ctx.kind(node).inputs: return ctx.record(lay, node, \'in\')',
        "    return ctx.record(lay, node, 'in')"),
    'what forward code stores while tracing kept': (
        'fasterai/graph.py', '        with training_mode(model, training), buffers_kept(model), state_kept(model), seeded(model), \\',
        '        with training_mode(model, training), buffers_kept(model), seeded(model), \\'),
    'what the reference run stores kept': (
        'fasterai/verify.py', '    with training_mode(model, training), buffers_kept(model), state_kept(model), seeded(model), \\',
        '    with training_mode(model, training), buffers_kept(model), seeded(model), \\'),
    "hooks' objects not given back after tracing": (
        'fasterai/tracing.py', '            vars(obj).clear(); vars(obj).update(state)', '            pass'),
    'hooks not traced': (
        'fasterai/tracing.py', '                res = self._hook(hook, m, (args, kwargs, out) if with_kwargs else (args, out))',
        '                res = None'),
    'zeros found not held': (
        'fasterai/sparsifier.py', '        self.held = [None if h is None or not h.any() else h for h in self.held]',
        '        self.held = [None for h in self.held]'),
    'a frozen fit not held': (
        'fasterai/callback.py', '        planned = 0. if self._frozen else self.planned(epoch, self.n_epoch)',
        '        planned = self.planned(epoch, self.n_epoch)'),
    'a branch on requires_grad taken for a shape': (
        'fasterai/tracing.py',
        '            if reads and not _holds_tensor(env[n]) and not (_reads_shape(n) or _reads_device(n) or _writes(n)):',
        '            if False:'),
    "heads' q, k and v not tied": (
        'fasterai/ops.py', '''            ctx.spaces.tie_space(space, 3, f"'{node.target}' ties each head's q, k and v")''',
        '            pass'),
    'heads not kept whole': (
        'fasterai/ops.py', '''            ctx.spaces.run_space(space, d, f"'{node.target}' keeps whole heads")''',
        '            pass'),
    'a channel count read as a number not frozen': (
        'fasterai/graph.py', "        if node.meta.get('concrete'):   # the tracer took its value from the example: a channel count is baked in",
        '        if False:'),
    'item assignment dropped with observing hooks': (
        'fasterai/ops.py', 'INPLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem, F.relu_, torch.relu_,',
        'INPLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, F.relu_, torch.relu_,'),
    'a branch binds the inputs in the order it reads them': (
        'fasterai/tracing.py', "    seen, stack = set(), [node, *(n for n in graph.nodes if n.op == 'placeholder')]",
        '    seen, stack = set(), [node]'),
    'a branch misses earlier writes': (
        'fasterai/tracing.py', '            if n not in seen and _writes(n) and n.args and n.args[0] in seen: stack.append(n)',
        '            pass'),
    'dropout inside attention left on in train mode': (
        'fasterai/verify.py', '        if func is F.scaled_dot_product_attention:   # its dropout draws per head: off, as dropout is',
        '        if False:'),
    'a number from values taken as a size': (
        'fasterai/tracing.py',
        "        if not isinstance(value, (int, float)) or (isinstance(value, float) and what == 'an index'):",
        '        if False:'),
    'zeros of a fresh model held': (
        'fasterai/callback.py', '        self._hold = (self.sparsifier is not None or',
        '        self._hold = True or (self.sparsifier is not None or'),
    'MultiheadAttention: cross-attention followed as self-attention': (
        'fasterai/ops.py', "    if not (call['query'] is call['key'] is call['value']):", '    if False:'),
    'MultiheadAttention: weights averaged over the heads read, heads removed': (
        'fasterai/ops.py', "    if call.get('need_weights', True) is not False and weights:", '    if False:'),
    'MultiheadAttention: its input channels not recorded': (
        'fasterai/ops.py', '    lay = ctx.env.get(q) if isinstance(q, fx.Node) else None', '    lay = None'),
    'MultiheadAttention pruned: masks ignored': (
        'fasterai/mha.py', '        mask = _additive(attn_mask, key_padding_mask, q, k.shape[2], batched)', '        mask = None'),
    'MultiheadAttention pruned: the fused inference path left on': (
        'fasterai/mha.py', '        m._qkv_same_embed_dim = False', '        m._qkv_same_embed_dim = True'),
    'MultiheadAttention rebuilt: torch\'s module kept': (
        'fasterai/mha.py', '        as_pruned(m)\n    return m', '        pass\n    return m'),
    'MultiheadAttention: dropout inside left on in train mode': (
        'fasterai/verify.py', '        if func is F.multi_head_attention_forward:', '        if False:'),
    'heads: per-head tensors (bias tables) not cut with the heads': (
        'fasterai/surgery.py', '    for pname, dim in kind.per_head: _take(m, pname, dim, heads[::d] // d)', '    pass'),
    'heads: children resized before their attention module': (
        'fasterai/pruner.py', '    for name in sorted(keep, key=lambda n: order.get(n, len(order))):   # parents first: an attention module reads',
        '    for name in keep:   # parents first: an attention module reads'),
    "torchvision's Swin pruned: heads as wide as the input over the heads": (
        'fasterai/torchvision_attention.py',
        '    window_size, shift_size, num_heads, d = m.window_size, list(m.shift_size), m.num_heads, m.head_dim',
        '    window_size, shift_size, num_heads, d = m.window_size, list(m.shift_size), m.num_heads, input.shape[-1] // m.num_heads'),
    "torchvision's MaxViT pruned: heads joined to the input's width": (
        'fasterai/torchvision_attention.py', '        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(B, G, P, H * DH))',
        '        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(B, G, P, D))'),
    "torchvision's attention rebuilt in torchvision's class": (
        'fasterai/third_party.py', '    if math.prod(heads_of(m)) != width: as_pruned(m)', '    pass'),
    'attention normalising its input: input channels not frozen': (
        'fasterai/ops.py', '''            ctx.freeze(lay, f"'{node.target}' normalises its input across the channels ({type(m.get_submodule(norm)).__name__})")''',
        '            pass'),
    'rebuild: tensors of unchanged size made anew (a buffer not saved lost)': (
        'fasterai/export.py', '            if old is not None and list(old.shape) == shape: continue', '            pass'),
    'clamp: bounds away from zero taken as keeping zeros': (
        'fasterai/ops.py', '    return keep(ctx, node) if (lo is None or lo <= 0) and (hi is None or hi >= 0) else moves_zero(ctx, node)',
        '    return keep(ctx, node)'),
    'budget: a Latency budget no plan reaches passes without a word': (
        'fasterai/sparsifier.py', '        if abs(closest[0] - ratio) > tol:', '        if False:'),
    'MultiheadAttention in a TransformerEncoder that nests padded batches: heads pruned': (
        'fasterai/ops.py', "        if isinstance(owner, nn.TransformerEncoder) and getattr(owner, 'use_nested_tensor', False):",
        '        if False:'),
    "budget: MultiheadAttention's out-projection costed with its heads": (
        'fasterai/budget.py', "            if child not in own and hasattr(m, 'out_proj'):", '            if False:'),
    'find_layers: N:M takes the packed in-projection of attention': (
        'fasterai/sparsifier.py', '    mha = nn.Linear in types and not isinstance(granularity, NM)', '    mha = nn.Linear in types'),
    'latency: an attention input cut in the query alone': (
        'fasterai/latency.py', '    return tuple(map(swap, args)), {k: swap(v) for k, v in kwargs.items()}',
        '    return (cut, *args[1:]) if args else args, kwargs'),
    'kept_entries: per-head rows of a child not carried': (
        'fasterai/pruner.py', '        for m in probe.modules():   # (an attention module', '        for m in [probe]:   # (an attention module'),
    "budget: round_to='auto' tries multiples of 8 alone": (
        'fasterai/sparsifier.py', 'AUTO_ROUND = (8, 16, 32)', 'AUTO_ROUND = (8,)'),
    'budget: a guess no plan reaches ends the search': (
        'fasterai/sparsifier.py', '                    if not timed: raise', '                    raise'),
    'a stale sparsity state saved': (
        'fasterai/callback.py', '    return cb if cb.sparsifier.masks_hold() else None', '    return cb'),
}


def failures(tests):
    "The tests that fail, as pytest names them."
    out = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *tests], cwd=ROOT,
                         capture_output=True, text=True).stdout
    return [l.split('::', 1)[1].split(' - ')[0] for l in out.splitlines() if l.startswith('FAILED')]


def main():
    args, only = sys.argv[1:], None
    if '--only' in args:   # --only WORDS: the mutations whose names contain WORDS (to re-check a few quickly)
        i = args.index('--only'); only = args[i + 1]; args = args[:i] + args[i + 2:]
    tests, missed = args or TESTS, []
    for name, (file, line, broken) in MUTATIONS.items():
        if only is not None and only not in name: continue
        path = ROOT / file
        text = path.read_text()
        if text.count(line) != 1: sys.exit(f"{file} no longer holds the line of '{name}' once: update MUTATIONS")
        with tempfile.NamedTemporaryFile() as backup:
            shutil.copy(path, backup.name)
            try:
                path.write_text(text.replace(line, broken))
                failed = failures(tests)
            finally:
                shutil.copy(backup.name, path)
        print(f'{name}: {len(failed)} tests fail' + ''.join(f'\n  {f}' for f in failed), flush=True)
        if not failed: missed.append(name)
    if missed: sys.exit(f'no test notices: {missed}')


if __name__ == '__main__':
    main()
