"""`cellfuse train` end to end on tiny data: artefacts, resume after a kill, distribution, checks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from toolkit.cli import main
from toolkit.data import save_dataset
from toolkit.errors import CellfuseError
from toolkit.recipe import load_recipe

ROOT = Path(__file__).parents[1]
TINY = ROOT / "recipes" / "tiny.toml"


def tiny_recipe(data, tmp_path, *extra):
    return load_recipe(TINY, [f"data.train=\"{data}\"", *extra])


def test_train_cli_writes_a_complete_run(tiny_npz, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", str(TINY), "--set", f"data.train=\"{tiny_npz}\"", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])[0]
    run = tmp_path / "outputs" / "runs" / "tiny"
    for name in ("recipe.toml", "env.json", "history.csv", "best.keras", "metrics.json", "curves.png",
                 "confusion_val.png", "probs_val.npz", "checkpoint/best.json"):
        assert (run / name).exists(), name
    assert summary["best_epoch"] in (1, 2)
    metrics = json.loads((run / "metrics.json").read_text())["val"]
    assert set(metrics["per_class"]) == {"basophil", "eosinophil", "erythroblast", "immature granulocyte",
                                         "lymphocyte", "monocyte", "neutrophil", "platelet"}
    assert 0 <= metrics["accuracy"] <= 1 and np.array(metrics["confusion"]).sum() == metrics["n"]
    assert "initial loss" in result.output
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 3 and history[0].startswith("epoch,")  # header + 2 epochs over 2 stages
    # best.keras: raw pixels in, probabilities out, no optimizer state, loads in safe mode
    import zipfile

    import keras

    assert not any("optimizer" in n for n in zipfile.ZipFile(run / "best.keras").namelist())
    model = keras.saving.load_model(run / "best.keras", safe_mode=True)
    probs = np.load(run / "probs_val.npz")
    from toolkit.data import load_dataset

    data = load_dataset(tiny_npz)
    rows = probs["index"]
    np.testing.assert_allclose(model.predict(data.images[rows].astype("float32"), verbose=0), probs["probs"],
                               atol=1e-5)
    # an existing run is never clobbered
    again = CliRunner().invoke(main, ["train", str(TINY), "--set", f"data.train=\"{tiny_npz}\""])
    assert again.exit_code == 2 and "already exists" in again.output


def test_evaluate_cli_on_a_run(tiny_npz, tmp_path, monkeypatch):
    from toolkit.train import train_recipe

    train_recipe(tiny_recipe(tiny_npz, tmp_path), runs_root=tmp_path / "runs")
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "runs" / "tiny"), str(tiny_npz), "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    (metrics,) = figures.values()
    assert metrics["n"] == 64 and 0 <= metrics["accuracy"] <= 1


def test_learns_the_toy_task(tmp_path):
    """Enough steps on learnable toy data must beat chance clearly: the pipeline really trains."""
    from tests.conftest import make_images
    from toolkit.train import train_recipe

    images, labels = make_images(320, seed=3)
    data = save_dataset(tmp_path / "toy.npz", images, labels)
    recipe = tiny_recipe(data, tmp_path, "train.steps_per_epoch=0",
                         "train.stages=[{epochs=6, lr=3e-3, unfreeze=1.0}]", "augment.preset=\"none\"",
                         "model.head=\"seed\"")
    summary = train_recipe(recipe, runs_root=tmp_path / "runs")
    assert summary["metrics"]["val"]["accuracy"] > 0.5  # chance is 0.125


def test_mirrored_strategy_on_two_logical_cpus(tiny_npz, tmp_path):
    import tensorflow as tf

    from toolkit.train import train_recipe

    assert len(tf.config.list_logical_devices("CPU")) == 2, "conftest splits the CPU in two"
    summary = train_recipe(tiny_recipe(tiny_npz, tmp_path, "train.distribute=\"mirrored\""),
                           runs_root=tmp_path / "runs")
    assert summary["best_epoch"] is not None
    assert (tmp_path / "runs" / "tiny" / "best.keras").exists()


def test_nan_loss_stops_loudly(tiny_npz, tmp_path):
    from toolkit.train import train_recipe

    recipe = tiny_recipe(tiny_npz, tmp_path, "train.stages=[{epochs=1, lr=1e30, unfreeze=1.0}]",
                         "train.optimizer=\"sgd\"", "train.steps_per_epoch=3")
    with pytest.raises(CellfuseError, match="loss became NaN at epoch 1"):
        train_recipe(recipe, runs_root=tmp_path / "runs")


def test_leakage_is_reported(tmp_path, capsys):
    """Training on a file full of duplicates: the validation split shares images with training."""
    from rich.console import Console

    from tests.conftest import make_images
    from toolkit.train import check_data, load_split

    images, labels = make_images(40)
    data = save_dataset(tmp_path / "dups.npz", np.concatenate([images, images]), np.concatenate([labels, labels]))
    recipe = tiny_recipe(data, tmp_path)
    console = Console(record=True, width=200)
    split = load_split(recipe, console)
    check_data(split, recipe, console)
    assert "duplicate a training image" in console.export_text()


def test_resume_after_kill_mid_epoch(tiny_npz, tmp_path):
    """SIGKILL a run inside an epoch, then --resume: it finishes with every epoch in history.csv."""
    cmd = [sys.executable, "-m", "toolkit", "train", str(TINY), "--set", f"data.train=\"{tiny_npz}\"",
           "--set", "train.steps_per_epoch=30", "--set", "train.checkpoint_every=3",
           "--set", "train.stages=[{epochs=1, lr=1e-3, unfreeze=1.0}, {epochs=2, lr=1e-3, unfreeze=1.0}]"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "outputs" / "runs" / "tiny"
    meta = run / "checkpoint" / "stage1" / "training_metadata.json"
    deadline = time.time() + 240
    while not meta.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert meta.exists(), "the run never reached stage 2's first backup"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.json").exists()
    assert (run / "checkpoint" / "stage0.npz").exists()
    done = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "metrics.json").exists()
    epochs = [int(line.split(",")[0]) for line in (run / "history.csv").read_text().splitlines()[1:]]
    assert epochs == [1, 2, 3]
    changed = subprocess.run(cmd + ["--resume", "--set", "train.batch_size=8"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2 and "recipe changed" in changed.stderr
