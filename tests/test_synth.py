"""Synthetic smears: format, determinism, planted contamination where it says, learnable classes."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from toolkit.cli import main
from toolkit.data import CLASS_NAMES, load_dataset
from toolkit.errors import CellfuseError
from toolkit.synth import synthesize, write_synthetic

KINDS = {"exact_duplicate", "near_duplicate", "repeated_noncell", "label_conflict", "single_noncell"}


@pytest.fixture(scope="module")
def smear():
    return synthesize(200, seed=1)


def _cells(planted, m):
    """Rows that are not planted."""
    return np.setdiff1d(np.arange(m), np.concatenate([rows for rows in planted.values()]))


def _gap(images, row, others):
    """Mean absolute pixel difference between `row` and each of `others`."""
    return np.abs(images[others].astype(np.int16) - images[row].astype(np.int16)).mean(axis=(1, 2, 3))


def test_format_and_every_class(smear):
    images, labels, planted = smear
    n_planted = sum(len(rows) for rows in planted.values())
    assert images.shape == (200 + n_planted, 96, 96, 3) and images.dtype == np.uint8
    assert labels.shape == (len(images),) and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < len(CLASS_NAMES)
    assert set(planted) == KINDS and all(planted.values())
    assert 0.02 < n_planted / 200 < 0.15  # a few percent, like the real file
    cells = _cells(planted, len(labels))
    assert np.bincount(labels[cells], minlength=8).min() >= 5
    assert images[cells].std() > 10  # pictures, not flat fills


def test_same_seed_same_bytes_other_seed_differs():
    a, b, c = synthesize(24, seed=3), synthesize(24, seed=3), synthesize(24, seed=4)
    assert a[0].tobytes() == b[0].tobytes() and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])


def test_planted_rows_are_what_they_claim(smear):
    images, labels, planted = smear
    every = np.concatenate([rows for rows in planted.values()])
    assert len(set(every.tolist())) == len(every) and every.max() < len(labels)  # disjoint, in range
    cells = _cells(planted, len(labels))
    for row in planted["exact_duplicate"]:
        twins = cells[_gap(images, row, cells) == 0]
        assert len(twins) == 1 and labels[twins[0]] == labels[row]
    for row in planted["near_duplicate"] + planted["label_conflict"]:
        gaps = _gap(images, row, cells)
        source = cells[np.argmin(gaps)]
        assert 0 < gaps.min() < 10  # close to one cell, but not a byte copy
        assert (labels[source] == labels[row]) == (row in planted["near_duplicate"])
    repeats = planted["repeated_noncell"]
    assert len(np.unique(labels[repeats])) >= 4  # the same pictures under assorted labels
    for row in repeats + planted["single_noncell"]:
        assert _gap(images, row, cells).min() > 20  # nothing like a smear


def test_classes_really_differ():
    from sklearn.linear_model import LogisticRegression

    images, labels, planted = synthesize(400, seed=2)
    cells = _cells(planted, len(labels))
    features = images[cells].reshape(-1, 8, 12, 8, 12, 3).mean(axis=(2, 4)).reshape(len(cells), -1) / 255
    train, test = slice(0, 300), slice(300, None)
    model = LogisticRegression(max_iter=500, C=0.3).fit(features[train], labels[cells][train])
    accuracy = model.score(features[test], labels[cells][test])
    majority = np.bincount(labels[cells][test]).max() / len(labels[cells][test])
    assert accuracy > max(0.45, 2 * majority)


def test_write_synthetic_refuses_overwrite_and_records_planted(tmp_path, smear):
    out = tmp_path / "demo.npz"
    write_synthetic(out, n=200, seed=1)
    record = json.loads(out.with_suffix(".planted.json").read_text())
    images, labels, planted = smear
    assert record["planted"] == planted and record["rows"] == len(labels) and record["seed"] == 1
    for row, source in record["source_of"].items():
        if int(row) in planted["exact_duplicate"]:
            assert np.array_equal(images[int(row)], images[source])
    before = out.read_bytes()
    with pytest.raises(CellfuseError, match="already exists"):
        write_synthetic(out, n=50, seed=2)
    assert out.read_bytes() == before
    write_synthetic(out, n=50, seed=2, force=True)
    assert len(load_dataset(out)) == json.loads(out.with_suffix(".planted.json").read_text())["rows"]


@pytest.mark.parametrize("kwargs, message", [({"n": 3}, "at least 8"), ({"seed": -1}, "seed")])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(CellfuseError, match=message):
        write_synthetic(tmp_path / "x.npz", **kwargs)
    with pytest.raises(CellfuseError, match=".npz"):
        write_synthetic(tmp_path / "x.csv", n=10)


def test_cli_end_to_end(tmp_path, smear):
    out = tmp_path / "demo.npz"
    result = CliRunner().invoke(main, ["synth", "--out", str(out), "--n", "200", "--seed", "1"])
    assert result.exit_code == 0, result.output
    data = load_dataset(out)
    assert np.array_equal(data.images, smear[0]) and np.array_equal(data.labels, smear[1])
    again = CliRunner().invoke(main, ["synth", "--out", str(out), "--n", "200"])
    assert again.exit_code == 2
