"""The figures a person reads: what each one draws (full class names, integer epochs, stage lines, a
colour bar), checked on the matplotlib figure itself."""

import numpy as np
import pytest
from conftest import make_images
from matplotlib.backends.backend_agg import FigureCanvasAgg

from toolkit import clean, interpret, report, runs


@pytest.fixture
def drawn(monkeypatch):
    """Every figure saved through the toolkit's one saving function, kept for inspection."""
    figures = []
    save = runs.atomic_save_figure

    def keep(fig, path, **kwargs):
        figures.append(fig)
        return save(fig, path, **kwargs)

    for module in (runs, report, clean):  # report and clean import the name at load time
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
