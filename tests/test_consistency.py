"""AugMix + Jensen-Shannon consistency: the loss term, the three-view batches, and training with it."""

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_images

from toolkit.augment import check_section, make_batch_augmenter
from toolkit.cli import main
from toolkit.consistency import VIEWS, ConsistencyModel, jensen_shannon, split_views
from toolkit.data import one_hot
from toolkit.errors import CellfuseError
from toolkit.recipe import load_recipe

N_CLASSES = 8
TINY = Path(__file__).parents[1] / "recipes" / "tiny.toml"


def entropy(p):
    return -(p * np.log(p)).sum(-1)


# ----------------------------------------------------------------------------- the JSD term

def test_jsd_is_zero_for_identical_predictions():
    p = np.random.default_rng(0).dirichlet(np.ones(N_CLASSES), size=16).astype(np.float32)
    np.testing.assert_allclose(np.asarray(jensen_shannon(p, p, p)), 0.0, atol=1e-6)


def test_jsd_matches_a_hand_computation():
    """JSD = H(mean of the three) - mean of their entropies: another formula than the code's KL sum."""
    p = np.array([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]], np.float32)
    q = np.array([[0.1, 0.8, 0.1], [0.4, 0.3, 0.3]], np.float32)
    r = np.array([[0.3, 0.3, 0.4], [0.5, 0.25, 0.25]], np.float32)
    expected = entropy((p + q + r) / 3) - (entropy(p) + entropy(q) + entropy(r)) / 3
    assert expected[0] > 0.1 and 0 < expected[1] < 0.01  # one far-apart row, one nearly agreeing
    np.testing.assert_allclose(np.asarray(jensen_shannon(p, q, r)), expected, rtol=1e-4, atol=1e-6)
    # bounded by ln 3 (three one-hot predictions on different classes)
    eye = np.eye(3, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(jensen_shannon(eye[:1], eye[1:2], eye[2:])), [np.log(3)], rtol=1e-4)


# ----------------------------------------------------------------------------- three-view batches

def test_three_view_batches_interleave_clean_and_two_augmix_views():
    import tensorflow as tf

    images, labels = make_images(8, seed=1)
    section = check_section({"preset": "none", "augmix": True}, "t")
    fn = make_batch_augmenter(section, N_CLASSES, seed=0, views=3)
    out, out_labels = (t.numpy() for t in fn(tf.constant(images, tf.float32), tf.constant(one_hot(labels, 8))))
    assert out.shape == (8 * VIEWS, 96, 96, 3) and out_labels.shape == (8 * VIEWS, N_CLASSES)
    clean, aug1, aug2 = split_views(out)
    np.testing.assert_array_equal(clean, images)  # preset none: the clean view is the image itself
    np.testing.assert_array_equal(out_labels, np.repeat(one_hot(labels, N_CLASSES), 3, axis=0))
    changed = [np.abs(a - c).mean() for a, c in zip(np.concatenate([aug1, aug2]), np.concatenate([clean, clean]),
                                                    strict=True)]
    assert np.mean(changed) > 1.0, "AugMix left the images alone"
    assert np.abs(aug1 - aug2).mean() > 1.0, "the two AugMix views are the same"


def test_three_views_need_augmix():
    with pytest.raises(ValueError):
        make_batch_augmenter(check_section({"preset": "light"}, "t"), N_CLASSES, views=3)


# ----------------------------------------------------------------------------- recipe checks

@pytest.mark.parametrize("sets, words", [
    (["train.consistency=12.0"], ["consistency", "augmix = true"]),
    (["train.consistency=-1.0", "augment.augmix=true"], ["consistency", "-1"]),
])
def test_consistency_needs_augmix_and_a_non_negative_weight(sets, words, tmp_path):
    with pytest.raises(CellfuseError) as error:
        load_recipe(TINY, sets)  # refused as the recipe loads, before any TensorFlow
    assert all(w in str(error.value) for w in words)


# ----------------------------------------------------------------------------- the term does its job

def _small_model(seed):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255.0),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu"), keras.layers.BatchNormalization(),
        keras.layers.Conv2D(32, 3, strides=2, activation="relu"), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(N_CLASSES, activation="softmax")])


def _views_of(images, seed):
    """Fixed (clean, AugMix, AugMix) rows of `images`, computed once for every model to share."""
    import tensorflow as tf

    from toolkit.augment import augment_dataset

    section = check_section({"preset": "none", "augmix": True}, "t")
    y = one_hot(np.zeros(len(images), int), N_CLASSES)
    ds = tf.data.Dataset.from_tensor_slices((images.astype(np.float32), y)).batch(32)
    return np.concatenate([x for x, _ in augment_dataset(ds, section, N_CLASSES, seed=seed, views=3)
                          .as_numpy_iterator()])  # in tf.data's graph: eager keras-cv AugMix is ~10x slower


def _train(weight, rows, labels, steps, batch=16):
    import keras

    model = _small_model(seed=0)
    wrapper = ConsistencyModel(model, weight)
    wrapper.compile(optimizer=keras.optimizers.Adam(3e-3), loss=keras.losses.CategoricalCrossentropy())
    history = []
    for step in range(steps):
        i = (step * batch) % (len(rows) // VIEWS)
        x = rows[VIEWS * i:VIEWS * (i + batch)]
        history.append(wrapper.train_on_batch(x, np.repeat(labels[i:i + batch], VIEWS, axis=0), return_dict=True))
    return model, history


def test_consistency_brings_the_augmix_views_predictions_together():
    """Same model, data and seed; only the JSD weight differs. On held-out images the predictions for
    two AugMix views of one image agree more (mean JSD over 64 images) with the term than without:
    measured about 10x closer, asserted 2x."""
    train_images, train_labels = make_images(96, seed=5, size=32)
    held_out, _ = make_images(64, seed=6, size=32)
    rows, held_rows = _views_of(train_images, seed=1), _views_of(held_out, seed=2)
    targets = one_hot(train_labels, N_CLASSES)
    within, between = {}, {}
    for weight in (0.0, 12.0):
        model, history = _train(weight, rows, targets, steps=40)
        assert ("jsd" in history[-1]) and np.isfinite(history[-1]["loss"])
        probs = model.predict(held_rows, verbose=0, batch_size=64)
        within[weight] = float(np.mean(jensen_shannon(*split_views(probs))))
        clean = split_views(probs)[0]
        rng = np.random.default_rng(0)  # three different images' clean views
        between[weight] = float(np.mean(jensen_shannon(clean, clean[rng.permutation(64)], clean[rng.permutation(64)])))
    assert within[12.0] < 0.5 * within[0.0], within
    # not met by predicting the same for every input: the image still moves predictions far more than the view
    assert within[12.0] < 0.5 * between[12.0], (within, between)


def test_a_distiller_with_consistency_asks_the_teacher_about_clean_views_only():
    """The mixin hands the base class's loss the clean rows: a function-matching teacher labels B
    images per step, not 3B views (its cost stays put), and the JSD term still joins the loss."""
    import keras

    from toolkit.consistency import ConsistencyDistiller
    from toolkit.distill import _probability_kl

    seen = []

    class Teacher(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(N_CLASSES, activation="softmax")

        def call(self, x, training=None):
            seen.append(x.shape[0])  # at trace time: the static batch the teacher is asked about
            return self.dense(x)

    student = keras.Sequential([keras.Input((12,)), keras.layers.Dense(N_CLASSES, activation="softmax")])
    teacher = Teacher()
    teacher(np.zeros((1, 12), np.float32))
    teacher.trainable = False
    distiller = ConsistencyDistiller(12.0, teacher=teacher, student=student,
                                     distillation_losses=_probability_kl(4.0), student_loss_weight=0.1)
    distiller.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy())
    x = np.random.default_rng(0).normal(size=(3 * 8, 12)).astype(np.float32)
    seen.clear()
    logs = distiller.train_on_batch(x, np.repeat(one_hot(np.arange(8), N_CLASSES), 3, axis=0), return_dict=True)
    assert seen and set(seen) == {8}, seen
    assert logs["jsd"] > 0 and np.isfinite(logs["loss"])


# ----------------------------------------------------------------------------- end to end

def test_augmix_with_consistency_trains_end_to_end(tiny_npz, tmp_path):
    """Over two replicas (conftest's two logical CPUs): each gets whole (clean, AugMix, AugMix) triples,
    and each traces its train step in its own thread."""
    from toolkit.train import train_recipe

    recipe = load_recipe(TINY, [f"data.train=\"{tiny_npz}\"", "augment.augmix=true", "augment.augmix_width=1",
                                "train.consistency=12.0", "train.distribute=\"mirrored\"",
                                "train.stages=[{epochs=2, lr=3e-3}]"])
    summary = train_recipe(recipe, runs_root=tmp_path / "runs")
    run = tmp_path / "runs" / "tiny"
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert len(rows) == 2 and (run / "best.keras").exists()
    assert {"loss", "jsd", "accuracy", "val_loss", "val_accuracy"} <= set(rows[0])
    assert "val_jsd" not in rows[0]  # validation batches have one view
    assert all(float(r["jsd"]) > 0 and np.isfinite(float(r["loss"])) for r in rows)
    assert summary["metrics"]["val"]["accuracy"] >= 0


def test_train_refuses_consistency_without_augmix(tiny_npz, tmp_path):
    result = CliRunner().invoke(main, ["train", str(TINY), "--set", f'data.train="{tiny_npz}"',
                                       "--set", "train.consistency=12.0", "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "augmix = true" in result.output
    assert not (tmp_path / "runs").exists()


def test_preview_shows_clean_and_two_augmix_views():
    from toolkit.augment import preview_grid

    images, labels = make_images(2, seed=4)
    section = check_section({"preset": "none", "augmix": True}, "t")
    grid, titles, ncols = preview_grid(images, labels, section, n_repeats=3, consistency=12.0)
    assert ncols == 4 and len(grid) == len(titles) == 2 * ncols  # the original + one triple per row
    assert [t.split("\n")[0] for t in titles[1:4]] == ["clean", "AugMix 1", "AugMix 2"]
    np.testing.assert_array_equal(grid[1], images[0])  # preset none: clean is the image itself
    assert np.abs(grid[2] - grid[1]).mean() > 1.0
    _, titles, _ = preview_grid(images, labels, section, n_repeats=3, consistency=0.0)
    assert titles[1].startswith("before AugMix")  # training without the term never sees this column
