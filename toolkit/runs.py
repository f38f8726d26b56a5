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
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files others may read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


def fresh_dir(path: str | Path, force: bool = False) -> Path:
    """An empty output directory. Existing work is never overwritten without `force`."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not force:
            raise CellfuseError(f"{path}: already exists and is not empty; pass --force to replace it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_new_file(out: Path, suffix: str | None, force: bool) -> Path:
    """An output file path: the right suffix, not a folder, and no existing file replaced without force."""
    out = Path(out)
    if suffix and out.suffix != suffix:
        raise CellfuseError(f"{out}: expected a {suffix} file name")
    if out.is_dir():
        raise CellfuseError(f"{out}: is a directory")
    if out.exists() and not force:
        raise CellfuseError(f"{out}: already exists; pass --force to replace it")
    return out


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
