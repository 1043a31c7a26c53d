"""Data layer: schema detection, templates, ids, bad-row policy."""

import json
from pathlib import Path

import pytest

from dskd.pipeline.data import (
    DSKD_TEMPLATE,
    DSKD_TEMPLATE_WITH_INPUT,
    BadRows,
    DataError,
    detect_schema,
    iter_examples,
    load_examples,
    parse_field_map,
)


def write_jsonl(path: Path, rows) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.mark.parametrize("columns,schema", [
    ({"instruction", "context", "response", "category"}, "dolly"),
    ({"instruction", "input", "output"}, "alpaca"),
    ({"prompt", "output"}, "dskd"),
    ({"messages"}, "chat"),
    ({"id", "instruction", "instances", "motivation_app"}, "self-instruct"),
])
def test_detect_schema(columns, schema):
    assert detect_schema(columns) == schema


def test_unknown_schema_says_what_to_do():
    with pytest.raises(DataError, match="--field-map"):
        detect_schema({"question", "answer"})


def test_each_schema_loads_to_the_same_example(tmp_path):
    """Dolly, Alpaca and a field-mapped file with the same content render the same prompt and id."""
    dolly = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Add 2 and 3.", "context": "",
                                                "response": "5", "category": "math"}])
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}])
    mapped = write_jsonl(tmp_path / "m.jsonl", [{"q": "Add 2 and 3.", "a": "5"}])
    a, = load_examples(dolly)
    b, = load_examples(alpaca)
    c, = load_examples(mapped, field_map="instruction=q,response=a")
    assert a.prompt == b.prompt == c.prompt == DSKD_TEMPLATE.format(instruction="Add 2 and 3.")
    assert a.response == b.response == c.response == "5"
    assert a.id == b.id == c.id and len(a.id) == 16


def test_context_uses_the_input_template(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Who?", "context": "Ann ran.", "response": "Ann"}])
    ex, = load_examples(p)
    assert ex.prompt == DSKD_TEMPLATE_WITH_INPUT.format(instruction="Who?", input="Ann ran.")


def test_dskd_schema_keeps_rendered_prompt_and_reference_list(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "Q:<n>name a color<n>A:", "output": ["red", "blue"]}])
    ex, = load_examples(p)
    assert ex.prompt == "Q:\nname a color\nA:"
    assert ex.response == "red" and ex.references == ("red", "blue")


def test_chat_schema_with_template_none(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "hello"}]}])
    ex, = load_examples(p, template="none")
    assert ex.prompt == "hi" and ex.response == "hello"


def test_chat_template_uses_the_tokenizer(shared_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / "qwen2")
    ex = load_examples(shared_dir / "data" / "self_instruct_user_oriented.jsonl", template="chat",
                       tokenizer=tok, limit=1)[0]
    assert ex.prompt.startswith("<|im_start|>system") and ex.prompt.endswith("<|im_start|>assistant\n")


def test_self_instruct_real_file_loads(shared_dir):
    path = shared_dir / "data" / "self_instruct_user_oriented.jsonl"
    exs = load_examples(path)
    rows = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    assert len(exs) == rows > 0 and len({e.id for e in exs}) == rows
    assert all(e.references and e.response == e.references[0] for e in exs)


def test_parquet_and_csv_through_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"instruction": ["a", "b"], "context": ["", ""], "response": ["x", "y"]}
    pq.write_table(pa.table(rows), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("instruction,input,output\na,,x\nb,,y\n")
    assert [e.response for e in load_examples(tmp_path / "d.parquet")] == ["x", "y"]
    assert [e.response for e in load_examples(tmp_path / "d.csv")] == ["x", "y"]


def test_hf_dataset_dir(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"instruction": ["a"], "response": ["x"]}).save_to_disk(tmp_path / "ds")
    assert load_examples(tmp_path / "ds")[0].response == "x"


def test_ids_are_stable_and_duplicates_distinct(tmp_path):
    row = {"instruction": "I", "response": "R"}
    p = write_jsonl(tmp_path / "d.jsonl", [row, row, {"instruction": "I ", "response": "R"}])
    ids = [e.id for e in load_examples(p)]
    assert ids[1] == ids[0] + "-1" and ids[2] != ids[0]  # whitespace is normalized away, yet the
    assert ids[2].startswith(ids[0])  # third row is a duplicate in content -> a suffix too
    assert ids == [e.id for e in load_examples(p)]


BAD_ROWS = [
    ({"instruction": "ok", "response": "fine"}, None),
    ({"instruction": "", "response": "x"}, "field 'instruction' is empty"),
    ({"instruction": "x"}, "missing field 'response'"),
    ({"instruction": 3, "response": "x"}, "field 'instruction' is int"),
    ('{"instruction": "x", "response": ', "invalid JSON"),
    (b'{"instruction": "\xff\xfe", "response": "x"}', "invalid UTF-8"),
    ({"instruction": "x", "response": None}, "missing field 'response'"),
]


def _write_bad(tmp_path):
    p = tmp_path / "bad.jsonl"
    with p.open("wb") as f:
        for r, _ in BAD_ROWS:
            f.write(r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode())
            f.write(b"\n")
    return p


def test_bad_row_error_names_file_and_row(tmp_path):
    p = _write_bad(tmp_path)
    with pytest.raises(DataError, match=r"bad\.jsonl: row 1: field 'instruction' is empty.*--on-bad-row skip"):
        load_examples(p)


def test_bad_row_skip_reports_every_bad_row(tmp_path):
    p = _write_bad(tmp_path)
    bad = BadRows(str(p), "skip")
    exs = load_examples(p, bad_rows=bad)
    assert [e.row for e in exs] == [0]
    assert [s["row"] for s in bad.skipped] == [1, 2, 3, 4, 5, 6]
    for s, (_, reason) in zip(bad.skipped, BAD_ROWS[1:]):
        assert reason in s["reason"]
    report = bad.write_report(tmp_path / "out")
    assert [json.loads(x)["row"] for x in report.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_load_examples_is_iter_examples_as_a_list(tmp_path):
    """One signature: load_examples passes its options to iter_examples (an unknown one is a
    TypeError at the call, as before)."""
    p = _write_bad(tmp_path)
    a, b = BadRows(str(p), "skip"), BadRows(str(p), "skip")
    assert load_examples(p, template="none", limit=3, bad_rows=a) == list(
        iter_examples(p, template="none", limit=3, bad_rows=b))
    assert a.skipped == b.skipped
    with pytest.raises(TypeError, match="templat"):
        load_examples(p, templat="none")


def test_empty_file_and_missing_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="no examples"):
        load_examples(tmp_path / "e.jsonl")
    with pytest.raises(DataError, match="not found"):
        load_examples(tmp_path / "nope.jsonl")


def test_field_map_errors():
    with pytest.raises(DataError, match="unknown field"):
        parse_field_map("question=q")
    with pytest.raises(DataError, match="canonical=column"):
        parse_field_map("instruction")


def test_probs_round_trip_through_loading(tmp_path):
    """The toy world's true distribution reaches Example.probs, in the references' order."""
    from dskd.pipeline.toyworld.tasks import toy_examples

    rows = toy_examples(40, seed=0)
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples(path)
    assert [list(e.probs) for e in examples] == [r["probs"] for r in rows]
    assert [list(e.references) for e in examples] == [r["references"] for r in rows]
    assert any(len(e.probs) > 1 for e in examples) and any(e.probs == (1.0,) for e in examples)
    # probs are not part of the id: the same texts with and without them are the same example
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "probs"}) + "\n"
                            for r in rows))
    assert [e.id for e in load_examples(bare)] == [e.id for e in examples]
    assert all(e.probs is None for e in load_examples(bare))


@pytest.mark.parametrize("probs, why", [
    ([0.5], "1 values for 2 references"),
    ([0.7, 0.6], "sum in \\(0, 1\\]"),
    ([1.2, -0.2], "probabilities in \\[0, 1\\]"),
    (["a", "b"], "list of numbers"),
])
def test_bad_probs_name_the_row(tmp_path, probs, why):
    path = tmp_path / "bad.jsonl"
    row = {"instruction": "Name one color.", "response": "red", "references": ["red", "blue"],
           "probs": probs}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=f"row 0: .*{why}"):
        load_examples(path)
