"""A command's inputs checked before it imports TensorFlow, so bad input is refused in a second.

TensorFlow takes 10-20 s to import. Everything a user can get wrong that can be seen without it is
checked here, by `cellfuse` before it calls the command's function: paths exist, npz headers and
labels are sound, recipes parse and validate (and so do the data files they name), run and
ensemble folders hold their files, and outputs can be written. Each check raises CellfuseError in
one line; none imports TensorFlow or writes a file (tests/test_precheck.py holds both to that).
The commands' own functions check again, for callers that are not the CLI.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

from toolkit.backbones import backbone_spec
from toolkit.data import CLASS_NAMES, check_dataset
from toolkit.errors import CellfuseError
from toolkit.recipe import MATCHING_MEMBER, check_distinct_names, check_student, load_recipe
from toolkit.runs import (
    check_keras_archive,
    check_new_file,
    check_output_folder,
    check_run_folder,
    check_same_recipe,
    resolve_model_file,
)

WEIGHT_WORDS = ("imagenet", "none")


def existing(path, what: str = "") -> Path:
    """`path`, which must exist (`what` says where it was named, e.g. "data.train of x.toml")."""
    if not str(path).strip():  # Path("") is the working folder: `--set data.train=` read every folder here
        raise CellfuseError("an empty path" + (f" ({what})" if what else "") + "; name a file or folder")
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise CellfuseError(f"{path}: does not exist" + (f" ({what})" if what else ""))
    return path


def data_file(path, what: str = "", n_classes: int | None = None) -> Path:
    """An npz (headers and labels checked, no pixel read) or a folder of class sub-folders."""
    path = existing(path, what)
    check_dataset(path, n_classes or len(CLASS_NAMES))
    return path


def data_files(paths) -> list[Path]:
    return [data_file(p) for p in paths]


def model(path, what: str = "") -> Path:
    """A .keras file, or a run, ensemble or student folder holding one; returns the model file."""
    return resolve_model_file(existing(path, what))


def models(paths) -> list[Path]:
    return [model(p) for p in paths]


def model_or_zip(path) -> Path:
    """As `model`, or a submission zip made by `cellfuse export`, whose model.keras is checked too."""
    import io
    import zipfile

    path = existing(path)
    if path.suffix != ".zip":
        return model(path)
    try:
        with zipfile.ZipFile(path) as submission:
            if "model.keras" not in submission.namelist():
                raise CellfuseError(f"{path}: holds no model.keras; make a submission with `cellfuse export`")
            inner = io.BytesIO(submission.read("model.keras"))
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CellfuseError(f"{path}: not a readable zip file ({error})") from None
    check_keras_archive(inner, f"{path} (its model.keras)")
    return path


def recipe(path, overrides=(), *, data: bool = True):
    """The recipe, loaded and validated (its backbone's name too), and (with `data`) the data files it
    names checked."""

    loaded = load_recipe(path, overrides)
    backbone_spec(loaded.model.backbone, loaded.model.width, loaded.model.depth)
    weights(loaded)
    if loaded.train.init_from:
        model(loaded.train.init_from, f"train.init_from of {loaded.path}")
    if data:
        recipe_data(loaded)
    return loaded


def weights(loaded) -> None:
    """model.weights: "imagenet", "none", or a file that exists (a typo of either word is named as one)."""
    value = loaded.model.weights
    if value in WEIGHT_WORDS or Path(value).is_file():
        return
    close = difflib.get_close_matches(value, WEIGHT_WORDS, n=1, cutoff=0.6)
    raise CellfuseError(f"{value!r}: no such file (model.weights of {loaded.path}); "
                        + (f"did you mean {close[0]!r}?" if close else 'expected "imagenet", "none" or a weights file'))


def recipe_data(loaded) -> None:
    where = f"of {loaded.path}"
    data_file(loaded.data.train, f"data.train {where}; run `cellfuse clean` first, or --set data.train=FILE",
              loaded.data.n_classes)
    for extra in loaded.data.extra_val:
        data_file(extra, f"data.extra_val {where}", loaded.data.n_classes)


def run_folder(root, loaded, *, kind: str, resume: bool, force: bool) -> bool:
    """Refuse what `train`/`distill` would refuse about OUT/<name> (runs.prepare_run_dir checks again,
    under its lock). Returns True when the run is complete and --resume will only report it."""
    if "TF_CONFIG" in os.environ:  # other workers of one multi-worker run see the chief's folder appear
        return False
    run = Path(root) / loaded.name
    inputs = [loaded.path, loaded.data.train, *loaded.data.extra_val, loaded.train.init_from or None]
    exists = check_run_folder(run, kind, resume=resume, force=force, inputs=inputs)
    if exists and resume and kind == "run":  # a student's recipe gains the teacher's keys first
        check_same_recipe(run, loaded)
    return exists and resume and (run / "summary.json").is_file()


def runs_to_train(jobs, root, *, kind: str = "run", resume: bool, force: bool) -> list:
    """Each (recipe, overrides) job checked, then its run folder, then its data (not needed by a complete run
    on --resume; checked once for jobs that share it, as one recipe's seeds do)."""
    loaded = [recipe(p, overrides, data=False) for p, overrides in jobs]
    check_distinct_names(loaded)
    checked = set()
    for r in loaded:
        if kind == "student":
            check_student(r)
        if not run_folder(root, r, kind=kind, resume=resume, force=force) and \
                (r.data.train, r.data.extra_val) not in checked:
            recipe_data(r)
            checked.add((r.data.train, r.data.extra_val))
    return loaded


def student_init(students, ensemble_dir) -> None:
    """A member distill.init names is one of the ensemble's (read from its metrics.json, no model loaded)."""
    from toolkit.ensemble import member_file

    for student in students:
        if student.distill.init not in ("", MATCHING_MEMBER):
            member_file(ensemble_dir, student.distill.init)


def ensemble_folder(path) -> Path:
    """A folder `cellfuse ensemble` wrote: ensemble.keras and a readable ensemble.json."""
    path = existing(path)
    if not path.is_dir():
        raise CellfuseError(f"{path}: not an ensemble folder (give the --out of `cellfuse ensemble`)")
    for name in ("ensemble.keras", "ensemble.json"):
        if not (path / name).is_file():
            raise CellfuseError(f"{path}: no {name} here; is it the --out of `cellfuse ensemble`?")
    try:
        json.loads((path / "ensemble.json").read_text())
    except (OSError, ValueError) as e:
        raise CellfuseError(f"{path / 'ensemble.json'}: cannot read the ensemble's description ({e})") from None
    return path


def output_folder(path, force: bool, inputs=(), kind: str = "output") -> Path:
    """What runs.fresh_dir would refuse about an output folder, checked without writing anything."""
    check_output_folder(Path(path), force, inputs, kind)
    return Path(path)


def output_file(path, suffix: str | None, force: bool, inputs=()) -> Path:
    return check_new_file(Path(path), suffix, force, inputs=inputs)
