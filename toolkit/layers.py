"""The few custom Keras layers cellfuse models may contain: test-time views and ensemble arithmetic.

They exist because `safe_mode=True` refuses Lambda layers. This file must stay self-contained
(keras, tensorflow and numpy only): export copies its source into a submission's model.py so the
grader can load the `.keras` file without cellfuse installed.
"""

import keras
from keras import ops

EPS = 1e-12  # floor before log: a probability of exactly 0 must not become -inf


def _register(cls):
    return keras.saving.register_keras_serializable(package="cellfuse")(cls)


@_register
class ImageView(keras.layers.Layer):
    """One deterministic view of raw 0..255 images (n, H, W, 3), in this order:
    horizontal flip, `rot90` quarter turns (counter-clockwise), shift by `shift` = (down, right)
    pixels, zoom by `zoom` (>1 magnifies the centre), then brightness (added), contrast (scaled
    about each image's mean) and gamma. Borders exposed by shift or zoom-out are reflected, so
    a view never shows a black frame the model never saw in training.
    """

    def __init__(self, rot90=0, flip=False, shift=(0, 0), zoom=1.0, brightness=0.0, contrast=1.0,
                 gamma=1.0, **kwargs):
        super().__init__(**kwargs)
        self.rot90, self.flip = int(rot90) % 4, bool(flip)
        self.shift = (int(shift[0]), int(shift[1]))
        self.zoom, self.brightness = float(zoom), float(brightness)
        self.contrast, self.gamma = float(contrast), float(gamma)

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        if self.flip:
            x = ops.flip(x, axis=2)
        if self.rot90:
            x = ops.rot90(x, k=self.rot90, axes=(1, 2))
        if self.shift != (0, 0):
            x = self._shifted(x)
        if self.zoom != 1.0:
            x = self._zoomed(x)
        if (self.brightness, self.contrast, self.gamma) != (0.0, 1.0, 1.0):
            x = self._photometric(x)
        return x

    def _shifted(self, x):
        dy, dx = self.shift
        h, w = x.shape[1], x.shape[2]
        x = ops.pad(x, [(0, 0), (abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)], mode="reflect")
        top, left = abs(dy) - dy, abs(dx) - dx
        return x[:, top:top + h, left:left + w, :]

    def _zoomed(self, x):
        h, w = x.shape[1], x.shape[2]
        ch, cw = round(h / self.zoom), round(w / self.zoom)
        if self.zoom > 1:  # magnify: crop the centre
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[:, top:top + ch, left:left + cw, :]
        else:  # shrink: reflect a border around the image
            py, px = ch - h, cw - w
            x = ops.pad(x, [(0, 0), (py // 2, py - py // 2), (px // 2, px - px // 2), (0, 0)],
                        mode="reflect")
        return ops.image.resize(x, (h, w), interpolation="bilinear")

    def _photometric(self, x):
        x = x + self.brightness
        if self.contrast != 1.0:
            mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
            x = (x - mean) * self.contrast + mean
        x = ops.clip(x, 0.0, 255.0)
        if self.gamma != 1.0:
            x = 255.0 * ops.power(x / 255.0, self.gamma)
        return x

    def compute_output_shape(self, input_shape):
        if self.rot90 % 2:
            return (input_shape[0], input_shape[2], input_shape[1], input_shape[3])
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "rot90": self.rot90, "flip": self.flip,
                "shift": list(self.shift), "zoom": self.zoom, "brightness": self.brightness,
                "contrast": self.contrast, "gamma": self.gamma}


def log_probs(probs):
    return ops.log(ops.maximum(probs, EPS))


class ProbabilityLayer(keras.layers.Layer):
    """Arithmetic on probabilities, in float32 whatever the global policy: under mixed precision a float16
    probability below 6e-8 is 0 and its log -inf, and a teacher rebuilt after a student set the policy
    would hand float16 targets to a float32 student."""

    def __init__(self, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})


@_register
class MergeViews(ProbabilityLayer):
    """Merge a list of (n, C) probability tensors: "mean" of probabilities, "geometric" mean
    (renormalised) or mean of "logits". A softmax model's logits are log-probabilities plus a
    per-image constant that softmax cancels, so "geometric" and "logits" agree exactly here.
    """

    HOWS = ("mean", "geometric", "logits")

    def __init__(self, how="mean", **kwargs):
        super().__init__(**kwargs)
        if how not in self.HOWS:
            raise ValueError(f"merge must be one of {self.HOWS}, got {how!r}")
        self.how = how

    def call(self, probs):
        stacked = ops.stack(list(probs), axis=0)
        if self.how == "mean":
            return ops.mean(stacked, axis=0)
        return ops.softmax(ops.mean(log_probs(stacked), axis=0), axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "how": self.how}


@_register
class TemperatureScale(ProbabilityLayer):
    """softmax(log(p) / T): T > 1 softens over-confident probabilities (Guo et al. 2017)."""

    def __init__(self, temperature=1.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = float(temperature)

    def call(self, probs):
        return ops.softmax(log_probs(probs) / self.temperature, axis=-1)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


@_register
class WeightedSum(ProbabilityLayer):
    """sum_k weights[k] * inputs[k]: the soft vote of an ensemble (weights sum to 1)."""

    def __init__(self, vote_weights=(1.0,), **kwargs):
        super().__init__(**kwargs)
        self.vote_weights = [float(w) for w in vote_weights]

    def call(self, probs):
        probs = list(probs)
        if len(probs) != len(self.vote_weights):
            raise ValueError(f"{len(probs)} inputs for {len(self.vote_weights)} weights")
        return sum(w * p for w, p in zip(self.vote_weights, probs, strict=True))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        return {**super().get_config(), "vote_weights": self.vote_weights}


# ---- normalising views: undo colour, contrast and noise shifts before the model sees an image ----
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.950456, 1.0, 1.088754)  # D65
# Per-image CIELAB mean and standard deviation, averaged over the PBC training images (6,990 cells,
# the challenge's train.npz): the stain every image is matched to by "reinhard" unless a model says otherwise.
REINHARD_MEAN = (76.13, 10.84, 8.81)
REINHARD_STD = (15.49, 8.51, 13.2)


def rgb_to_lab(rgb):
    """sRGB 0..255 (..., 3) -> CIELAB (L 0..100), D65."""
    x = ops.clip(rgb / 255.0, 0.0, 1.0)
    x = ops.where(x > 0.04045, ops.power((x + 0.055) / 1.055, 2.4), x / 12.92)
    xyz = ops.matmul(x, ops.transpose(ops.convert_to_tensor(_RGB_TO_XYZ, x.dtype))) / ops.convert_to_tensor(_WHITE, x.dtype)
    f = ops.where(xyz > 0.008856, ops.power(ops.maximum(xyz, 1e-12), 1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return ops.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def lab_to_rgb(lab):
    """CIELAB -> sRGB 0..255, clipped to the gamut."""
    fy = (lab[..., 0] + 16.0) / 116.0
    f = ops.stack([lab[..., 1] / 500.0 + fy, fy, fy - lab[..., 2] / 200.0], axis=-1)
    xyz = ops.where(f > 0.206893, ops.power(f, 3.0), (f - 16.0 / 116.0) / 7.787)
    xyz = xyz * ops.convert_to_tensor(_WHITE, lab.dtype)
    inverse = ops.inv(ops.convert_to_tensor(_RGB_TO_XYZ, lab.dtype))
    x = ops.clip(ops.matmul(xyz, ops.transpose(inverse)), 0.0, 1.0)
    x = ops.where(x > 0.0031308, 1.055 * ops.power(ops.maximum(x, 1e-12), 1.0 / 2.4) - 0.055, 12.92 * x)
    return 255.0 * ops.clip(x, 0.0, 1.0)


@_register
class Normalize(keras.layers.Layer):
    """Per-image normalisation of raw 0..255 images, the `methods` in order:
    - grayworld: each channel scaled so its mean is the image's mean brightness (colour cast removed);
    - stretch: each channel's 1st..99th percentile stretched to 0..255 (contrast and brightness);
    - median3: 3x3 median filter (salt-and-pepper and speckle noise);
    - reinhard: the image's CIELAB mean and spread matched to `lab_mean`/`lab_std` (stain colour;
      Reinhard et al. 2001, as torchstain and staintools do it).
    Core Keras ops only, so exported submissions carry it."""

    METHODS = ("grayworld", "stretch", "median3", "reinhard")

    def __init__(self, methods=("reinhard",), lab_mean=REINHARD_MEAN, lab_std=REINHARD_STD, **kwargs):
        super().__init__(**kwargs)
        self.methods = tuple(methods)
        unknown = set(self.methods) - set(self.METHODS)
        if unknown:
            raise ValueError(f"unknown normalisation {sorted(unknown)}; known: {', '.join(self.METHODS)}")
        self.lab_mean, self.lab_std = tuple(map(float, lab_mean)), tuple(map(float, lab_std))

    def call(self, images):
        x = ops.cast(images, "float32")
        for method in self.methods:
            x = getattr(self, f"_{method}")(x)
        return ops.cast(x, self.compute_dtype)

    def _grayworld(self, x):
        means = ops.mean(x, axis=(1, 2), keepdims=True)
        return ops.clip(x * ops.mean(means, axis=-1, keepdims=True) / ops.maximum(means, 1.0), 0.0, 255.0)

    def _stretch(self, x):
        flat = ops.reshape(x, (-1, x.shape[1] * x.shape[2], x.shape[3]))
        lo = ops.expand_dims(ops.quantile(flat, 0.01, axis=1, keepdims=True), 1)
        hi = ops.expand_dims(ops.quantile(flat, 0.99, axis=1, keepdims=True), 1)
        return ops.clip(255.0 * (x - lo) / ops.maximum(hi - lo, 1.0), 0.0, 255.0)

    def _median3(self, x):
        h, w = x.shape[1], x.shape[2]
        padded = ops.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], mode="reflect")
        shifts = [padded[:, dy:dy + h, dx:dx + w, :] for dy in range(3) for dx in range(3)]
        return ops.sort(ops.stack(shifts, axis=-1), axis=-1)[..., 4]

    def _reinhard(self, x):
        lab = rgb_to_lab(x)
        mean = ops.mean(lab, axis=(1, 2), keepdims=True)
        std = ops.std(lab, axis=(1, 2), keepdims=True)
        target_mean = ops.convert_to_tensor(self.lab_mean, lab.dtype)
        target_std = ops.convert_to_tensor(self.lab_std, lab.dtype)
        return lab_to_rgb((lab - mean) / ops.maximum(std, 1e-3) * target_std + target_mean)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "methods": list(self.methods), "lab_mean": list(self.lab_mean),
                "lab_std": list(self.lab_std)}
