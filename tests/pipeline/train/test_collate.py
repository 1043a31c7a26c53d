import numpy as np
import torch

from dskd.pipeline.tokenize import TokenizedExample, model_inputs
from dskd.pipeline.train.collate import IGNORE_INDEX, collate_tokens, pad_rows


def test_layout_matches_model_inputs_and_the_official_padding():
    exs = [TokenizedExample("a", "", [5, 6, 7, 8, 9], 2, []),
           TokenizedExample("b", "", [1, 2, 3], 1, [])]
    out = collate_tokens([e.input_ids for e in exs], [e.prompt_len for e in exs], pad_id=0)
    for b, e in enumerate(exs):
        ids, labels = model_inputs(e)
        n = len(ids)
        assert out["input_ids"][b, :n].tolist() == ids
        assert out["labels"][b, :n].tolist() == labels
        assert out["position_ids"][b, :n].tolist() == list(range(n))
        assert out["attention_mask"][b].tolist() == [1] * n + [0] * (4 - n)
    assert out["input_ids"][1, 2:].tolist() == [0, 0]
    assert out["labels"][1, 2:].tolist() == [IGNORE_INDEX] * 2
    assert out["labels"][0].tolist() == [IGNORE_INDEX, 7, 8, 9]


def test_pad_to_and_masked_rows():
    out = collate_tokens([[1, 2, 3]], [1], pad_id=9, pad_to=6, masked=[True])
    assert out["input_ids"].shape == (1, 6)
    assert (out["labels"] == IGNORE_INDEX).all()
    assert out["attention_mask"].sum() == 2


def test_pad_rows():
    rows = [np.ones((2, 3), np.float32), np.full((1, 3), 2.0, np.float32)]
    t = pad_rows(rows, 4)
    assert t.shape == (2, 4, 3) and t.dtype == torch.float32
    assert t[1, 0].tolist() == [2.0] * 3 and t[1, 1:].abs().sum() == 0
