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


@_register
class MergeViews(keras.layers.Layer):
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
class TemperatureScale(keras.layers.Layer):
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
class WeightedSum(keras.layers.Layer):
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
