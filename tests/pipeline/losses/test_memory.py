"""Peak memory of the chunked losses at V = 152k, 4 × 512 tokens (slow tier).

Run: pytest tests/pipeline/losses/test_memory.py -m slow -s
Each case runs in a fresh process and reports ru_maxrss growth over the inputs it needed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource, sys, torch
from dskd.pipeline.losses import StudentBatch, TeacherSignal, build_loss
method, div = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
B, T, V, DS, DT = 4, 512, 152_064, 512, 1024
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB
labels = torch.randint(0, V, (B, T)); labels[:, :128] = -100
hs = torch.randn(B, T, DS) ; ws = torch.randn(V, DS) * 0.05
ht = torch.randn(B, T, DT); wt = torch.randn(V, DT) * 0.05
logits = (hs @ ws.T).requires_grad_()          # (B, T, V) student logits, 1.16 GiB
student = StudentBatch(labels=labels, logits=logits, hidden=hs.requires_grad_(), lm_head_weight=ws)
teacher = TeacherSignal(labels=labels, hidden=ht, head_weight=wt)  # teacher logits never materialised
loss = build_loss(method, div, d_student=DS, d_teacher=DT)
base = rss()
out = loss(student, teacher)
out.loss.backward()
peak = rss()
print(json.dumps({"method": method, "div": div, "inputs_gib": base, "peak_gib": peak,
                  "growth_gib": peak - base, "logits_gib": logits.numel() * 4 / 2**30,
                  "loss": out.loss.item(), "grad_finite": bool(torch.isfinite(logits.grad).all())}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("method,div", [("kd", "fkl"), ("kd", "akl"), ("dskd", "fkl")])
def test_peak_memory_v152k(method, div):
    res = subprocess.run([sys.executable, "-c", SCRIPT, method, div], capture_output=True,
                         text=True, check=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    print(r)
    assert r["grad_finite"]
    # growth = the student-logit gradient (one logits-sized tensor) + chunk temporaries; an
    # unchunked divergence would hold ~8 logits-sized float32 temporaries (~9 GiB) instead.
    assert r["growth_gib"] < 2 * r["logits_gib"] + 1.0, r
