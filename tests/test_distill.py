"""Distillation: the loss against a hand computation, both teacher modes end to end on tiny data."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import make_images
from tests.test_tta import tiny_model
from toolkit.cli import main
from toolkit.data import save_dataset
from toolkit.distill import distillation_loss

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


@pytest.fixture(scope="module")
def tiny_ensemble(tmp_path_factory):
    """Two small fitted members combined by `cellfuse ensemble` on toy data."""
    tmp = tmp_path_factory.mktemp("distill")
    images, labels = make_images(160, seed=5)
    data = save_dataset(tmp / "toy.npz", images, labels)
    val_images, val_labels = make_images(48, seed=6)
    val = save_dataset(tmp / "val.npz", val_images, val_labels)
    for seed in (0, 1):
        (tmp / f"m{seed}").mkdir()
        tiny_model(seed, images.astype("float32"), labels, epochs=8).save(tmp / f"m{seed}" / "best.keras")
    result = CliRunner().invoke(main, ["ensemble", str(tmp / "m0"), str(tmp / "m1"), "--val", str(val),
                                       "--out", str(tmp / "ens"), "--views", "none,flips"])
    assert result.exit_code == 0, result.output
    return tmp, data


@pytest.mark.parametrize("mode", ["cached", "function-matching"])
def test_distill_modes_end_to_end(tiny_ensemble, mode, monkeypatch):
    tmp, data = tiny_ensemble
    monkeypatch.chdir(tmp)
    recipe = tmp / "student.toml"
    recipe.write_text((ROOT / "recipes" / "tiny.toml").read_text() + f'\n[distill]\nmode = "{mode}"\n'
                      "temperature = 3.0\nalpha = 0.2\n")
    result = CliRunner().invoke(main, ["distill", str(tmp / "ens"), str(recipe), "--json",
                                       "--set", f'data.train="{data}"', "--set", f'name="student-{mode}"',
                                       "--set", "augment.mixup=0.2" if mode == "function-matching" else "name=\"student-cached\""])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    run = tmp / "outputs" / "runs" / f"student-{mode}"
    assert (run / "best.keras").exists() and (run / "distill.json").exists()
    rows = summary["rows"]
    assert set(rows) == {"student", "ensemble", "best member"}
    assert all(0 <= r["acc_val"] <= 1 and r["img_per_s"] > 0 for r in rows.values())
    assert rows["ensemble"]["params"] >= rows["best member"]["params"]  # the selection holds the best member
    if mode == "cached":  # the teacher's targets are computed once and kept with the run
        assert list((run / "checkpoint").glob("teacher_train_*.npz"))
    else:
        assert not list((run / "checkpoint").glob("teacher_train_*.npz"))


def test_student_recipe_needs_distill_section(tiny_ensemble):
    tmp, _ = tiny_ensemble
    result = CliRunner().invoke(main, ["distill", str(tmp / "ens"), str(ROOT / "recipes" / "tiny.toml")])
    assert result.exit_code == 2 and "[distill] section" in result.output
