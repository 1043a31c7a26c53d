"""How many label tokens Exact Token Alignment pairs up: the official string rule vs offsets.

    python benchmarks/alignment.py [--shared ../shared] [--limit N]

Real tokenizers (../shared/tokenizers: GPT-2, Qwen2, Mistral) on real text: the prompts and
responses of ../shared/data/self_instruct_user_oriented.jsonl (used here only to count aligned
tokens, never to train), tokenized the way the pipeline does (pipeline/tokenize.py: the template,
EOS appended). For each student ← teacher pair, the share of student label tokens (response +
EOS) that get a teacher partner, over all rows and split by rows whose response is plain ASCII
on one line vs rows with a newline or a non-ASCII character. Prints a Markdown table
(docs/methods.md keeps the last one).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAIRS = [("gpt2", "qwen2"), ("gpt2", "mistral"), ("qwen2", "mistral"), ("mistral", "gpt2")]
DATA = "data/self_instruct_user_oriented.jsonl"


def plain(text: str) -> bool:
    """One line of ASCII: where the official rule is expected to lose nothing."""
    return text.isascii() and "\n" not in text


def count(rows: list[dict], student: str, teacher: str, shared: Path) -> dict[str, list[int]]:
    """Per subset: [student label tokens, aligned official, aligned offsets]."""
    from transformers import AutoTokenizer

    from dskd.pipeline.data import render_prompt
    from dskd.pipeline.token_align import Aligner, label_tokens
    from dskd.pipeline.tokenize import tokenize_text

    s_tok = AutoTokenizer.from_pretrained(str(shared / "tokenizers" / student))
    t_tok = AutoTokenizer.from_pretrained(str(shared / "tokenizers" / teacher))
    rules = {r: Aligner(s_tok, t_tok, r) for r in ("official", "offsets")}
    out = {"all": [0, 0, 0], "plain": [0, 0, 0], "newline/non-ASCII": [0, 0, 0]}
    for row in rows:
        inst = row["instances"][0]
        prompt = render_prompt({"instruction": row["instruction"], "context": inst["input"]},
                               "dskd")
        s = tokenize_text(row["id"], prompt, inst["output"], s_tok, 256, 1024)
        t = tokenize_text(row["id"], prompt, inst["output"], t_tok, 256, 1024)
        got = [len(s.input_ids) - s.prompt_len]
        for rule in ("official", "offsets"):
            pairs = rules[rule](label_tokens(t.input_ids, t.prompt_len, t.offsets),
                                label_tokens(s.input_ids, s.prompt_len, s.offsets), s.text)
            got.append(len(pairs[0]))
        for key in ("all", "plain" if plain(inst["output"]) else "newline/non-ASCII"):
            out[key] = [a + b for a, b in zip(out[key], got)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.environ.get("DSKD_SHARED_DIR", "../shared"))
    ap.add_argument("--limit", type=int, default=None, help="first N rows only")
    args = ap.parse_args()
    shared = Path(args.shared)
    rows = [json.loads(x) for x in (shared / DATA).read_text(encoding="utf-8").splitlines()]
    rows = rows[: args.limit] if args.limit else rows
    n_plain = sum(plain(r["instances"][0]["output"]) for r in rows)
    print(f"{len(rows)} rows of {DATA} ({n_plain} plain one-line ASCII responses)\n")
    print("| student ← teacher | rows | student label tokens | aligned: official | "
          "aligned: offsets | gain |")
    print("|---|---|---|---|---|---|")
    for student, teacher in PAIRS:
        res = count(rows, student, teacher, shared)
        for subset, (n, off, new) in res.items():
            print(f"| {student} ← {teacher} ({subset}) | "
                  f"{len(rows) if subset == 'all' else (n_plain if subset == 'plain' else len(rows) - n_plain)} | "
                  f"{n} | {off} ({100 * off / max(n, 1):.1f}%) | {new} ({100 * new / max(n, 1):.1f}%) | "
                  f"{new - off:+d} |")


if __name__ == "__main__":
    main()
