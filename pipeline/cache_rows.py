"""The examples a teacher cache holds, streamed: no cache-teacher worker holds the dataset.

Which examples a cache holds, and so every shard's range, depends on which rows parse and which
tokenize within --max-len, so no worker can start its shards before every row has been checked.
``plan_rows`` checks them in one streaming pass that keeps a count, a running fingerprint and the
few rows that fail: each torchrun rank tokenizes every W-th example and the ranks exchange their
failures. ``shard_examples`` then reads the dataset again and tokenizes only the examples of the
shards asked for, one shard at a time. Held at once: one row, one shard of tokenized examples,
one id per distinct example (``data.iter_examples`` numbers duplicates) and the failed rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .cache.fingerprint import dataset_fingerprint
from .config import ConfigError
from .data import BadRows, Example, Template, iter_examples
from .tokenize import TokenizedExample, TokenizeError, tokenize_example

Gather = Callable[[Any], list[Any]]  # every rank's object, in rank order


@dataclass(frozen=True)
class RowSource:
    """Where the rows come from and how they are tokenized (cache-teacher's options)."""

    data: str
    tokenizer: Any
    field_map: str | None = None
    template: Template = "dskd"
    limit: int | None = None
    max_prompt_len: int = 256
    max_len: int = 512

    def examples(self, bad: BadRows) -> Iterator[Example]:
        return iter_examples(self.data, field_map=self.field_map, template=self.template,
                             on_bad_row=bad.mode, tokenizer=self.tokenizer, limit=self.limit,
                             bad_rows=bad)

    def tokenize(self, ex: Example) -> TokenizedExample:
        return tokenize_example(ex, self.tokenizer, self.max_prompt_len, self.max_len)

    def quiet(self) -> BadRows:
        """A policy for passes after the plan's: bad rows were already reported (or raised)."""
        return BadRows(self.data, "skip")


@dataclass(frozen=True)
class RowPlan:
    """What the plan pass learnt: enough to lay out the shards and fingerprint the dataset."""

    n_examples: int  # examples the cache holds: rows that parse and tokenize
    fingerprint: str  # dataset_fingerprint of those examples, in order
    dropped: frozenset[int]  # indices among the parsed examples that fail tokenization (skipped)


def _one_rank(obj: Any) -> list[Any]:
    return [obj]


def plan_rows(src: RowSource, bad: BadRows, rank: int = 0, world: int = 1,
              gather: Gather = _one_rank) -> RowPlan:
    """Check every row under the bad-row policy, streaming. Rows that do not parse are handled as
    they are read (every rank reads them all: parsing is cheap and numbers duplicates); this rank
    tokenizes parsed examples j with j % world == rank, and ``gather`` pools the failures, which
    are then handled in row order on every rank (the same error, or the same skipped list)."""
    failed: list[tuple[int, int, str, str]] = []  # (j, row, reason, preview)
    n = 0

    def texts() -> Iterator[tuple[str, str, str]]:
        nonlocal n
        for j, ex in enumerate(src.examples(bad)):
            n += 1
            # error mode stops at the first failure: later ones are not needed
            if j % world == rank and not (failed and bad.mode == "error"):
                try:
                    src.tokenize(ex)
                except TokenizeError as e:
                    failed.append((j, ex.row, str(e), ex.prompt[:200]))
            yield ex.id, ex.prompt, ex.response

    fp = dataset_fingerprint(texts())
    pooled = sorted(f for part in gather(failed) for f in part)
    for _, row, reason, preview in pooled:
        bad.handle(row, reason, preview)  # raises on the first in error mode
    dropped = frozenset(j for j, *_ in pooled)
    if len(dropped) == n:
        raise ConfigError(f"{src.data}: no example could be tokenized within --max-len "
                          f"{src.max_len}")
    if dropped:  # the fingerprint covers the kept examples only: one more pass
        fp = dataset_fingerprint((ex.id, ex.prompt, ex.response)
                                 for j, ex in enumerate(src.examples(src.quiet()))
                                 if j not in dropped)
    return RowPlan(n - len(dropped), fp, dropped)


def shard_examples(src: RowSource, plan: RowPlan, ranges: list[tuple[int, int]],
                   shards: list[int]) -> Iterator[tuple[int, list[tuple[Example, TokenizedExample]]]]:
    """(shard, its examples tokenized) for each of ``shards`` in ascending order, from one read
    of the dataset that stops after the last of them. ``ranges``: each shard's [start, end) among
    the kept examples (``spec.shard_ranges``). Only these shards' examples are tokenized, and a
    shard's list is handed over (and dropped by this generator) as soon as it is full."""
    todo = iter(sorted(shards))
    si = next(todo, None)
    if si is None:
        return
    a, b = ranges[si]
    buf: list[tuple[Example, TokenizedExample]] = []
    k = 0  # index among the kept examples
    for j, ex in enumerate(src.examples(src.quiet())):
        if j in plan.dropped:
            continue
        if k >= a:
            buf.append((ex, src.tokenize(ex)))
            if k == b - 1:
                yield si, buf
                buf = []
                si = next(todo, None)
                if si is None:
                    return
                a, b = ranges[si]
        k += 1
    raise ConfigError(f"{src.data} changed while it was being cached: it now has {k} usable "
                      f"examples, the plan counted {plan.n_examples}; rerun on a file that "
                      "does not change")
