"""`learn.prune()`: replace a fastai Learner's model by its pruned copy and train on, the optimizer's state carried."""
import torch
import torch.nn as nn
from fastai.learner import Learner
from fastai.optimizer import OptimWrapper
from fastcore.basics import patch

from .pruner import Pruner, kept_entries

__all__ = ['carry_state', 'example_batch']


def example_batch(learn, rows=8):
    "The inputs of the first validation batch (or training batch, without validation data), at most `rows` of them."
    dl = learn.dls.valid if len(learn.dls.valid) else learn.dls.train
    b = dl.one_batch()
    xb = b[:learn.dls.n_inp]
    device = next(learn.model.parameters()).device
    xb = tuple(x[:rows].to(device) for x in xb)
    return xb[0] if len(xb) == 1 else xb


def _stores(opt):
    "The per-parameter state dicts of a fastai optimizer (and of the PyTorch one an OptimWrapper wraps)."
    return [opt.state] + ([opt.opt.state] if isinstance(opt, OptimWrapper) else [])


def carry_state(old_opt, new_opt, old_params, new_params, entries):
    """Copy every per-parameter state of `old_opt` (over `old_params`, name -> parameter) to `new_opt` (over
    `new_params`): a tensor the shape of the old parameter keeps the entries `entries` (name -> flat indices, from
    `kept_entries`) names, anything else is copied as it is."""
    def take(v, p, q, idx):
        if not isinstance(v, torch.Tensor) or idx is None or v.shape != p.shape: return v
        return v.flatten()[idx.to(v.device)].view(q.shape).clone()
    for old, new in zip(_stores(old_opt), _stores(new_opt)):
        for name, p in old_params.items():
            q = new_params.get(name)
            if q is None or p not in old: continue
            new[q] = {**new.get(q, {}), **{k: take(v, p, q, entries.get(name)) for k, v in old[p].items()}}


@patch
def prune(self: Learner, example_input=None, **kwargs):
    """Replace `learn.model` by `Pruner(**kwargs).prune_model(learn.model)` and rebuild the optimizer with its state
    (momentum, Adam moments) sliced to the kept channels, its hyper-parameters and frozen layers kept, so that
    `learn.fit_one_cycle(...)` fine-tunes the smaller model. Traced and verified on `example_input` (default: the
    first rows of a validation batch). Returns the pruned model."""
    if isinstance(self.model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise ValueError('learn.model is wrapped for distributed training: call learn.prune() outside distrib_ctx '
                         '(or DataParallel), on the plain model')
    if isinstance(self.opt_func, OptimWrapper):
        raise ValueError('opt_func is an optimizer built on the old parameters: pass a function that builds one, '
                         'such as partial(OptimWrapper, opt=torch.optim.SGD)')
    pruner = Pruner(example_input=example_batch(self) if example_input is None else example_input, **kwargs)
    old, old_opt = self.model, self.opt
    pruned = pruner.prune_model(old)
    self.model = pruned
    self.__dict__.pop('_sparsify_resume', None)   # a loaded sparsity state describes the old model
    if old_opt is not None:
        self.create_opt()
        hypers = list(old_opt.hypers)
        if len(hypers) == len(self.opt.hypers):   # the same parameter groups (the splitter's)
            self.opt.set_hypers(**{k: [h[k] for h in hypers] for k in hypers[0]})
        carry_state(old_opt, self.opt, dict(old.named_parameters()), dict(pruned.named_parameters()),
                    kept_entries(old, pruner.kept))
        if old_opt.frozen_idx: self.opt.freeze_to(old_opt.frozen_idx)
    return pruned
