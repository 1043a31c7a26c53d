"""Every file in the golden directory (official DSKD and DSKDv2 numbers, v2 in `v2/`) must be
reproduced by our losses.

The directory comes from $DSKD_GOLDEN_DIR, default $DSKD_SHARED_DIR/golden or
<repo>/../shared/golden. A missing
directory, an unknown file, or a recorded output/gradient/intermediate that no check
compared is a failure, never a skip. Tolerances follow the golden README: rtol 1e-5 with no
atol for losses and terms, atol 1e-6 added for gradients and for logit-sized intermediates
(entries near 0 where BLAS summation order moves the last bits), counts exactly. v2 files use
the real tokenizers of ../shared/tokenizers.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dskd.pipeline.losses import build_loss
from dskd.pipeline.losses.divergences import canonical_divergence, divergence
from dskd.pipeline.losses.pinv import overlap_columns, t2s_pinv_weight, vocab_overlap
from dskd.pipeline.losses.signals import StudentBatch, TeacherSignal

REPO_ROOT = Path(__file__).resolve().parents[3]
SHARED_DIR = Path(os.environ.get("DSKD_SHARED_DIR") or REPO_ROOT.parent / "shared")
GOLDEN_DIR = Path(os.environ.get("DSKD_GOLDEN_DIR") or SHARED_DIR / "golden")
DOC_FILES = {"README.md"}  # documentation, recognised and not a case



def _files() -> list[str]:
    """Every file under the golden dir, sub-folders included (v2/…), as relative paths."""
    if not GOLDEN_DIR.is_dir():
        return ["<missing golden dir>"]
    return sorted(str(p.relative_to(GOLDEN_DIR)) for p in GOLDEN_DIR.rglob("*") if p.is_file())


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

    def close(self, key: str, actual: torch.Tensor, *, atol: float = 0.0, where=None,
              rtol: float = 1e-5) -> None:
        expected = self.t[key]
        actual = actual.detach()
        if expected.dtype in (torch.int64, torch.bool):
            assert torch.equal(actual.to(expected.dtype), expected), key
        else:
            if where is not None:
                actual, expected = actual[where], expected[where]
            torch.testing.assert_close(actual.float(), expected, rtol=rtol, atol=atol,
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


# ---------------------------------------------------------------------------------------------
# v2/: DSKDv2 (same vocabulary and ETA) with the real tokenizers


@functools.cache
def _tokenizer(name: str, model_type: str):
    """A real tokenizer as the official `Distiller.load_tokenizer` leaves it (qwen: EOS 151643)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SHARED_DIR / "tokenizers" / name))
    if model_type == "qwen":
        tok.eos_token_id = 151643
    return tok


def _sparse_head(g: Golden, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, d) head rebuilt from its non-zero rows (README), and the active ids."""
    ids, rows = g[f"input.{side}_lm_head_ids"], g[f"input.{side}_lm_head_rows"]
    w = torch.zeros(int(g[f"hparam.{side}_vocab_size"]), rows.shape[1])
    w[ids] = rows
    return w, ids


def _official_alignment(g: Golden, s_tok, t_tok) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute (teacher rows, student rows) (B, K), -1 padded, from our official Aligner."""
    from dskd.pipeline.token_align import Aligner, LabelTokens

    aligner = Aligner(s_tok, t_tok, "official")
    pairs = []
    for lab_s, lab_t in zip(g["input.label"], g["input.teacher_label"]):
        sides = []
        for lab in (lab_t, lab_s):
            sup = lab.ne(-100).nonzero().squeeze(1)
            sides.append(LabelTokens(lab[sup].tolist(), int(sup[0]) if len(sup) else 0))
        pairs.append(aligner(*sides))
    K = max(1, max(len(p[0]) for p in pairs))
    at = torch.full((len(pairs), K), -1, dtype=torch.long)
    ast = torch.full((len(pairs), K), -1, dtype=torch.long)
    for b, (ti, si) in enumerate(pairs):
        at[b, : len(ti)], ast[b, : len(si)] = torch.tensor(ti, dtype=torch.long), \
            torch.tensor(si, dtype=torch.long)
    return at, ast


def _relative(rows: torch.Tensor, labels: torch.Tensor, width: int) -> torch.Tensor:
    """Absolute rows → indices relative to each sample's first label row, padded to `width`."""
    first = labels.ne(-100).int().argmax(1, keepdim=True)
    rel = torch.where(rows >= 0, rows - first, rows)
    out = torch.full((rows.shape[0], width), -1, dtype=torch.long)
    out[:, : min(width, rel.shape[1])] = rel[:, :width]
    return out


def check_v2(g: Golden, eta: bool) -> None:
    meta = g.meta
    s_tok = _tokenizer(meta["student_tokenizer"], meta["student_model_type"])
    t_tok = _tokenizer(meta["teacher_tokenizer"], meta["teacher_model_type"])
    assert s_tok.eos_token_id == int(g["hparam.student_eos_id"])
    assert t_tok.eos_token_id == int(g["hparam.teacher_eos_id"])
    w_s, s_ids = _sparse_head(g, "student")
    w_t, t_ids = _sparse_head(g, "teacher")
    w_s.requires_grad_()
    hs = g["input.student_hidden"].clone().requires_grad_()
    zs = hs @ w_s.T
    zs.retain_grad()
    ht = g["input.teacher_hidden"]
    pinv = bool(g["hparam.init_s2t_projector"])
    assert int(g["hparam.topk_vocab"]) == -1 and meta["init_t2s_projector"] == "true"
    loss = build_loss("dskd-eta" if eta else "dskd-v2", meta["kd_objective"],
                      d_student=hs.shape[-1], d_teacher=ht.shape[-1], student_tokenizer=s_tok,
                      teacher_tokenizer=t_tok, student_head_weight=w_s.detach(),
                      teacher_head_weight=w_t, projector_init="pinv" if pinv else "random",
                      t2s_agreement=float(g["hparam.t2s_agreement"]), **_opts(g))
    # our pseudo-inverse init vs the official one (README: 2e-6 of the largest entry)
    overlap = vocab_overlap(s_tok, t_tok)
    p_s, p_t = overlap_columns(w_s, w_t, overlap)
    t2s_init = t2s_pinv_weight(p_s, p_t).float()
    if pinv:
        torch.testing.assert_close(loss.t2s.weight, t2s_init)
        m = loss.s2t_map.matrix(w_s)
        expected_m = g["derived.s2t_projector"]
        g.close("derived.s2t_projector", m, rtol=0, atol=2e-6 * float(expected_m.abs().max()))
        assert loss.s2t_map.n_tokens == int(g["hparam.n_pinv_tokens"])
        # tight checks with the official M (README), as W_s does not change in this call
        loss.s2t_map.matrix = lambda head: expected_m
    expected_t2s = g["param.t2s.weight"]
    torch.testing.assert_close(t2s_init, expected_t2s, rtol=0,
                               atol=2e-6 * float(expected_t2s.abs().max()))
    _load_params(loss, g)  # the official weights, for the tight checks below
    loss.keep_intermediates = True

    student = StudentBatch(labels=g["input.label"], logits=zs, hidden=hs, lm_head_weight=w_s)
    teacher = TeacherSignal(labels=g["input.teacher_label"], hidden=ht, head_weight=w_t,
                            logits=ht @ w_t.T)
    if eta:
        teacher.alignment = _official_alignment(g, s_tok, t_tok)
    denom = g["hparam.loss_denom"]
    out = loss(student, teacher, denom)
    out.loss.backward()
    inter = out.intermediates

    # outputs: terms / batch_denom are the official logs (DSKDv2 terms are returned × denom)
    for key in [k for k in g.t if k.startswith("output.")]:
        name = key[len("output."):]
        actual = out.loss if name == "loss" else \
            out.terms["ce_loss" if name == "nll_loss" else name] / denom
        g.close(key, actual)

    per_token = {"t2s_kd_per_token", "s2t_kd_per_token"}
    names = {"t2s_hiddens": "t2s_hiddens", "s2t_hiddens": "s2t_hiddens", "t_preds": "t_preds",
             "tea_v_hiddens": "tea_v_hiddens", "stu_v_hiddens": "stu_v_hiddens",
             "t_preds_as_label": "t_preds_as_label", "s2t_hiddens_align": "s2t_hiddens",
             "t2s_kd_per_token": "t2s_kd_per_token", "s2t_kd_per_token": "s2t_kd_per_token"}
    for key in [k for k in g.t if k.startswith("intermediate.")]:
        name = key[len("intermediate."):]
        if name == "t2s_logits_active":
            g.close(key, inter["t2s_logits"][..., s_ids], atol=1e-6)
        elif name == "s2t_logits_active":
            g.close(key, inter["s2t_logits"][..., t_ids], atol=1e-6)
        elif name in ("align_teacher_idx", "align_student_idx"):
            rows = teacher.alignment[0 if "teacher" in name else 1]
            labels = g["input.teacher_label" if "teacher" in name else "input.label"]
            g.close(key, _relative(rows, labels, g[key].shape[1]))
        else:
            g.close(key, inter[names[name]], atol=1e-6 if name in per_token or
                    inter[names[name]].is_floating_point() else 0.0)
    derived = {"derived.t_preds": inter["t_preds"],
               "derived.t2s_agreement_mask": inter["t2s_agreement_mask"]}
    if eta:
        derived.update({"derived.align_pair_used": inter["align_pair_used"],
                        "derived.s2t_align_mask": inter["s2t_align_mask"],
                        "derived.t2s_hiddens_align": inter["t2s_hiddens"]})
    for key, actual in derived.items():
        if key in g.t:
            g.close(key, actual, atol=1e-6)

    inactive = _first_missing(s_ids, w_s.shape[0])
    grads = {"grad.student_hidden": hs.grad,
             "grad.student_logits_active": zs.grad[..., s_ids],
             "grad.student_logits_inactive": zs.grad[..., inactive],
             "grad.student_lm_head_rows": w_s.grad[s_ids],
             "grad.student_lm_head_inactive_row": w_s.grad[inactive],
             "grad.t2s.weight": loss.t2s.weight.grad}
    if not pinv:
        grads["grad.s2t.weight"] = loss.s2t.weight.grad
    for key in [k for k in g.t if k.startswith("grad.")]:
        g.close(key, grads[key], atol=1e-5 * max(1.0, float(g[key].abs().max())))


def _first_missing(ids: torch.Tensor, n: int) -> int:
    present = torch.zeros(n, dtype=torch.bool)
    present[ids] = True
    return int((~present).nonzero()[0])


def check_overlap(g: Golden, name: str) -> None:
    """overlap_<student>_<teacher>: our shared-token list equals the official one."""
    student, teacher = Path(name).stem.split("_")[1:]
    s_ids, t_ids = vocab_overlap(_tokenizer(student, ""), _tokenizer(teacher, ""))
    g.close("student_overlap_token_ids", s_ids)
    g.close("teacher_overlap_token_ids", t_ids)


def check_align_json(path: Path) -> None:
    """align_*.json: the real tokenizers give the recorded tokens, and our official rule the
    recorded alignment, sentence by sentence."""
    from dskd.pipeline.token_align import align_official

    d = json.loads(path.read_text())
    s_tok = _tokenizer(d["student_tokenizer"], d["student_model_type"])
    t_tok = _tokenizer(d["teacher_tokenizer"], d["teacher_model_type"])
    assert [t_tok.eos_token, t_tok.eos_token_id] == d["teacher_eos"]
    assert [s_tok.eos_token, s_tok.eos_token_id] == d["student_eos"]
    assert d["cases"], path
    for case in d["cases"]:
        for tok, side in ((s_tok, "student"), (t_tok, "teacher")):
            ids = tok.encode(case["text"], add_special_tokens=False) + [tok.eos_token_id]
            assert ids == case[f"{side}_ids"], (case["text"], side)
            assert tok.convert_ids_to_tokens(ids) == case[f"{side}_tokens"], case["text"]
        ti, si = align_official(case["teacher_tokens"], case["student_tokens"],
                                t_tok.eos_token, s_tok.eos_token)
        assert (ti, si) == (case["align_teacher_idx"], case["align_student_idx"]), case["text"]


CHECKS = {
    "divergences": check_divergences,
    "dskd_same_vocab": lambda g: check_dual_space(g, "dskd"),
    "dskd_cma": lambda g: check_dual_space(g, "dskd-cma"),
    "uld": check_uld,
    "dskd_e2e_gpt2": check_e2e,
    "dskdv2_same_vocab": lambda g: check_v2(g, eta=False),
    "dskdv2_eta": lambda g: check_v2(g, eta=True),
}
# files without a `case`: recognised by name, in v2/ only
NAMED = {"overlap": "v2/overlap_", "align_json": "v2/align_"}


def _case_of(name: str) -> str | None:
    if name.startswith(NAMED["align_json"]) and name.endswith(".json"):
        return "align_json"
    if name.startswith(NAMED["overlap"]) and name.endswith(".safetensors"):
        return "overlap"
    if name.endswith(".safetensors"):
        with safe_open(str(GOLDEN_DIR / name), "pt") as h:
            return (h.metadata() or {}).get("case")
    return None


@pytest.mark.parametrize("name", _files())
def test_golden_file(name: str) -> None:
    assert GOLDEN_DIR.is_dir(), f"golden directory {GOLDEN_DIR} not found (set DSKD_GOLDEN_DIR)"
    if Path(name).name in DOC_FILES:
        assert (GOLDEN_DIR / name).read_text().strip(), f"{name} is empty"
        return
    case = _case_of(name)
    if case == "align_json":
        check_align_json(GOLDEN_DIR / name)
        return
    assert name.endswith(".safetensors"), f"unrecognised file in golden dir: {name}"
    g = Golden(GOLDEN_DIR / name)
    torch.manual_seed(0)
    if case == "overlap":
        check_overlap(g, name)
        assert g.checked == set(g.t), f"{name}: unchecked tensors {set(g.t) - g.checked}"
        return
    assert case in CHECKS, f"{name}: no check for case {case!r}"
    CHECKS[case](g)
    g.assert_all_checked()


def test_golden_dir_has_every_case() -> None:
    """Guards against a silently emptied directory: every case must be present."""
    cases = {_case_of(n) for n in _files() if Path(n).name not in DOC_FILES}
    assert cases == set(CHECKS) | set(NAMED), cases
