"""Every registered backbone builds at its minimum input size with weights "none"; the registry takes
new entries through one decorator; local weights files load."""

from pathlib import Path

import numpy as np
import pytest

from toolkit.backbones import (
    BACKBONES,
    HUB,
    HubPreset,
    backbone_spec,
    build_classifier,
    load_weights_file,
    pretrained_status,
    register,
    set_trainable,
)
from toolkit.errors import CellfuseError
from toolkit.recipe import ModelConfig

# Every entry but hub:, whose presets download (test_hub_* below build a local one).
BUILT_OFFLINE = sorted(name for name, spec in BACKBONES.items() if not isinstance(spec.weights, HubPreset))


def test_the_registry_holds_the_special_backbones_too():
    assert {"tiny-cnn", "efficientnetv2-custom", "efficientnet-lite0", HUB} <= set(BACKBONES)
    assert all(spec.name == name and spec.min_size >= 1 for name, spec in BACKBONES.items())


@pytest.mark.parametrize("name", BUILT_OFFLINE)
def test_every_backbone_builds_at_its_minimum_size_raw_pixels_in_probabilities_out(name):
    import keras

    keras.backend.clear_session()
    size = BACKBONES[name].min_size
    model = build_classifier(ModelConfig(backbone=name, weights="none", input_size=size, head="linear"), 8)
    assert model.get_layer("backbone").input_shape[1:3] == (size, size)
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
    from keras import layers

    model = build_classifier(ModelConfig(backbone="tiny-cnn", weights="none", head="seed"), 8)
    set_trainable(model, 0.0)
    assert all("backbone" not in w.path for w in model.trainable_weights)
    set_trainable(model, 1.0)
    bn = [layer for layer in model.get_layer("backbone").layers if isinstance(layer, layers.BatchNormalization)]
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


def test_real_pretrained_mobilenet_loads_from_the_seeded_keras_cache(shared):
    """conftest seeds the test run's Keras cache with the shared file: "imagenet" loads it, offline."""
    import keras

    path = shared / "weights" / "mobilenet_2_5_128_tf.h5"
    if not path.exists():
        pytest.skip("no shared weights")
    model = build_classifier(ModelConfig(backbone="mobilenet-0.25", weights="imagenet", input_size=128), 8)
    reference = keras.applications.MobileNet(input_shape=(128, 128, 3), alpha=0.25, weights=str(path))
    got = model.get_layer("backbone").get_layer("conv_pw_13").get_weights()
    for a, b in zip(got, reference.get_layer("conv_pw_13").get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert load_weights_file(model.get_layer("backbone"), path) == 54  # all weighted layers


def test_missing_local_weights_file_is_named():
    with pytest.raises(CellfuseError, match="missing.h5: weights file not found"):
        build_classifier(ModelConfig(backbone="mobilenet-0.25", weights="missing.h5", input_size=96), 8)


def test_unknown_backbone():
    with pytest.raises(CellfuseError, match="unknown backbone 'resnet9000'; registered: .*tiny-cnn"):
        build_classifier(ModelConfig(backbone="resnet9000", weights="none"), 8)


def test_a_registered_builder_is_a_backbone_everywhere(monkeypatch):
    """One decorated function: recipes may name it, classifiers build it, its weights are reported."""
    import keras

    monkeypatch.setattr("toolkit.backbones.BACKBONES", dict(BACKBONES))  # the entry leaves with the test

    @register("two-conv", default_size=64, preprocess="unit", min_size=8)
    def two_conv(input_shape, weights):
        inputs = keras.Input(input_shape)
        return keras.Model(inputs, keras.layers.Conv2D(4, 3, strides=2, name="c")(inputs))

    assert backbone_spec("two-conv").min_size == 8 and pretrained_status("two-conv") == "none"
    model = build_classifier(ModelConfig(backbone="two-conv", weights="none", head="linear"), 3)
    assert model.get_layer("resize").output.shape[1] == 64 and model.output_shape == (None, 3)
    with pytest.raises(ValueError, match="'two-conv' is registered twice"):
        register("two-conv", default_size=64, preprocess="unit")(two_conv)


def test_hub_presets_are_one_entry_bound_to_the_preset_name():
    spec = backbone_spec("hub:some_preset")
    assert spec.name == HUB and spec.preprocess == "hub" and spec is not BACKBONES[HUB]
    assert pretrained_status("hub:some_preset") == "keras-hub preset: download on first use"


def test_hub_preset_offline_fails_fast():
    with pytest.raises(CellfuseError, match="keras-hub preset"):
        build_classifier(ModelConfig(backbone="hub:definitely_not_a_preset_xyz", weights="none"), 8)


def test_too_small_input_says_what_it_is_not_offline():
    with pytest.raises(CellfuseError, match=r"model.input_size = 16 is too small for efficientnetv2-b0 "
                                            r"\(Keras: Input size must be at least 32x32"):
        build_classifier(ModelConfig(backbone="efficientnetv2-b0", weights="none", input_size=16), 8)


def test_local_keras3_weights_file_loads(tmp_path):
    import keras

    keras.backend.clear_session()
    donor = build_classifier(ModelConfig(backbone="tiny-cnn", weights="none", head="linear"), 8)
    donor.get_layer("backbone").save_weights(tmp_path / "tiny.weights.h5")
    model = build_classifier(ModelConfig(backbone="tiny-cnn", weights=str(tmp_path / "tiny.weights.h5"),
                                         head="linear"), 8)
    for got, want in zip(model.get_layer("backbone").get_weights(), donor.get_layer("backbone").get_weights(),
                         strict=True):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- weights = "imagenet": Keras' own cache

@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    """An empty Keras cache for one test, and no network: a download attempt fails as offline would.

    Keras reads KERAS_HOME once, at import, so its value is replaced where Keras keeps it."""
    import urllib.error

    home = tmp_path / "keras-home"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.setattr("keras.src.backend.config._KERAS_DIR", str(home))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr("keras.src.utils.file_utils.urlretrieve", offline)
    return home / "models"


def _save_legacy_h5(model, path):
    """The format of keras-applications' checkpoints (what Keras downloads)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


def _assert_same_weights(backbone, donor):
    weighted = [layer for layer in backbone.layers if layer.weights]
    assert weighted
    for layer in weighted:
        for got, want in zip(layer.get_weights(), donor.get_layer(layer.name).get_weights(), strict=True):
            np.testing.assert_array_equal(got, want)


def test_imagenet_loads_exactly_the_file_in_keras_cache(keras_home):
    """MobileNet 0.25's ImageNet weights are Keras' with-top 128 px file, loaded by name at any size."""
    import keras

    from toolkit.backbones import build_backbone

    donor = keras.applications.MobileNet(input_shape=(128, 128, 3), alpha=0.25, weights=None, include_top=True)
    rng = np.random.default_rng(0)  # every weight, BatchNorm statistics too: a fresh build cannot match
    donor.set_weights([rng.normal(size=w.shape).astype("float32") ** 2 for w in donor.get_weights()])
    _save_legacy_h5(donor, keras_home / "mobilenet_2_5_128_tf.h5")
    for size in (128, 96):
        _assert_same_weights(build_backbone(ModelConfig(backbone="mobilenet-0.25", weights="imagenet"), size),
                             donor)


def test_imagenet_hash_checked_file_loads_from_keras_cache(keras_home, monkeypatch):
    """A backbone Keras loads itself, after checking the file's hash: the test's file passes that check."""
    import keras

    from toolkit.backbones import BACKBONES, build_backbone

    donor = keras.applications.MobileNetV3Small(input_shape=(96, 96, 3), include_top=False, weights=None,
                                                include_preprocessing=True)
    rng = np.random.default_rng(1)
    donor.set_weights([rng.normal(size=w.shape).astype("float32") for w in donor.get_weights()])
    cached = keras_home / BACKBONES["mobilenetv3-small"].imagenet.file
    _save_legacy_h5(donor, cached)
    monkeypatch.setattr("keras.src.utils.file_utils.validate_file",
                        lambda path, *args, **kwargs: Path(path) == cached)
    backbone = build_backbone(ModelConfig(backbone="mobilenetv3-small", weights="imagenet"), 96)
    for got, want in zip(backbone.get_weights(), donor.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["mobilenet-0.25", "mobilenetv3-small"])
def test_imagenet_offline_without_the_file_names_it_and_its_folder(name, keras_home):
    from toolkit.backbones import BACKBONES

    weights = BACKBONES[name].imagenet
    with pytest.raises(CellfuseError) as error:
        build_classifier(ModelConfig(backbone=name, weights="imagenet", input_size=96), 8)
    message = str(error.value)
    assert "\n" not in message
    assert f"{weights.file} is not in Keras' cache {keras_home}" in message
    assert f"curl -fLO {weights.url}" in message
    assert list(keras_home.iterdir()) == []  # nothing half-downloaded left behind


def test_imagenet_file_failing_keras_hash_check_offline_says_so(keras_home):
    from toolkit.backbones import BACKBONES

    weights = BACKBONES["mobilenetv3-small"].imagenet
    (keras_home / weights.file).write_bytes(b"not the checkpoint")
    with pytest.raises(CellfuseError, match=f"{weights.file} in Keras' cache .* failed Keras' hash check"):
        build_classifier(ModelConfig(backbone="mobilenetv3-small", weights="imagenet", input_size=96), 8)


# Every keras.applications backbone: 38 s for all 16 on 2 cores (the largest, efficientnetv2-l, 7 s).
@pytest.mark.parametrize("name", [name for name, spec in sorted(BACKBONES.items()) if spec.imagenet is not None])
def test_imagenet_file_and_url_are_the_ones_keras_fetches(name, monkeypatch):
    import keras

    spec = BACKBONES[name]
    asked = []

    def record(fname, origin=None, **kwargs):
        asked.append((fname, origin))
        raise InterruptedError  # stop before loading: the request is what is checked

    monkeypatch.setattr("keras.src.utils.file_utils.get_file", record)
    keras.backend.clear_session()
    with pytest.raises(InterruptedError):
        if spec.imagenet.with_top:  # Keras' classifier at its pretraining size
            keras.applications.MobileNet(input_shape=(spec.default_size,) * 2 + (3,),
                                         alpha=float(name.split("-")[1]), weights="imagenet")
        else:
            spec.build((32, 32, 3), "imagenet")
    assert asked == [(spec.imagenet.file, spec.imagenet.url)]


def test_pretrained_status_says_what_is_on_this_machine(keras_home):
    from toolkit.backbones import pretrained_status

    assert pretrained_status("mobilenet-0.25") == \
        f"download on first use: mobilenet_2_5_128_tf.h5 into {keras_home}"
    (keras_home / "mobilenet_2_5_128_tf.h5").write_bytes(b"")
    assert pretrained_status("mobilenet-0.25") == f"cached: {keras_home / 'mobilenet_2_5_128_tf.h5'}"
    assert pretrained_status("efficientnet-lite0").startswith("pip package: ")
    assert pretrained_status("tiny-cnn") == "none"
    assert pretrained_status("efficientnetv2-custom") == "none"


def test_demo_member_without_its_imagenet_weights_stops_instead_of_training_from_random(tmp_path, keras_home):
    """The demo once swapped a missing MobileNet checkpoint for random weights and said nothing."""
    from rich.console import Console

    from toolkit.pipeline import run_pipeline
    from toolkit.synth import write_synthetic

    data = write_synthetic(tmp_path / "synth.npz", n=240, seed=0, console=Console(quiet=True))
    with pytest.raises(CellfuseError, match=f"mobilenet_2_5_128_tf.h5 is not in Keras' cache {keras_home}"):
        run_pipeline(data, tmp_path / "out", None, Console(quiet=True), members=["cpu-mobilenet"],
                     member_extra=("train.stages=[{epochs=1, lr=1e-3, unfreeze=1.0}]",))
    assert not list((tmp_path / "out").rglob("*.keras"))


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
