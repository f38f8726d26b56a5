"""Test-time views: names, the dihedral group, prediction per view, merging, the wrapped model."""

import numpy as np
import pytest
from conftest import make_images

from toolkit.errors import CellfuseError
from toolkit.tta import (
    D4,
    VIEW_SETS,
    merge,
    parse_tta,
    parse_views,
    predict_views,
    view_layer,
    wrap_with_tta,
)


def tiny_model(seed: int = 0, train_images: np.ndarray | None = None, train_labels=None, epochs: int = 10):
    """A small cellfuse-contract model (raw 0..255 in, 8 probabilities out), optionally fitted."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((96, 96, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.AveragePooling2D(4)(x)
    x = keras.layers.Conv2D(16, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(8, activation="softmax")(x))
    if train_images is not None:
        model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
        model.fit(train_images, train_labels, epochs=epochs, batch_size=32, verbose=0)
    return model


def lopsided_image() -> np.ndarray:
    """An image no flip or rotation maps onto itself (every dihedral view differs)."""
    image = np.zeros((96, 96, 3), dtype=np.float32)
    image[5:20, 10:60] = 255  # a bar near the top, off centre
    image[40:90, 80:90, 1] = 128  # a stripe on the right
    image[70, 3] = 50
    return image


def apply(view: str, images: np.ndarray) -> np.ndarray:
    return np.asarray(view_layer(view)(images.astype(np.float32)))


def test_view_specs_expand_sets_drop_duplicates_and_reject_unknown_names():
    assert parse_views("d4") == D4 and len(set(D4)) == 8
    assert parse_views("none") == ["id"]
    union = parse_views("d4+shifts")
    assert union[:8] == D4 and len(union) == len(set(union)) == 8 + 4
    assert parse_views("id+rot90+zoom1.15") == ["id", "rot90", "zoom1.15"]
    assert parse_tta("flips:geometric") == (VIEW_SETS["flips"], "geometric")
    assert parse_tta("d4") == (D4, "mean")
    for bad in ("d5", "rot45", "d4+", "zoom0", "flips:median"):
        with pytest.raises(CellfuseError):
            parse_tta(bad)


def test_d4_views_are_the_eight_distinct_dihedral_transforms():
    image = lopsided_image()[None]
    views = {v: apply(v, image)[0] for v in D4}
    expected = [np.rot90(f, k) for f in (image[0], image[0][:, ::-1]) for k in range(4)]
    for view, got in views.items():
        matches = [i for i, e in enumerate(expected) if np.array_equal(got, e)]
        assert len(matches) == 1, f"{view} is not exactly one dihedral transform"
    assert len({v.tobytes() for v in views.values()}) == 8
    assert np.array_equal(views["id"], image[0])
    assert np.array_equal(views["flip"], image[0][:, ::-1])
    assert np.array_equal(views["rot90"], np.rot90(image[0]))


def test_shift_moves_content_scale_keeps_the_size_photometric_stays_in_range():
    images, _ = make_images(2)
    images = images.astype(np.float32)
    shifted = apply("down4", images)
    np.testing.assert_array_equal(shifted[:, 4:], images[:, :-4])
    np.testing.assert_array_equal(apply("left3", images)[:, :, :-3], images[:, :, 3:])
    square = np.zeros((1, 96, 96, 3), dtype=np.float32)
    square[:, 38:58, 38:58] = 255  # 20 x 20, centred
    area = {z: (apply(z, square) > 127).all(-1).sum() for z in ("zoom0.8", "zoom1.25")}
    assert area["zoom1.25"] == pytest.approx(25 * 25, rel=0.1)  # magnified about the centre
    assert area["zoom0.8"] == pytest.approx(16 * 16, rel=0.1)
    for view in VIEW_SETS["photometric"][1:]:
        out = apply(view, images)
        assert out.min() >= 0 and out.max() <= 255 and not np.allclose(out, images)
    assert apply("bright16", images).mean() > images.mean() > apply("bright-16", images).mean()


def test_predict_views_identity_matches_predict_and_views_differ():
    model = tiny_model()
    images, _ = make_images(10)
    probs = predict_views(model, images, ["id", "rot90", "zoom1.1"], batch_size=4)
    assert probs.shape == (3, 10, 8) and probs.dtype == np.float32
    np.testing.assert_allclose(probs[0], model.predict(images.astype(np.float32), verbose=0), atol=1e-6)
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
    assert not np.allclose(probs[0], probs[2])
    calls = []
    predict_views(model, images, "flips", batch_size=8, progress=calls.append)
    assert sum(calls) == pytest.approx(4)  # in units of views over the whole data set


def test_a_model_ending_in_logits_is_named_not_scored():
    """A member without a softmax gave an ensemble's self-check failure, and evaluate NLL 18 and ECE 0."""
    import keras

    softmax = tiny_model()
    logits = keras.Model(softmax.inputs, softmax.layers[-1].output, name="logits_only")
    logits.layers[-1].activation = keras.activations.linear
    images, _ = make_images(4)
    with pytest.raises(CellfuseError, match="model 'logits_only' does not output class probabilities .*needs a softmax"):
        predict_views(logits, images, "none")


def test_merge_mean_geometric_and_logits():
    probs = np.array([[[0.7, 0.2, 0.1]], [[0.1, 0.6, 0.3]]])
    np.testing.assert_allclose(merge(probs, "mean"), [[0.4, 0.4, 0.2]])
    geometric = np.sqrt(probs[0] * probs[1])
    np.testing.assert_allclose(merge(probs, "geometric"), geometric / geometric.sum(), rtol=1e-9)
    # a softmax model's logits are log-probabilities up to a per-image constant
    np.testing.assert_allclose(merge(probs, "logits"), merge(probs, "geometric"))
    with pytest.raises(CellfuseError):
        merge(probs, "median")


@pytest.mark.parametrize("how", ["mean", "geometric"])
def test_wrapped_model_equals_merged_view_predictions_and_survives_saving(tmp_path, how):
    import keras

    import toolkit.layers  # noqa: F401

    model = tiny_model(seed=1)
    images, _ = make_images(6)
    expected = merge(predict_views(model, images, "d4"), how)
    wrapped = wrap_with_tta(model, f"d4:{how}")
    np.testing.assert_allclose(wrapped.predict(images.astype(np.float32), verbose=0), expected, atol=1e-5)
    wrapped.save(tmp_path / "tta.keras")
    loaded = keras.saving.load_model(tmp_path / "tta.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(images.astype(np.float32), verbose=0), expected, atol=1e-5)


def test_view_layer_config_round_trips():
    import toolkit.layers as layers

    layer = view_layer("flip_rot270_up2_zoom1.2_bright-8_contrast0.9_gamma1.1")
    config = layer.get_config()
    assert (config["rot90"], config["flip"], config["shift"], config["zoom"]) == (3, True, [-2, 0], 1.2)
    clone = layers.ImageView.from_config(config)
    images = make_images(2)[0].astype(np.float32)
    np.testing.assert_array_equal(np.asarray(clone(images)), np.asarray(layer(images)))


# ---------------------------------------------------------------- normalising views

def _flat_cells(n=2, seed=0):
    from conftest import make_images

    return make_images(n, seed=seed)[0].astype(np.float32)


def test_lab_conversion_matches_known_values_and_round_trips():
    from toolkit.layers import lab_to_rgb, rgb_to_lab

    lab = np.asarray(rgb_to_lab(np.array([[255.0, 255, 255], [255, 0, 0], [0, 0, 0]], np.float32)))
    np.testing.assert_allclose(lab, [[100, 0, 0], [53.24, 80.09, 67.20], [0, 0, 0]], atol=0.05)
    images = _flat_cells()
    np.testing.assert_allclose(np.asarray(lab_to_rgb(rgb_to_lab(images))), images, atol=0.01)


def test_grayworld_removes_a_colour_cast():
    from toolkit.layers import Normalize

    cast = np.clip(_flat_cells() * np.array([1.15, 1.0, 0.8], np.float32), 0, 255)
    means = np.asarray(Normalize(["grayworld"])(cast)).mean((1, 2))
    np.testing.assert_allclose(means, np.repeat(means.mean(1, keepdims=True), 3, 1), rtol=0.02)


def test_stretch_undoes_a_contrast_loss():
    from toolkit.layers import Normalize

    flat = 100 + 0.2 * _flat_cells()  # contrast cut to a fifth
    out = np.asarray(Normalize(["stretch"])(flat))
    assert out.min() == 0 and out.max() == 255
    assert np.percentile(out, 99) - np.percentile(out, 1) > 200


def test_median3_removes_impulse_noise_and_keeps_flat_areas():
    from toolkit.layers import Normalize

    flat = np.full((1, 12, 12, 3), 120.0, np.float32)
    noisy = flat.copy()
    noisy[0, 5, 7] = 255.0
    np.testing.assert_array_equal(np.asarray(Normalize(["median3"])(noisy)), flat)


def test_reinhard_matches_the_target_stain_whatever_the_input_stain():
    from toolkit.layers import REINHARD_MEAN, REINHARD_STD, Normalize, rgb_to_lab

    images = _flat_cells()
    tinted = np.clip(images * np.array([0.9, 1.05, 1.1], np.float32) + 10, 0, 255)
    for x in (images, tinted):
        lab = np.asarray(rgb_to_lab(np.asarray(Normalize(["reinhard"])(x))))
        np.testing.assert_allclose(lab.mean((1, 2)), np.broadcast_to(REINHARD_MEAN, (2, 3)), atol=2.0)
        np.testing.assert_allclose(lab.std((1, 2)), np.broadcast_to(REINHARD_STD, (2, 3)), rtol=0.15)
    a, b = (np.asarray(Normalize(["reinhard"])(x)) for x in (images, tinted))
    assert np.abs(a - b).mean() < 0.25 * np.abs(images - tinted).mean()  # the tint is mostly undone


def test_normalising_views_parse_build_and_survive_saving(tmp_path):
    import keras

    from toolkit.runs import load_model
    from toolkit.tta import parse_views, wrap_with_tta

    assert parse_views("normalize") == ["id", "grayworld", "stretch", "reinhard", "median3", "median3_reinhard"]
    with pytest.raises(CellfuseError, match="cannot be joined"):
        parse_views("flip_reinhard")
    inputs = keras.Input((96, 96, 3))
    model = keras.Model(inputs, keras.layers.Softmax()(keras.layers.Dense(8)(keras.layers.GlobalAveragePooling2D()(inputs))))
    wrapped = wrap_with_tta(model, "normalize")
    wrapped.save(tmp_path / "m.keras")
    images = _flat_cells()
    np.testing.assert_allclose(np.asarray(load_model(tmp_path / "m.keras").predict(images, verbose=0)),
                               np.asarray(wrapped.predict(images, verbose=0)), atol=1e-5)


def test_a_recipe_s_normalize_is_a_layer_before_the_backbone():
    from toolkit.backbones import build_classifier
    from toolkit.recipe import load_recipe

    model = build_classifier(load_recipe("tiny", ['model.normalize="median3+reinhard"']).model, 8)
    assert model.get_layer("normalize").methods == ("median3", "reinhard")
    with pytest.raises(CellfuseError, match="model.normalize"):
        load_recipe("tiny", ['model.normalize="sepia"'])
