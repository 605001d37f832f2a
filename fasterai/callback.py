"""SparsifyCallback: sparsify a model on a schedule while fastai trains it."""
import torch.nn as nn
from fastai.callback.core import Callback

from .criteria import resolve_criterion
from .granularity import resolve_granularity
from .schedules import annealing_cos, resolve_schedule
from .sparsifier import Sparsifier, check_layer_type, check_method, check_sparsity, find_layers

__all__ = ['SparsifyCallback']


class SparsifyCallback(Callback):
    """Raise the model's sparsity from `start_sparsity` to `sparsity` percent along `sched_func` during `fit`.

    After every training batch the schedule is evaluated on training progress, the `Sparsifier` re-scores
    when the number of zero units changes, and masks are applied again after the optimizer step.
    """
    order = 55         # after Recorder (which prints the epoch row), before ProgressCallback (the header)
    run_valid = False

    def __init__(self, sparsity, granularity='filter', method='local', criteria='l1', sched_func=annealing_cos,
                 layer_type=nn.Conv2d, start_sparsity=0, leaf_modules=()):
        self.sparsity = check_sparsity(sparsity)                # target percentage at the end of training
        self.start_sparsity = check_sparsity(start_sparsity)    # percentage at the start of training
        self.granularity = granularity                          # 'weight', 'kernel', 'filter' or a dims tuple
        resolve_granularity(granularity)
        self.method = check_method(method)                      # 'local' or 'global'
        self.criteria = criteria                                # 'l1', 'l2' or a function of the weight
        resolve_criterion(criteria)
        self.sched_func = resolve_schedule(sched_func)          # f(start, end, pos), a name or a function
        self.layer_type = check_layer_type(layer_type)          # layer type(s) to sparsify
        self.leaf_modules = leaf_modules                        # modules the tracer keeps whole
        self.sparsifier = None

    def before_fit(self):
        find_layers(self.learn.model, self.layer_type)
        self.sparsifier = None
        print(f'Pruning of {self.granularity} until a sparsity of {self.sparsity:g}%')

    def before_batch(self):
        if self.sparsifier is None:   # built on the first batch, whose shape the graph is traced with
            self.sparsifier = Sparsifier(self.learn.model, self.granularity, self.method, self.criteria,
                                         self.layer_type, self.xb[0].shape, self.leaf_modules)

    def after_batch(self):
        pos = (self.epoch + (self.iter + 1) / self.n_iter) / self.n_epoch
        self.sparsifier.sparsify(self.sched_func(self.start_sparsity, self.sparsity, min(pos, 1.0)))

    def after_epoch(self):
        if self.sparsifier is not None:
            print(f'Sparsity at epoch {self.epoch}: {self.sparsifier.sparsity():.2f}%')

    def after_fit(self):
        if self.sparsifier is not None:
            print(f'Final Sparsity: {self.sparsifier.sparsity():.2f}')
