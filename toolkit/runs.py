"""Run and output directories: atomic writes, refusal to clobber, environment snapshots."""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from toolkit.errors import CellfuseError

OUTPUTS = Path("outputs")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temporary file beside `path`, then rename: readers never see half a file.
    The file is recorded as cellfuse's own, so a later --force may replace it (and nothing else)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_replacing(path, data)
    record_own(path)
    return path


def _write_replacing(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files others may read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    import io

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def atomic_save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def _jsonable(obj):
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ---------------------------------------------------------------- what cellfuse wrote
# Every folder cellfuse writes into holds MANIFEST: the names it wrote there. --force replaces only
# those; a folder with anything else in it, or an input inside it, is refused whatever the flags.

MANIFEST = ".cellfuse.json"


def _manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def record_own(path: str | Path) -> Path:
    """Remember that cellfuse wrote `path` (a file, or a folder its libraries fill, e.g. TensorBoard's)."""
    path = Path(path)
    manifest = _manifest(path.parent)
    names = set(manifest.get("own", []))
    if path.name not in names:
        manifest["own"] = sorted(names | {path.name})
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_replacing(path.parent / MANIFEST, json.dumps(manifest, indent=1).encode())
    return path


def is_own(path: str | Path) -> bool:
    """Did cellfuse write this file or folder? Folders made by fresh_dir carry their own manifest."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST).is_file():
        return True
    return path.name in _manifest(path.parent).get("own", [])


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def refuse_inputs_inside(out: Path, inputs) -> None:
    """An input under an output folder would be deleted or overwritten with it: refused, whatever the flags."""
    for item in inputs:
        if item is not None and _inside(Path(item), out):
            raise CellfuseError(f"{item}: is an input, and it lies inside the output {out}; "
                                "choose an --out that holds none of the inputs")


def fresh_dir(path: str | Path, force: bool = False, inputs=()) -> Path:
    """An empty output folder. With `force`, an existing one is replaced only when everything in it
    is cellfuse's own (recorded in its manifest); user files and inputs inside it are refused."""
    path = Path(path)
    refuse_inputs_inside(path, inputs)
    if path.exists() and not path.is_dir():
        raise CellfuseError(f"{path}: exists and is not a directory")
    if path.exists() and any(path.iterdir()):
        if not force:
            raise CellfuseError(f"{path}: already exists and is not empty; pass --force to replace it")
        remove_own(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_replacing(path / MANIFEST, json.dumps({"own": []}).encode())
    return path


def remove_own(path: str | Path, leftovers=()) -> None:
    """Delete a folder cellfuse wrote, after checking that everything in it is cellfuse's own (or one
    of `leftovers`: names an older cellfuse wrote before folders had a manifest). The one place
    cellfuse deletes a folder."""
    path = Path(path)
    if not path.exists():
        return
    if (path / MANIFEST).is_file() or {p.name for p in path.iterdir()} - set(leftovers):
        check_only_own(path, keep=leftovers)  # refuses a folder without a manifest, naming it
    shutil.rmtree(path)


def clear_own(folder: str | Path, keep=()) -> None:
    """Delete the files cellfuse recorded in `folder` (not `keep`): a rebuild leaves no stale results."""
    folder = Path(folder)
    for name in _manifest(folder).get("own", []):
        path = folder / name
        if name not in keep and path.is_file():
            path.unlink()


def remove_scratch(path: str | Path) -> None:
    """Delete a temporary folder cellfuse made for itself (e.g. a non-chief worker's run copy)."""
    shutil.rmtree(path, ignore_errors=True)


def check_only_own(folder: Path, keep=()) -> None:
    """Refuse to replace a folder holding anything cellfuse did not write there (except `keep`)."""
    if not (folder / MANIFEST).is_file():
        raise CellfuseError(f"{folder}: was not written by cellfuse (no {MANIFEST} in it), so --force "
                            "will not delete it; choose another --out or remove it yourself")
    own = set(_manifest(folder).get("own", [])) | {MANIFEST, *keep}
    for sub in folder.iterdir():  # a folder with its own manifest is checked the same way, all the way down
        if sub.is_dir() and (sub / MANIFEST).is_file():
            check_only_own(sub)
    foreign = sorted(p.name for p in folder.iterdir()
                     if p.name not in own and not (p.is_dir() and (p / MANIFEST).is_file())
                     and not (p.name.startswith(".") and p.name.endswith(".tmp")))
    if foreign:
        raise CellfuseError(f"{folder}: holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, "
                            "which cellfuse did not write; --force replaces only cellfuse's own files. "
                            "Move them, or choose another --out")


def check_new_file(out: Path, suffix: str | None, force: bool, inputs=()) -> Path:
    """An output file path: the right suffix, not a folder, not an input, and no existing file replaced
    unless --force is given and cellfuse wrote it."""
    out = Path(out)
    if suffix and out.suffix != suffix:
        raise CellfuseError(f"{out}: expected a {suffix} file name")
    if out.is_dir():
        raise CellfuseError(f"{out}: is a directory")
    for item in inputs:
        if item is not None and Path(item).exists() and out.exists() and Path(item).resolve() == out.resolve():
            raise CellfuseError(f"{out}: is also an input; write the output elsewhere")
    if out.exists():
        if not force:
            raise CellfuseError(f"{out}: already exists; pass --force to replace it")
        if not is_own(out):
            raise CellfuseError(f"{out}: was not written by cellfuse, so --force will not replace it; "
                                "choose another name or remove it yourself")
    return out


def save_model_atomic(model, path: str | Path) -> Path:
    """model.save through a temporary name, then rename: the one way cellfuse writes .keras files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)
    record_own(path)
    return path


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def env_info() -> dict:
    """Versions, devices and the command line: enough to reproduce a run."""
    import keras
    import numpy as np
    import tensorflow as tf

    from toolkit import __version__

    return {
        "cellfuse": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "devices": [d.name for d in tf.config.list_logical_devices()],
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "git_commit": git_commit(),
        "argv": sys.argv,
        "cwd": os.getcwd(),
    }


def shared_dir() -> Path:
    """Where the real data and weights live: $CELLFUSE_SHARED, else `shared/` beside the checkout."""
    env = os.environ.get("CELLFUSE_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


MODEL_FILES = ("best.keras", "student.keras", "ensemble.keras", "model.keras")


def load_model(path, *, compile: bool = True):
    """The one way cellfuse loads a model: a `.keras` file or a run/ensemble/student directory holding
    one, in safe mode (no arbitrary code), with cellfuse's layers registered; one line on failure."""
    import keras

    import toolkit.layers  # noqa: F401  (registers the custom layers before loading)

    file = resolve_model_file(path)
    try:
        return keras.saving.load_model(file, safe_mode=True, compile=compile)
    except Exception as e:  # Keras raises many types for a bad file; the user needs one line
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CellfuseError(f"{file}: cannot load this model ({type(e).__name__}: {first_line})") from None


def resolve_model_file(path: str | Path) -> Path:
    """A `.keras` file, or the run/ensemble directory holding one (first of MODEL_FILES found)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".keras":
        return path
    if path.is_dir():
        for name in MODEL_FILES:
            if (path / name).is_file():
                return path / name
        raise CellfuseError(f"{path}: no model in this directory (looked for {', '.join(MODEL_FILES)})")
    raise CellfuseError(f"{path}: not a .keras model file or a run directory")
