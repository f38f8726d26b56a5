"""Augmentation pipelines from a recipe's `[augment]` section, run inside tf.data on batches.

A section names a preset (`none`, `light`, `medium`, `heavy`) or lists layers in order, e.g.

    [augment]
    preset = "medium"
    mixup = 0.2            # Beta alpha; 0 turns MixUp off
    cutmix = 1.0           # Beta alpha; 0 turns CutMix off
    mix_prob = 0.5         # chance a batch is mixed (by MixUp or CutMix, half each when both are on)
    val_preset = "none"    # optional augmentation of the validation batches (never mixed)
    layers = [{layer = "RandAugment", magnitude = 0.3}, {layer = "RandomCutout", height_factor = 0.2,
              width_factor = 0.2, p = 0.5}]   # when given, replaces the preset
    augmix = true          # keras-cv's AugMix after the preset (and mixing); off by default
    augmix_severity = 0.3  # AugMix's op strength, 0.01..1 (the paper's 3 of 10)
    augmix_width = 3       # chains mixed per image
    augmix_depth = [1, 3]  # ops per chain: a number or a [low, high] range

AugMix (Hendrycks et al. 2020) runs last, on the image the preset (and MixUp/CutMix) made. With
`views=3` (`[train] consistency > 0`, see toolkit.consistency) each image comes out three times, as
the paper feeds its Jensen-Shannon loss: that image ("clean") and two independent AugMix views of it,
interleaved per image (clean, view 1, view 2, next image...) with the label repeated, so any split of
a batch at a multiple of three (tf.distribute's) keeps an image's views together.

A layer name resolves to keras-cv's layer where keras-cv has one, else to Keras core's; prefix it
with `keras.` or `keras_cv.` to choose. `RandomRot90` is ours (neither library has it). Every layer
takes `p`, the chance each image is augmented by it. `value_range` is filled in as (0, 255).

keras-cv layers stay here, in the input pipeline: inside a model they keep augmenting at predict time
and some crash in graph mode, so anything that must live inside a saved model uses Keras core layers.

Determinism: with a seed every layer is seeded and TF's global seed is set (keras-cv draws MixUp's
Beta and RandAugment's magnitude from unseeded TF ops), so the augmenter called on the same batches
in the same order returns the same output. Inside a parallel `tf.data` map the draws of batches that
run at once interleave, and keras-cv's per-image layers (RandAugment, AugMix, GridMask, ...) draw
inside a `tf.map_fn` whose iterations run in parallel in graph mode, so training-time augmentation is
reproducible in distribution, not bit for bit, unless `[train] deterministic` serialises both
(`compat.set_op_determinism`; AugMix's own loop stays parallel).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from pathlib import Path

import numpy as np

from toolkit.corrupt import corrupt_share
from toolkit.data import CLASS_NAMES, IMAGE_SHAPE, load_dataset, one_hot
from toolkit.errors import CellfuseError
from toolkit.report import save_image_grid

VALUE_RANGE = (0, 255)

_FLIPS = [{"layer": "RandomFlip", "mode": "horizontal_and_vertical"}, {"layer": "RandomRot90"}]
# Small shear and translation, and channel shuffle (stain colours vary), shared by heavy and robust.
_SHIFTS = [
    {"layer": "RandomShear", "x_factor": 0.15, "y_factor": 0.15, "fill_mode": "constant", "fill_value": 128.0, "p": 0.3},
    {"layer": "RandomTranslation", "height_factor": 0.06, "width_factor": 0.06, "p": 0.3},
    {"layer": "ChannelShuffle", "p": 0.3},
]
# Scale changes of up to 30% either way, last (after the occlusions, as a camera would see them): trained
# without them, the Lite0 member and its student lost 15-20 points on clean validation zoomed out to 0.8x,
# and the shifted sample changes scale (docs/results.md). Reflected borders continue the field of red cells.
_ZOOM = {"layer": "keras.RandomZoom", "height_factor": [-0.3, 0.3], "fill_mode": "reflect", "p": 0.5}
# Calibrated on preview grids of the real training images. RandAugment runs without its geometric
# ops: its translation is `magnitude` of the image (30-50% here), which pushes cells out of frame and
# reflects mirror copies in; small shear, translation and zoom are separate layers instead.
PRESETS: dict[str, list[dict]] = {
    "none": [],
    "light": _FLIPS + [
        {"layer": "RandomBrightness", "factor": 0.1},
        {"layer": "RandomContrast", "factor": 0.15},
    ],
    "medium": _FLIPS + [
        {"layer": "RandAugment", "augmentations_per_image": 2, "magnitude": 0.3, "geometric": False},
        {"layer": "RandomHue", "factor": 0.5, "p": 0.3},
        {"layer": "RandomCutout", "height_factor": [0.1, 0.25], "width_factor": [0.1, 0.25], "p": 0.5},
    ],
    "heavy": _FLIPS + [
        {"layer": "RandAugment", "augmentations_per_image": 2, "magnitude": 0.4, "geometric": False},
        *_SHIFTS,
        {"layer": "Solarization", "threshold_factor": [0, 255], "p": 0.2},
        {"layer": "RandomGaussianBlur", "kernel_size": 5, "factor": [0.5, 1.5], "p": 0.2},
        {"layer": "GaussianNoise", "stddev": 0.05, "p": 0.2},
        {"layer": "GridMask", "ratio_factor": [0.1, 0.3], "rotation_factor": 0.15, "p": 0.2},
        {"layer": "RandomCutout", "height_factor": [0.1, 0.25], "width_factor": [0.1, 0.25], "p": 0.3},
        _ZOOM,
    ],
    # heavy, with corruptions stacked more often and harder (noise, blur, JPEG, hue, occlusion): in a
    # corrupted image several corruptions meet, and a model that saw them only one at a time fails there.
    "robust": _FLIPS + [
        {"layer": "RandAugment", "augmentations_per_image": 2, "magnitude": 0.5, "geometric": False},
        *_SHIFTS,
        {"layer": "RandomHue", "factor": 0.5, "p": 0.3},
        {"layer": "Solarization", "threshold_factor": [0, 255], "p": 0.2},
        {"layer": "RandomGaussianBlur", "kernel_size": 5, "factor": [0.5, 2.0], "p": 0.35},
        {"layer": "RandomJpegQuality", "factor": [10, 60], "p": 0.3},
        {"layer": "GaussianNoise", "stddev": 0.08, "p": 0.4},
        {"layer": "GridMask", "ratio_factor": [0.1, 0.3], "rotation_factor": 0.15, "p": 0.3},
        {"layer": "RandomCutout", "height_factor": [0.1, 0.3], "width_factor": [0.1, 0.3], "p": 0.4},
        _ZOOM,
    ],
}
# Mixing that a preset turns on unless the section says otherwise.
_MIXING = {"mixup": 0.2, "cutmix": 1.0, "mix_prob": 0.5}
PRESET_MIXING = {"heavy": _MIXING, "robust": _MIXING}
AUGMIX_DEFAULTS = {"augmix": False, "augmix_severity": 0.3, "augmix_width": 3, "augmix_depth": [1, 3]}
DEFAULTS = {"preset": "medium", "layers": [], "mixup": 0.0, "cutmix": 0.0, "mix_prob": 0.5,
            "val_preset": "none", **AUGMIX_DEFAULTS}

KERAS_CV_LAYERS = (
    "AugMix", "AutoContrast", "ChannelShuffle", "Equalization", "Grayscale", "GridMask",
    "JitteredResize", "Posterization", "RandAugment", "RandomBrightness", "RandomChannelShift",
    "RandomColorDegeneration", "RandomColorJitter", "RandomContrast", "RandomCutout", "RandomFlip",
    "RandomGaussianBlur", "RandomHue", "RandomJpegQuality", "RandomRotation", "RandomSaturation",
    "RandomSharpness", "RandomShear", "RandomTranslation", "RandomZoom", "Solarization",
)
KERAS_LAYERS = (
    "AugMix", "AutoContrast", "Equalization", "GaussianNoise", "RandAugment", "RandomBrightness",
    "RandomColorDegeneration", "RandomColorJitter", "RandomContrast", "RandomElasticTransform",
    "RandomErasing", "RandomFlip", "RandomGaussianBlur", "RandomGrayscale", "RandomHue",
    "RandomInvert", "RandomPerspective", "RandomPosterization", "RandomRotation", "RandomSaturation",
    "RandomSharpness", "RandomShear", "RandomTranslation", "RandomZoom", "Solarization",
)
OWN_LAYERS = ("RandomRot90",)
MIXING_LAYERS = ("MixUp", "CutMix")
# Defaults that keep the image shape (keras-cv's Grayscale makes one channel by default).
_LAYER_DEFAULTS = {"Grayscale": {"output_channels": 3},
                   "JitteredResize": {"target_size": IMAGE_SHAPE[:2], "scale_factor": (0.8, 1.25)}}
# Layers that work on 0..1 images: tf.image.adjust_jpeg_quality; GaussianNoise caps stddev at 1.
_UNIT_RANGE = {"keras_cv.RandomJpegQuality", "keras.GaussianNoise"}


# ----------------------------------------------------------------------------- recipe section

def check_section(section: dict, where: str) -> dict:
    """Validate an `[augment]` table; return it with every key filled in."""
    if not isinstance(section, dict):
        raise CellfuseError(f"{where}: must be a table of keys, got {section!r}")
    section = dict(section)
    unknown = set(section) - set(DEFAULTS)
    if unknown:
        raise CellfuseError(f"{where}: unknown key(s) {sorted(unknown)}; expected {sorted(DEFAULTS)}")
    for key in ("preset", "val_preset"):
        name = section.get(key, DEFAULTS[key])
        if name not in PRESETS:
            raise CellfuseError(f"{where}: {key} = {name!r} is not a preset; choose from {list(PRESETS)}")
    layers = section.get("layers", [])
    if not isinstance(layers, list) or not all(isinstance(spec, dict) for spec in layers):
        raise CellfuseError(f"{where}: layers must be a list of tables like {{layer = \"RandAugment\"}}")
    preset = section.get("preset", DEFAULTS["preset"])
    mixing = {} if layers else PRESET_MIXING.get(preset, {})
    out = {**DEFAULTS, **mixing, **section, "layers": [dict(spec) for spec in layers]}
    for key in ("mixup", "cutmix"):
        out[key] = _number(out[key], f"{where}: {key}", 0.0, None)
    out["mix_prob"] = _number(out["mix_prob"], f"{where}: mix_prob", 0.0, 1.0)
    for i, spec in enumerate(out["layers"]):
        _build_layer(spec, f"{where} layers[{i}]", seed=None)  # raises on a bad name or parameter
    out.update(_check_augmix(out, where))
    return out


def _check_augmix(section: dict, where: str) -> dict:
    """The augmix keys, typed; an augmix_* key set while augmix is off is an error (it would do nothing)."""
    if not isinstance(section["augmix"], bool):
        raise CellfuseError(f"{where}: augmix must be true or false, got {section['augmix']!r}")
    out = {"augmix": section["augmix"],
           "augmix_severity": _number(section["augmix_severity"], f"{where}: augmix_severity", 0.01, 1.0),
           "augmix_width": _count(section["augmix_width"], f"{where}: augmix_width"),
           "augmix_depth": _depth_range(section["augmix_depth"], f"{where}: augmix_depth")}
    changed = [key for key in AUGMIX_DEFAULTS if key != "augmix" and out[key] != AUGMIX_DEFAULTS[key]]
    if changed and not out["augmix"]:
        raise CellfuseError(f"{where}: {', '.join(changed)} set but augmix is off; add augmix = true")
    return out


def _count(value, what: str, hi: int = 10) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
        raise CellfuseError(f"{what} must be a whole number 1..{hi}, got {value!r}")
    return value


def _depth_range(value, what: str) -> list[int]:
    """AugMix's ops per chain as [low, high]; a single number n means exactly n."""
    low_high = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(low_high) != 2:
        raise CellfuseError(f"{what} must be a number or [low, high], got {value!r}")
    low, high = (_count(v, what) for v in low_high)
    if low > high:
        raise CellfuseError(f"{what} = {value!r}: low is above high")
    return [low, high]


def _number(value, what: str, lo: float, hi: float | None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CellfuseError(f"{what} must be a finite number, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise CellfuseError(f"{what} = {value} is outside {lo:g}..{hi:g}" if hi is not None else
                            f"{what} = {value}: must be at least {lo:g}")
    return float(value)


def layer_specs(section: dict, validation: bool = False) -> list[dict]:
    """The ordered per-image layers a (checked) section stands for."""
    if validation:
        return copy.deepcopy(PRESETS[section["val_preset"]])
    return copy.deepcopy(section["layers"] or PRESETS[section["preset"]])


# ----------------------------------------------------------------------------- building layers

def _resolve(name: str, where: str):
    """(qualified name, class or None for our own layers) of a layer name in a spec."""
    import keras
    import keras_cv

    source, _, base = name.rpartition(".")
    if base in MIXING_LAYERS:
        raise CellfuseError(f"{where}: {base} mixes whole batches; set [augment] "
                            f"{base.lower()} = ALPHA and mix_prob instead of listing it")
    if not source and base in OWN_LAYERS:
        return base, None
    if source in ("", "keras_cv") and base in KERAS_CV_LAYERS:
        return f"keras_cv.{base}", getattr(keras_cv.layers, base)
    if source in ("", "keras") and base in KERAS_LAYERS:
        return f"keras.{base}", getattr(keras.layers, base)
    known = sorted(set(KERAS_CV_LAYERS) | set(KERAS_LAYERS) | set(OWN_LAYERS))
    raise CellfuseError(f"{where}: unknown layer {name!r}; known: {', '.join(known)} "
                        "(prefix keras. or keras_cv. to pick the library)")


def _build_layer(spec: dict, where: str, seed: int | None):
    """(callable images -> images, p) for one spec; every failure names `where` and the key."""
    spec = dict(spec)
    name = spec.pop("layer", None)
    if not isinstance(name, str):
        raise CellfuseError(f"{where}: needs layer = \"NAME\"")
    p = _number(spec.pop("p", 1.0), f"{where} {name}: p", 0.0, 1.0)
    qualified, cls = _resolve(name, where)
    if cls is None:
        if spec:
            raise CellfuseError(f"{where} {name}: takes no parameters except p, got {sorted(spec)}")
        return _random_rot90(seed), p
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    accepted = inspect.signature(cls.__init__).parameters
    for key, value in _LAYER_DEFAULTS.get(name.rpartition(".")[2], {}).items():
        params.setdefault(key, value)
    if "value_range" in accepted:
        params.setdefault("value_range", VALUE_RANGE)
    if "seed" in accepted and seed is not None:
        params.setdefault("seed", seed)
    try:
        layer = cls(**params)
    except (TypeError, ValueError) as e:
        raise CellfuseError(f"{where} {name}: bad parameter ({e})".replace("\n", " ")) from None
    # Keras core layers such as GaussianNoise do nothing unless told they are training.
    call = (lambda images: layer(images, training=True)) if qualified.startswith("keras.") else layer
    if qualified in _UNIT_RANGE:
        return (lambda images: call(images / 255.0) * 255.0), p
    return call, p


def _sub_seed(seed: int | None, stream: int) -> int | None:
    """A seed per random stream of one pipeline; never 0, which keras-cv reads as 'no seed'."""
    return None if seed is None else seed * 1009 + stream + 1


def _generator(seed: int | None):
    import tensorflow as tf

    # unseeded: a fresh numpy seed rather than the OS state, which op determinism (train.deterministic) refuses
    return tf.random.Generator.from_seed(seed if seed is not None else int(np.random.default_rng().integers(2**62)))


def _random_rot90(seed: int | None):
    """Each image turned by its own random multiple of 90 degrees (cells have no orientation)."""
    import tensorflow as tf

    gen = _generator(seed)

    def rot90(images):  # k quarter turns = transpose if k is odd, then reverse rows and/or columns
        k = gen.uniform([tf.shape(images)[0], 1, 1, 1], 0, 4, dtype=tf.int32)
        images = tf.where(k % 2 == 1, tf.transpose(images, [0, 2, 1, 3]), images)  # square images
        images = tf.where((k == 1) | (k == 2), tf.reverse(images, [1]), images)
        return tf.where(k >= 2, tf.reverse(images, [2]), images)

    return rot90


def _with_probability(fn, p: float, gen):
    """Apply `fn` to a random fraction `p` of the images (only those are computed)."""
    import tensorflow as tf

    if p >= 1.0:
        return fn

    def maybe(images):
        chosen = tf.where(gen.uniform([tf.shape(images)[0]]) < p)  # (m, 1) row indices

        def apply():
            changed = tf.cast(fn(tf.gather_nd(images, chosen)), images.dtype)
            return tf.tensor_scatter_nd_update(images, chosen, changed)

        return tf.cond(tf.size(chosen) > 0, apply, lambda: images)

    return maybe


def _mixer(section: dict, seed: int | None):
    """MixUp and/or CutMix (keras-cv) on a random fraction `mix_prob` of batches; None when off."""
    import keras_cv
    import tensorflow as tf

    mixers = []
    if section["mixup"] > 0:
        mixers.append(keras_cv.layers.MixUp(alpha=section["mixup"], seed=_sub_seed(seed, 1000)))
    if section["cutmix"] > 0:
        mixers.append(keras_cv.layers.CutMix(alpha=section["cutmix"], seed=_sub_seed(seed, 1001)))
    if not mixers or section["mix_prob"] <= 0:
        return None
    gen = _generator(_sub_seed(seed, 1002))

    def run(layer, images, labels):
        out = layer({"images": images, "labels": labels})
        return out["images"], tf.cast(out["labels"], labels.dtype)

    def mix(images, labels):
        draw = gen.uniform([2])
        branches = [lambda m=m: run(m, images, labels) for m in mixers]
        mixed = branches[0] if len(branches) == 1 else (
            lambda: tf.cond(draw[1] < 0.5, branches[0], branches[1]))
        return tf.cond(draw[0] < section["mix_prob"], mixed, lambda: (images, labels))

    return mix


def _augmix(section: dict, seed: int | None):
    """keras-cv's AugMix on 0..255 images (per image inside a tf.map_fn; runs in tf.data's graph)."""
    import keras_cv

    return keras_cv.layers.AugMix(value_range=VALUE_RANGE, severity=section["augmix_severity"],
                                  num_chains=section["augmix_width"], chain_depth=list(section["augmix_depth"]),
                                  seed=_sub_seed(seed, 1003))


@contextlib.contextmanager
def _float32_layers():
    """Layers made under mixed_float16 would compute 0..255 pixels in float16 (the first loss is NaN)."""
    import keras

    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(policy)


def _interleave(views):
    """[(B, ...)] * k -> (k*B, ...), image i's views at rows k*i .. k*i + k - 1."""
    import tensorflow as tf

    stacked = tf.stack(views, axis=1)
    return tf.reshape(stacked, tf.concat([[-1], tf.shape(stacked)[2:]], 0))


def make_batch_augmenter(section: dict, n_classes: int, seed: int | None = None,
                         validation: bool = False, views: int = 1):
    """(images (B,H,W,3) float 0..255, one-hot labels (B,n)) -> the same, augmented; None if empty.

    For `ds.batch(B).map(fn, num_parallel_calls=tf.data.AUTOTUNE)`. `validation` builds the
    section's `val_preset`, never mixed, never AugMixed. `views=3` (needs augmix) returns (3B, ...)
    images and labels: per image, the preset's (and mixing's) output, then two AugMix views of it.
    """
    import tensorflow as tf

    if views not in (1, 3) or (views == 3 and (validation or not section["augmix"])):
        raise ValueError(f"views={views} needs a training augmenter with augmix on")
    specs = layer_specs(section, validation)
    if seed is not None:
        tf.random.set_seed(seed)
    steps = []
    with _float32_layers():
        for i, spec in enumerate(specs):
            fn, p = _build_layer(spec, f"[augment] layers[{i}]", _sub_seed(seed, 2 * i))
            steps.append(_with_probability(fn, p, _generator(_sub_seed(seed, 2 * i + 1))))
        mix = None if validation else _mixer(section, seed)
        augmix = _augmix(section, seed) if section["augmix"] and not validation else None
    if not steps and mix is None and augmix is None:
        return None

    def augment(images, labels):
        shape = [None if images.shape[0] is None else views * images.shape[0], *images.shape[1:]]
        images = tf.cast(images, tf.float32)
        labels = tf.cast(labels, tf.float32)
        for step in steps:
            images = step(images)
        if mix is not None:
            images, labels = mix(images, labels)
        if augmix is not None:  # its Equalization indexes a 256-bin histogram: noise past 255 crashes it
            images = tf.clip_by_value(images, 0.0, 255.0)
        if augmix is not None and views == 3:
            images = _interleave([images, augmix(images), augmix(images)])
            labels = tf.repeat(labels, 3, axis=0)
        elif augmix is not None:
            images = augmix(images)
        images = tf.ensure_shape(tf.clip_by_value(tf.cast(images, tf.float32), 0.0, 255.0), shape)
        return images, tf.ensure_shape(labels, [None, n_classes])

    return augment


def augment_dataset(ds, section: dict, n_classes: int, seed: int | None = None,
                    validation: bool = False, views: int = 1):
    """`ds` of (images, one-hot labels) batches, augmented in parallel (unchanged if empty)."""
    import tensorflow as tf

    fn = make_batch_augmenter(section, n_classes, seed=seed, validation=validation, views=views)
    if fn is None:
        return ds
    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)  # batches keep their order


# ----------------------------------------------------------------------------- looking and timing

def preview_arrays(images: np.ndarray, labels: np.ndarray, section: dict, out, n_repeats: int = 6,
                   class_names=CLASS_NAMES, seed: int = 0, title: str = "", consistency: float = 0.0,
                   notes=None) -> Path:
    """One row per image: the original (its title followed by `notes[i]`, if any), then `n_repeats`
    augmented copies from the training pipeline.

    With augmix on, the copies come in triples, (clean, AugMix 1, AugMix 2) from one pass, as the
    consistency loss compares them; without consistency training sees only the AugMix views.
    """
    grid, titles, ncols = preview_grid(images, labels, section, n_repeats, class_names, seed, consistency, notes)
    name = section["preset"] if not section["layers"] else "layers"
    return save_image_grid(np.stack(grid), titles, out, ncols=ncols, cell=1.6,
                           suptitle=title or f"augment: {name}{' + AugMix' if section['augmix'] else ''}")


def preview_grid(images: np.ndarray, labels: np.ndarray, section: dict, n_repeats: int, class_names=CLASS_NAMES,
                 seed: int = 0, consistency: float = 0.0, notes=None) -> tuple[list[np.ndarray], list[str], int]:
    """(cells, titles, columns) of preview_arrays' grid, row after row."""
    import tensorflow as tf

    views = 3 if section["augmix"] else 1
    kinds = [""] if views == 1 else ["clean" if consistency else "before AugMix", "AugMix 1", "AugMix 2"]
    n_passes = -(-n_repeats // views)  # triples fill about as many columns as single copies would
    batch = (images.astype(np.float32), one_hot(np.asarray(labels), len(class_names)))
    fn = make_batch_augmenter(section, len(class_names), seed=seed, views=views)
    ds = tf.data.Dataset.from_tensors(batch).repeat(n_passes)
    passes = [(x.numpy(), y.numpy()) for x, y in (ds if fn is None else ds.map(fn))]
    grid, titles = [], []
    for i, label in enumerate(labels):
        grid.append(images[i])
        titles.append(class_names[label] + (f"\n{notes[i]}" if notes and notes[i] else ""))
        for pass_images, pass_labels in passes:
            for v, kind in enumerate(kinds):
                grid.append(pass_images[views * i + v])
                titles.append(f"{kind}\n" * bool(kind) + _label_title(pass_labels[views * i + v], class_names))
    return grid, titles, 1 + n_passes * views


def save_batch_grid(batch, out, class_names=CLASS_NAMES, title: str = "", n: int = 24) -> Path:
    """The first `n` images of a batch as the model trains on them (augmented, mixed, corrupted rows
    included), each titled by the first len(class_names) columns of its target: the label, a mixed
    label's two shares or, in distillation, the teacher's."""
    images, targets = np.asarray(batch[0])[:n], np.asarray(batch[1])[:n, :len(class_names)]
    titles = [_label_title(target, class_names) for target in targets]
    return save_image_grid(images, titles, out, ncols=8, cell=1.6, suptitle=title)


def _label_title(soft: np.ndarray, class_names) -> str:
    """A class name, or the two largest shares of a mixed label."""
    top = np.argsort(soft)[::-1][:2]
    if soft[top[0]] > 0.99:
        return class_names[top[0]]
    return "\n".join(f"{soft[c]:.2f} {class_names[c]}" for c in top if soft[c] > 0.005)


def preview_recipe(recipe, out, n_images: int = 6, n_repeats: int = 6) -> Path:
    """Preview of a recipe's training augmentation on training images of distinct classes; with
    data.corrupt_fraction (a corruption-tuned copy), that share of the rows corrupted first, as training
    corrupts its rows before augmenting them."""
    data = load_dataset(recipe.data.train)
    rng = np.random.default_rng(recipe.train.seed)
    classes = rng.permutation(np.unique(data.labels))
    rows = [rng.choice(np.flatnonzero(data.labels == c)) for c in classes]
    while len(rows) < n_images:  # more rows than classes: repeat classes with other images
        rows.append(int(rng.integers(len(data))))
    rows = np.array(rows[:n_images])
    images, notes = _corrupt_rows(data.images[rows], recipe.data.corrupt_fraction, rng, recipe.train.seed)
    return preview_arrays(images, data.labels[rows], recipe.augment, out,
                          n_repeats=n_repeats, class_names=data.class_names, seed=recipe.train.seed,
                          title=f"{recipe.name}: training augmentation", consistency=recipe.train.consistency,
                          notes=notes)


def _corrupt_rows(images: np.ndarray, fraction: float, rng, seed: int) -> tuple[np.ndarray, list[str]]:
    """`fraction` of the rows (at least one when it is set, so a preview of few images shows one) corrupted
    as a run's training rows are (corrupt.corrupt_share); a note says which, and at what severity."""
    notes = [""] * len(images)
    if not fraction:
        return images, notes
    images, rows, severities = corrupt_share(images, max(1, round(fraction * len(images))), rng, seed)
    for row, severity in zip(rows, severities, strict=True):
        notes[row] = f"corrupted, severity {severity}"
    return images, notes


def pipeline_throughput(section: dict, images: np.ndarray, labels: np.ndarray, batch_size: int = 64,
                        n_batches: int = 30, n_classes: int = 8, views: int = 1) -> float:
    """Images per second through the tf.data augmentation pipeline (tracing and warm-up excluded);
    with `views=3` each image also yields its two AugMix views, and still counts once."""
    import time

    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((images, one_hot(np.asarray(labels), n_classes)))
    ds = ds.repeat().batch(batch_size, drop_remainder=True)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    ds = augment_dataset(ds, section, n_classes, views=views).prefetch(tf.data.AUTOTUNE)
    batches = iter(ds)
    for _ in range(3):
        next(batches)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(batches)
    return n_batches * batch_size / (time.perf_counter() - start)
