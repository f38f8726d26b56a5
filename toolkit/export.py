"""Package any cellfuse model as a challenge submission zip, and grade a zip the way the challenge does.

A submission is `model.py` plus `model.keras`, side by side at the zip's root. model.py needs only
numpy and Keras: it inlines toolkit/layers.py (a submission cannot import the project), loads the
weights with safe_mode on and predicts in batches. `grade_submission` unpacks a zip and runs it in a
fresh `python -I` subprocess in which the project cannot be imported, as the challenge's grader would.
"""

from __future__ import annotations

import ast
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from rich.console import Console

from toolkit import ONEDNN_SET_BY_USER
from toolkit.backbones import non_core_layers
from toolkit.data import IMAGE_SHAPE, load_dataset, one_hot
from toolkit.errors import CellfuseError
from toolkit.report import classification_metrics, per_class_table
from toolkit.runs import (
    atomic_write_bytes,
    check_keras_archive,
    check_new_file,
    load_model,
    read_finished_json,
    resolve_model_file,
)
from toolkit.tta import parse_tta, wrap_with_tta

WEIGHTS = "model.keras"  # the weights file model.py loads from its own folder
LAYERS_SOURCE = Path(__file__).with_name("layers.py")  # inlined into model.py
PROJECT_PACKAGE = __name__.partition(".")[0]  # hidden from the grading subprocess
SUBMISSION_IMPORTS = {"numpy", "tensorflow", "keras"}  # besides the standard library
PRECISIONS = ("float32", "float16")
FLOAT16_MAX = float(np.finfo(np.float16).max)
# --tta auto keeps views that gain on the held-out families for at most CLEAN_COST on clean validation
CLEAN_SET, STEERING_SET, CLEAN_COST = "val", "val_heldout", 0.005

MODEL_PY = '''"""Challenge submission made by `cellfuse export`: `Model().predict(X)` -> class indices.

Needs only numpy, tensorflow and keras; the weights ({weights}) sit beside this file.
"""
{future}
import os
import warnings

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

WEIGHTS = "{weights}"
BATCH_SIZE = 64  # images per forward pass: memory stays bounded whatever n is
IMAGE_SHAPE = (96, 96, 3)

# ---- custom layers (toolkit/layers.py, inlined so that loading the weights finds them) ----
{layers}
# ---- end of custom layers ----


class Model:
    def __init__(self):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), WEIGHTS)
        self.model = keras.saving.load_model(path, safe_mode=True, compile=False)

    def predict(self, X):
        """X: (n, 96, 96, 3) pixel values 0..255, uint8 or float. Returns (n,) int64 class indices."""
        X = np.asarray(X)
        if X.ndim != 4 or X.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"X must have shape (n, 96, 96, 3); got {{X.shape}}")
        if X.dtype.kind not in "uif":
            raise ValueError(f"X must hold pixel values 0..255 (uint8 or float); got dtype {{X.dtype}}")
        if len(X) == 0:
            return np.zeros(0, dtype=np.int64)
        if X.dtype.kind == "f" and X.max() <= 1.0:
            warnings.warn("X looks scaled to 0..1, but the contract is pixel values 0..255", stacklevel=2)
        labels = np.empty(len(X), dtype=np.int64)
        for start in range(0, len(X), BATCH_SIZE):
            # A contiguous float32 copy per batch: read-only or strided input is fine, memory stays small.
            batch = np.ascontiguousarray(X[start:start + BATCH_SIZE], dtype=np.float32)
            labels[start:start + BATCH_SIZE] = np.argmax(self.model.predict_on_batch(batch), axis=-1)
        return labels
'''

# Runs in the grading subprocess (`python -I -c GRADER images.npy preds.npy result.json PACKAGE`),
# whose working directory is the unpacked submission.
GRADER = '''
import json, os, resource, sys, time, traceback

IMAGES, PREDICTIONS, RESULT, PACKAGE = sys.argv[1:5]  # read now: model.py may reset sys.argv


class HideProject:
    """Refuse the project's package: site-packages reaches it through the editable install's finder."""
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == PACKAGE:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden while grading)", name=name)


def finish(path, record, status):
    """Write the record and leave at once: os._exit, so a thread model.py started cannot keep the
    grader waiting, and a model.py that exits by itself leaves no record (the parent says so)."""
    with open(path, "w") as f:
        json.dump(record, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def fail(during, error):
    """What failed, for the parent's one line (the traceback stays on stderr): a Keras error's first line
    is its type's message, and its last line a detail. sys.exit() inside model.py is a failure too."""
    if not isinstance(error, str):
        traceback.print_exc()
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        error = f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__
    finish(RESULT + ".error", {"during": during, "error": error}, 3)


sys.meta_path.insert(0, HideProject())
sys.path.insert(0, os.getcwd())
import numpy as np
X = np.load(IMAGES)
start = time.perf_counter()
try:
    import model
    submission = model.Model()
except BaseException as e:
    fail("loading model.py", e)
loaded = time.perf_counter()
try:
    returned = submission.predict(X)
except BaseException as e:
    fail("predict", e)
done = time.perf_counter()
predictions = None if returned is None else np.asarray(returned)
if predictions is None or predictions.dtype == object:  # None, a dict, a generator, ragged lists
    fail("predict", f"it returned {type(returned).__name__}, not an array of class indices")
np.save(PREDICTIONS, predictions, allow_pickle=False)
finish(RESULT, {"load_seconds": loaded - start, "predict_seconds": done - loaded,
                "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, 0)
'''


# ---------------------------------------------------------------- export

def export_submission(run, out, *, tta="none", precision="float32", force=False, console=None) -> dict:
    """Write `out` (.zip): model.py and RUN's model, no optimizer state. Prints size and parameters.
    tta "auto": the views a student's distill comparison found to pay (`auto_views`), else none."""
    console = console or Console()
    out = Path(out)
    check_new_file(out, ".zip", force, writer="export")
    if precision not in PRECISIONS:
        raise CellfuseError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    model_file = resolve_model_file(run)
    if tta == "auto":
        tta = auto_views(model_file, console)
    if tta != "none":
        parse_tta(tta)  # a bad spec fails before the slow model load
    source = model_py_source()
    model = _load_for_export(model_file, tta)
    files = {"model.py": source.encode(), WEIGHTS: _keras_bytes(model, precision)}
    atomic_write_bytes(out, _zip_bytes(files))
    result = {"zip": str(out), "bytes": out.stat().st_size, "params": int(model.count_params()),
              "tta": tta, "precision": precision}
    console.print(f"wrote {out}: {result['bytes'] / 1e6:.2f} MB, {result['params']:,} parameters "
                  f"(tta {tta}, weights {precision})")
    return result


def auto_views(model_file: Path, console: Console) -> str:
    """`--tta auto`: the views a student's distill comparison measured on its best.keras, if they pay by
    `submission_views`' rule; "none" for anything else. Either way the reason is printed."""
    views, reason = _measured_views(model_file)
    console.print(f"views (--tta auto): {views}; {reason}")
    return views


def _measured_views(model_file: Path) -> tuple[str, str]:
    folder = model_file.resolve().parent
    if (folder / "ensemble.json").is_file():
        return "none", "an ensemble's model already averages the views its selection chose"
    if not (folder / "distill.json").is_file():
        return "none", (f"{model_file} is not a student cellfuse distilled, so nothing measured whether views "
                        "pay for it (name them with --tta)")
    if model_file.resolve() != (folder / "best.keras").resolve():
        return "none", f"distill measured {folder / 'best.keras'}, not {model_file.name}"
    distilled, single = read_finished_json(folder / "distill.json"), read_finished_json(folder / "metrics.json")
    try:
        views, figures = submission_views(single, distilled), compared_figures(single, distilled)
    except (AttributeError, TypeError, KeyError, ValueError):  # missing, cut short or of another shape
        return "none", (f"{folder}: distill.json or metrics.json is unreadable or incomplete; `cellfuse distill "
                        "ENSEMBLE RECIPE --resume` writes them again")
    if distilled.get("views", "none") == "none":
        return "none", "its teacher averaged no views"
    if STEERING_SET not in figures:
        return "none", f"distill measured it on no {STEERING_SET}, which views are judged on"
    shown = ", ".join(f"{name} {alone:.3f} -> {viewed:.3f}" for name, (alone, viewed) in figures.items())
    return views, (f"the student alone and with its teacher's views ({distilled['views']}): {shown}; views are "
                   f"kept when they gain on {STEERING_SET} and cost at most {100 * CLEAN_COST:g} points on {CLEAN_SET}")


def compared_figures(single: dict, distilled: dict) -> dict[str, tuple[float, float]]:
    """{set: (the student's accuracy alone, from its metrics.json; with its teacher's views, from its
    distill.json)} for the steering and clean sets, where both were measured."""
    viewed = distilled.get("rows", {}).get("student", {})
    return {name: (float(single[name]["accuracy"]), float(viewed[f"acc_{name}"]))
            for name in (STEERING_SET, CLEAN_SET) if name in single and f"acc_{name}" in viewed}


def submission_views(single: dict, distilled: dict) -> str:
    """The ensemble's views for the submission if they raise the student (its run's metrics.json: `single`;
    its distill.json: `distilled`) on the steering set, corruption families nothing trained on, for at most
    half a point on clean validation: the rule every robustness lever is adopted by (README). Else "none":
    views multiply the submission's inference cost."""
    figures, views = compared_figures(single, distilled), distilled.get("views", "none")
    if views == "none" or len(figures) < 2:
        return "none"  # no views, or no steering set to judge them on
    (steer_alone, steer_viewed), (clean_alone, clean_viewed) = figures[STEERING_SET], figures[CLEAN_SET]
    gain, cost = steer_viewed - steer_alone, clean_alone - clean_viewed
    # rounded: accuracies are fractions of whole images, and 0.930 - 0.925 is 0.0050000000000000044
    return views if round(gain, 9) > 0 and round(cost, 9) <= CLEAN_COST else "none"


def model_py_source() -> str:
    """The submission's model.py, with toolkit/layers.py inlined; refuses imports a grader lacks."""
    layers = LAYERS_SOURCE.read_text()
    future = [line for line in layers.splitlines() if line.startswith("from __future__ import")]
    layers = "\n".join(line for line in layers.splitlines() if line not in future)
    source = MODEL_PY.format(weights=WEIGHTS, future="\n".join(future), layers=layers.strip())
    for name in _imported_modules(source):
        if name not in SUBMISSION_IMPORTS and name not in sys.stdlib_module_names:
            raise CellfuseError(f"{LAYERS_SOURCE}: imports {name!r}; a submission may import only "
                                f"{', '.join(sorted(SUBMISSION_IMPORTS))} and the standard library")
    return source


def _imported_modules(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.partition(".")[0])
    return names - {"__future__"}


def _load_for_export(path: Path, tta: str):
    """The model as the submission will run it: no optimizer (compile=False), TTA inside if asked."""
    try:  # runs saved before hub backbones were rebuilt from core layers hold keras-hub classes
        import keras_hub  # noqa: F401
    except ImportError:
        pass
    model = load_model(path, compile=False)
    _check_contract(path, model)
    foreign = non_core_layers(model)
    if foreign:
        raise CellfuseError(f"{path}: layer {foreign[0]} needs a library the grader's model.py cannot import "
                            "(numpy/tensorflow/keras only); retrain it with this version (hub backbones are "
                            "rebuilt from core layers) or choose another backbone")
    if tta != "none":
        model = wrap_with_tta(model, tta)
    return model


def _check_contract(path: Path, model) -> None:
    """Raw (n, 96, 96, 3) images in, (n, classes) probabilities out: what model.py relies on."""
    shape = tuple(model.input_shape)
    if len(shape) != 4 or any(d not in (None, w) for d, w in zip(shape[1:], IMAGE_SHAPE, strict=True)):
        raise CellfuseError(f"{path}: takes input {shape}; a submission receives (n, 96, 96, 3)")
    if len(model.output_shape) != 2:
        raise CellfuseError(f"{path}: returns {model.output_shape}; expected (n, classes) probabilities")


def _keras_bytes(model, precision: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / WEIGHTS
        model.save(path)
        if precision == "float16":
            _store_weights_as_float16(path)
        return path.read_bytes()


def _store_weights_as_float16(path: Path) -> None:
    """Rewrite the .keras archive's weights as float16: half the bytes. Keras casts them back to the
    variables' float32 on load, so model.py loads both precisions the same way."""
    import h5py

    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    halved = io.BytesIO()
    with h5py.File(io.BytesIO(entries["model.weights.h5"]), "r") as src, h5py.File(halved, "w") as dst:
        _copy_h5_as_float16(src, dst)
    entries["model.weights.h5"] = halved.getvalue()
    path.write_bytes(_zip_bytes(entries, zipfile.ZIP_STORED))


def _copy_h5_as_float16(src, dst) -> None:
    # Copied into a fresh file rather than edited in place: HDF5 never reclaims a deleted dataset's space.
    import h5py

    dst.attrs.update(src.attrs)
    for name, item in src.items():
        if isinstance(item, h5py.Group):
            _copy_h5_as_float16(item, dst.create_group(name))
            continue
        data = item[()]
        if data.dtype == np.float32 and np.all(np.abs(data) <= FLOAT16_MAX):  # else inf: keep float32
            data = data.astype(np.float16)
        dst.create_dataset(name, data=data).attrs.update(item.attrs)


def _zip_bytes(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buf.getvalue()


# ---------------------------------------------------------------- grade

def grade_submission(submission, data, *, timeout=600, console=None) -> dict:
    """Run SUBMISSION (a zip) on DATA in a clean subprocess; accuracy, macro-F1, per class, time, memory."""
    console = console or Console()
    submission = Path(submission)
    dataset = load_dataset(data)
    with tempfile.TemporaryDirectory(prefix="cellfuse-grade-") as tmp:
        folder = _unpack(submission, Path(tmp) / "submission")
        with console.status(f"grading {submission.name} on {len(dataset)} images in a clean subprocess"):
            predictions, timings = _run_grader(submission, folder, dataset.images, Path(tmp), timeout)
    _check_predictions(submission, predictions, len(dataset), dataset.n_classes)
    metrics = _metrics(dataset, predictions)
    result = {"submission": str(submission), "data": str(data), "n": len(dataset),
              "accuracy": metrics["accuracy"], "accuracy_ci95": metrics["accuracy_ci95"], "macro_f1": metrics["macro_f1"],
              "per_class": metrics["per_class"], "confusion": metrics["confusion"], **timings}
    _print_grade(result, console)
    return result


def _metrics(dataset, predictions: np.ndarray) -> dict:
    """The report's metrics from hard predictions (one-hot probabilities)."""
    return classification_metrics(dataset.labels, one_hot(predictions, dataset.n_classes),
                                  dataset.class_names)


def _unpack(submission: Path, folder: Path) -> Path:
    """Extract the zip; model.py and the weights it names must be at its root."""
    if submission.is_dir():
        raise CellfuseError(f"{submission}: is a folder; grade takes a submission zip (make one with "
                            f"`cellfuse export {submission} --out submission.zip`)")
    if not submission.is_file():
        raise CellfuseError(f"{submission}: does not exist")
    try:
        with zipfile.ZipFile(submission) as archive:
            names = archive.namelist()
            archive.extractall(folder)
    except zipfile.BadZipFile:
        raise CellfuseError(f"{submission}: not a zip file") from None
    if "model.py" not in names:
        nested = [name for name in names if name.endswith("/model.py")]
        hint = f" (found {nested[0]}; it must be at the zip's root)" if nested else ""
        raise CellfuseError(f"{submission}: missing model.py{hint}")
    for name in _weights_named_in(submission, folder / "model.py"):
        if name not in names:
            raise CellfuseError(f"{submission}: missing {name}, which model.py loads")
        if name.endswith(".keras"):  # damaged, Keras would call it "file not found"
            check_keras_archive(folder / name, f"{submission} (its {name})")
    return folder


def _weights_named_in(submission: Path, model_py: Path) -> list[str]:
    """The file a module-level `WEIGHTS = "..."` names (what export writes); none for other model.py files."""
    try:
        tree = ast.parse(model_py.read_text())
    except SyntaxError as e:
        raise CellfuseError(f"{submission}: model.py line {e.lineno}: {e.msg}") from None
    return [node.value.value for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
            and any(isinstance(t, ast.Name) and t.id == "WEIGHTS" for t in node.targets)]


def _run_grader(submission: Path, folder: Path, images: np.ndarray, tmp: Path, timeout: float):
    """`python -I` (no user site, no PYTHONPATH), cwd = the submission, the project hidden.
    The child never sees the labels."""
    np.save(tmp / "images.npy", images)
    command = [sys.executable, "-I", "-c", GRADER, str(tmp / "images.npy"), str(tmp / "predictions.npy"),
               str(tmp / "result.json"), PROJECT_PACKAGE]
    env = grader_env(tmp)
    start = time.perf_counter()
    try:
        child = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CellfuseError(f"{submission}: grading took longer than {timeout} s; gave up") from None
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise CellfuseError(f"{submission}: model.py failed: {_failure(child, tmp / 'result.json.error')}")
    if not (tmp / "result.json").is_file():  # model.py ended the process itself, status 0
        raise CellfuseError(f"{submission}: model.py failed: it exited (status 0) before predict returned")
    timings = json.loads((tmp / "result.json").read_text())
    return np.load(tmp / "predictions.npy", allow_pickle=False), {"seconds": seconds, **timings}


# What the grader's child keeps of the user's environment: enough to find Python's libraries and the
# GPU, nothing credential-like. Not a sandbox: model.py still runs as the user (README says so).
KEPT_ENV = {"PATH", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH", "SYSTEMROOT", "TMPDIR"}
KEPT_ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "OPENBLAS_", "OMP_", "MKL_", "XLA_", "TF_")
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH", "COOKIE", "SESSION")


def grader_env(tmp: Path) -> dict[str, str]:
    """A minimal environment for model.py: allow-listed variables, a temporary HOME, and TensorFlow's
    own oneDNN choice, as on the challenge's grader, unless the user chose (cellfuse turns it on)."""
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if (k in KEPT_ENV or k.startswith(KEPT_ENV_PREFIXES)) and not any(w in k.upper() for w in SECRET_WORDS)}
    if not ONEDNN_SET_BY_USER:
        env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    return {**env, "HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": env.get("TF_CPP_MIN_LOG_LEVEL", "2")}


def _failure(child: subprocess.CompletedProcess, record: Path) -> str:
    """What the grader recorded (where and what), else the child's last stderr line (a crash)."""
    if record.is_file():
        failed = json.loads(record.read_text())
        return f"{failed['error']} (in {failed['during']})"
    lines = [line.strip() for line in child.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {child.returncode}, no error message"


def _check_predictions(submission: Path, predictions: np.ndarray, n: int, n_classes: int) -> None:
    if predictions.shape != (n,):
        raise CellfuseError(f"{submission}: predict returned shape {predictions.shape}; expected ({n},)")
    if not np.issubdtype(predictions.dtype, np.integer):
        raise CellfuseError(f"{submission}: predict returned dtype {predictions.dtype}; "
                            "expected integer class indices")
    if n and (predictions.min() < 0 or predictions.max() >= n_classes):
        raise CellfuseError(f"{submission}: predict returned classes "
                            f"{predictions.min()}..{predictions.max()}; expected 0..{n_classes - 1}")


def _print_grade(result: dict, console: Console) -> None:
    from rich.table import Table

    table = Table(title=f"{Path(result['submission']).name} on {Path(result['data']).name}")
    for column in ("images", "accuracy", "95% interval", "macro-F1", "load s", "predict s", "peak MB"):
        table.add_column(column, justify="right")
    low, high = result["accuracy_ci95"]
    table.add_row(str(result["n"]), f"{result['accuracy']:.4f}", f"{low:.3f}-{high:.3f}", f"{result['macro_f1']:.4f}",
                  f"{result['load_seconds']:.1f}", f"{result['predict_seconds']:.1f}",
                  f"{result['peak_memory_mb']:.0f}")
    console.print(table)
    console.print(per_class_table(result, title="per class"))
