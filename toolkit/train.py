"""`cellfuse train`: fit one recipe, top to bottom.

    recipe -> run directory -> data (split, checks) -> model -> initial-loss check
           -> stages (each: unfreeze, compile, fit with resumable backups) -> best.keras -> metrics

A run directory explains itself: recipe.toml as run, env.json, history.csv, tb/ (TensorBoard),
best.keras (no optimizer state), checkpoint/ (resumable), metrics.json, confusion_*.png, curves.png,
probs_*.npz (validation probabilities).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tomllib
from rich.console import Console
from rich.panel import Panel

from toolkit import report
from toolkit.data import Dataset, load_dataset, one_hot, save_npz, stratified_split
from toolkit.errors import CellfuseError
from toolkit.recipe import Recipe, load_recipe
from toolkit.runs import (
    MANIFEST,
    OUTPUTS,
    adopt_library_files,
    atomic_write_text,
    env_info,
    folder_kind,
    load_weights,
    lock_output,
    make_own_dir,
    refuse_inputs_inside,
    remove_own,
    remove_scratch,
    save_model_atomic,
    save_weights,
    write_csv,
    write_json,
)

RUNS = OUTPUTS / "runs"


@dataclass
class Split:
    train: Dataset
    val: dict[str, Dataset]  # "val" (the split) first, then each extra validation file by stem


# ---------------------------------------------------------------- entry points

def train_many(paths, overrides=(), *, resume=False, force=False, parallel=1, console=None,
               runs_root=None) -> list[dict]:
    """Train several recipes one after another, or `parallel` at once in their own processes."""
    console = console or Console()
    recipes = [load_recipe(p, overrides) for p in paths]  # parse all first: fail before any training
    _check_distinct_names(recipes)
    root = Path(runs_root or RUNS)
    if parallel > 1 and len(recipes) > 1:
        if cluster_from_env().workers > 1:
            raise CellfuseError("--parallel cannot be combined with a multi-worker TF_CONFIG")
        return train_parallel(recipes, overrides, resume, force, parallel, console, root)
    return [train_recipe(r, resume=resume, force=force, console=console, runs_root=root) for r in recipes]


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
        check_initial_loss(model, start.split.val["val"], recipe, console)
        # [train] consistency > 0: AugMix views and the JSD loss
        from toolkit.consistency import fit_arguments

        fit_stages(model, recipe, start.split, start.run, start.strategy, console,
                   extra_callbacks=extra_callbacks, **fit_arguments(recipe, start.split))
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
    _seed_everything(recipe.train.seed)
    split = load_split(recipe, console)
    check_model_config(recipe)
    inputs = [recipe.path, recipe.data.train, *recipe.data.extra_val, *inputs]
    run, created = prepare_run_dir(recipe, root, resume, force, inputs=inputs, kind=kind,
                                   extra_env={"distribution": describe_strategy(strategy, cluster)})
    start = RunStart(run, split, strategy, cluster, started, created=created)
    with discard_failed_start(start):
        check_data(split, recipe, console)
        _set_precision(recipe.train, console)
    return start


@contextlib.contextmanager
def discard_failed_start(start: RunStart):
    """A run directory this process made and that never finished an epoch holds nothing worth
    keeping: on any failure (Ctrl-C included) the command that made it removes it, so a corrected
    retry is not refused. Nothing else ever guesses that a folder is a failed start."""
    try:
        yield
    except BaseException:
        if start.created and _never_trained(start.run):
            adopt_library_files(start.run / "tb")  # written by this process since it made the run
            remove_own(start.run)
        raise


def _check_distinct_names(recipes: list[Recipe]) -> None:
    """Two recipes with one name would train into one run directory."""
    seen = {}
    for r in recipes:
        if r.name in seen:
            raise CellfuseError(f"{seen[r.name]} and {r.path} both name their run {r.name!r}; "
                                "give one a different `name` (or --set name=...)")
        seen[r.name] = r.path


# ---------------------------------------------------------------- run directory

def prepare_run_dir(recipe: Recipe, root: Path, resume: bool, force: bool, *, inputs=(), kind="run",
                    extra_env=None) -> tuple[Path, bool]:
    """The run directory, locked for this process: a new one (made True), or the existing run of the
    same recipe on --resume, or a replaced one on --force. Anything that is not a cellfuse run of this
    kind, or that holds an input, is refused in one line before anything is written."""
    run = root / recipe.name
    lock_output(run)
    exists = run.exists() or run.is_symlink()
    if exists:
        _check_is_run(run, kind)
        if resume:
            check_same_recipe(run, recipe)
        elif force:
            refuse_inputs_inside(run, inputs)
            remove_own(run, kind)
        else:
            raise CellfuseError(f"{run}: already exists; --resume to continue it, --force to start over")
    made = not (exists and resume)
    if made:
        if not root.exists():
            make_own_dir(root, "runs")
        make_own_dir(run, kind)
        atomic_write_text(run / "recipe.toml", recipe.to_toml())
    write_json(run / "env.json", {**env_info(), **(extra_env or {})})
    return run, made


def _check_is_run(run: Path, kind: str) -> None:
    found = folder_kind(run)
    if found != kind:
        what = f"a cellfuse {found} output" if found else "a folder cellfuse did not make"
        raise CellfuseError(f"{run}: is {what}, not a {kind}; choose another name (--set name=...) or --out")


def check_same_recipe(run: Path, recipe: Recipe) -> None:
    """--resume continues the recipe a run started with, or nothing (compared as parsed TOML, so a
    snapshot written by an older cellfuse compares by value, not by layout)."""
    snapshot = run / "recipe.toml"
    if not snapshot.exists():
        return
    changed = changed_keys(tomllib.loads(snapshot.read_text()), tomllib.loads(recipe.to_toml()))
    if changed:
        raise CellfuseError(f"{run}: the recipe changed since this run started ({'; '.join(changed[:6])}); "
                            f"resume needs the same recipe: `cellfuse train {snapshot} --out {run.parent} "
                            "--resume` continues it as it was, --force starts over")


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two parsed recipes, as "key: old -> new"."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _never_trained(run: Path) -> bool:
    """No finished epoch (history.csv) and no backup inside one: nothing a resume could use."""
    backups = run / "checkpoint"
    return not (run / "history.csv").exists() and not (
        backups.is_dir() and any(f.is_file() and f.name != MANIFEST for f in backups.rglob("*")))


def read_summary(run: Path) -> dict | None:
    """A finished run's summary, or None. summary.json is written last: it marks completion."""
    try:
        return json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- data

def load_split(recipe: Recipe, console: Console) -> Split:
    data = load_dataset(recipe.data.train, n_classes=recipe.data.n_classes)
    if recipe.data.limit:
        data = data.subset(np.arange(min(recipe.data.limit, len(data))))
    train_rows, val_rows = stratified_split(data.labels, recipe.data.val_fraction, recipe.data.split_seed)
    val = {"val": data.subset(val_rows)}
    for path in recipe.data.extra_val:
        name = Path(path).stem
        if name in val:  # "val" is the held-out split itself: a file named so would replace it
            raise CellfuseError(f"{recipe.path}: data.extra_val names {path}, whose name {name!r} is already "
                                "taken (the split's own is 'val'); rename the file")
        val[name] = load_dataset(path, n_classes=recipe.data.n_classes)
    console.print(f"data: {len(train_rows)} train / {len(val_rows)} val rows of {data.path}"
                  + "".join(f"; {name}: {len(d)}" for name, d in val.items() if name != "val"))
    return Split(data.subset(train_rows), val)


def check_data(split: Split, recipe: Recipe, console: Console) -> None:
    """Class balance and train/validation leakage through duplicates: reported loudly."""
    counts = np.bincount(split.train.labels, minlength=split.train.n_classes)
    console.print("train class counts: " + ", ".join(
        f"{name} {c}" for name, c in zip(split.train.class_names, counts, strict=False)))
    if counts.min() == 0:
        _warn(console, f"class(es) {[n for n, c in zip(split.train.class_names, counts, strict=False) if c == 0]} "
                       "have no training images")
    elif counts.max() / counts.min() > 10:
        _warn(console, f"classes are imbalanced {counts.max() / counts.min():.0f}:1; "
                       "consider train.class_weights = \"balanced\"")
    train_hashes = _phash(split.train.images)
    for name, val in split.val.items():
        shared = leaked_rows(train_hashes, _phash(val.images))
        if shared:
            _warn(console, f"{shared} of {len(val)} '{name}' images duplicate a training image "
                           "(exactly or perceptually): validation scores will be optimistic. "
                           "Run `cellfuse clean` on the training file first.")


def _phash(images: np.ndarray) -> np.ndarray:
    from toolkit.clean import phash_bits

    return phash_bits(images, Console(quiet=True))


def leaked_rows(train_hashes: np.ndarray, val_hashes: np.ndarray) -> int:
    """How many validation images have a near-identical (phash) twin in training."""
    from toolkit.clean import DEFAULT_THRESHOLD, hash_groups

    groups = hash_groups(np.concatenate([train_hashes, val_hashes]), DEFAULT_THRESHOLD)
    return int(np.isin(groups[len(train_hashes):], groups[:len(train_hashes)]).sum())


def make_dataset(data: Dataset, recipe: Recipe, *, training: bool, validation_augment=False, targets=None):
    """uint8 arrays -> float32 0..255 batches with one-hot labels (or `targets`); training batches augmented."""
    import tensorflow as tf


    cfg = recipe.train
    targets = one_hot(data.labels, data.n_classes) if targets is None else targets
    ds = tf.data.Dataset.from_tensor_slices((data.images, targets))
    if training:
        ds = ds.shuffle(len(data), seed=cfg.seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(cfg.batch_size, drop_remainder=training)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    if training or validation_augment:
        augmenter = _float32_augmenter(recipe, targets.shape[1], training)
        if augmenter is not None:
            ds = ds.map(augmenter, num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()  # several workers: each takes its share of every global batch
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _float32_augmenter(recipe: Recipe, n_classes: int, training: bool):
    """Augmentation layers built under float32: made under mixed_float16 they compute 0..255 pixels
    in float16 and the first batch's loss is NaN."""
    import keras

    from toolkit.augment import make_batch_augmenter

    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        return make_batch_augmenter(recipe.augment, n_classes, seed=recipe.train.seed, validation=not training)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def steps_per_epoch(recipe: Recipe, n_train: int) -> int:
    return recipe.train.steps_per_epoch or max(1, n_train // recipe.train.batch_size)


# ---------------------------------------------------------------- model and devices

def _seed_everything(seed: int) -> None:
    import keras

    keras.utils.set_random_seed(seed)


@dataclass(frozen=True)
class Cluster:
    """This process's place in a TF_CONFIG cluster (one worker, index 0, when there is none)."""
    workers: int = 1
    task_type: str = "worker"
    task_index: int = 0
    has_chief: bool = False  # TF_CONFIG names a "chief" task apart from the workers

    @property
    def is_chief(self) -> bool:  # an explicit "chief" task, else worker 0 (TensorFlow's rule)
        return self.task_type == "chief" or (self.task_type == "worker" and self.task_index == 0
                                             and not self.has_chief)


def cluster_from_env() -> Cluster:
    """Read TF_CONFIG, the variable every TF cluster tool (TFJob, Vertex AI, SageMaker) sets."""
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return Cluster()
    try:
        config = json.loads(text)
        spec, task = config.get("cluster", {}), config.get("task", {})
        workers = len(spec.get("worker", [])) + len(spec.get("chief", []))
        return Cluster(workers=workers, task_type=str(task.get("type", "worker")),
                       task_index=int(task.get("index", 0)), has_chief="chief" in spec)
    except (ValueError, AttributeError, TypeError) as e:
        raise CellfuseError(f"TF_CONFIG: not a valid cluster description ({e}); expected "
                            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}') from None


def worker_temp_root(root: Path, cluster: Cluster) -> Path:
    """Where a non-chief worker writes: a folder of its own beside the runs, kept until the run ends
    so that its backups survive a restart (its weights equal the chief's; nothing there is a result)."""
    return make_own_dir(root / ".workertemp", "scratch") / f"{cluster.task_type}{cluster.task_index}"


_STRATEGIES: dict = {}  # one multi-worker strategy per process: TensorFlow allows no second


def choose_strategy(cfg, console: Console, cluster: Cluster | None = None):
    """MultiWorkerMirroredStrategy for a TF_CONFIG cluster; MirroredStrategy over several GPUs
    (or when asked: two logical CPUs in tests); else the default strategy."""
    import tensorflow as tf

    cluster = cluster or cluster_from_env()
    if cfg.distribute == "multi-worker" or (cfg.distribute == "auto" and cluster.workers > 1):
        return _multi_worker_strategy(cluster, console)
    gpus = tf.config.list_logical_devices("GPU")
    if cfg.distribute == "mirrored" or (cfg.distribute == "auto" and len(gpus) > 1):
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        console.print(f"distribution: MirroredStrategy over {len(devices)} devices")
        # CPU replicas (tests) reduce on one device: TF's collective ops mix up instances when several
        # CPU strategies live in one process ("shape mismatch in the collective instance")
        reduce = None if gpus else tf.distribute.ReductionToOneDevice()
        return tf.distribute.MirroredStrategy(devices, cross_device_ops=reduce)
    return tf.distribute.get_strategy()


def _multi_worker_strategy(cluster: Cluster, console: Console):
    import tensorflow as tf

    if "multi-worker" not in _STRATEGIES:
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        except (RuntimeError, ValueError) as e:
            raise CellfuseError(f"MultiWorkerMirroredStrategy could not start ({e}); it needs TF_CONFIG "
                                "naming the workers, set before the process starts") from None
        _STRATEGIES["multi-worker"] = _reduce_nested(strategy)
    strategy = _STRATEGIES["multi-worker"]
    console.print(f"distribution: MultiWorkerMirroredStrategy, {cluster.workers} workers, this is "
                  f"{cluster.task_type} {cluster.task_index} ({'chief' if cluster.is_chief else 'not chief'}), "
                  f"{strategy.num_replicas_in_sync} replicas in sync")
    return strategy


def _reduce_nested(strategy):
    """Two gaps in Keras 3's multi-worker path (keras-team/keras#20585), closed here: fit reduces a
    whole (images, labels) batch in one `strategy.reduce` call, which MultiWorkerMirroredStrategy takes
    one tensor at a time; and it averages per-replica scalars (loss, metrics) along axis 0, which a
    scalar lacks (the mean over replicas is axis None)."""
    import tensorflow as tf

    reduce = strategy.reduce

    def reduce_each(op, value, axis=None):
        def one(v):
            rank = strategy.experimental_local_results(v)[0].shape.rank
            return reduce(op, v, axis=axis if rank else None)
        return tf.nest.map_structure(one, value)

    strategy.reduce = reduce_each
    return strategy


def is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def describe_strategy(strategy, cluster: Cluster) -> dict:
    """For env.json: how this run was spread (replicas in sync, workers, this task's role). TF's class
    behind MultiWorkerMirroredStrategy is called CollectiveAllReduceStrategy: named by its public name."""
    name = "MultiWorkerMirroredStrategy" if is_multi_worker(strategy) else type(strategy).__name__
    return {"strategy": name, "replicas": int(strategy.num_replicas_in_sync),
            "workers": cluster.workers, "task": f"{cluster.task_type}{cluster.task_index}",
            "role": "chief" if cluster.is_chief else "worker"}


def check_model_config(recipe: Recipe) -> None:
    """The cheap part of building the model (the backbone's name), before the run directory exists."""
    from toolkit.backbones import backbone_spec

    backbone_spec(recipe.model.backbone, recipe.model.width, recipe.model.depth)


def _set_precision(cfg, console: Console) -> None:
    import keras
    import tensorflow as tf

    on = cfg.mixed_precision == "on" or (cfg.mixed_precision == "auto"
                                         and bool(tf.config.list_physical_devices("GPU")))
    keras.mixed_precision.set_global_policy("mixed_float16" if on else "float32")
    if on:
        console.print("mixed precision: float16 compute, float32 weights and probabilities")


def build_model(recipe: Recipe, n_classes: int):
    from toolkit.backbones import build_classifier

    return build_classifier(recipe.model, n_classes)


def inference_model(recipe: Recipe, n_classes: int, checkpoint: Path):
    """The trained weights in a fresh float32 model with no optimizer: what best.keras holds."""
    import keras

    from toolkit.backbones import build_classifier

    keras.mixed_precision.set_global_policy("float32")
    model = build_classifier(dataclasses.replace(recipe.model, weights="none"), n_classes)
    load_weights(model, checkpoint)
    return model


# ---------------------------------------------------------------- sanity checks

def _warn(console: Console, text: str) -> None:
    console.print(Panel(text, title="WARNING", border_style="bold red"))


def check_initial_loss(model, val: Dataset, recipe: Recipe, console: Console) -> float:
    """Before training, the loss should be near ln(n_classes): far off means broken inputs or head."""
    import keras

    rows = np.arange(min(len(val), 256))
    probs = model.predict(val.images[rows].astype(np.float32), verbose=0, batch_size=64)
    if not np.isfinite(probs).all():
        raise CellfuseError("the untrained model outputs NaN: check model.weights and the input range")
    loss = float(keras.losses.CategoricalCrossentropy()(one_hot(val.labels[rows], val.n_classes), probs))
    expected = math.log(val.n_classes)
    if abs(loss - expected) > 0.5 * expected:
        _warn(console, f"initial loss {loss:.3f} is far from ln({val.n_classes}) = {expected:.3f}: "
                       "the inputs may be scaled twice, channels flipped, or the head mis-initialised")
    else:
        console.print(f"initial loss {loss:.3f} (ln({val.n_classes}) = {expected:.3f}): ok")
    return loss


def check_batch(images, console: Console) -> None:
    """The first augmented batch: channels-last, 0..255, not 0..1."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise CellfuseError(f"training batches have shape {x.shape}; expected (batch, H, W, 3)")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 255.5:
        raise CellfuseError(f"augmented training batch spans {lo:.1f}..{hi:.1f}; expected 0..255")
    if hi <= 1.5:
        raise CellfuseError(f"augmented training batch spans {lo:.2f}..{hi:.2f}: looks like 0..1, expected 0..255")


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
    from toolkit.backbones import set_trainable

    ckpt = make_own_dir(run / "checkpoint", "part")
    train_ds = train_ds or make_dataset(split.train, recipe, training=True)
    check_batch(next(iter(train_ds))[0], console)
    calibration = _calibration_images(train_ds) if recipe.train.ema else None
    val_ds = val_ds or make_dataset(split.val["val"], recipe, training=False, validation_augment=True)
    compile_fn = compile_fn or compile_model
    steps = steps_per_epoch(recipe, len(split.train))
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
                                   val=split.val["val"], strategy=strategy, extra=extra_callbacks,
                                   tracked={k: v for k, v in split.val.items() if k != "val"} if track_extra_val else {},
                                   calibration=calibration)
        fitted.fit(train_ds, validation_data=val_ds, epochs=stage.epochs, steps_per_epoch=steps,
                  callbacks=callbacks, verbose=0, shuffle=False, class_weight=_class_weight(recipe, split.train))
        nan = next((c for c in callbacks if isinstance(c, NaNGuard)), None)
        if nan and nan.where:
            raise CellfuseError(f"loss became NaN at {nan.where}; training stopped. Lower the learning rate "
                                "(stage lr), check the inputs, or turn off mixed precision.")
        save_weights(model, done)
        offset += stage.epochs


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


def _class_weight(recipe: Recipe, train: Dataset):
    if recipe.train.class_weights == "none":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(train.labels)
    weights = compute_class_weight("balanced", classes=present, y=train.labels)
    return {int(c): float(w) for c, w in zip(present, weights, strict=False)}


def make_callbacks(recipe: Recipe, run: Path, backup: Path, offset: int, steps: int, console, source, *,
                   val: Dataset | None = None, strategy=None, extra=(), calibration, tracked=None):
    """Order matters: backups restore first, EMA swaps in before anything reads the weights, val_auc is
    computed before the checkpoint, plateau and early stopping read it."""
    import keras

    cfg = recipe.train
    callbacks = [Backup(str(make_own_dir(backup, "part")), console, save_freq=cfg.checkpoint_every)]
    if strategy is not None and is_multi_worker(strategy):
        callbacks.append(ChiefState(strategy))
    if strategy is not None and strategy.num_replicas_in_sync > 1:
        callbacks.append(AverageMovingStats(strategy, source))
    if cfg.ema:  # before the checkpoint callbacks, so they see the averaged weights
        callbacks.append(SwapEMAWithBatchNorm(source, calibration, strategy=strategy))
    if val is not None:
        callbacks.append(ValidationAUC(source, val))
    if tracked:
        callbacks.append(TrackedAccuracy(source, tracked))
    callbacks += [NaNGuard(offset), BestCheckpoint(run, cfg.monitor, offset, source),
                  keras.callbacks.TensorBoard(str(make_own_dir(run / "tb", "part")), profile_batch=0),
                  EpochLog(run, offset, steps, cfg.batch_size, console)]  # after TensorBoard: adopts its files
    if cfg.schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(cfg.monitor, mode="max", factor=0.3, patience=2))
    if cfg.early_stopping:
        callbacks.append(keras.callbacks.EarlyStopping(cfg.monitor, mode="max", patience=cfg.early_stopping))
    return callbacks + list(extra)


def _callback_base(name: str = "Callback"):
    """A keras.callbacks base class, by name."""
    import keras

    return getattr(keras.callbacks, name)


def _calibration_images(train_ds, n: int = 512) -> np.ndarray:
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


class Backup(_callback_base("BackupAndRestore")):
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
        except (OSError, json.JSONDecodeError) as e:
            if folder_kind(self.backup_dir) is None:  # not a folder cellfuse made: not ours to drop
                raise
            remove_scratch(self.backup_dir)  # made by make_callbacks, filled by Keras
            self.model._initial_epoch = None
            self.console.print(f"[yellow]backup in {self.backup_dir} unreadable ({type(e).__name__}: {e}); "
                               "this stage starts again from its beginning[/]")


    def _save_model(self):
        make_own_dir(self.backup_dir, "part")  # Keras deletes it after each stage; made again as cellfuse's
        super()._save_model()
        adopt_library_files(self.backup_dir)


class SwapEMAWithBatchNorm(_callback_base("SwapEMAWeights")):
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
        import keras

        return [layer for layer in self.source._flatten_layers(include_self=False)
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
            sync_replicas(self.strategy, _tf_variables([v for n in norms for v in (n.moving_mean, n.moving_variance)]),
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


class NaNGuard(_callback_base()):
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


class Predictor:
    """Batched forward passes of `source` in inference mode. Local to this process (no collective op),
    so every worker of a cluster computes the same values from the same weights."""

    def __init__(self, source, batch_size: int = 256):
        self.source, self.batch_size = source, batch_size
        self._forward = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        if self._forward is None:
            self._forward = tf.function(lambda v: self.source(v, training=False), reduce_retracing=True)
        return np.concatenate([np.asarray(self._forward(tf.constant(x[i:i + self.batch_size], tf.float32)),
                                          dtype=np.float32) for i in range(0, len(x), self.batch_size)])


class ValidationAUC(_callback_base()):
    """val_auc = macro one-vs-rest AUC of `source` on the un-augmented validation images, exactly as
    metrics.json reports it (keras.metrics.AUC is micro-averaged over one-hot columns: another figure)."""

    def __init__(self, source, val: Dataset, batch_size: int = 256):
        super().__init__()
        self.val, self.predict = val, Predictor(source, batch_size)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            probs = self.predict(self.val.images)
            logs["val_auc"] = report.classification_metrics(self.val.labels, probs, self.val.class_names)["auc_ovr"]


class TrackedAccuracy(_callback_base()):
    """`<name>_accuracy` every epoch on further validation sets (extra_val), from the weights the
    checkpoint sees: a distilled student's corrupted-validation curve is its "patience" plot."""

    def __init__(self, source, sets: dict[str, Dataset]):
        super().__init__()
        self.sets, self.predict = sets, Predictor(source)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            for name, data in self.sets.items():
                logs[f"{name}_accuracy"] = float((self.predict(data.images).argmax(1) == data.labels).mean())


class ChiefState(_callback_base()):
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
        epoch = tf.Variable(float(getattr(model, "_initial_epoch", None) or 0))  # set by BackupAndRestore
        sync_replicas(self.strategy, [*_tf_variables(model.variables + model.optimizer.variables), epoch], "chief")
        model._initial_epoch = int(epoch.numpy()) or None


class AverageMovingStats(_callback_base()):
    """BatchNorm's moving statistics are per replica (each sees its own images): averaged over all
    replicas at each epoch's end, so every worker validates, checkpoints and stops on the same model."""

    def __init__(self, strategy, source):
        super().__init__()
        self.strategy, self.source = strategy, source

    def on_epoch_end(self, epoch, logs=None):
        sync_replicas(self.strategy, _tf_variables(self.source.non_trainable_variables), "mean")


def _tf_variables(variables) -> list:
    return [v.value if hasattr(v, "value") else v for v in variables]


def sync_replicas(strategy, variables, how: str) -> None:
    """Set every replica's copy of `variables` to the replicas' mean (how="mean") or to the first
    replica's, the chief's (how="chief": a sum to which only replica 0 contributes). Integer state
    (step counters) travels as float64."""
    import tensorflow as tf

    if how == "mean":
        variables = [v for v in variables if v.dtype.is_floating]  # not seed-generator state

    def wire(v):  # all_reduce packs one dtype per call
        return tf.float32 if v.dtype == tf.float32 else tf.float64

    @tf.function
    def step():
        ctx = tf.distribute.get_replica_context()
        values = [tf.identity(tf.cast(v, wire(v))) for v in variables]  # tensors, not variables
        if how == "chief":
            first = tf.equal(ctx.replica_id_in_sync_group, 0)
            values = [tf.where(first, x, tf.zeros_like(x)) for x in values]
        reduced = {}
        for dtype in {x.dtype for x in values}:
            group = [i for i, x in enumerate(values) if x.dtype == dtype]
            for i, r in zip(group, ctx.all_reduce("sum" if how == "chief" else "mean",
                                                  [values[i] for i in group]), strict=True):
                reduced[i] = r
        return [reduced[i] for i in range(len(values))]

    for var, value in zip(variables, strategy.run(step), strict=True):
        var.assign(tf.cast(strategy.experimental_local_results(value)[0], var.dtype))


class BestCheckpoint(_callback_base()):
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


class EpochLog(_callback_base()):
    """A rich progress bar per epoch, one printed line of metrics, and history.csv (resume-safe)."""

    def __init__(self, run: Path, offset: int, steps: int, batch_size: int, console: Console):
        super().__init__()
        self.run, self.offset, self.steps, self.batch_size, self.console = run, offset, steps, batch_size, console
        self.progress = None

    def on_epoch_begin(self, epoch, logs=None):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

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
        import csv

        path = self.run / "history.csv"
        rows = list(csv.DictReader(path.open())) if path.exists() else []
        rows = [r for r in rows if int(r["epoch"]) < row["epoch"]] + [row]
        write_csv(path, [{k: r.get(k, "") for k in row} for r in rows])


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
    metrics = {}
    for name, data in split.val.items():
        probs = model.predict(data.images.astype(np.float32), batch_size=256, verbose=0)
        metrics[name] = report.classification_metrics(data.labels, probs, data.class_names)
        save_npz(run / f"probs_{name}.npz", probs=probs, labels=data.labels, index=data.index)
        report.plot_confusion(metrics[name]["confusion"], data.class_names, run / f"confusion_{name}.png",
                              title=f"{recipe.name} on {name}")
    history = read_history(run)
    if history:
        report.plot_curves(history, run / "curves.png")
    best = json.loads((run / "checkpoint" / "best.json").read_text()) if (run / "checkpoint" / "best.json").exists() else {}
    summary = {"name": recipe.name, "run": str(run), "params": int(model.count_params()),
               "final_weights_sha1": final,
               "best_epoch": best.get("epoch"), "monitor": recipe.train.monitor, "best_value": best.get("value"),
               "seconds": round(time.time() - started, 1),
               "train_img_per_s": float(np.median([r["img_per_s"] for r in history])) if history else None,
               "metrics": {k: {m: v[m] for m in ("accuracy", "macro_f1", "auc_ovr", "nll", "ece")}
                           for k, v in metrics.items()}}
    write_json(run / "metrics.json", metrics)
    write_json(run / "summary.json", summary)  # last: its presence marks the run complete
    console.print(report.metrics_table({k: v for k, v in metrics.items()}, title=f"{recipe.name}: best epoch "
                                       f"{best.get('epoch')} by {recipe.train.monitor}"))
    console.print(report.per_class_table(metrics["val"], title="validation split, per class"))
    console.print(f"run directory: {run}")
    return summary


def finish_worker(model, recipe: Recipe, start: RunStart, console: Console) -> dict:
    """A non-chief worker's end: its temporary folder goes; it reports the digest of its final
    weights, which equals the chief's when the workers stayed in sync."""
    summary = {"name": recipe.name, "role": "worker", "task": describe_strategy(start.strategy, start.cluster)["task"],
               "final_weights_sha1": weights_digest(model.get_weights())}
    remove_scratch(start.run)
    console.print(f"worker {summary['task']} done; the chief wrote the run directory")
    return summary


def weights_digest(weights: list) -> str:
    import hashlib

    digest = hashlib.sha1()
    for w in weights:
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()


def read_history(run: Path) -> list[dict]:
    import csv

    path = run / "history.csv"
    if not path.exists():
        return []
    return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(path.open())]


# ---------------------------------------------------------------- several recipes at once

def train_parallel(recipes: list[Recipe], overrides, resume, force, parallel, console, root: Path) -> list[dict]:
    """One process per recipe, `parallel` at a time, each on the least busy GPU when there are GPUs.

    A failed recipe does not stop the others; all failures are reported together at the end. Any way
    out of here (an error, Ctrl-C) stops the children first, so none is left running."""
    import tensorflow as tf

    n_gpus = len(tf.config.list_physical_devices("GPU"))
    logs = make_own_dir(root / "logs", "logs")
    pending, running, results, failed = list(enumerate(recipes)), {}, {}, []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                i, recipe = pending.pop(0)
                gpu = pick_gpu([g for _, g, _ in running.values()], n_gpus)
                share = n_gpus > 0 and parallel > n_gpus
                running[i] = (recipe, gpu, _spawn(recipe, overrides, resume, force, gpu, share, logs, root))
            time.sleep(0.5)
            for i in [i for i, (_, _, proc) in running.items() if proc.poll() is not None]:
                recipe, _, proc = running.pop(i)
                log = logs / f"{recipe.name}.log"
                if proc.returncode != 0:
                    failed.append(f"{recipe.path} (exit {proc.returncode}; log {log})")
                    console.print(f"[red]failed[/] {recipe.path}: see {log}")
                    continue
                results[i] = json.loads(log.with_suffix(".json").read_text().strip().splitlines()[-1])[0]
                console.print(f"[green]done[/] {recipe.path}")
    finally:
        _stop_children([proc for _, _, proc in running.values()])
    if failed:
        raise CellfuseError(f"{len(failed)} of {len(recipes)} recipe(s) failed: " + "; ".join(failed))
    return [results[i] for i in sorted(results)]


def pick_gpu(busy: list[int | None], n_gpus: int) -> int | None:
    """The GPU running the fewest children (lowest index on a tie); None without GPUs."""
    if not n_gpus:
        return None
    return min(range(n_gpus), key=lambda g: (busy.count(g), g))


def _spawn(recipe: Recipe, overrides, resume, force, gpu, share_gpu, logs: Path, root: Path):
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    if share_gpu:  # two processes on one GPU: each must not grab all its memory up front
        env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    cmd = [sys.executable, "-m", "toolkit", "train", str(recipe.path), "--json"]
    cmd += [a for o in overrides for a in ("--set", o)] + (["--resume"] if resume else []) + (["--force"] if force else [])
    if Path(root) != RUNS:
        cmd += ["--out", str(root)]
    log = logs / f"{recipe.name}.log"  # files, not pipes: a full pipe would stall the child
    with log.with_suffix(".json").open("w") as out, log.open("w") as err:
        return subprocess.Popen(cmd, stdout=out, stderr=err, env=env)


def _stop_children(procs, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL whatever has not exited after `grace` seconds."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.time() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
