"""A run's data: the recipe's training file split into train and validation sets, checked loudly
(class balance, train/validation leakage), then fed as tf.data batches: uint8 arrays -> float32
0..255, augmented, sharded over workers.

Also here: the first batch's and the untrained model's sanity checks, and Predictor (batched forward
passes in inference mode, the one way cellfuse runs a model it is training or has just trained).
Below train, consistency, distill and sweep, which all read data this way. TensorFlow is imported
inside functions: importing this module is instant.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.panel import Panel

from toolkit.augment import make_batch_augmenter
from toolkit.corrupt import corrupt_share
from toolkit.data import (
    DEFAULT_THRESHOLD,
    Dataset,
    hash_groups,
    load_dataset,
    one_hot,
    phash_bits,
    stratified_split,
)
from toolkit.errors import CellfuseError
from toolkit.recipe import Recipe, extra_val_names


@dataclass
class Split:
    train: Dataset
    val: dict[str, Dataset]  # "val" (the split) first, then each extra validation file by stem


def load_split(recipe: Recipe, console: Console) -> Split:
    """The recipe's stratified train/validation split (data.limit rows at most), plus each extra_val file."""
    data = load_dataset(recipe.data.train, n_classes=recipe.data.n_classes)
    if recipe.data.limit:
        data = data.subset(np.arange(min(recipe.data.limit, len(data))))
    train_rows, val_rows = stratified_split(data.labels, recipe.data.val_fraction, recipe.data.split_seed)
    val = {"val": data.subset(val_rows)}
    for path, name in zip(recipe.data.extra_val, extra_val_names(recipe), strict=True):
        if name in val:  # each set is reported, and may steer, under its file's stem: one name, one set
            taken = "the split's own name" if name == "val" else "also the name of another data.extra_val file"
            raise CellfuseError(f"{recipe.path}: data.extra_val names {path}, whose name {name!r} is {taken}; "
                                "give each set a file name of its own")
        val[name] = load_dataset(path, n_classes=recipe.data.n_classes)
    console.print(f"data: {len(train_rows)} train / {len(val_rows)} val rows of {data.path}"
                  + "".join(f"; {name}: {len(d)}" for name, d in val.items() if name != "val"))
    return Split(data.subset(train_rows), val)


def corrupt_training_rows(train: Dataset, recipe: Recipe, console: Console) -> Dataset:
    """data.corrupt_fraction of the training rows corrupted once by the cellfuse mix, each at a severity
    drawn from 1-5 (the same rows and corruptions for a seed): validation stays clean. Applied after
    check_data: a corrupted copy of a training image can look like a validation image corrupted alike."""
    fraction = recipe.data.corrupt_fraction
    if not fraction:
        return train
    rng = np.random.default_rng(recipe.train.seed + 7)
    images, rows, _ = corrupt_share(train.images, round(fraction * len(train)), rng, seed=recipe.train.seed)
    console.print(f"corrupted {len(rows)} of {len(train)} training rows with the cellfuse mix (severities 1-5)")
    return dataclasses.replace(train, images=images)


def check_data(split: Split, recipe: Recipe, console: Console) -> None:
    """Class balance and train/validation leakage through duplicates: reported loudly."""
    counts = np.bincount(split.train.labels, minlength=split.train.n_classes)
    console.print("train class counts: " + ", ".join(
        f"{name} {c}" for name, c in zip(split.train.class_names, counts, strict=False)))
    if counts.min() == 0:
        warn(console, f"class(es) {[n for n, c in zip(split.train.class_names, counts, strict=False) if c == 0]} "
                       "have no training images")
    elif counts.max() / counts.min() > 10:
        warn(console, f"classes are imbalanced {counts.max() / counts.min():.0f}:1; "
                       "consider train.class_weights = \"balanced\"")
    train_hashes = _phash(split.train.images)
    for name, val in split.val.items():
        shared = leaked_rows(train_hashes, _phash(val.images))
        if shared:
            warn(console, f"{shared} of {len(val)} '{name}' images duplicate a training image "
                           "(exactly or perceptually): validation scores will be optimistic. "
                           "Run `cellfuse clean` on the training file first.")


def _phash(images: np.ndarray) -> np.ndarray:
    return phash_bits(images, Console(quiet=True))


def leaked_rows(train_hashes: np.ndarray, val_hashes: np.ndarray) -> int:
    """How many validation images have a near-identical (phash) twin in training."""
    groups = hash_groups(np.concatenate([train_hashes, val_hashes]), DEFAULT_THRESHOLD)
    return int(np.isin(groups[len(train_hashes):], groups[:len(train_hashes)]).sum())


def check_initial_loss(model, val: Dataset, console: Console, *, trained: bool = False) -> float:
    """Before training, the loss should be near ln(n_classes): far off means broken inputs or head. A model
    `trained` already (train --from) should be below it; only a loss above chance is suspect there."""
    import keras

    rows = np.arange(min(len(val), 256))
    probs = Predictor(model, 64)(val.images[rows])
    if not np.isfinite(probs).all():
        raise CellfuseError("the model outputs NaN before training: check model.weights"
                            f"{' (and the run it starts from)' if trained else ''} and the input range")
    loss = float(keras.losses.CategoricalCrossentropy()(one_hot(val.labels[rows], val.n_classes), probs))
    expected = math.log(val.n_classes)
    if trained and loss < expected:
        console.print(f"initial loss {loss:.3f}, below chance (ln({val.n_classes}) = {expected:.3f}): "
                      "the trained weights loaded")
    elif trained:
        warn(console, f"initial loss {loss:.3f} is no better than chance (ln({val.n_classes}) = {expected:.3f}) "
                       "although training starts from trained weights: the inputs may be scaled differently "
                       "from that run's, or its weights did not load")
    elif abs(loss - expected) > 0.5 * expected:
        warn(console, f"initial loss {loss:.3f} is far from ln({val.n_classes}) = {expected:.3f}: "
                       "the inputs may be scaled twice, channels flipped, or the head mis-initialised")
    else:
        console.print(f"initial loss {loss:.3f} (ln({val.n_classes}) = {expected:.3f}): ok")
    return loss




def warn(console: Console, text: str) -> None:
    console.print(Panel(text, title="WARNING", border_style="bold red"))


def make_dataset(data: Dataset, recipe: Recipe, *, training: bool, validation_augment=False, targets=None):
    """uint8 arrays -> float32 0..255 batches with one-hot labels (or `targets`); training batches augmented."""
    import tensorflow as tf

    cfg = recipe.train
    targets = one_hot(data.labels, data.n_classes) if targets is None else targets
    ds = tf.data.Dataset.from_tensor_slices((data.images, targets))
    if training:
        ds = ds.shuffle(len(data), seed=cfg.seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(cfg.batch_size, drop_remainder=training)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    if training or validation_augment:
        augmenter = make_batch_augmenter(recipe.augment, targets.shape[1], seed=recipe.train.seed,
                                         validation=not training)  # its layers built under float32
        if augmenter is not None:
            ds = ds.map(augmenter, num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()  # several workers: each takes its share of every global batch
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(recipe: Recipe, n_train: int) -> int:
    return recipe.train.steps_per_epoch or max(1, n_train // recipe.train.batch_size)


def check_batch(images) -> None:
    """The first augmented batch: channels-last, 0..255, not 0..1."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise CellfuseError(f"training batches have shape {x.shape}; expected (batch, H, W, 3)")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 255.5:
        raise CellfuseError(f"augmented training batch spans {lo:.1f}..{hi:.1f}; expected 0..255")
    if hi <= 1.5:
        raise CellfuseError(f"augmented training batch spans {lo:.2f}..{hi:.2f}: looks like 0..1, expected 0..255")



def class_weight(recipe: Recipe, train: Dataset):
    """Keras' class_weight for train.class_weights = "balanced" (None otherwise)."""
    if recipe.train.class_weights == "none":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(train.labels)
    weights = compute_class_weight("balanced", classes=present, y=train.labels)
    return {int(c): float(w) for c, w in zip(present, weights, strict=False)}


class Predictor:
    """Batched forward passes of `source` in inference mode. Local to this process (no collective op),
    so every worker of a cluster computes the same values from the same weights. Traced once per image
    shape, for any number of images: a model with TTA views costs seconds to trace."""

    def __init__(self, source, batch_size: int = 256):
        self.source, self.batch_size = source, batch_size
        self._forward = {}  # image shape -> traced function

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        shape = tuple(x.shape[1:])
        if shape not in self._forward:
            spec = tf.TensorSpec((None, *shape), tf.float32)
            self._forward[shape] = tf.function(lambda v: self.source(v, training=False), input_signature=[spec])
        forward = self._forward[shape]
        return np.concatenate([np.asarray(forward(tf.constant(x[i:i + self.batch_size], tf.float32)),
                                          dtype=np.float32) for i in range(0, len(x), self.batch_size)])
