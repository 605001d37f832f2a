"""The criterion's side of sparsifying: its state (reference weights, accumulated gradient statistics) and the
scores it gives the weights of the scored layers."""
import warnings

import torch

from .tracing import finite

__all__ = ['Scores']

_BLOCK = 2 ** 20
"About how many weights `Scores.row_scores` scores at a time."


class Scores:
    """Scores of the weights of `layers` (name -> module) by `criterion`, with the state the criterion needs:
    `ref` (name -> the reference weights of init-based criteria) and `acc` (name -> accumulated gradient
    statistics of 'movement' and 'taylor')."""
    def __init__(self, criterion, layers):
        self.criterion, self.layers, self.ref, self.acc = criterion, layers, {}, {}
        if criterion.needs_ref: self.set_reference()

    @torch.no_grad()
    def set_reference(self, names=None):
        "Take the current weights of the scored layers (or of `names`) as the reference of init-based criteria."
        self.ref.update({n: self.layers[n].weight.detach().clone() for n in (self.layers if names is None else names)})

    def accumulate(self):
        """Add this step's gradient statistic (after backward, before the optimizer step) for criteria that need
        one; a no-op otherwise. A non-finite statistic (an overflowing step) is skipped."""
        f = self.criterion.accumulate
        if f is None: return
        with torch.no_grad():
            for n, m in self.layers.items():
                if m.weight.grad is None: continue
                step = f(m.weight.detach(), m.weight.grad.detach())
                if not finite(step): continue   # an overflowing step must not poison the sum for good
                self.acc[n] = self.acc[n] + step if n in self.acc else step.clone()

    def weight(self, name):
        "The weight of layer `name`, checked finite (the criterion's statistics for it may be missing: a warning)."
        w = self.layers[name].weight.detach()
        if not finite(w):
            raise ValueError(f"layer '{name}' has NaN or inf weights, which cannot be ranked: the training diverged "
                             'or the model was loaded wrongly (no mask was changed)')
        if self.criterion.accumulate is not None and name not in self.acc:
            warnings.warn(f"criteria '{self.criterion.name}' has no gradient statistics for '{name}' yet: call "
                          'accumulate() after each backward pass (SparsifyCallback does); scoring it as all zeros',
                          stacklevel=5)
        return w

    def score(self, name):
        "The criterion's score of every weight of layer `name`, checked to give one score per weight."
        w = self.weight(name)
        return _one_per_weight(self.criterion(w, self.ref.get(name), self.acc.get(name)), w)

    def row_scores(self, name, dim, start, length):
        """The summed score of each of the channels [start, start+length) along `dim` of layer `name`'s weight.
        An element-wise criterion scores a block of about a million weights at a time, so a large layer
        needs no full-size temporary."""
        if not self.criterion.elementwise:
            return self.score(name).movedim(dim, 0)[start:start + length].flatten(1).sum(1)
        rows = lambda t: None if t is None else t.detach().movedim(dim, 0)[start:start + length]
        w, ref, acc = rows(self.weight(name)), rows(self.ref.get(name)), rows(self.acc.get(name))
        step = max(1, _BLOCK // max(1, w[0].numel()))
        part = lambda t, i: None if t is None else t[i:i + step]
        return torch.cat([_one_per_weight(self.criterion(w[i:i + step], part(ref, i), part(acc, i)), w[i:i + step])
                          .flatten(1).sum(1) for i in range(0, length, step)])

    def check_state(self, state, unfit):
        "A ValueError (starting with `unfit`) unless `state`'s 'ref' and 'acc' fit the scored layers."
        for key in ('ref', 'acc'):
            bad = [n for n, t in state[key].items() if n not in self.layers or t.shape != self.layers[n].weight.shape]
            if bad: raise ValueError(unfit + f'{key} of layer {bad[0]!r}')

    def load_state(self, state):
        "Take the 'ref' and 'acc' of `state` (checked by `check_state`), on the layers' devices."
        self.ref, self.acc = ({n: t.to(self.layers[n].weight.device) for n, t in state[key].items()}
                              for key in ('ref', 'acc'))


def _one_per_weight(s, w):
    "Scores `s` of weights `w`, or a ValueError unless there is one score per weight."
    if not isinstance(s, torch.Tensor) or s.shape != w.shape:
        raise ValueError(f'criteria must return one score per weight (shape {tuple(w.shape)}), got '
                         f'{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}')
    return s
