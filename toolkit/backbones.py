"""Backbone registry and the one door to every classifier: `build_classifier(model_config)`.

Every classifier takes raw (n, 96, 96, 3) pixels in 0..255 and returns class probabilities:
resizing and each backbone's own normalisation are layers inside the model (design principle 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import CellfuseError

IMAGE_SIZE = 96


@dataclass(frozen=True)
class Backbone:
    build: Callable  # (input_shape, weights) -> keras.Model without top, spatial output
    default_size: int  # side it was pretrained at
    preprocess: str  # "inside" (the application normalises 0..255 itself) | "tf" (-1..1) | "torch" | "unit"


def _app(name: str, **kwargs) -> Callable:
    def build(input_shape, weights):
        import keras

        return getattr(keras.applications, name)(include_top=False, weights=weights,
                                                 input_shape=input_shape, **kwargs)
    return build


_INSIDE = {"include_preprocessing": True}
BACKBONES: dict[str, Backbone] = {
    "efficientnetv2-b0": Backbone(_app("EfficientNetV2B0", **_INSIDE), 224, "inside"),
    "efficientnetv2-b1": Backbone(_app("EfficientNetV2B1", **_INSIDE), 240, "inside"),
    "efficientnetv2-b2": Backbone(_app("EfficientNetV2B2", **_INSIDE), 260, "inside"),
    "efficientnetv2-b3": Backbone(_app("EfficientNetV2B3", **_INSIDE), 300, "inside"),
    "efficientnetv2-s": Backbone(_app("EfficientNetV2S", **_INSIDE), 384, "inside"),
    "efficientnetv2-m": Backbone(_app("EfficientNetV2M", **_INSIDE), 480, "inside"),
    "efficientnetv2-l": Backbone(_app("EfficientNetV2L", **_INSIDE), 480, "inside"),
    "convnext-tiny": Backbone(_app("ConvNeXtTiny", **_INSIDE), 224, "inside"),
    "convnext-small": Backbone(_app("ConvNeXtSmall", **_INSIDE), 224, "inside"),
    "convnext-base": Backbone(_app("ConvNeXtBase", **_INSIDE), 224, "inside"),
    "resnet50v2": Backbone(_app("ResNet50V2"), 224, "tf"),
    "densenet121": Backbone(_app("DenseNet121"), 224, "torch"),
    "mobilenetv3-small": Backbone(_app("MobileNetV3Small", **_INSIDE), 224, "inside"),
    "mobilenetv3-large": Backbone(_app("MobileNetV3Large", **_INSIDE), 224, "inside"),
    "mobilenet-0.25": Backbone(_app("MobileNet", alpha=0.25), 128, "tf"),
    "mobilenet-1.0": Backbone(_app("MobileNet", alpha=1.0), 224, "tf"),
}


def _efficientnetv2_custom(width: float, depth: float) -> Callable:
    """A narrower/shallower EfficientNetV2-B0 (for small students): same blocks, scaled channels/repeats."""
    def build(input_shape, weights):
        from keras.src.applications.efficientnet_v2 import DEFAULT_BLOCKS_ARGS, EfficientNetV2

        if weights not in (None,):
            raise CellfuseError("efficientnetv2-custom has no pretrained weights; set weights = \"none\"")
        return EfficientNetV2(width_coefficient=width, depth_coefficient=depth,
                              default_size=IMAGE_SIZE, blocks_args=DEFAULT_BLOCKS_ARGS["efficientnetv2-b0"],
                              include_top=False, weights=None, input_shape=input_shape,
                              include_preprocessing=True, name=f"efficientnetv2-w{width}-d{depth}")
    return build


def _tiny_cnn(input_shape, weights):
    """Four conv blocks, ~30k parameters: for tests and the synthetic demo, never for the challenge."""
    import keras
    from keras import layers

    if weights is not None:
        raise CellfuseError("tiny-cnn has no pretrained weights; set weights = \"none\"")
    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (16, 32, 48, 64):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
        x = layers.MaxPooling2D()(x)
    return keras.Model(inputs, x, name="tiny_cnn")


BACKBONES["tiny-cnn"] = Backbone(_tiny_cnn, IMAGE_SIZE, "unit")


def backbone_spec(name: str, width: float = 1.0, depth: float = 1.0) -> Backbone:
    if name == "efficientnetv2-custom":
        return Backbone(_efficientnetv2_custom(width, depth), IMAGE_SIZE, "inside")
    if name.startswith("hub:"):
        return Backbone(_hub_builder(name[4:]), 224, "hub")
    if name not in BACKBONES:
        raise CellfuseError(f"unknown backbone {name!r}; registered: {', '.join(sorted(BACKBONES))}, "
                            "efficientnetv2-custom, or hub:<keras-hub preset>")
    return BACKBONES[name]


def _hub_builder(preset: str) -> Callable:
    """A keras-hub image backbone by preset name (downloads on first use, then cached)."""
    def build(input_shape, weights):
        import keras
        import keras_hub

        try:
            backbone = keras_hub.models.Backbone.from_preset(preset, load_weights=weights is not None)
        except Exception as e:  # keras-hub raises many kinds; all mean "could not get the preset"
            raise CellfuseError(f"keras-hub preset {preset!r} could not be loaded ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]}). Offline? Use a preset directory saved "
                                "with `save_to_preset`, or a keras.applications backbone.") from None
        inputs = keras.Input(input_shape)
        return keras.Model(inputs, backbone(inputs), name=f"hub_{backbone.name}")
    return build


def preprocessing_layers(kind: str) -> list:
    """Map raw 0..255 pixels to what a backbone was trained on."""
    from keras import layers

    if kind in ("inside", "hub"):
        return []
    if kind == "tf":
        return [layers.Rescaling(1 / 127.5, offset=-1.0, name="to_minus1_1")]
    if kind == "unit":
        return [layers.Rescaling(1 / 255.0, name="to_0_1")]
    if kind == "torch":
        return [layers.Rescaling(1 / 255.0, name="to_0_1"),
                layers.Normalization(mean=[0.485, 0.456, 0.406], variance=[0.229**2, 0.224**2, 0.225**2],
                                     name="imagenet_norm")]
    raise ValueError(kind)


def build_backbone(config, input_size: int):
    """The backbone alone, with `config.weights` loaded (imagenet, none, or a local file)."""
    spec = backbone_spec(config.backbone, config.width, config.depth)
    shape = (input_size, input_size, 3)
    if config.weights == "none":
        return spec.build(shape, None)
    if config.weights == "imagenet":
        if config.backbone.startswith("hub:"):
            return spec.build(shape, "imagenet")
        try:
            return spec.build(shape, "imagenet")
        except CellfuseError:
            raise
        except Exception as e:  # keras.utils.get_file raises plain Exceptions when offline
            raise CellfuseError(offline_message(config.backbone, e)) from None
    backbone = spec.build(shape, None)
    load_weights_file(backbone, Path(config.weights))
    return backbone


def offline_message(name: str, error: Exception) -> str:
    text = str(error)
    url = next((w.strip("'\",.():") for w in text.split() if w.startswith(("http://", "https://"))), None)
    where = f" from {url}" if url else ""
    fname = url.rsplit("/", 1)[-1] if url else "<the weights file>"
    return (f"could not download ImageNet weights for {name}{where} (offline?). Either put the file at "
            f"~/.keras/models/{fname} (Keras' cache), or set model.weights to a local file path, "
            f"or model.weights = \"none\" to train from scratch.")


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


def copy_backbone(source, target, where) -> int:
    """Start `target`'s backbone from a trained classifier's: the same builder makes the same weighted
    layers in the same order (names may differ), and no weight depends on the input size."""
    pairs = [[layer for layer in model.get_layer("backbone")._flatten_layers(include_self=False)
              if layer.weights and not layer._layers] for model in (source, target)]
    shapes = [[tuple(w.shape) for layer in side for w in layer.weights] for side in pairs]
    kinds = [[type(layer).__name__ for layer in side] for side in pairs]
    if shapes[0] != shapes[1] or kinds[0] != kinds[1]:
        raise CellfuseError(f"{where}: its backbone is not the student's ({len(pairs[0])} vs {len(pairs[1])} "
                            "weighted layers, or other shapes); start from a member with the same backbone")
    for src, dst in zip(*pairs, strict=True):
        dst.set_weights(src.get_weights())
    return len(pairs[1])


def build_classifier(config, n_classes: int, image_size: int = IMAGE_SIZE):
    """Raw pixels (n, 96, 96, 3) 0..255 in -> probabilities out; the backbone is the layer named `backbone`."""
    import keras
    from keras import layers

    spec = backbone_spec(config.backbone, config.width, config.depth)
    size = config.input_size or (image_size if spec.default_size > 2 * image_size else spec.default_size)
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = inputs
    if size != image_size:
        x = layers.Resizing(size, size, interpolation="bilinear", name="resize")(x)
    for layer in preprocessing_layers(spec.preprocess):
        x = layer(x)
    backbone = build_backbone(config, size)
    backbone.name = "backbone"
    x = backbone(x)
    x = head(x, config, n_classes)
    outputs = layers.Activation("softmax", dtype="float32", name="probs")(x)
    model = keras.Model(inputs, outputs, name=config.backbone.replace(":", "_").replace(".", "_"))
    set_bn_momentum(model, config.bn_momentum)
    return model


def set_bn_momentum(model, momentum: float) -> None:
    """Validation uses BatchNorm's moving statistics; at Keras' default momentum (0.99) they trail
    the weights by hundreds of steps, and a short fine-tune then validates far below its training
    accuracy. 0.9 follows within a few dozen steps."""
    from keras import layers

    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = momentum


def head(x, config, n_classes: int):
    """The seed team's head, or a linear probe. Glorot initialisation (Keras' default) throughout."""
    from keras import layers

    x = layers.GlobalAveragePooling2D(name="gap")(x)
    if config.head == "linear":
        x = layers.Dropout(config.dropout, name="head_dropout")(x)
        return layers.Dense(n_classes, name="logits")(x)
    x = layers.BatchNormalization(name="head_bn")(x)
    x = layers.Dropout(config.dropout, name="head_dropout0")(x)
    for i, width in enumerate((1024, 512), start=1):
        x = layers.Dense(width, name=f"head_dense{i}")(x)
        x = layers.LeakyReLU(name=f"head_leaky{i}")(x)
        x = layers.Dropout(config.dropout, name=f"head_dropout{i}")(x)
    return layers.Dense(n_classes, name="logits")(x)


def set_trainable(model, unfreeze: float, freeze_batchnorm: bool = False) -> None:
    """Train the head and the top `unfreeze` fraction of the backbone's weighted layers."""
    from keras import layers

    backbone = model.get_layer("backbone")
    backbone.trainable = True
    weighted = [layer for layer in backbone.layers if layer.weights]
    first = len(weighted) - round(unfreeze * len(weighted))
    for i, layer in enumerate(weighted):
        layer.trainable = i >= first
        if freeze_batchnorm and isinstance(layer, layers.BatchNormalization):
            layer.trainable = False
