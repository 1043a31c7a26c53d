"""The toy world: a generated offline world in which every stage runs on a 2-core CPU.

* `tasks`: Dolly-schema instruction data with single- and many-answer tasks (`toy_examples`);
* `vocab`: three locally trained tokenizer families ("bpe" ~1.9k, the teacher's; "spbpe" ~1.15k,
  a realistic other vocabulary; "unigram" ~0.8k, a degenerate stress variant);
* `models`: tiny random-init Llama / GPT-2 causal LMs saved with their tokenizer;
* `build`: `build_toy_world(out_dir, seed, preset)` writes all of it; presets in its docstring.
"""

from dskd.pipeline.toyworld.build import PRESETS, ToyWorld, build_toy_world, fresh_student
from dskd.pipeline.toyworld.tasks import (
    MANY_ANSWER_CATEGORIES,
    SINGLE_ANSWER_CATEGORIES,
    toy_examples,
)

__all__ = [
    "MANY_ANSWER_CATEGORIES",
    "PRESETS",
    "SINGLE_ANSWER_CATEGORIES",
    "ToyWorld",
    "build_toy_world",
    "fresh_student",
    "toy_examples",
]
