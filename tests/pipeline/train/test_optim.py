import itertools
import math

import pytest
from torch import nn

from dskd.pipeline.train.optim import LRSchedule, build_optimizer


def test_two_param_groups_with_their_own_lr():
    student, proj = nn.Linear(4, 4), nn.Linear(4, 3)
    opt = build_optimizer(student, proj, lr=5e-4, projector_lr=1e-3, weight_decay=0.01)
    assert [g["name"] for g in opt.param_groups] == ["student", "projectors"]
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 1e-3]
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in proj.parameters()}


def test_tied_and_frozen_params_are_not_duplicated():
    student = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    student[1].weight = student[0].weight  # tied like GPT-2
    frozen = nn.Linear(4, 4)
    for p in frozen.parameters():
        p.requires_grad_(False)
    student.add_module("frozen", frozen)
    opt = build_optimizer(student, None, lr=1e-3, projector_lr=1e-3, weight_decay=0.0)
    assert len(opt.param_groups[0]["params"]) == 1
    assert opt.param_groups[1]["params"] == []


def test_no_trainable_student_is_an_error():
    m = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(m, None, lr=1e-3, projector_lr=1e-3, weight_decay=0.0)


def test_cosine_with_warmup_reaches_the_floor():
    s = LRSchedule(total_steps=110, warmup_steps=10, min_lr=1e-7)
    assert s.lr(1.0, 0) == pytest.approx(0.1)
    assert s.lr(1.0, 9) == pytest.approx(1.0)
    assert s.lr(1.0, 10) == pytest.approx(1.0)
    assert s.lr(1.0, 60) == pytest.approx(1e-7 + (1 - 1e-7) * 0.5)
    assert s.lr(1.0, 110) == pytest.approx(1e-7)
    assert s.lr(1.0, 500) == pytest.approx(1e-7)
    lrs = [s.lr(1.0, k) for k in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))  # monotone decay after warmup


def test_schedule_applies_per_group_peaks_and_round_trips():
    student, proj = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = build_optimizer(student, proj, lr=5e-4, projector_lr=1e-3, weight_decay=0.01)
    s = LRSchedule(total_steps=100, min_lr=1e-7)
    s.apply(opt, 50)
    mid = 0.5 * (1 + math.cos(math.pi * 0.5))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-7 + (5e-4 - 1e-7) * mid)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-7 + (1e-3 - 1e-7) * mid)
    assert LRSchedule.from_state_dict(s.state_dict()) == s
    assert LRSchedule(10, kind="constant").lr(3e-4, 9) == 3e-4
