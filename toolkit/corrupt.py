"""Corrupted copies of a data set, to validate robustness the way the challenge's hidden test set did.

Each image gets several corruptions, drawn from distinct families and applied in a fixed order
(geometry first, compression last, as a camera and its software would): geometric (rotation, shift,
zoom, shear, flip), photometric (brightness, contrast, saturation, hue shift, gamma, colour cast,
inversion, solarization, posterization), blur (gaussian, motion, defocus), noise (gaussian, shot,
salt and pepper), occlusion (grid of squares, patches, lines) and compression (JPEG, pixelation).
Calibrated by eye against `test_shifted_sample.npz` at severity 3. Plain numpy, Pillow and
scipy.ndimage, with one random generator per image: the same seed gives the same bytes.

That mix is the `cellfuse` corruption. Every family is also registered alone (CORRUPTIONS), beside
HELD_OUT: ImageNet-C families (Hendrycks & Dietterich 2019) that neither the augmentation presets nor
the `cellfuse` mix contain, so accuracy on them is robustness nothing was tuned for. A test checks
that over the preset definitions, through the layer -> family table LAYER_FAMILIES.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from toolkit.data import load_dataset, save_dataset, stratified_split
from toolkit.errors import CellfuseError
from toolkit.runs import check_new_file, remove_own_file

SEVERITIES = range(1, 6)


# ----------------------------------------------------------------------------- geometric

# Every corruption takes (image float32 0..255, s = severity / 3, rng): s = 1 is the sample's level.

def _geometric(image: np.ndarray, s: float, rng) -> np.ndarray:
    """One random affine map (rotation, zoom, shear, shift, maybe a flip); corners filled flat."""
    h, w = image.shape[:2]
    angle = np.deg2rad(rng.uniform(-180, 180))
    zoom = np.exp(rng.uniform(-0.25, 0.25) * s)
    shear = rng.uniform(-0.2, 0.2) * s
    shift = rng.uniform(-0.08, 0.08, 2) * s * np.array([h, w])
    flip = rng.choice([-1.0, 1.0])
    rotate = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = rotate @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([zoom, zoom * flip])
    inverse = np.linalg.inv(matrix)
    centre = np.array([h, w]) / 2 - 0.5
    offset = centre - inverse @ (centre + shift)
    fill = image[0].mean(0) if rng.random() < 0.6 else np.full(3, rng.uniform(60, 200))
    return np.stack([ndimage.affine_transform(image[..., c].astype(np.float32), inverse, offset,
                                              order=1, mode="constant", cval=fill[c])
                     for c in range(3)], axis=-1)


# ----------------------------------------------------------------------------- photometric

def _hue_shift(image, rng):
    hsv = np.asarray(Image.fromarray(_u8(image)).convert("HSV")).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(rng.uniform(0.15, 0.85) * 255)) % 256
    return np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)


# Inversion is common in the sample (about a quarter of its images have a dark background).
PHOTOMETRIC_WEIGHTS = {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.15, "gamma": 0.1,
                       "cast": 0.1, "invert": 0.2, "solarize": 0.1, "posterize": 0.05}


def _photometric(image, s, rng):
    """One or two colour changes."""
    for _ in range(1 + int(rng.random() < 0.4)):
        image = np.clip(_colour_change(image, s, rng), 0, 255)
    return image


def _colour_change(image, s, rng):
    x = image.astype(np.float32)
    gray = x.mean(-1, keepdims=True)
    levels = 2 ** min(7, int(4 + s))  # 3 bits left at severity 3
    ops = {
        "brightness": lambda: x + rng.choice([-1, 1]) * rng.uniform(0.3, 1.0) * 70 * s,
        "contrast": lambda: (x - x.mean()) * max(0.1, rng.uniform(1 - 0.6 * s, 1 + 0.5 * s)) + x.mean(),
        "saturation": lambda: gray + (x - gray) * rng.choice([rng.uniform(0, 0.3), 1 + 0.8 * s]),
        "hue": lambda: _hue_shift(x, rng),
        "gamma": lambda: 255 * (x / 255) ** np.exp(rng.choice([-1, 1]) * rng.uniform(0.3, 0.8) * s),
        "cast": lambda: x * (1 + rng.uniform(-0.35, 0.35, 3) * s),
        "invert": lambda: 255 - x,
        "solarize": lambda: np.where(x > 255 - 60 * s, 255 - x, x),
        "posterize": lambda: np.floor(x / levels) * levels,
    }
    return ops[rng.choice(list(ops), p=np.array(list(PHOTOMETRIC_WEIGHTS.values())))]()


# ----------------------------------------------------------------------------- blur and noise

def _motion_kernel(length: int, angle: float) -> np.ndarray:
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2] = 1
    kernel = ndimage.rotate(kernel, angle, reshape=False, order=1)
    return kernel / kernel.sum()


def _disk_kernel(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    kernel = (yy ** 2 + xx ** 2 <= radius ** 2).astype(np.float32)
    return kernel / kernel.sum()


def _blur(image, s, rng):
    kind = rng.choice(["gaussian", "motion", "defocus"])
    if kind == "gaussian":
        sigma = rng.uniform(0.6, 1.4) * s
        return ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0))
    kernel = (_motion_kernel(2 * int(rng.uniform(1, 1 + 3 * s)) + 1, rng.uniform(0, 180))
              if kind == "motion" else _disk_kernel(rng.uniform(1.0, 2.0) * s))
    return np.stack([ndimage.convolve(image[..., c], kernel, mode="reflect") for c in range(3)], -1)


def _noise(image, s, rng):
    kind = rng.choice(["gaussian", "shot", "salt_pepper"])
    if kind == "gaussian":
        return image + rng.normal(0, rng.uniform(6, 16) * s, image.shape)
    if kind == "shot":
        photons = rng.uniform(15, 40) / s  # fewer photons, more noise
        return rng.poisson(np.clip(image, 0, 255) / 255 * photons) / photons * 255
    noisy = image.copy()
    hit = rng.random(image.shape[:2]) < rng.uniform(0.005, 0.025) * s
    noisy[hit] = rng.choice([0.0, 255.0], size=(hit.sum(), 1))
    return noisy


# ----------------------------------------------------------------------------- occlusion and compression

def _occlusion(image, s, rng):
    x = image.copy()
    h, w = x.shape[:2]
    kind = rng.choice(["grid", "patches", "lines"], p=[0.5, 0.4, 0.1])
    colour = lambda: rng.choice([0.0, 255.0]) if rng.random() < 0.5 else rng.uniform(0, 255, 3)  # noqa: E731
    if kind == "grid":  # GridMask-like black or white squares: the sample holds many of these
        step = int(rng.integers(16, 26))
        size = max(2, int(step * rng.uniform(0.35, 0.5) * min(s, 1.5)))
        oy, ox = rng.integers(0, step, 2)
        fill = rng.choice([0.0, 0.0, 255.0])
        for y in range(oy - step, h, step):
            for xx in range(ox - step, w, step):
                x[max(y, 0):max(y + size, 0), max(xx, 0):max(xx + size, 0)] = fill
    elif kind == "patches":
        for _ in range(int(rng.integers(1, 4))):
            ph, pw = (rng.uniform(0.1, 0.25, 2) * s * np.array([h, w])).clip(2, h // 2).astype(int)
            y, xx = rng.integers(0, h - ph), rng.integers(0, w - pw)
            x[y:y + ph, xx:xx + pw] = colour()
    else:
        for _ in range(int(rng.integers(2, 3 + 3 * s))):
            width = int(rng.integers(1, 3))
            at = int(rng.integers(0, h - width))
            if rng.random() < 0.5:
                x[at:at + width] = colour()
            else:
                x[:, at:at + width] = colour()
    return x


def _compression(image, s, rng):
    if rng.random() < 0.3:  # pixelation: down- and up-sample
        h, w = image.shape[:2]
        small = max(8, int(h / (1 + 2 * s * rng.uniform(0.5, 1))))
        im = Image.fromarray(_u8(image)).resize((small, small), Image.BILINEAR)
        return np.asarray(im.resize((w, h), Image.NEAREST)).astype(np.float32)
    buf = io.BytesIO()
    quality = int(np.clip(rng.uniform(8, 40) / s, 3, 95))
    Image.fromarray(_u8(image)).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf)).astype(np.float32)


# ----------------------------------------------------------------------------- held out: ImageNet-C families

# Written with numpy and scipy from the parameters of Hendrycks & Dietterich's reference code
# (github.com/hendrycks/robustness, ImageNet-C/create_c/make_tinyimagenet_c.py, for 64 px images).
# Random layers (fog, snow, spatter) are drawn at the reference's 64 px and resized to the image, so
# their pattern keeps its statistics; pixel distances (glass, elastic) scale by side / 64. Not the
# `imagecorruptions` package: under numpy 2 and current scikit-image its fog, glass and gaussian
# blur fail, it draws from numpy's global random state, and it pulls in OpenCV. Frost is left out
# (it blends in the reference's frost photographs), speckle noise too (gaussian noise in all but
# name, and `heavy` trains on that). Each takes (image float32 0..255, severity 1..5, rng).

REFERENCE_SIDE = 64


def _reference_scale(image) -> float:
    return image.shape[0] / REFERENCE_SIDE


def _at_image_size(layer: np.ndarray, image) -> np.ndarray:
    """A (64, 64) layer resized to the image's (h, w)."""
    h, w = image.shape[:2]
    return ndimage.zoom(layer, (h / layer.shape[0], w / layer.shape[1]), order=1)


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """The centre of x (h, w, c) magnified by `factor` (bilinear, in floats), at x's size."""
    h, w = x.shape[:2]
    ch, cw = h / factor, w / factor
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    return np.stack([np.asarray(Image.fromarray(x[..., c].astype(np.float32), "F")
                                .resize((w, h), Image.BILINEAR, box=box)) for c in range(x.shape[-1])], -1)


def _zoom_blur(image, severity, rng):
    """The mean of the image magnified by 1.00, 1.01, ... up to 1.05-1.25 (a zooming camera)."""
    top = [1.06, 1.11, 1.16, 1.21, 1.26][severity - 1]
    h, w = image.shape[:2]
    rgb = Image.fromarray(_u8(image))  # one RGB resize per zoom: 8-bit steps, invisible in the mean
    zooms = [np.asarray(rgb.resize((w, h), Image.BILINEAR,
                                   box=((w - w / f) / 2, (h - h / f) / 2, (w + w / f) / 2, (h + h / f) / 2)))
             for f in np.arange(1, top, 0.01)]
    return (image + np.sum(zooms, axis=0, dtype=np.float32)) / (len(zooms) + 1)


def _glass_blur(image, severity, rng):
    """Blur, shuffle each pixel with a random neighbour (frosted glass), blur again."""
    sigma, delta, rounds = [(0.1, 1, 1), (0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.9, 2, 2)][severity - 1]
    sigma, delta = sigma * _reference_scale(image), round(delta * _reference_scale(image))
    x = ndimage.gaussian_filter(image, (sigma, sigma, 0))
    h, w = x.shape[:2]
    rows, cols = np.mgrid[:h, :w]
    for _ in range(rounds):  # the reference swaps pixels in a Python loop; a local gather looks the same
        dy, dx = rng.integers(-delta, delta, (2, h, w))
        x = x[np.clip(rows + dy, 0, h - 1), np.clip(cols + dx, 0, w - 1)]
    return ndimage.gaussian_filter(x, (sigma, sigma, 0))


def _elastic_transform(image, severity, rng):
    """A small random affine map, then a smooth random displacement field (Simard et al. 2003)."""
    h, w = image.shape[:2]
    alpha, sigma, jitter = np.array([(0, 0, 0.08), (0.05, 0.3, 0.06), (0.1, 0.08, 0.06),
                                     (0.1, 0.03, 0.03), (0.16, 0.03, 0.02)][severity - 1]) * h
    centre, half = np.array([h, w]) / 2, min(h, w) // 3
    src = np.array([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    dst = src + rng.uniform(-jitter, jitter, src.shape)
    back = np.linalg.solve(np.c_[dst, np.ones(3)], src)  # [p, 1] @ back: where output p reads from
    rows, cols = np.mgrid[:h, :w].astype(np.float64)
    field = [ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="reflect", truncate=3) * alpha
             for _ in range(2)]
    rows, cols = rows + field[0], cols + field[1]  # displace, then map through the affine
    coords = np.stack([rows * back[0, 0] + cols * back[1, 0] + back[2, 0],
                       rows * back[0, 1] + cols * back[1, 1] + back[2, 1]])
    return np.stack([ndimage.map_coordinates(image[..., c], coords, order=1, mode="reflect")
                     for c in range(3)], axis=-1)


def _plasma_fractal(rng, decay: float, size: int = REFERENCE_SIDE) -> np.ndarray:
    """A (size, size) diamond-square height map in 0..1: cloud-like, rougher for smaller `decay`."""
    grid = np.zeros((size, size))
    step, wibble = size, 100.0

    def noisy_mean(total):
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=0)
        grid[half:size:step, half:size:step] = noisy_mean(square + np.roll(square, -1, axis=1))
        centres = grid[half:size:step, half:size:step]
        grid[0:size:step, half:size:step] = noisy_mean(
            centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1))
        grid[half:size:step, 0:size:step] = noisy_mean(
            centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0))
        step //= 2
        wibble /= decay
    grid -= grid.min()
    return grid / grid.max()


def _fog(image, severity, rng):
    strength, decay = [(0.4, 3), (0.7, 3), (1.0, 2.5), (1.5, 2), (2.0, 1.75)][severity - 1]
    x = image / 255
    top = x.max()
    x = x + strength * _at_image_size(_plasma_fractal(rng, decay), image)[..., None]
    return np.clip(x * top / (top + strength), 0, 1) * 255


def _streak_kernel(radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's motion blur (the reference's): a one-sided gaussian line at `angle` degrees."""
    r = int(radius)
    steps = np.arange(r + 1)
    kernel = np.zeros((2 * r + 1, 2 * r + 1))
    rows = np.round(r - steps * np.sin(np.deg2rad(angle))).astype(int)
    cols = np.round(r + steps * np.cos(np.deg2rad(angle))).astype(int)
    np.add.at(kernel, (rows, cols), np.exp(-steps ** 2 / (2 * sigma ** 2)))
    return kernel / kernel.sum()


def _snow(image, severity, rng):
    """Streaks of falling snow over a brightened, washed-out image."""
    from scipy.signal import fftconvolve

    loc, scale, zoom, threshold, radius, sigma, keep = [
        (0.1, 0.2, 1, 0.6, 8, 3, 0.8), (0.1, 0.2, 1, 0.5, 10, 4, 0.8), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.7),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.65), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.6)][severity - 1]
    flakes = _clipped_zoom(rng.normal(loc, scale, (REFERENCE_SIDE, REFERENCE_SIDE, 1)), zoom)[..., 0]
    flakes = np.clip(np.where(flakes < threshold, 0, flakes), 0, 1)
    flakes = fftconvolve(flakes, _streak_kernel(radius, sigma, rng.uniform(-135, -45)), mode="same")
    flakes = _at_image_size(flakes, image)[..., None]
    x = image / 255
    luma = x @ np.array([0.299, 0.587, 0.114])
    x = keep * x + (1 - keep) * np.maximum(x, luma[..., None] * 1.5 + 0.5)
    return np.clip(x + flakes + np.rot90(flakes, 2), 0, 1) * 255


def _spatter(image, severity, rng):
    """Drops of water (severity 1-3) or mud (4-5) on the lens."""
    loc, scale, sigma, threshold, strength, mud = [
        (0.62, 0.1, 0.7, 0.7, 0.6, 0), (0.65, 0.1, 0.8, 0.7, 0.6, 0), (0.65, 0.3, 1, 0.69, 0.6, 0),
        (0.65, 0.1, 0.7, 0.68, 0.6, 1), (0.65, 0.1, 0.5, 0.67, 0.6, 1)][severity - 1]
    liquid = ndimage.gaussian_filter(rng.normal(loc, scale, (REFERENCE_SIDE, REFERENCE_SIDE)), sigma)
    liquid[liquid < threshold] = 0
    x = image / 255
    if mud:
        mask = ndimage.gaussian_filter((liquid > threshold).astype(np.float64), strength)
        mask = _at_image_size(np.where(mask < 0.8, 0, mask), image)[..., None]
        return np.clip(x * (1 - mask) + np.array([63, 42, 20]) / 255 * mask, 0, 1) * 255
    # The reference shades water by the distance to the drops' edges (OpenCV's Canny and distance
    # transform); the distance inside each drop gives the same bright-centred drops.
    shade = liquid * np.minimum(ndimage.distance_transform_edt(liquid > 0), 20)
    shade = _at_image_size(shade / max(shade.max(), 1e-12) * strength, image)[..., None]
    return np.clip(x + shade * np.array([175, 238, 238]) / 255, 0, 1) * 255


HELD_OUT = {"zoom_blur": _zoom_blur, "glass_blur": _glass_blur, "elastic_transform": _elastic_transform,
            "fog": _fog, "snow": _snow, "spatter": _spatter}


# ----------------------------------------------------------------------------- putting it together

# In the order they are applied; weights: how often a family is drawn (colour changes dominate the sample).
FAMILIES = {"geometric": (_geometric, 0.20), "photometric": (_photometric, 0.30),
            "blur": (_blur, 0.10), "noise": (_noise, 0.15), "occlusion": (_occlusion, 0.15),
            "compression": (_compression, 0.10)}


def _u8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def corrupt_image(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Several corruptions of distinct families (more at higher severity), in the fixed order."""
    names = list(FAMILIES)
    weights = np.array([FAMILIES[n][1] for n in names])
    count = int(rng.integers(max(1, severity - 1), severity + 2))
    chosen = set(rng.choice(names, size=min(count, len(names)), replace=False, p=weights / weights.sum()))
    x = image.astype(np.float32)
    for name in names:
        if name in chosen:
            x = np.clip(FAMILIES[name][0](x, severity / 3, rng), 0, 255)
    return _u8(x)


# ----------------------------------------------------------------------------- the registry

def _own_family(name: str):
    return lambda image, severity, rng: FAMILIES[name][0](image, severity / 3, rng)


# name -> (image float32 0..255, severity 1..5, rng) -> image. "cellfuse" is the mix above.
CORRUPTIONS = {"cellfuse": corrupt_image, **{name: _own_family(name) for name in FAMILIES}, **HELD_OUT}
# Names that stand for several corruptions in a --families list.
FAMILY_SETS = {"own": tuple(FAMILIES), "held-out": tuple(HELD_OUT), "all": (*FAMILIES, *HELD_OUT)}

# What each of cellfuse's own families draws from, in the fine-grained names of LAYER_FAMILIES.
OWN_CONTENTS = {
    "geometric": {"rotate", "zoom", "shear", "translate", "flip"},
    "photometric": {"brightness", "contrast", "saturate", "hue", "gamma", "colour_cast", "invert",
                    "solarize", "posterize"},
    "blur": {"gaussian_blur", "motion_blur", "defocus_blur"},
    "noise": {"gaussian_noise", "shot_noise", "impulse_noise"},
    "occlusion": {"occlusion"},
    "compression": {"jpeg_compression", "pixelate"},
}
# Every augmentation layer toolkit.augment knows -> the corruption families it imitates. Complete
# on purpose: a test fails when a preset uses a layer missing here, so the held-out claim stays true.
_RAND_AUGMENT = {"autocontrast", "equalize", "solarize", "saturate", "contrast", "brightness", "shear",
                 "translate"}  # keras-cv's RandAugment ops (shear and translation unless geometric=false)
LAYER_FAMILIES: dict[str, set[str]] = {
    "AugMix": {"autocontrast", "equalize", "posterize", "rotate", "solarize", "shear", "translate"},
    "AutoContrast": {"autocontrast"}, "ChannelShuffle": {"channel_shuffle"}, "Equalization": {"equalize"},
    "GaussianNoise": {"gaussian_noise"}, "Grayscale": {"saturate"}, "GridMask": {"occlusion"},
    "JitteredResize": {"zoom", "translate"}, "Posterization": {"posterize"}, "RandAugment": _RAND_AUGMENT,
    "RandomBrightness": {"brightness"}, "RandomChannelShift": {"colour_cast"},
    "RandomColorDegeneration": {"saturate"}, "RandomColorJitter": {"brightness", "contrast", "saturate", "hue"},
    "RandomContrast": {"contrast"}, "RandomCutout": {"occlusion"},
    "RandomElasticTransform": {"elastic_transform"}, "RandomErasing": {"occlusion"}, "RandomFlip": {"flip"},
    "RandomGaussianBlur": {"gaussian_blur"}, "RandomGrayscale": {"saturate"}, "RandomHue": {"hue"},
    "RandomInvert": {"invert"}, "RandomJpegQuality": {"jpeg_compression"},
    "RandomPerspective": {"perspective"}, "RandomPosterization": {"posterize"}, "RandomRot90": {"rotate"},
    "RandomRotation": {"rotate"}, "RandomSaturation": {"saturate"}, "RandomSharpness": {"sharpness"},
    "RandomShear": {"shear"}, "RandomTranslation": {"translate"}, "RandomZoom": {"zoom"},
    "Solarization": {"solarize"},
}


def layer_families(layer: str) -> set[str]:
    """The corruption families an augmentation layer (`RandomHue`, `keras.GaussianNoise`) imitates."""
    base = layer.rpartition(".")[2]
    if base not in LAYER_FAMILIES:
        raise CellfuseError(f"augmentation layer {layer!r} is missing from toolkit.corrupt.LAYER_FAMILIES; "
                            "add the corruption families it imitates")
    return set(LAYER_FAMILIES[base])


def contents(corruption: str) -> set[str]:
    """The fine-grained families a registered corruption draws from."""
    if corruption == "cellfuse":
        return set().union(*OWN_CONTENTS.values())
    return set(OWN_CONTENTS.get(corruption, {corruption}))


def parse_families(spec=None) -> tuple[str, ...]:
    """Corruption names of a spec: a comma list of names and set names (own, held-out, all).

    None means "cellfuse", the default mix.
    """
    tokens = ["cellfuse"] if spec is None else (
        [t.strip() for t in spec.split(",")] if isinstance(spec, str) else [str(t) for t in spec])
    names: list[str] = []
    for token in tokens:
        if token not in CORRUPTIONS and token not in FAMILY_SETS:
            raise CellfuseError(f"unknown corruption family {token!r}; choose from "
                                f"{', '.join([*FAMILY_SETS, *CORRUPTIONS])} (comma-separated)")
        names += [n for n in FAMILY_SETS.get(token, (token,)) if n not in names]
    return tuple(names)


def corrupt_images(images: np.ndarray, severity: int = 3, seed: int = 0, *, families=None,
                   advance=None) -> np.ndarray:
    """A corrupted copy of uint8 images (N,H,W,3); image i depends only on (seed, i, severity).

    `families` (see parse_families) defaults to the `cellfuse` mix; given several, each image gets
    one of them, drawn with its own generator (as ImageNet-C gives each image one corruption).
    """
    if severity not in SEVERITIES:
        raise CellfuseError(f"severity must be 1..5, got {severity}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise CellfuseError(f"expected uint8 images (N,H,W,3), got {images.dtype} {images.shape}")
    names = parse_families(families)
    out = np.empty_like(images)
    for i, image in enumerate(images):
        rng = np.random.default_rng([seed, i])
        name = names[0] if len(names) == 1 else names[rng.integers(len(names))]
        out[i] = _u8(CORRUPTIONS[name](image.astype(np.float32), severity, rng))
        if advance is not None:
            advance(1)
    return out


def corrupt_share(images: np.ndarray, n_rows: int, rng: np.random.Generator, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A copy of `images` with `n_rows` of them, drawn by `rng`, corrupted by the cellfuse mix at severities
    drawn from 1-5: (images, rows, severities). Each severity's rows go through corrupt_images at once, so
    two rows of one severity get corruptions of their own."""
    rows = rng.choice(len(images), n_rows, replace=False)
    severities = rng.integers(1, 6, len(rows))
    images = images.copy()
    for severity in range(1, 6):
        chosen = np.sort(rows[severities == severity])
        if len(chosen):
            images[chosen] = corrupt_images(images[chosen], severity, seed=seed + severity)
    return images, rows, severities


def corrupt_file(data, out, *, severity: int = 3, seed: int = 0, families=None, force: bool = False,
                 console=None) -> Path:
    """Write a corrupted copy of DATA to OUT (same labels and `index`); never over DATA itself."""
    from rich.progress import Progress


    data, out = Path(data), Path(out)
    if out.exists() and data.exists() and out.resolve() == data.resolve():
        raise CellfuseError(f"{out}: is the input data itself; choose another --out")
    check_new_file(out, ".npz", force, writer="corrupt")  # never another command's file, not even a .npz
    names = parse_families(families)
    dataset = load_dataset(data)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"corrupting {data.name} (severity {severity})", total=len(dataset))
        images = corrupt_images(dataset.images, severity, seed, families=names,
                                advance=lambda n: progress.advance(task, n))
    save_dataset(out, images, dataset.labels, index=dataset.index)
    if console is not None:
        console.print(f"wrote {out}: {len(images)} images corrupted at severity {severity} (seed {seed}) "
                      f"by {', '.join(names)}")
    return out


def write_val_files(clean_npz: Path, out: Path, val_fraction: float = 0.15, seed: int = 0,
                    severity: int = 3, *, held_out: str = "held-out", force: bool = False) -> dict[str, Path]:
    """The validation split training holds out (same function, fraction and seed as the recipes), clean
    (val.npz), corrupted by cellfuse's own families (val_corrupt.npz: steers ensemble selection, as the
    challenge's best teams did) and by families no preset trains on (val_heldout.npz; `held_out` names
    them, "" skips the file). Every file keeps `index`, so ensemble and distill can check that each model
    held out exactly these rows."""

    clean_npz, out = Path(clean_npz), Path(out)
    names = ["val.npz", "val_corrupt.npz"] + (["val_heldout.npz"] if held_out else [])
    targets = {name.removesuffix(".npz"): check_new_file(out / name, ".npz", force, inputs=[clean_npz],
                                                         writer="split")
               for name in names}
    families = parse_families(held_out) if held_out else None  # a bad name fails before any work
    data = load_dataset(clean_npz)
    _, val_rows = stratified_split(data.labels, val_fraction, seed)
    val = data.subset(val_rows)
    written = {"val": save_dataset(targets["val"], val.images, val.labels, val.index)}
    corrupt = corrupt_images(val.images, severity=severity, seed=seed + 1)
    written["val_corrupt"] = save_dataset(targets["val_corrupt"], corrupt, val.labels, val.index)
    if held_out:
        shifted = corrupt_images(val.images, severity, seed + 2, families=families)
        written["val_heldout"] = save_dataset(targets["val_heldout"], shifted, val.labels, val.index)
    else:  # an earlier split's held-out file would no longer match this val.npz: never leave it beside it
        remove_own_file(out / "val_heldout.npz", writer="split")
    return written
