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
from conftest import make_images

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
    for name in ("recipe.toml", "env.json", "history.csv", "best.keras", "metrics.json", "curves.png", "augmented.png",
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
    # the best epoch is the argmax of the monitored column; TensorBoard wrote event files
    import csv

    rows = list(csv.DictReader((run / "history.csv").open()))
    best = json.loads((run / "checkpoint" / "best.json").read_text())
    assert best["epoch"] == int(max(rows, key=lambda r: float(r["val_auc"]))["epoch"]) == summary["best_epoch"]
    assert list((run / "tb").rglob("events.out.tfevents*"))
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
    env = json.loads((tmp_path / "runs" / "tiny" / "env.json").read_text())["distribution"]
    assert env["strategy"] == "MirroredStrategy" and env["replicas"] == 2  # two replicas really ran


def test_nan_loss_stops_loudly(tiny_npz, tmp_path):
    from toolkit.train import train_recipe

    recipe = tiny_recipe(tiny_npz, tmp_path, "train.stages=[{epochs=1, lr=1e30, unfreeze=1.0}]",
                         "train.optimizer=\"sgd\"", "train.steps_per_epoch=3")
    with pytest.raises(CellfuseError, match="loss became NaN at epoch 1"):
        train_recipe(recipe, runs_root=tmp_path / "runs")


def test_leakage_is_reported(tmp_path, capsys):
    """Training on a file full of duplicates: the validation split shares images with training."""
    from rich.console import Console

    from toolkit.train import check_data, load_split

    images, labels = make_images(40)
    data = save_dataset(tmp_path / "dups.npz", np.concatenate([images, images]), np.concatenate([labels, labels]))
    recipe = tiny_recipe(data, tmp_path)
    console = Console(record=True, width=200)
    split = load_split(recipe, console)
    check_data(split, recipe, console)
    assert "duplicate a training image" in console.export_text()


def test_resume_after_kill_mid_epoch(tiny_npz, tmp_path, monkeypatch):
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
    assert (run / "checkpoint" / "stage0.weights.h5").exists()
    done = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "metrics.json").exists()
    epochs = [int(line.split(",")[0]) for line in (run / "history.csv").read_text().splitlines()[1:]]
    assert epochs == [1, 2, 3]
    monkeypatch.chdir(tmp_path)  # in this process: a third TensorFlow start would cost 10 s
    changed = CliRunner().invoke(main, [*cmd[3:], "--resume", "--set", "train.batch_size=8"])
    assert changed.exit_code == 2 and "recipe changed" in changed.output, changed.output


# ---------------------------------------------------------------- behaviours of single options

def _record(fn):
    """A callback keeping fn(model, logs) at each epoch's end (extra callbacks run after cellfuse's own)."""
    import keras

    class Record(keras.callbacks.Callback):
        seen: list = []

        def on_epoch_end(self, epoch, logs=None):
            self.seen.append(fn(self.model, dict(logs or {})))

    return Record()


def test_checkpoint_is_chosen_by_the_reported_macro_auc(tiny_npz, tmp_path):
    """best.json's value is the macro one-vs-rest AUC that metrics.json reports for best.keras."""
    from toolkit.train import train_recipe

    summary = train_recipe(tiny_recipe(tiny_npz, tmp_path), runs_root=tmp_path / "runs")
    metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert summary["best_value"] == pytest.approx(metrics["val"]["auc_ovr"], abs=1e-6)


def test_a_backup_killed_during_its_first_write_is_dropped_not_fatal(tmp_path):
    """A kill during a stage's first backup leaves an unreadable file and no previous copy to fall back
    on: the resumed stage starts from its beginning instead of failing."""
    import keras
    from rich.console import Console

    from toolkit.callbacks import Backup
    from toolkit.runs import make_own_dir

    backup = make_own_dir(tmp_path / "stage1", "part")  # as make_callbacks makes it
    (backup / "latest.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)  # header, then nothing
    (backup / "training_metadata.json").write_text(json.dumps({"epoch": 3, "batch": 0}))
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    x, y = np.zeros((8, 4), np.float32), np.zeros((8, 2), np.float32)
    with pytest.raises(OSError):  # what Keras alone does with it
        model.fit(x, y, epochs=2, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(str(backup))])
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[Backup(str(backup), Console(quiet=True), "epoch")])
    assert len(history.history["loss"]) == 2  # both epochs ran: the stage started again


def test_resume_after_a_crash_between_metrics_and_summary(tiny_npz, tmp_path):
    from toolkit.train import train_recipe

    recipe = tiny_recipe(tiny_npz, tmp_path)
    first = train_recipe(recipe, runs_root=tmp_path / "runs")
    (tmp_path / "runs" / "tiny" / "summary.json").unlink()  # metrics.json written, summary.json not
    again = train_recipe(recipe, runs_root=tmp_path / "runs", resume=True)
    assert again["best_epoch"] == first["best_epoch"] and (tmp_path / "runs" / "tiny" / "summary.json").exists()


def test_a_failed_start_leaves_nothing_in_the_way(tiny_npz, tmp_path):
    from toolkit.train import train_recipe

    run = tmp_path / "runs" / "tiny"
    with pytest.raises(CellfuseError, match="missing.npz"):
        train_recipe(tiny_recipe(tmp_path / "missing.npz", tmp_path), runs_root=tmp_path / "runs")
    assert not run.exists()
    with pytest.raises(CellfuseError, match="unknown backbone"):
        train_recipe(tiny_recipe(tiny_npz, tmp_path, "model.backbone=\"nope\""), runs_root=tmp_path / "runs")
    assert not run.exists()
    import keras

    class CtrlC(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # stopped in its first epoch: the command removes what it made
        train_recipe(tiny_recipe(tiny_npz, tmp_path, "train.checkpoint_every=100"), runs_root=tmp_path / "runs",
                     extra_callbacks=(CtrlC(),))
    assert not run.exists()
    run.mkdir(parents=True)  # a folder of the user's, named like the run: never taken for a failed start
    (run / "recipe.toml").write_text("mine")
    for flags in ({}, {"force": True}, {"resume": True}):
        with pytest.raises(CellfuseError, match="not a run"):
            train_recipe(tiny_recipe(tiny_npz, tmp_path), runs_root=tmp_path / "runs", **flags)
    assert [p.name for p in run.iterdir()] == ["recipe.toml"] and (run / "recipe.toml").read_text() == "mine"


def test_ema_checkpoint_holds_the_averaged_weights(tiny_npz, tmp_path):
    import keras

    from toolkit.train import train_recipe

    class RawWeights(keras.callbacks.Callback):
        raw = []

        def on_train_batch_end(self, batch, logs=None):  # before SwapEMAWeights swaps at epoch end
            self.raw = self.model.get_weights()

    raw = RawWeights()
    averaged = _record(lambda model, logs: {v.path: np.asarray(v) for v in model.weights})
    recipe = tiny_recipe(tiny_npz, tmp_path, "train.ema=true", "train.stages=[{epochs=1, lr=3e-2, unfreeze=1.0}]",
                         "train.steps_per_epoch=4")
    train_recipe(recipe, runs_root=tmp_path / "runs", extra_callbacks=(raw, averaged))
    import h5py

    with h5py.File(tmp_path / "runs" / "tiny" / "checkpoint" / "best.weights.h5") as f:
        best = {path: f[path][()] for path in averaged.seen[-1]}
    assert all(np.array_equal(best[p], a) for p, a in averaged.seen[-1].items())
    assert not all(np.allclose(b, r) for b, r in zip(best.values(), raw.raw, strict=True))


def test_balanced_class_weights_reach_fit(tmp_path, monkeypatch):
    import keras
    from conftest import make_images

    from toolkit.train import train_recipe

    images, labels = make_images(96)
    keep = (labels != 0) | (np.arange(96) % 3 == 0)  # class 0 rarer than the others
    data = save_dataset(tmp_path / "skewed.npz", images[keep], labels[keep])
    seen = []
    fit = keras.Model.fit

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("class_weight"))
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy)
    train_recipe(tiny_recipe(data, tmp_path, "train.class_weights=\"balanced\"",
                             "train.stages=[{epochs=1, lr=1e-3, unfreeze=1.0}]"), runs_root=tmp_path / "runs")
    (weights,) = seen
    assert set(weights) == set(range(8)) and weights[0] > 1.5 > max(weights[c] for c in range(1, 8))


def test_mixed_precision_computes_in_float16_and_saves_float32(tiny_npz, tmp_path):
    import keras

    from toolkit.train import train_recipe

    policy = _record(lambda model, logs: (model.dtype_policy.compute_dtype, model.outputs[0].dtype))
    try:
        train_recipe(tiny_recipe(tiny_npz, tmp_path, "train.mixed_precision=\"on\"",
                                 "train.stages=[{epochs=1, lr=1e-3, unfreeze=1.0}]"),
                     runs_root=tmp_path / "runs", extra_callbacks=(policy,))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert policy.seen == [("float16", "float32")]  # float16 compute, float32 probabilities
    model = keras.saving.load_model(tmp_path / "runs" / "tiny" / "best.keras")
    assert {str(w.dtype) for w in model.weights} == {"float32"} and model.dtype_policy.name == "float32"


def test_xla_and_lion_reach_compile(tiny_npz, tmp_path):
    import keras

    from toolkit.train import build_model, compile_model

    recipe = tiny_recipe(tiny_npz, tmp_path, "train.xla=true", "train.optimizer=\"lion\"")
    model = compile_model(build_model(recipe, 8), recipe, recipe.train.stages[0], steps=2)
    assert model.jit_compile is True and isinstance(model.optimizer, keras.optimizers.Lion)
    x = np.random.default_rng(0).uniform(0, 255, (4, 96, 96, 3)).astype("float32")
    assert np.isfinite(model.train_on_batch(x, np.eye(8)[[0, 1, 2, 3]])).all()


def test_plateau_schedule_lowers_the_learning_rate(tiny_npz, tmp_path):
    """A learning rate too small to change anything: no improvement, so the rate drops after 2 epochs."""
    import csv

    from toolkit.train import train_recipe

    recipe = tiny_recipe(tiny_npz, tmp_path, "train.schedule=\"plateau\"", "train.freeze_batchnorm=true",
                         "train.stages=[{epochs=4, lr=1e-12, unfreeze=1.0}]", "train.steps_per_epoch=1")
    train_recipe(recipe, runs_root=tmp_path / "runs")
    lrs = [float(r["lr"]) for r in csv.DictReader((tmp_path / "runs" / "tiny" / "history.csv").open())]
    assert lrs[0] == pytest.approx(1e-12) and lrs[-1] == pytest.approx(3e-13)


def test_early_stopping_stops_before_the_last_epoch(tiny_npz, tmp_path):
    from toolkit.train import train_recipe

    recipe = tiny_recipe(tiny_npz, tmp_path, "train.early_stopping=1", "train.freeze_batchnorm=true",
                         "train.schedule=\"constant\"", "train.stages=[{epochs=6, lr=1e-12, unfreeze=1.0}]",
                         "train.steps_per_epoch=1")
    train_recipe(recipe, runs_root=tmp_path / "runs")
    assert len((tmp_path / "runs" / "tiny" / "history.csv").read_text().splitlines()) - 1 == 2


def test_fractional_unfreeze_trains_the_top_of_the_backbone(tiny_npz, tmp_path):
    from toolkit.backbones import set_trainable
    from toolkit.train import build_model

    model = build_model(tiny_recipe(tiny_npz, tmp_path), 8)
    backbone = model.get_layer("backbone")
    weighted = [layer for layer in backbone.layers if layer.weights]
    set_trainable(model, 0.5)
    flags = [layer.trainable for layer in weighted]
    assert flags == sorted(flags) and sum(flags) == len(weighted) // 2  # the top half, nothing below


# ---------------------------------------------------------------- several recipes at once

def test_parallel_reports_every_failure_and_keeps_logs_apart(tiny_npz, tmp_path, monkeypatch):
    """Two recipes with one file stem, one broken: the other still finishes, both logs survive."""
    from toolkit.train import train_many

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    good, bad = tmp_path / "a" / "tiny.toml", tmp_path / "b" / "tiny.toml"
    for path, name, data in ((good, "good", tiny_npz), (bad, "bad", tmp_path / "missing.npz")):
        path.parent.mkdir()
        path.write_text(TINY.read_text().replace('name = "tiny"', f'name = "{name}"')
                        .replace('"outputs/clean/clean.npz"', f'"{data}"'))
    with pytest.raises(CellfuseError, match=r"1 of 2 recipe\(s\) failed: .*b/tiny.toml"):
        train_many([(good, []), (bad, [])], parallel=2, runs_root=tmp_path / "runs")
    assert (tmp_path / "runs" / "good" / "summary.json").exists()
    assert "missing.npz" in (tmp_path / "runs" / "logs" / "bad.log").read_text()
    assert (tmp_path / "runs" / "logs" / "good.json").read_text().strip()


def test_parallel_stops_its_children_on_ctrl_c(tiny_npz, tmp_path, monkeypatch):
    import toolkit.procs
    import toolkit.train as T

    spawned = []
    spawn = T.spawn
    monkeypatch.setattr(T, "spawn", lambda *a, **kw: spawned.append(spawn(*a, **kw)) or spawned[-1])

    sleep, interrupted = toolkit.procs.time.sleep, []

    def interrupt(seconds):  # Ctrl-C during the first wait; later waits (stopping the children) are real
        if not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        sleep(seconds)

    monkeypatch.setattr(toolkit.procs.time, "sleep", interrupt)
    recipes = [tiny_recipe(tiny_npz, tmp_path, f"name=\"r{i}\"") for i in range(2)]
    with pytest.raises(KeyboardInterrupt):
        T.train_parallel([(r, []) for r in recipes], False, False, 2, None, tmp_path / "runs")
    assert len(spawned) == 2 and all(p.poll() is not None for p in spawned)


def test_one_launcher_takes_jobs_only_when_a_slot_is_free_and_spreads_gpus(tmp_path, monkeypatch):
    """procs.run_all, behind train --parallel and sweep --parallel: at most `parallel` children, each job
    taken when a slot frees (a sweep asks Optuna for a trial only then), children on the least busy GPU."""
    import toolkit.procs as procs

    monkeypatch.setattr(procs, "gpu_count", lambda: 2)
    taken, ends = [], {}

    def jobs():
        for i in range(3):
            taken.append((i, len(ends)))  # (job, how many had finished when it was taken)
            yield i

    def start(i, gpu, share_gpu):
        code = f"import os, sys; print(os.environ['CUDA_VISIBLE_DEVICES']); sys.exit({i})"
        return procs.spawn([sys.executable, "-c", code], tmp_path / f"{i}.log", gpu=gpu, share_gpu=share_gpu)

    procs.run_all(jobs(), 2, start, lambda i, proc: ends.setdefault(i, proc.returncode), poll=0.05)
    assert ends == {0: 0, 1: 1, 2: 2}
    assert taken[:2] == [(0, 0), (1, 0)] and taken[2][1] >= 1  # the third waited for a free slot
    assert [(tmp_path / f"{i}.log").read_text().strip() for i in (0, 1)] == ["0", "1"]


def test_parallel_spreads_children_over_gpus_and_refuses_one_name_twice(tiny_npz, tmp_path):
    from toolkit.procs import pick_gpu
    from toolkit.recipe import check_distinct_names

    assert pick_gpu([], 2) == 0 and pick_gpu([0], 2) == 1 and pick_gpu([0, 1, 0], 2) == 1
    assert pick_gpu([], 0) is None
    with pytest.raises(CellfuseError, match="both name their run 'tiny'"):
        check_distinct_names([tiny_recipe(tiny_npz, tmp_path)] * 2)


def test_ema_checkpoint_has_batchnorm_statistics_of_its_training_inputs(tiny_npz, tmp_path, monkeypatch):
    """Keras averages trainable weights only: the moving statistics are re-estimated for the averaged
    weights, on batches as training sees them. Training images darkened to 30% stand in for heavy
    augmentation: the first BatchNorm's mean must match its input on dark images, not on clean ones."""
    import keras
    import tensorflow as tf
    from rich.console import Console

    from toolkit import train as T

    make_dataset = T.make_dataset

    def darkened(data, recipe, *, training, **kwargs):
        ds = make_dataset(data, recipe, training=training, **kwargs)
        return ds.map(lambda x, y: (x * 0.3, y)) if training else ds

    monkeypatch.setattr(T, "make_dataset", darkened)
    recipe = tiny_recipe(tiny_npz, tmp_path, "train.ema=true", "train.stages=[{epochs=2, lr=3e-2, unfreeze=1.0}]",
                         "train.steps_per_epoch=4", 'augment.preset="none"')
    T.train_recipe(recipe, runs_root=tmp_path / "runs")
    model = keras.saving.load_model(tmp_path / "runs" / "tiny" / "best.keras")
    backbone = model.get_layer("backbone")  # pixels -> to_0_1 -> backbone (conv, BatchNorm, ...)
    norm = next(layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))
    conv = keras.Model(backbone.inputs, norm.input)

    def features(x):
        return conv(model.get_layer("to_0_1")(x))

    images = T.load_split(recipe, Console(quiet=True)).train.images.astype(np.float32)
    dark_mean, clean_mean = (tf.reduce_mean(features(x), axis=(0, 1, 2)).numpy() for x in (images * 0.3, images))
    moving = norm.moving_mean.numpy()
    assert np.abs(moving - dark_mean).mean() < 0.2 * np.abs(clean_mean - dark_mean).mean()


def test_an_extra_validation_file_cannot_replace_the_split(tiny_npz, tmp_path):
    """`cellfuse split` writes val.npz: listed in extra_val it would have replaced the held-out split."""
    import shutil

    from rich.console import Console

    from toolkit.train import load_split

    shutil.copy(tiny_npz, tmp_path / "val.npz")
    recipe = tiny_recipe(tiny_npz, tmp_path, f'data.extra_val=["{tmp_path / "val.npz"}"]')
    with pytest.raises(CellfuseError, match="whose name 'val' is the split's own name"):
        load_split(recipe, Console(quiet=True))
    (tmp_path / "b").mkdir()
    shutil.copy(tiny_npz, tmp_path / "b" / "val_corrupt.npz")
    twice = f'data.extra_val=["{tiny_npz}", "{tmp_path / "b" / "val_corrupt.npz"}", "{tmp_path / "b" / "val_corrupt.npz"}"]'
    with pytest.raises(CellfuseError, match="'val_corrupt' is also the name of another data.extra_val file"):
        load_split(tiny_recipe(tiny_npz, tmp_path, twice), Console(quiet=True))


def test_augmented_batches_stay_float32_under_mixed_precision(tiny_npz, tmp_path):
    """toolkit.augment builds its layers under float32 whatever the global policy: built under
    mixed_float16 they would compute 0..255 pixels in float16, and the first loss is NaN."""
    import keras
    from rich.console import Console

    from toolkit.batches import load_split, make_dataset

    recipe = tiny_recipe(tiny_npz, tmp_path, "augment.preset=\"heavy\"")
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        images, _ = next(iter(make_dataset(load_split(recipe, Console(quiet=True)).train, recipe, training=True)))
        assert keras.mixed_precision.global_policy().name == "mixed_float16", "the caller's policy is kept"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert images.dtype == "float32" and np.isfinite(images).all()


def test_a_backup_h5py_cannot_parse_is_dropped_not_fatal(tmp_path, monkeypatch):
    """A backup written while its worker was killed can pass h5py's size check and fail inside it with
    a RuntimeError (seen under load: "addr overflow ... eoa = 2048"): dropped like a truncated one."""
    import keras
    from rich.console import Console

    from toolkit.callbacks import Backup
    from toolkit.runs import make_own_dir

    def damaged(self, logs=None):
        raise RuntimeError("Can't get deprecated info for object (addr overflow, addr = 6144, eoa = 2048)")

    backup = make_own_dir(tmp_path / "stage1", "part")
    (backup / "latest.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    monkeypatch.setattr(keras.callbacks.BackupAndRestore, "on_train_begin", damaged)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    x, y = np.zeros((8, 4), np.float32), np.zeros((8, 2), np.float32)
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[Backup(str(backup), Console(quiet=True), "epoch")])
    assert len(history.history["loss"]) == 2 and not (backup / "latest.weights.h5").exists()


@pytest.mark.parametrize("favoured, trained, says", [
    (0, True, "below chance"),  # train --from: a low loss means the weights loaded
    (0, False, "far from ln(8)"),  # a fresh head this sure of itself is broken
    (1, True, "no better than chance"),  # trained weights that lose to chance did not load, or see other inputs
])
def test_the_initial_loss_check_knows_a_run_that_starts_from_trained_weights(favoured, trained, says):
    """`train --from` warned 'initial loss 0.268 is far from ln(8)' on every corruption-tuned copy."""
    import io

    import keras
    from rich.console import Console

    from toolkit.batches import check_initial_loss
    from toolkit.data import Dataset

    bias = np.zeros(8, "float32")
    bias[favoured] = 8.0
    model = keras.Sequential([keras.Input((96, 96, 3)), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(8, "softmax", kernel_initializer="zeros",
                                                 bias_initializer=keras.initializers.Constant(bias))])
    val = Dataset(np.zeros((16, 96, 96, 3), "uint8"), np.zeros(16, "int64"), "val.npz", np.arange(16))
    out = io.StringIO()
    check_initial_loss(model, val, Console(file=out, width=200), trained=trained)
    assert says in out.getvalue() and ("WARNING" in out.getvalue()) == (says != "below chance")


def test_a_deterministic_recipe_trains_to_the_same_weights_twice(tmp_path):
    """heavy: RandAugment and GridMask (per-image loops), MixUp/CutMix, Keras core layers, all in tf.data."""
    from tensorflow.python.framework import config

    from toolkit.train import train_recipe

    images, labels = make_images(96, seed=3)
    data = save_dataset(tmp_path / "d.npz", images, labels)
    runs = tmp_path / "runs"
    base = ['augment.preset="heavy"', "train.steps_per_epoch=4"]
    twice = [train_recipe(tiny_recipe(data, tmp_path, *base, "train.deterministic=true", f'name="{name}"'),
                          runs_root=runs)["final_weights_sha1"] for name in ("first", "again")]
    assert twice[0] == twice[1]
    # the next recipe in the same process gets its own setting: op determinism off again (any recipe will do)
    train_recipe(tiny_recipe(data, tmp_path, 'name="default"', "train.steps_per_epoch=1",
                             "train.stages=[{epochs=1, lr=3e-3, unfreeze=1.0}]"), runs_root=runs)
    assert not config.is_op_determinism_enabled()


def test_an_op_without_a_deterministic_kernel_is_named_with_the_way_out(tiny_npz, tmp_path):
    import tensorflow as tf

    from toolkit.train import deterministic_kernels

    missing = tf.errors.UnimplementedError(None, None, "Deterministic GPU implementation of unsorted segment "
                                                       "reduction op not available.\nmore detail")
    with pytest.raises(CellfuseError, match=r"tiny.toml: train.deterministic = true, but .*unsorted segment "
                                            r"reduction op not available\.\); set train.deterministic = false"):
        with deterministic_kernels(tiny_recipe(tiny_npz, tmp_path, "train.deterministic=true")):
            raise missing
    with pytest.raises(tf.errors.UnimplementedError):  # not ours to explain when determinism is off
        with deterministic_kernels(tiny_recipe(tiny_npz, tmp_path)):
            raise missing


def test_cross_fitting_a_checkpoint_pick_scores_each_half_with_the_epoch_the_other_half_picked():
    from toolkit.report import two_folds
    from toolkit.train import cross_fitted_checkpoint

    labels = np.repeat(np.arange(4), 6)
    (a, b), (b2, a2) = list(two_folds(labels))
    assert sorted(a) == sorted(a2) and sorted(b) == sorted(b2)
    only_a, only_b = np.isin(np.arange(24), a), np.isin(np.arange(24), b)
    # each epoch is right exactly where it would be picked: picked on one half, it scores 0 on the other
    assert cross_fitted_checkpoint({"e1": only_a, "e2": only_b}, labels) == 0.0
    steady = np.arange(24) % 3 > 0  # picked on both halves over an epoch worse everywhere: its own accuracy
    assert cross_fitted_checkpoint({"e10": steady & only_a, "e2": steady}, labels) == pytest.approx(2 / 3)


def test_a_checkpoint_picked_on_an_extra_set_is_that_sets_best_epoch_with_an_honest_figure(tiny_npz, tmp_path):
    """train.monitor = "val_heldout_accuracy": every epoch scores the file, the best epoch is kept, and the
    summary carries the figure cross-fitted from the per-image record."""
    import csv

    from toolkit.train import train_recipe

    images, labels = make_images(40, seed=5)
    save_dataset(tmp_path / "val_heldout.npz", images, labels)
    recipe = tiny_recipe(tiny_npz, tmp_path, f'data.extra_val=["{tmp_path / "val_heldout.npz"}"]',
                         'train.monitor="val_heldout_accuracy"', "train.epochs=3")
    summary = train_recipe(recipe, runs_root=tmp_path / "runs")
    run = tmp_path / "runs" / "tiny"
    curve = [float(row["val_heldout_accuracy"]) for row in csv.DictReader((run / "history.csv").open())]
    kept = dict(np.load(run / "checkpoint" / "steered.npz"))
    assert [kept[f"e{e}"].mean() for e in range(1, 5)] == pytest.approx(curve)
    assert summary["best_epoch"] == 1 + int(np.argmax(curve)) and summary["best_value"] == pytest.approx(max(curve))
    shipped = np.load(run / "probs_val_heldout.npz")["probs"].argmax(1) == labels
    assert (shipped == kept[f"e{summary['best_epoch']}"]).all()  # best.keras is the epoch that was picked
    assert summary["steered"]["set"] == "val_heldout" and summary["steered"]["accuracy"] == pytest.approx(max(curve))
    assert 0 <= summary["steered"]["cross_fitted_accuracy"] <= 1


def test_seeds_train_each_recipe_once_per_seed_in_parallel_too(tiny_npz, tmp_path, monkeypatch):
    """--seeds 4,5 with --parallel 2: each child gets its own seed and name; the table spans both."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    result = CliRunner().invoke(main, ["train", str(TINY), "--set", f"data.train=\"{tiny_npz}\"", "--seeds", "4,5",
                                       "--parallel", "2", "--json"])
    assert result.exit_code == 0, result.output
    summaries = json.loads(result.output.strip().splitlines()[-1])
    assert [s["name"] for s in summaries] == ["tiny-seed4", "tiny-seed5"]
    for seed in (4, 5):
        assert load_recipe(tmp_path / "outputs" / "runs" / f"tiny-seed{seed}" / "recipe.toml").train.seed == seed
    values = [s["metrics"]["val"]["accuracy"] for s in summaries]
    row = next(line for line in result.output.split("over seeds 4, 5")[-1].splitlines() if " val " in line)
    assert [cell.strip() for cell in row.split("│")[1:7]] == ["tiny", "val", *(f"{v:.4f}" for v in values),
                                                             f"{np.mean(values):.4f}", f"{max(values) - min(values):.4f}"]


def test_a_stage_run_again_drops_the_record_of_its_earlier_attempt(tmp_path):
    """After a dropped backup the stage starts from its beginning: the epochs it will run again leave the
    per-image record, which otherwise mixes two attempts the checkpoint never compared."""
    import types

    from toolkit.callbacks import TrackedAccuracy
    from toolkit.data import save_npz

    steered = tmp_path / "steered.npz"
    save_npz(steered, **{f"e{e}": np.ones(3, bool) for e in range(1, 6)})
    callback = TrackedAccuracy(None, {}, steered=steered, monitored="val_heldout", offset=2)
    callback.set_model(types.SimpleNamespace(_initial_epoch=1))  # stage 2 resumes after its first epoch
    callback.on_train_begin()
    assert sorted(np.load(steered)) == ["e1", "e2", "e3"]


def test_a_per_image_record_cut_short_is_named_with_the_way_out(tmp_path):
    from toolkit.callbacks import read_steered
    from toolkit.data import save_npz

    record = save_npz(tmp_path / "steered.npz", e1=np.ones(3, bool))
    record.write_bytes(record.read_bytes()[:20])
    with pytest.raises(CellfuseError, match=r"steered.npz: unreadable .*delete it and --resume again"):
        read_steered(record)
    assert read_steered(tmp_path / "none.npz") == {}
