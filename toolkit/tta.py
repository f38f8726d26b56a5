"""Test-time augmentation: named sets of deterministic views, prediction per view, merging.

A view is a name such as `flip_rot90`, `left4`, `zoom1.1` or `gamma0.8` (see `view_params`);
a spec joins view names and set names with `+` (`d4+shifts`). Blood cells have no
orientation, so the dihedral group D4 (4 quarter turns, each with and without a flip) is the
natural set; shifts, scales and photometric views are there to test whether they help.

The names (VIEW_SETS, MERGES) are defined here only; numpy and Keras are imported inside functions, so
the CLI lists the names in --help without loading them.
"""

from __future__ import annotations

import re
import weakref
from typing import TYPE_CHECKING

from toolkit.errors import CellfuseError

if TYPE_CHECKING:
    import numpy as np

D4 = ["id", "rot90", "rot180", "rot270", "flip", "flip_rot90", "flip_rot180", "flip_rot270"]
VIEW_SETS: dict[str, list[str]] = {
    "none": ["id"],
    "flips": ["id", "flip", "flip_rot180", "rot180"],  # identity, left-right, up-down, both
    "d4": D4,
    "shifts": ["id", "down4", "up4", "right4", "left4"],
    "scales": ["id", "zoom0.9", "zoom1.1"],
    "photometric": ["id", "bright-16", "bright16", "contrast0.8", "contrast1.25", "gamma0.8", "gamma1.25"],
    # normalising views: each undoes one kind of shift (colour cast, contrast, noise, stain) per image
    "normalize": ["id", "grayworld", "stretch", "reinhard", "median3", "median3_reinhard"],
}
NORMALISERS = ("grayworld", "stretch", "median3", "reinhard")  # toolkit.layers.Normalize's methods
MERGES = ("mean", "geometric", "logits")

_SHIFTS = {"down": (1, 0), "up": (-1, 0), "right": (0, 1), "left": (0, -1)}
_NUMBER = r"(\d+(?:\.\d+)?)"
_TOKENS = [  # (pattern, kwargs of toolkit.layers.ImageView from the match)
    (r"flip", lambda m: {"flip": True}),
    (r"rot(90|180|270)", lambda m: {"rot90": int(m[1]) // 90}),
    (r"(down|up|right|left)(\d+)",
     lambda m: {"shift": tuple(int(m[2]) * s for s in _SHIFTS[m[1]])}),
    (rf"zoom{_NUMBER}", lambda m: {"zoom": float(m[1])}),
    (rf"bright(-?{_NUMBER})", lambda m: {"brightness": float(m[1])}),
    (rf"contrast{_NUMBER}", lambda m: {"contrast": float(m[1])}),
    (rf"gamma{_NUMBER}", lambda m: {"gamma": float(m[1])}),
]


def view_params(name: str) -> dict:
    """ImageView keyword arguments of a view name: `_`-joined tokens, e.g. `flip_rot90_zoom1.1`."""
    params: dict = {}
    if name == "id":
        return params
    tokens = name.split("_")
    if set(tokens) & set(NORMALISERS):
        if not set(tokens) <= set(NORMALISERS):
            raise CellfuseError(f"view {name!r}: a normalising view ({', '.join(NORMALISERS)}) cannot be "
                                "joined with a geometric or photometric one; list them as separate views")
        return {"methods": tokens}
    for token in tokens:
        for pattern, to_params in _TOKENS:
            match = re.fullmatch(pattern, token)
            if match:
                params.update(to_params(match))
                break
        else:
            raise CellfuseError(
                f"unknown view or view set {name!r}: sets are {', '.join(VIEW_SETS)}; views look like "
                "rot90, flip_rot270, left4, zoom1.1, bright-16, contrast0.8, gamma1.25 (join with +)")
    if params.get("zoom", 1.0) <= 0 or params.get("gamma", 1.0) <= 0:
        raise CellfuseError(f"view {name!r}: zoom and gamma must be positive")
    return params


def parse_views(spec: str) -> list[str]:
    """Views of a spec such as `d4`, `d4+shifts` or `id+rot90`: set names expand, duplicates drop."""
    views: list[str] = []
    tokens = [t.strip() for t in str(spec).split("+")]
    if not all(tokens):
        raise CellfuseError(f"view spec {spec!r} has an empty part")
    for token in tokens:
        for view in VIEW_SETS.get(token) or [token]:
            view_params(view)  # validates
            if view not in views:
                views.append(view)
    return views


def view_layer(name: str):
    # loads TensorFlow: cli imports this module for --help, and `cellfuse runs` through ensemble
    import toolkit.layers as layers

    params = view_params(name)
    layer = layers.Normalize if "methods" in params else layers.ImageView
    return layer(**params, name=f"view_{_safe(name)}")


def _safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", lambda m: {"-": "m", ".": "p"}.get(m[0], "_"), name)


def _as_views(views) -> list[str]:
    return parse_views(views if isinstance(views, str) else "+".join(views))


def parse_tta(spec: str) -> tuple[list[str], str]:
    """Views and merge of a TTA spec: `d4` merges by mean, `d4:geometric` by geometric mean."""
    views, _, how = str(spec).partition(":")
    how = how.strip() or "mean"
    if how not in MERGES:
        raise CellfuseError(f"TTA spec {spec!r}: unknown merge {how!r}; choose one of {', '.join(MERGES)}")
    return parse_views(views), how


def predict_views(model, images: np.ndarray, views, batch_size: int = 256, progress=None) -> np.ndarray:
    """(V, n, C) probabilities of `model` on each view of raw images.

    All views of a batch go through one graph (one trace per model, not per view); a batch holds
    about `batch_size` viewed images, so memory does not grow with the number of views.
    `progress(units)` is called after each batch with the views done, in whole-data-set units.
    """
    import numpy as np

    views = _as_views(views)
    viewed = _viewed_model(model, tuple(views))
    step = max(1, batch_size // len(views))
    chunks = []
    for start in range(0, len(images), step):
        batch = np.asarray(images[start:start + step], dtype=np.float32)
        padded = np.concatenate([batch, np.zeros((step - len(batch), *batch.shape[1:]), np.float32)])
        out = _as_list(viewed.predict_on_batch(padded))  # one batch shape: traced once, never again
        chunks.append(np.stack([np.asarray(p)[:len(batch)] for p in out]))
        if progress is not None:
            progress(len(views) * len(batch) / len(images))
    probs = np.concatenate(chunks, axis=1).astype(np.float32)
    if probs.ndim != 3:
        raise CellfuseError(f"model {model.name!r} returned shape {probs.shape[1:]} per view; "
                            "expected (n, classes)")
    check_probabilities(probs, f"model {model.name!r}")
    return probs


def check_probabilities(probs, what: str) -> None:
    """Rows of class probabilities, as every metric, ensemble and grade assumes: a model ending in
    logits (no softmax) would otherwise give confident nonsense (NLL 18, ECE 0) without a word."""
    import numpy as np

    sums = probs.sum(axis=-1)
    if not np.isfinite(probs).all():
        problem = "NaN or infinite outputs"
    elif probs.min() < -1e-4 or probs.max() > 1 + 1e-3 or np.abs(sums - 1).max() > 1e-2:
        problem = (f"outputs from {probs.min():.3g} to {probs.max():.3g}, rows summing to "
                   f"{sums.min():.3g}-{sums.max():.3g}")
    else:
        return
    raise CellfuseError(f"{what} does not output class probabilities ({problem}); its last layer needs "
                        "a softmax (cellfuse's own models have one)")


_VIEWED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {views: its viewed model}


def _viewed_model(model, views: tuple):
    """One Keras model computing `model` on every view, built once per model and view list: a new
    model each call would trace a new predict function each call (TensorFlow's retracing warning)."""
    import keras

    cache = _VIEWED.setdefault(model, {})
    if views not in cache:
        inputs = keras.Input(model.input_shape[1:])
        cache[views] = keras.Model(inputs, [model(inputs if v == "id" else view_layer(v)(inputs)) for v in views])
    return cache[views]


def _as_list(outputs):
    return outputs if isinstance(outputs, (list, tuple)) else [outputs]


def merge(probs: np.ndarray, how: str = "mean") -> np.ndarray:
    """Merge (V, n, C) view probabilities over axis 0, as toolkit.layers.MergeViews does."""
    import numpy as np

    if how not in MERGES:
        raise CellfuseError(f"unknown merge {how!r}; choose one of {', '.join(MERGES)}")
    probs = np.asarray(probs, dtype=np.float64)
    if how == "mean":
        return probs.mean(0)
    from scipy.special import softmax

    from toolkit.report import EPS  # report loads numpy: cli imports the view names for --help

    return softmax(np.log(np.maximum(probs, EPS)).mean(0), axis=-1)


def wrap_with_tta(model, views, merge: str = "mean"):
    """One Keras model: raw pixels in, the merged probabilities of `model` on every view out.

    `views` is a list of view names or a spec; a spec's merge (`d4:geometric`) overrides `merge`.
    """
    import keras

    import toolkit.layers as layers  # loads TensorFlow, as in view_layer

    if isinstance(views, str) and ":" in views:  # a full spec such as "d4:geometric"
        views, merge = parse_tta(views)
    views = _as_views(views)
    if merge not in MERGES:
        raise CellfuseError(f"unknown merge {merge!r}; choose one of {', '.join(MERGES)}")
    inputs = keras.Input(model.input_shape[1:], name="images")
    outputs = [model(inputs) if v == "id" else model(view_layer(v)(inputs)) for v in views]
    merged = outputs[0] if len(outputs) == 1 else layers.MergeViews(merge, name="merge_views")(outputs)
    return keras.Model(inputs, merged, name=f"{model.name}_tta")
