"""The callbacks of every fit: backups, EMA with matching BatchNorm statistics, NaN guard, validation
AUC, multi-worker agreement, best checkpoint, the epoch log. make_callbacks puts them in order.

A new callback: a class
here, then one line in make_callbacks. Importing this module loads Keras.
"""

from __future__ import annotations

import csv
import json
import time
import zipfile
from pathlib import Path

import keras
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from toolkit import report
from toolkit.batches import Predictor
from toolkit.compat import BACKUP_SAVE_METHOD, flatten_layers, initial_epoch, set_initial_epoch
from toolkit.data import Dataset, save_npz
from toolkit.distribute import is_multi_worker, sync_replicas, tf_variables
from toolkit.errors import CellfuseError
from toolkit.recipe import Recipe, monitored_set
from toolkit.runs import (
    adopt_library_files,
    folder_kind,
    make_own_dir,
    remove_scratch,
    save_weights,
    write_csv,
    write_json,
)


def make_callbacks(recipe: Recipe, run: Path, backup: Path, offset: int, steps: int, console, source, *,
                   predict: Predictor, val: Dataset | None = None, strategy=None, extra=(), calibration,
                   tracked=None):
    """Order matters: backups restore first, EMA swaps in before anything reads the weights, val_auc is
    computed before the checkpoint, plateau and early stopping read it. `predict` is `source`'s forward
    pass, one for the whole run: each new one traces the model again."""
    cfg = recipe.train
    callbacks = [Backup(str(make_own_dir(backup, "part")), console, save_freq=cfg.checkpoint_every)]
    if strategy is not None and is_multi_worker(strategy):
        callbacks.append(ChiefState(strategy))
    if strategy is not None and strategy.num_replicas_in_sync > 1:
        callbacks.append(AverageMovingStats(strategy, source))
    if cfg.ema:  # before the checkpoint callbacks, so they see the averaged weights
        callbacks.append(SwapEMAWithBatchNorm(source, calibration, strategy=strategy))
    if val is not None:
        callbacks.append(ValidationAUC(predict, val))
    if tracked:
        callbacks.append(TrackedAccuracy(predict, tracked, steered=run / "checkpoint" / "steered.npz",
                                         monitored=monitored_set(recipe), offset=offset))
    callbacks += [NaNGuard(offset), BestCheckpoint(run, cfg.monitor, offset, source),
                  Snapshots(run, sum(s.epochs for s in cfg.stages) - cfg.snapshots, offset, source),
                  keras.callbacks.TensorBoard(str(make_own_dir(run / "tb", "part")), profile_batch=0),
                  EpochLog(run, offset, steps, cfg.batch_size, console)]  # after TensorBoard: adopts its files
    if cfg.schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(cfg.monitor, mode="max", factor=0.3, patience=2))
    if cfg.early_stopping:
        callbacks.append(keras.callbacks.EarlyStopping(cfg.monitor, mode="max", patience=cfg.early_stopping))
    return callbacks + list(extra)


def calibration_images(train_ds, n: int = 512) -> np.ndarray:
    """Batches as training sees them (augmented, mixed), on which BatchNorm statistics are re-estimated
    for the averaged weights (EMA). The statistics must describe the inputs the weights were fitted on
    (Wu & Johnson 2021, "Rethinking BatchNorm"): un-augmented images, a different distribution under
    heavy augmentation, cost the CPU students 8-24 points on every validation set."""
    images, count = [], 0
    for x, *_ in train_ds:
        images.append(np.asarray(x, np.float32))
        count += len(images[-1])
        if count >= n:
            break
    return np.concatenate(images)[:n]


class Backup(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore (with its previous copy), surviving a kill during a stage's first backup.

    Keras falls back to the previous copy when the latest backup cannot be read, but the first write
    of a stage has none: a process killed mid-write left a file that failed every `--resume`. Such a
    backup is dropped and the stage starts again from its beginning (under several workers each then
    takes the chief's state, see ChiefState)."""

    def __init__(self, backup_dir: str, console, save_freq):
        super().__init__(backup_dir, save_freq=save_freq, double_checkpoint=True)
        self.console = console

    def on_train_begin(self, logs=None):
        try:
            super().on_train_begin(logs)
        except (OSError, RuntimeError, json.JSONDecodeError) as e:  # h5py: RuntimeError for a damaged header
            if folder_kind(self.backup_dir) is None:  # not a folder cellfuse made: not ours to drop
                raise
            remove_scratch(self.backup_dir)  # made by make_callbacks, filled by Keras
            set_initial_epoch(self.model, None)
            self.console.print(f"[yellow]backup in {self.backup_dir} unreadable ({type(e).__name__}: {e}); "
                               "this stage starts again from its beginning[/]")


    def save_and_record(self):
        make_own_dir(self.backup_dir, "part")  # Keras deletes it after each stage; made again as cellfuse's
        getattr(super(), BACKUP_SAVE_METHOD)()
        adopt_library_files(self.backup_dir)


setattr(Backup, BACKUP_SAVE_METHOD, Backup.save_and_record)  # Keras calls it for every backup


class SwapEMAWithBatchNorm(keras.callbacks.SwapEMAWeights):
    """Keras' SwapEMAWeights, plus BatchNorm statistics that match the averaged weights.

    The optimizer averages trainable weights only; BatchNorm's moving statistics keep following the
    raw weights, so validation and the checkpoint would run averaged weights on mismatched statistics.
    Whenever the averaged weights are swapped in, the statistics are re-estimated on `images`
    (a forward pass in training mode, weights fixed, a cumulative average over the batches); the raw
    statistics come back when the raw weights do.
    """

    def __init__(self, source, images, batch_size: int = 64, strategy=None):
        super().__init__(swap_on_epoch=True)
        self.source, self.images, self.batch_size, self.saved = source, images, batch_size, None
        self.strategy = strategy

    def _norms(self):
        return [layer for layer in flatten_layers(self.source)
                if isinstance(layer, keras.layers.BatchNormalization)]

    def refresh(self):
        norms = self._norms()
        self.saved = [(n.moving_mean.numpy(), n.moving_variance.numpy()) for n in norms]
        momenta = [n.momentum for n in norms]
        for i, start in enumerate(range(0, len(self.images), self.batch_size)):
            for n in norms:
                n.momentum = i / (i + 1)  # 0 first, then a running mean over the batches
            self.source(self.images[start:start + self.batch_size], training=True)
        for n, m in zip(norms, momenta, strict=True):
            n.momentum = m
        if self.strategy is not None and is_multi_worker(self.strategy):
            # each worker drew its own augmented calibration batches: all keep the chief's statistics
            sync_replicas(self.strategy, tf_variables([v for n in norms for v in (n.moving_mean, n.moving_variance)]),
                          "chief")

    def restore(self):
        if self.saved is not None:
            for n, (mean, var) in zip(self._norms(), self.saved, strict=True):
                n.moving_mean.assign(mean)
                n.moving_variance.assign(var)
        self.saved = None

    def on_test_begin(self, logs=None):
        swapping = not self._ema_weights_in_model
        super().on_test_begin(logs)
        if swapping:
            self.refresh()

    def on_test_end(self, logs=None):
        if self._ema_weights_in_model:
            self.restore()
        super().on_test_end(logs)

    def on_epoch_end(self, epoch, logs=None):
        swapping = not self._ema_weights_in_model
        super().on_epoch_end(epoch, logs)
        if swapping:
            self.refresh()
            if epoch == self.params["epochs"] - 1:
                self.saved = None  # the stage ends on the averaged weights: keep their statistics

    def on_epoch_begin(self, epoch, logs=None):
        if self._ema_weights_in_model:
            self.restore()
        super().on_epoch_begin(epoch, logs)


class NaNGuard(keras.callbacks.Callback):
    """Stops at the first NaN loss and remembers where, so the user hears about it."""

    def __init__(self, offset: int):
        super().__init__()
        self.offset, self.epoch, self.where = offset, 0, None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.trained = time.time()  # img/s counts training steps only, not the validation pass
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self.where = f"epoch {self.offset + self.epoch + 1}, step {batch + 1}"
            self.model.stop_training = True


class ValidationAUC(keras.callbacks.Callback):
    """val_auc = macro one-vs-rest AUC of `source` on the un-augmented validation images, exactly as
    metrics.json reports it (keras.metrics.AUC is micro-averaged over one-hot columns: another figure)."""

    def __init__(self, predict: Predictor, val: Dataset):
        super().__init__()
        self.val, self.predict = val, predict

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            probs = self.predict(self.val.images)
            logs["val_auc"] = report.classification_metrics(self.val.labels, probs, self.val.class_names)["auc_ovr"]


def read_steered(path: Path) -> dict[str, np.ndarray]:
    """TrackedAccuracy's record (e<epoch> -> which images it got right); {} before the first epoch."""
    if not path.exists():
        return {}
    try:
        with np.load(path) as record:
            return dict(record)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CellfuseError(f"{path}: unreadable ({e}); delete it and --resume again: the run then finishes "
                            "without the cross-fitted figure of the set that picks its checkpoint") from None


class TrackedAccuracy(keras.callbacks.Callback):
    """`<name>_accuracy` every epoch on further validation sets (extra_val), from the weights the
    checkpoint sees: a distilled student's corrupted-validation curve is its "patience" plot.

    When one of them picks the checkpoint (train.monitor), which of its images each epoch got right
    goes to `steered` (e<epoch> -> bools): the choice replayed on half the images and scored on the
    other half is the honest figure for that set (train.cross_fitted_checkpoint)."""

    def __init__(self, predict: Predictor, sets: dict[str, Dataset], *, steered: Path, monitored: str | None,
                 offset: int):
        super().__init__()
        self.sets, self.predict = sets, predict
        self.steered, self.monitored, self.offset = steered, monitored, offset

    def on_train_begin(self, logs=None):
        """The record so far, less the epochs this stage is about to run (again, after a dropped backup)."""
        first = self.offset + (initial_epoch(self.model) or 0)
        kept = read_steered(self.steered)
        self.record = {k: v for k, v in kept.items() if int(k[1:]) <= first}
        if self.monitored and len(self.record) < len(kept):
            save_npz(self.steered, **self.record)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for name, data in self.sets.items():
            correct = self.predict(data.images).argmax(1) == data.labels
            logs[f"{name}_accuracy"] = float(correct.mean())
            if name == self.monitored:  # rewritten whole each epoch: survives a resume
                self.record[f"e{self.offset + epoch + 1}"] = correct
                save_npz(self.steered, **self.record)


class ChiefState(keras.callbacks.Callback):
    """Multi-worker restart: every worker takes the chief's restored weights, optimizer state and epoch.
    Each worker restores its own backup, and a worker killed a step before the others would
    otherwise train on from different weights (or a different epoch) and never agree again."""

    def __init__(self, strategy):
        super().__init__()
        self.strategy = strategy

    def on_train_begin(self, logs=None):
        import tensorflow as tf

        model = self.model
        if not model.optimizer.built:  # this worker had no backup yet: the chief's state needs the slots
            with self.strategy.scope():
                model.optimizer.build(model.trainable_variables)
        epoch = tf.Variable(float(initial_epoch(model) or 0))  # set by BackupAndRestore
        sync_replicas(self.strategy, [*tf_variables(model.variables + model.optimizer.variables), epoch], "chief")
        set_initial_epoch(model, int(epoch.numpy()) or None)


class AverageMovingStats(keras.callbacks.Callback):
    """BatchNorm's moving statistics are per replica (each sees its own images): averaged over all
    replicas at each epoch's end, so every worker validates, checkpoints and stops on the same model."""

    def __init__(self, strategy, source):
        super().__init__()
        self.strategy, self.source = strategy, source

    def on_epoch_end(self, epoch, logs=None):
        sync_replicas(self.strategy, tf_variables(self.source.non_trainable_variables), "mean")


class BestCheckpoint(keras.callbacks.Callback):
    """Keeps the weights of the best epoch by validation macro AUC or accuracy (never the loss)."""

    def __init__(self, run: Path, monitor: str, offset: int, source):
        super().__init__()
        self.run, self.monitor, self.offset, self.source = run, monitor, offset, source
        state = run / "checkpoint" / "best.json"
        self.best = json.loads(state.read_text())["value"] if state.exists() else -np.inf

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not np.isfinite(value) or value <= self.best:
            return
        self.best = float(value)
        save_weights(self.source, self.run / "checkpoint" / "best.weights.h5")
        write_json(self.run / "checkpoint" / "best.json",
                   {"monitor": self.monitor, "value": self.best, "epoch": self.offset + epoch + 1})


class Snapshots(keras.callbacks.Callback):
    """Keeps the weights of every epoch after `after` (the tail of the schedule): ensemble candidates
    at no training cost (snapshot ensembles, Huang et al. 2017) and the terms of their average (SWA)."""

    def __init__(self, run: Path, after: int, offset: int, source):
        super().__init__()
        self.run, self.after, self.offset, self.source = run, after, offset, source

    def on_epoch_end(self, epoch, logs=None):
        if self.offset + epoch + 1 > self.after:
            save_weights(self.source, self.run / "checkpoint" / f"snapshot_e{self.offset + epoch + 1}.weights.h5")


class EpochLog(keras.callbacks.Callback):
    """A rich progress bar per epoch, one printed line of metrics, and history.csv (resume-safe)."""

    def __init__(self, run: Path, offset: int, steps: int, batch_size: int, console: Console):
        super().__init__()
        self.run, self.offset, self.steps, self.batch_size, self.console = run, offset, steps, batch_size, console
        self.progress = None

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.time()
        self.progress = Progress(TextColumn(f"epoch {self.offset + epoch + 1}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                                 TimeRemainingColumn(), console=self.console, transient=True)
        self.task = self.progress.add_task("train", total=self.steps, loss="")
        self.progress.start()

    def on_train_batch_end(self, batch, logs=None):
        self.trained = time.time()  # img/s counts training steps only, not the validation pass
        loss = (logs or {}).get("loss")
        self.progress.update(self.task, completed=batch + 1, loss=f"loss {loss:.4f}" if loss is not None else "")

    def on_epoch_end(self, epoch, logs=None):
        self.progress.stop()
        seconds = time.time() - self.started
        row = {"epoch": self.offset + epoch + 1, "seconds": round(seconds, 2),
               "img_per_s": round(self.steps * self.batch_size / (self.trained - self.started), 1),
               "lr": float(np.asarray(self.model.optimizer.learning_rate)),
               **{k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"}}
        self._append(row)
        adopt_library_files(self.run / "tb")  # TensorBoard's event files, as they are now
        shown = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "seconds", "lr", "img_per_s"))
        self.console.print(f"epoch {row['epoch']:>3}  {shown}  ({seconds:.0f} s, {row['img_per_s']:.0f} img/s)")

    def _append(self, row: dict) -> None:
        """Rewrite history.csv without rows from epochs being redone after a resume."""
        path = self.run / "history.csv"
        rows = list(csv.DictReader(path.open())) if path.exists() else []  # as text: rewritten as it was
        rows = [r for r in rows if int(r["epoch"]) < row["epoch"]] + [row]
        write_csv(path, [{k: r.get(k, "") for k in row} for r in rows])

