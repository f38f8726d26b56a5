"""`cellfuse train`: fit one recipe, top to bottom.

    recipe -> run directory -> data (split, checks) -> model -> initial-loss check
           -> stages (each: unfreeze, compile, fit with resumable backups) -> best.keras -> metrics

A run directory explains itself: recipe.toml as run, env.json, history.csv, tb/ (TensorBoard),
best.keras (no optimizer state), checkpoint/ (resumable), metrics.json, confusion_*.png, curves.png,
augmented.png (the first training batch), probs_*.npz (validation probabilities).

The training API that distill and sweep build on (a student is a run with its own compile_fn and
datasets; a sweep trial is a run with a pruning callback):

    train_recipe(recipe, extra_callbacks=...)          one recipe, top to bottom
    start = start_run(recipe, ...)                     strategy, split and checks, the run directory
    with discard_failed_start(start): ...              a start that fails before an epoch leaves nothing
    build_model, check_initial_loss, make_optimizer    the model, its sanity check, its optimizer
    fit_stages(model, recipe, split, run, strategy, console, train_ds=, val_ds=, compile_fn=, ...)
    finish_run(recipe, split, run, started, console)   best.keras, metrics, plots, summary.json

The parts live beside it: toolkit.batches (split, data and model checks, tf.data, Predictor),
toolkit.callbacks (every callback of a fit), toolkit.averaging (the inference model, snapshots, SWA,
WiSE-FT), toolkit.distribute (cluster, strategy, precision), toolkit.procs (child processes for
--parallel). The names above, and those distill uses from there, are importable from here.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from rich.console import Console

from toolkit import compat, consistency, report
from toolkit.augment import save_batch_grid
from toolkit.averaging import inference_model, save_snapshots, save_wise, weights_digest
from toolkit.backbones import backbone_spec, build_classifier, set_trainable
from toolkit.batches import (
    Predictor,
    Split,
    check_batch,
    check_data,
    check_initial_loss,
    class_weight,
    corrupt_training_rows,
    load_split,
    make_dataset,
    steps_per_epoch,
    warn,
)
from toolkit.callbacks import NaNGuard, calibration_images, make_callbacks, read_steered
from toolkit.data import save_npz
from toolkit.distribute import (
    Cluster,
    choose_strategy,
    cluster_from_env,
    describe_strategy,
    set_precision,
    worker_temp_root,
)
from toolkit.errors import CellfuseError
from toolkit.procs import run_all, spawn
from toolkit.recipe import Recipe, check_distinct_names, load_recipe, monitored_set
from toolkit.runs import (
    OUTPUTS,
    adopt_library_files,
    assign_by_path,
    check_same_recipe,
    folder_kind,
    load_model,
    load_weights,
    lock_output,
    make_own_dir,
    never_trained,
    prepare_run_dir,
    read_history,
    read_summary,
    remove_own,
    remove_scratch,
    save_model_atomic,
    save_weights,
    weights_by_path,
    write_json,
)

RUNS = OUTPUTS / "runs"


# ---------------------------------------------------------------- entry points

def train_many(jobs, *, resume=False, force=False, parallel=1, console=None, runs_root=None) -> list[dict]:
    """Train several recipes one after another, or `parallel` at once in their own processes.
    `jobs`: (recipe path, its --set overrides), as recipe.seeded makes them."""
    console = console or Console()
    jobs = [(load_recipe(p, overrides), list(overrides)) for p, overrides in jobs]  # all parsed before any trains
    check_distinct_names([recipe for recipe, _ in jobs])
    root = Path(runs_root or RUNS)
    if parallel > 1 and len(jobs) > 1:
        if cluster_from_env().workers > 1:
            raise CellfuseError("--parallel cannot be combined with a multi-worker TF_CONFIG")
        return train_parallel(jobs, resume, force, parallel, console, root)
    return [train_recipe(r, resume=resume, force=force, console=console, runs_root=root) for r, _ in jobs]


def train_recipe(recipe: Recipe, *, resume=False, force=False, console=None, runs_root=None,
                 extra_callbacks=()) -> dict:
    """One recipe, top to bottom. `extra_callbacks` join every stage's fit (e.g. a sweep's pruner,
    which may set `model.stop_training`)."""
    console = console or Console()
    start = start_run(recipe, runs_root, resume=resume, force=force, console=console)
    if start.complete is not None:
        return start.complete
    with discard_failed_start(start):
        with start.strategy.scope():
            model = build_model(recipe, start.split.train.n_classes)
            if recipe.train.init_from:
                assign_by_path(model, weights_by_path(load_model(recipe.train.init_from, compile=False)),
                               recipe.train.init_from)
                console.print(f"starting from the weights of {recipe.train.init_from}")
        check_initial_loss(model, start.split.val["val"], console, trained=bool(recipe.train.init_from))
        fit_stages(model, recipe, start.split, start.run, start.strategy, console, extra_callbacks=extra_callbacks,
                   **consistency.fit_arguments(recipe, start.split, compile_model))  # AugMix views, JSD loss
    if not start.cluster.is_chief:
        return finish_worker(model, recipe, start, console)
    return finish_run(recipe, start.split, start.run, start.started, console)


@dataclass
class RunStart:
    """What a training (or distillation) process needs once its run directory is ready."""
    run: Path  # where this process writes: the run directory, or a worker's temporary folder
    split: Split | None  # None when the run was already complete
    strategy: object  # a tf.distribute strategy
    cluster: Cluster
    started: float
    complete: dict | None = None  # the summary of a run that had already finished (--resume)
    created: bool = False  # this process made the run directory (so it removes it if the start fails)


def start_run(recipe: Recipe, runs_root=None, *, resume=False, force=False, console=None, inputs=(),
              kind: str = "run") -> RunStart:
    """Strategy, validated inputs, then the run directory (a folder of `kind`; `inputs` are files the
    command reads besides the recipe's, which the run directory must not hold).

    The strategy comes first: MultiWorkerMirroredStrategy must exist before any other TensorFlow op.
    A complete run (summary.json, written last) is returned as is on --resume.
    """
    console = console or Console()
    started = time.time()
    cluster = cluster_from_env()
    strategy = choose_strategy(recipe.train, console, cluster)
    root = Path(runs_root or RUNS)
    if not cluster.is_chief:
        root = worker_temp_root(root, cluster)  # Keras' multi-worker convention: only the chief writes
    existing = read_summary(root / recipe.name)
    if existing is not None and resume and folder_kind(root / recipe.name) == kind:
        lock_output(root / recipe.name)
        check_same_recipe(root / recipe.name, recipe)
        console.print(f"[green]{root / recipe.name}[/] is already complete; nothing to resume.")
        return RunStart(root / recipe.name, None, strategy, cluster, started, complete=existing)
    _seed_everything(recipe, console)
    split = load_split(recipe, console)
    check_model_config(recipe)
    inputs = [recipe.path, recipe.data.train, *recipe.data.extra_val, recipe.train.init_from or None, *inputs]
    run, created = prepare_run_dir(recipe, root, resume, force, inputs=inputs, kind=kind,
                                   extra_env={"distribution": describe_strategy(strategy, cluster)})
    start = RunStart(run, split, strategy, cluster, started, created=created)
    with discard_failed_start(start):
        check_data(split, recipe, console)
        start.split = replace(split, train=corrupt_training_rows(split.train, recipe, console))
        set_precision(recipe.train, console)
    return start


@contextlib.contextmanager
def discard_failed_start(start: RunStart):
    """A run directory this process made and that never finished an epoch holds nothing worth
    keeping: on any failure (Ctrl-C included) the command that made it removes it, so a corrected
    retry is not refused. Nothing else ever guesses that a folder is a failed start."""
    try:
        yield
    except BaseException:
        if start.created and never_trained(start.run):
            adopt_library_files(start.run / "tb")  # written by this process since it made the run
            remove_own(start.run)
        raise


# ---------------------------------------------------------------- run directory

def _seed_everything(recipe: Recipe, console: Console) -> None:
    """Python, NumPy and TensorFlow seeds; with train.deterministic, TensorFlow's op determinism too and
    a seeded global generator (keras-cv's unseeded layers draw from it). Set both ways: a process that
    runs several recipes (tests, sweeps) gets each one's own setting."""
    import keras
    import tensorflow as tf

    cfg = recipe.train
    keras.utils.set_random_seed(cfg.seed)
    compat.set_op_determinism(cfg.deterministic)
    if not cfg.deterministic:
        return
    tf.random.set_global_generator(tf.random.Generator.from_seed(cfg.seed))
    console.print("deterministic: op determinism on, random augmentation drawn one batch at a time (slower)")
    if recipe.augment["augmix"]:  # its chains draw inside a tf.while_loop whose iterations overlap
        warn(console, "train.deterministic does not cover \\[augment] augmix: keras-cv's AugMix draws in an "
                      "order that varies, so this run will not repeat bit for bit")


def check_model_config(recipe: Recipe) -> None:
    """The cheap part of building the model (the backbone's name), before the run directory exists."""
    backbone_spec(recipe.model.backbone, recipe.model.width, recipe.model.depth)


def build_model(recipe: Recipe, n_classes: int):
    """The recipe's classifier. A run started from another's weights (train.init_from) has every weight
    replaced, so ImageNet's are not fetched for it: a corruption-tuned copy needs no download."""
    config = replace(recipe.model, weights="none") if recipe.train.init_from else recipe.model
    return build_classifier(config, n_classes)


# ---------------------------------------------------------------- fitting

def fit_stages(model, recipe: Recipe, split: Split, run: Path, strategy, console: Console, *,
               train_ds=None, val_ds=None, compile_fn=None, extra_callbacks=(), track_extra_val=False) -> None:
    """Each stage unfreezes more of the backbone; a finished stage is never redone on resume.

    `compile_fn(model, recipe, stage, steps)` compiles and returns what `fit` runs: the model itself,
    or (distillation) a wrapper around it. Checkpoints always hold `model`'s weights alone, chosen by
    the macro one-vs-rest AUC (or accuracy) of `model` on the validation split: the figure reported.
    `extra_callbacks` run after cellfuse's own, in every stage. `track_extra_val` adds each extra
    validation set's accuracy to every epoch's history row (costs one forward pass over each).
    """
    ckpt = make_own_dir(run / "checkpoint", "part")
    train_ds = train_ds or make_dataset(split.train, recipe, training=True)
    first = next(iter(train_ds))
    check_batch(first[0])
    if not (run / "augmented.png").exists():  # what training sees, to look at before trusting the run
        save_batch_grid(first, run / "augmented.png", split.train.class_names,
                        title=f"{recipe.name}: the first training batch, as the model sees it")
    steps = steps_per_epoch(recipe, len(split.train))
    # BatchNorm re-estimation for EMA: 512 training images, or one epoch's when an epoch holds fewer
    calibration = calibration_images(train_ds, min(512, steps * recipe.train.batch_size)) if recipe.train.ema else None
    val_ds = val_ds or make_dataset(split.val["val"], recipe, training=False, validation_augment=True)
    compile_fn = compile_fn or compile_model
    predict = Predictor(model)  # traced once for every stage's validation passes
    offset = 0
    for i, stage in enumerate(recipe.train.stages):
        done = ckpt / f"stage{i}.weights.h5"
        if done.exists():
            offset += stage.epochs
            continue
        if i > 0:
            load_weights(model, ckpt / f"stage{i - 1}.weights.h5")
        with strategy.scope():
            set_trainable(model, stage.unfreeze, recipe.train.freeze_batchnorm)
            fitted = compile_fn(model, recipe, stage, steps)
        console.print(f"stage {i + 1}/{len(recipe.train.stages)}: {stage.epochs} epoch(s) at lr {stage.lr:g}, "
                      f"backbone {stage.unfreeze:.0%} trainable, "
                      f"{sum(int(np.prod(w.shape)) for w in model.trainable_weights):,} trainable parameters")
        callbacks = make_callbacks(recipe, run, ckpt / f"stage{i}", offset, steps, console, source=model,
                                   predict=predict, val=split.val["val"], strategy=strategy, extra=extra_callbacks,
                                   tracked=tracked_sets(recipe, split, track_extra_val), calibration=calibration)
        with deterministic_kernels(recipe):
            fitted.fit(train_ds, validation_data=val_ds, epochs=stage.epochs, steps_per_epoch=steps,
                       callbacks=callbacks, verbose=0, shuffle=False, class_weight=class_weight(recipe, split.train))
        nan = next((c for c in callbacks if isinstance(c, NaNGuard)), None)
        if nan and nan.where:
            raise CellfuseError(f"loss became NaN at {nan.where}; training stopped. Lower the learning rate "
                                "(stage lr), check the inputs, or turn off mixed precision.")
        save_weights(model, done)
        offset += stage.epochs


def tracked_sets(recipe: Recipe, split: Split, every: bool) -> dict:
    """The extra validation sets scored every epoch: all of them, or only the one train.monitor names."""
    steer = monitored_set(recipe)
    return {name: data for name, data in split.val.items() if name != "val" and (every or name == steer)}


@contextlib.contextmanager
def deterministic_kernels(recipe: Recipe):
    """Under train.deterministic an op with no deterministic kernel on this device (some GPU ops) stops
    training with TensorFlow's UnimplementedError: said in one line, with the way out."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.UnimplementedError as e:
        if not recipe.train.deterministic:
            raise
        raise CellfuseError(f"{recipe.path}: train.deterministic = true, but an op has no deterministic kernel on "
                            f"this device ({e.message.splitlines()[0]}); set train.deterministic = false") from None


def compile_model(model, recipe: Recipe, stage, steps: int):
    import keras

    cfg = recipe.train
    model.compile(
        optimizer=make_optimizer(cfg, stage, steps),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],  # val_auc: ValidationAUC
        jit_compile=cfg.xla,
    )
    return model


def make_optimizer(cfg, stage, steps: int):
    import keras

    total = max(1, stage.epochs * steps)
    lr = stage.lr
    if cfg.schedule == "cosine":
        warmup = min(int(cfg.warmup_epochs * steps), total - 1)
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=stage.lr * (0.1 if warmup else 1.0), decay_steps=total - warmup,
            alpha=0.01, warmup_target=stage.lr if warmup else None, warmup_steps=warmup)
    common = {"learning_rate": lr, "weight_decay": cfg.weight_decay, "use_ema": cfg.ema}
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(**common)
    if cfg.optimizer == "lion":
        return keras.optimizers.Lion(**common)
    return keras.optimizers.SGD(momentum=0.9, nesterov=True, **common)


# ---------------------------------------------------------------- results

def finish_run(recipe: Recipe, split: Split, run: Path, started: float, console: Console) -> dict:
    """best.keras, metrics for every validation set, plots, and a summary."""
    best = run / "checkpoint" / "best.weights.h5"
    last_stage = run / "checkpoint" / f"stage{len(recipe.train.stages) - 1}.weights.h5"
    model = inference_model(recipe, split.train.n_classes, last_stage)
    final = weights_digest(model.get_weights())
    if best.exists():
        load_weights(model, best)
    save_model_atomic(model, run / "best.keras")
    adopt_library_files(run / "tb")
    candidates = save_snapshots(recipe, split, run, best=weights_digest(model.get_weights()))
    predict = Predictor(model)  # one trace for the blends and the metrics
    wise = save_wise(recipe, split, run, model, predict) if recipe.train.init_from else None
    metrics = {}
    for name, data in split.val.items():
        probs = predict(data.images)
        metrics[name] = report.classification_metrics(data.labels, probs, data.class_names)
        save_npz(run / f"probs_{name}.npz", probs=probs, labels=data.labels, index=data.index)
        report.plot_confusion(metrics[name]["confusion"], data.class_names, run / f"confusion_{name}.png",
                              title=f"{recipe.name} on {name}")
    history = read_history(run)
    if history:
        report.plot_curves(history, run / "curves.png", stages=[s.epochs for s in recipe.train.stages])
    best = json.loads((run / "checkpoint" / "best.json").read_text()) if (run / "checkpoint" / "best.json").exists() else {}
    steered = steered_figures(recipe, split, run, metrics)
    summary = {"name": recipe.name, "run": str(run), "params": int(model.count_params()),
               "final_weights_sha1": final,
               "best_epoch": best.get("epoch"), "monitor": recipe.train.monitor, "best_value": best.get("value"),
               "steered": steered, "seconds": round(time.time() - started, 1), "snapshots": candidates, "wise": wise,
               "train_img_per_s": float(np.median([r["img_per_s"] for r in history])) if history else None,
               "metrics": {k: {m: v[m] for m in ("n", "accuracy", "macro_f1", "auc_ovr", "nll", "ece")}
                           for k, v in metrics.items()}}
    write_json(run / "metrics.json", metrics)
    write_json(run / "summary.json", summary)  # last: its presence marks the run complete
    console.print(report.metrics_table({k: v for k, v in metrics.items()}, title=f"{recipe.name}: best epoch "
                                       f"{best.get('epoch')} by {recipe.train.monitor}"))
    console.print(report.per_class_table(metrics["val"], title="validation split, per class"))
    if steered:
        console.print(f"[yellow]{steered['set']} picked the checkpoint, so its {steered['accuracy']:.3f} is chosen on; "
                      f"picked on half its images and scored on the other half: {steered['cross_fitted_accuracy']:.3f} "
                      "(2-fold, cross-fitted)[/]")
    console.print(f"run directory: {run}")
    return summary


def steered_figures(recipe: Recipe, split: Split, run: Path, metrics: dict) -> dict | None:
    """For a checkpoint picked on an extra validation set (train.monitor): that set's figure, chosen on,
    beside the honest one (cross_fitted_checkpoint)."""
    name = monitored_set(recipe)
    record = read_steered(run / "checkpoint" / "steered.npz") if name else {}
    if not record:
        return None
    return {"set": name, "accuracy": metrics[name]["accuracy"],
            "cross_fitted_accuracy": cross_fitted_checkpoint(record, split.val[name].labels)}


def cross_fitted_checkpoint(correct: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Accuracy with the epoch picked on one half of the images and scored on the other, both ways.

    `correct`: e<epoch> -> which images that epoch got right. The pick is BestCheckpoint's: the first
    epoch with the highest accuracy. A set that picked the checkpoint flatters it (the best of many
    noisy epochs); this figure does not, as the ensemble's cross-fitted selection."""
    by_epoch = np.stack([correct[k] for k in sorted(correct, key=lambda k: int(k[1:]))])  # (epochs, n)
    right = 0
    for fit_rows, score_rows in report.two_folds(np.asarray(labels)):
        picked = int(np.argmax(by_epoch[:, fit_rows].mean(1)))  # argmax: the first of equals
        right += int(by_epoch[picked, score_rows].sum())
    return right / by_epoch.shape[1]


def finish_worker(model, recipe: Recipe, start: RunStart, console: Console) -> dict:
    """A non-chief worker's end: its temporary folder goes; it reports the digest of its final
    weights, which equals the chief's when the workers stayed in sync."""
    summary = {"name": recipe.name, "role": "worker", "task": describe_strategy(start.strategy, start.cluster)["task"],
               "final_weights_sha1": weights_digest(model.get_weights())}
    remove_scratch(start.run)
    console.print(f"worker {summary['task']} done; the chief wrote the run directory")
    return summary


# ---------------------------------------------------------------- several recipes at once

def train_parallel(jobs: list[tuple[Recipe, list[str]]], resume, force, parallel, console, root: Path) -> list[dict]:
    """One process per recipe (with its overrides), `parallel` at a time (toolkit.procs), each on the least
    busy GPU when there are GPUs. A failed recipe does not stop the others; all are reported together."""
    logs = make_own_dir(root / "logs", "logs")
    results, failed = {}, []

    def start(job, gpu, share_gpu):
        _, (recipe, overrides) = job
        cmd = [sys.executable, "-m", "toolkit", "train", str(recipe.path), "--json"]
        cmd += [a for o in overrides for a in ("--set", o)] + (["--resume"] if resume else []) + (["--force"] if force else [])
        if Path(root) != RUNS:
            cmd += ["--out", str(root)]
        log = logs / f"{recipe.name}.log"
        return spawn(cmd, log, stdout=log.with_suffix(".json"), gpu=gpu, share_gpu=share_gpu)

    def finished(job, proc):
        i, (recipe, _) = job
        log = logs / f"{recipe.name}.log"
        if proc.returncode != 0:
            failed.append(f"{recipe.path} (exit {proc.returncode}; log {log})")
            console.print(f"[red]failed[/] {recipe.path}: see {log}")
            return
        results[i] = json.loads(log.with_suffix(".json").read_text().strip().splitlines()[-1])[0]
        console.print(f"[green]done[/] {recipe.path}")

    run_all(enumerate(jobs), parallel, start, finished)
    if failed:
        raise CellfuseError(f"{len(failed)} of {len(jobs)} recipe(s) failed: " + "; ".join(failed))
    return [results[i] for i in sorted(results)]
