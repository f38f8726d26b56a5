"""Synthetic blood smears in the challenge's format, contaminated the way the real file was.

The real images may not ship with the project, so the demo draws its own: a peach background crowded
with pale red cells, one white cell (or a platelet cluster) near the centre, and per-image stain,
focus, position and orientation. Cells are painted as optical density (stain absorbance), then turned
into light with Beer-Lambert, so overlaps darken and a stain change tints every structure coherently.
Then the contamination the cleaning step must find is planted: two cartoon pictures repeated under
assorted labels, exact and near duplicates, near duplicates with a different label, and a few single
non-cell pictures. Everything comes from one seeded generator: the same seed gives the same bytes.
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from toolkit.data import CLASS_NAMES, save_dataset
from toolkit.errors import CellfuseError
from toolkit.runs import check_new_file, write_json

SIZE = 96
# Class shares of the real training file, so per-class metrics behave as they would on it.
CLASS_SHARE = np.array([524, 1208, 641, 1116, 509, 794, 1274, 924], dtype=float)
BACKGROUND = np.array([251.0, 226.0, 201.0])  # peach plasma, the dominant colour of the real images


def _od(rgb) -> np.ndarray:
    """Optical density that turns the background into `rgb` (negative where a stain is bluer)."""
    return -np.log(np.asarray(rgb, dtype=np.float32) / BACKGROUND.astype(np.float32))


@dataclass(frozen=True)
class CellLook:
    radius: tuple[float, float]  # cell radius range, pixels
    cytoplasm: tuple  # RGB of the cytoplasm over the background
    granules: tuple  # RGB of its granules
    granule_amount: float  # 0 = none; ~1 = packed
    granule_size: float  # gaussian sigma of one granule, pixels
    nucleus: tuple  # RGB of the nucleus
    chromatin: tuple[float, float]  # (clump size sigma, contrast): coarse and strong vs fine and even
    granules_over_nucleus: bool = False  # basophil granules hide the nucleus


LOOKS = {
    "basophil": CellLook((12, 15), (165, 120, 180), (95, 45, 135), 1.0, 0.8, (95, 50, 140), (1.2, 0.25), True),
    "eosinophil": CellLook((14.5, 18), (218, 150, 150), (205, 115, 105), 1.0, 0.7, (90, 50, 140), (1.2, 0.3)),
    "erythroblast": CellLook((8.5, 12.5), (198, 165, 178), (198, 165, 178), 0.0, 1.0, (55, 25, 95), (1.0, 0.15)),
    "immature granulocyte": CellLook((14.5, 18.5), (192, 178, 210), (175, 150, 200), 0.35, 0.7, (100, 60, 155), (0.7, 0.12)),
    "lymphocyte": CellLook((10.5, 13.5), (178, 172, 212), (178, 172, 212), 0.0, 1.0, (78, 40, 128), (1.4, 0.3)),
    "monocyte": CellLook((16.5, 20.5), (195, 182, 210), (180, 160, 205), 0.25, 0.8, (105, 65, 155), (1.5, 0.3)),
    "neutrophil": CellLook((14.5, 18), (225, 198, 210), (200, 165, 195), 0.5, 0.7, (90, 48, 140), (1.2, 0.3)),
}
RBC_BODY, RBC_RIM = _od((212, 176, 176)), _od((185, 145, 158))
PLATELET = _od((120, 70, 160))


# ---------------------------------------------------------------- nucleus shapes (sets of circles)
# Each returns circle centres (k, 2) relative to the cell centre, in a canonical orientation, and
# radii (k,); the union of the circles is the nucleus. Chains of circles give lobes, bands and beans.

def _arc(n: int, length: float, curvature: float) -> np.ndarray:
    s = np.linspace(-length / 2, length / 2, n)
    if abs(curvature) < 1e-6:
        return np.stack([s, np.zeros_like(s)], 1)
    return np.stack([np.sin(curvature * s) / curvature, (1 - np.cos(curvature * s)) / curvature], 1)


def _lobes_with_strands(n_lobes: int, lobe_r: float, spacing: float, curvature: float):
    """Lobes on an arc joined by thin chromatin strands (3 small circles between neighbours)."""
    points = _arc(4 * (n_lobes - 1) + 1, spacing * (n_lobes - 1), curvature)
    radii = np.full(len(points), 1.7)
    radii[::4] = lobe_r
    return points, radii


def _neutrophil(r, rng):
    n = int(rng.integers(3, 6))
    lobe = rng.uniform(4.2, 5.4) * r / 16
    spacing = min(lobe * rng.uniform(1.5, 1.9), 1.7 * r / (n - 1))
    return _lobes_with_strands(n, lobe, spacing, rng.uniform(0.05, 0.16) * rng.choice([-1, 1]))


def _eosinophil(r, rng):
    return _lobes_with_strands(2, rng.uniform(5.5, 6.8) * r / 16, rng.uniform(8.5, 11.5) * r / 16,
                               rng.uniform(0, 0.08))


def _basophil(r, rng):
    k = int(rng.integers(2, 4))
    return rng.normal(0, 2.5, (k, 2)), rng.uniform(0.4, 0.55, k) * r


def _lymphocyte(r, rng):
    return np.zeros((1, 2)), np.array([r * rng.uniform(0.74, 0.88)])


def _monocyte(r, rng):  # kidney / horseshoe: fat circles on a bent arc
    nr = rng.uniform(5.5, 7.5) * r / 18
    return _arc(7, rng.uniform(1.4, 2.2) * nr * 2, rng.uniform(0.06, 0.16)), np.full(7, nr)


def _immature(r, rng):  # round to oval
    nr = r * rng.uniform(0.55, 0.68)
    return _arc(3, rng.uniform(0, 0.5) * nr, 0), np.full(3, nr)


def _erythroblast(r, rng):
    return np.zeros((1, 2)), np.array([r * rng.uniform(0.5, 0.7)])


NUCLEUS = {"basophil": _basophil, "eosinophil": _eosinophil, "erythroblast": _erythroblast,
           "immature granulocyte": _immature, "lymphocyte": _lymphocyte, "monocyte": _monocyte,
           "neutrophil": _neutrophil}


# ---------------------------------------------------------------- drawing
# Everything is painted as optical density on a padded canvas, each shape only inside its own small
# window (a red cell touches ~700 of the 9,216 pixels), which keeps a picture at a few milliseconds.
PAD = 24


def _window(canvas: np.ndarray, centre, half: int):
    """The canvas patch around `centre` (image coordinates) and each pixel's offset from the centre."""
    cx, cy = int(round(centre[0])), int(round(centre[1]))
    patch = canvas[cy + PAD - half: cy + PAD + half, cx + PAD - half: cx + PAD + half]
    offsets = np.arange(-half, half, dtype=np.float32) + 0.5
    return patch, offsets[None, :] + (cx - centre[0]), offsets[:, None] + (cy - centre[1])


def _soft(distance: np.ndarray, edge: float = 0.7) -> np.ndarray:
    """Anti-aliased inside-ness from a signed distance (negative inside)."""
    return 1 / (1 + np.exp(np.clip(distance / edge, -30, 30)))


def _circles(gx, gy, centres: np.ndarray, radii: np.ndarray, edge: float = 0.7) -> np.ndarray:
    """Soft union of circles (centres relative to the window's centre)."""
    centres, radii = centres.astype(np.float32), radii.astype(np.float32)
    dx2, dy2 = (gx - centres[:, 0, None, None]) ** 2, (gy - centres[:, 1, None, None]) ** 2
    return _soft((np.sqrt(dx2 + dy2) - radii[:, None, None]).min(0), edge)


@functools.cache
def _noise_field(sigma: float) -> np.ndarray:
    """A large smooth unit-variance noise field; textures are random crops of it (far cheaper than
    filtering fresh noise per picture, and the crop position still comes from the seeded generator)."""
    field = gaussian_filter(np.random.default_rng(0).standard_normal((384, 384)).astype(np.float32), sigma)
    return field / field.std()


def _texture(rng, sigma: float, shape) -> np.ndarray:
    """Smooth unit-variance noise: chromatin clumps, granules."""
    y, x = rng.integers(0, 384 - np.array(shape))
    return _noise_field(sigma)[y:y + shape[0], x:x + shape[1]] * np.float32(rng.integers(2) * 2 - 1)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


@functools.cache
def _red_cell_sprites() -> tuple[np.ndarray, np.ndarray]:
    """Optical density of red cells in (radius, squash, axis) variants, each 26x26x3, and their radii.

    A biconcave disc: paler centre (the cell is thinnest there), darker rim.
    """
    offsets = np.arange(26, dtype=np.float32) - 12.5
    sprites, radii = [], []
    for r in np.linspace(9, 11.5, 6):
        for squash in (1.0, 0.92, 0.85):  # slightly oval
            rho = np.hypot(offsets[None, :], offsets[:, None] / squash) / r
            inside = _soft((rho - 1) * r)
            body = inside * (0.6 + 0.4 * rho**2)
            rim = inside * np.exp(-(((rho - 0.86) / 0.12) ** 2))
            sprite = body[..., None] * RBC_BODY + rim[..., None] * (RBC_RIM - RBC_BODY)
            sprites += [sprite, sprite.transpose(1, 0, 2)]
            radii += [r, r]
    return np.stack(sprites).astype(np.float32), np.array(radii)


def _red_cells(canvas: np.ndarray, rng, centre: np.ndarray, keep_clear: float) -> None:
    """A crowd of red cells, touching but rarely overlapping much, sparse around the white cell."""
    sprites, sprite_radii = _red_cell_sprites()
    kind = rng.integers(0, len(sprites), 50)
    radii = sprite_radii[kind]
    candidates = rng.uniform(-8, SIZE + 8, (50, 2))
    clear = keep_clear + radii * rng.uniform(0.3, 1.0, 50)
    apart = np.hypot(*(candidates[:, None] - candidates[None]).transpose(2, 0, 1))
    clash = apart < 0.9 * (radii[:, None] + radii[None])
    kept = np.zeros(50, bool)
    for i in np.flatnonzero(np.hypot(*(candidates - centre).T) > clear):
        kept[i] = not clash[i, kept].any()  # greedy packing
    for (x, y), k in zip(np.rint(candidates[kept]).astype(int) + PAD - 13, kind[kept], strict=True):
        canvas[y:y + 26, x:x + 26] += sprites[k]


def _platelets(canvas: np.ndarray, rng, at, fragments: int) -> None:
    """A clump of tiny purple fragments."""
    patch, gx, gy = _window(canvas, at, 14)
    points = rng.normal(0, 2.5, (fragments, 2)).clip(-9, 9)
    mask = _circles(gx, gy, points, rng.uniform(1.0, 2.6, fragments), edge=0.5)
    patch += (mask * (0.8 + 0.4 * _texture(rng, 0.6, mask.shape)).clip(0.3))[..., None] * PLATELET


def _white_cell(canvas: np.ndarray, look: CellLook, nucleus, rng, centre) -> None:
    """Paint one white cell over the red cells: irregular outline, granular cytoplasm, textured nucleus."""
    patch, gx, gy = _window(canvas, centre, 24)
    r = rng.uniform(*look.radius)
    theta = np.arctan2(gy, gx)
    wobble = sum(rng.normal(0, 0.025) * np.cos(k * theta + rng.uniform(0, 6.3)) for k in (2, 3, 5))
    cell = _soft(np.hypot(gx, gy) - r * (1 + wobble), 0.8)[..., None]
    granules = (_texture(rng, look.granule_size, cell.shape[:2]) - 0.4).clip(0, 1.2) * look.granule_amount
    cytoplasm = _od(look.cytoplasm) + granules[..., None] * (_od(look.granules) - _od(look.cytoplasm))
    points, radii = nucleus(r, rng)
    room = max(r - radii.max() - np.abs(points).max(), 0)  # eccentric, but inside the cell
    points = _rotate(points + [rng.uniform(0, room), 0], rng.uniform(0, 2 * np.pi))
    nuc = _circles(gx, gy, points, radii)
    chromatin = (1 + look.chromatin[1] * _texture(rng, look.chromatin[0], nuc.shape)).clip(0.4)
    inner = cytoplasm * (1 - nuc[..., None]) + (nuc * chromatin)[..., None] * _od(look.nucleus)
    if look.granules_over_nucleus:  # basophil: dark granules over everything
        inner += (granules * 0.4)[..., None] * _od(look.granules)
    patch[:] = patch * (1 - cell) + inner * cell


def draw_cell(label: int, rng: np.random.Generator) -> np.ndarray:
    """One (96, 96, 3) uint8 smear picture of class `label`."""
    name = CLASS_NAMES[label]
    canvas = np.zeros((SIZE + 2 * PAD, SIZE + 2 * PAD, 3), np.float32)
    centre = SIZE / 2 + rng.normal(0, 5, 2).clip(-12, 12)
    if name == "platelet":
        _red_cells(canvas, rng, centre, keep_clear=6)
        for _ in range(int(rng.integers(1, 4))):
            _platelets(canvas, rng, centre + rng.normal(0, 4, 2), int(rng.integers(2, 8)))
    else:
        _red_cells(canvas, rng, centre, keep_clear=LOOKS[name].radius[1] + 2)
        _white_cell(canvas, LOOKS[name], NUCLEUS[name], rng, centre)
        if rng.random() < 0.3:  # a stray platelet somewhere, as in real smears
            _platelets(canvas, rng, rng.uniform(0, SIZE, 2), int(rng.integers(1, 4)))
    stain = np.exp(rng.normal(0, 0.08, 3)) * rng.uniform(0.8, 1.2)  # hue and strength of the stain
    od = canvas[PAD:-PAD, PAD:-PAD] * stain.astype(np.float32)
    focus = 1.4 * rng.uniform(0, 1) ** 2  # mostly sharp, sometimes soft
    if focus > 0.2:
        od = gaussian_filter(od, (focus, focus, 0))
    light = (BACKGROUND * np.exp(rng.normal(0, 0.012, 3))).astype(np.float32)  # lamp / plasma tint
    noise = np.float32(rng.uniform(0.5, 3)) * rng.standard_normal(od.shape, np.float32)
    image = light * np.exp(-od) + noise
    if rng.random() < 0.5:  # orientation: the smear has no handedness
        image = image[:, ::-1]
    return np.rint(image).clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------- non-cell pictures
def _canvas(scale: int = 4):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE * scale, SIZE * scale))
    return image, ImageDraw.Draw(image)


def _finish(image) -> np.ndarray:
    from PIL import Image

    return np.asarray(image.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.uint8)


def draw_face(rng) -> np.ndarray:
    """A cartoon smiley on a sky-blue ground: flat colours, nothing like a smear."""
    image, draw = _canvas()
    sky = tuple(int(v) for v in (60, 150, 230) + rng.integers(-20, 20, 3))
    draw.rectangle((0, 0, 384, 384), fill=sky)
    draw.ellipse((50, 50, 334, 334), fill=(255, 210, 0), outline=(0, 0, 0), width=10)
    draw.ellipse((120, 120, 165, 190), fill=(0, 0, 0))
    draw.ellipse((220, 120, 265, 190), fill=(0, 0, 0))
    draw.arc((105, 150, 280, 280), 20, 160, fill=(200, 0, 0), width=16)
    return _finish(image)


def draw_logo(rng) -> np.ndarray:
    """A geometric logo: white ground, red square, blue ring, green triangle."""
    image, draw = _canvas()
    draw.rectangle((0, 0, 384, 384), fill=(250, 250, 250))
    draw.rectangle((40, 40, 200, 200), fill=(220, 30, 40))
    draw.ellipse((160, 140, 340, 320), outline=(20, 60, 200), width=28)
    tip = int(rng.integers(40, 110))
    draw.polygon([(60, 340), (150, 210 - tip // 2), (240, 340)], fill=(30, 170, 60))
    return _finish(image)


def draw_random_noncell(rng) -> np.ndarray:
    """A one-off non-cell picture: bold random shapes, or text-like lines of dark blocks."""
    image, draw = _canvas()
    if rng.random() < 0.5:
        draw.rectangle((0, 0, 384, 384), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        for _ in range(int(rng.integers(4, 10))):
            x0, y0 = rng.integers(0, 300, 2)
            x1, y1 = x0 + rng.integers(30, 180), y0 + rng.integers(30, 180)
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            shape = (draw.rectangle, draw.ellipse)[int(rng.integers(2))]
            shape((int(x0), int(y0), int(x1), int(y1)), fill=colour)
    else:  # a page of "text"
        draw.rectangle((0, 0, 384, 384), fill=(245, 245, 240))
        for y in range(30, 350, 36):
            x = 24
            while x < 340:
                w = int(rng.integers(12, 60))
                draw.rectangle((x, y, min(x + w, 360), y + 18), fill=(20, 20, 30))
                x += w + int(rng.integers(10, 20))
    return _finish(image)


# ---------------------------------------------------------------- contamination
def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8)


def _near_copy(image: np.ndarray, rng) -> np.ndarray:
    """Re-encoded or slightly brightened/darkened: a near duplicate, never byte-identical."""
    if rng.random() < 0.5:
        copy = _jpeg(image, int(rng.integers(60, 93)))
    else:
        copy = (image.astype(np.int16) + int(rng.choice([-1, 1]) * rng.integers(3, 9))).clip(0, 255)
    copy = copy.astype(np.uint8)
    if np.array_equal(copy, image):
        copy[0, 0, 0] ^= 1
    return copy


def _counts(n: int) -> dict[str, int]:
    """How many planted rows of each kind: a few percent of `n`, like the real file."""
    return {"repeated_noncell": max(2, round(0.02 * n)),  # per picture (two pictures)
            "exact_duplicate": max(1, round(0.01 * n)),
            "near_duplicate": max(1, round(0.01 * n)),
            "label_conflict": max(1, round(0.003 * n)),
            "single_noncell": max(2, round(0.0015 * n))}


def _balanced_labels(n: int, rng) -> np.ndarray:
    """Labels in the real file's class shares (largest remainder), every class present."""
    quota = CLASS_SHARE / CLASS_SHARE.sum() * n
    counts = np.maximum(np.floor(quota).astype(int), 1)
    for c in np.argsort(counts - quota)[: n - counts.sum()]:  # top up the most under-served
        counts[c] += 1
    while counts.sum() > n:  # the minimum of one per class overshot: take from the biggest
        counts[np.argmax(counts)] -= 1
    return rng.permutation(np.repeat(np.arange(len(CLASS_NAMES)), counts))


def _synthesize(n: int, seed: int, progress: Callable[[int], None] | None = None):
    """`synthesize`, plus each copied row's source row (for the planted-rows file)."""
    if not isinstance(n, (int, np.integer)) or n < len(CLASS_NAMES):
        raise CellfuseError(f"synth: --n must be an integer of at least {len(CLASS_NAMES)} "
                            f"(one image per class), got {n!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CellfuseError(f"synth: --seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(n, rng)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, label in enumerate(labels):
        images[i] = draw_cell(int(label), rng)
        if progress and ((i + 1) % 50 == 0 or i + 1 == n):
            progress(i % 50 + 1)

    counts = _counts(n)
    extra_images, extra_labels, kinds, sources = [], [], [], []

    def plant(kind, image, label, source=-1):
        extra_images.append(image)
        extra_labels.append(label)
        kinds.append(kind)
        sources.append(source)

    for picture in (draw_face(rng), draw_logo(rng)):
        k = counts["repeated_noncell"]
        for j, label in enumerate((rng.integers(8) + np.arange(k)) % 8):  # many labels per picture
            copy = picture if j == 0 or rng.random() < 0.6 else _jpeg(picture, int(rng.integers(80, 96)))
            plant("repeated_noncell", copy, int(label))
    src = rng.choice(n, counts["exact_duplicate"] + counts["near_duplicate"] + counts["label_conflict"],
                     replace=False)
    exact, near, conflict = np.split(src, np.cumsum([counts["exact_duplicate"], counts["near_duplicate"]]))
    for s in exact:
        plant("exact_duplicate", images[s].copy(), labels[s], s)
    for s in near:
        plant("near_duplicate", _near_copy(images[s], rng), labels[s], s)
    for s in conflict:
        plant("label_conflict", _near_copy(images[s], rng), (labels[s] + rng.integers(1, 8)) % 8, s)
    for _ in range(counts["single_noncell"]):
        plant("single_noncell", draw_random_noncell(rng), int(rng.integers(8)))

    # shuffle the planted rows in among the cells, then say where everything went
    all_images = np.concatenate([images, np.stack(extra_images)])
    all_labels = np.concatenate([labels, extra_labels]).astype(np.int64)
    order = rng.permutation(len(all_labels))
    row_of = np.argsort(order)  # original position -> shuffled row
    planted = {kind: [] for kind in counts}
    source_of = {}
    for i, (kind, s) in enumerate(zip(kinds, sources, strict=True)):
        row = int(row_of[n + i])
        planted[kind].append(row)
        if s >= 0:
            source_of[row] = int(row_of[s])
    planted = {kind: sorted(rows) for kind, rows in planted.items()}
    return all_images[order], all_labels[order], planted, source_of


def synthesize(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """`n` synthetic cells plus planted contamination, shuffled together.

    Returns images uint8 (M, 96, 96, 3), labels int64 (M,), and the planted rows by kind
    (exact_duplicate, near_duplicate, repeated_noncell, label_conflict, single_noncell), where
    M = n + the planted rows. The same seed gives the same bytes.
    """
    images, labels, planted, _ = _synthesize(n, seed)
    return images, labels, planted


def write_synthetic(out, *, n: int = 2000, seed: int = 0, force: bool = False, console=None) -> Path:
    """Write the synthetic set as a challenge npz, and `<out>.planted.json` saying what was planted."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table

    out = Path(out)
    console = console or Console()
    check_new_file(out, ".npz", force, writer="synth")
    check_new_file(out.with_suffix(".planted.json"), ".json", force, writer="synth")  # the sidecar is an output too
    start = time.perf_counter()
    with Progress(TextColumn("drawing cells"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("draw", total=n)
        images, labels, planted, source_of = _synthesize(n, seed, lambda k: bar.advance(task, k))
    seconds = time.perf_counter() - start
    save_dataset(out, images, labels)
    planted_path = write_json(out.with_suffix(".planted.json"), {
        "data": out.name, "seed": seed, "cells": n, "rows": len(labels),
        "class_names": list(CLASS_NAMES), "planted": planted,
        "source_of": {str(row): src for row, src in sorted(source_of.items())}})

    table = Table(title=f"synthetic smear data: {out}", show_header=False)
    table.add_row("rows", f"{len(labels)} ({n} cells + {len(labels) - n} planted), seed {seed}")
    per_class = np.bincount(labels, minlength=len(CLASS_NAMES))
    table.add_row("per class", ", ".join(f"{name} {c}" for name, c in
                                         zip(CLASS_NAMES, per_class, strict=True)))
    table.add_row("planted", ", ".join(f"{kind} {len(rows)}" for kind, rows in planted.items()))
    table.add_row("planted rows", str(planted_path))
    table.add_row("drawn in", f"{seconds:.1f} s")
    console.print(table)
    return out
