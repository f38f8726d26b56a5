"""Corrupted copies of a data set, to validate robustness the way the challenge's hidden test set did.

Each image gets several corruptions, drawn from distinct families and applied in a fixed order
(geometry first, compression last, as a camera and its software would): geometric (rotation, shift,
zoom, shear, flip), photometric (brightness, contrast, saturation, hue shift, gamma, colour cast,
inversion, solarization, posterization), blur (gaussian, motion, defocus), noise (gaussian, shot,
salt and pepper), occlusion (grid of squares, patches, lines) and compression (JPEG, pixelation).
Calibrated by eye against `test_shifted_sample.npz` at severity 3. Plain numpy, Pillow and
scipy.ndimage, with one random generator per image: the same seed gives the same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from toolkit.errors import CellfuseError

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


def corrupt_images(images: np.ndarray, severity: int = 3, seed: int = 0, *, advance=None) -> np.ndarray:
    """A corrupted copy of uint8 images (N,H,W,3); image i depends only on (seed, i, severity)."""
    if severity not in SEVERITIES:
        raise CellfuseError(f"severity must be 1..5, got {severity}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise CellfuseError(f"expected uint8 images (N,H,W,3), got {images.dtype} {images.shape}")
    out = np.empty_like(images)
    for i, image in enumerate(images):
        out[i] = corrupt_image(image, severity, np.random.default_rng([seed, i]))
        if advance is not None:
            advance(1)
    return out


def corrupt_file(data, out, *, severity: int = 3, seed: int = 0, force: bool = False,
                 console=None) -> Path:
    """Write a corrupted copy of DATA to OUT (same labels and `index`); never over DATA itself."""
    from rich.progress import Progress

    from toolkit.data import load_dataset, save_dataset
    from toolkit.runs import check_new_file

    data, out = Path(data), Path(out)
    if out.exists() and data.exists() and out.resolve() == data.resolve():
        raise CellfuseError(f"{out}: is the input data itself; choose another --out")
    check_new_file(out, None, force)
    dataset = load_dataset(data)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"corrupting {data.name} (severity {severity})", total=len(dataset))
        images = corrupt_images(dataset.images, severity, seed,
                                advance=lambda n: progress.advance(task, n))
    save_dataset(out, images, dataset.labels, index=dataset.index)
    if console is not None:
        console.print(f"wrote {out}: {len(images)} images corrupted at severity {severity} (seed {seed})")
    return out
