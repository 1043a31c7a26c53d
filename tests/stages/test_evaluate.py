import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from rouge_score import rouge_scorer

from dskd.pipeline.data import load_examples
from dskd.stages import evaluate as ev
from dskd.stages import report as rep

SEEDS = [10, 20]
LIMIT = 5


def _cfg(world, out, **kw):
    base = ev.EvalConfig(model=[str(world.student), str(world.student_gpt2)],
                         data=[str(world.valid), str(world.test)], out=str(out), seeds=SEEDS,
                         max_new_tokens=12, batch_size=4, limit=LIMIT)
    return replace(base, **kw)


@pytest.fixture(scope="module")
def evaluated(toy_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    ev.run(_cfg(toy_world, out))
    return out


def _gens(out):
    return [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]


def test_outputs_exist_and_generations_cover_every_unit(evaluated):
    for f in ("generations.jsonl", "results.json", "report.md", "rouge_l.png", "config.yaml"):
        assert (evaluated / f).is_file(), f
    gens = _gens(evaluated)
    assert len(gens) == 2 * 2 * len(SEEDS) * LIMIT
    assert {g["model"] for g in gens} == {"student", "student_gpt2"}
    assert {g["eval_set"] for g in gens} == {"valid", "test"}
    assert {g["seed"] for g in gens} == set(SEEDS)
    assert set(gens[0]) == {"model", "eval_set", "id", "seed", "text"}
    # different seeds give different samples
    by = {(g["model"], g["eval_set"], g["id"], g["seed"]): g["text"] for g in gens}
    diff = sum(by[(m, s, i, 10)] != by[(m, s, i, 20)] for (m, s, i, seed) in by if seed == 10)
    assert diff >= LIMIT


def _file_refs(path, limit):
    """example id -> the references list read straight from the jsonl file."""
    raw = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return {ex.id: raw[ex.row]["references"] for ex in load_examples(path)[:limit]}


def _check_against_rouge_score(out, sets, models, seeds, limit):
    """Every ROUGE-L number in results.json, recomputed from generations.jsonl with rouge-score."""
    results = json.loads((out / "results.json").read_text())
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    refs = {name: _file_refs(path, limit) for name, path in sets.items()}
    gens = _gens(out)
    values = []
    for model in models:
        for name in sets:
            cell = results["scores"][model][name]["rougeL"]
            per_seed = []
            for seed in seeds:
                rows = [g for g in gens if (g["model"], g["eval_set"], g["seed"]) == (model, name, seed)]
                assert len(rows) == limit
                f = [max(scorer.score(r, g["text"])["rougeL"].fmeasure for r in refs[name][g["id"]])
                     for g in rows]
                per_seed.append(100 * np.mean(f))
                assert cell["per_seed"][str(seed)] == pytest.approx(per_seed[-1])
            assert cell["mean"] == pytest.approx(np.mean(per_seed))
            assert cell["std"] == pytest.approx(np.std(per_seed))
            values += per_seed
        if len(sets) > 1:
            avg = results["scores"][model]["Average"]["rougeL"]["mean"]
            assert avg == pytest.approx(np.mean([results["scores"][model][n]["rougeL"]["mean"]
                                                 for n in sets]))
    return refs, values


def test_rouge_equals_rouge_score_on_saved_generations(evaluated, toy_world):
    refs, _ = _check_against_rouge_score(evaluated, {"valid": toy_world.valid, "test": toy_world.test},
                                         ["student", "student_gpt2"], SEEDS, LIMIT)
    assert max(len(r) for r in refs["valid"].values()) > 1  # multi-reference rows are in the sample


def test_rouge_equals_rouge_score_nonzero_multi_reference(toy_world, tmp_path):
    """Random-init models score ~0 on real references, so build references that overlap their
    (greedy, hence known) output: per row a junk reference and a partial copy of the output."""
    first = tmp_path / "first"
    cfg = _cfg(toy_world, first, model=[str(toy_world.student)], data=[str(toy_world.valid)],
               decoding="greedy", limit=4)
    ev.run(cfg)
    greedy = {g["id"]: g["text"] for g in _gens(first)}
    rows = []
    for i, (ex, line) in enumerate(zip(load_examples(toy_world.valid)[:4],
                                       Path(toy_world.valid).read_text().splitlines())):
        row = json.loads(line)
        words = greedy[ex.id].replace("\ufffd", "").split()  # half a character: not text
        partial = " ".join(words[: max(1, len(words) // (i + 1))]) + " extra"
        row["references"] = ["nothing alike here", partial]
        row.pop("probs")  # the true distribution was over the old references
        rows.append(json.dumps(row))
    derived = tmp_path / "derived.jsonl"
    derived.write_text("\n".join(rows) + "\n")
    out = tmp_path / "second"
    ev.run(replace(cfg, data=[str(derived)], out=str(out)))
    _, values = _check_against_rouge_score(out, {"derived": derived}, ["student"], [10], 4)
    assert 20 < values[0] < 100  # partial overlaps: far from 0, not all exact


def test_results_record_config_protocol_and_fingerprints(evaluated, toy_world):
    results = json.loads((evaluated / "results.json").read_text())
    assert results["config"]["seeds"] == SEEDS and results["config"]["limit"] == LIMIT
    p = results["protocol"]
    assert (p["temperature"], p["top_p"], p["top_k"], p["no_repeat_ngram_size"]) == (1.0, 1.0, 0, 6)
    fp = results["models"]["student"]["fingerprint"]
    weights = Path(toy_world.student) / "model.safetensors"
    assert fp["files"]["model.safetensors"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert fp["files"]["config.json"]
    assert fp["sha256"] != results["models"]["student_gpt2"]["fingerprint"]["sha256"]
    assert results["eval_sets"]["valid"]["examples"] == LIMIT
    report = (evaluated / "report.md").read_text()
    assert "| model | valid | test | Average |" in report
    assert "| student |" in report and "| student_gpt2 |" in report
    assert "![ROUGE-L](rouge_l.png)" in report
    img = imread(evaluated / "rouge_l.png")
    assert img.shape[0] > 200 and np.std(img[..., :3]) > 0.05


def test_eval_sets_with_probs_get_exact_metrics_against_the_truth(evaluated, toy_world):
    """The toy world records true probs: results.json and report.md carry excess KL etc.,
    equal to pipeline/truth.py on the same model and rows, per-token in the first model's
    tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dskd.pipeline.truth import truth_metrics

    results = json.loads((evaluated / "results.json").read_text())
    got = results["truth"]["student_gpt2"]["test"]
    tok = AutoTokenizer.from_pretrained(toy_world.student_gpt2)
    model = AutoModelForCausalLM.from_pretrained(toy_world.student_gpt2).eval()
    want = truth_metrics(model, tok, load_examples(toy_world.test)[:LIMIT],
                         reference_tokenizer=AutoTokenizer.from_pretrained(toy_world.student))
    for k in ("excess_kl", "excess_kl_per_token", "validity", "excess_nll"):
        assert got[k] == pytest.approx(want[k], rel=1e-4), k
    assert got["examples"] == LIMIT and got["excess_kl"] > 0
    assert set(results["truth"]) == {"student", "student_gpt2"}
    report = (evaluated / "report.md").read_text()
    assert "## Against the truth" in report and "| student_gpt2 · test |" in report


def test_rerun_reuses_finished_parts(evaluated, toy_world, monkeypatch):
    before = (evaluated / "generations.jsonl").read_bytes()

    def boom(*a, **k):
        raise AssertionError("nothing should be regenerated")

    monkeypatch.setattr(ev, "_Generator", boom)
    ev.run(_cfg(toy_world, evaluated))
    assert (evaluated / "generations.jsonl").read_bytes() == before


def test_adding_a_seed_generates_only_that_seed(toy_world, tmp_path, monkeypatch):
    out = tmp_path / "grow"
    cfg = _cfg(toy_world, out, model=[str(toy_world.student)], data=[str(toy_world.valid)],
               seeds=[10], limit=2, max_new_tokens=4)
    ev.run(cfg)
    calls = []

    class Counting(ev._Generator):
        def __call__(self, examples, seed, on_batch):
            calls.append(seed)
            return super().__call__(examples, seed, on_batch)

    monkeypatch.setattr(ev, "_Generator", Counting)
    ev.run(replace(cfg, seeds=[10, 30]))
    assert calls == [30]
    assert {g["seed"] for g in _gens(out)} == {10, 30}


def test_same_seed_same_generations_any_batch_size(evaluated, toy_world, tmp_path):
    out = tmp_path / "again"
    ev.run(_cfg(toy_world, out, model=[str(toy_world.student)], data=[str(toy_world.valid)],
                batch_size=1))
    fresh = {(g["id"], g["seed"]): g["text"] for g in _gens(out)}
    first = {(g["id"], g["seed"]): g["text"] for g in _gens(evaluated)
             if g["model"] == "student" and g["eval_set"] == "valid"}
    assert fresh == first


def test_greedy_runs_once_and_is_seed_free(toy_world, tmp_path):
    cfg = _cfg(toy_world, tmp_path / "g", model=[str(toy_world.student)],
               data=[str(toy_world.valid)], decoding="greedy", limit=3)
    ev.run(cfg)
    results = json.loads((tmp_path / "g" / "results.json").read_text())
    cell = results["scores"]["student"]["valid"]["rougeL"]
    assert list(cell["per_seed"]) == ["10"] and cell["std"] == 0.0
    assert results["protocol"]["temperature"] is None


def test_oracle_generations_score_per_seed(toy_world, tmp_path, monkeypatch):
    """Stage wiring with known answers: seed 10 answers 2 of 4 prompts with a reference (the
    last of several), seed 20 answers 1 of 4; the rest share no word with any reference."""
    examples = {e.prompt: e for e in load_examples(toy_world.valid)}

    class Oracle:
        def __init__(self, *a, **k):
            pass

        def __call__(self, exs, seed, on_batch):
            on_batch(len(exs))
            right = 2 if seed == 10 else 1
            return [examples[e.prompt].references[-1] if i < right else "zzz qqq"
                    for i, e in enumerate(exs)]

        def close(self):
            pass

    monkeypatch.setattr(ev, "_Generator", Oracle)
    ev.run(_cfg(toy_world, tmp_path / "o", model=[str(toy_world.student)],
                data=[str(toy_world.valid)], limit=4))
    res = json.loads((tmp_path / "o" / "results.json").read_text())["scores"]["student"]["valid"]
    assert res["rougeL"]["per_seed"] == {"10": pytest.approx(50.0), "20": pytest.approx(25.0)}
    assert res["rougeL"]["mean"] == pytest.approx(37.5) and res["rougeL"]["std"] == pytest.approx(12.5)
    assert res["exact_match"]["mean"] == pytest.approx(37.5)


# --------------------------------------------------------------------------- bad input


def test_missing_model_dir_is_a_clear_error(toy_world, tmp_path):
    cfg = _cfg(toy_world, tmp_path / "x", model=[str(tmp_path / "nope"), str(toy_world.student)])
    with pytest.raises(ev.EvalError, match=r"nope does not exist"):
        ev.run(cfg)
    assert not (tmp_path / "x").exists()  # nothing written before the inputs are checked


def test_eval_file_without_reference_field(toy_world, tmp_path):
    bad = tmp_path / "noref.jsonl"
    bad.write_text('{"instruction": "Say hi.", "context": ""}\n')
    with pytest.raises(ev.EvalError, match=r"noref.jsonl.*reference"):
        ev.run(_cfg(toy_world, tmp_path / "x", data=[str(bad)]))


def test_empty_eval_set(toy_world, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ev.EvalError, match=r"empty.jsonl.*empty"):
        ev.run(_cfg(toy_world, tmp_path / "x", data=[str(empty)]))


def test_all_flag_problems_reported_at_once(toy_world, tmp_path):
    cfg = ev.EvalConfig(model=[str(toy_world.student)] * 2, data=[str(tmp_path / "none.jsonl")],
                        out=str(tmp_path / "x"), name=["a", "b"])
    with pytest.raises(ev.EvalError) as e:
        ev.run(cfg)
    msg = str(e.value)
    assert "none.jsonl does not exist" in msg and "2 --name for 1 --data" in msg
    assert "model names" in msg and "--model-name" in msg


def test_model_display_names(tmp_path):
    assert ev.model_display_name(tmp_path / "run-dskd" / "final") == "run-dskd"
    assert ev.model_display_name(tmp_path / "run-kd" / "checkpoints" / "step-00000120" / "student") \
        == "run-kd@step-120"
    assert ev.model_display_name(tmp_path / "models" / "gpt2-base") == "gpt2-base"


# --------------------------------------------------------------------------- runs and report


def test_training_curves_found_next_to_checkpoint(toy_world, tmp_path):
    run = tmp_path / "run-sft"
    shutil.copytree(toy_world.student, run / "final")
    with (run / "metrics.jsonl").open("w") as f:
        for s in range(1, 6):
            f.write(json.dumps({"step": s, "loss": 3.0 / s, "lr": 1e-4, "tokens_per_s": 500.0}) + "\n")
    out = tmp_path / "e"
    ev.run(_cfg(toy_world, out, model=[str(run / "final")], data=[str(toy_world.valid)], limit=2,
                seeds=[10]))
    res = json.loads((out / "results.json").read_text())
    assert list(res["scores"]) == ["run-sft"]
    assert res["models"]["run-sft"]["metrics_jsonl"] == str((run / "metrics.jsonl").resolve())
    assert imread(out / "training_curves.png").shape[1] > 400
    assert "training_curves.png" in (out / "report.md").read_text()


def _synthetic_results(truth: bool) -> dict:
    cell = {"mean": 20.0, "std": 1.0, "per_seed": {"10": 20.0}}
    scores = {m: {"test": {"rougeL": cell, "exact_match": cell}} for m in ("sft", "kd")}
    out = {"scores": scores, "models": {m: {} for m in scores}, "protocol": None}
    if truth:
        out["truth"] = {m: {"test": {"excess_kl": kl, "excess_kl_per_token": kl / 10,
                                     "validity": 0.5, "excess_nll": kl,
                                     "reference_tokenizer": "bpe"}}
                        for m, kl in (("sft", 1.25), ("kd", 0.75))}
    return out


@pytest.mark.parametrize("truth", [True, False])
def test_report_puts_exact_metrics_first_and_says_what_rouge_sees(tmp_path, truth):
    """With true probabilities the exact table leads the report; ROUGE-L always comes with the
    line saying what it can and cannot see."""
    rep.write_report(_synthetic_results(truth), tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert rep.ROUGE_NOTE in report
    assert report.index(rep.ROUGE_NOTE) > report.index("## ROUGE-L")
    if truth:
        assert report.index("## Against the truth") < report.index("## ROUGE-L")
        assert "| kd | 0.7500 |" in report and "| sft | 1.2500 |" in report
    else:
        assert "## Against the truth" not in report


def test_printed_summary_shows_exact_metrics_first(capsys):
    res = _synthetic_results(True)
    ev._print_summary(res["scores"], ["test"], res["truth"])
    err = " ".join(capsys.readouterr().err.split())
    assert err.index("Against the truth") < err.index("ROUGE-L (mean")
    assert "0.7500" in err and "sampling noise" in err


def test_printed_summary_is_not_wrapped_in_a_file(capsys):
    """stderr into a file (capsys: not a terminal): every table row and the ROUGE-L note stay on
    one line at their full width, instead of Rich's 80 columns cutting cells to "…"."""
    long = "xvocab-dskd-cma-projector-pinv-lr1e-4-seed-3"
    res = _synthetic_results(True)
    res["scores"][long] = res["scores"]["kd"]
    res["truth"][long] = res["truth"]["kd"]
    ev._print_summary(res["scores"], ["test"], res["truth"])
    lines = capsys.readouterr().err.splitlines()
    rows = [ln for ln in lines if long in ln]
    assert len(rows) == 2 and "…" not in "".join(lines)
    assert "0.7500" in rows[0] and "50.0" in rows[0] and "20.00 ± 1.00" in rows[1]
    assert max(len(ln) for ln in lines) > 100  # wider than any terminal default
    assert any(rep.ROUGE_NOTE in ln for ln in lines)


def test_a_run_dir_gives_its_best_checkpoint_and_lora_adapters_are_evaluable(toy_world, tmp_path,
                                                                            capsys):
    """`--model RUN_DIR` takes the checkpoint the run selected (best.json) and says so, else
    final/; a LoRA checkpoint (adapter only) generates exactly what the merged final/ does."""
    from dskd.stages.distill import DistillConfig
    from dskd.stages.distill import run as distill

    rd = tmp_path / "run-lora"
    distill(DistillConfig(student=str(toy_world.student), out=str(rd), method="sft",
                          data=str(toy_world.train), valid_data=str(toy_world.valid), limit=16,
                          lora=True, lora_r=4, batch_size=4, max_steps=4, eval_interval=2,
                          save_interval=2, keep_last=1, num_workers=0, tensorboard=False))
    best = json.loads((rd / "checkpoints" / "best.json").read_text())
    last = rd / "checkpoints" / "step-00000004"
    assert (last / "student" / "adapter_config.json").is_file()
    assert not (last / "student" / "config.json").exists()
    out = tmp_path / "e"
    ev.run(_cfg(toy_world, out, model=[str(rd), str(last), str(rd / "final")],
                model_name=["run", "adapter", "final"], data=[str(toy_world.valid)],
                decoding="greedy", limit=3, max_new_tokens=8))
    err = " ".join(capsys.readouterr().err.split())
    assert f"evaluating checkpoints/{best['checkpoint']}, the run's best checkpoint" in err
    models = json.loads((out / "results.json").read_text())["models"]
    assert models["run"]["path"] == str(rd / "checkpoints" / best["checkpoint"] / "student")
    assert best["metric"] in models["run"]["selection"] and models["final"]["selection"] is None
    assert models["adapter"]["fingerprint"] != models["final"]["fingerprint"]
    gens = {}
    for g in _gens(out):
        gens.setdefault(g["model"], {})[g["id"]] = g["text"]
    assert gens["adapter"] == gens["final"]  # step 4 as an adapter == step 4 merged
    (rd / "checkpoints" / "best.json").unlink()  # a run that selected nothing: its final/
    path, note = ev.resolve_model(rd)
    assert path == rd / "final" and "selected no best checkpoint" in note


def test_report_merges_runs_side_by_side(evaluated, toy_world, tmp_path):
    other = tmp_path / "other"
    ev.run(_cfg(toy_world, other, model=[str(toy_world.teacher)], data=[str(toy_world.valid)],
                limit=3, seeds=[10]))
    out = tmp_path / "merged"
    path = rep.report([evaluated, other], out)
    text = path.read_text()
    assert "| model | valid | test | Average |" in text
    for name in ("student", "student_gpt2", "teacher"):
        assert f"| {name} |" in text
    assert "different eval sets" in text  # teacher only has `valid`
    merged = json.loads((out / "results.json").read_text())
    src = json.loads((evaluated / "results.json").read_text())
    assert merged["scores"]["student"]["valid"] == src["scores"]["student"]["valid"]
    assert "Average" not in merged["scores"]["teacher"]
    assert (out / "rouge_l.png").is_file()
    with pytest.raises(rep.ReportError, match="no results.json"):
        rep.report([tmp_path], out)


def test_cli_eval_and_flags(toy_world, tmp_path):
    from typer.testing import CliRunner

    from dskd.cli import app

    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["eval", "--model", str(toy_world.student), "--data",
                                 str(toy_world.valid), "--name", "dolly", "--out", str(out),
                                 "--seeds", "10,20", "--max-new-tokens", "4", "--limit", "2"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert list(res["scores"]["student"]) == ["dolly"]
    assert res["config"]["seeds"] == [10, 20]
    r = CliRunner().invoke(app, ["report", str(out), str(out), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert "| student |" in (tmp_path / "rep" / "report.md").read_text()
    r = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "nope"), "--data",
                                 str(toy_world.valid), "--out", str(out)])
    assert r.exit_code == 1 and "does not exist" in r.output


# --------------------------------------------------------------------------- fidelity


def test_fidelity_against_a_real_teacher_cache(toy_world, tmp_path):
    from dskd.stages.cache_teacher import CacheTeacherConfig
    from dskd.stages.cache_teacher import run as cache_run

    cache = tmp_path / "cache"
    cache_run(CacheTeacherConfig(teacher=str(toy_world.teacher), data=str(toy_world.test),
                                 out=str(cache), limit=4, progress=False))
    out = tmp_path / "fid"
    ev.run(_cfg(toy_world, out, model=[str(toy_world.teacher), str(toy_world.student),
                                       str(toy_world.student_xvocab)],
                data=[str(toy_world.valid)], seeds=[10], limit=2, max_new_tokens=4, cache=str(cache)))
    fid = json.loads((out / "results.json").read_text())["fidelity"]
    # the teacher against its own cache: fp16-stored hidden states, so ~0 and full agreement
    assert fid["teacher"]["kl"] == pytest.approx(0.0, abs=1e-3)
    assert fid["teacher"]["top1_agreement"] == pytest.approx(100.0)
    assert fid["student"]["kl"] > 10 * fid["teacher"]["kl"] + 1e-3
    assert fid["teacher"]["fidelity_tokens"] == fid["student"]["fidelity_tokens"] > 0
    assert fid["student_xvocab"]["kl"] is None and fid["student_xvocab"]["nll"] > 0
    assert all(f["examples"] == 2 for f in fid.values())
    report = (out / "report.md").read_text()
    assert "## Fidelity to the teacher" in report and "| student_xvocab |" in report


def test_fidelity_does_not_vanish_when_the_cache_cut_prompts(toy_world, tmp_path):
    """A cache made with a short --max-prompt-len (every prompt cut): the teacher against it is
    KL≈0 / top-1 100 on every example, and a same-vocabulary student still gets KL."""
    from dskd.stages.cache_teacher import CacheTeacherConfig
    from dskd.stages.cache_teacher import run as cache_run

    cache = tmp_path / "cache"
    cache_run(CacheTeacherConfig(teacher=str(toy_world.teacher), data=str(toy_world.test),
                                 out=str(cache), limit=4, max_prompt_len=4, progress=False))
    c = _cfg(toy_world, tmp_path / "o", cache=str(cache))
    teacher = ev.cache_fidelity(c, toy_world.teacher, None)
    assert teacher["kl"] == pytest.approx(0.0, abs=1e-3)
    assert teacher["top1_agreement"] == pytest.approx(100.0)
    assert teacher["examples"] == 4 and "note" not in teacher
    assert "identical" in teacher["vocabulary"]
    student = ev.cache_fidelity(c, toy_world.student, None)
    assert student["kl"] > teacher["kl"] and student["fidelity_tokens"] == teacher["fidelity_tokens"]


def test_missing_cache_dir_is_reported(toy_world, tmp_path):
    with pytest.raises(ev.EvalError, match="--cache .* is not a directory"):
        ev.run(_cfg(toy_world, tmp_path / "x", cache=str(tmp_path / "nocache")))


def test_report_merges_same_model_same_protocol_only(evaluated, toy_world, tmp_path):
    extra = tmp_path / "extra.jsonl"
    shutil.copy(toy_world.valid, extra)
    same = tmp_path / "same"  # the fixture's protocol, another set: joins the student row
    ev.run(_cfg(toy_world, same, model=[str(toy_world.student)], data=[str(extra)]))
    greedy = tmp_path / "g"  # greedy on that set: its own row
    ev.run(_cfg(toy_world, greedy, model=[str(toy_world.student)], data=[str(extra)],
                decoding="greedy"))
    rep.report([evaluated, same, greedy], tmp_path / "m")
    scores = json.loads((tmp_path / "m" / "results.json").read_text())["scores"]
    assert set(scores["student"]) == {"valid", "test", "extra", "Average"}
    assert set(scores["student [g]"]) == {"extra"}
    assert scores["student"]["extra"] != scores["student [g]"]["extra"]
