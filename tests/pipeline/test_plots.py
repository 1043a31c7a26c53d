import json

import numpy as np
import pytest
from matplotlib.image import imread

from dskd.pipeline import plots

TABLE = {
    "sft": {"dolly": (20.0, 0.5), "vicuna": (14.0, 0.3), "Average": (17.0, 0.4)},
    "dskd": {"dolly": (24.0, 0.2), "vicuna": (16.0, 0.6), "Average": (20.0, 0.3)},
}
COLUMNS = ["dolly", "vicuna", "Average"]


def _bars(ax):
    return [p for p in ax.patches if p.get_width() > 0]


def test_method_bars_show_means_and_seed_error_bars():
    fig = plots.method_bars_figure(TABLE, COLUMNS)
    ax = fig.axes[0]
    heights = sorted(round(b.get_height(), 6) for b in _bars(ax))
    assert heights == sorted(m for row in TABLE.values() for m, _ in row.values())
    assert [t.get_text() for t in ax.get_xticklabels()] == COLUMNS
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sft", "dskd"]
    # error bars: one vertical segment per bar, total length 2*std
    spans = sorted(round(float(seg[1, 1] - seg[0, 1]), 6)
                   for c in ax.collections for seg in c.get_segments())
    assert spans == sorted(2 * s for row in TABLE.values() for _, s in row.values())
    # bar value labels carry the means
    labels = {t.get_text() for t in ax.texts}
    assert {"20.0", "24.0", "17.0"} <= labels


def test_method_bars_png_opens(tmp_path):
    out = plots.plot_method_bars(TABLE, COLUMNS, tmp_path / "bars.png")
    img = imread(out)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert np.std(img[..., :3]) > 0.05  # not a blank canvas
    assert not list(tmp_path.glob(".*.png"))  # no temp file left behind


def test_method_bars_skip_missing_cells():
    table = {"a": {"x": (1.0, 0.1)}, "b": {"x": (2.0, 0.0), "y": (3.0, 0.0)}}
    fig = plots.method_bars_figure(table, ["x", "y"])
    assert len(_bars(fig.axes[0])) == 3
    with pytest.raises(ValueError):
        plots.method_bars_figure({}, ["x"])


def _write_metrics(path, n, scale):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for s in range(n):
            f.write(json.dumps({"step": s, "loss": scale / (s + 1), "kd_loss": 0.5 * scale / (s + 1),
                                "lr": 1e-4 * s / n, "tokens_per_s": 1000.0 + s}) + "\n")
        f.write('{"step": 99, "loss": 0.')  # a run killed mid-write


def test_find_and_read_run_metrics(tmp_path):
    run = tmp_path / "run-dskd"
    _write_metrics(run / "metrics.jsonl", 5, 2.0)
    ckpt = run / "checkpoints" / "step-4"
    ckpt.mkdir(parents=True)
    assert plots.find_run_metrics(ckpt) == (run / "metrics.jsonl").resolve()
    (run / "final").mkdir()
    assert plots.find_run_metrics(run / "final") == (run / "metrics.jsonl").resolve()
    deep = run / "a" / "b" / "c"
    deep.mkdir(parents=True)
    assert plots.find_run_metrics(deep) is None  # more than 2 levels up is someone else's run
    rows = plots.read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(5))  # truncated last line skipped


def test_training_curves_panels_and_lines(tmp_path):
    _write_metrics(tmp_path / "a.jsonl", 6, 2.0)
    _write_metrics(tmp_path / "b.jsonl", 4, 3.0)
    runs = {"sft": plots.read_metrics(tmp_path / "a.jsonl"),
            "dskd": plots.read_metrics(tmp_path / "b.jsonl")}
    # only the curves a reader needs: lr and throughput stay in metrics.jsonl
    assert plots.curve_keys(runs) == ["loss", "kd_loss"]
    fig = plots.training_curves_figure(runs)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "kd_loss"]
    loss_ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in loss_ax.get_lines()}
    assert set(lines) == {"sft", "dskd"}
    np.testing.assert_allclose(lines["dskd"].get_ydata(), [3.0 / (s + 1) for s in range(4)])
    np.testing.assert_allclose(lines["sft"].get_xdata(), range(6))
    # one figure legend naming every run
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["sft", "dskd"]
    out = plots.plot_training_curves(runs, tmp_path / "curves.png")
    assert imread(out).shape[1] > 400
    with pytest.raises(ValueError, match="no numeric"):
        plots.training_curves_figure({"x": [{"step": 1}]})


# every key `dskd distill` writes to metrics.jsonl for an SFT and a DSKD run (train + valid)
_SFT_ROW = {"accuracy": 0.4, "ce_loss": 2.0, "loss": 2.0, "epoch": 0, "lr": 3e-3,
            "projector_lr": 6e-3, "grad_norm": 1.5, "tokens_per_s": 900.0, "label_tokens": 400.0}
_DSKD_ROW = {**_SFT_ROW, "kd_loss": 3.0, "t2s_ce_loss": 2.5, "t2s_kd_loss": 0.3,
             "s2t_kd_loss": 0.2, "t2s_acc": 0.3, "s2t_acc": 0.2}
_VALID = {"valid_ce_loss": 2.1, "valid_loss": 2.1, "valid_accuracy": 0.4, "valid_rougeL": 31.0}


def test_training_curves_pick_only_the_chosen_series_from_a_full_run_log():
    """Of the ~20 keys a run logs, the figure shows the objective, its CE and KD terms and the
    validation metrics: exactly those panels, and in each only the runs that logged it."""
    runs = {"sft": [{"step": 1, **_SFT_ROW}, {"step": 2, **_SFT_ROW, **_VALID}],
            "dskd": [{"step": 1, **_DSKD_ROW}, {"step": 2, **_DSKD_ROW, **_VALID,
                                                 "valid_kd_loss": 3.1, "valid_s2t_acc": 0.2}]}
    want = ["loss", "ce_loss", "kd_loss", "t2s_kd_loss", "s2t_kd_loss", "valid_ce_loss",
            "valid_rougeL"]
    assert plots.curve_keys(runs) == want
    fig = plots.training_curves_figure(runs)
    series = {ax.get_title(): [ln.get_label() for ln in ax.get_lines()] for ax in fig.axes}
    assert list(series) == want
    assert series == {"loss": ["sft", "dskd"], "ce_loss": ["sft", "dskd"], "kd_loss": ["dskd"],
                      "t2s_kd_loss": ["dskd"], "s2t_kd_loss": ["dskd"],
                      "valid_ce_loss": ["sft", "dskd"], "valid_rougeL": ["sft", "dskd"]}
    sft_only = {"sft": runs["sft"][:1]}  # no validation yet, no KD: two panels
    assert plots.curve_keys(sft_only) == ["loss", "ce_loss"]


def test_a_run_keeps_its_color_in_panels_only_it_logs():
    runs = {"sft": [{"step": s, "loss": 1.0 / (s + 1)} for s in range(3)],
            "dskd": [{"step": s, "loss": 2.0 / (s + 1), "kd_loss": 0.5} for s in range(3)]}
    fig = plots.training_curves_figure(runs)
    loss_ax, kd_ax = fig.axes
    color = {ln.get_label(): ln.get_color() for ln in loss_ax.get_lines()}
    assert color["sft"] != color["dskd"]
    (kd_line,) = kd_ax.get_lines()
    assert kd_line.get_label() == "dskd" and kd_line.get_color() == color["dskd"]


def test_forest_plot_rows_follow_claims(tmp_path):
    rows = [("KD > SFT", 0.2, 0.1, 0.3, "holds"), ("DSKD > KD", -0.1, -0.3, 0.1, "inconclusive")]
    fig = plots.forest_figure(rows)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["DSKD > KD", "KD > SFT"]
    assert imread(plots.plot_forest(rows, tmp_path / "f.png")).shape[0] > 100
    with pytest.raises(ValueError, match="at least one claim"):
        plots.forest_figure([])
