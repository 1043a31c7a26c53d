"""End to end: `dskd quickstart --preset tiny` runs every stage and its outputs are usable.

The default tier runs the quickstart with the tiny preset's sizes cut further (8 teacher
steps, 128 cached rows per split, 3 steps per student, 10 eval rows of 12 new tokens): every
stage and every student runs, wired as shipped. The preset exactly as shipped runs in the slow
tier with the same checks."""

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dskd.pipeline.data import load_examples
from dskd.pipeline.tokenize import IGNORE_INDEX, model_inputs, tokenize_example
from dskd.stages import quickstart as qs
from dskd.stages.quickstart import STUDENTS, QuickstartConfig, run, truth_summary


def response_nll(model_dir: Path, data: Path, n: int = 60) -> float:
    """Mean NLL per response token (the held-out measure the teacher must improve)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for ex in load_examples(data)[:n]:
        ids, labels = model_inputs(tokenize_example(ex, tok))
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        lab = torch.tensor(labels)
        keep = lab != IGNORE_INDEX
        total += torch.nn.functional.cross_entropy(logits[keep], lab[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / count


@pytest.fixture(scope="module", params=["cut", pytest.param("as-shipped", marks=pytest.mark.slow)])
def quickstart(request, tmp_path_factory):
    """(out dir, report path) of `quickstart --preset tiny`; in the `cut` variant with smaller
    sizes (a test's options, not the preset's), held for the module's tests (the rerun too)."""
    out = tmp_path_factory.mktemp("quickstart")
    threads = torch.get_num_threads()  # the quickstart sets its own (--threads, default 1)
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "cut":
            mp.setitem(qs.SIZES, "tiny", dataclasses.replace(
                qs.SIZES["tiny"], eval_limit=10, max_new_tokens=12))
            mp.setattr(qs, "train_student", functools.partial(qs.train_student, max_steps=3))
            mp.setattr(qs, "cache_splits", functools.partial(qs.cache_splits, limit=128))
            teacher = qs.train_teacher
            mp.setattr(qs, "train_teacher", lambda out, world, sz, common: teacher(
                out, world, sz, {**common, "max_steps": 8}))
        report = run(QuickstartConfig(out=str(out), preset="tiny"))
        yield out, report
    torch.set_num_threads(threads)  # the tests after this module get the suite's setting back


def test_every_stage_wrote_its_outputs(quickstart):
    out, report = quickstart
    assert report == out / "eval" / "report.md" and report.is_file()
    assert (out / "config.yaml").is_file() and (out / "world" / "toyworld.json").is_file()
    for split in ("train", "valid"):
        manifest = json.loads((out / "cache" / split / "manifest.json").read_text())
        assert manifest["shards"], f"{split} cache has no committed shard"
    for name in ["teacher", *STUDENTS]:
        final = out / "runs" / name / "final"
        assert (final / "config.json").is_file() and (final / "model.safetensors").is_file(), name
        assert (out / "runs" / name / "metrics.jsonl").is_file(), name
        AutoModelForCausalLM.from_pretrained(final)  # loadable the standard way
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results["scores"]) == {"teacher", *STUDENTS}
    for f in ("generations.jsonl", "rouge_l.png", "training_curves.png"):
        assert (out / "eval" / f).is_file(), f
    text = report.read_text()
    assert "| teacher |" in text and "| xvocab-dskd-cma |" in text
    # the toy world knows the truth: exact metrics for every model, and a pointer to the
    # paired-seed evidence for intervals
    assert "## Against the truth" in text and "| xvocab-dskd-cma | " in text.split("truth")[1]
    assert set(results["truth"]) == {"teacher", *STUDENTS}
    assert "benchmarks/evidence.py" in text
    assert truth_summary(results["truth"]) in text
    assert json.loads((out / "quickstart.json").read_text())["torch_threads"] == 1


def test_truth_summary_states_teacher_sft_and_the_students_that_beat_sft():
    kl = {"teacher": 1.0, "sft": 3.0, "kd-fkl": 2.5, "dskd-fkl": 3.5, "xvocab-sft": 4.0,
          "xvocab-uld": 4.5, "xvocab-mined": 4.2, "xvocab-dskd-cma": 4.5}
    line = truth_summary({m: {"toy-test": {"excess_kl": v}} for m, v in kl.items()})
    assert "teacher 1.00, SFT student 3.00" in line
    assert "(same vocabulary): kd-fkl 2.50;" in line and "dskd-fkl" not in line
    assert "(other vocabulary, vs xvocab-sft 4.00): none." in line
    assert truth_summary({"sft": {"toy-test": {"excess_kl": 1.0}}}) is None  # no teacher row


def test_trained_teacher_beats_untrained_on_held_out_nll(quickstart):
    out, _ = quickstart
    valid = out / "world" / "data" / "valid.jsonl"
    trained = response_nll(out / "runs" / "teacher" / "final", valid)
    untrained = response_nll(out / "world" / "models" / "teacher", valid)
    assert trained < untrained - 1.0, (trained, untrained)


def test_rerun_skips_finished_steps(quickstart):
    out, _ = quickstart
    watched = [out / "runs" / "teacher" / "final" / "model.safetensors",
               out / "cache" / "train" / "manifest.json", out / "eval" / "results.json"]
    before = [p.stat().st_mtime_ns for p in watched]
    run(QuickstartConfig(out=str(out), preset="tiny"))
    assert [p.stat().st_mtime_ns for p in watched] == before
