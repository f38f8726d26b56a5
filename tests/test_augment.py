"""Augmentation pipelines: presets and layer lists inside tf.data, mixing, validation, seeds, previews."""

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import make_images

from toolkit.augment import (
    KERAS_CV_LAYERS,
    KERAS_LAYERS,
    PRESETS,
    augment_dataset,
    check_section,
    make_batch_augmenter,
    pipeline_throughput,
    preview_arrays,
    preview_recipe,
    save_batch_grid,
)
from toolkit.data import CLASS_NAMES, one_hot, save_dataset
from toolkit.errors import CellfuseError

N_CLASSES = 8


@pytest.fixture(scope="module")
def batch():
    images, labels = make_images(16, seed=1)
    return images.astype(np.float32), one_hot(labels, N_CLASSES)


def run_in_tf_data(section, images, labels, seed=0, validation=False, batch_size=8):
    """All batches of (images, labels) through augment_dataset, as training runs it."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
    ds = augment_dataset(ds, section, N_CLASSES, seed=seed, validation=validation)
    out = list(ds.as_numpy_iterator())
    return np.concatenate([x for x, _ in out]), np.concatenate([y for _, y in out])


def assert_valid_batch(images, labels, n):
    assert images.shape == (n, 96, 96, 3) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 255
    assert labels.shape == (n, N_CLASSES) and labels.dtype == np.float32
    np.testing.assert_allclose(labels.sum(1), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------- presets and layer lists

@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "none"])
def test_each_preset_runs_in_tf_data_and_keeps_shape_and_range(preset, batch):
    images, labels = batch
    out, out_labels = run_in_tf_data(check_section({"preset": preset}, "t"), images, labels)
    assert_valid_batch(out, out_labels, len(images))
    assert not np.allclose(out, images), "the pipeline changed nothing"


def test_none_preset_leaves_the_data_alone(batch):
    section = check_section({"preset": "none"}, "t")
    assert make_batch_augmenter(section, N_CLASSES) is None
    out, out_labels = run_in_tf_data(section, *batch)
    np.testing.assert_array_equal(out, batch[0])
    np.testing.assert_array_equal(out_labels, batch[1])


def test_an_explicit_layer_list_replaces_the_preset(batch):
    images, labels = batch
    section = check_section({"preset": "heavy", "layers": [{"layer": "keras.RandomInvert", "factor": [1.0, 1.0]}]}, "t")
    assert section["mixup"] == 0 and section["cutmix"] == 0  # heavy's mixing comes with heavy's layers only
    out, out_labels = run_in_tf_data(section, images, labels)
    np.testing.assert_allclose(out, 255 - images, atol=1e-3)
    np.testing.assert_array_equal(out_labels, labels)


def test_random_rot90_turns_each_image_by_a_quarter_multiple(batch):
    images, labels = batch
    out, _ = run_in_tf_data(check_section({"layers": [{"layer": "RandomRot90"}]}, "t"), images, labels)
    turns = [[k for k in range(4) if np.array_equal(np.rot90(a, k), b)] for a, b in zip(images, out, strict=True)]
    assert all(len(t) >= 1 for t in turns)
    assert len({t[0] for t in turns}) > 1, "every image got the same turn"


def test_p_applies_a_layer_to_a_fraction_of_the_images():
    images, labels = make_images(64, seed=2)
    images = images.astype(np.float32)
    section = check_section({"layers": [{"layer": "keras.RandomInvert", "factor": [1.0, 1.0], "p": 0.5}]}, "t")
    out, _ = run_in_tf_data(section, images, one_hot(labels, N_CLASSES), batch_size=64)
    inverted = np.array([np.allclose(o, 255 - x, atol=1e-3) for o, x in zip(out, images, strict=True)])
    untouched = np.array([np.array_equal(o, x) for o, x in zip(out, images, strict=True)])
    assert np.all(inverted | untouched)
    assert 10 < inverted.sum() < 54


def test_unit_range_layers_are_rescaled(batch):
    """tf.image's JPEG works on 0..1: the pipeline must hand back 0..255 all the same."""
    images, labels = batch
    section = check_section({"layers": [{"layer": "RandomJpegQuality", "factor": [20, 40]}]}, "t")
    out, _ = run_in_tf_data(section, images, labels)
    assert out.max() > 100 and np.abs(out - images).mean() < 20


# ----------------------------------------------------------------------------- mixing

def test_mixed_batches_have_soft_labels_summing_to_one(batch):
    images, labels = batch
    section = check_section({"preset": "none", "mixup": 0.4, "cutmix": 1.0, "mix_prob": 1.0}, "t")
    out, out_labels = run_in_tf_data(section, images, labels)
    assert_valid_batch(out, out_labels, len(images))
    assert (out_labels.max(1) < 0.999).any(), "no row was mixed"
    assert not np.allclose(out, images)


def test_heavy_preset_mixes_by_default_and_mix_prob_zero_turns_it_off(batch):
    images, labels = batch
    heavy = check_section({"preset": "heavy"}, "t")
    assert heavy["mixup"] > 0 and heavy["cutmix"] > 0 and 0 < heavy["mix_prob"] <= 1
    _, out_labels = run_in_tf_data(check_section({"preset": "heavy", "mix_prob": 0}, "t"), images, labels)
    np.testing.assert_array_equal(out_labels, labels)


def test_validation_augmenter_uses_val_preset_and_never_mixes(batch):
    images, labels = batch
    section = check_section({"preset": "none", "val_preset": "light", "mixup": 1.0, "mix_prob": 1.0}, "t")
    out, out_labels = run_in_tf_data(section, images, labels, validation=True)
    np.testing.assert_array_equal(out_labels, labels)
    assert not np.allclose(out, images)
    assert make_batch_augmenter(check_section({}, "t"), N_CLASSES, validation=True) is None


# ----------------------------------------------------------------------------- seeds

def test_same_seed_gives_the_same_augmentation(batch):
    """Called batch after batch (eagerly, as in order), a seed fixes every draw, keras-cv's included."""
    import tensorflow as tf

    images, labels = batch
    section = check_section({"preset": "heavy", "mix_prob": 1.0}, "t")

    def two_batches(seed):
        fn = make_batch_augmenter(section, N_CLASSES, seed=seed)
        return [fn(tf.constant(images[i:i + 8]), tf.constant(labels[i:i + 8])) for i in (0, 8)]

    first, again, other = two_batches(3), two_batches(3), two_batches(4)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(x1.numpy(), x2.numpy())
        np.testing.assert_array_equal(y1.numpy(), y2.numpy())
    assert not np.array_equal(first[0][0].numpy(), other[0][0].numpy())


# ----------------------------------------------------------------------------- checking sections

def test_check_section_fills_defaults_and_is_idempotent():
    section = check_section({}, "t")
    assert section == {"preset": "medium", "layers": [], "mixup": 0.0, "cutmix": 0.0, "mix_prob": 0.5,
                       "val_preset": "none", "augmix": False, "augmix_severity": 0.3, "augmix_width": 3,
                       "augmix_depth": [1, 3]}
    heavy = check_section({"preset": "heavy", "mixup": 0}, "t")
    assert heavy["mixup"] == 0.0 and heavy["cutmix"] > 0
    assert check_section(heavy, "t") == heavy
    augmix = check_section({"augmix": True, "augmix_severity": 1, "augmix_depth": 2}, "t")
    assert augmix["augmix_severity"] == 1.0 and augmix["augmix_depth"] == [2, 2]
    assert check_section(augmix, "t") == augmix


@pytest.mark.parametrize("section, words", [
    ({"presets": "light"}, ["recipes/x.toml [augment]", "presets"]),
    ({"preset": "wild"}, ["preset", "wild"]),
    ({"val_preset": "heavy!"}, ["val_preset"]),
    ({"mixup": -1}, ["mixup"]),
    ({"mix_prob": 2}, ["mix_prob"]),
    ({"cutmix": "yes"}, ["cutmix"]),
    ({"layers": "RandAugment"}, ["layers"]),
    ({"layers": [{"magnitude": 0.3}]}, ["layers[0]", "layer ="]),
    ({"layers": [{"layer": "RandomSparkle"}]}, ["layers[0]", "RandomSparkle"]),
    ({"layers": [{"layer": "RandomFlip"}, {"layer": "RandAugment", "magnitude": 3}]}, ["layers[1]", "RandAugment"]),
    ({"layers": [{"layer": "RandomCutout", "height_factor": 0.2, "width_factor": 0.2, "nonsense": 1}]},
     ["layers[0]", "nonsense"]),
    ({"layers": [{"layer": "RandomRot90", "p": 1.5}]}, ["layers[0]", "p"]),
    ({"layers": [{"layer": "RandomRot90", "k": 2}]}, ["layers[0]", "k"]),
    ({"layers": [{"layer": "MixUp", "alpha": 0.2}]}, ["layers[0]", "mixup"]),
    ({"layers": [{"layer": "keras.GridMask"}]}, ["layers[0]", "keras.GridMask"]),
    ({"augmix": "yes"}, ["augmix", "true or false"]),
    ({"augmix": True, "augmix_severity": 2}, ["augmix_severity", "0.01..1"]),
    ({"augmix": True, "augmix_severity": "high"}, ["augmix_severity"]),
    ({"augmix": True, "augmix_width": 0}, ["augmix_width", "1..10"]),
    ({"augmix": True, "augmix_width": 2.5}, ["augmix_width"]),
    ({"augmix": True, "augmix_depth": [3, 1]}, ["augmix_depth", "low is above high"]),
    ({"augmix": True, "augmix_depth": [1, 2, 3]}, ["augmix_depth", "[low, high]"]),
    ({"augmix_width": 2}, ["augmix_width", "augmix = true"]),
    ({"augmix": True, "augmix_sevrity": 0.5}, ["augmix_sevrity"]),
    ({"mixup": float("nan")}, ["mixup", "finite number"]),  # nan slipped past the range: MixUp silently off
    ({"cutmix": float("inf")}, ["cutmix", "finite number"]),
    ({"mix_prob": float("nan")}, ["mix_prob", "finite number"]),
])
def test_bad_sections_name_the_place_and_the_key(section, words):
    with pytest.raises(CellfuseError) as error:
        check_section(section, "recipes/x.toml [augment]")
    message = str(error.value)
    assert message.startswith("recipes/x.toml [augment]") and "\n" not in message
    for word in words:
        assert word in message


# Every layer name the registry accepts, with parameters where it needs them; p exercises the subset path.
LAYER_EXAMPLES = {
    "AugMix": {}, "AutoContrast": {}, "ChannelShuffle": {}, "Equalization": {}, "Grayscale": {},
    "GridMask": {}, "JitteredResize": {}, "Posterization": {"bits": 3}, "RandAugment": {},
    "RandomBrightness": {"factor": 0.2}, "RandomChannelShift": {"factor": 0.2},
    "RandomColorDegeneration": {"factor": 0.5},
    "RandomColorJitter": {"brightness_factor": 0.1, "contrast_factor": 0.1, "saturation_factor": [0.3, 0.7],
                          "hue_factor": 0.1},
    "RandomContrast": {"factor": 0.2}, "RandomCutout": {"height_factor": 0.2, "width_factor": 0.2},
    "RandomFlip": {}, "RandomGaussianBlur": {"kernel_size": 3, "factor": 1.0},
    "RandomHue": {"factor": 0.3}, "RandomJpegQuality": {"factor": [30, 60]},
    "RandomRotation": {"factor": 0.2}, "RandomSaturation": {"factor": [0.3, 0.7]},
    "RandomSharpness": {"factor": 0.5}, "RandomShear": {"x_factor": 0.2},
    "RandomTranslation": {"height_factor": 0.05, "width_factor": 0.05}, "RandomZoom": {"height_factor": 0.1},
    "Solarization": {}, "GaussianNoise": {"stddev": 0.05}, "RandomElasticTransform": {},
    "RandomErasing": {}, "RandomGrayscale": {}, "RandomInvert": {}, "RandomPerspective": {},
    "RandomPosterization": {"factor": [3, 5]},
}
CORE_PARAMS = {"RandomColorDegeneration": {"factor": [0.2, 0.5]}, "RandomSaturation": {"factor": [0.3, 0.7]},
               "RandomColorJitter": {"brightness_factor": 0.1}, "RandomGaussianBlur": {"factor": 1.0},
               "RandomRotation": {"factor": 0.1}, "RandomShear": {"x_factor": [0.0, 0.2]},
               "RandomSharpness": {"factor": [0.2, 0.5]}, "RandomHue": {"factor": [0.2, 0.5]},
               "RandAugment": {"num_ops": 2, "factor": 0.3}}


KNOWN_LAYERS = sorted({f"keras_cv.{n}" for n in KERAS_CV_LAYERS} | {f"keras.{n}" for n in KERAS_LAYERS})


def one_layer_section(name: str) -> dict:
    source, base = name.split(".")
    params = CORE_PARAMS.get(base, LAYER_EXAMPLES[base]) if source == "keras" else LAYER_EXAMPLES[base]
    return check_section({"layers": [{"layer": name, **params, "p": 0.7}]}, "t")


@pytest.mark.parametrize("name", KNOWN_LAYERS)
def test_every_known_layer_runs_in_tf_data(name, batch):
    """One batch of 4 images per layer: what costs is building each layer's graph, not the images
    (all 51 in one tf.data map measured half again dearer than one pipeline each)."""
    images, labels = batch[0][:4], batch[1][:4]
    out, out_labels = run_in_tf_data(one_layer_section(name), images, labels)
    assert_valid_batch(out, out_labels, len(images))


# ----------------------------------------------------------------------------- previews and timing

def test_augmix_alone_is_one_more_augmentation(batch):
    """Without consistency, augmix = true adds AugMix after the preset: one view, same labels."""
    images, labels = batch
    out, out_labels = run_in_tf_data(check_section({"preset": "none", "augmix": True}, "t"), images, labels)
    assert_valid_batch(out, out_labels, len(images))
    np.testing.assert_array_equal(out_labels, labels)
    assert np.abs(out - images).mean() > 1.0


def test_augmix_after_layers_that_overshoot_the_pixel_range(batch):
    """Noise pushes pixels past 255; keras-cv's AugMix (its Equalization indexes a 256-bin histogram)
    crashed on them after the heavy preset until the images were clipped before it."""
    images, labels = batch
    bright = np.full_like(images, 250.0)
    section = check_section({"layers": [{"layer": "GaussianNoise", "stddev": 0.2}], "augmix": True,
                             "augmix_severity": 1.0}, "t")
    for views in (1, 3):
        import tensorflow as tf

        fn = make_batch_augmenter(section, N_CLASSES, seed=0, views=views)
        ds = tf.data.Dataset.from_tensor_slices((bright, labels)).batch(8).map(fn)
        out = np.concatenate([x for x, _ in ds.as_numpy_iterator()])
        assert out.shape[0] == views * len(images) and out.min() >= 0 and out.max() <= 255


def test_preview_arrays_draws_one_row_per_image(tmp_path):
    from PIL import Image

    images, labels = make_images(3, seed=3)
    section = check_section({"preset": "light", "mixup": 0.5, "mix_prob": 1.0}, "t")
    small = preview_arrays(images, labels, section, tmp_path / "a.png", n_repeats=2)
    large = preview_arrays(images, labels, section, tmp_path / "b.png", n_repeats=5)
    (w2, h2), (w5, h5) = Image.open(small).size, Image.open(large).size
    assert w5 > 1.5 * w2 and abs(h5 - h2) < 0.2 * h2  # more repeats, more columns; same rows


def toy_recipe(tmp_path, preset: str, corrupt_fraction: float = 0.0):
    """(recipe, images, labels): the fields preview_recipe reads, over a training file of 40 images."""
    images, labels = make_images(40, seed=4)
    data = save_dataset(tmp_path / "train.npz", images, labels)
    recipe = SimpleNamespace(name="toy", data=SimpleNamespace(train=data, corrupt_fraction=corrupt_fraction),
                             train=SimpleNamespace(seed=1, consistency=0.0),
                             augment=check_section({"preset": preset}, "t"))
    return recipe, images, labels


def test_preview_recipe_uses_the_recipe_fields(tmp_path, monkeypatch):
    """The grid shows the recipe's own training images, one per class, through its own augmentation."""
    import toolkit.augment

    recipe, images, labels = toy_recipe(tmp_path, "light")
    section = recipe.augment
    seen = {}
    monkeypatch.setattr(toolkit.augment, "preview_arrays", lambda *a, **k: seen.update(args=a, kwargs=k) or "x")
    preview_recipe(recipe, tmp_path / "p.png", n_images=3, n_repeats=2)
    shown, shown_labels, shown_section, out = seen["args"]
    assert len(shown) == 3 and len(set(shown_labels.tolist())) == 3  # distinct classes
    for image, label in zip(shown, shown_labels, strict=True):  # each one a row of the recipe's file
        rows = [i for i in range(len(images)) if np.array_equal(images[i], image)]
        assert rows and labels[rows[0]] == label
    assert shown_section is section and out == tmp_path / "p.png"
    assert seen["kwargs"]["seed"] == 1 and seen["kwargs"]["n_repeats"] == 2 and "toy" in seen["kwargs"]["title"]
    assert seen["kwargs"]["notes"] == ["", "", ""]


def test_preview_of_a_tuned_copy_shows_its_share_of_corrupted_rows(tmp_path, monkeypatch):
    """data.corrupt_fraction: that share of the rows is corrupted before augmenting, as in training,
    and their titles say so; the other rows are the file's own images."""
    import toolkit.augment

    recipe, images, _ = toy_recipe(tmp_path, "none", corrupt_fraction=0.5)
    seen = {}
    monkeypatch.setattr(toolkit.augment, "save_image_grid", lambda grid, titles, out, **k: seen.update(
        grid=grid, titles=titles) or out)
    preview_recipe(recipe, tmp_path / "p.png", n_images=6, n_repeats=1)
    originals, copies = seen["grid"][0::2], seen["grid"][1::2]  # each row: the original, one copy
    corrupted = [i for i, title in enumerate(seen["titles"][0::2]) if "corrupted, severity" in title]
    assert len(corrupted) == 3
    for i, (image, copy) in enumerate(zip(originals, copies, strict=True)):
        in_file = any(np.array_equal(image, row) for row in images)
        assert in_file == (i not in corrupted)
        np.testing.assert_array_equal(copy, image)  # preset none: the copy trains on the corrupted row


def test_a_batch_grid_titles_each_image_by_its_target(tmp_path, monkeypatch):
    """Distillation's targets are [teacher | labels]: the grid shows the teacher's columns, the mixed
    ones as their two shares, and no more than `n` images."""
    import toolkit.augment

    seen = {}
    monkeypatch.setattr(toolkit.augment, "save_image_grid", lambda images, titles, out, **k: seen.update(
        images=images, titles=titles) or out)
    n = len(CLASS_NAMES)
    teacher = one_hot(np.arange(30) % n, n)
    teacher[1] = 0.7 * teacher[1] + 0.3 * one_hot(np.array([2]), n)[0]
    packed = np.concatenate([teacher, one_hot(np.zeros(30, int), n)], 1)  # every label is basophil
    images = np.arange(30, dtype=np.float32)[:, None, None, None] * np.ones((1, 4, 4, 3), np.float32)
    save_batch_grid((images, packed), tmp_path / "g.png", n=24)
    assert len(seen["titles"]) == len(seen["images"]) == 24
    assert seen["titles"][0] == CLASS_NAMES[0] and seen["titles"][2] == CLASS_NAMES[2]  # the teacher's, not the label
    assert seen["titles"][1] == f"0.70 {CLASS_NAMES[1]}\n0.30 {CLASS_NAMES[2]}"
    np.testing.assert_array_equal(seen["images"][:, 0, 0, 0], np.arange(24))  # the batch's first, in order


def test_pipeline_throughput_measures_the_augmentation():
    """A measured rate, not a constant: the heavy preset's work shows against no augmentation at all."""
    images, labels = make_images(64, seed=5)
    none = pipeline_throughput(check_section({"preset": "none"}, "t"), images, labels, batch_size=16, n_batches=4)
    heavy = pipeline_throughput(check_section({"preset": "heavy"}, "t"), images, labels, batch_size=16, n_batches=4)
    assert 0 < heavy and none > 3 * heavy


def test_preview_command_end_to_end(tmp_path, tiny_npz):
    from click.testing import CliRunner

    from toolkit.cli import main

    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\n[augment]\npreset = "medium"\n')
    out = tmp_path / "grid.png"
    args = ["preview", str(recipe), "--set", f"data.train={tiny_npz}", "--out", str(out),
            "--images", "3", "--repeats", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert out.exists() and out.stat().st_size > 1000
    recipe.write_text('[augment]\npreset = "wild"\n')
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "wild" in result.output
