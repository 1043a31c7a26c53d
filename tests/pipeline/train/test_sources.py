import dataclasses

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from dskd.pipeline.cache.reader import CacheReader
from dskd.pipeline.cache.spec import CacheError
from dskd.pipeline.data import load_examples
from dskd.pipeline.tokenize import model_inputs, tokenize_text
from dskd.pipeline.train.sources import (
    AlignmentError,
    BatchBuilder,
    CacheSource,
    ExampleSource,
    check_row,
    check_shards_present,
)


def test_cache_source_addresses_rows_across_shards(tiny_cache):
    src = CacheSource(tiny_cache, ["hidden"])
    assert src.num_rows == 12 and [n for *_, n in src.shards] == [5, 5, 2]
    reader = CacheReader(tiny_cache, fields=["hidden"])
    order = [11, 0, 7, 5, 4, 6]
    got = src.fetch(order)
    assert [(g.shard, g.row) for g in got] == [(2, 1), (0, 0), (1, 2), (1, 0), (0, 4), (1, 1)]
    for g in got:
        ref = reader.at(g.shard, g.row)
        assert g.example_id == ref.example_id and np.array_equal(g.hidden, ref.hidden)


def test_block_lru_stays_within_its_budget(tiny_cache):
    src = CacheSource(tiny_cache, ["hidden"], cache_mb=0)  # at most one block kept
    src.fetch(list(range(12)))
    assert len(src._lru) == 1


def test_builder_tokenizes_for_the_student_and_collates_the_teacher(tiny_cache, toy_world):
    tok = AutoTokenizer.from_pretrained(toy_world.student_xvocab)
    src = CacheSource(tiny_cache, ["hidden", "topk_ids"])
    rows = src.fetch([3, 8])
    ids, t = BatchBuilder(tok, 256, 512, teacher_fields=("hidden", "topk_ids"))(rows, False)
    assert ids == [r.example_id for r in rows]
    for b, r in enumerate(rows):
        s = tokenize_text(r.example_id, r.prompt, r.response, tok, 256, 512)
        x, y = model_inputs(s)
        assert t["input_ids"][b, :len(x)].tolist() == x and t["labels"][b, :len(y)].tolist() == y
        n = len(r.input_ids) - 1
        assert t["teacher_input_ids"][b, :n].tolist() == r.input_ids[:-1].tolist()
        assert torch.equal(t["teacher_hidden"][b, :n], torch.from_numpy(r.hidden))
        assert t["teacher_hidden"][b, n:].abs().sum() == 0
    assert t["teacher_topk_ids"].dtype == torch.long
    _, padded = BatchBuilder(tok, 256, 512)(rows[:1], True)
    assert (padded["labels"] == -100).all()  # a padding row counts for nothing


def test_uld_pads_student_and_teacher_to_one_length(tiny_cache, toy_world):
    tok = AutoTokenizer.from_pretrained(toy_world.student_xvocab)
    _, t = BatchBuilder(tok, 256, 512, same_length=True)(CacheSource(tiny_cache, []).fetch([0, 1]),
                                                          False)
    assert t["input_ids"].shape == t["teacher_input_ids"].shape


def test_a_row_whose_text_or_token_rows_disagree_is_named(tiny_cache, toy_world):
    tok = AutoTokenizer.from_pretrained(toy_world.student)
    row = CacheSource(tiny_cache, ["hidden"]).fetch([2])[0]
    student = tokenize_text(row.example_id, row.prompt, row.response, tok)
    check_row(row, student)
    other = dataclasses.replace(student, text=student.text + "x")
    with pytest.raises(AlignmentError, match=f"example '{row.example_id}' \\(shard 0, row 2\\)"):
        check_row(row, other)
    short = dataclasses.replace(row, hidden=row.hidden[:-1])
    with pytest.raises(AlignmentError, match="hidden has"):
        check_row(short, student)


def test_example_source_for_data_files(toy_world):
    exs = load_examples(toy_world.valid, limit=5)
    src = ExampleSource(exs)
    assert src.num_rows == 5 and [e.id for e in src.fetch([4, 0])] == [exs[4].id, exs[0].id]


def test_unreadable_shard_is_named_when_read(tiny_cache, tmp_path):
    import shutil

    bad = tmp_path / "cache"
    shutil.copytree(tiny_cache, bad)
    check_shards_present(bad, CacheReader(bad).manifest)
    src = CacheSource(bad, ["hidden"])
    (bad / "shards" / "shard-00001" / "examples.arrow").write_bytes(b"not arrow")
    with pytest.raises(CacheError, match="shard-00001"):
        check_shards_present(bad, src.manifest)
    with pytest.raises(CacheError, match="shard shard-00001 is corrupt: examples.arrow"):
        src.fetch([6])
