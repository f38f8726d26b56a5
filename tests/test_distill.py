"""Distillation: the loss against a hand computation, both teacher modes end to end on tiny data."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_images, stand_in_model
from rich.console import Console
from test_tta import tiny_model

from toolkit.cli import main
from toolkit.corrupt import corrupt_images
from toolkit.data import load_dataset, save_dataset
from toolkit.distill import distillation_loss
from toolkit.errors import CellfuseError
from toolkit.layers import EPS, ImageView

ROOT = Path(__file__).parents[1]


def test_loss_matches_hand_computation():
    teacher = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    student = np.array([[0.5, 0.3, 0.2], [0.3, 0.3, 0.4]])
    labels = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])  # the second is a mixed label
    T, alpha = 2.0, 0.3

    def soften(p):
        z = np.exp(np.log(p) / T)
        return z / z.sum(1, keepdims=True)

    t, s = soften(teacher), soften(student)
    kl = (t * np.log(t / s)).sum(1)
    ce = -(labels * np.log(student)).sum(1)
    expected = alpha * ce + (1 - alpha) * T**2 * kl
    got = np.asarray(distillation_loss(teacher.astype("float32"), student.astype("float32"),
                                       labels.astype("float32"), T, alpha))
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # a student that equals its teacher pays only the label term
    same = np.asarray(distillation_loss(teacher, teacher, labels, T, 0.0))
    np.testing.assert_allclose(same, 0.0, atol=1e-5)


def cellfuse_member(images, labels, epochs: int = 4):
    """A fitted classifier built the way `cellfuse train` builds one (tiny-cnn backbone, seed head)."""
    import keras

    from toolkit.backbones import build_classifier
    from toolkit.recipe import ModelConfig

    keras.utils.set_random_seed(3)
    model = build_classifier(ModelConfig(backbone="tiny-cnn", weights="none", head="seed"), 8)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(images, labels, epochs=epochs, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def tiny_ensemble(tmp_path_factory):
    """Two small fitted members (one a cellfuse classifier) combined by `cellfuse ensemble` on toy data."""
    tmp = tmp_path_factory.mktemp("distill")
    images, labels = make_images(160, seed=5)
    data = save_dataset(tmp / "toy.npz", images, labels)
    val_images, val_labels = make_images(48, seed=6)
    val = save_dataset(tmp / "val.npz", val_images, val_labels)
    save_dataset(tmp / "val_corrupt.npz", corrupt_images(val_images, severity=3, seed=0), val_labels)
    for name in ("m0", "m1"):
        (tmp / name).mkdir()
    cellfuse_member(images.astype("float32"), labels).save(tmp / "m0" / "best.keras")
    tiny_model(1, images.astype("float32"), labels, epochs=8).save(tmp / "m1" / "best.keras")
    result = CliRunner().invoke(main, ["ensemble", str(tmp / "m0"), str(tmp / "m1"), "--val", str(val),
                                       "--out", str(tmp / "ens"), "--views", "none,flips", "--rounds", "4"])
    assert result.exit_code == 0, result.output
    return tmp, data


def test_a_teacher_rebuilt_under_mixed_precision_hands_out_float32(tiny_ensemble):
    """A student on a GPU sets mixed_float16 before its teacher is built (view-free, from ensemble.json):
    the teacher's probability arithmetic stays float32, which keras.distillation.Distiller requires of
    teacher and student alike (a float16 teacher stopped student-effv2b0 on every GPU)."""
    import keras

    from toolkit.ensemble import load_ensemble

    tmp, data = tiny_ensemble
    images = np.load(data)["images"][:8].astype("float32")
    expected = load_ensemble(tmp / "ens", views=False).predict_on_batch(images)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        teacher = load_ensemble(tmp / "ens", views=False)
        probs = teacher.predict_on_batch(images)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert teacher.outputs[0].dtype == "float32" and probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected, atol=1e-6)  # members keep their saved float32 policies


def _student_recipe(tmp: Path, mode: str, extra: str = "") -> Path:
    recipe = tmp / f"student-{mode}.toml"
    recipe.write_text((ROOT / "recipes" / "tiny.toml").read_text() + f'\n[distill]\nmode = "{mode}"\n'
                      f"temperature = 3.0\nalpha = 0.2\n{extra}")
    return recipe


MODES = {"cached": "", "function-matching": 'init = "m0"\n', "function-matching-tta": 'init = "m0"\nteacher_tta = true\n',
         "bank": "bank_views = 2\n", "bank-tta": "bank_views = 2\nteacher_tta = true\n", "function-matching-jsd": ""}


@pytest.mark.parametrize("mode", list(MODES))
def test_distill_modes_end_to_end(tiny_ensemble, mode, monkeypatch):
    tmp, data = tiny_ensemble
    monkeypatch.chdir(tmp)
    recipe = _student_recipe(tmp, mode.removesuffix("-tta").removesuffix("-jsd"), MODES[mode])
    args = ["distill", str(tmp / "ens"), str(recipe), "--json", "--set", f'data.train="{data}"',
            "--set", f'data.extra_val=["{tmp / "val_corrupt.npz"}"]', "--set", f'name="student-{mode}"',
            "--set", "train.steps_per_epoch=4"]
    if mode in ("function-matching", "bank"):
        args += ["--set", "augment.mixup=0.2"]
    if mode == "function-matching-jsd":  # AugMix + JSD: the teacher labels the clean view
        args += ["--set", "augment.augmix=true", "--set", "train.consistency=12.0"]
    from toolkit import distill

    teachers = []  # the `views` each teacher was loaded with
    real_load = distill.load_ensemble
    monkeypatch.setattr(distill, "load_ensemble", lambda d, views=True: teachers.append(views) or real_load(d, views=views))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    said = " ".join(result.output.split())  # rich wraps long lines
    run = tmp / "outputs" / "runs" / f"student-{mode}"
    assert (run / "best.keras").exists() and (run / "distill.json").exists() and (run / "distill.csv").exists()
    rows = summary["rows"]
    assert set(rows) == {"student", "ensemble", "best member"}
    assert all(0 <= r["acc_val"] <= 1 and 0 <= r["acc_val_corrupt"] <= 1 and r["img_per_s"] > 0 for r in rows.values())
    assert rows["ensemble"]["params"] >= rows["best member"]["params"]  # the selection holds the best member
    for name in ("val", "val_corrupt"):  # the gap is ensemble minus student, per validation set
        assert summary["gap"][name] == pytest.approx(rows["ensemble"][f"acc_{name}"] - rows["student"][f"acc_{name}"])
        for other in ("ensemble", "best member"):  # image by image: the split of disagreements makes the gap
            paired = summary["paired"][name][other]
            assert paired["difference"] == pytest.approx(rows["student"][f"acc_{name}"] - rows[other][f"acc_{name}"])
            assert 0 < paired["p"] <= 1
    assert "the student against each, image by image" in said and "p weighs the draw of these images only" in said
    assert summary["size_ratio"] == pytest.approx(rows["ensemble"]["bytes"] / rows["student"]["bytes"])
    assert "timing student, ensemble, best member on this machine" in said
    # the member the student started from, as resolved (init = "m0" in the function-matching modes)
    started = summary["init_from"]
    assert (started is not None and Path(started).parent.name == "m0") == ('init = "m0"' in MODES[mode])
    assert started is None or Path(started).is_absolute()  # recorded the same from any working folder
    assert f"student: {summary['size_ratio']:.1f}x" in said and " points " in said.split("student: ")[-1]
    if mode == "cached":  # the teacher's targets are computed once and kept with the run
        assert list((run / "checkpoint").glob("teacher_train_*.npz"))
        assert "teacher with its TTA views" in said
        _compare_again_without_timing(tmp, recipe, args, monkeypatch)
        _compare_reads_the_ensemble_where_it_holds_the_images(tmp, recipe, args, monkeypatch)
        _student_against_ensemble_image_by_image(tmp, run, summary["paired"]["val_corrupt"]["ensemble"])
        _resume_refuses_another_teacher(run, args)
    elif mode == "function-matching":
        assert not list((run / "checkpoint").glob("teacher_train_*.npz"))
        assert "teacher without its TTA views" in said
        assert "student backbone starts from member m0" in said
    elif mode == "function-matching-tta":  # the on-line teacher averages the ensemble's views every step
        assert "teacher with its TTA views" in said and "student backbone starts from member m0" in said
    elif mode == "bank":  # two views of every training image, labelled once, kept with the run
        assert len(list((run / "checkpoint").glob("bank_*/view*.npz"))) == 2 and "bank: 2 view(s)" in said
        assert teachers == [False]
    elif mode == "bank-tta":  # each view labelled once by the teacher averaging its test-time views
        with np.load(next((run / "checkpoint").glob("bank_*/view0.npz"))) as f:
            stored, labelled = f["images"].astype(np.float32), f["teacher"]
        np.testing.assert_allclose(labelled, real_load(tmp / "ens", views=True).predict(stored, verbose=0), atol=1e-5)
        assert teachers == [True] and "teacher with its TTA views" in said
    else:
        history = (run / "history.csv").read_text().splitlines()
        assert "jsd" in history[0].split(",")
    # the patience curve: the student's accuracy per epoch on every validation set, the ensemble's beside it
    patience = json.loads((run / "distill.json").read_text())["patience"]
    epochs = len((run / "history.csv").read_text().splitlines()) - 1
    assert patience["epoch"] == list(range(1, epochs + 1)) and (run / "patience.png").exists()
    assert (run / "augmented.png").exists()  # the first batch the student trained on
    for name in ("val", "val_corrupt"):
        assert len(patience["student"][name]) == epochs and all(0 <= v <= 1 for v in patience["student"][name])


def test_the_bank_stores_each_view_with_the_teachers_output_on_it_and_resumes(tiny_ensemble, tmp_path, monkeypatch):
    """Function matching paid up front: the stored output is the teacher's on the stored view (not on
    the original image), each row's label is its own image's (mixed ones stay soft), and an
    interrupted bank redraws only the missing views."""
    from toolkit import train as T
    from toolkit.distill import bank_dataset, build_bank
    from toolkit.ensemble import load_ensemble
    from toolkit.recipe import load_recipe

    tmp, data = tiny_ensemble
    teacher = load_ensemble(tmp / "ens", views=False)
    train = load_dataset(data)
    n = len(train)
    calls = []

    class Counting(T.Predictor):  # counts the images the teacher labels
        def __call__(self, x):
            calls.append(len(x))
            return super().__call__(x)

    monkeypatch.setattr(T, "Predictor", Counting)

    def bank(folder, *sets):
        recipe = load_recipe(_student_recipe(tmp, "bank", "bank_views = 3\n"), sets)
        return build_bank(teacher, train, recipe, folder, tmp / "ens", Console(quiet=True))

    # unmixed: every row's label is the one-hot label of the image the view was drawn from
    views, targets = bank(tmp_path / "plain", "augment.mix_prob=0.0")
    assert views.shape == (3 * n, *train.images.shape[1:]) and views.dtype == np.uint8 and targets.shape == (3 * n, 16)
    label_of = dict(zip(train.index.tolist(), train.labels.tolist(), strict=True))
    for k in range(3):
        with np.load(tmp_path / "plain" / "checkpoint" / next((tmp_path / "plain" / "checkpoint").glob("bank_*")).name
                     / f"view{k}.npz") as f:
            rows = f["index"]
        assert sorted(rows.tolist()) == sorted(label_of)  # every image once per view
        np.testing.assert_array_equal(targets[k * n:(k + 1) * n, 8:].argmax(1), [label_of[i] for i in rows])
        assert targets[k * n:(k + 1) * n, 8:].max(1).min() == 1.0
    np.testing.assert_allclose(teacher.predict(views.astype(np.float32), verbose=0), targets[:, :8], atol=1e-5)
    first, second = (views[k * n:(k + 1) * n][np.argsort(_bank_rows(tmp_path / "plain", k))] for k in (0, 1))
    assert not np.array_equal(first, second)  # the same images, augmented afresh in each view
    assert sum(calls) == 3 * n

    # mixed: soft labels ride along; a lost view is redrawn, the others are read back
    calls.clear()
    views, targets = bank(tmp_path / "mixed", "augment.mixup=0.2", "augment.mix_prob=1.0")
    np.testing.assert_allclose(targets[:, :8].sum(1), 1, atol=1e-4)
    np.testing.assert_allclose(targets[:, 8:].sum(1), 1, atol=1e-4)
    assert (targets[:, 8:].max(1) < 1).any()
    (next((tmp_path / "mixed").glob("checkpoint/bank_*")) / "view1.npz").unlink()  # interrupted while drawing view 1
    again, targets_again = bank(tmp_path / "mixed", "augment.mixup=0.2", "augment.mix_prob=1.0")
    assert sum(calls) == 3 * n + n  # only the missing view is labelled again
    for k in (0, 2):
        np.testing.assert_array_equal(again[k * n:(k + 1) * n], views[k * n:(k + 1) * n])
        np.testing.assert_array_equal(targets_again[k * n:(k + 1) * n], targets[k * n:(k + 1) * n])

    # training batches pair each bank row with its own targets, and a pass covers every row once
    rng = np.random.default_rng(0)
    rows = 96
    stored = rng.integers(0, 256, (rows, 8, 8, 3), dtype=np.uint8)
    stored[:, 0, 0, 0], stored[:, 0, 0, 1] = np.arange(rows) % 256, np.arange(rows) // 256  # row number
    packed = np.repeat(np.arange(rows, dtype=np.float32)[:, None], 16, 1)
    recipe = load_recipe(_student_recipe(tmp, "bank"), ["train.batch_size=32"])
    seen = []
    for x, y in bank_dataset(stored, packed, recipe).take(rows // 32):
        x, y = np.asarray(x), np.asarray(y)
        row = (x[:, 0, 0, 0] + 256 * x[:, 0, 0, 1]).astype(int)
        np.testing.assert_array_equal(x, stored[row].astype(np.float32))
        np.testing.assert_array_equal(y[:, 0], row)
        seen += row.tolist()
    assert sorted(seen) == list(range(rows))


def _bank_rows(run: Path, k: int) -> np.ndarray:
    with np.load(next((run / "checkpoint").glob("bank_*")) / f"view{k}.npz") as f:
        return f["index"]


def test_view_free_teacher_is_the_weighted_vote_on_one_view(tiny_ensemble):
    """What function matching runs each step: every member on the input alone, tempered and weighted."""
    from scipy.special import softmax
    from test_tta import lopsided_image

    from toolkit.ensemble import ensemble_components, load_ensemble, resolve_member
    from toolkit.evaluate import load_model

    tmp, _ = tiny_ensemble
    images = np.stack([lopsided_image(), *make_images(7, seed=9)[0].astype("float32")])
    expected = np.zeros((len(images), 8))
    # each member with the temperature fitted to its single-view predictions, not to its TTA average
    single = json.loads((tmp / "ens" / "ensemble.json").read_text())["single_view_temperatures"]
    for c in ensemble_components(tmp / "ens"):
        probs = load_model(resolve_member(tmp / "ens", c["member_file"])).predict(images, verbose=0)
        expected += c["weight"] * softmax(np.log(np.maximum(probs, EPS)) / single[c["member"]], axis=-1)
    teacher = load_ensemble(tmp / "ens", views=False)
    np.testing.assert_allclose(teacher.predict(images, verbose=0), expected, atol=1e-5)
    assert not [layer for layer in teacher.layers if isinstance(layer, ImageView)]


def test_the_ensembles_cached_predictions_are_what_its_models_predict(tiny_ensemble, tmp_path):
    """distill reads the teacher and the best member from the predictions the ensemble was selected with
    (minutes of a teacher with views saved on a CPU): the same figures as the models, on exactly the
    validation files the ensemble holds, and nothing for any other images."""
    from toolkit.ensemble import (
        cached_predictions,
        ensemble_components,
        load_ensemble,
        resolve_member,
        teacher_components,
    )
    from toolkit.evaluate import load_model
    from toolkit.tta import merge, predict_views

    tmp, _ = tiny_ensemble
    ens, data = tmp / "ens", load_dataset(tmp / "val.npz")
    images = data.images.astype("float32")
    for views in (True, False):  # the teacher as saved, and the view-free one function matching runs
        cached = cached_predictions(ens, data, teacher_components(ens, views=views))
        np.testing.assert_allclose(cached, load_ensemble(ens, views=views).predict(images, verbose=0), atol=1e-4)
    member = resolve_member(ens, ensemble_components(ens)[0]["member_file"])
    flips = {"member_file": str(member.resolve()), "view_list": ["id", "flip", "rot180"], "merge": "mean",
             "weight": 1.0}
    expected = merge(predict_views(load_model(member), data.images, flips["view_list"]), "mean")
    np.testing.assert_allclose(cached_predictions(ens, data, [flips]), expected, atol=1e-5)

    assert cached_predictions(ens, data.subset(np.arange(40)), [flips]) is None  # other images
    relabelled = load_dataset(save_dataset(tmp_path / "v.npz", data.images, (data.labels + 1) % 8))
    assert cached_predictions(ens, relabelled, [flips]) is None
    assert cached_predictions(ens, data, [{**flips, "view_list": ["rot90"]}]) is None  # a view never predicted


def test_the_teacher_on_a_validation_file_of_its_ensemble_is_read_not_run(tiny_ensemble, tmp_path):
    from toolkit.distill import teacher_probs
    from toolkit.ensemble import load_ensemble, teacher_components

    def never(*args, **kwargs):
        raise AssertionError("the teacher ran")

    tmp, _ = tiny_ensemble
    data = load_dataset(tmp / "val.npz")
    (tmp_path / "checkpoint").mkdir()
    quiet = Console(quiet=True)
    probs = teacher_probs(never, data, tmp_path, tmp / "ens", "val", quiet, teacher_components(tmp / "ens", views=False))
    expected = load_ensemble(tmp / "ens", views=False).predict(data.images.astype("float32"), verbose=0)
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    assert list((tmp_path / "checkpoint").glob("teacher_val_*.npz"))  # kept with the run, as a prediction is
    with pytest.raises(AssertionError, match="the teacher ran"):  # images the ensemble never saw: it runs
        teacher_probs(never, data.subset(np.arange(8)), tmp_path, tmp / "ens", "other", quiet, [])


def test_student_starts_from_a_member_backbone(tiny_ensemble):
    import keras

    from toolkit.backbones import build_classifier
    from toolkit.distill import init_from_member
    from toolkit.evaluate import load_model
    from toolkit.recipe import ModelConfig

    tmp, _ = tiny_ensemble
    keras.utils.set_random_seed(0)
    student = build_classifier(ModelConfig(backbone="tiny-cnn", weights="none", head="linear", input_size=64), 8)
    head_before = student.get_layer("logits").get_weights()
    init_from_member(student, tmp / "ens", "m0", Console(quiet=True))
    member = load_model(tmp / "m0")
    for got, want in zip(student.get_layer("backbone").get_weights(), member.get_layer("backbone").get_weights(),
                         strict=True):
        np.testing.assert_array_equal(got, want)  # every weight, BatchNorm statistics included
    for got, before in zip(student.get_layer("logits").get_weights(), head_before, strict=True):
        np.testing.assert_array_equal(got, before)  # the head is the student's own
    with pytest.raises(CellfuseError, match="no member named 'm9'"):
        init_from_member(student, tmp / "ens", "m9", Console(quiet=True))
    with pytest.raises(CellfuseError, match="not a cellfuse classifier"):
        init_from_member(student, tmp / "ens", "m1", Console(quiet=True))
    other = build_classifier(ModelConfig(backbone="mobilenet-0.25", weights="none", head="linear"), 8)
    with pytest.raises(CellfuseError, match="not the student's"):
        init_from_member(other, tmp / "ens", "m0", Console(quiet=True))


def test_matching_member_is_the_most_accurate_member_with_the_students_backbone(tiny_ensemble):
    """init = "matching-member" skips members the student cannot start from (m1 is no cellfuse classifier)
    and, when none fits, leaves the student as [model] weights made it."""
    import json

    import keras

    from toolkit.backbones import build_classifier
    from toolkit.distill import MATCHING_MEMBER, init_from_member, matching_member
    from toolkit.ensemble import ranked_members
    from toolkit.recipe import ModelConfig

    tmp, _ = tiny_ensemble
    info = json.loads((tmp / "ens" / "metrics.json").read_text())
    accuracy = {m: info["rows"][f"{m} as saved"][info["steering_data"]]["accuracy"] for m in ("m0", "m1")}
    assert ranked_members(tmp / "ens") == sorted(accuracy, key=lambda m: -accuracy[m])
    keras.utils.set_random_seed(0)
    student = build_classifier(ModelConfig(backbone="tiny-cnn", weights="none", head="linear", input_size=64), 8)
    assert matching_member(student, tmp / "ens") == "m0"
    init_from_member(student, tmp / "ens", MATCHING_MEMBER, Console(quiet=True))
    member = keras.saving.load_model(tmp / "m0" / "best.keras")
    for got, want in zip(student.get_layer("backbone").get_weights(), member.get_layer("backbone").get_weights(),
                         strict=True):
        np.testing.assert_array_equal(got, want)
    other = build_classifier(ModelConfig(backbone="mobilenet-0.25", weights="none", head="linear"), 8)
    before = other.get_weights()
    out = Console(record=True, width=200)
    init_from_member(other, tmp / "ens", MATCHING_MEMBER, out)
    assert "no member of the ensemble has the student's backbone (or begins with it): it starts from [model] weights" in out.export_text()
    for got, was in zip(other.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, was)


def _student_against_ensemble_image_by_image(tmp: Path, run: Path, paired: dict) -> None:
    """distill's split of disagreements, recomputed from the saved student (with the ensemble's heaviest
    views, averaged) and the saved ensemble on the same corrupted images."""
    from toolkit.runs import load_model
    from toolkit.tta import merge, predict_views

    data = load_dataset(tmp / "val_corrupt.npz")
    components = json.loads((tmp / "ens" / "ensemble.json").read_text())["components"]
    views = max((c["view_list"] for c in components), key=len)
    student = merge(predict_views(load_model(run / "best.keras"), data.images, views), "mean").argmax(1) == data.labels
    ensemble = load_model(tmp / "ens").predict(data.images.astype(np.float32), verbose=0).argmax(1) == data.labels
    assert (paired["a_only"], paired["b_only"]) == (int((student & ~ensemble).sum()), int((ensemble & ~student).sum()))


def _resume_refuses_another_teacher(run: Path, args: list[str]) -> None:
    """A student made from one ensemble is never continued or compared against another."""
    record = run / "teacher.json"
    mine = json.loads(record.read_text())
    assert mine["key"] and Path(mine["ensemble"]).name == "ens"
    record.write_text(json.dumps({**mine, "key": "0" * 16}))  # as if distilled from an ensemble since rebuilt
    try:
        result = CliRunner().invoke(main, [a for a in args if a != "--json"] + ["--resume"])
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and "holds another ensemble" in said and "--force to distil it again" in said, said
    finally:
        record.write_text(json.dumps(mine))


def _compare_again_without_timing(tmp: Path, recipe: Path, args: list[str], monkeypatch) -> None:
    """timing=False (the CLI's --no-timing) leaves the img/s column empty and never times a model."""
    from toolkit import distill

    monkeypatch.setattr(distill, "img_per_s", lambda *a, **k: pytest.fail("timed although timing=False"))
    overrides = [value for flag, value in zip(args, args[1:], strict=False) if flag == "--set"]
    out = io.StringIO()
    result = distill.distill_recipe(tmp / "ens", recipe, overrides, resume=True, timing=False,
                                    console=Console(file=out, width=200))
    assert result["speed_ratio"] is None and all(r["img_per_s"] is None for r in result["rows"].values())
    assert "faster" not in out.getvalue() and "slower" not in out.getvalue() and "smaller" in out.getvalue()


def _compare_reads_the_ensemble_where_it_holds_the_images(tmp: Path, recipe: Path, args: list[str],
                                                         monkeypatch) -> None:
    """On a validation set the ensemble was selected on (here val.npz, as a pipeline's split is), the
    comparison reads the ensemble and the best member from its predictions, and says so; on others
    (val_corrupt.npz) it runs them. Either way the ensemble's figure is its saved model's."""
    from toolkit import distill
    from toolkit.batches import Split
    from toolkit.runs import load_model

    sets = {name: load_dataset(tmp / f"{name}.npz") for name in ("val", "val_corrupt")}
    monkeypatch.setattr(distill.T, "load_split", lambda recipe, console: Split(sets["val"], sets))
    overrides = [value for flag, value in zip(args, args[1:], strict=False) if flag == "--set"]
    out = io.StringIO()
    result = distill.distill_recipe(tmp / "ens", recipe, overrides, resume=True, timing=False,
                                    console=Console(file=out, width=300))
    assert result["from_ensemble_cache"] == ["ensemble on val", "best member on val"]
    assert "from the predictions" in out.getvalue() and "ensemble on val, best member on val" in out.getvalue()
    ensemble = load_model(tmp / "ens")
    for name, data in sets.items():
        accuracy = (ensemble.predict(data.images.astype(np.float32), verbose=0).argmax(1) == data.labels).mean()
        assert result["rows"]["ensemble"][f"acc_{name}"] == pytest.approx(accuracy)


def test_student_recipe_needs_distill_section(tiny_ensemble):
    tmp, _ = tiny_ensemble
    result = CliRunner().invoke(main, ["distill", str(tmp / "ens"), str(ROOT / "recipes" / "tiny.toml")])
    assert result.exit_code == 2 and "[distill] section; add one, or give it with --set distill.mode=cached" in " ".join(result.output.split())
    for mode in ("cached", "function-matching"):  # once a crash (cached) or silently ignored (FM)
        result = CliRunner().invoke(main, ["distill", str(tmp / "ens"), str(_student_recipe(tmp, mode)),
                                           "--set", 'train.class_weights="balanced"'])
        assert result.exit_code == 2 and "class_weights" in result.output and "Traceback" not in result.output
    for sets, words in [(["train.consistency=12.0", "augment.augmix=true"], "three views"),
                        (["distill.bank_views=0"], "bank_views = 0")]:
        args = ["distill", str(tmp / "ens"), str(_student_recipe(tmp, "bank"))]
        result = CliRunner().invoke(main, args + [a for s in sets for a in ("--set", s)])
        assert result.exit_code == 2 and words in " ".join(result.output.split()), result.output


def test_a_student_holding_out_other_rows_than_its_teacher_is_refused(tmp_path):
    from toolkit.data import Dataset
    from toolkit.distill import check_student_split
    from toolkit.recipe import load_recipe
    from toolkit.train import Split

    images, labels = make_images(8)
    recipe = load_recipe(ROOT / "recipes" / "tiny.toml")

    def split_of(rows):
        return Split(None, {"val": Dataset(images, labels, "x.npz", np.asarray(rows))})

    (tmp_path / "ensemble.json").write_text(json.dumps({"components": [], "val_index": list(range(8))}))
    check_student_split(split_of(range(8)), tmp_path, recipe)  # the same rows: fine
    with pytest.raises(CellfuseError, match="they held out 8; 3 of theirs would be student training rows"):
        check_student_split(split_of(range(3, 11)), tmp_path, recipe)


def _ensemble_split_at(tmp: Path, data: Path, fraction: float) -> Path:
    """An ensemble folder whose one member held out `fraction` of `data` (split seed 0)."""
    from toolkit.data import load_dataset, stratified_split

    ens, member = tmp / "ens", tmp / "runs" / "m0"
    ens.mkdir()
    stand_in_model(ens / "ensemble.keras")  # the command checks the files are there
    member.mkdir(parents=True)
    stand_in_model(member / "best.keras")
    (member / "recipe.toml").write_text(f'name = "m0"\n[data]\ntrain = "{data}"\nval_fraction = {fraction}\n')
    rows = stratified_split(load_dataset(data).labels, fraction, 0)[1]
    (ens / "ensemble.json").write_text(json.dumps({
        "components": [{"member": "m0", "member_file": "../runs/m0/best.keras", "weight": 1.0}],
        "val_index": rows.tolist()}))
    return ens


def test_a_split_mismatch_names_both_fractions_and_the_fix_before_any_data_check(tmp_path, monkeypatch):
    """It once came after two boxed 'run cellfuse clean first' warnings (the members' validation files
    duplicate student training rows) and named neither fraction."""
    from toolkit import train

    images, labels = make_images(80)
    data = save_dataset(tmp_path / "toy.npz", images, labels)
    ens = _ensemble_split_at(tmp_path, data, 0.15)
    recipe = _student_recipe(tmp_path, "cached")
    monkeypatch.setattr(train, "start_run", lambda *a, **k: pytest.fail("the split is checked before start_run"))
    result = CliRunner().invoke(main, ["distill", str(ens), str(recipe), "--set", f'data.train="{data}"',
                                       "--set", "data.val_fraction=0.25"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in said and "WARNING" not in said, said
    assert "data.val_fraction = 0.25 for the student, 0.15 for the members" in said
    assert "--set data.val_fraction=0.15`" in said and "data.train" not in said.split("rows):")[1]
    # the same split passes the early check (and goes on to start_run)
    from toolkit.distill import check_student_split_early
    from toolkit.recipe import load_recipe

    check_student_split_early(load_recipe(recipe, [f'data.train="{data}"', "data.val_fraction=0.15"]), ens)


def test_closing_line_reads_each_ratio_the_way_it_points():
    from toolkit.distill import closing_line

    line = closing_line({"size_ratio": 21.43, "speed_ratio": 3.5, "gap": {"val": 0.019}})
    assert line == "21.4x smaller, 3.5x faster, 1.9 points behind on val"
    line = closing_line({"size_ratio": 0.5, "speed_ratio": 0.8, "gap": {"val": -0.12, "val_corrupt": 0.0001}})
    assert line == "2.0x larger, 1.2x slower, 12.0 points ahead on val, level with it on val_corrupt"
    assert "faster" not in closing_line({"size_ratio": 2.0, "speed_ratio": None, "gap": {"val": 0.0}})


class _SleepyModel:
    """predict_on_batch takes `seconds`: a model of known speed."""

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, 0

    def __call__(self, x):
        import time

        self.calls += 1
        time.sleep(self.seconds)
        return np.zeros((len(x), 8), np.float32)


def test_timing_takes_turns_within_a_stated_budget_and_shows_progress():
    """It once ran 3 rounds x 256 images x 8 views per model (~4 minutes) and printed nothing."""
    import io

    from toolkit.data import Dataset
    from toolkit.distill import img_per_s

    images, labels = make_images(16)
    models = {"student": _SleepyModel(0.01), "ensemble": _SleepyModel(0.04)}
    out = io.StringIO()
    speeds = img_per_s(models, Dataset(images, labels, "x.npz", np.arange(16)), Console(file=out, width=200),
                       budget_s=0.2, batch=32)
    assert "timing student, ensemble on this machine: about 0 s each" in out.getvalue()
    for model in models.values():  # warm-up + passes until 0.2 s spent: bounded by the budget
        assert 3 <= model.calls <= 1 + 0.2 / model.seconds + 1
    assert speeds["student"] <= 32 / 0.01 and speeds["ensemble"] <= 32 / 0.04
    assert speeds["student"] / speeds["ensemble"] == pytest.approx(4, rel=0.35)


def test_the_teacher_term_is_scaled_across_replicas_as_keras_scales_its_losses():
    """Keras divides each replica's loss by the replica count before summing gradients; the Distiller
    adds the teacher's KL as returned, so unscaled it would weigh N times more on N GPUs."""
    import keras
    import tensorflow as tf

    from toolkit.distill import _kl_at_temperature, _probability_kl

    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(cpus) >= 2, "conftest makes two logical CPUs"
    teacher = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    student = np.array([[0.5, 0.3, 0.2], [0.3, 0.3, 0.4]], np.float32)
    labels = np.eye(3, dtype=np.float32)[[0, 2]]
    kl_alone = float(np.mean(_kl_at_temperature(teacher, student, 2.0)))
    ce_alone = float(keras.losses.CategoricalCrossentropy()(labels, student))
    strategy = tf.distribute.MirroredStrategy(cpus[:2])
    with strategy.scope():
        kl, ce = _probability_kl(2.0), keras.losses.CategoricalCrossentropy()
    kl_out, ce_out = strategy.run(lambda: (kl.compute_loss(teacher, student), ce(labels, student)))
    for value in strategy.experimental_local_results(kl_out):
        assert float(value) == pytest.approx(kl_alone / 2, rel=1e-5)
    for value in strategy.experimental_local_results(ce_out):  # keras' own loss, halved alike
        assert float(value) == pytest.approx(ce_alone / 2, rel=1e-5)


def test_a_fresh_student_passes_the_initial_loss_check(shared):
    """Every real distill warned 'initial loss 3.545 is far from ln(8)'. distill checks plain cross-entropy
    of the untrained student (train.check_initial_loss), so the warning was about the student's head."""
    import io

    import keras

    from toolkit import train
    from toolkit.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "student-cpu.toml")
    val = load_dataset(shared / "data" / "train.npz")
    val = val.subset(np.random.default_rng(0).permutation(len(val))[:128])
    keras.utils.set_random_seed(0)
    out = io.StringIO()
    loss = train.check_initial_loss(train.build_model(recipe, 8), val, Console(file=out, width=200))
    assert "WARNING" not in out.getvalue() and abs(loss - np.log(8)) < 0.5 * np.log(8), out.getvalue()


def test_seeds_distill_one_student_per_seed_and_end_with_their_spread(tiny_ensemble, monkeypatch):
    """--seeds 1,2: two students named <name>-seed<S> with their train.seed; the closing table holds each
    seed's figures and their mean and spread. Its checkpoint picked on val_corrupt (train.monitor), each
    also carries that set's figure cross-fitted."""
    from toolkit.recipe import load_recipe

    tmp, data = tiny_ensemble
    monkeypatch.chdir(tmp)
    recipe = _student_recipe(tmp, "cached")
    args = ["distill", str(tmp / "ens"), str(recipe), "--json", "--no-timing", "--seeds", "1,2",
            "--set", f'data.train="{data}"', "--set", f'data.extra_val=["{tmp / "val_corrupt.npz"}"]',
            "--set", 'name="seeded"', "--set", "train.steps_per_epoch=2", "--set", 'train.monitor="val_corrupt_accuracy"']
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output.strip().splitlines()[-1])) == 2
    assert result.output.count("val_corrupt picked the student's checkpoint") == 2
    runs = [tmp / "outputs" / "runs" / f"seeded-seed{seed}" for seed in (1, 2)]
    assert [load_recipe(run / "recipe.toml").train.seed for run in runs] == [1, 2]
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    said = result.output.split("over seeds 1, 2")[-1]
    figures = {"val": [s["metrics"]["val"]["accuracy"] for s in summaries],  # the picking set: not chosen on
               "val_corrupt (cross-fitted)": [s["steered"]["cross_fitted_accuracy"] for s in summaries]}
    for data_set, values in figures.items():
        row = next(line for line in said.splitlines() if f" {data_set} " in line)
        assert [f"{v:.4f}" for v in (*values, np.mean(values), max(values) - min(values))] == \
            [cell.strip() for cell in row.split("│")[3:7]]
    for summary in summaries:
        steered = summary["steered"]
        assert steered["set"] == "val_corrupt" and steered["accuracy"] == summary["metrics"]["val_corrupt"]["accuracy"]
        assert 0 <= steered["cross_fitted_accuracy"] <= 1


@pytest.mark.parametrize("seeds, message", [("2,2", "distinct"), ("2,x", "whole numbers"), ("-1", "from 0 to"),
                                           (str(2**32), "from 0 to")])
def test_bad_seed_lists_are_refused_before_anything_loads(seeds, message):
    result = CliRunner().invoke(main, ["distill", "nowhere", "tiny", "--seeds", seeds])
    assert result.exit_code == 2 and message in result.output


def test_seeds_refuse_a_seed_set_by_hand(tiny_ensemble):
    tmp, _ = tiny_ensemble
    result = CliRunner().invoke(main, ["distill", str(tmp / "ens"), str(_student_recipe(tmp, "cached")),
                                       "--seeds", "1,2", "--set", "train.seed=7"])
    assert result.exit_code == 2 and "drop --set train.seed" in result.output
