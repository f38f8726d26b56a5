"""The one data loader: every bad input is one clear error naming the file and the problem."""

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_images

from toolkit.data import load_dataset, save_dataset, stratified_split
from toolkit.errors import CellfuseError


def npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


GOOD = make_images(16)


@pytest.mark.parametrize("arrays, message", [
    ({"images": GOOD[0]}, r"missing key\(s\) \['labels'\]"),
    ({"images": GOOD[0][0], "labels": GOOD[1]}, r"expected rank 4"),
    ({"images": GOOD[0].transpose(0, 3, 1, 2), "labels": GOOD[1]}, r"looks channels-first"),
    ({"images": GOOD[0][:, :64], "labels": GOOD[1]}, r"expected \(N,96,96,3\)"),
    ({"images": GOOD[0] / 255.0, "labels": GOOD[1]}, r"looks like 0..1"),
    ({"images": GOOD[0].astype(float) * 2, "labels": GOOD[1]}, r"expected 0..255"),
    ({"images": np.full(GOOD[0].shape, np.nan), "labels": GOOD[1]}, r"NaN or infinite"),
    ({"images": GOOD[0].astype(np.complex64), "labels": GOOD[1]}, r"dtype complex64"),
    ({"images": GOOD[0], "labels": GOOD[1] + 8}, r"label \d+ at row \d+ is out of range 0..7"),
    ({"images": GOOD[0], "labels": -GOOD[1] - 1}, r"out of range"),
    ({"images": GOOD[0], "labels": GOOD[1][:5]}, r"5 labels for 16 images"),
    ({"images": GOOD[0], "labels": GOOD[1] + 0.5}, r"non-integer"),
    ({"images": GOOD[0], "labels": GOOD[1].reshape(4, 4)}, r"expected \(N,\) or \(N,1\)"),
    ({"images": GOOD[0], "labels": np.array(["a"] * 16)}, r"expected integers"),
])
def test_bad_arrays(tmp_path, arrays, message):
    path = npz(tmp_path, **arrays)
    with pytest.raises(CellfuseError, match=message) as e:
        load_dataset(path)
    assert str(path) in str(e.value)


def test_object_array_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, images=np.array([GOOD[0][0], None], dtype=object), labels=np.zeros(2))
    with pytest.raises(CellfuseError, match="object arrays"):
        load_dataset(path)


def test_truncated_and_garbage_files(tmp_path):
    good = save_dataset(tmp_path / "good.npz", *GOOD)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:500])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    for path in (truncated, garbage):
        with pytest.raises(CellfuseError, match="not a readable .npz"):
            load_dataset(path)
    with pytest.raises(CellfuseError, match="no such file"):
        load_dataset(tmp_path / "missing.npz")


def test_challenge_format_round_trip(tmp_path):
    images, labels = GOOD
    path = save_dataset(tmp_path / "x.npz", images, labels)
    with np.load(path) as f:
        assert f["labels"].shape == (16, 1) and f["images"].dtype == np.uint8
    data = load_dataset(path)
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)
    np.testing.assert_array_equal(data.index, np.arange(16))
    sub = data.subset(np.array([3, 5]))
    np.testing.assert_array_equal(sub.index, [3, 5])


def test_float_pixels_in_range_are_accepted(tmp_path):
    data = load_dataset(npz(tmp_path, images=GOOD[0].astype(np.float32), labels=GOOD[1].astype(float)))
    assert data.images.dtype == np.uint8 and data.labels.dtype == np.int64


def test_class_folder(tmp_path):
    from PIL import Image

    for c, name in enumerate(["a_cells", "b_cells"]):
        (tmp_path / "root" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(GOOD[0][c * 3 + i]).save(tmp_path / "root" / name / f"{i}.png")
    Image.fromarray(GOOD[0][0][:50, :50]).save(tmp_path / "root" / "b_cells" / "small.png")  # resized
    (tmp_path / "root" / "b_cells" / "broken.png").write_bytes(b"nope")
    with pytest.raises(CellfuseError, match="broken.png: unreadable image"):
        load_dataset(tmp_path / "root")
    (tmp_path / "root" / "b_cells" / "broken.png").unlink()
    data = load_dataset(tmp_path / "root")
    assert data.class_names == ("a_cells", "b_cells")
    assert data.images.shape == (7, 96, 96, 3) and list(data.labels) == [0, 0, 0, 1, 1, 1, 1]


def test_stratified_split_is_reproducible_and_balanced():
    labels = np.repeat(np.arange(8), 20)
    a_train, a_val = stratified_split(labels, 0.25, seed=1)
    b_train, b_val = stratified_split(labels, 0.25, seed=1)
    np.testing.assert_array_equal(a_val, b_val)
    assert not set(a_train) & set(a_val) and len(a_val) == 40
    assert np.all(np.bincount(labels[a_val]) == 5)


def test_cli_reports_bad_input_in_one_line(tmp_path):
    from toolkit.cli import main

    path = npz(tmp_path, images=GOOD[0])
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "none.keras"), str(path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_too_small_a_validation_split_is_one_clear_line():
    from toolkit.data import stratified_split

    labels = np.arange(40) % 8
    with pytest.raises(CellfuseError, match="leaves 6 of 40 rows for 8 classes; use at least 0.20"):
        stratified_split(labels, 0.15, 0)
    train, val = stratified_split(labels, 0.2, 0)
    assert len(val) == 8 and set(labels[val]) == set(range(8))
