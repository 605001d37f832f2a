"""Knowledge distillation: the losses against hand-computed values, the callback in a fit with SparsifyCallback,
after learn.prune() and across a prune_every pruning, and its refusals."""
import copy
import math

import pytest
import torch
import torch.nn as nn
from fastai.callback.core import Callback
from test_workflows import run, seed_learner

from fasterai.distill import AttentionTransfer, KnowledgeDistillationCallback, SoftTarget
from fasterai.sparsifier import SparsifyCallback


def test_soft_target_is_hinton_s_kl_times_t_squared():
    s, t, T = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.2, 3.0, 1.0]]), 2.0
    p = [math.exp(v / T) for v in t[0].tolist()]; p = [v / sum(p) for v in p]
    q = [math.exp(v / T) for v in s[0].tolist()]; q = [v / sum(q) for v in q]
    by_hand = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) * T * T
    assert SoftTarget(T)(s, t).item() == pytest.approx(by_hand, rel=1e-6)
    assert SoftTarget(T)(t, t).item() == pytest.approx(0, abs=1e-7)
    two = torch.stack([s[0], t[0]]), torch.stack([t[0], t[0]])   # the mean over the batch
    assert SoftTarget(T)(*two).item() == pytest.approx(by_hand / 2, rel=1e-6)


def test_attention_transfer_compares_maps_of_any_width():
    fs, ft = torch.zeros(1, 2, 1, 2), torch.zeros(1, 5, 1, 2)
    fs[0, :, 0, 0] = 1.0                       # all the student's attention on the first position
    ft[0, :, 0, 1] = 3.0                       # all the teacher's on the second
    assert AttentionTransfer()(fs, ft).item() == pytest.approx(2.0)   # |(1, 0) - (0, 1)|^2
    assert AttentionTransfer()(ft * 7, ft).item() == pytest.approx(0, abs=1e-7)
    with pytest.raises(ValueError, match='same batch and spatial size'):
        AttentionTransfer()(fs, torch.zeros(1, 5, 2, 2))


class Losses(Callback):
    "Records, per training batch, the loss the optimizer sees and the plain loss of the labels."
    order = 70
    def before_fit(self): self.seen = []
    def after_loss(self):
        if self.training: self.seen.append((self.learn.loss_grad.item(), self.loss_func(self.pred, *self.yb).item()))


def test_distillation_with_sparsify_in_one_fit_then_after_pruning():
    learn = seed_learner()
    run(learn, 'fit_one_cycle', 1, 1e-2)
    teacher = copy.deepcopy(learn.model)
    before = [p.clone() for p in teacher.parameters()]
    kd, rec = KnowledgeDistillationCallback(teacher, weight=0.7, features={'conv3': 'conv3'}), Losses()
    run(learn, 'fit_one_cycle', 2, 1e-3, cbs=[SparsifyCallback(50, 'filter'), kd, rec])
    assert len(rec.seen) == 8 and all(abs(g - l) > 1e-6 for g, l in rec.seen)   # the distilled loss is trained on
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))   # the teacher is never trained
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert not kd._handles and not learn.model.conv3._forward_hooks   # hooks gone after the fit
    pruned = learn.prune()
    assert pruned.conv3.out_channels < teacher.conv3.out_channels
    assert not pruned.conv3._forward_hooks
    run(learn, 'fit_one_cycle', 1, 1e-3, cbs=[kd, rec])   # recovery: the pruned model learns from the dense one
    assert len(rec.seen) == 4 and all(abs(g - l) > 1e-6 for g, l in rec.seen)


def test_distillation_follows_a_model_pruned_during_the_fit():
    learn = seed_learner()
    teacher = copy.deepcopy(learn.model)
    kd, rec = KnowledgeDistillationCallback(teacher, features={'conv2': 'conv2'}), Losses()
    run(learn, 'fit_one_cycle', 2, 1e-3, cbs=[SparsifyCallback(50, 'filter', prune_every=1), kd, rec])
    assert learn.model.conv2.out_channels < teacher.conv2.out_channels   # pruned after the first epoch
    assert not learn.model.conv2._forward_hooks   # the pruned copy did not carry the callback's hooks
    assert len(rec.seen) == 8 and all(abs(g - l) > 1e-6 for g, l in rec.seen)


def test_distillation_refuses_what_it_cannot_compare():
    learn = seed_learner()
    with pytest.raises(ValueError, match="the teacher has no module 'conv9' to match features at: choose among"):
        KnowledgeDistillationCallback(copy.deepcopy(learn.model), features={'conv1': 'conv9'})
    with pytest.raises(ValueError, match='weight must be a number from 0 to 1'):
        KnowledgeDistillationCallback(learn.model, weight=1.5)
    with pytest.raises(ValueError, match='the temperature T must be a positive number'):
        SoftTarget(0)
    with pytest.raises(ValueError, match=r'the teacher outputs \(16, 3\) where the student outputs \(16, 10\)'):
        other = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3))
        run(learn, 'fit', 1, 1e-3, cbs=KnowledgeDistillationCallback(other))
