"""Run and output directories: atomic writes, refusal to clobber, environment snapshots."""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from toolkit import __version__
from toolkit.compat import default_layer_name, flatten_layers, onednn_enabled
from toolkit.errors import CellfuseError

OUTPUTS = Path("outputs")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temporary file beside `path`, then rename: readers never see half a file.
    The file is then recorded as cellfuse's own, so a later --force may replace it (and nothing else)."""
    path = _claim_file(path)
    _write_replacing(path, data)
    # stamped in a folder of yours, but for a file written for you to edit: its own command judges edits
    stamp = folder_kind(path.parent) is None and _writer_about_to_write(path) not in USERS_TO_EDIT
    return record_own(path, stamp=stamp)


def _claim_file(path: str | Path) -> Path:
    """Check a file about to be written; the last guard: a file cellfuse did not write, or another
    command wrote, is never replaced. The writer records it once written, so a write that fails claims
    nothing."""
    path = Path(path)
    _ensure_dir(path.parent)
    if (path.exists() or path.is_symlink()) and not is_own(path):
        raise CellfuseError(f"{path}: exists and was not written by cellfuse; refusing to replace it "
                            "(move it, or choose another --out)")
    if path.exists():  # the common case (a run's own file, no writer named) reads no manifest further
        writer = _writer_about_to_write(path)
        if writer or _writers(_manifest(path.parent)).get(path.name):
            refuse_another_writer(path, writer or _folder_writer(path.parent))
    return path


def _write_replacing(path: Path, data: bytes) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.", suffix=".tmp")
    except OSError as error:  # the place became read-only, or the disk is full: the file, not a traceback
        raise CellfuseError(f"{path}: cannot write it ({error.strerror or error})") from None
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
    return atomic_write_text(path, json.dumps(obj, indent=2, default=jsonable) + "\n")


def read_history(run: str | Path) -> list[dict]:
    """A run's history.csv, one dict of floats per epoch: [] before the first epoch or when unreadable
    (a run being written, a file damaged by hand), so readers never fail on it."""
    try:
        with (Path(run) / "history.csv").open() as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return [{k: n for k, v in row.items() if k and (n := _number(v)) is not None} for row in rows]


def _number(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


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


def jsonable(obj):
    """json.dumps' `default=` for what cellfuse's figures hold: numpy numbers and arrays, paths."""
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
# The ownership rule, in this one place: cellfuse replaces or deletes a path only if it recorded that
# exact path when it wrote it.
# - A folder cellfuse made holds MANIFEST, written as it made the folder, with the folder's kind
#   ("run", "clean", ...) and the name of every file and subfolder cellfuse wrote in it.
# - A file cellfuse writes into a folder it did not make (`--out FILE` in a user's folder) is named in
#   a MANIFEST there that has no kind: it claims that file, never the folder.
# - A folder is deleted only when everything in it, all the way down, is recorded; its kind must be
#   the one the command replaces (`train --force` never replaces a `clean` output).
# - A file is replaced only by the command that wrote it (`predict --force` never replaces a run's
#   history.csv): MANIFEST's "writers" names the command of each file a single-file command wrote
#   (check_new_file) or that was written into a user's folder; any other file is its folder's, written
#   by the command that made the folder (KIND_WRITERS), also when recorded before writers were.
# Commands check their inputs first and claim outputs last (fresh_dir, make_run_dir, check_new_file),
# holding a lock on each output (lock_output) so that two commands never write one place.

MANIFEST = ".cellfuse.json"
TMP_PREFIX = ".cellfuse-tmp."  # temporary files of atomic writes: a crash may leave one behind
KIND_WRITERS = {"run": "train", "runs": "train", "student": "distill", "clean": "clean", "ensemble": "ensemble",
                "sweep": "sweep", "inspect": "inspect", "demo": "demo", "bench": "bench"}
PYTHON_WRITER = "(python)"  # a library call outside the CLI that names no writer
_CLAIMS: dict[str, str] = {}  # output file (resolved) -> the command that checked it, to record on write


def _manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return manifest if isinstance(manifest, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_manifest(folder: Path, manifest: dict) -> None:
    _write_replacing(folder / MANIFEST, json.dumps(manifest, indent=1).encode())


def folder_kind(folder: str | Path) -> str | None:
    """The kind of output a folder holds when cellfuse made it ("run", "clean", ...), else None."""
    folder = Path(folder)
    return None if folder.is_symlink() else _manifest(folder).get("kind")


def make_own_dir(path: str | Path, kind: str) -> Path:
    """Make a new folder as cellfuse's: its manifest names its kind, and a parent cellfuse made
    records it. A folder that exists already must be cellfuse's, of this kind."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if folder_kind(path) != kind:
            raise CellfuseError(f"{path}: exists and is not {_a(kind)} folder made by cellfuse; "
                                "choose another --out")
        return path
    refuse_file_on_the_way(path)
    _ensure_dir(path.parent)
    path.mkdir()
    _write_manifest(path, {"kind": kind, "own": []})
    if folder_kind(path.parent):
        record_own(path)
    return path


def _ensure_dir(folder: Path) -> None:
    """Make missing folders; one made inside a cellfuse folder is cellfuse's too."""
    if folder.is_dir():
        return
    refuse_file_on_the_way(folder)
    if folder.exists():
        raise CellfuseError(f"{folder}: is not a directory")
    if folder_kind(folder.parent) or not folder.parent.is_dir():
        _ensure_dir(folder.parent)
    if folder_kind(folder.parent):
        make_own_dir(folder, "part")
    else:
        folder.mkdir(parents=True, exist_ok=True)


def refuse_unwritable(path: str | Path) -> None:
    """The folder an output goes into (or its nearest existing parent) takes a new file: a read-only
    place is one line before any work, not an OS traceback at the first write."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=TMP_PREFIX):
            pass
    except OSError as error:
        raise CellfuseError(f"{path}: cannot write into {folder} ({error.strerror or error})") from None


def refuse_file_on_the_way(path: str | Path) -> None:
    """Nothing can be made below a file (`--out data.npz/sub`): one line, not mkdir's OS error."""
    path = Path(path)
    for above in path.parents:  # the nearest that exists must be a folder
        if above.is_symlink() and not above.exists():
            raise CellfuseError(f"{above}: is a broken symbolic link, so {path} cannot be made")
        if above.exists():
            if not above.is_dir():
                raise CellfuseError(f"{above}: is not a directory, so {path} cannot be made")
            return


def record_own(path: str | Path, stamp: bool = False) -> Path:
    """Record that cellfuse wrote `path` (or is about to: a file a library writes for it), and which
    command, when check_new_file claimed it for one. `stamp`: the file is written and lies in a folder
    of yours, so its size and time are kept too; changed since, it is yours (is_own)."""
    import fcntl

    path = Path(path)
    manifest = _manifest(path.parent)
    writer = None if path.is_dir() else _writer_about_to_write(path)
    if (path.name in manifest.get("own", []) and (writer is None or _writers(manifest).get(path.name) == writer)
            and not stamp):
        return path
    fd = os.open(path.parent, os.O_RDONLY)  # several processes (parallel trials) record into one folder
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        manifest = _manifest(path.parent)
        writers = _writers(manifest)
        if writer:
            writers[path.name] = writer
        elif path.name not in manifest.get("own", []):
            writers.pop(path.name, None)  # a stale name from a deleted file: this one is the folder's
        manifest["own"] = sorted(set(manifest.get("own", [])) | {path.name})
        if stamp:
            manifest["stamps"] = {**manifest.get("stamps", {}), path.name: _stamp(path)}
        _write_manifest(path.parent, _with_writers(manifest, writers))
    finally:
        os.close(fd)
    return path


def adopt_library_files(folder: str | Path) -> None:
    """Record the files a library (TensorBoard, Keras' backups) wrote into a folder cellfuse made for
    it, as they are now: a file put there later is not cellfuse's."""
    folder = Path(folder)
    if folder_kind(folder) is None:
        return
    for sub in sorted(folder.iterdir()):
        if sub.name == MANIFEST or sub.name.startswith(TMP_PREFIX) or sub.is_symlink():
            continue
        if sub.is_dir():
            if folder_kind(sub) is None and sub.name not in _manifest(folder).get("own", []):
                _write_manifest(sub, {"kind": "part", "own": []})
            adopt_library_files(sub)
        record_own(sub)


def _writers(manifest: dict) -> dict:
    writers = manifest.get("writers")
    return dict(writers) if isinstance(writers, dict) else {}


def _with_writers(manifest: dict, writers: dict) -> dict:
    """The manifest naming WRITERS; without the key when there are none (as before writers were)."""
    rest = {k: v for k, v in manifest.items() if k != "writers"}
    return {**rest, "writers": writers} if writers else rest


def _key(path: str | Path) -> str:
    return str(Path(path).resolve())


def _writer_about_to_write(path: Path) -> str | None:
    """Who a file about to be written is recorded as: the command check_new_file checked it for; else,
    in a folder cellfuse did not make, the command running; else None (the folder's command)."""
    claimed = _CLAIMS.get(_key(path))
    return claimed or (None if folder_kind(path.parent) else current_writer())


def writer_of(path: str | Path) -> str | None:
    """The command that wrote a file cellfuse recorded: named in the manifest beside it, else the
    command that made its folder (also for files recorded before writers were); None when unknown."""
    path = Path(path)
    return _writers(_manifest(path.parent)).get(path.name) or _folder_writer(path.parent)


def _output_kind(folder: Path) -> str | None:
    """The kind of output `folder` belongs to (a "part" folder is its parent's)."""
    kind = folder_kind(folder)
    while kind == "part":
        folder = folder.parent
        kind = folder_kind(folder)
    return kind


def _folder_writer(folder: Path) -> str | None:
    """The command that made `folder`, from its kind."""
    kind = _output_kind(folder)
    return KIND_WRITERS.get(kind, kind)


def current_writer() -> str:
    """The CLI command running ("predict", "recipes copy"), or PYTHON_WRITER outside the CLI."""
    import click

    ctx, names = click.get_current_context(silent=True), []
    while ctx is not None and ctx.parent is not None:  # the root's name is the program's, not a command
        names.insert(0, ctx.info_name)
        ctx = ctx.parent
    return " ".join(names) or PYTHON_WRITER


def refuse_another_writer(path: Path, writer: str) -> None:
    """--force on a file output replaces only a file the same command wrote: one line otherwise."""
    found = writer_of(path)
    if found == writer:
        return
    named = _writers(_manifest(path.parent)).get(path.name)
    kind = _output_kind(path.parent)
    if named:
        what, other = f"was written by {_shown(named)}", " (or remove it yourself)"
    elif kind:  # part of a cellfuse output: its own command replaces it, never by hand
        what, other = f"belongs to {_a(kind)} output{f' of {_shown(found)}' if kind in KIND_WRITERS else ''}", ""
    else:
        what = "was recorded by an older cellfuse without the command that wrote it"
        other = " (or remove it yourself)"
    raise CellfuseError(f"{path}: {what}, so {_shown(writer)} will not replace it, even with --force; "
                        f"choose another --out{other}")


def _shown(writer: str) -> str:
    return "a Python call" if writer == PYTHON_WRITER else f"`cellfuse {writer}`"


def is_own(path: str | Path) -> bool:
    """Did cellfuse record this file or folder where it wrote it, and is a file it stamped unchanged?"""
    path = Path(path)
    recorded = path.name in _manifest(path.parent).get("own", [])
    if path.is_dir() and not path.is_symlink():
        return recorded and folder_kind(path) is not None
    return recorded and not changed_since_written(path)


def remove_own_file(path: str | Path, writer: str | None = None) -> bool:
    """Delete one file cellfuse wrote (and, with `writer`, that command wrote), unchanged since; anything
    else stays. Whether it was deleted. The one place cellfuse deletes a single file."""
    path = Path(path)
    if not path.is_file() or path.is_symlink() or not is_own(path) or (writer and writer_of(path) != writer):
        return False
    path.unlink()
    return True


def _stamp(path: Path) -> list[int]:
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


def changed_since_written(path: Path) -> bool:
    """A file cellfuse wrote into your folder whose size or time has changed since: you replaced it."""
    stamp = _manifest(path.parent).get("stamps", {}).get(path.name)
    return bool(stamp) and path.is_file() and not path.is_symlink() and _stamp(path) != stamp


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def refuse_inputs_inside(out: Path, inputs) -> None:
    """An input under an output folder would be deleted or overwritten with it: refused, whatever the flags.
    (A name that is not a path, such as a shipped recipe's, is nobody's file.)"""
    for item in inputs:
        if item is not None and (Path(item).exists() or Path(item).is_symlink()) and _inside(Path(item), out):
            raise CellfuseError(f"{item}: is an input, and it lies inside the output {out}; "
                                "choose an --out that holds none of the inputs")


def fresh_dir(path: str | Path, force: bool = False, inputs=(), kind: str = "output") -> Path:
    """An empty output folder of `kind`, locked for this command. With `force`, an existing one is
    emptied only when cellfuse made it as the same kind and everything in it is cellfuse's own."""
    path = Path(path)
    if not check_output_folder(path, force, inputs, kind):
        return make_own_dir(path, kind)
    if any(path.iterdir()):
        _delete_contents(path)
    # an empty folder of the user's is kept: cellfuse fills it and owns what it writes, not the folder
    kept = _manifest(path).get("kept", folder_kind(path) is None)
    _write_manifest(path, {"kind": kind, "own": [], "kept": kept})
    return path


def check_output_folder(path: Path, force: bool, inputs=(), kind: str = "output") -> bool:
    """Lock an output folder and refuse, in one line, what fresh_dir must not do with it; writes
    nothing (commands call it before TensorFlow loads). Whether the folder exists."""
    lock_output(path)
    refuse_inputs_inside(path, inputs)
    refuse_file_on_the_way(path)
    if path.is_symlink():
        raise CellfuseError(f"{path}: is a symbolic link; cellfuse writes only into a real folder, "
                            "so give the folder it points to, or another --out")
    if path.exists() and not path.is_dir():
        raise CellfuseError(f"{path}: exists and is not a directory")
    refuse_unwritable(path)
    if path.is_dir() and any(path.iterdir()):
        check_replaceable(path, kind)
        if not force:
            raise CellfuseError(f"{path}: already exists and is not empty; pass --force to replace it")
    return path.exists()


def check_replaceable(folder: Path, kind: str) -> None:
    """Refuse, in one line, to replace a folder that is not wholly cellfuse's, or of another kind."""
    found = folder_kind(folder)
    if found is None:
        written = _manifest(folder).get("own", [])  # single files cellfuse wrote into a folder of yours
        what = (f"is a folder of yours holding files cellfuse wrote ({', '.join(written[:3])}"
                f"{' ...' if len(written) > 3 else ''}), not an output folder it made"
                if written else "exists and was not made by cellfuse")
        raise CellfuseError(f"{folder}: {what}, so it will not be replaced; choose another --out (or name) "
                            "or remove it yourself")
    if found != kind:
        raise CellfuseError(f"{folder}: holds a cellfuse {found} output, not {_a(kind)}; "
                            "choose another --out (or name)")
    check_only_own(folder)


def _a(kind: str) -> str:
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def remove_own(path: str | Path, kind: str | None = None) -> None:
    """Delete a folder cellfuse made, after checking that everything in it is recorded as its own
    (a folder that existed before cellfuse wrote into it is emptied, not deleted). The one place
    cellfuse deletes a folder."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    check_replaceable(path, kind or folder_kind(path) or "folder")
    kept = _manifest(path).get("kept", False)
    _delete_contents(path)
    if not kept:
        (path / MANIFEST).unlink()
        path.rmdir()


def _delete_contents(folder: Path) -> None:
    """Everything in a folder check_replaceable passed, except its manifest, which is reset."""
    manifest = _manifest(folder)
    for sub in folder.iterdir():
        if sub.name == MANIFEST:
            continue
        if sub.is_dir() and not sub.is_symlink():
            shutil.rmtree(sub)
        else:
            sub.unlink()
    _write_manifest(folder, _with_writers({**manifest, "own": []}, {}))


def clear_own(folder: str | Path, keep=()) -> None:
    """Delete the files cellfuse recorded in `folder` (not `keep`): a rebuild leaves no stale results."""
    folder = Path(folder)
    manifest = _manifest(folder)
    for name in manifest.get("own", []):
        path = folder / name
        if name not in keep and path.is_file() and not path.is_symlink():
            path.unlink()
    manifest["own"] = [n for n in manifest.get("own", []) if (folder / n).exists()]
    writers = {n: w for n, w in _writers(manifest).items() if n in manifest["own"]}
    _write_manifest(folder, _with_writers(manifest, writers))


def remove_scratch(path: str | Path) -> None:
    """Delete a folder cellfuse made for its own temporary use (a worker's copy, a dropped backup)."""
    path = Path(path)
    if path.exists() and folder_kind(path) is None:
        raise CellfuseError(f"{path}: was not made by cellfuse; not deleting it")
    shutil.rmtree(path, ignore_errors=True)


# Commands whose file is the user's to edit once written (a recipe copy): never deleted with a folder.
USERS_TO_EDIT = {"recipes copy"}


def check_only_own(folder: Path, keep=()) -> None:
    """Refuse to replace a folder holding anything cellfuse did not record there (except `keep`)."""
    if folder_kind(folder) is None:
        raise CellfuseError(f"{folder}: was not made by cellfuse (no {MANIFEST} naming its kind), so "
                            "--force will not delete it; choose another --out or remove it yourself")
    manifest = _manifest(folder)
    edited = {name for name, writer in _writers(manifest).items() if writer in USERS_TO_EDIT}
    own = (set(manifest.get("own", [])) - edited) | {MANIFEST, *keep}
    foreign = []
    for sub in sorted(folder.iterdir()):
        if sub.name.startswith(TMP_PREFIX) and sub.is_file() and not sub.is_symlink():
            continue
        if sub.name not in own or (sub.is_dir() and not sub.is_symlink() and folder_kind(sub) is None):
            foreign.append(sub.name)
        elif sub.is_dir() and not sub.is_symlink():
            check_only_own(sub)  # all the way down
    if foreign:
        whose = "cellfuse did not write" + (", or wrote for you to edit" if edited & set(foreign) else "")
        raise CellfuseError(f"{folder}: holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, "
                            f"which {whose}; --force replaces only cellfuse's own files. "
                            "Move them, or choose another --out")
    _refuse_other_commands_outputs(folder, manifest)


def _refuse_other_commands_outputs(folder: Path, manifest: dict) -> None:
    """A run or student folder is replaced with what its command wrote, never with what you made from it
    inside it (a submission exported there, an ensemble built there): those are named and kept."""
    kind = folder_kind(folder)
    if kind not in ("run", "student"):
        return
    made = sorted({f"{name} (`cellfuse {writer}`)" for name, writer in _writers(manifest).items()
                   if writer != KIND_WRITERS[kind] and (folder / name).exists()}
                  | {f"{sub.name}/ ({_a(folder_kind(sub))})" for sub in folder.iterdir()
                     if sub.is_dir() and not sub.is_symlink() and folder_kind(sub) not in (None, "part")})
    if made:
        raise CellfuseError(f"{folder}: holds {', '.join(made[:5])}{' ...' if len(made) > 5 else ''}, made from "
                            f"this {kind} by another command; --force replaces the {kind}, not those. Move "
                            "them out first, or choose another --out")


def check_run_folder(run: Path, kind: str, *, resume: bool, force: bool, inputs=()) -> bool:
    """Whether OUT/<name> exists to be continued (--resume) or replaced (--force); refused in one line
    when it is not a cellfuse folder of `kind`, when it exists without either flag, or when replacing
    it would delete an input. Writes nothing (train checks again under its lock)."""
    if not (run.exists() or run.is_symlink()):
        return False
    found = folder_kind(run)
    if found != kind:
        what = f"a cellfuse {found} output" if found else "a folder cellfuse did not make"
        raise CellfuseError(f"{run}: is {what}, not a {kind}; choose another name (--set name=...) or --out")
    if resume:
        return True
    if not force:
        raise CellfuseError(f"{run}: already exists; --resume to continue it, --force to start over")
    refuse_inputs_inside(run, inputs)
    check_only_own(run)
    return True


# ---------------------------------------------------------------- run folders (train, distill, sweep trials)

def prepare_run_dir(recipe, root: Path, resume: bool, force: bool, *, inputs=(), kind="run",
                    extra_env=None) -> tuple[Path, bool]:
    """The run directory, locked for this process: a new one (made True), or the existing run of the
    same recipe on --resume, or a replaced one on --force. Anything that is not a cellfuse run of this
    kind, or that holds an input, is refused in one line before anything is written."""
    run = root / recipe.name
    lock_output(run)
    exists = check_run_folder(run, kind, resume=resume, force=force, inputs=inputs)
    if exists and resume:
        check_same_recipe(run, recipe)
    elif exists:
        remove_own(run, kind)
    made = not (exists and resume)
    if made:
        if not root.exists():
            make_own_dir(root, "runs")
        make_own_dir(run, kind)
        atomic_write_text(run / "recipe.toml", recipe.to_toml())
    write_json(run / "env.json", {**env_info(), **(extra_env or {})})
    return run, made



def check_same_recipe(run: Path, recipe) -> None:
    """--resume continues the recipe a run started with, or nothing (compared as parsed TOML, so a
    snapshot written by an older cellfuse compares by value, not by layout)."""
    snapshot = run / "recipe.toml"
    if not snapshot.exists():
        return
    try:
        started = tomllib.loads(snapshot.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise CellfuseError(f"{snapshot}: unreadable ({e}), so this run's recipe cannot be compared; "
                            "restore the file, or --force to start over") from None
    changed = changed_keys(started, tomllib.loads(recipe.to_toml()))
    if changed:
        raise CellfuseError(f"{run}: the recipe changed since this run started ({'; '.join(changed[:6])}); "
                            f"resume needs the same recipe: `cellfuse train {snapshot} --out {run.parent} "
                            "--resume` continues it as it was, --force starts over")


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two parsed recipes, as "key: old -> new"."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b and not same_files(a, b):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def same_files(a, b) -> bool:
    """Two recipe values naming the same existing files, however spelled (relative or absolute)."""
    if isinstance(a, str) and isinstance(b, str):
        return Path(a).exists() and Path(a).resolve() == Path(b).resolve()
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(x == y or same_files(x, y) for x, y in zip(a, b, strict=True))
    return False


def never_trained(run: Path) -> bool:
    """No finished epoch (history.csv) and no backup inside one: nothing a resume could use."""
    backups = run / "checkpoint"
    return not (run / "history.csv").exists() and not (
        backups.is_dir() and any(f.is_file() and f.name != MANIFEST for f in backups.rglob("*")))


def read_finished_json(path: Path) -> dict | None:
    """A JSON file cellfuse writes last in a folder (atomically), or None when it is missing or damaged:
    whatever wrote it did not finish."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_summary(run: Path) -> dict | None:
    """A finished run's summary, or None. summary.json is written last: it marks completion."""
    return read_finished_json(run / "summary.json")



# ---------------------------------------------------------------- model

def check_new_file(out: Path, suffix: str | None, force: bool, inputs=(), writer: str | None = None) -> Path:
    """An output file path, locked for this command: the right suffix, not a folder, not an input, and
    no existing file replaced unless --force is given and `writer` (the command writing it; by default
    the CLI command running) wrote it. The file is recorded as the writer's when it is written."""
    out = Path(out)
    writer = writer or current_writer()
    if suffix and out.suffix != suffix:
        raise CellfuseError(f"{out}: expected a {suffix} file name")
    lock_output(out)
    if out.is_symlink():
        raise CellfuseError(f"{out}: is a symbolic link; write the output to a plain file name")
    if out.is_dir():
        raise CellfuseError(f"{out}: is a directory")
    refuse_file_on_the_way(out)
    refuse_unwritable(out)
    for item in inputs:
        if item is not None and Path(item).exists() and out.exists() and Path(item).resolve() == out.resolve():
            raise CellfuseError(f"{out}: is also an input; write the output elsewhere")
    if out.exists():
        if not force:
            raise CellfuseError(f"{out}: already exists; pass --force to replace it")
        if changed_since_written(out):
            raise CellfuseError(f"{out}: has changed since cellfuse wrote it, so it is yours now and --force "
                                "will not replace it; choose another name or remove it yourself")
        if not is_own(out):
            raise CellfuseError(f"{out}: was not written by cellfuse, so --force will not replace it; "
                                "choose another name or remove it yourself")
        refuse_another_writer(out, writer)
    _CLAIMS[_key(out)] = writer
    return out


# ---------------------------------------------------------------- one writer per output

_LOCKS: dict[str, int] = {}  # resolved output path -> locked file descriptor, held by this process


def lock_output(path: str | Path) -> None:
    """Hold an exclusive lock on an output path until release_locks() or the end of the process: a
    second cellfuse command writing the same place refuses, naming the holder. The kernel drops the
    lock of a dead process, so a stale lock is taken over. Lock files live in the temporary folder,
    never among the user's files."""
    import fcntl

    key = _key(path)
    if key in _LOCKS:
        return
    _lock_file(key).parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(_lock_file(key), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "a process that is starting"
        os.close(fd)
        raise CellfuseError(f"{path}: in use by another cellfuse command ({holder}); wait for it to "
                            "finish, or choose another --out or name") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"PID {os.getpid()}: {' '.join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))}"
              .encode()[:300], 0)
    _LOCKS[key] = fd


def _lock_file(key: str) -> Path:
    import hashlib

    folder = Path(tempfile.gettempdir()) / f"cellfuse-locks-{os.getuid()}"
    return folder / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.lock"


def is_being_written(path: str | Path) -> bool:
    """Does a cellfuse command on this machine hold `path`'s output lock now? It holds it exactly while it
    runs, so a command that failed or was killed, however recently, holds none."""
    import fcntl

    key = _key(path)
    if key in _LOCKS:
        return True
    try:
        fd = os.open(_lock_file(key), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock taken to test


def release_locks() -> None:
    """Let go of every output this process locked (the command is over)."""
    _CLAIMS.clear()
    while _LOCKS:
        os.close(_LOCKS.popitem()[1])


def save_model_atomic(model, path: str | Path) -> Path:
    """model.save through a temporary name, then rename: the one way cellfuse writes .keras files."""
    path = _claim_file(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.stem}.keras")
    model.save(tmp)
    os.replace(tmp, path)
    return record_own(path)


def save_weights(model, path: str | Path) -> Path:
    """A checkpoint of `model`'s weights keyed by each variable's path (layer/variable), written
    atomically: a model whose layers come in another order loads by name, never by position."""
    import io

    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        for key, array in weights_by_path(model).items():
            f.create_dataset(key, data=array)
    return atomic_write_bytes(path, buf.getvalue())


def load_weights(model, path: str | Path) -> None:
    """Load a save_weights checkpoint; refused in one line unless every variable is matched by path
    and shape, both ways."""
    import h5py

    path = Path(path)
    arrays = {}
    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                         if isinstance(item, h5py.Dataset) else None)
    except OSError as e:
        raise CellfuseError(f"{path}: not a readable checkpoint ({e})") from None
    assign_by_path(model, arrays, path)


def weights_by_path(model) -> dict:
    """{variable path: array} of a model's weights: what save_weights stores."""
    return {key: np.asarray(v) for key, v in _by_path(model).items()}


def _by_path(model) -> dict:
    return dict(zip(stable_paths(model), model.weights, strict=True))


def stable_paths(model) -> list[str]:
    """The paths of `model.weights`, the same each time the model is built. Keras numbers what is
    created without a name process-wide: a layer ("layer_normalization_1", after ConvNeXt's pooling)
    and a variable ("variable_36", ConvNeXt's LayerScale), so a model rebuilt in the same process
    (best.keras, snapshots, WiSE) would not match its own checkpoint. Those are numbered here by their
    order in the model instead."""
    renamed, seen = {}, Counter()
    for layer in [model, *flatten_layers(model)]:
        kind = default_layer_name(layer)
        if re.fullmatch(rf"{re.escape(kind)}(_\d+)?", layer.name) and layer.name not in renamed:
            renamed[layer.name] = f"{kind}_{seen[kind]}" if seen[kind] else kind
            seen[kind] += 1
    paths, unnamed = [], Counter()
    for v in model.weights:
        *scope, name = [renamed.get(part, part) for part in v.path.split("/")]
        if re.fullmatch(r"variable(_\d+)?", name):
            where = "/".join(scope)
            name = f"variable_{unnamed[where]}" if unnamed[where] else "variable"
            unnamed[where] += 1
        paths.append("/".join([*scope, name]))
    return paths


def assign_by_path(model, arrays: dict, where) -> None:
    """Set every weight of `model` from `arrays` keyed by variable path; refused in one line (naming
    `where`) unless every variable is matched by path and shape, both ways."""
    wanted = _by_path(model)
    if set(arrays) != set(wanted) and set(arrays) == {v.path for v in model.weights}:
        wanted = {v.path: v for v in model.weights}  # a checkpoint written before paths were made stable
    missing, extra = sorted(set(wanted) - set(arrays)), sorted(set(arrays) - set(wanted))
    if missing or extra:
        raise CellfuseError(f"{where}: does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); "
                            "it was saved from another architecture")
    for key, v in wanted.items():
        if tuple(arrays[key].shape) != tuple(v.shape):
            raise CellfuseError(f"{where}: {key} has shape {arrays[key].shape}, the model wants {tuple(v.shape)}")
    for key, v in wanted.items():
        v.assign(arrays[key])


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

    return {
        "cellfuse": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "devices": [d.name for d in tf.config.list_logical_devices()],
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "onednn": onednn_enabled(),  # TensorFlow's CPU kernels: timings differ ~1.8x without them
        "git_commit": git_commit(),
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "host": platform.node(),  # `cellfuse runs` elsewhere cannot see this machine's output locks
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


def check_compatible(keras_model, dataset, model_path) -> None:
    """Refuse, in one line naming both files, a model whose input shape or class count differs from the data's."""
    want = tuple(keras_model.input_shape[1:])
    if want != tuple(dataset.images.shape[1:]):
        raise CellfuseError(f"{model_path}: takes images of shape {want}, but {dataset.path} holds "
                            f"{tuple(dataset.images.shape[1:])}")
    classes = keras_model.output_shape[-1]
    if classes != dataset.n_classes:
        raise CellfuseError(f"{model_path}: predicts {classes} classes, but {dataset.path} has "
                            f"{dataset.n_classes}")


def resolve_model_file(path: str | Path) -> Path:
    """A `.keras` file, or the run/ensemble directory holding one (first of MODEL_FILES found), checked to
    be a zip archive as every .keras file is: a damaged one is named here, not by Keras' "file not found"."""
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in MODEL_FILES if (path / name).is_file()), None)
        if found is None:
            raise CellfuseError(f"{path}: no model in this directory (looked for {', '.join(MODEL_FILES)})")
        path = found
    elif not path.exists():
        raise CellfuseError(f"{path}: does not exist")
    elif not (path.is_file() and path.suffix == ".keras"):
        raise CellfuseError(f"{path}: not a .keras model file or a run directory")
    check_keras_archive(path)
    return path


KERAS_ARCHIVE_FILES = ("config.json", "model.weights.h5")  # what every Keras 3 .keras zip holds


def check_keras_archive(path, shown=None) -> None:
    """Names a damaged .keras file (a path, or the bytes of one inside a submission zip, `shown` as)
    before TensorFlow loads: the zip itself, its two parts, their checksums."""
    problem = None
    try:
        with zipfile.ZipFile(path) as archive:
            missing = [name for name in KERAS_ARCHIVE_FILES if name not in archive.namelist()]
            damaged = None if missing else archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        problem = f"not a zip archive: damaged or truncated ({error})"
    else:
        if missing:
            problem = f"the archive lacks {', '.join(missing)}: not saved by Keras 3, or damaged"
        elif damaged:
            problem = f"{damaged} inside it is damaged (checksum mismatch)"
    if problem:
        raise CellfuseError(f"{shown or path}: not a readable .keras model ({problem})")
