"""Every private Keras, TensorFlow or Optuna API cellfuse uses, behind one door.

Each function here names what it reaches into and why no public API serves; tests/test_compat.py
checks each one against the installed release, so an upgrade that breaks one fails there by name
(pyproject.toml pins the releases those tests passed on). Nothing else in toolkit/ touches a private
name of another library.
"""

from __future__ import annotations

import sys


def flatten_layers(model) -> list:
    """Every layer inside `model`, nested models opened (Keras' `_flatten_layers`; `model.layers` stops
    at the first level, and a keras-hub backbone is one layer there)."""
    return list(model._flatten_layers(include_self=False))


def default_layer_name(layer) -> str:
    """The name Keras gives a layer of this class created without one, before the process-wide number
    it appends to repeats (`naming.to_snake_case`: LayerNormalization -> layer_normalization)."""
    from keras.src.utils.naming import to_snake_case

    return to_snake_case(type(layer).__name__)


def is_container(layer) -> bool:
    """Whether a layer holds layers of its own (Keras' `_layers`): its weights are its children's."""
    return bool(layer._layers)


def initial_epoch(model) -> int | None:
    """The epoch Keras' BackupAndRestore restored into `model` (it keeps it in `_initial_epoch`)."""
    return getattr(model, "_initial_epoch", None)


def set_initial_epoch(model, epoch: int | None) -> None:
    """Tell fit where to start (BackupAndRestore's channel): the chief's epoch, or a fresh start."""
    model._initial_epoch = epoch


BACKUP_SAVE_METHOD = "_save_model"  # BackupAndRestore's one method that writes a backup


def efficientnetv2_builder():
    """(DEFAULT_BLOCKS_ARGS, EfficientNetV2): the EfficientNetV2 constructor with width and depth
    coefficients, which keras.applications exposes only as fixed B0..L functions."""
    from keras.src.applications.efficientnet_v2 import DEFAULT_BLOCKS_ARGS, EfficientNetV2

    return DEFAULT_BLOCKS_ARGS, EfficientNetV2


def loaded_keras_home() -> str | None:
    """The KERAS_HOME an already imported Keras settled on (it reads the variable once, at import);
    None when Keras is not imported, so a listing need not import it."""
    config = sys.modules.get("keras.src.backend.config")
    return None if config is None else config.keras_home()


def trial_id(trial) -> int:
    """Optuna's storage id of a trial (`_trial_id`): what a worker process needs to open the same trial
    (`trial.number` is per study and not a storage key)."""
    return trial._trial_id


def onednn_enabled() -> bool | None:
    """Whether TensorFlow runs its oneDNN CPU kernels in this process (`_pywrap_util_port.IsMklEnabled`:
    TensorFlow prints it once at start-up and exposes no public query); None where a release moved it
    (every run's env.json asks: a record, not worth stopping a run for)."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None


def set_op_determinism(on: bool) -> None:
    """TensorFlow's op determinism on or off (TensorFlow exposes only the switch on; turning it off is
    `config.disable_op_determinism`), and, while on, keras-cv's per-image augmentation loop one image at
    a time (`BaseImageAugmentationLayer._map_fn`: tf.map_fn's parallel iterations draw from one stateful
    generator in whatever order they run, so RandAugment and GridMask differ between runs of one seed)."""
    from keras_cv.src.layers.preprocessing.base_image_augmentation_layer import (
        BaseImageAugmentationLayer as Base,
    )
    from tensorflow.python.framework import config

    (config.enable_op_determinism if on else config.disable_op_determinism)()
    _PARALLEL_MAP_FN.setdefault("keras_cv", Base._map_fn)
    Base._map_fn = _map_one_image_at_a_time if on else _PARALLEL_MAP_FN["keras_cv"]


_PARALLEL_MAP_FN: dict = {}  # keras-cv's own _map_fn, kept the first time it is replaced


def _map_one_image_at_a_time(layer, func, inputs):
    """keras-cv's `_map_fn` with tf.map_fn's iterations in sequence (its vectorised path draws per batch)."""
    import tensorflow as tf

    if layer._any_ragged(inputs) or layer.force_output_ragged_images:
        return tf.map_fn(func, inputs, fn_output_signature=layer._compute_output_signature(inputs),
                         parallel_iterations=1)
    if layer.auto_vectorize:
        return tf.vectorized_map(func, inputs)
    return tf.map_fn(func, inputs, parallel_iterations=1)
