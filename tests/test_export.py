"""Export a tiny trained model as a submission zip; grade it in a clean subprocess; edge cases of model.py."""

import importlib.util
import io
import json
import zipfile

import h5py
import numpy as np
import pytest
from conftest import make_images
from rich.console import Console

from toolkit.data import CLASS_NAMES, save_dataset
from toolkit.errors import CellfuseError
from toolkit.export import _imported_modules, export_submission, grade_submission, submission_views
from toolkit.report import accuracy_interval

# ---------------------------------------------------------------- fixtures (shared: TF work is slow)

def tiny_model(keras, input_shape=(96, 96, 3)):
    inputs = keras.Input(input_shape)
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.BatchNormalization(momentum=0.8)(x)  # moving statistics: weights that are not trained
    return keras.Model(inputs, keras.layers.Dense(8, activation="softmax")(x))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory whose best.keras was trained briefly and saved with its optimizer state."""
    import keras

    keras.utils.set_random_seed(0)
    images, labels = make_images(256, seed=0)
    model = tiny_model(keras)
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(images.astype("float32"), labels, epochs=4, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("run")
    model.save(path / "best.keras")
    return path


@pytest.fixture(scope="module")
def model(run_dir):
    import keras

    return keras.saving.load_model(run_dir / "best.keras")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    images, labels = make_images(64, seed=1)
    return save_dataset(tmp_path_factory.mktemp("data") / "val.npz", images, labels), images, labels


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sub") / "submission.zip"
    console = Console(file=io.StringIO(), width=200)
    result = export_submission(run_dir, out, console=console)
    return result, console.file.getvalue()


@pytest.fixture(scope="module")
def tta_exported(run_dir, tmp_path_factory):
    """With TTA inside: the saved model holds the custom layers model.py must inline."""
    out = tmp_path_factory.mktemp("tta") / "tta.zip"
    return export_submission(run_dir, out, tta="flips", console=Console(file=io.StringIO()))


@pytest.fixture(scope="module")
def graded(tta_exported, data):
    """`cellfuse grade --json` on the TTA zip: the one grading that loads TensorFlow (slow)."""
    from click.testing import CliRunner

    from toolkit.cli import main

    result = CliRunner().invoke(main, ["grade", tta_exported["zip"], str(data[0]), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1]), result.output


def load_submission(zip_path, folder):
    """Import a submission's model.py in this process (fast; the clean-subprocess path is `grade`)."""
    zipfile.ZipFile(zip_path).extractall(folder)
    spec = importlib.util.spec_from_file_location(f"submission_{folder.name}", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Model()


@pytest.fixture(scope="module")
def submission(exported, tmp_path_factory):
    return load_submission(exported[0]["zip"], tmp_path_factory.mktemp("unpacked"))


def direct(model, images):
    return model.predict(np.asarray(images, dtype="float32"), verbose=0).argmax(1)


def weights_h5(zip_path):
    keras_bytes = zipfile.ZipFile(zip_path).read("model.keras")
    return h5py.File(io.BytesIO(zipfile.ZipFile(io.BytesIO(keras_bytes)).read("model.weights.h5")), "r")


def float_dtypes(h5):
    found = set()
    h5.visititems(lambda name, item: found.add(item.dtype.name)
                  if isinstance(item, h5py.Dataset) and item.dtype.kind == "f" else None)
    return found


# ---------------------------------------------------------------- export

def test_zip_holds_model_py_and_weights_without_optimizer(exported, model):
    result, printed = exported
    archive = zipfile.ZipFile(result["zip"])
    assert sorted(archive.namelist()) == ["model.keras", "model.py"]
    inner = zipfile.ZipFile(io.BytesIO(archive.read("model.keras")))
    assert not json.loads(inner.read("config.json")).get("compile_config")  # no optimizer, no loss
    with weights_h5(result["zip"]) as h5:
        assert "layers" in h5 and "optimizer" not in h5
    assert result["params"] == model.count_params()
    assert result["bytes"] == len(open(result["zip"], "rb").read())
    assert f"{result['params']:,} parameters" in printed and "MB" in printed


def test_model_py_imports_only_what_the_grader_has_and_inlines_the_custom_layers(exported):
    source = zipfile.ZipFile(exported[0]["zip"]).read("model.py").decode()
    assert _imported_modules(source) <= {"os", "warnings", "keras", "numpy"}
    assert "class ImageView(keras.layers.Layer)" in source and "safe_mode=True" in source


def test_export_refuses_bad_requests(run_dir, exported, tmp_path):
    with pytest.raises(CellfuseError, match="already exists"):
        export_submission(run_dir, exported[0]["zip"])
    with pytest.raises(CellfuseError, match=r"\.zip"):
        export_submission(run_dir, tmp_path / "submission.tar")
    with pytest.raises(CellfuseError, match="unknown view or view set 'bogus'"):
        export_submission(run_dir, tmp_path / "s.zip", tta="bogus")
    with pytest.raises(CellfuseError, match="precision"):
        export_submission(run_dir, tmp_path / "s.zip", precision="int4")
    with pytest.raises(CellfuseError, match="no model in this directory"):
        export_submission(tmp_path, tmp_path / "s.zip")
    (tmp_path / "broken.keras").write_bytes(b"not a model")
    with pytest.raises(CellfuseError, match=r"broken\.keras: not a readable \.keras model \(not a zip"):
        export_submission(tmp_path / "broken.keras", tmp_path / "s.zip")


def test_export_refuses_a_model_outside_the_contract(tmp_path):
    import keras

    tiny_model(keras, input_shape=(32, 32, 3)).save(tmp_path / "small.keras")
    with pytest.raises(CellfuseError, match=r"small\.keras: takes input \(None, 32, 32, 3\)"):
        export_submission(tmp_path / "small.keras", tmp_path / "s.zip")
    assert not (tmp_path / "s.zip").exists()


def test_float16_halves_the_weights_and_keeps_the_predictions(run_dir, model, data, exported, tmp_path):
    result = export_submission(run_dir, tmp_path / "half.zip", precision="float16",
                               console=Console(file=io.StringIO()))
    with weights_h5(result["zip"]) as h5:
        assert float_dtypes(h5) == {"float16"}
    assert result["bytes"] < exported[0]["bytes"]
    half = load_submission(result["zip"], tmp_path / "half")
    images = data[1]
    probs32 = model.predict(images.astype("float32"), verbose=0)
    probs16 = half.model.predict(images.astype("float32"), verbose=0)
    assert np.abs(probs32 - probs16).max() < 1e-2
    assert (half.predict(images) == direct(model, images)).mean() >= 0.95


def tta_direct(model, images):
    from toolkit.tta import merge, predict_views

    return merge(predict_views(model, images, "flips")).argmax(1)


def test_tta_lives_inside_the_exported_model(tta_exported, model, data, tmp_path):
    assert tta_exported["params"] == model.count_params()  # views share the one set of weights
    images = data[1][:16]
    predicted = load_submission(tta_exported["zip"], tmp_path / "tta").predict(images)
    assert (predicted == tta_direct(model, images)).all()


def test_the_submission_carries_the_views_only_where_they_pay():
    """The student's views go into the zip when they gain on the held-out families for at most half a
    point on clean validation; its single-view figures come from its run, the viewed ones from distill."""
    single = {"val": {"accuracy": 0.930}, "val_heldout": {"accuracy": 0.800}}

    def distilled(val, heldout):
        return {"views": "d4", "rows": {"student": {"acc_val": val, "acc_val_heldout": heldout}}}

    assert submission_views(single, distilled(0.930, 0.810)) == "d4"
    assert submission_views(single, distilled(0.926, 0.810)) == "d4"  # 0.4 points clean for 1 held-out
    assert submission_views(single, distilled(0.925, 0.810)) == "d4"  # half a point is allowed (float-exact)
    assert submission_views(single, distilled(0.924, 0.810)) == "none"
    assert submission_views(single, distilled(0.920, 0.830)) == "none"  # a point clean is too dear
    assert submission_views(single, distilled(0.940, 0.800)) == "none"  # no held-out gain, no views
    assert submission_views(single, distilled(0.940, 0.790)) == "none"
    assert submission_views(single, {"views": "none", "rows": {"student": {"acc_val": 0.930}}}) == "none"
    assert submission_views(single, {"views": "d4", "rows": {"student": {"acc_val": 0.930}}}) == "none"  # no steering set
    assert submission_views(single, {"views": "d4"}) == "none"  # a comparison without the rows


def test_auto_exports_a_students_measured_views_and_says_why_not_elsewhere(run_dir, tmp_path):
    """--tta auto (the CLI's default) reads a student's distill comparison: its views when they pay, and
    none, with the reason, for a student whose views do not pay, another file of its run, a cut comparison,
    one without val_heldout, a member and an ensemble."""
    import shutil

    from click.testing import CliRunner

    from toolkit.cli import main

    student = tmp_path / "student"
    student.mkdir()
    shutil.copy(run_dir / "best.keras", student / "best.keras")
    shutil.copy(run_dir / "best.keras", student / "wise.keras")

    def export(path, heldout=0.810, single_heldout=0.800):
        metrics = {"val": {"accuracy": 0.930}, **({"val_heldout": {"accuracy": single_heldout}} if single_heldout else {})}
        (student / "metrics.json").write_text(json.dumps(metrics))
        (student / "distill.json").write_text(json.dumps(
            {"views": "d4", "rows": {"student": {"acc_val": 0.929, "acc_val_heldout": heldout}}}))
        out = tmp_path / f"{len(list(tmp_path.glob('*.zip')))}.zip"
        console = Console(file=io.StringIO(), width=400)
        views = export_submission(path, out, tta="auto", console=console)["tta"]
        inner = zipfile.ZipFile(io.BytesIO(zipfile.ZipFile(out).read("model.keras")))
        assert (b"ImageView" in inner.read("config.json")) == (views != "none")  # the views inside, or none
        return views, console.file.getvalue()

    views, printed = export(student)
    assert views == "d4" and "val_heldout 0.800 -> 0.810, val 0.930 -> 0.929" in printed
    assert export(student / "best.keras")[0] == "d4"
    views, printed = export(student, heldout=0.800)
    assert views == "none" and "val_heldout 0.800 -> 0.800" in printed
    views, printed = export(student / "wise.keras")
    assert views == "none" and "not wise.keras" in printed
    (student / "best.keras").write_bytes(b"damaged")  # not read for another file of the run
    assert export(student / "wise.keras")[0] == "none"
    shutil.copy(run_dir / "best.keras", student / "best.keras")
    views, printed = export(student, single_heldout=None)
    assert views == "none" and "no val_heldout" in printed
    assert "not a student cellfuse distilled" in export(run_dir)[1]
    (student / "distill.json").write_text('{"views": "d4", "ro')  # cut short: said, not a traceback
    console = Console(file=io.StringIO(), width=400)
    assert export_submission(student, tmp_path / "cut.zip", tta="auto", console=console)["tta"] == "none"
    assert "unreadable or incomplete" in console.file.getvalue()
    ensemble = tmp_path / "ensemble"
    ensemble.mkdir()
    shutil.copy(run_dir / "best.keras", ensemble / "ensemble.keras")
    (ensemble / "ensemble.json").write_text("{}")
    assert "already averages the views" in export(ensemble)[1]
    # the CLI's default is auto
    export(student)  # a whole comparison again
    result = CliRunner().invoke(main, ["export", str(student), "--out", str(tmp_path / "cli.zip"), "--json"])
    assert result.exit_code == 0, result.output
    assert "views (--tta auto): d4" in result.output and json.loads(result.output.splitlines()[-1])["tta"] == "d4"


# ---------------------------------------------------------------- model.py edge cases (in process)

def test_predict_matches_the_model_across_batches_and_input_kinds(submission, model, data):
    images = np.concatenate([data[1]] * 3)[:150]  # crosses batch boundaries
    expected = direct(model, images)
    labels = submission.predict(images)
    assert labels.shape == (150,) and labels.dtype == np.int64
    assert (labels == expected).all()
    assert (submission.predict(images.astype(np.float64)) == expected).all()


def test_predict_accepts_read_only_and_strided_arrays(submission, model, data):
    images = np.concatenate([data[1]] * 2)
    images.setflags(write=False)
    strided = images[::2]  # a view: not contiguous, read-only
    assert not strided.flags.c_contiguous and not strided.flags.writeable
    assert (submission.predict(strided) == direct(model, strided)).all()
    fortran = np.asfortranarray(images[:5])
    assert (submission.predict(fortran) == direct(model, images[:5])).all()


def test_predict_one_and_zero_images(submission, model, data):
    one = submission.predict(data[1][:1])
    assert one.shape == (1,) and one[0] == direct(model, data[1][:1])[0]
    none = submission.predict(np.zeros((0, 96, 96, 3), np.uint8))
    assert none.shape == (0,) and none.dtype == np.int64


def test_predict_warns_on_0_to_1_floats_and_rejects_wrong_shapes(submission, data):
    with pytest.warns(UserWarning, match="0..255"):
        submission.predict(data[1][:2] / 255.0)
    with pytest.raises(ValueError, match=r"\(n, 96, 96, 3\); got \(96, 96, 3\)"):
        submission.predict(data[1][0])
    with pytest.raises(ValueError, match="dtype"):
        submission.predict(np.full((1, 96, 96, 3), "a"))


# ---------------------------------------------------------------- grade (clean subprocess)

def test_grade_agrees_with_the_model_itself(graded, model, data):
    """model.py, custom layers inlined, works where the project cannot be imported; same accuracy."""
    graded, printed = graded
    _, images, labels = data
    assert graded["accuracy"] == pytest.approx((tta_direct(model, images) == labels).mean())
    assert graded["accuracy"] > 0.5  # trained: far above chance (0.125)
    assert graded["n"] == 64 and list(graded["per_class"]) == list(CLASS_NAMES)
    # how far another 64 images could move it, printed beside it
    low, high = graded["accuracy_ci95"]
    assert (low, high) == pytest.approx(accuracy_interval(round(graded["accuracy"] * 64), 64))
    assert low <= graded["accuracy"] <= high and f"{low:.3f}-{high:.3f}" in printed
    assert 0 < graded["macro_f1"] <= 1
    assert graded["seconds"] >= graded["load_seconds"] + graded["predict_seconds"] > 0
    assert graded["peak_memory_mb"] > 100  # TensorFlow was loaded: the child reported its own RSS
    assert "macro-F1" in printed and "immature granulocyte" in printed  # the tables


def write_zip(path, files):
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def numpy_model_py(predict_body):
    return f"import numpy as np\n\nclass Model:\n    def predict(self, X):\n        {predict_body}\n"


def test_the_project_cannot_be_imported_while_grading(data, tmp_path):
    zip_path = write_zip(tmp_path / "s.zip", {"model.py": "import toolkit\n"})
    with pytest.raises(CellfuseError, match="No module named 'toolkit'"):
        grade_submission(zip_path, data[0], console=Console(file=io.StringIO()))


def test_the_grader_runs_in_the_unpacked_folder(data, tmp_path):
    body = "return np.load('answers.npy')"  # a relative path: works only if cwd is the submission
    answers = io.BytesIO()
    np.save(answers, data[2])
    zip_path = tmp_path / "s.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("model.py", numpy_model_py(body))
        archive.writestr("answers.npy", answers.getvalue())
    graded = grade_submission(zip_path, data[0], console=Console(file=io.StringIO()))
    assert graded["accuracy"] == 1.0 and graded["macro_f1"] == 1.0


def test_a_model_py_that_resets_argv_and_leaves_a_thread_running_is_graded(data, tmp_path):
    body = ("import sys, threading, time; sys.argv = []; threading.Thread(target=time.sleep, args=(600,)).start(); "
            "return np.zeros(len(X), int)")  # a notebook's habits: neither may stall or break the grader
    zip_path = write_zip(tmp_path / "s.zip", {"model.py": numpy_model_py(body)})
    graded = grade_submission(zip_path, data[0], timeout=60, console=Console(file=io.StringIO()))
    assert graded["accuracy"] == pytest.approx(float(np.mean(data[2] == 0)))


@pytest.mark.parametrize("body, message", [
    ("raise RuntimeError('weights look wrong')", r"model.py failed: RuntimeError: weights look wrong \(in predict\)"),
    ("raise ValueError('Exception calling layer conv\\n\\nArguments:\\n  • inputs=tf.Tensor(shape=(64, 96, 96, 4))')",
     r"failed: ValueError: Exception calling layer conv \(in predict\)$"),  # Keras' first line, not its last
    ("import sys; sys.exit(0)", r"failed: SystemExit: 0 \(in predict\)"),
    ("return None", r"failed: it returned NoneType, not an array of class indices \(in predict\)"),
    ("return {'a': 1}", r"failed: it returned dict, not an array"),
    ("import os; os._exit(0)", r"failed: it exited \(status 0\) before predict returned"),
    ("return np.zeros(len(X) + 1, int)", r"shape \(65,\); expected \(64,\)"),
    ("return np.zeros(len(X))", "dtype float64; expected integer"),
    ("return np.full(len(X), 8)", r"classes 8..8; expected 0..7"),
    ("import time; time.sleep(60)", "longer than 2 s"),
])
def test_grade_reports_a_broken_model_py(data, tmp_path, body, message):
    zip_path = write_zip(tmp_path / "s.zip", {"model.py": numpy_model_py(body)})
    timeout = 2 if "sleep" in body else 120
    with pytest.raises(CellfuseError, match=message):
        grade_submission(zip_path, data[0], timeout=timeout, console=Console(file=io.StringIO()))


def test_grade_names_what_is_missing_from_the_zip(exported, data, tmp_path):
    source = zipfile.ZipFile(exported[0]["zip"]).read("model.py")
    cases = {
        "no_weights.zip": ({"model.py": source}, r"no_weights\.zip: missing model\.keras, which model"),
        "cut.zip": ({"model.py": source, "model.keras": b"PK\x03\x04 cut short"},
                    r"cut\.zip \(its model\.keras\): not a readable \.keras model"),
        "no_model.zip": ({"weights.keras": b"x"}, r"no_model\.zip: missing model\.py$"),
        "nested.zip": ({"sub/model.py": source}, r"found sub/model\.py; it must be at the zip's root"),
        "syntax.zip": ({"model.py": "def (:\n"}, r"syntax\.zip: model\.py line 1"),
    }
    for name, (files, message) in cases.items():
        with pytest.raises(CellfuseError, match=message):
            grade_submission(write_zip(tmp_path / name, files), data[0])
    (tmp_path / "text.zip").write_text("not a zip")
    with pytest.raises(CellfuseError, match="not a zip file"):
        grade_submission(tmp_path / "text.zip", data[0])


# ---------------------------------------------------------------- CLI (grade --json: the `graded` fixture)

def test_cli_export(run_dir, exported, tmp_path):
    from click.testing import CliRunner

    from toolkit.cli import main

    out = tmp_path / "cli.zip"
    args = ["export", str(run_dir), "--out", str(out), "--precision", "float16", "--tta", "flips"]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["bytes"] == out.stat().st_size and summary["params"] == exported[0]["params"]
    assert (summary["precision"], summary["tta"]) == ("float16", "flips")
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "already exists; pass --force" in again.output
    assert CliRunner().invoke(main, [*args, "--force"]).exit_code == 0


def test_grader_gets_a_minimal_environment(data, tmp_path, monkeypatch):
    """model.py runs without the user's credentials-looking variables and with a temporary HOME."""
    import os

    monkeypatch.setenv("CELLFUSE_TEST_API_TOKEN", "s3cret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret")
    home = os.path.expanduser("~")
    body = ("import os; leaked = [k for k in os.environ if 'TOKEN' in k or 'SECRET' in k]; "
            f"assert not leaked, leaked; assert os.environ['HOME'] != {home!r}; "
            "assert os.path.isdir(os.environ['HOME']) and 'PATH' in os.environ; "
            "return np.zeros(len(X), np.int64)")
    zip_path = write_zip(tmp_path / "env.zip", {"model.py": numpy_model_py(body)})
    result = grade_submission(zip_path, data[0], console=Console(quiet=True))
    assert result["n"] > 0


def test_the_grader_gets_tensorflows_own_onednn_choice_unless_the_user_made_one(data, tmp_path, monkeypatch):
    """cellfuse turns oneDNN on for itself (toolkit/__init__.py); the challenge's grader does not import it."""
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")
    for by_user, expected in ((False, None), (True, "1")):
        monkeypatch.setattr("toolkit.export.ONEDNN_SET_BY_USER", by_user)
        body = f"assert os.environ.get('TF_ENABLE_ONEDNN_OPTS') == {expected!r}; return np.zeros(len(X), np.int64)"
        zip_path = write_zip(tmp_path / f"onednn{by_user}.zip", {"model.py": "import os\n" + numpy_model_py(body)})
        assert grade_submission(zip_path, data[0], console=Console(quiet=True))["n"] > 0
