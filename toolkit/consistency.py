"""AugMix's Jensen-Shannon consistency training (Hendrycks et al. 2020), `[train] consistency > 0`.

Each training batch carries every image three times (toolkit.augment, `views=3`): the preset's
augmentation of it ("clean") and two AugMix views of that clean image, interleaved per image. The
model sees all three in one forward pass, so BatchNorm normalises over all of them as in the paper,
and the loss is

    loss = CE(labels, p_clean) + consistency * JSD(p_clean, p_aug1, p_aug2)
    JSD  = (KL(p_clean || M) + KL(p_aug1 || M) + KL(p_aug2 || M)) / 3,   M = the views' mean

with the paper's weight 12 as the usual value. The cross-entropy part is whatever loss the recipe
compiles (label smoothing, class weights, a cached teacher's packed targets) applied to the clean
rows only; training metrics are on the clean rows too, so they compare with a run without the term.
Every image costs three forward and backward passes: img/s in history.csv counts images, not views.

Distillation: the ConsistencyLoss mixin hands the base class's loss the clean rows only, so a
teacher (keras' Distiller in function matching, or cached targets packed into y) labels the clean
view: one teacher pass per image, not three, and the JSD term carries its labels over to the AugMix
views. The teacher, not robust to corruptions itself, is never asked about the AugMix views.
"""

from __future__ import annotations

import dataclasses
import threading

from toolkit import batches
from toolkit.augment import augment_dataset, check_section

VIEWS = 3  # clean + two AugMix views, as in the paper (and timm's --aug-splits 3 --jsd-loss)
# True while a train step is being traced; per thread, as tf.distribute traces each replica in its own.
_IN_TRAIN_STEP = threading.local()


def jensen_shannon(p_clean, p_aug1, p_aug2):
    """Per-example JSD of three probability rows (B, n) -> (B,), in nats (0 when all three agree)."""
    from keras import config, ops

    eps = config.epsilon()  # Keras' own losses' floor: see distill.distillation_loss for why
    views = [ops.cast(p, "float32") for p in (p_clean, p_aug1, p_aug2)]
    log_mixture = ops.log(ops.clip((views[0] + views[1] + views[2]) / 3.0, eps, 1.0))
    return sum(ops.sum(p * (ops.log(p + eps) - log_mixture), axis=-1) for p in views) / 3.0


def split_views(rows):
    """Interleaved (3B, ...) rows -> (clean, aug1, aug2), each (B, ...)."""
    return rows[0::VIEWS], rows[1::VIEWS], rows[2::VIEWS]


class ConsistencyLoss:
    """Mixin for a keras.Model: training steps take three views per image, evaluation takes one.

    The base class's compute_loss sees only the clean rows (x, y, predictions, sample weights), so
    any loss it computes, a distiller's teacher pass included, runs on the clean view; this adds
    weight x JSD over the three views. Call `_init_consistency(weight)` from __init__.
    """

    def _init_consistency(self, weight: float) -> None:
        import keras

        self.weight = float(weight)
        self.jsd_tracker = keras.metrics.Mean(name="jsd")

    def train_step(self, data):
        _IN_TRAIN_STEP.active = True
        try:
            return super().train_step(data)
        finally:
            _IN_TRAIN_STEP.active = False

    @property
    def _three_views(self) -> bool:
        """Only training batches carry three views per image; evaluation batches carry one."""
        return getattr(_IN_TRAIN_STEP, "active", False)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        from keras import ops

        if not self._three_views:
            return super().compute_loss(x, y, y_pred, sample_weight, training)
        clean, aug1, aug2 = split_views(y_pred)
        loss = super().compute_loss(x[0::VIEWS], y[0::VIEWS], clean, _clean_rows(sample_weight), training)
        jsd = ops.mean(jensen_shannon(clean, aug1, aug2))
        self.jsd_tracker.update_state(jsd)
        return loss + self.weight * scale_for_replicas(jsd)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if self._three_views:
            return super().compute_metrics(x[0::VIEWS], y[0::VIEWS], y_pred[0::VIEWS],
                                           _clean_rows(sample_weight))
        logs = super().compute_metrics(x, y, y_pred, sample_weight)
        return {k: v for k, v in logs.items() if k != "jsd"}  # validation has one view: no val_jsd


def _model_base():
    import keras

    return keras.Model


class ConsistencyModel(ConsistencyLoss, _model_base()):
    """A classifier wrapped for consistency training; fit it on three-view batches."""

    def __init__(self, model, weight: float, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self._init_consistency(weight)

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)


def _distiller_base():
    import keras

    return keras.distillation.Distiller


class ConsistencyDistiller(ConsistencyLoss, _distiller_base()):
    """keras' Distiller with the JSD term: its compute_loss, teacher pass included, sees the clean rows."""

    def __init__(self, weight: float, **kwargs):
        super().__init__(**kwargs)
        self._init_consistency(weight)


def _clean_rows(sample_weight):
    return None if sample_weight is None else sample_weight[0::VIEWS]


def scale_for_replicas(value):
    """Keras divides each replica's compiled loss by the replica count before summing gradients; a
    term added outside keras.losses must be divided alike or MirroredStrategy would weigh it more."""
    import tensorflow as tf

    return value / tf.distribute.get_strategy().num_replicas_in_sync


# ---------------------------------------------------------------- wiring into training

def with_consistency(compile_fn):
    """A fit_stages compile_fn that compiles `compile_fn`'s loss and metrics around a ConsistencyModel."""
    def compile_consistency(model, recipe, stage, steps: int):
        import numpy as np

        wrapper = ConsistencyModel(model, recipe.train.consistency)
        wrapper(np.zeros((1, *model.input_shape[1:]), np.float32))  # built, so backups can restore it
        return compile_fn(wrapper, recipe, stage, steps)
    return compile_consistency


def make_dataset(data, recipe, targets=None):
    """Training batches of B images as 3B rows (clean, AugMix, AugMix per image), labels repeated."""
    import tensorflow as tf

    plain = dataclasses.replace(recipe, augment=check_section({"preset": "none"}, "plain"))
    ds = batches.make_dataset(data, plain, training=True, targets=targets)  # shuffled, batched, float
    n_classes = data.n_classes if targets is None else targets.shape[1]
    return augment_dataset(ds, recipe.augment, n_classes, seed=recipe.train.seed,
                           views=VIEWS).prefetch(tf.data.AUTOTUNE)


def fit_arguments(recipe, split, compile_fn, targets=None) -> dict:
    """What fit_stages needs for consistency training ({} when it is off): the three-view training
    dataset and a compile_fn around `compile_fn` (train.compile_model, or distillation's own)."""
    if not recipe.train.consistency:
        return {}
    return {"train_ds": make_dataset(split.train, recipe, targets), "compile_fn": with_consistency(compile_fn)}
