"""cache_rows: the plan pass (split over ranks) and per-shard streaming tokenization."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dskd.pipeline.cache import spec
from dskd.pipeline.cache.fingerprint import dataset_fingerprint
from dskd.pipeline.cache_rows import RowSource, plan_rows, shard_examples
from dskd.pipeline.data import BadRows, DataError, load_examples
from dskd.pipeline.tokenize import tokenize_example

LONG = 1, 6  # rows whose prompt leaves no room for the response at max_len 64


@pytest.fixture(scope="module")
def tok(shared_dir):
    return AutoTokenizer.from_pretrained(shared_dir / "tokenizers" / "gpt2")


@pytest.fixture
def data(tmp_path) -> Path:
    rows = [{"instruction": ("word " * 100 if i in LONG else f"say {i}"), "response": f"ok {i}"}
            for i in range(11)]
    rows.insert(3, {"instruction": "", "response": "x"})  # does not parse: row 3
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@dataclass(frozen=True)
class Counting(RowSource):
    """A RowSource that records which examples it tokenizes."""

    seen: list = field(default_factory=list, compare=False)

    def tokenize(self, ex):
        self.seen.append(ex.row)
        return super().tokenize(ex)


def _src(data, tok, **kw):
    return Counting(str(data), tok, max_prompt_len=64, max_len=64, **kw)


def test_plan_matches_tokenizing_everything(data, tok):
    bad = BadRows(str(data), "skip")
    plan = plan_rows(_src(data, tok), bad)
    exs = load_examples(data, bad_rows=BadRows(str(data), "skip"))
    kept = [e for e in exs if e.row not in (1, 7)]  # file rows of the long prompts (row 3 inserted)
    assert plan.n_examples == len(kept) == 9
    assert plan.fingerprint == dataset_fingerprint((e.id, e.prompt, e.response) for e in kept)
    assert [s["row"] for s in bad.skipped] == [3, 1, 7]  # parse failures first, as before
    assert "no room" in bad.skipped[1]["reason"]


def test_ranks_split_the_check_and_agree(data, tok):
    """Two ranks (the gather simulated): each tokenizes half of the examples, both end with the
    one-rank plan and the same skipped rows."""
    one = plan_rows(_src(data, tok), BadRows(str(data), "skip"))
    shares: dict[int, list] = {}

    def gather_for(rank):
        def gather(obj):
            shares[rank] = obj
            return [shares.get(0, []), shares.get(1, [])]
        return gather

    srcs = [_src(data, tok), _src(data, tok)]
    plan_rows(srcs[1], BadRows(str(data), "skip"), 1, 2, gather_for(1))  # publishes rank 1's part
    plans, bads = [], []
    for r in (0, 1):
        bads.append(BadRows(str(data), "skip"))
        plans.append(plan_rows(_src(data, tok), bads[-1], r, 2, gather_for(r)))
    assert plans[0] == plans[1] == one
    assert bads[0].skipped == bads[1].skipped
    assert sorted(srcs[1].seen) == [1, 4, 6, 8, 10]  # every other parsed example: j = 1, 3, 5, ...


def test_error_mode_names_the_first_failing_row_on_every_rank(data, tok):
    data.write_text("\n".join(line for i, line in enumerate(data.read_text().splitlines())
                              if i != 3) + "\n")  # no parse failure left: long prompts at rows 1, 6
    shares: dict[int, list] = {}
    for r in (0, 1):  # what each rank contributes (rank 0 checks j = 0, 2, ..., so row 6)
        plan_rows(_src(data, tok), BadRows(str(data), "skip"), r, 2,
                  lambda o, r=r: shares.update({r: o}) or [o])
    with pytest.raises(DataError, match=r"row 6: the prompt"):  # rank 0 alone: its own first
        plan_rows(_src(data, tok), BadRows(str(data), "error"), 0, 2)
    for r in (0, 1):
        with pytest.raises(DataError, match=r"d\.jsonl: row 1: the prompt .* no room"):
            plan_rows(_src(data, tok), BadRows(str(data), "error"), r, 2,
                      lambda o, r=r: [o, shares[1]] if r == 0 else [shares[0], o])


def test_shard_examples_tokenizes_only_the_shards_asked_for(data, tok):
    plan = plan_rows(_src(data, tok), BadRows(str(data), "skip"))
    ranges = spec.shard_ranges(plan.n_examples, 3)  # [0, 3) [3, 6) [6, 9)
    exs = [e for e in load_examples(data, bad_rows=BadRows(str(data), "skip")) if e.row not in (1, 7)]
    src = _src(data, tok)
    got = list(shard_examples(src, plan, ranges, [2, 0]))
    assert [si for si, _ in got] == [0, 2]
    assert [[e.id for e, _ in rows] for _, rows in got] == [[e.id for e in exs[0:3]],
                                                            [e.id for e in exs[6:9]]]
    assert src.seen == [e.row for e in exs[0:3] + exs[6:9]]  # nothing else tokenized
    for _, rows in got:
        for e, t in rows:
            assert t == tokenize_example(e, tok, 64, 64)


def test_shard_examples_refuses_a_file_that_shrank(data, tok):
    plan = plan_rows(_src(data, tok), BadRows(str(data), "skip"))
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:5]))
    ranges = spec.shard_ranges(plan.n_examples, 3)
    with pytest.raises(ValueError, match="changed while it was being cached"):
        list(shard_examples(_src(data, tok), plan, ranges, [2]))
