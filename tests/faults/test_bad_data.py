"""Fault suite, bad data: property-based rows through the bad-row policy.

Each generated row is good or bad *by construction*; the policy must skip exactly the bad rows,
report exactly them, and in error mode stop at the first one, naming it.
"""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dskd.pipeline.data import BadRows, DataError, load_examples
from dskd.pipeline.tokenize import tokenize_all

pytestmark = pytest.mark.faults

# Text users really send: any unicode (control characters, emoji, CJK, huge strings) except lone
# surrogates (not encodable) and U+FFFD (treated as a sign of undecodable input, see data.py).
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"),
               min_size=0, max_size=40).filter(lambda s: s.strip() != "")
huge = st.integers(5_000, 50_000).map(lambda n: "lorem ipsum " * (n // 12))
good_text = st.one_of(text, huge)
non_string = st.one_of(st.integers(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.booleans())


@st.composite
def good_row(draw):
    row = {"instruction": draw(good_text), "response": draw(good_text)}
    if draw(st.booleans()):
        row["context"] = draw(st.one_of(st.just(""), good_text))
    if draw(st.booleans()):  # extra fields are ignored
        row[draw(st.sampled_from(["category", "extra", "meta"]))] = draw(st.one_of(text, st.integers()))
    return json.dumps(row, ensure_ascii=draw(st.booleans())).encode("utf-8")


@st.composite
def bad_row(draw):
    base = {"instruction": "Say hello.", "response": "Hello."}
    kind = draw(st.sampled_from(["missing", "none", "empty", "nonstring", "utf8", "json"]))
    field = draw(st.sampled_from(["instruction", "response"]))
    if kind == "missing":
        del base[field]
    elif kind == "none":
        base[field] = None
    elif kind == "empty":
        base[field] = draw(st.sampled_from(["", " ", "\n\t "]))
    elif kind == "nonstring":
        base[field] = draw(non_string)
    elif kind == "utf8":
        raw = json.dumps(base).encode()
        cut = raw.index(b"Hello")
        return raw[:cut] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\x80"])) + raw[cut:]
    else:
        return json.dumps(base).encode()[: draw(st.integers(1, 20))]
    return json.dumps(base).encode()


rows_strategy = st.lists(st.tuples(st.booleans(), st.data()), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(good_row().map(lambda r: (True, r)), bad_row().map(lambda r: (False, r))),
                min_size=1, max_size=12))
def test_skip_policy_skips_and_reports_exactly_the_bad_rows(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("bad") / "rows.jsonl"
    path.write_bytes(b"".join(r + b"\n" for _, r in rows))
    good_idx = [i for i, (ok, _) in enumerate(rows) if ok]
    bad_idx = [i for i, (ok, _) in enumerate(rows) if not ok]
    bad = BadRows(str(path), "skip")
    if not good_idx:  # nothing usable: a clear error (no schema, or every row bad), never []
        with pytest.raises(DataError, match="every row was bad|cannot recognise the schema"):
            load_examples(path, bad_rows=bad)
        return
    exs = load_examples(path, bad_rows=bad)
    assert [e.row for e in exs] == good_idx
    assert [s["row"] for s in bad.skipped] == bad_idx
    if bad_idx:  # error mode stops at the first bad row and names it
        with pytest.raises(DataError, match=rf"row {bad_idx[0]}:"):
            load_examples(path, on_bad_row="error")


def test_prompt_longer_than_the_limit_is_skipped_and_reported(tmp_path, shared_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / "gpt2")
    rows = [{"instruction": "short", "response": "ok"},
            {"instruction": "word " * 400, "response": "ok"},
            {"instruction": "also short", "response": "fine"}]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad = BadRows(str(p), "skip")
    exs = load_examples(p, bad_rows=bad)
    toks = tokenize_all(exs, tok, max_prompt_len=300, max_len=200, bad=bad)
    assert [t.example_id for t in toks] == [exs[0].id, exs[2].id]
    assert [s["row"] for s in bad.skipped] == [1] and "no room" in bad.skipped[0]["reason"]
    with pytest.raises(DataError, match="row 1: the prompt"):
        tokenize_all(exs, tok, max_prompt_len=300, max_len=200, bad=BadRows(str(p), "error"))
