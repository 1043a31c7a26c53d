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
    src = CacheSource(tiny_cache, ["hidden"], cache_mb=0, use_mmap=False)  # zarr reads
    src.fetch(list(range(12)))
    assert len(src._lru) == 1  # at most one block kept
    mapped = CacheSource(tiny_cache, ["hidden"], cache_mb=0)
    mapped.fetch(list(range(12)))
    assert len(mapped._lru) == 0  # mapped shards are read row by row, nothing kept


def test_an_epoch_reads_each_token_row_once(tiny_cache):
    """Micro-batches drawn in shuffled order read exactly the per-token bytes of the cache."""
    from dskd.pipeline.train.loader import PlanConfig, global_micro_batches

    fields = ["hidden", "topk_ids", "topk_logprobs"]
    whole = CacheReader(tiny_cache, fields=fields)
    for s in whole.shards:
        whole.read_rows(s["index"], range(s["n_examples"]))
    src = CacheSource(tiny_cache, fields)
    plan = PlanConfig(batch_size=2, seed=4, shuffle_buffer=4, block_size=3)
    for _, rows in global_micro_batches(src.num_rows, plan, 0):
        src.fetch(rows)
    assert src.reader().bytes_read == whole.bytes_read > 0


def _fetch_build(rows, padding):
    return [r.example_id for r in rows], {"n": torch.tensor(len(rows))}


def test_each_shard_is_checksummed_once_per_node(tiny_cache, tmp_path, monkeypatch):
    """Two ranks of a node split the checksums; their DataLoader workers, over two epochs,
    check nothing again. Without the node check, a process checks each shard it opens."""
    import os

    from dskd.pipeline.cache import reader as reader_mod
    from dskd.pipeline.train.loader import BatchStream, PlanConfig

    log = tmp_path / "hashed.txt"
    real = reader_mod.hash_file

    def logged(path):  # forked workers inherit the patch and append to the same file
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {path}\n")
        return real(path)

    monkeypatch.setattr(reader_mod, "hash_file", logged)
    ranks = [CacheSource(tiny_cache, ["hidden"]) for _ in range(2)]
    hashed = [src.verify_node_share(r, 2) for r, src in enumerate(ranks)]
    files = [line.split()[1] for line in log.read_text().splitlines()]
    manifest = ranks[0].manifest
    expected = [str(tiny_cache / "shards" / s["name"] / rel) for s in manifest["shards"]
                for rel in s["files"]]
    assert sorted(files) == sorted(expected)  # every file once, no file twice
    assert sum(hashed) == sum(i["bytes"] for s in manifest["shards"] for i in s["files"].values())
    plan = PlanConfig(batch_size=2, seed=0, shuffle_buffer=4, block_size=3)
    stream = BatchStream(ranks[0], plan, 0, _fetch_build, num_workers=2)
    it = stream.steps()
    for _ in range(stream.total_steps(2)):
        next(it)
    assert len(log.read_text().splitlines()) == len(expected)
    fallback = CacheSource(tiny_cache, ["hidden"])  # no node check: lazily, once per shard
    fallback.fetch(list(range(12)) + list(range(12)))
    assert len(log.read_text().splitlines()) == 2 * len(expected)


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
