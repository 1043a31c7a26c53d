"""Every file in the golden directory (official DSKD numbers) must be reproduced by our losses.

The directory comes from $DSKD_GOLDEN_DIR, default <repo>/../shared/golden. A missing
directory, an unknown file, or a recorded output/gradient/intermediate that no check
compared is a failure, never a skip. Tolerances follow the golden README: rtol 1e-5 with no
atol for losses and terms, atol 1e-6 added for gradients and for logit-sized intermediates
(entries near 0 where BLAS summation order moves the last bits), counts exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dskd.pipeline.losses import build_loss
from dskd.pipeline.losses.divergences import canonical_divergence, divergence
from dskd.pipeline.losses.signals import StudentBatch, TeacherSignal

REPO_ROOT = Path(__file__).resolve().parents[3]
GOLDEN_DIR = Path(os.environ.get("DSKD_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))
DOC_FILES = {"README.md"}  # documentation, recognised and not a case


def _files() -> list[str]:
    if not GOLDEN_DIR.is_dir():
        return ["<missing golden dir>"]
    return sorted(p.name for p in GOLDEN_DIR.iterdir() if p.is_file())


class Golden:
    """A loaded case that remembers which recorded keys were compared."""

    def __init__(self, path: Path) -> None:
        self.t = load_file(str(path))
        with safe_open(str(path), "pt") as h:
            self.meta = h.metadata() or {}
        self.checked: set[str] = set()

    def __getitem__(self, k: str) -> torch.Tensor:
        return self.t[k]

    def get(self, k: str):
        return self.t.get(k)

    def close(self, key: str, actual: torch.Tensor, *, atol: float = 0.0, where=None) -> None:
        expected = self.t[key]
        actual = actual.detach()
        if expected.dtype in (torch.int64, torch.bool):
            assert torch.equal(actual.to(expected.dtype), expected), key
        else:
            if where is not None:
                actual, expected = actual[where], expected[where]
            torch.testing.assert_close(actual.float(), expected, rtol=1e-5, atol=atol,
                                       msg=lambda m: f"{key}: {m}")
        self.checked.add(key)

    def assert_all_checked(self) -> None:
        recorded = {k for k in self.t if k.split(".")[0] in ("output", "grad", "intermediate")}
        missing = sorted(recorded - self.checked)
        assert not missing, f"recorded but never compared: {missing}"


def _opts(g: Golden, **extra) -> dict:
    out = {"kd_rate": float(g["hparam.kd_rate"]), "kd_temperature": float(g["hparam.kd_temperature"])}
    for name, key in [("skew_lambda", "hparam.skew_lambda"),
                      ("adaptive_kl_alpha", "hparam.adaptive_kl_alpha"),
                      ("teacher_temperature", "hparam.teacher_temperature")]:
        if g.get(key) is not None:
            out[name] = float(g[key])
    return {**out, **extra}


def _load_params(loss: torch.nn.Module, g: Golden) -> None:
    params = {k[len("param."):]: v for k, v in g.t.items() if k.startswith("param.")}
    loss.load_state_dict(params, strict=True)


def _check_outputs(g: Golden, out) -> None:
    g.close("output.loss", out.loss)
    for key in g.t:
        if key.startswith("output.") and key != "output.loss":
            g.close(key, out.terms[key[len("output."):]])


# ---------------------------------------------------------------------------------------------
# case A: divergences + vanilla KD


def check_divergences(g: Golden) -> None:
    label = g["input.label"]
    mask = label.ne(-100)
    teacher = TeacherSignal(labels=label, logits=g["input.teacher_logits"])
    denom = g["hparam.batch_denom"]
    objectives = {k.split(".")[1] for k in g.t if k.startswith("output.") and k.count(".") >= 2}
    assert len(objectives) == 6, objectives
    for obj in sorted(objectives):
        loss = build_loss("kd", obj, **_opts(g))
        # the divergence as vanilla KD sums it, and its per-token values
        s = g["input.student_logits"].clone().requires_grad_()
        per_token = divergence(canonical_divergence(obj), s, g["input.teacher_logits"], loss.opts)
        total = torch.where(mask, per_token, 0.0).sum()
        total.backward()
        g.close(f"output.{obj}.per_token", per_token)
        g.close(f"output.{obj}.sum", total)
        g.close(f"grad.{obj}.sum_wrt_student_logits", s.grad, atol=1e-6)
        # the vanilla KD criterion
        s = g["input.student_logits"].clone().requires_grad_()
        out = loss(StudentBatch(labels=label, logits=s), teacher, denom)
        out.loss.backward()
        g.close(f"output.{obj}.vanilla_kd.loss", out.loss)
        g.close(f"output.{obj}.vanilla_kd.kd_loss_sum", out.terms["kd_loss"])
        g.close(f"grad.{obj}.vanilla_kd.loss_wrt_student_logits", s.grad, atol=1e-6)
        g.close("output.ce_sum", out.terms["ce_loss"])
        g.close("output.accuracy_count", out.terms["accuracy"])


# ---------------------------------------------------------------------------------------------
# cases B and C: DSKD and DSKD-CMA


def _student_from_hidden(g: Golden):
    hs = g["input.student_hidden"].clone().requires_grad_()
    ws = g["input.student_lm_head_weight"].clone().requires_grad_()
    zs = hs @ ws.T  # equals input.student_logits exactly (README)
    zs.retain_grad()
    torch.testing.assert_close(zs, g["input.student_logits"], rtol=0, atol=0)
    student = StudentBatch(labels=g["input.label"], logits=zs, hidden=hs, lm_head_weight=ws,
                           input_ids=g["input.input_ids"],
                           embed_weight=g.get("input.student_embed_weight"))
    return student, {"student_hidden": hs, "student_lm_head_weight": ws, "student_logits": zs}


def _teacher(g: Golden) -> TeacherSignal:
    return TeacherSignal(labels=g["input.teacher_label"], input_ids=g.get("input.teacher_input_ids"),
                         logits=g["input.teacher_logits"], hidden=g["input.teacher_hidden"],
                         head_weight=g["input.teacher_lm_head_weight"],
                         embed_weight=g.get("input.teacher_embed_weight"))


def check_dual_space(g: Golden, method: str) -> None:
    obj = g.meta["kd_objective"]
    student, leaves = _student_from_hidden(g)
    teacher = _teacher(g)
    d_s, d_t = student.hidden.shape[-1], teacher.hidden.shape[-1]
    extra = {"unused_query_projector": False} if method == "dskd" else {}  # not stored in B
    loss = build_loss(method, obj, d_student=d_s, d_teacher=d_t, **_opts(g, **extra))
    _load_params(loss, g)
    loss.keep_intermediates = True
    out = loss(student, teacher, g["hparam.batch_denom"])
    out.loss.backward()
    _check_outputs(g, out)

    mask, tmask = student.mask, teacher.mask
    for key in [k for k in g.t if k.startswith("intermediate.")]:
        name = key[len("intermediate."):]
        got = out.intermediates[name]
        if name == "t2s_attention":
            g.close(key, got, where=mask)
        elif name == "s2t_attention":
            g.close(key, got, where=tmask)
        elif name == "align_scores":  # masked entries are ≈ -1e5: compare supervised pairs
            g.close(key, got, where=mask[:, :, None] & tmask[:, None, :])
        else:
            g.close(key, got, atol=1e-6)
    for key in [k for k in g.t if k.startswith("grad.")]:
        name = key[len("grad."):]
        if name in leaves:
            g.close(key, leaves[name].grad, atol=1e-6)
        else:
            module, param = name.split(".")
            g.close(key, getattr(getattr(loss, module), param).grad, atol=1e-6)
    if "derived.teacher_hidden_std" in g.t:  # CMA normalisers: scalar, unbiased, padded
        g.close("derived.teacher_hidden_std", teacher.hidden.std())


# ---------------------------------------------------------------------------------------------
# case D: ULD


def check_uld(g: Golden) -> None:
    z = g["input.student_logits"].clone().requires_grad_()
    loss = build_loss("uld", kd_rate=float(g["hparam.kd_rate"]))
    loss.keep_intermediates = True
    student = StudentBatch(labels=g["input.label"], logits=z)
    teacher = TeacherSignal(labels=g["input.teacher_label"], logits=g["input.teacher_logits"])
    out = loss(student, teacher, g["hparam.batch_denom"])
    out.loss.backward()
    _check_outputs(g, out)
    g.close("grad.student_logits", z.grad, atol=1e-6)
    # derived values live in the rolled frame: roll ours (student frame) the same way
    label = g["input.label"]
    first = label.ne(-100).int().argmax(1)
    idx = (torch.arange(label.shape[1])[None, :] + first[:, None]) % label.shape[1]
    g.close("derived.pair_mask_rolled", out.intermediates["uld_pair_mask"].gather(1, idx))
    per_pos = out.intermediates["uld_per_row"].gather(1, idx)
    pair = g["derived.pair_mask_rolled"]
    g.close("derived.uld_per_position_rolled", per_pos, where=pair)


# ---------------------------------------------------------------------------------------------
# case E: real HF GPT-2 models end to end


def _gpt2(g: Golden, prefix: str, meta_key: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = json.loads(g.meta[meta_key])
    attn = cfg.pop("attn_implementation", "eager")
    cfg.pop("model_type", None)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**cfg, attn_implementation=attn))
    state = {k[len(prefix):]: v for k, v in g.t.items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    return model


def check_e2e(g: Golden) -> None:
    student_model = _gpt2(g, "student_model.", "student_config")
    teacher_model = _gpt2(g, "teacher_model.", "teacher_config").eval()
    student_model.train()
    with torch.no_grad():
        t_out = teacher_model(g["input.teacher_input_ids"],
                              attention_mask=g["input.teacher_attention_mask"],
                              position_ids=g["input.teacher_position_ids"], output_hidden_states=True)
    s_out = student_model(g["input.input_ids"], attention_mask=g["input.attention_mask"],
                          position_ids=g["input.position_ids"], output_hidden_states=True)
    real_s, real_t = g["input.attention_mask"].bool(), g["input.teacher_attention_mask"].bool()
    g.close("intermediate.student_hidden", s_out.hidden_states[-1], where=real_s, atol=1e-6)
    g.close("intermediate.student_logits", s_out.logits, where=real_s, atol=1e-6)
    g.close("intermediate.teacher_hidden", t_out.hidden_states[-1], where=real_t, atol=1e-6)
    g.close("intermediate.teacher_logits", t_out.logits, where=real_t, atol=1e-6)

    student = StudentBatch(labels=g["input.label"], logits=s_out.logits,
                           hidden=s_out.hidden_states[-1],
                           lm_head_weight=student_model.lm_head.weight)
    teacher = TeacherSignal(labels=g["input.teacher_label"], logits=t_out.logits,
                            hidden=t_out.hidden_states[-1],
                            head_weight=teacher_model.lm_head.weight)
    loss = build_loss("dskd", g.meta["kd_objective"], d_student=student.hidden.shape[-1],
                      d_teacher=teacher.hidden.shape[-1], **_opts(g))
    _load_params(loss, g)  # includes the unused official `query` projector
    out = loss(student, teacher, g["hparam.batch_denom"])
    out.loss.backward()
    _check_outputs(g, out)
    for key in [k for k in g.t if k.startswith("grad.")]:
        name = key[len("grad."):]
        if name.startswith("student_model."):
            param = student_model.get_parameter(name[len("student_model."):])
            g.close(key, param.grad, atol=1e-6)
        else:
            module, p = name.split(".")
            g.close(key, getattr(getattr(loss, module), p).grad, atol=1e-6)
    assert loss.query.weight.grad is None  # official: created, never used


CHECKS = {
    "divergences": check_divergences,
    "dskd_same_vocab": lambda g: check_dual_space(g, "dskd"),
    "dskd_cma": lambda g: check_dual_space(g, "dskd-cma"),
    "uld": check_uld,
    "dskd_e2e_gpt2": check_e2e,
}


@pytest.mark.parametrize("name", _files())
def test_golden_file(name: str) -> None:
    assert GOLDEN_DIR.is_dir(), f"golden directory {GOLDEN_DIR} not found (set DSKD_GOLDEN_DIR)"
    if name in DOC_FILES:
        assert (GOLDEN_DIR / name).read_text().strip(), f"{name} is empty"
        return
    assert name.endswith(".safetensors"), f"unrecognised file in golden dir: {name}"
    g = Golden(GOLDEN_DIR / name)
    case = g.meta.get("case")
    assert case in CHECKS, f"{name}: no check for case {case!r}"
    torch.manual_seed(0)
    CHECKS[case](g)
    g.assert_all_checked()


def test_golden_dir_has_every_case() -> None:
    """Guards against a silently emptied directory: all five cases must be present."""
    cases = set()
    for name in _files():
        if name.endswith(".safetensors"):
            with safe_open(str(GOLDEN_DIR / name), "pt") as h:
                cases.add((h.metadata() or {}).get("case"))
    assert cases == set(CHECKS), cases
