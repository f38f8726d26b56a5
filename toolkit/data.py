"""Load and validate data sets; stratified splits; tf.data pipelines.

Every stage reads data through `load_dataset`, so every stage rejects bad input the same way:
one `CellfuseError` line naming the file and the problem, never a numpy/TensorFlow traceback.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.errors import CellfuseError

CLASS_NAMES = (
    "basophil", "eosinophil", "erythroblast", "immature granulocyte",
    "lymphocyte", "monocyte", "neutrophil", "platelet",
)
IMAGE_SHAPE = (96, 96, 3)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # (N, H, W, 3) uint8, RGB, 0..255
    labels: np.ndarray  # (N,) int64 class indices
    path: str
    index: np.ndarray  # (N,) int64: each row's row in the original file (identity unless cleaned)
    class_names: tuple[str, ...] = CLASS_NAMES
    has_index: bool = False  # the file carried `index` (a cleaned or split file), not just row numbers

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def subset(self, rows: np.ndarray) -> Dataset:
        return Dataset(self.images[rows], self.labels[rows], self.path, self.index[rows],
                       self.class_names, self.has_index)


def load_dataset(path: str | Path, n_classes: int = len(CLASS_NAMES),
                 image_shape: tuple[int, int, int] = IMAGE_SHAPE) -> Dataset:
    """Load a challenge npz (`images`, `labels`[, `index`]) or a folder of class sub-folders."""
    path = Path(path)
    if not path.exists():
        raise CellfuseError(f"{path}: no such file or folder")
    if path.is_dir():
        images, labels, names = _read_folder(path, image_shape)
        index = np.arange(len(labels), dtype=np.int64)
        return Dataset(images, labels, str(path), index, names)
    arrays = _read_npz(path)
    images = _check_images(path, arrays["images"], image_shape)
    labels = _check_labels(path, arrays["labels"], len(images), n_classes)
    index = arrays.get("index")
    has_index = index is not None
    index = _check_index(path, index, len(labels)) if has_index else np.arange(len(labels), dtype=np.int64)
    names = CLASS_NAMES if n_classes == len(CLASS_NAMES) else tuple(
        f"class {i}" for i in range(n_classes))
    return Dataset(images, labels, str(path), index, names, has_index)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with path.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":  # every .npz is a zip; anything else np.load would try to unpickle
            raise CellfuseError(f"{path}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"images", "labels"} - set(npz.files)
            if missing:
                raise CellfuseError(
                    f"{path}: missing key(s) {sorted(missing)}; found {sorted(npz.files)} "
                    "(expected 'images' (N,96,96,3) uint8 and 'labels' (N,) or (N,1))")
            return {k: npz[k] for k in npz.files if k in ("images", "labels", "index")}
    except CellfuseError:
        raise
    except ValueError as e:  # object arrays refuse to load without pickle
        raise CellfuseError(f"{path}: holds object arrays, which cannot be loaded safely ({e})") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        raise CellfuseError(f"{path}: not a readable .npz file (corrupt or truncated: {e})") from None


def _check_images(path, images: np.ndarray, image_shape) -> np.ndarray:
    if images.dtype == object:
        raise CellfuseError(f"{path}: 'images' is an object array; expected uint8 pixels")
    if images.ndim != 4:
        raise CellfuseError(f"{path}: 'images' has shape {images.shape}; expected rank 4 (N,H,W,3)")
    if images.shape[1] == 3 and images.shape[-1] != 3:
        raise CellfuseError(f"{path}: 'images' has shape {images.shape}, which looks channels-first; "
                            "expected channels-last (N,H,W,3)")
    if tuple(images.shape[1:]) != tuple(image_shape):
        raise CellfuseError(f"{path}: 'images' has shape {images.shape}; expected (N,{','.join(map(str, image_shape))})")
    if len(images) == 0:
        raise CellfuseError(f"{path}: 'images' is empty")
    if images.dtype == np.uint8:
        return images
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise CellfuseError(f"{path}: 'images' has dtype {images.dtype}; expected uint8")
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        raise CellfuseError(f"{path}: 'images' holds NaN or infinite values")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > 255:
        raise CellfuseError(f"{path}: 'images' values span {lo:g}..{hi:g}; expected 0..255")
    if hi <= 1.0:
        raise CellfuseError(f"{path}: 'images' values span {lo:g}..{hi:g}, which looks like 0..1; "
                            "expected raw pixels 0..255 (multiply by 255 first)")
    return np.round(images).astype(np.uint8)


def _check_labels(path, labels: np.ndarray, n: int, n_classes: int) -> np.ndarray:
    if labels.dtype == object or not (np.issubdtype(labels.dtype, np.integer)
                                      or np.issubdtype(labels.dtype, np.floating)):
        raise CellfuseError(f"{path}: 'labels' has dtype {labels.dtype}; expected integers")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise CellfuseError(f"{path}: 'labels' has shape {labels.shape}; expected (N,) or (N,1)")
    if len(labels) != n:
        raise CellfuseError(f"{path}: {len(labels)} labels for {n} images")
    if np.issubdtype(labels.dtype, np.floating):
        if not np.isfinite(labels).all() or not np.all(labels == np.round(labels)):
            raise CellfuseError(f"{path}: 'labels' holds non-integer values")
    bad = (labels < 0) | (labels >= n_classes)
    if bad.any():
        row = int(np.argmax(bad))
        raise CellfuseError(f"{path}: label {labels[row]} at row {row} is out of range 0..{n_classes - 1}"
                            f" ({int(bad.sum())} such rows)")
    return labels.astype(np.int64)


def _check_index(path, index: np.ndarray, n: int) -> np.ndarray:
    if not np.issubdtype(index.dtype, np.integer) or index.shape != (n,):
        raise CellfuseError(f"{path}: 'index' must be (N,) integers; got {index.shape} {index.dtype}")
    return index.astype(np.int64)


def _read_folder(path: Path, image_shape) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise CellfuseError(f"{path}: a data folder needs one sub-folder of images per class")
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((path / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as im:
                    im = im.convert("RGB")
                    if im.size != image_shape[1::-1]:
                        im = im.resize(image_shape[1::-1], Image.LANCZOS)
                    images.append(np.asarray(im, dtype=np.uint8))
            except (UnidentifiedImageError, OSError) as e:
                raise CellfuseError(f"{file}: unreadable image ({e})") from None
            labels.append(label)
    if not images:
        raise CellfuseError(f"{path}: no images found in its class sub-folders")
    return np.stack(images), np.asarray(labels, dtype=np.int64), tuple(classes)


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """Write an npz atomically: a crash never leaves a half-written file under `path`."""
    from toolkit.runs import atomic_write_bytes

    buf = io.BytesIO()
    # zlib level 1: photos barely compress, and the default level triples the write time for ~2%.
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue())


def save_dataset(path: str | Path, images: np.ndarray, labels: np.ndarray,
                 index: np.ndarray | None = None) -> Path:
    """Write the challenge format (labels as (N,1) uint8, as the challenge ships them)."""
    arrays = {"images": images.astype(np.uint8), "labels": labels.reshape(-1, 1).astype(np.uint8)}
    if index is not None:
        arrays["index"] = index.astype(np.int64)
    return save_npz(path, **arrays)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val), each class split in the same proportion, reproducible by seed."""
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1:
        raise CellfuseError(f"validation fraction must be between 0 and 1, got {val_fraction}")
    rows = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    n_classes = int((counts > 0).sum())
    n_val = int(np.ceil(val_fraction * len(labels)))  # as scikit-learn counts it
    if stratify is not None and n_val < n_classes:
        raise CellfuseError(f"a validation fraction of {val_fraction} leaves {n_val} "
                            f"of {len(labels)} rows for {n_classes} classes; use at least "
                            f"{n_classes / len(labels):.2f} (data.val_fraction) or more data")
    try:
        train, val = train_test_split(rows, test_size=val_fraction, random_state=seed, stratify=stratify)
    except ValueError as e:  # scikit-learn's own limits (e.g. too few rows for the test size)
        raise CellfuseError(f"cannot split {len(labels)} rows with validation fraction {val_fraction}: {e}") from None
    return np.sort(train), np.sort(val)


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)[labels]


def write_val_files(clean_npz: Path, out: Path, val_fraction: float = 0.15, seed: int = 0,
                    severity: int = 3, *, held_out: str = "held-out", force: bool = False) -> dict[str, Path]:
    """The validation split training holds out (same function, fraction and seed as the recipes), clean
    (val.npz), corrupted by cellfuse's own families (val_corrupt.npz: steers ensemble selection, as the
    challenge's best teams did) and by families no preset trains on (val_heldout.npz; `held_out` names
    them, "" skips the file). Every file keeps `index`, so ensemble and distill can check that each model
    held out exactly these rows."""
    from toolkit.corrupt import corrupt_images, parse_families
    from toolkit.runs import check_new_file

    clean_npz, out = Path(clean_npz), Path(out)
    names = ["val.npz", "val_corrupt.npz"] + (["val_heldout.npz"] if held_out else [])
    targets = {name.removesuffix(".npz"): check_new_file(out / name, ".npz", force, inputs=[clean_npz])
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
    return written
