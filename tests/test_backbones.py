"""Every registered backbone builds at a tiny input with weights "none"; local weights files load."""

import numpy as np
import pytest

from toolkit.backbones import BACKBONES, build_classifier, load_weights_file, set_trainable
from toolkit.errors import CellfuseError
from toolkit.recipe import ModelConfig


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_raw_pixels_in_probabilities_out(name):
    import keras

    keras.backend.clear_session()
    model = build_classifier(ModelConfig(backbone=name, weights="none", input_size=32, head="linear"), 8)
    x = np.random.default_rng(0).uniform(0, 255, (2, 96, 96, 3)).astype("float32")
    probs = np.asarray(model(x, training=False))
    assert probs.shape == (2, 8)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert model.input_shape == (None, 96, 96, 3)


def test_custom_efficientnetv2_is_smaller():
    small = build_classifier(ModelConfig(backbone="efficientnetv2-custom", weights="none", width=0.5,
                                         depth=0.5, head="linear"), 8)
    full = build_classifier(ModelConfig(backbone="efficientnetv2-b0", weights="none", input_size=96,
                                        head="linear"), 8)
    assert small.count_params() < full.count_params() / 3


def test_set_trainable_freezes_backbone_bottom():
    model = build_classifier(ModelConfig(backbone="tiny-cnn", weights="none", head="seed"), 8)
    set_trainable(model, 0.0)
    assert all("backbone" not in w.path for w in model.trainable_weights)
    set_trainable(model, 1.0)
    bn = [layer for layer in model.get_layer("backbone").layers if "batch_normalization" in layer.name]
    assert bn and all(layer.trainable for layer in bn), "BatchNorm trains by default"
    set_trainable(model, 1.0, freeze_batchnorm=True)
    assert not any(layer.trainable for layer in bn)


def test_local_h5_weights_load_by_name(tmp_path):
    """A with-top checkpoint at another size loads into the headless backbone by layer name."""
    import keras

    donor = keras.applications.MobileNet(input_shape=(128, 128, 3), alpha=0.25, weights=None, include_top=True)
    legacy = tmp_path / "legacy.h5"
    import h5py
    from keras.src.legacy.saving import (
        legacy_h5_format,  # the format keras-applications checkpoints use
    )

    with h5py.File(legacy, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, donor)
    model = build_classifier(ModelConfig(backbone="mobilenet-0.25", weights=str(legacy), input_size=96), 8)
    got = model.get_layer("backbone").get_layer("conv1").get_weights()[0]
    np.testing.assert_array_equal(got, donor.get_layer("conv1").get_weights()[0])


def test_real_pretrained_mobilenet_loads(shared):
    path = shared / "weights" / "mobilenet_2_5_128_tf.h5"
    if not path.exists():
        pytest.skip("no shared weights")
    model = build_classifier(ModelConfig(backbone="mobilenet-0.25", weights=str(path), input_size=128), 8)
    assert np.abs(model.get_layer("backbone").get_layer("conv1").get_weights()[0]).sum() > 0
    assert load_weights_file(model.get_layer("backbone"), path) == 54  # all weighted layers


@pytest.mark.parametrize("weights, message", [
    ("missing.h5", "weights file not found"),
    ("imagenet", "could not download ImageNet weights|Keras' cache"),
])
def test_weights_errors_are_clear(weights, message, monkeypatch):
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid/mobilenet_2_5_96_tf_no_top.h5: None")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline, raising=False)
    with pytest.raises(CellfuseError, match=message):
        build_classifier(ModelConfig(backbone="mobilenet-0.25", weights=weights, input_size=96), 8)


def test_unknown_backbone():
    with pytest.raises(CellfuseError, match="unknown backbone 'resnet9000'"):
        build_classifier(ModelConfig(backbone="resnet9000", weights="none"), 8)


def test_hub_preset_offline_fails_fast():
    with pytest.raises(CellfuseError, match="keras-hub preset"):
        build_classifier(ModelConfig(backbone="hub:definitely_not_a_preset_xyz", weights="none"), 8)


def test_too_small_input_says_what_it_is_not_offline():
    with pytest.raises(CellfuseError, match=r"model.input_size = 16 is too small for efficientnetv2-b0 "
                                            r"\(Keras: Input size must be at least 32x32"):
        build_classifier(ModelConfig(backbone="efficientnetv2-b0", weights="none", input_size=16), 8)


def test_shared_weights_resolve_in_cellfuse_shared(tmp_path, monkeypatch):
    import keras

    keras.backend.clear_session()
    donor = build_classifier(ModelConfig(backbone="tiny-cnn", weights="none", head="linear"), 8)
    (tmp_path / "weights").mkdir()
    donor.get_layer("backbone").save_weights(tmp_path / "weights" / "tiny.weights.h5")
    monkeypatch.setenv("CELLFUSE_SHARED", str(tmp_path))
    model = build_classifier(ModelConfig(backbone="tiny-cnn", weights="shared:weights/tiny.weights.h5",
                                         head="linear"), 8)
    for got, want in zip(model.get_layer("backbone").get_weights(), donor.get_layer("backbone").get_weights(),
                         strict=True):
        np.testing.assert_array_equal(got, want)
    missing = tmp_path / "weights" / "absent.h5"
    with pytest.raises(CellfuseError, match=f"{missing}: weights file not found .*CELLFUSE_SHARED"):
        build_classifier(ModelConfig(backbone="tiny-cnn", weights="shared:weights/absent.h5"), 8)


@pytest.fixture(scope="module")
def hub_preset(tmp_path_factory):
    """A small keras-hub ResNet saved as a local preset with its image converter: no download."""
    import keras_hub

    folder = tmp_path_factory.mktemp("hub_preset")
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(None, None, 3))
    backbone.save_to_preset(str(folder))
    keras_hub.layers.ResNetImageConverter(scale=[1 / 58.0, 1 / 57.0, 1 / 57.5],
                                          offset=[-2.1, -2.0, -1.8]).save_to_preset(str(folder))
    return folder, backbone


def test_hub_backbone_normalises_inside_unfreezes_by_layer_and_saves_as_core_keras(hub_preset):
    import keras

    from toolkit.backbones import non_core_layers, weighted_leaf_layers

    folder, original = hub_preset
    model = build_classifier(ModelConfig(backbone=f"hub:{folder}", weights="imagenet", input_size=32,
                                         head="linear"), 8)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    normalised = x * np.array([1 / 58.0, 1 / 57.0, 1 / 57.5]) + np.array([-2.1, -2.0, -1.8])
    np.testing.assert_allclose(np.asarray(model.get_layer("backbone")(x)), np.asarray(original(normalised)),
                               rtol=1e-4, atol=1e-4)
    set_trainable(model, 0.5)
    layers = weighted_leaf_layers(model.get_layer("backbone"))
    assert 0 < sum(layer.trainable for layer in layers) < len(layers)
    assert non_core_layers(model) == []
    assert "keras_hub" not in model.to_json()
    nested = keras.Model(original.inputs, original(original.inputs))  # the keras-hub class itself
    assert any("keras_hub" in name for name in non_core_layers(nested))


def test_hub_preset_without_image_converter_is_refused(tmp_path):
    import keras_hub

    keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64],
        stackwise_num_blocks=[1], stackwise_num_strides=[1], block_type="basic_block",
        use_pre_activation=False, image_shape=(None, None, 3)).save_to_preset(str(tmp_path))
    with pytest.raises(CellfuseError, match="image_converter.json"):
        build_classifier(ModelConfig(backbone=f"hub:{tmp_path}", weights="none", input_size=32), 8)
