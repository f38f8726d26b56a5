"""The figures a person reads: what each one draws (full class names, integer epochs, stage lines, a
colour bar), checked on the matplotlib figure itself; the calibration bins and the model names behind
the tables."""

import ast
from pathlib import Path

import numpy as np
import pytest
from conftest import make_images, stand_in_model
from matplotlib.backends.backend_agg import FigureCanvasAgg

from toolkit import clean, ensemble, interpret, report, runs
from toolkit.errors import CellfuseError


@pytest.fixture
def drawn(monkeypatch):
    """Every figure saved through the toolkit's one saving function, kept for inspection."""
    figures = []
    save = runs.atomic_save_figure

    def keep(fig, path, **kwargs):
        figures.append(fig)
        return save(fig, path, **kwargs)

    for module in (runs, report, clean, interpret):  # the others import the name at load time
        monkeypatch.setattr(module, "atomic_save_figure", keep)
    return figures


def _history(epochs: int) -> list[dict]:
    return [{"epoch": float(e), "loss": 2.0 / e, "val_loss": 2.1 / e, "accuracy": 0.1 * e, "lr": 1e-3,
             "seconds": 3.0} for e in range(1, epochs + 1)]


def test_curves_have_integer_epoch_ticks_and_a_line_where_each_stage_begins(drawn, tmp_path):
    assert report.stage_starts([1, 4, 2]) == [2, 6]
    report.plot_curves(_history(5), tmp_path / "curves.png", stages=[1, 4, 2])  # stopped before stage 3
    assert (tmp_path / "curves.png").stat().st_size > 0
    for ax in drawn[0].axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        stage_lines = [line for line in ax.lines if len(set(line.get_xdata())) == 1]
        assert [line.get_xdata()[0] for line in stage_lines] == [1.5]  # stage 3 (epoch 6) never ran
        assert [t.get_text().strip() for t in ax.texts] == ["stage 2"]
    report.plot_curves(_history(3), tmp_path / "plain.png")  # without stages: no lines
    assert all(len(set(line.get_xdata())) > 1 for ax in drawn[1].axes for line in ax.lines)


def test_removed_png_captions_carry_whole_class_names_inside_their_tiles(drawn, tmp_path):
    images, _ = make_images(12)
    removed = [{"row": 3, "reason": "near_duplicate", "duplicate_of": 1, "class": "immature granulocyte"},
               {"row": 4, "reason": "label_conflict", "group": 0, "label": 3, "class": "immature granulocyte"},
               {"row": 5, "reason": "label_conflict", "group": 0, "label": 1, "class": "eosinophil"}]
    clean.plot_removed(images, removed, tmp_path / "removed.png", ncols=6)
    fig = drawn[0]
    renderer = FigureCanvasAgg(fig).get_renderer()  # the figure was closed after saving
    for ax in fig.axes:
        captions = [t for t in ax.texts if t.get_text()]
        assert any(t.get_text().endswith("immature granulocyte") for t in captions)
        tile = ax.transData.transform((96 + 4, 0))[0] - ax.transData.transform((0, 0))[0]
        assert all(t.get_window_extent(renderer).width < tile for t in captions)  # no caption runs into the next


def test_gradcam_grids_carry_a_colour_bar(drawn, tmp_path):
    images, labels = make_images(4)
    cams = np.tile(np.linspace(0, 1, 96, dtype=np.float32), (4, 96, 1))
    interpret.plot_pairs(images, cams, [f"class {c}" for c in labels], tmp_path / "pairs.png", "maps")
    interpret.plot_class_grid(images, cams, {0: np.array([0, 1]), 1: np.array([2])}, ["a", "b"],
                              tmp_path / "classes.png", "maps")
    interpret.plot_pairs(images, None, [f"class {c}" for c in labels], tmp_path / "plain.png", "no maps")
    bars = [[ax for ax in fig.axes if ax.get_ylabel() == interpret.CAM_LABEL] for fig in drawn]
    assert [len(b) for b in bars] == [1, 1, 0]
    assert bars[0][0].get_ylim() == (0.0, 1.0)


# ---------------------------------------------------------------- calibration, floors, names

CALIBRATION = (np.array([0, 1, 1, 2, 2]),
               np.array([[0.9, 0.05, 0.05],  # right, confidence 0.9
                         [0.8, 0.1, 0.1],  # wrong, 0.8
                         [0.2, 0.6, 0.2],  # right, 0.6
                         [0.4, 0.3, 0.3],  # wrong, 0.4
                         [0.3, 0.25, 0.45]]))  # right, 0.45


def test_ece_weighs_each_reliability_bins_gap_by_its_share_of_the_images():
    labels, probs = CALIBRATION
    low, high = report.reliability_bins(labels, probs, bins=2)
    assert (low["lo"], low["hi"], low["n"], high["n"]) == (0.0, 0.5, 2, 3)
    assert low["confidence"] == pytest.approx(0.425) and low["accuracy"] == 0.5
    assert high["confidence"] == pytest.approx(2.3 / 3) and high["accuracy"] == pytest.approx(2 / 3)
    # 2/5 x |0.5 - 0.425| + 3/5 x |2/3 - 2.3/3|
    assert report.expected_calibration_error(labels, probs, bins=2) == pytest.approx(0.09)
    bins = report.reliability_bins(labels, probs)
    assert len(bins) == 15 and sum(b["n"] for b in bins) == 5
    assert all(b["confidence"] is None and b["accuracy"] is None for b in bins if not b["n"])


def test_ece_is_computed_from_the_same_bins_inspect_draws():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(8) * 0.3, 500)
    labels = rng.integers(0, 8, 500)
    from_bins = sum(b["n"] * abs(b["accuracy"] - b["confidence"])
                    for b in report.reliability_bins(labels, probs) if b["n"]) / len(labels)
    assert report.expected_calibration_error(labels, probs) == pytest.approx(from_bins, abs=1e-15)
    assert interpret.reliability_bins is report.reliability_bins
    assert report.expected_calibration_error(labels[:0], probs[:0]) == 0.0


def test_the_numpy_floor_is_the_models_floor():
    """report.EPS repeats toolkit.layers.EPS (read from its source: importing it would load Keras)."""
    source = Path(report.__file__).with_name("layers.py").read_text()
    assigned = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(source).body
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    assert report.EPS == assigned["EPS"] == 1e-12
    assert interpret.EPS is report.EPS
    assert report.nll(np.array([1]), np.array([[1.0, 0.0]])) == pytest.approx(-np.log(1e-12))


def test_models_are_named_one_way_in_every_table(tmp_path):
    run, other, loose = tmp_path / "runs" / "cpu-lite0", tmp_path / "other" / "cpu-lite0", tmp_path / "loose"
    for folder in (run, other, loose):
        folder.mkdir(parents=True)
    for file in (run / "best.keras", run / "swa.keras", other / "best.keras", loose / "model-a.keras",
                 loose / "best.keras"):
        stand_in_model(file)
    (run / "recipe.toml").write_text("")
    paths = [run, run / "swa.keras", other, loose / "model-a.keras", loose]
    names = report.model_names(paths)
    assert names == {"cpu-lite0": run / "best.keras", "cpu-lite0-swa": run / "swa.keras",
                     "cpu-lite0-2": other / "best.keras", "model-a": loose / "model-a.keras",
                     "loose": loose / "best.keras"}
    assert ensemble._members(paths) == names  # the ensemble's tables and ensemble.json
    with pytest.raises(CellfuseError, match="given twice"):
        ensemble._members([run, run / "best.keras"])


def test_the_accuracy_interval_is_wilsons_and_narrows_with_more_images():
    # Wilson's closed form, z = 1.96: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    def wilson(k, n, z=1.959963984540054):
        p = k / n
        centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return [(centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)]

    for k, n in ((313, 399), (0, 10), (10, 10), (870, 1000)):
        assert report.accuracy_interval(k, n) == pytest.approx(wilson(k, n), abs=1e-9)
    assert report.accuracy_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)  # never below 0 (the normal one is)
    small, large = report.accuracy_interval(80, 100), report.accuracy_interval(800, 1000)
    assert large[0] > small[0] and large[1] < small[1]
    labels, probs = CALIBRATION  # 3 of 5 right
    assert report.classification_metrics(labels, probs, ["a", "b", "c"])["accuracy_ci95"] == pytest.approx(wilson(3, 5))
    assert all(np.isnan(report.accuracy_interval(0, 0)))


def test_the_paired_comparison_counts_only_the_images_the_two_models_disagree_on():
    from math import comb

    a = np.array([True] * 80 + [True] * 12 + [False] * 5 + [False] * 3)  # 80 both right, 3 both wrong
    b = np.array([True] * 80 + [False] * 12 + [True] * 5 + [False] * 3)
    paired = report.paired_comparison(a, b)
    assert (paired["a_only"], paired["b_only"]) == (12, 5)
    assert paired["difference"] == pytest.approx(0.07)
    # exact two-sided McNemar: twice the chance of 5 or fewer of the 17 split images going b's way
    assert paired["p"] == pytest.approx(2 * sum(comb(17, k) for k in range(6)) / 2 ** 17)
    assert report.paired_comparison(b, a)["p"] == pytest.approx(paired["p"])  # symmetric
    assert report.paired_comparison(a, a) == {"difference": 0.0, "a_only": 0, "b_only": 0, "p": 1.0}
    with pytest.raises(ValueError, match="same images"):
        report.paired_comparison(a, b[:-1])


def test_metrics_tables_show_the_interval_under_a_readable_header():
    from rich.console import Console

    labels, probs = CALIBRATION
    console = Console(record=True, width=200)
    console.print(report.metrics_table({"val": report.classification_metrics(labels, probs, ["a", "b", "c"])}))
    text = console.export_text()
    low, high = report.accuracy_interval(3, 5)
    assert "accuracy 95% interval" in text and f"{low:.3f}-{high:.3f}" in text
