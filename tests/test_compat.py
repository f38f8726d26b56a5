"""Each private Keras / Optuna API in toolkit.compat, checked against the installed release: an upgrade
that moves one fails here, by name, before it fails somewhere deep inside a run."""

import re

import keras
import numpy as np

from toolkit import compat


def _nested():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="inner_dense")], name="inner")
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(2, name="outer_dense")(inner(inputs)))


def test_flatten_layers_opens_nested_models():
    names = [layer.name for layer in compat.flatten_layers(_nested())]
    assert "inner_dense" in names and "outer_dense" in names and "inner" in names


def test_default_layer_name_is_what_keras_names_an_unnamed_layer():
    first, second = keras.layers.LayerNormalization(), keras.layers.LayerNormalization()
    assert compat.default_layer_name(first) == "layer_normalization"
    assert all(re.fullmatch(r"layer_normalization(_\d+)?", layer.name) for layer in (first, second))
    assert first.name != second.name  # numbered process-wide: what runs.stable_paths undoes


def test_is_container_tells_models_from_leaf_layers():
    model = _nested()
    assert compat.is_container(model.get_layer("inner"))
    assert not compat.is_container(model.get_layer("outer_dense"))


def test_backup_and_restore_hands_the_restored_epoch_through_initial_epoch(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x, y = np.zeros((4, 2), np.float32), np.zeros((4, 1), np.float32)

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("interrupted")

    backup = keras.callbacks.BackupAndRestore(str(tmp_path), delete_checkpoint=False)
    try:
        model.fit(x, y, epochs=4, verbose=0, callbacks=[backup, Stop()])
    except RuntimeError:
        pass
    fresh = keras.callbacks.BackupAndRestore(str(tmp_path))
    fresh.set_model(model)
    fresh.on_train_begin()
    assert compat.initial_epoch(model) == 2  # the next epoch to run: epochs 0 and 1 were backed up
    compat.set_initial_epoch(model, None)
    assert compat.initial_epoch(model) is None


def test_backup_and_restore_still_saves_through_the_hooked_method():
    assert callable(getattr(keras.callbacks.BackupAndRestore, compat.BACKUP_SAVE_METHOD))


def test_efficientnetv2_builder_takes_width_and_depth():
    blocks, build = compat.efficientnetv2_builder()
    model = build(width_coefficient=0.25, depth_coefficient=0.25, default_size=32,
                  blocks_args=blocks["efficientnetv2-b0"], include_top=False, weights=None, input_shape=(32, 32, 3))
    assert model.output_shape[-1] > 0


def test_loaded_keras_home_is_the_folder_keras_uses():
    assert compat.loaded_keras_home() == keras.src.backend.config.keras_home()


def test_trial_id_is_the_storage_key_of_a_trial():
    import optuna

    study = optuna.create_study()
    trial = study.ask()
    assert isinstance(compat.trial_id(trial), int)
    assert optuna.trial.Trial(study, compat.trial_id(trial)).number == trial.number  # how a worker reopens it


def test_op_determinism_switches_both_ways_with_keras_cv_drawing_image_by_image():
    from keras_cv.src.layers.preprocessing.base_image_augmentation_layer import (
        BaseImageAugmentationLayer as Base,
    )
    from tensorflow.python.framework import config

    parallel = Base._map_fn
    compat.set_op_determinism(True)
    try:
        assert config.is_op_determinism_enabled() and Base._map_fn is not parallel
    finally:
        compat.set_op_determinism(False)
    assert not config.is_op_determinism_enabled() and Base._map_fn is parallel


def test_onednn_is_on_where_toolkit_came_before_tensorflow_and_a_users_setting_wins():
    import os
    import subprocess
    import sys

    import toolkit
    from toolkit.runs import env_info

    def child(code: str, **env) -> list[str]:
        clean = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "CELLFUSE_ONEDNN")}
        return subprocess.run([sys.executable, "-c", code], env={**clean, "TF_CPP_MIN_LOG_LEVEL": "3", **env},
                              capture_output=True, text=True, check=True).stdout.split()

    assert child("import os, toolkit; print(os.environ['TF_ENABLE_ONEDNN_OPTS'])") == ["1"]
    # a process cellfuse starts inherits the value as cellfuse's, not the user's (grade hands it on only then)
    inherited = child("import os, toolkit; print(toolkit.ONEDNN_SET_BY_USER)", TF_ENABLE_ONEDNN_OPTS="1",
                      CELLFUSE_ONEDNN="1")
    assert inherited == ["False"] and child("import toolkit; print(toolkit.ONEDNN_SET_BY_USER)",
                                            TF_ENABLE_ONEDNN_OPTS="1") == ["True"]
    user_off = "import os, toolkit, toolkit.compat as c; print(os.environ['TF_ENABLE_ONEDNN_OPTS'], c.onednn_enabled())"
    assert child(user_off, TF_ENABLE_ONEDNN_OPTS="0") == ["0", "False"]
    if not toolkit.ONEDNN_SET_BY_USER:  # conftest imports toolkit before TensorFlow: the kernels did turn on
        assert compat.onednn_enabled() and env_info()["onednn"]
