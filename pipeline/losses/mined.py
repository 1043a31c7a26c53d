"""MinED baseline (official `min_edit_dis_kld.py`, after FuseLLM): align token sequences by DTW
over edit distance, map teacher vocabulary ids to student ids, distil with a divergence (FKL).

Unlike the official code, the teacher→student vocabulary map is built here from the two
tokenizers (no mapping files):
  * every token is read as the bytes it stands for (byte-level BPE via the GPT-2 byte table,
    SentencePiece '▁' = space and <0xNN> = byte NN), so 'Ġthe' (GPT-2) equals '▁the' (Mistral);
  * tea2stu[t] = the student token with the same bytes, else the one at least edit distance
    among candidates whose first non-space byte matches and whose length is within ±2 bytes
    (widened to the length band alone, then to every token, when that set is empty);
  * stu2tea[s] = the mapped teacher token closest to s (ties: smallest id); the official keeps
    the first teacher id instead (`mined_stu2tea="first"`).
Per sample, the student's supervised input tokens are aligned with the teacher's by the
official DTW (edit distance with space markers removed, same tie order). A student row takes
the teacher row it aligns with one-to-one when tea2stu maps that teacher token onto the student
token; its target is the teacher logits carried over stu2tea (-1e5 for unmapped ids). Any other
supervised row gets the one-hot target of its label (100 / -1e5), as in the official code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dskd.pipeline.losses.common import map_rows, masked_sum, token_ce, token_hits
from dskd.pipeline.losses.divergences import (
    DivergenceOptions,
    SparseTarget,
    canonical_divergence,
    divergence,
)
from dskd.pipeline.losses.signals import (
    DistillLoss,
    StudentBatch,
    TeacherSignal,
    _need,
    stack_terms,
)

MASKED_LOGIT = -100000.0  # official value for ids with no teacher counterpart
ONE_HOT_LOGIT = 100.0
_LENGTH_BAND = 2


# ---------------------------------------------------------------------------------------------
# tokens as bytes


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table (byte-level BPE token chars -> bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _byte_decoder()


def _token_kind(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        dec = json.loads(backend.to_str()).get("decoder") or {}
        text = json.dumps(dec)
        if '"ByteLevel"' in text:
            return "bytelevel"
        if "\u2581" in text or "Metaspace" in text or "ByteFallback" in text:
            return "metaspace"
    vocab = tokenizer.get_vocab()
    if sum("Ġ" in t for t in vocab) > len(vocab) // 20:
        return "bytelevel"
    return "metaspace" if sum("▁" in t for t in vocab) > len(vocab) // 20 else "plain"


def _piece_bytes(tok: str, kind: str) -> bytes:
    if kind == "bytelevel" and all(c in _BYTE_DECODER for c in tok):
        return bytes(_BYTE_DECODER[c] for c in tok)
    if kind == "metaspace":
        if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            try:
                return bytes([int(tok[3:5], 16)])
            except ValueError:
                pass
        return tok.replace("▁", " ").encode("utf-8")
    return tok.encode("utf-8")


def token_bytes(tokenizer) -> tuple[list[bytes], set[int]]:
    """Bytes of every id in the tokenizer (len(tokenizer) ids) and the set of special ids."""
    n = len(tokenizer)
    toks = tokenizer.convert_ids_to_tokens(list(range(n)))
    kind = _token_kind(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, t in added.items() if getattr(t, "special", False)}
    out = []
    for i, t in enumerate(toks):
        t = "" if t is None else t
        out.append(t.encode("utf-8") if i in special else _piece_bytes(t, kind))
    return out, special


# ---------------------------------------------------------------------------------------------
# edit distance, vectorised over many pairs


def _pad(seqs: list[bytes], fill: int) -> tuple[np.ndarray, np.ndarray]:
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    arr = np.full((len(seqs), max(1, int(lens.max(initial=0)))), fill, dtype=np.int16)
    for i, s in enumerate(seqs):
        arr[i, : len(s)] = np.frombuffer(s, dtype=np.uint8)
    return arr, lens


def edit_distance_matrix(a: list[bytes], b: list[bytes], max_pairs: int = 1 << 22) -> np.ndarray:
    """(len(a), len(b)) Levenshtein distances (unit costs) between byte strings.

    One DP over all pairs at once (numpy, int16), in blocks of at most max_pairs pairs.
    """
    if not a or not b:
        return np.zeros((len(a), len(b)), dtype=np.int32)
    step = max(1, max_pairs // len(b))
    if len(a) > step:
        return np.concatenate([edit_distance_matrix(a[i:i + step], b, max_pairs)
                               for i in range(0, len(a), step)])
    qa, la = _pad(a, -1)
    cb, lb = _pad(b, -2)
    n, m, lc = len(a), len(b), cb.shape[1]
    prev = np.broadcast_to(np.arange(lc + 1, dtype=np.int16), (n, m, lc + 1)).copy()
    out = np.empty((n, m), dtype=np.int32)
    out[la == 0] = lb[None, :]  # empty query: distance = candidate length
    cur = np.empty_like(prev)
    tmp = np.empty((n, m), dtype=np.int16)
    for i in range(1, qa.shape[1] + 1):
        cur[:, :, 0] = i
        neq = qa[:, i - 1, None, None] != cb[None, :, :]  # (n, m, lc) bool
        for j in range(1, lc + 1):
            np.minimum(prev[:, :, j], cur[:, :, j - 1], out=tmp)
            tmp += 1
            np.minimum(tmp, prev[:, :, j - 1] + neq[:, :, j - 1], out=cur[:, :, j])
        rows = np.nonzero(la == i)[0]
        if rows.size:
            out[rows] = np.take_along_axis(cur[rows], np.broadcast_to(
                lb[None, :, None], (rows.size, m, 1)), axis=2)[:, :, 0]
        prev, cur = cur, prev
    return out


# ---------------------------------------------------------------------------------------------
# vocabulary map


@dataclass
class VocabMap:
    tea2stu: Tensor  # (V_t,) int64: student id for each teacher id
    distance: Tensor  # (V_t,) int64: edit distance of that match (0 = same bytes)
    stu2tea: Tensor  # (V_s,) int64: teacher id whose logit a student id takes, -1 if none

    def pairs(self) -> tuple[Tensor, Tensor]:
        """(student ids, teacher ids) with a counterpart."""
        stu = torch.nonzero(self.stu2tea >= 0).squeeze(1)
        return stu, self.stu2tea[stu]


_MAP_CACHE: dict[tuple[str, str, str], VocabMap] = {}


def _fingerprint(tokens: list[bytes]) -> str:
    h = hashlib.sha1()
    for t in tokens:
        h.update(len(t).to_bytes(2, "little") + t)
    return h.hexdigest()


def build_vocab_map(student_tokenizer, teacher_tokenizer, stu2tea: str = "closest") -> VocabMap:
    """Teacher→student id map from the two tokenizers (cached per vocabulary pair)."""
    s_tok, s_special = token_bytes(student_tokenizer)
    t_tok, t_special = token_bytes(teacher_tokenizer)
    key = (_fingerprint(s_tok), _fingerprint(t_tok), stu2tea)
    if key not in _MAP_CACHE:
        t2s, dist = _map_tokens(t_tok, t_special, s_tok, s_special,
                                _eos(teacher_tokenizer), _eos(student_tokenizer))
        _MAP_CACHE[key] = VocabMap(torch.from_numpy(t2s), torch.from_numpy(dist),
                                   torch.from_numpy(_invert(t2s, dist, len(s_tok), stu2tea)))
    return _MAP_CACHE[key]


def _eos(tok) -> int | None:
    return getattr(tok, "eos_token_id", None)


def _map_tokens(t_tok, t_special, s_tok, s_special, t_eos, s_eos) -> tuple[np.ndarray, np.ndarray]:
    n_t = len(t_tok)
    t2s = np.full(n_t, -1, dtype=np.int64)
    dist = np.zeros(n_t, dtype=np.int64)
    exact: dict[bytes, int] = {}
    for i, b in enumerate(s_tok):
        if i not in s_special:
            exact.setdefault(b, i)
    s_special_by_text = {s_tok[i]: i for i in sorted(s_special)}
    fallback_special = s_eos if s_eos is not None else 0
    for i, b in enumerate(t_tok):
        if i in t_special:  # control tokens: same text, else EOS -> EOS, else student EOS
            t2s[i] = s_special_by_text.get(b, s_eos if i == t_eos else fallback_special)
            t2s[i] = fallback_special if t2s[i] is None else t2s[i]
        elif b in exact:
            t2s[i] = exact[b]
    todo = [i for i in range(n_t) if t2s[i] < 0]
    if todo:
        _nearest(todo, t_tok, [i for i in range(len(s_tok)) if i not in s_special], s_tok,
                 t2s, dist)
    return t2s, dist


def _key(b: bytes) -> int:
    s = b.lstrip(b" ")
    return s[0] if s else 32


def _nearest(todo, t_tok, s_ids, s_tok, t2s, dist) -> None:
    """Least edit distance over candidates sharing the first non-space byte and length ±2;
    if none, over every candidate with that first byte; if none, over the closest lengths."""
    s_ids = np.array(s_ids, dtype=np.int64)
    s_len = np.array([len(s_tok[i]) for i in s_ids])
    s_key = np.array([_key(s_tok[i]) for i in s_ids])
    groups: dict[tuple[int, int], list[int]] = {}
    for i in todo:
        groups.setdefault((_key(t_tok[i]), len(t_tok[i])), []).append(i)
    for (k, n), members in groups.items():
        same_key = s_key == k
        cand = s_ids[same_key & (np.abs(s_len - n) <= _LENGTH_BAND)]
        if cand.size == 0:
            cand = s_ids[same_key]
        if cand.size == 0:
            cand = s_ids[np.abs(s_len - n) == np.abs(s_len - n).min()]
        d = edit_distance_matrix([t_tok[i] for i in members], [s_tok[i] for i in cand])
        best = d.argmin(1)  # candidates are sorted by id: ties go to the smallest id
        t2s[members] = cand[best]
        dist[members] = d[np.arange(len(members)), best]


def _invert(t2s: np.ndarray, dist: np.ndarray, n_s: int, how: str) -> np.ndarray:
    if how not in ("closest", "first"):
        raise ValueError(f"mined_stu2tea must be 'closest' or 'first', got {how!r}")
    order = np.lexsort((np.arange(len(t2s)), dist)) if how == "closest" else np.arange(len(t2s))
    out = np.full(n_s, -1, dtype=np.int64)
    seen = np.zeros(n_s, dtype=bool)
    for t in order:  # first in `order` wins
        s = t2s[t]
        if not seen[s]:
            seen[s] = True
            out[s] = t
    return out


# ---------------------------------------------------------------------------------------------
# DTW over token strings (official `dtw`, same recurrence and tie order)


def dtw(series_1: list, series_2: list, cost: np.ndarray) -> list[list[int]]:
    """For each element of series_2, the indices of series_1 it is aligned with.

    cost (len1, len2). Rows are computed as a min-plus scan: with a_j = c_j + min(M[i,j+1],
    M[i,j]), M[i+1,j+1] = min(a_j, c_j + M[i+1,j]) = S_j + cummin_k(a_k - S_k), S = cumsum(c).
    Exact for integer costs.
    """
    n, m = cost.shape
    mat = np.full((n + 1, m + 1), np.inf)
    mat[0, 0] = 0.0
    for i in range(n):
        c = cost[i].astype(np.float64)
        a = c + np.minimum(mat[i, 1:], mat[i, :-1])
        s = np.cumsum(c)
        mat[i + 1, 1:] = s + np.minimum.accumulate(a - s)
    mat = mat[1:, 1:]
    i, j = n - 1, m - 1
    to_1: list[list[int]] = [[] for _ in range(m)]
    while i > 0 or j > 0:
        to_1[j].append(i)
        diag = mat[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = mat[i - 1, j] if i > 0 else np.inf
        left = mat[i, j - 1] if j > 0 else np.inf
        move = int(np.argmin([diag, up, left]))
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    to_1[0].append(0)
    for lst in to_1:
        lst.reverse()
    return to_1


def align_rows(
    stu_ids: list[int], tea_ids: list[int], s_tok: list[bytes], t_tok: list[bytes],
    tea2stu: np.ndarray,
) -> list[int]:
    """For each student token, the index of its one-to-one, vocabulary-consistent teacher
    token, or -1 (official: then the label's one-hot is the target)."""
    if not stu_ids or not tea_ids:
        return [-1] * len(stu_ids)
    uniq_s, inv_s = np.unique(np.array(stu_ids), return_inverse=True)
    uniq_t, inv_t = np.unique(np.array(tea_ids), return_inverse=True)
    d = edit_distance_matrix([t_tok[i].replace(b" ", b"") for i in uniq_t],
                             [s_tok[i].replace(b" ", b"") for i in uniq_s])
    cost = d[inv_t][:, inv_s]  # (n_tea, n_stu)
    out = []
    for k, js in enumerate(dtw(tea_ids, stu_ids, cost)):
        ok = len(js) == 1 and tea2stu[tea_ids[js[0]]] == stu_ids[k]
        out.append(js[0] if ok else -1)
    return out


@dataclass
class MinEDAligner:
    """Aligns a collated micro-batch; picklable, so it runs in the DataLoader workers (the
    DTW and its backtrack are Python per sample: off the training thread, overlapped with it)."""

    s_tok: list[bytes]  # bytes of every student id
    t_tok: list[bytes]  # bytes of every teacher id
    tea2stu: np.ndarray  # (V_t,) student id of each teacher id

    def __call__(self, s_ids: Tensor, s_labels: Tensor, t_ids: Tensor, t_labels: Tensor) -> Tensor:
        """(B*T_s,) flat teacher row (b * T_t + t) aligned with each student row; -1 = one-hot
        target. Inputs are the collated (B, T_s) / (B, T_t) CPU tensors."""
        b, t_s = s_ids.shape
        t_t = t_ids.shape[1]
        out = torch.full((b, t_s), -1, dtype=torch.long)
        for i in range(b):
            s_rows = torch.nonzero(s_labels[i].ne(-100)).squeeze(1).tolist()
            t_rows = torch.nonzero(t_labels[i].ne(-100)).squeeze(1).tolist()
            al = align_rows(s_ids[i, s_rows].tolist(), t_ids[i, t_rows].tolist(),
                            self.s_tok, self.t_tok, self.tea2stu)
            for k, j in zip(s_rows, al):
                if j >= 0:
                    out[i, k] = i * t_t + t_rows[j]
        return out.reshape(-1)


# ---------------------------------------------------------------------------------------------
# the loss


class MinEDLoss(DistillLoss):
    """(1-α)·CE + α·Σ_mask D(aligned teacher ‖ student), D = forward KL officially."""

    method = "mined"
    needs_tokenizers = True
    needs_teacher_tail = False  # the mapped top-k target has no tail mass (_sparse_builder)

    def __init__(self, student_tokenizer, teacher_tokenizer, divergence_name: str = "fkl",
                 opts: DivergenceOptions | None = None, *, teacher_target: str = "auto",
                 stu2tea: str = "closest", **kw) -> None:
        super().__init__(**kw)
        self.divergence = canonical_divergence(divergence_name)
        self.opts = opts or DivergenceOptions(temperature=2.0)
        self.teacher_target = teacher_target
        self.vocab_map = build_vocab_map(student_tokenizer, teacher_tokenizer, stu2tea)
        self.mined_aligner = MinEDAligner(token_bytes(student_tokenizer)[0],
                                    token_bytes(teacher_tokenizer)[0], self.vocab_map.tea2stu.numpy())

    def partners(self, student: StudentBatch, teacher: TeacherSignal) -> Tensor:
        """(B*T_s,) flat teacher row aligned with each student row; -1 = one-hot target.
        The loader computes them in its workers (`aligned_rows`); else they are computed here."""
        if student.aligned_rows is not None:
            return student.aligned_rows
        s_ids = _need(student.input_ids, "student.input_ids")
        t_ids = _need(teacher.input_ids, "teacher.input_ids")
        part = self.mined_aligner(s_ids.cpu(), student.labels.cpu(), t_ids.cpu(), teacher.labels.cpu())
        return part.to(student.labels.device)

    def compute(self, student: StudentBatch, teacher: TeacherSignal | None):
        rows, to_logits = student.logit_rows()
        y = student.labels.reshape(-1)
        part = self.partners(student, teacher)
        v_s = student.vocab_size
        use_sparse = self.teacher_target == "sparse" or (
            self.teacher_target == "auto" and not teacher.has_dense)
        stu_ids, tea_ids = (t.to(y.device) for t in self.vocab_map.pairs())
        build = (self._sparse_builder(teacher, v_s) if use_sparse
                 else self._dense_builder(teacher, v_s, stu_ids, tea_ids))

        def fn(x: Tensor, yy: Tensor, pp: Tensor) -> Tensor:
            z = to_logits(x)
            kd = divergence(self.divergence, z, build(pp, yy), self.opts)
            return stack_terms(token_ce(z, yy), kd, token_hits(z, yy))

        mask = student.mask.reshape(-1)
        out = map_rows(fn, [rows, y, part], select=student.selection(), chunk_rows=self.chunk_rows,
                       vocab_size=max(v_s, teacher.vocab()))
        terms = {"accuracy": masked_sum(out[:, 2], mask).long(),
                 "aligned_tokens": (part >= 0).sum()}
        self.keep(partners=part.reshape(student.labels.shape))
        return masked_sum(out[:, 0], mask), masked_sum(out[:, 1], mask), terms

    def _dense_builder(self, teacher: TeacherSignal, v_s: int, stu_ids: Tensor, tea_ids: Tensor):
        def build(part: Tensor, labels: Tensor) -> Tensor:
            tgt = torch.full((part.shape[0], v_s), MASKED_LOGIT, device=part.device)
            aligned = part >= 0
            if aligned.any():
                zt = teacher.dense_rows(part[aligned])  # (n, V_t)
                sub = tgt[aligned]
                sub[:, stu_ids] = zt[:, tea_ids]
                tgt[aligned] = sub
            hot = torch.nonzero(~aligned).squeeze(1)
            tgt[hot, labels[hot].clamp(min=0)] = ONE_HOT_LOGIT
            return tgt

        return build

    def _sparse_builder(self, teacher: TeacherSignal, v_s: int):
        """Top-k teacher ids carried into the student vocabulary (unmapped ones dropped, the
        rest renormalised). With k = V_t and sparse_tail='bucket' this equals the dense path."""
        sp = teacher.sparse_target()
        ids_flat = sp.ids.reshape(-1, sp.ids.shape[-1])
        lp_flat = sp.logprobs.reshape(-1, sp.logprobs.shape[-1]).float()
        t2s = self.vocab_map.tea2stu.to(ids_flat.device)
        s2t = self.vocab_map.stu2tea.to(ids_flat.device)

        def build(part: Tensor, labels: Tensor) -> SparseTarget:
            aligned = part >= 0
            t_ids = ids_flat.index_select(0, part.clamp(min=0))
            lp = lp_flat.index_select(0, part.clamp(min=0))
            s_ids = t2s[t_ids]
            keep = s2t[s_ids].eq(t_ids) & aligned[:, None]
            lp = torch.where(keep, lp, torch.full_like(lp, -torch.inf))
            hot_ids = torch.zeros_like(s_ids)
            hot_ids[:, 0] = labels.clamp(min=0)
            hot_lp = torch.full_like(lp, -torch.inf)
            hot_lp[:, 0] = 0.0
            s_ids = torch.where(aligned[:, None], torch.where(keep, s_ids, 0), hot_ids)
            lp = torch.where(aligned[:, None], lp, hot_lp)
            # like the official -1e5 logits, teacher mass never lands outside the mapped ids:
            # tail 0 (bucket: the student's mass there is still penalised, as in the dense path)
            no_tail = torch.full((lp.shape[0],), -torch.inf, device=lp.device)
            return SparseTarget(s_ids, lp, v_s, no_tail)

        return build
