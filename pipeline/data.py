"""Instruction datasets → ``Example`` records with a stable id, a rendered prompt and references.

Sources: local JSONL / JSON / Parquet / CSV files and HF ``datasets`` directories (``save_to_disk``)
through ``datasets``, plus hub ids when a network exists. JSONL is read line by line instead:
``datasets``' JSON builder infers one Arrow schema per file and fails the whole file on one bad row
(bad UTF-8, a number where text was expected) without naming it, and bad rows must be named.

Schemas are detected from column names, or given with ``--field-map`` (canonical=column,...):

=============  =====================================================  ===========================
schema         columns                                                 canonical fields
=============  =====================================================  ===========================
dolly          instruction, context?, response, references?, probs?    instruction, context, response
alpaca         instruction, input?, output                             instruction, context, response
dskd           prompt (already rendered), output (str or list)         prompt, response
chat           messages [{role, content}], last one the assistant's    messages
self-instruct  instruction, instances [{input, output}]                instruction, context, response
=============  =====================================================  ===========================

``probs`` (optional, any schema through ``--field-map``) is the true probability of each
reference given the prompt, in the references' order: data that knows its answer distribution
(the toy world does) gets exact metrics against the truth in eval (``pipeline/truth.py``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import atomic_write_text

OnBadRow = Literal["error", "skip"]
Template = Literal["dskd", "chat", "none"]

# DSKD's data comes from MiniLLM's Dolly processing; these are its two prompt templates.
DSKD_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
DSKD_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

SCHEMAS: dict[str, dict[str, str]] = {
    # canonical field -> source column
    "dolly": {"instruction": "instruction", "context": "context", "response": "response",
              "references": "references", "probs": "probs"},
    "alpaca": {"instruction": "instruction", "context": "input", "response": "output"},
    "dskd": {"prompt": "prompt", "response": "output"},
    "chat": {"messages": "messages"},
    "self-instruct": {"instruction": "instruction", "instances": "instances"},
}
# Columns that must be present for a schema to be recognised.
_REQUIRED = {
    "dolly": {"instruction", "response"},
    "alpaca": {"instruction", "output"},
    "dskd": {"prompt", "output"},
    "chat": {"messages"},
    "self-instruct": {"instruction", "instances"},
}
CANONICAL = ("instruction", "context", "response", "references", "probs", "prompt", "messages",
             "instances")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, the row and what to do."""


@dataclass(frozen=True)
class Example:
    """One instruction example. ``prompt`` is fully rendered (template applied)."""

    id: str
    prompt: str
    response: str
    references: tuple[str, ...]
    row: int  # 0-based row number in the source file
    probs: tuple[float, ...] | None = None  # true p(reference | prompt), when the data knows it


@dataclass
class BadRows:
    """The bad-row policy: raise on the first bad row, or skip it and keep a record of each."""

    source: str
    mode: OnBadRow = "error"
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def handle(self, row: int, reason: str, raw: Any = None) -> None:
        if self.mode == "error":
            raise DataError(
                f"{self.source}: row {row}: {reason}. Fix the row, or pass --on-bad-row skip "
                "to skip bad rows (each is listed in skipped_rows.jsonl)."
            )
        preview = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=repr)
        self.skipped.append({"source": self.source, "row": row, "reason": reason,
                             "preview": (preview or "")[:200]})

    def write_report(self, out_dir: str | Path) -> Path | None:
        """``skipped_rows.jsonl`` next to the stage's outputs; None when nothing was skipped."""
        if not self.skipped:
            return None
        path = Path(out_dir) / "skipped_rows.jsonl"
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.skipped)
        atomic_write_text(path, lines)
        return path


# --------------------------------------------------------------------------- reading rows

@dataclass(frozen=True)
class Unreadable:
    """A row that could not even be parsed; handled in row order with the other bad rows."""

    reason: str
    preview: str


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield i, Unreadable(f"invalid UTF-8 at byte {e.start}",
                                    line[:200].decode("utf-8", "replace"))
                continue
            try:
                yield i, json.loads(text)
            except json.JSONDecodeError as e:
                yield i, Unreadable(f"invalid JSON ({e.msg} at column {e.colno})", text)


def _read_with_datasets(path: str) -> Iterator[tuple[int, Any]]:
    import datasets

    datasets.disable_progress_bars()
    p = Path(path)
    try:
        if p.is_dir():
            if (p / "dataset_info.json").exists() or (p / "state.json").exists():
                ds = datasets.load_from_disk(str(p))
            else:
                ds = datasets.load_dataset(str(p), split="train")
        elif p.exists():
            kind = {".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(p.suffix.lower())
            if kind is None:
                raise DataError(f"{p}: unsupported file type {p.suffix!r}; use .jsonl, .json, "
                                ".parquet, .csv or a `datasets` directory")
            ds = datasets.load_dataset(kind, data_files=str(p), split="train")
        else:
            ds = datasets.load_dataset(path, split="train")  # a hub id, when a network exists
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{path}: not found ({e}). Give a local file or dataset directory.") from None
    except Exception as e:  # noqa: BLE001 (datasets raises many types; say file and reason)
        raise DataError(f"{path}: could not be read by `datasets`: {type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    yield from enumerate(ds)


def read_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(row number, raw row or ``Unreadable``) pairs from any supported source."""
    p = Path(path)
    if p.suffix.lower() == ".jsonl" or (p.suffix.lower() == ".json" and _looks_like_jsonl(p)):
        if not p.is_file():
            raise DataError(f"{p}: file not found. Check the path given to --data.")
        yield from _read_jsonl(p)
    else:
        yield from _read_with_datasets(str(path))


def _looks_like_jsonl(p: Path) -> bool:
    if not p.is_file():
        return False
    with p.open("rb") as f:
        head = f.read(1).lstrip()
    return head == b"{"


# --------------------------------------------------------------------------- schemas

def parse_field_map(spec: str | None) -> dict[str, str] | None:
    """``"instruction=question,response=answer"`` → ``{"instruction": "question", ...}``."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        if "=" not in part:
            raise DataError(f"--field-map {spec!r}: expected canonical=column pairs separated by ','")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in CANONICAL:
            raise DataError(f"--field-map: unknown field {k!r}; canonical fields are {list(CANONICAL)}")
        out[k] = v
    return out


def detect_schema(columns: set[str]) -> str:
    for name, required in _REQUIRED.items():
        if required <= columns:
            return name
    raise DataError(
        f"cannot recognise the schema of columns {sorted(columns)}; expected one of "
        + "; ".join(f"{k}: {sorted(v)}" for k, v in _REQUIRED.items())
        + ". Pass --field-map, e.g. --field-map instruction=question,response=answer"
    )


def _text(row: int, name: str, value: Any, required: bool) -> str:
    if value is None:
        if required:
            raise _Bad(f"missing field {name!r}")
        return ""
    if not isinstance(value, str):
        raise _Bad(f"field {name!r} is {type(value).__name__}, expected a string")
    if required and not value.strip():
        raise _Bad(f"field {name!r} is empty")
    if "\ufffd" in value:
        raise _Bad(f"field {name!r} contains invalid UTF-8 (U+FFFD replacement characters)")
    return value


class _Bad(Exception):
    pass


def _probs(value: Any, n_refs: int) -> tuple[float, ...] | None:
    """True reference probabilities: one per reference, each ≥ 0, summing to at most 1."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(
            isinstance(p, (int, float)) and not isinstance(p, bool) for p in value):
        raise _Bad("field 'probs' must be a list of numbers, one per reference")
    if len(value) != n_refs:
        raise _Bad(f"field 'probs' has {len(value)} values for {n_refs} references; "
                   "give one probability per reference, in the same order")
    if not all(0.0 <= p <= 1.0 for p in value) or not 0.0 < sum(value) <= 1.0 + 1e-6:
        raise _Bad(f"field 'probs' must be probabilities in [0, 1] with a sum in (0, 1] "
                   f"(sum {sum(value):.6g})")
    return tuple(float(p) for p in value)


def _canonical(raw: Any, fmap: dict[str, str], row: int) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _Bad(f"row is a {type(raw).__name__}, expected an object")
    get = {k: raw.get(col) for k, col in fmap.items()}
    if "instances" in get and get["instances"] is not None:  # self-instruct: one or more instances
        inst = get.pop("instances")
        if not isinstance(inst, list) or not inst or not all(isinstance(i, dict) for i in inst):
            raise _Bad("field 'instances' must be a non-empty list of {input, output} objects")
        get["context"] = inst[0].get("input", "")
        get["references"] = [i.get("output") for i in inst]
        get["response"] = get["references"][0]
    if get.get("messages") is not None:
        msgs = get["messages"]
        if (not isinstance(msgs, list) or len(msgs) < 2
                or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs)):
            raise _Bad("field 'messages' must be a list of ≥ 2 {role, content} objects")
        if msgs[-1].get("role") != "assistant":
            raise _Bad("the last message must have role 'assistant' (it is the response)")
        get["response"] = msgs[-1]["content"]
    resp = get.get("response")
    if isinstance(resp, list):  # DSKD/MiniLLM: output may be a list of references
        get["references"] = resp
        get["response"] = resp[0] if resp else None
    return get


def _normalize(s: str) -> str:
    return unicodedata.normalize("NFC", s).strip()


def _schema_of(rows: Iterator[tuple[int, Any]], head: list[tuple[int, Any]]) -> dict[str, str]:
    """The schema of the first row that matches one; rows before it that don't are bad rows.
    Reads ``rows`` only up to that row, keeping what it read in ``head`` for the caller."""
    columns: set[str] = set()
    for row, raw in rows:
        head.append((row, raw))
        if isinstance(raw, dict):
            try:
                return SCHEMAS[detect_schema(set(raw))]
            except DataError:
                columns |= set(raw)
    return SCHEMAS[detect_schema(columns)]  # raises, naming the columns seen


def example_id(fields: dict[str, Any]) -> str:
    """16-hex sha256 of the normalized source fields: stable across reloads and machines."""
    norm = {k: (_normalize(v) if isinstance(v, str) else
                [(_normalize(x) if isinstance(x, str) else x) for x in v] if isinstance(v, list) else v)
            for k, v in sorted(fields.items()) if v not in (None, "", [])}
    blob = json.dumps(norm, ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def render_prompt(fields: dict[str, Any], template: Template,
                  chat_template: Callable[[list[dict[str, str]]], str] | None = None) -> str:
    """The prompt text the model sees, before the response."""
    if fields.get("prompt"):
        # DSKD/MiniLLM files store prompts already rendered, with "<n>" for newlines.
        return fields["prompt"].replace("<n>", "\n")
    if template == "chat":
        if chat_template is None:
            raise DataError("--template chat needs a tokenizer with a chat template")
        msgs = fields.get("messages")
        if msgs:
            history = [{"role": m.get("role", "user"), "content": m["content"]} for m in msgs[:-1]]
        else:
            user = fields["instruction"] + (("\n\n" + fields["context"]) if fields.get("context") else "")
            history = [{"role": "user", "content": user}]
        return chat_template(history)
    if fields.get("messages"):
        msgs = fields["messages"][:-1]
        body = "\n\n".join(m["content"] for m in msgs)
        return body if template == "none" else DSKD_TEMPLATE.format(instruction=body)
    instruction, context = fields["instruction"], fields.get("context") or ""
    if template == "none":
        return instruction + (("\n\n" + context) if context else "")
    if context.strip():
        return DSKD_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=context)
    return DSKD_TEMPLATE.format(instruction=instruction)


def hf_chat_template(tokenizer: Any) -> Callable[[list[dict[str, str]]], str]:
    """Adapter: a tokenizer's chat template, rendered as text with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"--template chat: tokenizer {getattr(tokenizer, 'name_or_path', '')!r} "
                        "has no chat template; use --template dskd or none")

    def render(history: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)

    return render


def load_examples(path: str | Path, **options: Any) -> list[Example]:
    """Load, validate and render a dataset: ``iter_examples(path, **options)`` as a list (the
    options are its keywords, described there)."""
    return list(iter_examples(path, **options))


def iter_examples(
    path: str | Path,
    *,
    field_map: dict[str, str] | str | None = None,
    template: Template = "dskd",
    on_bad_row: OnBadRow = "error",
    tokenizer: Any = None,
    limit: int | None = None,
    bad_rows: BadRows | None = None,
) -> Iterator[Example]:
    """Load, validate and render a dataset, one example at a time (``load_examples``: all at once).

    The file is read as the examples are taken, so a pass over a dataset of any size holds one
    row (plus one id per distinct example, to number duplicates). Bad rows raise or are recorded
    in ``bad_rows`` when reached; the empty-dataset errors come at the end. ``tokenizer`` is only
    needed for ``template="chat"``. Pass your own ``bad_rows`` to get the skipped rows back
    (``bad_rows.write_report(out_dir)``).
    """
    bad = bad_rows or BadRows(str(path), on_bad_row)
    fmap = parse_field_map(field_map) if isinstance(field_map, str) else field_map
    chat = hf_chat_template(tokenizer) if template == "chat" else None
    n = 0
    seen: dict[str, int] = {}
    rows = read_rows(path)
    head: list[tuple[int, Any]] = []
    if fmap is None:
        try:
            first = next(rows)
        except StopIteration:
            raise DataError(f"{path}: no examples found (the file is empty)") from None
        schema_map = _schema_of(itertools.chain([first], rows), head)
    else:
        schema_map = fmap
    for row, raw in itertools.chain(head, rows):
        if limit is not None and n >= limit:
            break
        if isinstance(raw, Unreadable):
            bad.handle(row, raw.reason, raw.preview)
            continue
        try:
            f = _canonical(raw, schema_map, row)
            prompt_src = _text(row, "prompt", f.get("prompt"), False)
            if not prompt_src and not f.get("messages"):
                _text(row, "instruction", f.get("instruction"), True)
                _text(row, "context", f.get("context"), False)
            response = _text(row, "response", f.get("response"), True)
            refs = f.get("references") or [response]
            if not isinstance(refs, list):
                raise _Bad("field 'references' must be a list of strings")
            refs = [_text(row, "references", r, True) for r in refs]
            probs = _probs(f.get("probs"), len(refs))
            prompt = render_prompt(f, template, chat)
            if not prompt.strip():
                raise _Bad("the rendered prompt is empty")
        except _Bad as e:
            bad.handle(row, str(e), raw)
            continue
        eid = example_id({k: v for k, v in f.items() if k not in ("references", "probs")}
                         | {"references": refs})
        if eid in seen:  # exact duplicate rows keep distinct, still deterministic ids
            seen[eid] += 1
            eid = f"{eid}-{seen[eid]}"
        else:
            seen[eid] = 0
        n += 1
        yield Example(eid, prompt, response, tuple(refs), row, probs)
    if not n and not bad.skipped:
        raise DataError(f"{path}: no examples found (the file is empty)")
    if not n:
        raise DataError(f"{path}: every row was bad ({len(bad.skipped)} skipped); nothing to use")
