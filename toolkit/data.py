"""Load and validate data sets; stratified splits; perceptual hashes and near-duplicate groups
(`cellfuse clean` and the leakage check of a run's split both use them).

Every stage reads data through `load_dataset`, so every stage rejects bad input the same way:
one `CellfuseError` line naming the file and the problem, never a numpy/TensorFlow traceback.
An npz member's header is checked against the bytes the member holds before anything is allocated;
`check_npz` runs those checks alone (no pixels, no TensorFlow), so a command can refuse a bad file at once.
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.errors import CellfuseError
from toolkit.report import progress_bar
from toolkit.runs import atomic_write_bytes

CLASS_NAMES = (
    "basophil", "eosinophil", "erythroblast", "immature granulocyte",
    "lymphocyte", "monocyte", "neutrophil", "platelet",
)
IMAGE_SHAPE = (96, 96, 3)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
NPZ_MEMBERS = ("images", "labels", "index")
# The most a zip member's stated size may exceed its bytes in the file: stored is 1:1, deflate tops out
# at 1032:1 (zlib's documented limit). A bigger claim is a corrupt or hostile zip, refused before reading.
MAX_EXPANSION = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: 1032}


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
        raise CellfuseError(f"{path}: does not exist")
    if path.is_dir():
        images, labels = _read_folder(path, image_shape)
        return Dataset(images, labels, str(path), np.arange(len(labels), dtype=np.int64))
    arrays = _read_npz(path, image_shape)
    images = _check_images(path, arrays["images"])
    labels = _check_labels(path, arrays["labels"], len(images), n_classes)
    index = arrays.get("index")
    has_index = index is not None
    index = _check_index(path, index, len(labels)) if has_index else np.arange(len(labels), dtype=np.int64)
    names = CLASS_NAMES if n_classes == len(CLASS_NAMES) else tuple(
        f"class {i}" for i in range(n_classes))
    return Dataset(images, labels, str(path), index, names, has_index)


def check_dataset(path: str | Path, n_classes: int = len(CLASS_NAMES),
                  image_shape: tuple[int, int, int] = IMAGE_SHAPE) -> int:
    """`check_npz` for an npz; for a folder of class sub-folders, that it has images (no image is read).
    Returns the number of rows (images)."""
    path = Path(path)
    if path.is_dir():
        return len(_folder_files(path))
    return check_npz(path, n_classes, image_shape)


def check_npz(path: str | Path, n_classes: int = len(CLASS_NAMES),
              image_shape: tuple[int, int, int] = IMAGE_SHAPE) -> int:
    """Check a dataset npz from its headers and labels alone; return its number of rows.

    Members, shapes, dtypes, sizes and the label range are checked without reading a pixel or importing
    TensorFlow, so a command can refuse a bad file in well under a second, before its slow start.
    Raises CellfuseError naming the file and the problem, as `load_dataset` would.
    """
    path = Path(path)
    if not path.is_file():
        raise CellfuseError(f"{path}: does not exist" + (" (a folder: use check_dataset)" if path.is_dir() else ""))
    with _npz_errors(path), _open_npz(path) as archive:
        headers = _npz_headers(path, archive)
        n = _check_image_header(path, headers["images"], image_shape)
        labels = _check_labels(path, _read_member(path, archive, "labels"), n, n_classes)
        if "index" in headers:
            _check_index_header(path, headers["index"], n)
    return len(labels)


@dataclass(frozen=True)
class NpyHeader:
    """What one .npy member of an npz says it holds."""
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize  # Python ints: a hostile shape cannot overflow


def load_images(path: str | Path, image_shape: tuple[int, int, int] = IMAGE_SHAPE) -> np.ndarray:
    """The images of a challenge npz, labelled or not (new images to predict), checked as load_dataset
    checks them; any labels are not read."""
    path = Path(path)
    if not path.is_file():
        raise CellfuseError(f"{path}: does not exist")
    with _npz_errors(path), _open_npz(path) as archive:
        header = _npz_headers(path, archive, needed=("images",))["images"]
        _check_image_header(path, header, image_shape)
        return _check_images(path, _read_member(path, archive, "images"))


def _read_npz(path: Path, image_shape) -> dict[str, np.ndarray]:
    """The wanted members, each read only after its header has been checked against its size."""
    with _npz_errors(path), _open_npz(path) as archive:
        headers = _npz_headers(path, archive)
        _check_image_header(path, headers["images"], image_shape)
        return {name: _read_member(path, archive, name) for name in headers}


@contextmanager
def _npz_errors(path: Path):
    """Zip and stream failures past the header checks: the file is damaged, say so in one line."""
    try:
        yield
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, KeyError) as e:
        raise CellfuseError(f"{path}: not a readable .npz file (corrupt or truncated: {e})") from None


def _open_npz(path: Path) -> zipfile.ZipFile:
    with path.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":  # every .npz is a zip; anything else np.load would try to unpickle
            raise CellfuseError(f"{path}: not a readable .npz file (not a zip archive)")
    return zipfile.ZipFile(path)


def _npz_headers(path: Path, archive: zipfile.ZipFile, needed=("images", "labels")) -> dict[str, NpyHeader]:
    """{member: header} for the members a data set uses, each checked against its size in the zip."""
    found = {name.removesuffix(".npy") for name in archive.namelist() if name.endswith(".npy")}
    missing = set(needed) - found
    if missing:
        raise CellfuseError(
            f"{path}: missing key(s) {sorted(missing)}; found {sorted(found)} "
            "(expected 'images' (N,96,96,3) uint8 and 'labels' (N,) or (N,1))")
    return {name: _member_header(path, archive, archive.getinfo(f"{name}.npy"))
            for name in NPZ_MEMBERS if name in found}


def _check_zip_entry(path: Path, info: zipfile.ZipInfo) -> None:
    """The zip's own sizes for a member are possible for this file (checked before reading a byte)."""
    if info.header_offset + info.compress_size > path.stat().st_size:
        raise CellfuseError(f"{path}: member {info.filename} runs past the end of the file; "
                            "the file is truncated")
    most = MAX_EXPANSION.get(info.compress_type)
    if most is not None and info.file_size > most * info.compress_size:
        raise CellfuseError(f"{path}: member {info.filename} claims {info.file_size} bytes from "
                            f"{info.compress_size} in the file, more than its compression can hold; "
                            "the file is corrupt")


def _member_header(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> NpyHeader:
    """Shape and dtype from a member's .npy header, which must describe exactly the bytes it holds."""
    _check_zip_entry(path, info)
    member = f"{path}: member {info.filename}"
    with archive.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read is None:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, _, dtype = read(f)
        except ValueError as e:
            raise CellfuseError(f"{member} is not a readable .npy array ({str(e)[:120]})") from None
        header = NpyHeader(shape, dtype)
        holds = info.file_size - f.tell()
    if dtype.hasobject:
        raise CellfuseError(f"{member} holds object arrays (Python objects), which cannot be loaded safely")
    if any(n < 0 for n in shape) or header.nbytes != holds:
        raise CellfuseError(f"{member} claims {header.nbytes} bytes (a {dtype} array of shape {shape}) "
                            f"but holds {holds}; the file is truncated or corrupt")
    return header


def _read_member(path: Path, archive: zipfile.ZipFile, name: str) -> np.ndarray:
    with archive.open(f"{name}.npy") as f:
        try:
            return np.lib.format.read_array(f, allow_pickle=False)
        except MemoryError:
            raise CellfuseError(f"{path}: member {name}.npy does not fit in memory") from None


def _check_image_header(path, header: NpyHeader, image_shape) -> int:
    """Shape and dtype of 'images' from its header (before any pixel is read); returns N."""
    shape, dtype = header.shape, header.dtype
    if len(shape) != 4:
        raise CellfuseError(f"{path}: 'images' has shape {shape}; expected rank 4 (N,H,W,3)")
    if shape[1] == 3 and shape[-1] != 3:
        raise CellfuseError(f"{path}: 'images' has shape {shape}, which looks channels-first; "
                            "expected channels-last (N,H,W,3)")
    if tuple(shape[1:]) != tuple(image_shape):
        raise CellfuseError(f"{path}: 'images' has shape {shape}; expected (N,{','.join(map(str, image_shape))})")
    if shape[0] == 0:
        raise CellfuseError(f"{path}: 'images' is empty")
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise CellfuseError(f"{path}: 'images' has dtype {dtype}; expected uint8")
    return shape[0]


def _check_images(path, images: np.ndarray) -> np.ndarray:
    """Pixel values (shape and dtype were checked from the header): uint8 as is, numbers 0..255 rounded."""
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        raise CellfuseError(f"{path}: 'images' holds NaN or infinite values")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > 255:
        raise CellfuseError(f"{path}: 'images' values span {lo:g}..{hi:g}; expected 0..255")
    if hi <= 1.0:
        raise CellfuseError(f"{path}: 'images' values span {lo:g}..{hi:g}, which looks like a 0..1 scale; "
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
        count = int(bad.sum())
        raise CellfuseError(f"{path}: label {labels[row]} at row {row} is out of range 0..{n_classes - 1}"
                            + (f" ({count} such rows)" if count > 1 else ""))
    return labels.astype(np.int64)


def _check_index(path, index: np.ndarray, n: int) -> np.ndarray:
    """Each row's place in the original file, 0 or more (a split's leak check compares them)."""
    _check_index_header(path, NpyHeader(index.shape, index.dtype), n)
    if len(index) and index.min() < 0:
        raise CellfuseError(f"{path}: 'index' holds negative row numbers (from {index.min()}); it names each "
                            "row's place in the original file, 0 or more")
    return index.astype(np.int64)


def _check_index_header(path, header: NpyHeader, n: int) -> None:
    if not np.issubdtype(header.dtype, np.integer) or header.shape != (n,):
        raise CellfuseError(f"{path}: 'index' must be (N,) integers; got {header.shape} {header.dtype}")


# Folder names beside the class names themselves: PBC's own (IG) and plurals are matched too.
FOLDER_ALIASES = {"ig": "immature granulocyte"}


def folder_class(name: str) -> int | None:
    """The class a sub-folder's name stands for, or None: 'Immature_Granulocyte', 'ig', 'platelets'."""
    key = " ".join(name.lower().replace("_", " ").replace("-", " ").split())
    key = FOLDER_ALIASES.get(key, key)
    for candidate in (key, key.removesuffix("s")):
        if candidate in CLASS_NAMES:
            return CLASS_NAMES.index(candidate)
    return None


def hidden(path: Path) -> bool:
    """What tools leave beside data: .ipynb_checkpoints, macOS's __MACOSX folders and ._ files."""
    return path.name.startswith((".", "__MACOSX"))


def _folder_files(path: Path) -> list[tuple[Path, int]]:
    """[(image file, label)] of a folder of class sub-folders, each labelled by its name, never by its
    place in a listing: a test folder that lacks one class keeps every other label right."""
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not hidden(p))
    if not folders:
        raise CellfuseError(f"{path}: a data folder needs one sub-folder of images per class")
    labels = {folder: folder_class(folder.name) for folder in folders}
    unknown = [folder.name for folder, label in labels.items() if label is None]
    if unknown:
        raise CellfuseError(f"{path}: sub-folder(s) {', '.join(map(repr, unknown))} name no class; class "
                            f"folders are named {', '.join(CLASS_NAMES)} (or ig), in any case")
    twice = sorted({CLASS_NAMES[label] for label in labels.values() if list(labels.values()).count(label) > 1})
    if twice:
        raise CellfuseError(f"{path}: more than one sub-folder stands for {', '.join(twice)}")
    files = [(file, labels[folder]) for folder in sorted(folders, key=labels.get)  # rows in class order
             for file in sorted(folder.iterdir()) if file.suffix.lower() in IMAGE_SUFFIXES and not hidden(file)]
    if not files:
        raise CellfuseError(f"{path}: no images found in its class sub-folders")
    return files


def to_model_input(file, size: tuple[int, int] = IMAGE_SHAPE[:2]) -> np.ndarray:
    """An image file as the challenge data was made from its photographs: RGB, centre-cropped to a
    square, resized with Lanczos; (96, 96, 3) uint8. Every command reads image files this way."""
    from PIL import Image

    with Image.open(file) as image:
        image = _as_8bit(image, file).convert("RGB")  # greyscale, palette, CMYK, alpha (dropped): all to RGB
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        # Crop, then resize: the filter never reaches pixels outside the square (ImageOps.fit's would).
        square = image.crop((left, top, left + side, top + side))
        if square.size != size[::-1]:
            square = square.resize(size[::-1], Image.LANCZOS)
        return np.asarray(square, dtype=np.uint8)


def _as_8bit(image, file):
    """16-bit, 32-bit and float greyscale scaled to 0..255, which Pillow's convert("RGB") clips to
    white instead: a 16-bit PNG became a blank image, predicted without a word."""
    from PIL import Image

    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16") or (image.mode == "I" and 255 < top <= 65535):
        scale = 255 / 65535  # 16-bit data, whatever its brightest pixel
    elif image.mode == "F" and top <= 1:
        scale = 255.0  # a float image in 0..1
    elif top <= 255 and values.min() >= 0:
        scale = 1.0
    else:
        raise CellfuseError(f"{file}: {image.mode} image with values from {values.min():g} to {top:g}; "
                            "save it as an 8- or 16-bit image")
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")


def _read_folder(path: Path, image_shape) -> tuple[np.ndarray, np.ndarray]:
    files = _folder_files(path)
    images = []
    for file, _ in files:
        try:
            images.append(to_model_input(file, image_shape[:2]))
        except Exception as e:  # Pillow raises many kinds on a damaged or oversized file: each is the file's
            raise CellfuseError(f"{file}: unreadable image ({type(e).__name__}: {e})") from None
    return np.stack(images), np.array([label for _, label in files], dtype=np.int64)


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """Write an npz atomically: a crash never leaves a half-written file under `path`."""
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


# ---------------------------------------------------------------- perceptual hashes and near duplicates
# (clean's duplicate search, and the leakage check of a run's split)

# Max phash Hamming distance between near duplicates. phash marks the 64 low DCT coefficients
# above their median, so every hash has 32 bits set and distances are even. On the real
# train.npz, ignoring byte-identical copies, the nearest-neighbour distance of the 6,130 distinct
# images is 0 (124 cells + the planted pictures' variants) or 2 (17): all re-encoded or slightly
# altered copies (mean |pixel difference| 3-6). Nothing lies at 4; the closest *different* cells
# are at 6 (1 pair, mean difference 24) and 8 (41). Every pair that is close in pixel space (RMS
# < 8 on 24x24 thumbnails) is within 2 bits. 4 sits in that empty gap: a copy may drift one more
# bit pair than any seen and still match, while the nearest different cells (6) stay apart.
DEFAULT_THRESHOLD = 4


def phash_bits(images: np.ndarray, console=None) -> np.ndarray:
    """imagehash.phash of every image as a uint64 (row-major bits), with a progress bar."""
    import imagehash
    from PIL import Image

    bits = np.empty((len(images), 64), dtype=bool)
    with progress_bar(console) as progress:
        task = progress.add_task("perceptual hashes", total=len(images))
        for i, image in enumerate(images):
            bits[i] = imagehash.phash(Image.fromarray(image)).hash.ravel()
            if i % 512 == 511 or i == len(images) - 1:
                progress.update(task, completed=i + 1)
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between uint64 hashes, vectorised."""
    x = np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64))
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x).astype(np.int64)
    return np.unpackbits(np.atleast_1d(x).view(np.uint8).reshape(-1, 8), axis=1).sum(1).reshape(x.shape)


def near_duplicate_pairs(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) of positions whose hashes differ in at most `threshold` bits.

    Multi-index hashing: cut the 64 bits into threshold + 1 chunks. Two hashes within `threshold`
    bits agree exactly on at least one chunk (pigeonhole), so only hashes sharing a chunk value
    are compared; sorting on each chunk finds them. Pass distinct hashes (see `hash_groups`):
    n identical hashes would make n^2/2 pairs.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    if not 0 <= threshold < 64:
        raise ValueError(f"threshold must be 0..63 bits, got {threshold}")
    n = len(hashes)
    edges = np.linspace(0, 64, threshold + 2).astype(int)
    found = [np.empty(0, np.int64)]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        key = (hashes >> np.uint64(lo)) & np.uint64((1 << int(hi - lo)) - 1)
        order = np.argsort(key, kind="stable")
        key = key[order]
        starts, gap = np.arange(n - 1), 1
        while starts.size:  # runs of equal keys: compare each item with the next, 2nd next, ...
            starts = starts[starts + gap < n]
            starts = starts[key[starts] == key[starts + gap]]
            i, j = order[starts], order[starts + gap]
            close = hamming(hashes[i], hashes[j]) <= threshold
            found.append(np.minimum(i, j)[close] * n + np.maximum(i, j)[close])
            gap += 1
    pairs = np.unique(np.concatenate(found))
    return pairs // max(n, 1), pairs % max(n, 1)


def hash_groups(hashes: np.ndarray, threshold: int) -> np.ndarray:
    """A group id per row: rows linked by chains of near-duplicate hashes share one."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    distinct, row_to_distinct = np.unique(hashes, return_inverse=True)
    i, j = near_duplicate_pairs(distinct, threshold)
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(len(distinct),) * 2)
    _, component = connected_components(graph, directed=False)
    return component[row_to_distinct.ravel()]
