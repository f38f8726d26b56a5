"""`cellfuse predict`: class probabilities of any model on new images, one CSV row per image.

Inputs are challenge npz files, image files, or folders searched recursively for images. An image
file of any size or mode becomes the model's 96x96 RGB input the way the challenge data was made
from the PBC photographs: Pillow's convert("RGB"), a centre crop to a square, then a Lanczos
resize to 96x96. Unreadable image files are reported and skipped.

Every user error (a missing path, no images, a bad --out) is raised before TensorFlow is imported,
so it is reported in a second; only then are the images read and the model loaded.
"""

from __future__ import annotations

import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.data import CLASS_NAMES, IMAGE_SUFFIXES, load_images, to_model_input
from toolkit.errors import CellfuseError
from toolkit.export import WEIGHTS
from toolkit.runs import check_new_file, load_model, resolve_model_file, write_csv
from toolkit.tta import merge, parse_tta, predict_views

SKIPPED_SHOWN = 10  # unreadable (or upscaled) files named one per line; the rest are counted
UPSCALED_BELOW = 48  # px: a shorter side is enlarged more than 2x to 96, detail the model never saw invented


@dataclass
class Inputs:
    """What the INPUT arguments hold. Rows come out npz files first, then image files, each in the order given."""

    npz: list[Path] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    named: list[Path] = field(default_factory=list)  # the arguments themselves


def predict_files(model, inputs, out, *, tta: str = "none", batch_size: int = 256, force: bool = False,
                  console=None) -> dict:
    """Predict every image of `inputs` with `model` (a .keras file, run directory or submission zip);
    write `out` (.csv): source, row, predicted class, one probability column per class."""
    from rich.console import Console

    console = console or Console()
    views, how = parse_tta(tta)
    if batch_size < 1:
        raise CellfuseError(f"batch size must be positive, got {batch_size}")
    found = find_inputs(inputs)
    model_path = check_model_path(model)
    out = check_new_file(out, ".csv", force, inputs=[model_path, *found.named], writer="predict")
    sources, images, skipped, upscaled = read_inputs(found, console)
    probs = predict_images(model_path, images, views, how, batch_size, console)
    names = class_names(probs.shape[1])
    write_predictions(out, sources, probs, names)
    summary = summarise(model, out, tta, sources, probs, names, skipped, upscaled)
    print_summary(summary, console)
    return summary


# ---------------------------------------------------------------- checks (no TensorFlow)

def find_inputs(paths) -> Inputs:
    """Sort the arguments into npz files and image files (folders searched recursively)."""
    found = Inputs()
    for path in map(Path, paths):
        if not path.exists():
            raise CellfuseError(f"{path}: does not exist")
        found.named.append(path)
        if path.is_dir():
            found.images.extend(images_in(path))
        elif path.suffix.lower() == ".npz":
            found.npz.append(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            found.images.append(path)
        else:
            raise CellfuseError(f"{path}: not an .npz, an image ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                                "or a folder of images")
    if not found.named:
        raise CellfuseError("no INPUT given: name npz files, images or folders of images")
    found.npz, found.images = _each_once(found.npz), _each_once(found.images)  # a folder and a file in it
    return found


def _each_once(paths: list[Path]) -> list[Path]:
    """The files in order, each once however often it was named (a folder and a file in it)."""
    first = {}
    for path in paths:
        first.setdefault(path.resolve(), path)
    return list(first.values())


def images_in(folder: Path) -> list[Path]:
    """The image files in `folder` and below, sorted; other files are ignored."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CellfuseError(f"{folder}: no images found in this folder or below "
                            f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def check_model_path(model) -> Path:
    """The .keras file to load: MODEL itself, the one its run directory holds, or the zip holding it."""
    model = Path(model)
    if not model.exists():
        raise CellfuseError(f"{model}: does not exist")
    if model.is_file() and model.suffix == ".zip":
        zip_member(model)
        return model
    return resolve_model_file(model)


def zip_member(submission: Path) -> str:
    """The weights file inside a `cellfuse export` zip (model.keras at its root)."""
    try:
        with zipfile.ZipFile(submission) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        raise CellfuseError(f"{submission}: not a zip file") from None
    if WEIGHTS not in names:
        raise CellfuseError(f"{submission}: holds no {WEIGHTS} at its root (found "
                            f"{', '.join(names[:5]) or 'nothing'}); predict reads zips made by `cellfuse export`")
    return WEIGHTS


# ---------------------------------------------------------------- reading images

def read_inputs(found: Inputs, console) -> tuple[list[tuple[str, int | None]], np.ndarray, list[str], list[str]]:
    """Sources (path, npz row or None), the (n, 96, 96, 3) uint8 images, the unreadable files, and the
    files enlarged more than 2x (a short side under UPSCALED_BELOW pixels), each with its size."""
    from PIL import Image
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    sources, chunks, skipped, upscaled = [], [], [], []
    for path in found.npz:
        images = load_images(path)  # labels, if any, are not needed
        sources += [(str(path), row) for row in range(len(images))]
        chunks.append(images)
    decoded = []
    with Progress(TextColumn("reading images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        for file in progress.track(found.images):
            try:
                decoded.append(to_model_input(file))
                sources.append((str(file), None))
                with Image.open(file) as image:  # the header only
                    if min(image.size) < UPSCALED_BELOW:
                        upscaled.append(f"{file}: {image.width}x{image.height}")
            except Exception as e:  # Pillow raises many types on a damaged file; one bad file must not stop the rest
                skipped.append(f"{file}: {one_line(e)}")
    if decoded:
        chunks.append(np.stack(decoded))
    if not sources:
        raise CellfuseError(f"none of the {len(found.images)} image files could be read; first: {skipped[0]}")
    return sources, np.concatenate(chunks), skipped, upscaled


def one_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# ---------------------------------------------------------------- predicting

def predict_images(model_path: Path, images: np.ndarray, views, how: str, batch_size: int, console):
    """(n, C) probabilities merged over the TTA views, as `cellfuse evaluate` computes them."""
    from rich.progress import Progress

    model = load_any(model_path)
    want = tuple(model.input_shape[1:])
    if want != images.shape[1:]:
        raise CellfuseError(f"{model_path}: takes images of shape {want}; predict feeds {images.shape[1:]}")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"predicting {len(images)} images", total=len(views))
        probs = predict_views(model, images, views, batch_size,
                              progress=lambda units: progress.advance(task, units))
    return merge(probs, how)


def load_any(model_path: Path):
    """Load a .keras file, or the model.keras inside a submission zip. The zip's own model.py is not
    run: it returns class indices only, and loading the weights in safe mode runs no code from the zip."""
    if model_path.suffix != ".zip":
        return load_model(model_path, compile=False)
    member = zip_member(model_path)
    with tempfile.TemporaryDirectory(prefix="cellfuse-predict-") as tmp:
        with zipfile.ZipFile(model_path) as archive:
            weights = Path(archive.extract(member, tmp))
        return load_model(weights, compile=False)


def class_names(n_classes: int) -> tuple[str, ...]:
    return CLASS_NAMES if n_classes == len(CLASS_NAMES) else tuple(f"class {i}" for i in range(n_classes))


# ---------------------------------------------------------------- output

def write_predictions(out: Path, sources, probs: np.ndarray, names) -> Path:
    rows = [{"source": source, "row": "" if row is None else row, "class": names[int(np.argmax(p))],
             **{name: f"{q:.6f}" for name, q in zip(names, p, strict=True)}}
            for (source, row), p in zip(sources, probs, strict=True)]
    return write_csv(out, rows)


def summarise(model, out: Path, tta: str, sources, probs: np.ndarray, names, skipped: list[str],
              upscaled: list[str]) -> dict:
    counts = np.bincount(np.argmax(probs, axis=1), minlength=len(names))
    return {"model": str(model), "out": str(out), "tta": tta, "predicted": len(sources),
            "skipped": len(skipped), "skipped_files": skipped, "upscaled": len(upscaled), "upscaled_files": upscaled,
            "counts": {name: int(c) for name, c in zip(names, counts, strict=True)}}


def print_summary(summary: dict, console) -> None:
    from rich.markup import escape

    for line in summary["skipped_files"][:SKIPPED_SHOWN]:
        console.print(f"[yellow]skipped[/yellow] {escape(line)}", soft_wrap=True)
    if summary["skipped"] > SKIPPED_SHOWN:
        console.print(f"[yellow]skipped[/yellow] {summary['skipped'] - SKIPPED_SHOWN} more unreadable files")
    for line in summary["upscaled_files"][:SKIPPED_SHOWN]:
        console.print(f"[yellow]upscaled more than 2x[/yellow] {escape(line)}", soft_wrap=True)
    if summary["upscaled"]:
        more = f" ({summary['upscaled'] - SKIPPED_SHOWN} more not named)" if summary["upscaled"] > SKIPPED_SHOWN else ""
        console.print(f"[yellow]{summary['upscaled']} image(s) smaller than {UPSCALED_BELOW} px on a side were "
                      f"enlarged to the model's 96 px{more}: their predictions rest on detail the resize "
                      "invented[/yellow]", soft_wrap=True)
    counts = ", ".join(f"{name} {n}" for name, n in summary["counts"].items() if n)
    console.print(f"predicted {summary['predicted']} images, skipped {summary['skipped']} unreadable; "
                  f"wrote {escape(summary['out'])}", soft_wrap=True)
    console.print(f"predicted classes: {escape(counts)}", soft_wrap=True)
