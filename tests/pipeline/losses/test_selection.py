"""Row selection in `map_rows`: indices from the loader give the same losses and gradients as
the label mask, and neither costs a device→host sync per chunk."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dskd.pipeline.losses import StudentBatch, TeacherSignal, build_loss
from dskd.pipeline.losses.common import map_rows
from dskd.pipeline.train.syncs import SyncCounter

B, T, V, DS, DT = 3, 7, 41, 8, 12


def _index(labels: torch.Tensor) -> torch.Tensor:
    return labels.reshape(-1).ne(-100).nonzero().squeeze(1)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100
    labels[1, -2:] = -100
    hs = torch.randn(B, T, DS, generator=g, requires_grad=True)
    ws = torch.randn(V, DS, generator=g, requires_grad=True)
    student = StudentBatch(labels=labels, hidden=hs, lm_head_weight=ws,
                           input_ids=torch.randint(0, V, (B, T), generator=g),
                           embed_weight=torch.randn(V, DS, generator=g))
    teacher = TeacherSignal(labels=labels.clone(), hidden=torch.randn(B, T, DT, generator=g),
                            head_weight=torch.randn(V, DT, generator=g),
                            input_ids=torch.randint(0, V, (B, T), generator=g),
                            embed_weight=torch.randn(V, DT, generator=g))
    return student, teacher


def test_map_rows_with_indices_equals_mask_and_the_unselected_computation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 5, generator=g, requires_grad=True)
    y = torch.randn(23, 3, generator=g)
    mask = torch.rand(23, generator=g) > 0.4

    def fn(a, b):
        return torch.stack([(a ** 2).sum(-1), (a[:, :3] * b).sum(-1)], -1)

    full = fn(x, y) * mask[:, None]
    got = {}
    for name, sel in (("mask", mask), ("index", mask.nonzero().squeeze(1))):
        for chunk in (1, 4, 100):
            out = map_rows(fn, [x, y], select=sel, chunk_rows=chunk)
            (gx,) = torch.autograd.grad(out.sum(), x)
            got[(name, chunk)] = (out, gx)
    (ref_g,) = torch.autograd.grad(full.sum(), x)
    for out, gx in got.values():
        torch.testing.assert_close(out, full, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gx, ref_g, rtol=1e-6, atol=1e-6)
    empty = map_rows(fn, [x, y], select=torch.zeros(23, dtype=torch.bool), chunk_rows=4)
    assert empty.shape == (23, 2) and not empty.any()


@pytest.mark.parametrize("method", ["sft", "kd", "dskd", "dskd-cma"])
def test_losses_with_loader_indices_equal_the_mask_path(method):
    student, teacher = _batch()
    loss = build_loss(method, "fkl", d_student=DS, d_teacher=DT, chunk_rows=4)
    a = loss(student, teacher)
    ga = torch.autograd.grad(a.loss, [student.hidden, student.lm_head_weight])
    s2 = dataclasses.replace(student, label_index=_index(student.labels))
    t2 = dataclasses.replace(teacher, label_index=_index(teacher.labels))
    b = loss(s2, t2)
    gb = torch.autograd.grad(b.loss, [student.hidden, student.lm_head_weight])
    assert a.terms.keys() == b.terms.keys()
    for k in a.terms:
        torch.testing.assert_close(a.terms[k].float(), b.terms[k].float(), rtol=1e-6, atol=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunk", [2, 64])
def test_syncs_do_not_grow_with_the_number_of_chunks(chunk):
    """DSKD: one sync per map_rows call from a mask, none from loader indices, whatever the
    number of chunks (before: one per chunk, and one more per recomputed chunk)."""
    student, teacher = _batch()
    loss = build_loss("dskd", "fkl", d_student=DS, d_teacher=DT, chunk_rows=chunk)
    with SyncCounter() as masked:
        loss(student, teacher).loss.backward()
    s2 = dataclasses.replace(student, label_index=_index(student.labels))
    t2 = dataclasses.replace(teacher, label_index=_index(teacher.labels))
    with SyncCounter() as indexed:
        loss(s2, t2).loss.backward()
    assert masked.calls == {"nonzero": 2}  # student space + teacher space
    assert indexed.total == 0, indexed.calls
