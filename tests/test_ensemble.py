"""Ensemble selection on synthetic predictions, temperature fitting, and the command end to end."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_images, stand_in_model
from scipy.special import softmax
from test_tta import tiny_model

from toolkit.data import load_dataset, save_dataset
from toolkit.ensemble import (
    Candidate,
    _cache_key,
    _fit,
    _merged,
    fit_temperature,
    greedy_select,
    load_ensemble,
    resolve_member,
    temperature_scale,
)
from toolkit.errors import CellfuseError
from toolkit.report import nll
from toolkit.tta import merge

N, C = 600, 8


def noisy_member(labels, accuracy, seed, confidence=4.0):
    """Probabilities right on about `accuracy` of the rows, wrong at random elsewhere."""
    rng = np.random.default_rng(seed)
    predicted = np.where(rng.random(len(labels)) < accuracy, labels, rng.integers(0, C, len(labels)))
    logits = rng.normal(0, 1, (len(labels), C))
    logits[np.arange(len(labels)), predicted] += confidence
    return softmax(logits, axis=-1)


@pytest.fixture
def labels():
    return np.random.default_rng(0).integers(0, C, N)


def accuracy(probs, labels):
    return (probs.argmax(-1) == labels).mean()


def test_a_useless_member_gets_no_weight(labels):
    good = noisy_member(labels, 0.85, seed=1)
    useless = np.random.default_rng(2).dirichlet(np.ones(C), N)
    assert accuracy(useless, labels) < 0.2
    weights = greedy_select([useless, good], labels, rounds=10)
    np.testing.assert_allclose(weights, [0.0, 1.0])


def test_members_with_independent_errors_are_combined_and_beat_the_best(labels):
    members = np.stack([noisy_member(labels, 0.7, seed=s) for s in range(3)])
    weights = greedy_select(members, labels, rounds=10)
    assert weights.sum() == pytest.approx(1) and (weights > 0).sum() >= 2
    combined = np.tensordot(weights, members, axes=1)
    assert accuracy(combined, labels) > max(accuracy(m, labels) for m in members) + 0.03


def test_selection_never_scores_below_its_best_candidate_and_one_round_picks_it(labels):
    members = np.stack([noisy_member(labels, a, seed=s) for s, a in enumerate((0.5, 0.8, 0.6))])
    np.testing.assert_array_equal(greedy_select(members, labels, rounds=1), [0, 1, 0])
    weights = greedy_select(members, labels, rounds=7)
    assert accuracy(np.tensordot(weights, members, axes=1), labels) >= accuracy(members[1], labels)
    assert np.allclose(weights * 7, np.round(weights * 7))  # picks, with replacement, out of 7 at most


def test_a_view_that_hurts_is_not_selected(labels):
    good = noisy_member(labels, 0.8, seed=3)
    wrong = np.full((N, C), 0.02)
    wrong[np.arange(N), (labels + 1) % C] = 1 - 0.02 * (C - 1)  # a view under which every cell looks like the next class
    preds = {("m", "val", "id"): good, ("m", "val", "rot90"): noisy_member(labels, 0.8, seed=4),
             ("m", "val", "bright-200"): wrong}
    candidates = [Candidate("m", "none", ("id",), "mean"), Candidate("m", "turns", ("id", "rot90"), "mean"),
                  Candidate("m", "dark", ("id", "bright-200"), "mean"),
                  Candidate("m", "dark-geometric", ("id", "rot90", "bright-200"), "geometric")]
    merged = _merged(preds, candidates, "val")
    np.testing.assert_allclose(merged[1], merge(np.stack([good, preds["m", "val", "rot90"]])))
    _, weights, _ = _fit(merged, labels, rounds=10)
    assert weights[1] > 0 and weights[2] == weights[3] == 0  # good views help; corrupting ones never


def test_temperature_softens_overconfident_and_sharpens_underconfident_probabilities(labels):
    rng = np.random.default_rng(7)
    true_logits = rng.normal(0, 2, (4000, C))
    sampled = np.array([rng.choice(C, p=p) for p in softmax(true_logits, axis=-1)])
    for factor in (3.0, 0.5):
        probs = softmax(true_logits * factor, axis=-1)
        t = fit_temperature(probs, sampled)
        assert t == pytest.approx(factor, rel=0.15)
        assert nll(sampled, temperature_scale(probs, t)) < nll(sampled, probs) - 0.05
    assert fit_temperature(true_logits * 3, sampled) == pytest.approx(fit_temperature(
        softmax(true_logits * 3, axis=-1), sampled), rel=1e-3)  # logits or probabilities alike


# ---------------------------------------------------------------- the command end to end


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two tiny fitted members (different seeds), a clean and a corrupted validation file."""
    root = tmp_path_factory.mktemp("ens")
    images, labels = make_images(256, seed=1)
    for name, seed in (("runA", 0), ("runB", 1)):
        (root / name).mkdir()
        tiny_model(seed, images, labels, epochs=8).save(root / name / "best.keras")
    val_images, val_labels = make_images(48, seed=2)
    save_dataset(root / "val.npz", val_images, val_labels)
    noise = np.random.default_rng(3).normal(0, 25, val_images.shape)
    save_dataset(root / "val_corrupt.npz", np.clip(val_images + noise, 0, 255), val_labels)
    return root


def run_ensemble(root, *extra):
    from toolkit.cli import main

    args = ["ensemble", str(root / "runA"), str(root / "runB"), "--val", str(root / "val.npz"),
            "--val", str(root / "val_corrupt.npz"), "--out", str(root / "ens"), "--views", "flips",
            "--rounds", "5", "--json", *extra]
    return CliRunner().invoke(main, args)


@pytest.fixture(scope="module")
def built(workspace):
    result = run_ensemble(workspace)
    assert result.exit_code == 0, result.output
    return workspace / "ens", json.loads(result.output.strip().splitlines()[-1])


def test_ensemble_command_writes_its_files_and_beats_or_ties_the_best_member(built):
    out, figures = built
    for name in ("ensemble.json", "metrics.json", "ensemble.keras", "predictions.npz"):
        assert (out / name).is_file()
    spec = json.loads((out / "ensemble.json").read_text())
    assert sum(spec["weights"]) == pytest.approx(1) and len(spec["temperatures"]) == len(spec["views"])
    assert set(spec["members"]) <= {"runA", "runB"} and set(spec["views"]) <= {"none", "flips"}
    assert figures["ensemble_accuracy"] >= figures["best_member_accuracy"]
    rows = figures["rows"]
    for row in ("runA as saved", "runA none", "runA flips", "runB flips", "ensemble", "ensemble, 2-fold"):
        assert row in rows
    assert set(rows["ensemble"]) >= {figures["steering_data"], str(out.parent / "val.npz")}
    assert json.loads((out / "metrics.json").read_text())["ensemble_accuracy"] == figures["ensemble_accuracy"]
    # the selection's gain on images it did not see, image by image: the split of disagreements makes it
    cross = figures["cross_fitted"]
    steering = len(load_dataset(figures["steering_data"]))
    assert cross["paired"]["difference"] == pytest.approx(cross["ensemble_accuracy"] - cross["best_single_accuracy"])
    assert 0 <= cross["paired"]["a_only"] + cross["paired"]["b_only"] <= steering and 0 < cross["paired"]["p"] <= 1


def test_saved_ensemble_reproduces_the_cached_predictions(built):
    out, _ = built
    spec = json.loads((out / "ensemble.json").read_text())
    data = load_dataset(out.parent / "val_corrupt.npz")
    with np.load(out / "predictions.npz") as cache:
        expected = sum(c["weight"] * temperature_scale(merge(np.stack([
            cache[_cache_key(resolve_member(out, c["member_file"]), data.path, v)] for v in c["view_list"]]), c["merge"]),
            c["temperature"]) for c in spec["components"])
    got = load_ensemble(out).predict(data.images[:8].astype(np.float32), verbose=0)
    np.testing.assert_allclose(got, expected[:8], atol=1e-5)


def test_ensemble_refuses_to_clobber_and_reuses_its_cache_with_force(built, workspace, monkeypatch):
    import toolkit.ensemble

    result = run_ensemble(workspace)
    assert result.exit_code == 2 and "--force" in result.output

    def no_prediction(*args, **kwargs):
        raise AssertionError("cached predictions were recomputed")

    monkeypatch.setattr(toolkit.ensemble, "predict_views", no_prediction)
    result = run_ensemble(workspace, "--force")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["selected"] == built[1]["selected"]


def test_ensemble_rejects_bad_input_in_one_line(workspace, tmp_path):
    from toolkit.cli import main

    base = ["ensemble", str(workspace / "runA"), "--val", str(workspace / "val.npz")]
    cases = [(["--out", str(tmp_path / "a"), "--views", "d5"], "d5"),
             (["--out", str(tmp_path / "b"), "--rounds", "0"], "rounds"),
             ([str(tmp_path / "nothing"), "--out", str(tmp_path / "c")], "nothing")]
    for extra, word in cases:
        result = CliRunner().invoke(main, base + extra)
        assert result.exit_code == 2 and word in result.output and "Traceback" not in result.output


def _with_split(run, index):
    np.savez(run / "probs_val.npz", probs=np.full((len(index), 8), 1 / 8), labels=np.zeros(len(index)),
             index=np.asarray(index))


def test_members_with_different_validation_splits_are_refused(workspace, tmp_path):
    """A member that trained on another member's validation rows would flatter every figure."""
    import shutil

    from toolkit.cli import main

    for name in ("runA", "runB"):
        shutil.copytree(workspace / name, tmp_path / name)
    _with_split(tmp_path / "runA", range(0, 48))
    _with_split(tmp_path / "runB", range(10, 58))
    args = ["ensemble", str(tmp_path / "runA"), str(tmp_path / "runB"), "--val", str(workspace / "val.npz"),
            "--views", "none", "--rounds", "2"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "e1")])
    assert result.exit_code != 0 and "different validation splits" in result.output
    assert "10 of runA's 48" in " ".join(result.output.split())
    # the same split, but a --val file whose rows (its `index`) were training rows for the members
    _with_split(tmp_path / "runB", range(0, 48))
    images, labels = make_images(48, seed=2)
    save_dataset(tmp_path / "val_other.npz", images, labels, index=np.arange(100, 148))
    result = CliRunner().invoke(main, [*args[:3], "--val", str(tmp_path / "val_other.npz"), *args[5:],
                                       "--out", str(tmp_path / "e2")])
    assert result.exit_code != 0 and "were training rows" in " ".join(result.output.split())
    save_dataset(tmp_path / "val_same.npz", images, labels, index=np.arange(48))
    result = CliRunner().invoke(main, [*args[:3], "--val", str(tmp_path / "val_same.npz"), *args[5:],
                                       "--out", str(tmp_path / "e3")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e3" / "ensemble.json").read_text())["val_index"] == list(range(48))
    # a members' training file without indices, copied under another name: refused before any folder
    save_dataset(tmp_path / "train.npz", *make_images(64, seed=5))
    (tmp_path / "runA" / "recipe.toml").write_text(f'[data]\ntrain = "{tmp_path / "train.npz"}"\n')
    shutil.copy(tmp_path / "train.npz", tmp_path / "looks_new.npz")
    result = CliRunner().invoke(main, [*args[:3], "--val", str(tmp_path / "looks_new.npz"), *args[5:],
                                       "--out", str(tmp_path / "e4")])
    assert result.exit_code == 2 and "looks_new.npz: is member runA's training file" in result.output
    assert not (tmp_path / "e4").exists()


def test_runs_and_ensemble_moved_together_still_work(built, tmp_path):
    """Run folders trained elsewhere combine: ensemble.json names members relative to itself."""
    import shutil

    from toolkit.ensemble import member_file

    out, _ = built
    root = tmp_path / "elsewhere"
    for name in ("runA", "runB", "ens"):
        shutil.copytree(out.parent / name, root / name)
    spec = json.loads((root / "ens" / "ensemble.json").read_text())
    assert all(not c["member_file"].startswith("/") for c in spec["components"])
    images = make_images(4, seed=8)[0].astype(np.float32)
    teacher = load_ensemble(root / "ens", views=False)  # rebuilt from the moved members
    assert teacher.predict(images, verbose=0).shape == (4, 8)
    assert member_file(root / "ens", "best-member").resolve().parent.parent == root.resolve()


def test_an_ensembles_member_lists_refuse_a_metrics_file_without_what_they_read(tmp_path):
    from toolkit.ensemble import member_file, ranked_members

    (tmp_path / "metrics.json").write_text(json.dumps({"members": {"m0": "m0.keras"}}))
    stand_in_model(tmp_path / "m0.keras")
    with pytest.raises(CellfuseError, match=r"metrics.json: no rows, steering_data \(written by an older cellfuse"):
        ranked_members(tmp_path)
    assert member_file(tmp_path, "m0").resolve() == (tmp_path / "m0.keras").resolve()  # a name needs only the members
    with pytest.raises(CellfuseError, match="metrics.json names no best member"):
        member_file(tmp_path, "best-member")
    (tmp_path / "metrics.json").write_text("{")
    with pytest.raises(CellfuseError, match="cannot read the ensemble's members"):
        member_file(tmp_path, "m0")


def test_the_views_a_student_is_compared_with_are_those_carrying_most_weight(tmp_path):
    """A real selection: one member single-view 0.4, with D4 0.2 and its blend with D4 0.4. The heaviest
    single component was single-view, so distill compared (and the pipeline submitted) the student without
    the D4 views that carry 0.6 of the weight."""
    from toolkit.ensemble import heaviest_views

    d4 = ["id", "rot90", "rot180", "rot270", "flip", "flip_rot90", "flip_rot180", "flip_rot270"]
    parts = [("m", "none", ["id"], 0.4), ("m", "d4", d4, 0.2), ("m-wise", "d4", d4, 0.4)]
    (tmp_path / "ensemble.json").write_text(json.dumps({"components": [
        {"member": m, "views": v, "view_list": vl, "merge": "mean", "weight": w} for m, v, vl, w in parts]}))
    assert heaviest_views(tmp_path) == {"views": "d4", "view_list": d4, "merge": "mean"}
    parts[2] = ("m-wise", "none", ["id"], 0.4)  # now single-view carries 0.8
    (tmp_path / "ensemble.json").write_text(json.dumps({"components": [
        {"member": m, "views": v, "view_list": vl, "merge": "mean", "weight": w} for m, v, vl, w in parts]}))
    assert heaviest_views(tmp_path)["views"] == "none"
