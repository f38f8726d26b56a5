"""Corrupted copies of data sets: deterministic, label-preserving, never over the input."""

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_images

from toolkit.cli import main
from toolkit.corrupt import (
    CORRUPTIONS,
    FAMILIES,
    HELD_OUT,
    contents,
    corrupt_file,
    corrupt_image,
    corrupt_images,
    corrupt_share,
    layer_families,
    parse_families,
)
from toolkit.data import load_dataset, save_dataset
from toolkit.errors import CellfuseError


@pytest.fixture(scope="module")
def images():
    return make_images(12, seed=7)[0]


def test_corrupt_images_keeps_shape_and_dtype_and_changes_every_image(images):
    out = corrupt_images(images, severity=3, seed=0)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert all(not np.array_equal(a, b) for a, b in zip(out, images, strict=True))


def test_corrupt_images_is_deterministic_for_a_seed(images):
    np.testing.assert_array_equal(corrupt_images(images, 3, seed=1), corrupt_images(images, 3, seed=1))
    assert not np.array_equal(corrupt_images(images, 3, seed=1), corrupt_images(images, 3, seed=2))


def test_higher_severity_moves_images_further(images):
    def distance(severity):
        return np.mean([np.abs(corrupt_images(images, severity, seed).astype(float) - images).mean()
                        for seed in range(3)])

    assert distance(1) < distance(3) < distance(5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_returns_a_valid_changed_image(family, images):
    fn = FAMILIES[family][0]
    out = fn(images[0].astype(np.float32), 1.0, np.random.default_rng(0))
    assert out.shape == images[0].shape
    assert np.abs(np.clip(out, 0, 255) - images[0]).mean() > 0.5


def test_corrupt_image_draws_several_families(images, monkeypatch):
    """A severity-3 image gets 2 to 4 distinct corruptions."""
    import toolkit.corrupt as corrupt

    calls, counts = [], []
    families = {name: ((lambda x, s, rng, n=name: calls.append(n) or x), w)
                for name, (_, w) in corrupt.FAMILIES.items()}
    monkeypatch.setattr(corrupt, "FAMILIES", families)
    for seed in range(20):
        calls.clear()
        corrupt_image(images[0], 3, np.random.default_rng(seed))
        assert len(set(calls)) == len(calls)
        counts.append(len(calls))
    assert min(counts) >= 2 and max(counts) <= 4 and len(set(counts)) > 1


@pytest.mark.parametrize("severity", [0, 6])
def test_bad_severity_is_refused(images, severity):
    with pytest.raises(CellfuseError, match="severity"):
        corrupt_images(images, severity)


def test_non_uint8_images_are_refused(images):
    with pytest.raises(CellfuseError, match="uint8"):
        corrupt_images(images.astype(np.float32))


def test_a_share_of_rows_is_corrupted_each_row_its_own_way(images):
    """A tuned copy's training rows (and its preview): the drawn rows change, the others stay, and rows of
    one severity do not share one corruption: twelve copies of one image come out twelve ways."""
    same = np.repeat(images[:1], 12, axis=0)
    out, rows, severities = corrupt_share(same, 8, np.random.default_rng(0), seed=3)
    assert len(set(rows.tolist())) == 8 and set(severities.tolist()) <= {1, 2, 3, 4, 5}
    untouched = np.setdiff1d(np.arange(12), rows)
    np.testing.assert_array_equal(out[untouched], same[untouched])
    assert not any(np.array_equal(out[r], same[0]) for r in rows)
    assert len({out[r].tobytes() for r in rows}) == 8
    again, _, _ = corrupt_share(same, 8, np.random.default_rng(0), seed=3)
    np.testing.assert_array_equal(again, out)  # the same rows and corruptions for a seed (resumes agree)


def test_corrupt_file_keeps_labels_and_index_and_refuses_to_overwrite(tmp_path):
    images, labels = make_images(10, seed=8)
    data = save_dataset(tmp_path / "in.npz", images, labels, index=np.arange(100, 110))
    before = data.read_bytes()
    out = corrupt_file(data, tmp_path / "out.npz", severity=2, seed=3)
    shifted = load_dataset(out)
    np.testing.assert_array_equal(shifted.labels, labels)
    np.testing.assert_array_equal(shifted.index, np.arange(100, 110))
    np.testing.assert_array_equal(shifted.images, corrupt_images(images, 2, 3))
    with pytest.raises(CellfuseError, match="already exists"):
        corrupt_file(data, out)
    corrupt_file(data, out, seed=4, force=True)
    assert not np.array_equal(load_dataset(out).images, shifted.images)
    with pytest.raises(CellfuseError, match="input data itself"):
        corrupt_file(data, tmp_path / "." / "in.npz", force=True)
    assert data.read_bytes() == before


def test_corrupt_command_end_to_end(tmp_path, tiny_npz):
    out = tmp_path / "shifted.npz"
    args = ["corrupt", str(tiny_npz), "--out", str(out), "--severity", "4", "--seed", "5"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    clean, shifted = load_dataset(tiny_npz), load_dataset(out)
    np.testing.assert_array_equal(shifted.labels, clean.labels)
    np.testing.assert_array_equal(shifted.images, corrupt_images(clean.images, 4, 5))
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "already exists" in again.output
    missing = CliRunner().invoke(main, ["corrupt", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "x.npz")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_real_shifted_sample_looks_like_severity_three(shared):
    """Severity 3 matches the sample's share of dark (inverted) images and its colour spread."""
    sample = load_dataset(shared / "data" / "test_shifted_sample.npz").images
    train = load_dataset(shared / "data" / "train.npz").images[:1000]
    cells = train[train[:, :8, :8, 0].mean((1, 2)) > 200][:200]  # skip the planted non-cell pictures
    ours = corrupt_images(cells, 3, seed=0)

    def dark_share(x):
        return (x.reshape(len(x), -1).mean(1) < 100).mean()

    assert dark_share(cells) == 0
    assert abs(dark_share(ours) - dark_share(sample)) < 0.1


# ----------------------------------------------------------------------------- named families, held out


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_registered_corruption_is_deterministic_per_seed_and_changes_the_image(name, images):
    first = corrupt_images(images[:3], 4, seed=2, families=name)
    assert first.dtype == np.uint8 and first.shape == images[:3].shape
    np.testing.assert_array_equal(first, corrupt_images(images[:3], 4, seed=2, families=name))
    assert np.abs(first.astype(float) - images[:3]).mean() > 0.5
    deterministic = {"zoom_blur"}  # a fixed zoom sequence: nothing to draw
    if name not in deterministic:
        assert not np.array_equal(first, corrupt_images(images[:3], 4, seed=3, families=name))


def test_default_and_cellfuse_are_todays_mix(images):
    mixed = corrupt_images(images, 3, seed=5)
    np.testing.assert_array_equal(mixed, corrupt_images(images, 3, seed=5, families="cellfuse"))
    rngs = [np.random.default_rng([5, i]) for i in range(len(images))]
    np.testing.assert_array_equal(mixed, np.stack([corrupt_image(x, 3, r) for x, r in zip(images, rngs, strict=True)]))


def test_a_family_list_gives_each_image_one_of_them_drawn_by_its_own_generator(images):
    names = ("fog", "occlusion")
    both = corrupt_images(images, 3, seed=1, families=",".join(names))
    picks = []
    for i, image in enumerate(images):
        rng = np.random.default_rng([1, i])
        picks.append(names[rng.integers(2)])
        expected = np.clip(np.round(CORRUPTIONS[picks[-1]](image.astype(np.float32), 3, rng)), 0, 255)
        np.testing.assert_array_equal(both[i], expected.astype(np.uint8))
    assert set(picks) == set(names)
    assert parse_families("held-out") == tuple(HELD_OUT)
    assert parse_families("own,fog,blur") == (*FAMILIES, "fog")
    with pytest.raises(CellfuseError, match="unknown corruption family 'frost'"):
        corrupt_images(images, 3, families="fog,frost")


def test_held_out_families_are_in_no_preset_and_not_in_cellfuses_own_mix():
    """Adding a layer that imitates a held-out family to a preset fails here; so does a new layer
    missing from LAYER_FAMILIES (the table must say what every preset layer imitates)."""
    from toolkit.augment import PRESETS

    preset_families = {name: set().union(*[layer_families(spec["layer"]) for spec in specs]) if specs else set()
                       for name, specs in PRESETS.items()}
    for preset, families in preset_families.items():
        assert not families & set(HELD_OUT), f"preset {preset!r} trains on held-out {families & set(HELD_OUT)}"
    assert not contents("cellfuse") & set(HELD_OUT)
    assert "gaussian_blur" in preset_families["heavy"] and "occlusion" in preset_families["medium"]


def test_layer_table_covers_every_layer_augment_knows_and_refuses_unknown_ones():
    from toolkit.augment import KERAS_CV_LAYERS, KERAS_LAYERS, OWN_LAYERS

    for layer in {*KERAS_CV_LAYERS, *KERAS_LAYERS, *OWN_LAYERS}:
        assert layer_families(layer), layer
    assert layer_families("keras.GaussianNoise") == {"gaussian_noise"}
    with pytest.raises(CellfuseError, match="LAYER_FAMILIES"):
        layer_families("RandomFrost")


def test_corrupt_command_writes_held_out_families(tmp_path, tiny_npz):
    out = tmp_path / "held_out.npz"
    result = CliRunner().invoke(main, ["corrupt", str(tiny_npz), "--out", str(out), "--families", "held-out"])
    assert result.exit_code == 0, result.output
    clean = load_dataset(tiny_npz)
    np.testing.assert_array_equal(load_dataset(out).images, corrupt_images(clean.images, 3, 0, families="held-out"))
    bad = CliRunner().invoke(main, ["corrupt", str(tiny_npz), "--out", str(tmp_path / "x.npz"), "--families", "smog"])
    assert bad.exit_code == 2 and "smog" in bad.output
