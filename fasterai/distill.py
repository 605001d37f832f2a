"""Knowledge distillation inside a fastai fit: the student (the model being sparsified, or the pruned one) learns
from a teacher (typically the dense model) as well as from the labels.

    teacher = copy.deepcopy(learn.model)                     # the dense model, before sparsifying
    learn.fit_one_cycle(5, cbs=[SparsifyCallback(50, 'filter'), KnowledgeDistillationCallback(teacher)])
    learn.prune(); learn.fit_one_cycle(2, cbs=KnowledgeDistillationCallback(teacher))   # recover
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from fastai.callback.core import Callback

__all__ = ['SoftTarget', 'AttentionTransfer', 'KnowledgeDistillationCallback']


class SoftTarget:
    """The soft-target loss of Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015):
    KL(teacher || student) between their softmaxes at temperature `T`, over the last dim, averaged over the
    batch, times T^2 (so that its gradients keep their scale as T changes)."""
    def __init__(self, T=4.0):
        if not isinstance(T, (int, float)) or isinstance(T, bool) or T <= 0:
            raise ValueError(f'the temperature T must be a positive number, got {T!r}')
        self.T = float(T)

    def __call__(self, student, teacher):
        s, t = F.log_softmax(student / self.T, -1), F.log_softmax(teacher / self.T, -1)
        return F.kl_div(s.flatten(0, -2), t.flatten(0, -2), reduction='batchmean', log_target=True) * self.T ** 2

    def __repr__(self): return f'SoftTarget(T={self.T:g})'


class AttentionTransfer:
    """Attention transfer of Zagoruyko and Komodakis, "Paying More Attention to Attention" (2017): each feature
    map (N, C, ...) becomes its spatial attention, the mean over channels of its squares, flattened and
    L2-normalised; the loss is the mean over the batch of the squared distance between the two. It compares
    maps whatever their channel counts, so it holds between a pruned student and its dense teacher."""
    @staticmethod
    def attention(f):
        return F.normalize(f.float().pow(2).mean(1).flatten(1), dim=1)

    def __call__(self, student, teacher):
        if student.dim() < 3 or student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
            raise ValueError(f'attention transfer compares feature maps (N, C, ...) of the same batch and spatial '
                             f'size, got {tuple(student.shape)} and {tuple(teacher.shape)}')
        return (self.attention(student) - self.attention(teacher)).pow(2).sum(1).mean()

    def __repr__(self): return 'AttentionTransfer()'


def _modules(model, names, who):
    "name -> module of `model` for each of `names`, or a ValueError naming the missing ones."
    mods = dict(model.named_modules())
    bad = [n for n in names if n not in mods]
    if bad: raise ValueError(f'the {who} has no module {bad[0]!r} to match features at: choose among '
                             f'{[n for n in mods if n][:12]}{" ..." if len(mods) > 13 else ""}')
    return {n: mods[n] for n in names}


class KnowledgeDistillationCallback(Callback):
    """While training, the loss is `(1 - weight) * loss + weight * loss(student outputs, teacher outputs)` plus,
    for each pair of `features` ({student module name: teacher module name}), `feature_weight` times
    `feature_loss` of their outputs. The teacher runs in eval mode without gradients on the same batch and is
    never trained. Validation losses and metrics are the student's own. It follows `learn.model` when a pruning
    replaces it (`learn.prune()`, `SparsifyCallback(prune_every=...)`), hooking the new modules of the same names.
    """
    order = 60   # after the loss is computed and after SparsifyCallback (55), whatever the order given

    def __init__(self, teacher, loss=None, weight=0.5, features=None, feature_loss=None, feature_weight=1.0):
        if not isinstance(teacher, nn.Module):
            raise ValueError(f'teacher must be an nn.Module (the dense model, say), got {type(teacher).__name__}')
        for name, w, top in (('weight', weight, 1), ('feature_weight', feature_weight, float('inf'))):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= top:
                raise ValueError(f'{name} must be a number from 0 to {top:g}, got {w!r}')
        if features is not None and not (isinstance(features, dict) and
                                         all(isinstance(k, str) and isinstance(v, str) for k, v in features.items())):
            raise ValueError("features must map student module names to teacher module names, such as "
                             "{'layer3': 'layer3'}")
        self.teacher, self.weight, self.feature_weight = teacher, float(weight), float(feature_weight)
        self.loss = SoftTarget() if loss is None else loss
        self.feature_loss = AttentionTransfer() if feature_loss is None else feature_loss
        self.features = dict(features or {})
        _modules(teacher, list(self.features.values()), 'teacher')
        self._hooked, self._handles, self._seen = None, [], {}

    # ------------------------------------------------------------ hooks on the student and the teacher
    def _store(self, module, inputs, output):
        if isinstance(output, torch.Tensor): self._seen[id(module)] = output   # (a trace passes proxies: skipped)

    def _hook(self, model):
        self._unhook()
        self._ids = {}   # ('student' | 'teacher', module name) -> id(module)
        for who, m, names in (('student', model, list(self.features)),
                              ('teacher', self.teacher, list(self.features.values()))):
            for name, mod in _modules(m, names, who).items():
                self._ids[who, name] = id(mod)
                self._handles.append(mod.register_forward_hook(self._store))
        self._hooked = model

    def _unhook(self):
        for h in self._handles: h.remove()
        self._handles, self._seen, self._hooked = [], {}, None

    # ------------------------------------------------------------ fastai events
    def before_fit(self):
        self.teacher.to(next(self.learn.model.parameters()).device).eval()
        for p in self.teacher.parameters(): p.requires_grad_(False)
        if self.features: self._hook(self.learn.model)

    def before_batch(self):
        if self.features and self._hooked is not self.learn.model: self._hook(self.learn.model)   # pruned meanwhile
        self._seen = {}

    def after_loss(self):
        if not self.training: return
        with torch.no_grad(): teacher = self.teacher(*self.xb)
        pred, t = self.pred, teacher
        if isinstance(pred, (tuple, list)): pred, t = pred[0], t[0]
        if pred.shape != t.shape:
            raise ValueError(f'the teacher outputs {tuple(t.shape)} where the student outputs {tuple(pred.shape)}: '
                             'distillation compares the same outputs')
        loss = (1 - self.weight) * self.learn.loss_grad + self.weight * self.loss(pred, t.detach())
        for s_name, t_name in self.features.items():
            s, f = self._seen.get(self._ids['student', s_name]), self._seen.get(self._ids['teacher', t_name])
            if s is None or f is None:
                raise ValueError(f"no output was seen at '{s_name if s is None else t_name}' in this batch: match "
                                 'features at modules that run in the forward')
            loss = loss + self.feature_weight * self.feature_loss(s, f.detach())
        self.learn.loss_grad = loss
        self.learn.loss = loss.detach().clone()

    def after_fit(self): self._unhook()
