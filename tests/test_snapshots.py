"""Snapshots and SWA: free ensemble candidates from the tail of one run's schedule."""

import json

import numpy as np
from click.testing import CliRunner
from conftest import make_images

from toolkit.cli import main
from toolkit.corrupt import write_val_files
from toolkit.data import save_dataset
from toolkit.recipe import load_recipe
from toolkit.runs import load_model
from toolkit.train import train_recipe


def test_a_run_keeps_its_last_epochs_and_their_average_as_ensemble_candidates(tmp_path):
    images, labels = make_images(96, seed=3)
    data = save_dataset(tmp_path / "d.npz", images, labels)
    recipe = load_recipe("tiny", [f'data.train="{data}"', "train.snapshots=3",
                                  "train.stages=[{epochs=1, lr=3e-3, unfreeze=0.0}, {epochs=2, lr=3e-3, unfreeze=1.0}]"])
    summary = train_recipe(recipe, runs_root=tmp_path / "runs")
    run = tmp_path / "runs" / "tiny"
    # the best epoch's snapshot is best.keras itself: not written twice, nor scored twice by the ensemble
    best = f"snapshot_e{summary['best_epoch']}.keras"
    kept = [f"snapshot_e{e}.keras" for e in (1, 2, 3)]
    assert set(summary["snapshots"]) == {*kept, "swa.keras"} - {best} and not (run / best).exists()
    assert all(0 <= a <= 1 for a in summary["snapshots"].values())
    e1, e2, e3, swa = (load_model(run / ("best.keras" if name == best else name), compile=False)
                       for name in (*kept, "swa.keras"))
    kernel = [m.get_layer("logits").get_weights()[0] for m in (e1, e2, e3, swa)]
    assert not np.allclose(kernel[1], kernel[2])  # two different epochs
    np.testing.assert_allclose(kernel[3], (kernel[0] + kernel[1] + kernel[2]) / 3, rtol=1e-5, atol=1e-7)

    val = write_val_files(data, tmp_path / "split", val_fraction=0.25, held_out="")["val"]
    result = CliRunner().invoke(main, ["ensemble", str(run), "--snapshots", "--val", str(val), "--views", "none",
                                       "--rounds", "2", "--out", str(tmp_path / "ens"), "--json"])
    assert result.exit_code == 0, result.output
    candidates = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    text = json.dumps(candidates)
    assert all(f"tiny-{name.removesuffix('.keras')}" in text for name in summary["snapshots"])


def test_a_corruption_tuned_copy_starts_from_its_run_and_keeps_a_wise_blend(tmp_path, monkeypatch):
    from toolkit.runs import weights_by_path

    images, labels = make_images(96, seed=4)
    data = save_dataset(tmp_path / "d.npz", images, labels)
    heldout = write_val_files(data, tmp_path / "split", val_fraction=0.25)["val_heldout"]
    base = ["--set", f'data.train="{data}"', "--set", f'data.extra_val=["{heldout}"]', "--out", str(tmp_path / "runs")]
    first = CliRunner().invoke(main, ["train", "tiny", *base])
    assert first.exit_code == 0, first.output
    run = tmp_path / "runs" / "tiny"
    refused = CliRunner().invoke(main, ["train", "tiny", *base, "--from", str(run), "--force"])
    assert refused.exit_code == 2 and "input" in refused.output  # the run it starts from is never replaced
    checked = []  # the training rows the leakage check saw
    monkeypatch.setattr("toolkit.train.check_data", lambda split, recipe, console: checked.append(split.train))
    tuned = CliRunner().invoke(main, [
        "train", "tiny", *base, "--from", str(run), "--set", "name=tiny-tuned", "--set", "data.corrupt_fraction=0.5",
        "--set", "train.stages=[{epochs=1, lr=1e-3, unfreeze=1.0}]", "--set", "train.snapshots=1", "--json",
        # every weight comes from the run: ImageNet's, here not to be had, are never fetched for a copy
        "--set", 'model.weights="imagenet"'])
    assert tuned.exit_code == 0, tuned.output
    summary = json.loads(tuned.output.strip().splitlines()[-1])[0]
    # one epoch: its snapshot is best.keras and their average the same again; neither is a new candidate
    assert summary["snapshots"] == {} and not list((tmp_path / "runs" / "tiny-tuned").glob("s[nw]a*.keras"))
    assert "corrupted 36 of 72 training rows" in tuned.output and "starting from the weights" in tuned.output
    # the leakage check sees the rows as they are: a corrupted copy matching a held-out image corrupted alike is no leak
    (seen,) = checked
    np.testing.assert_array_equal(seen.images, images[seen.index])
    wise = summary["wise"]
    assert wise["chosen_on"] == "val_heldout" and wise["alpha"] in (0.25, 0.5, 0.75)
    start, result, blend = (weights_by_path(load_model(f, compile=False))
                            for f in (run / "best.keras", tmp_path / "runs" / "tiny-tuned" / "best.keras",
                                      tmp_path / "runs" / "tiny-tuned" / "wise.keras"))
    a = wise["alpha"]
    key = next(k for k in start if k.endswith("logits/kernel"))
    np.testing.assert_allclose(blend[key], (1 - a) * start[key] + a * result[key], rtol=1e-5, atol=1e-6)
