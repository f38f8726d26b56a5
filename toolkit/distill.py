"""`cellfuse distill`: train a compact student to match an ensemble.

Loss (Hinton et al. 2015): alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T),
where x_T = softmax(log(x) / T). Models output probabilities, and log-probabilities are valid logits
(softmax(log p) = p), so the loss is exact without exposing logits.

Three teacher modes:
- cached: the teacher's TTA-averaged probabilities on the un-augmented training images, computed
  once; the student then trains on augmented images against those fixed targets. Cheap.
- function-matching (Beyer et al. 2022): teacher and student see the same augmented (and mixed)
  view every step; the teacher runs on the fly through Keras' `keras.distillation.Distiller`. By
  default the teacher is the ensemble's members, temperatures and weights on that one view: its TTA
  views would multiply the per-step cost by their number (`[distill] teacher_tta = true` adds them).
- bank: function matching with the teacher paid up front. `bank_views` augmented (and mixed) views
  of every training image are drawn once and labelled once by the same teacher; the student then
  trains on rows drawn from that bank with no teacher pass per step. On a CPU, where the teacher's
  forward pass costs more than the student's step, this buys several student epochs per teacher
  epoch; the price is a finite set of views (an epoch past `bank_views` sees a view again). With
  `teacher_tta` the teacher labels each view with its TTA views averaged, paid once per bank.

Consistency (`[train] consistency`, AugMix + JSD): in cached and function-matching mode the teacher
labels the clean view only and the JSD term carries its labels to the two AugMix views (see
toolkit.consistency): the teacher, not robust itself, is never asked about them. Not in bank mode,
whose rows hold one view each.

Every epoch logs the student's accuracy on each extra validation set too, so distill.json and
patience.png show the "patience" curve (Beyer et al.: students keep improving for a long time).

`[distill] init` starts the student's backbone from a trained member's (e.g. the pretrained network
each member fine-tuned, already adapted to cells and to the augmentation), so distillation spends its
epochs on matching the ensemble rather than on relearning the domain.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from toolkit import consistency, report
from toolkit import train as T
from toolkit.augment import make_batch_augmenter
from toolkit.backbones import backbone_starts_from, copy_backbone
from toolkit.consistency import ConsistencyDistiller, scale_for_replicas
from toolkit.data import Dataset, check_npz, one_hot, save_npz, stratified_split
from toolkit.ensemble import (
    cached_predictions,
    content_key,
    ensemble_components,
    ensemble_split,
    heaviest_views,
    load_ensemble,
    member_file,
    ranked_members,
    resolve_member,
    teacher_components,
)
from toolkit.errors import CellfuseError
from toolkit.recipe import (
    MATCHING_MEMBER,
    DataConfig,
    Recipe,
    check_student,
    load_recipe,
    monitored_set,
    read_toml,
)
from toolkit.runs import (
    load_model,
    make_own_dir,
    read_history,
    resolve_model_file,
    write_csv,
    write_json,
)
from toolkit.tta import wrap_with_tta

# ---------------------------------------------------------------- the loss

def _kl_at_temperature(teacher_probs, student_probs, temperature):
    """T^2 * KL(softmax(log t / T) || softmax(log s / T)), per example."""
    from keras import config, ops

    eps = config.epsilon()  # as in distillation_loss
    t = ops.softmax(ops.log(teacher_probs + eps) / temperature, axis=-1)
    log_s = ops.log_softmax(ops.log(student_probs + eps) / temperature, axis=-1)
    return temperature**2 * ops.sum(t * (ops.log(t + eps) - log_s), axis=-1)


def distillation_loss(teacher_probs, student_probs, labels, temperature: float, alpha: float):
    """Per-example loss; `labels` may be soft (mixup).

    Keras' epsilon (1e-7, what its own crossentropy clips to) is added before each log, not
    toolkit.layers.EPS (1e-12, for inference): in a training loss it bounds the loss of a confidently
    wrong prediction (-log 1e-7 = 16) and the gradient of log p (1 / eps)."""
    from keras import config, ops

    ce = -ops.sum(labels * ops.log(student_probs + config.epsilon()), axis=-1)
    return alpha * ce + (1 - alpha) * _kl_at_temperature(teacher_probs, student_probs, temperature)


def packed_loss(n_classes: int, temperature: float, alpha: float):
    """Cached mode: y_true packs [teacher probabilities | labels], so augmentation mixes both alike."""
    def loss(y_true, y_pred):
        return distillation_loss(y_true[:, :n_classes], y_pred, y_true[:, n_classes:], temperature, alpha)
    return loss


def _packed_metrics(n_classes: int):
    import keras

    def accuracy(y_true, y_pred):
        return keras.metrics.categorical_accuracy(y_true[:, n_classes:], y_pred)

    class PackedAUC(keras.metrics.AUC):
        def update_state(self, y_true, y_pred, sample_weight=None):
            return super().update_state(y_true[:, n_classes:], y_pred, sample_weight)

    return [keras.metrics.MeanMetricWrapper(accuracy, name="accuracy"), PackedAUC(name="auc")]


def _probability_kl(temperature: float):
    """A keras.distillation loss over probability outputs (the API's own expects logits)."""
    import keras

    class ProbabilityKL(keras.distillation.DistillationLoss):
        def compute_loss(self, teacher_outputs, student_outputs, **kwargs):  # the Distiller adds it unscaled
            return scale_for_replicas(keras.ops.mean(_kl_at_temperature(teacher_outputs, student_outputs, temperature)))

        def validate_outputs(self, teacher_outputs, student_outputs):
            pass

    return ProbabilityKL()


# ---------------------------------------------------------------- compile per mode

def _compile_cached(n_classes: int):
    def compile_fn(model, recipe: Recipe, stage, steps: int):
        cfg = recipe.distill
        model.compile(optimizer=T.make_optimizer(recipe.train, stage, steps),
                      loss=packed_loss(n_classes, cfg.temperature, cfg.alpha),
                      metrics=_packed_metrics(n_classes), jit_compile=recipe.train.xla)
        return model
    return compile_fn


def _compile_function_matching(teacher):
    def compile_fn(model, recipe: Recipe, stage, steps: int):
        import keras

        teacher.trainable = False
        kwargs = {"teacher": teacher, "student": model, "student_loss_weight": recipe.distill.alpha,
                  "distillation_losses": _probability_kl(recipe.distill.temperature)}
        distiller = (ConsistencyDistiller(recipe.train.consistency, **kwargs) if recipe.train.consistency
                     else keras.distillation.Distiller(**kwargs))
        distiller(np.zeros((1, *model.input_shape[1:]), np.float32))  # built, so backups can restore it
        distiller.compile(optimizer=T.make_optimizer(recipe.train, stage, steps),
                          loss=keras.losses.CategoricalCrossentropy(),
                          metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                                   keras.metrics.AUC(name="auc")], jit_compile=recipe.train.xla)
        return distiller
    return compile_fn


# ---------------------------------------------------------------- entry point

def distill_recipe(ensemble_dir, recipe_path, overrides=(), *, resume=False, force=False, console=None,
                   runs_root=None, timing: bool = True) -> dict:
    """Distill, then compare the student with its ensemble; `timing=False` skips the img/s column
    (about TIMING_S seconds per model after a warm-up pass)."""
    console = console or Console()
    recipe = load_recipe(recipe_path, overrides)
    check_student(recipe)
    check_student_split_early(recipe, Path(ensemble_dir))  # before train's data checks warn

    cfg = recipe.distill
    start = T.start_run(recipe, runs_root, resume=resume, force=force, console=console,  # train's set-up
                        inputs=[ensemble_dir], kind="student")
    check_same_teacher(start.run, Path(ensemble_dir), new=start.created)
    if start.complete is not None:
        return compare(recipe, start.run, Path(ensemble_dir), console, timing=timing)
    run, split, strategy, started = start.run, start.split, start.strategy, start.started
    with T.discard_failed_start(start):  # a start that fails before an epoch leaves nothing behind
        check_student_split(split, Path(ensemble_dir), recipe)
        teacher = load_ensemble(ensemble_dir, views=teacher_views(cfg))
        with strategy.scope():
            student = T.build_model(recipe, split.train.n_classes)
            if cfg.init:  # recorded: "matching-member" resolves to a member, or to none
                write_json(run / "init.json", {"from": init_from_member(student, Path(ensemble_dir), cfg.init, console)})
        T.check_initial_loss(student, split.val["val"], console)
        console.print(f"distillation: {cfg.mode}, T = {cfg.temperature}, alpha = {cfg.alpha}, teacher "
                      f"{'with' if teacher_views(cfg) else 'without'} its TTA views; "
                      f"student {student.count_params():,} parameters")
        fit = {"track_extra_val": True}
        if cfg.mode == "function-matching":
            fit["compile_fn"] = _compile_function_matching(teacher)  # a ConsistencyDistiller with consistency
            if recipe.train.consistency:
                fit["train_ds"] = consistency.make_dataset(split.train, recipe)
        else:
            n = split.train.n_classes
            val = split.val["val"]
            val_targets = np.concatenate([teacher_probs(teacher, val, run, Path(ensemble_dir), "val", console,
                                                        teacher_components(ensemble_dir, views=teacher_views(cfg))),
                                          one_hot(val.labels, n)], 1)
            fit.update(val_ds=T.make_dataset(val, recipe, training=False, targets=val_targets),
                       compile_fn=_compile_cached(n))
            if cfg.mode == "bank":
                fit["train_ds"] = bank_dataset(*build_bank(teacher, split.train, recipe, run, Path(ensemble_dir),
                                                           console), recipe)
            else:
                targets = np.concatenate([teacher_probs(teacher, split.train, run, Path(ensemble_dir), "train",
                                                        console),
                                          one_hot(split.train.labels, n)], 1)
                fit["train_ds"] = T.make_dataset(split.train, recipe, training=True, targets=targets)
                fit.update(consistency.fit_arguments(recipe, split, fit["compile_fn"], targets))  # 3 views if on
        T.fit_stages(student, recipe, split, run, strategy, console, **fit)
    T.finish_run(recipe, split, run, started, console)
    return compare(recipe, run, Path(ensemble_dir), console, timing=timing)


# ---------------------------------------------------------------- the bank of (view, teacher output)

def build_bank(teacher, data: Dataset, recipe: Recipe, run: Path, ensemble_dir: Path, console):
    """(views uint8 (K*N, H, W, 3), packed targets [teacher | labels] (K*N, 2n)), K = bank_views.

    View k is the recipe's training augmentation (mixing included) with its own seed, over the images
    in a shuffled order (mixing pairs images within a batch); the teacher labels the stored uint8 view,
    exactly what the student will see. Each view is saved as it is finished (with the rows it holds),
    keyed by the ensemble file's hash, so an interrupted bank resumes at the view it was drawing.
    """
    import tensorflow as tf
    from rich.progress import Progress

    folder = make_own_dir(run / "checkpoint" / f"bank_{teacher_key(ensemble_dir)}", "part")
    n, n_classes, k_views, batch = len(data), data.n_classes, recipe.distill.bank_views, 256
    predict = T.Predictor(teacher, batch)
    views = np.empty((k_views * n, *data.images.shape[1:]), np.uint8)  # one copy, filled view by view
    targets = np.empty((k_views * n, 2 * n_classes), np.float32)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("teacher labelling the bank's views", total=k_views * n)
        for k in range(k_views):
            file = folder / f"view{k}.npz"
            if not file.exists():
                seed = recipe.train.seed * 7919 + k + 1
                order = np.random.default_rng(seed).permutation(n)
                augment = make_batch_augmenter(recipe.augment, n_classes, seed=seed)
                ds = tf.data.Dataset.from_tensor_slices((data.images[order], one_hot(data.labels[order], n_classes)))
                ds = ds.batch(batch).map(lambda x, y: (tf.cast(x, tf.float32), y))
                if augment is not None:
                    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
                parts = {"images": [], "teacher": [], "labels": []}
                for x, y in ds.prefetch(tf.data.AUTOTUNE):
                    stored = np.clip(np.round(np.asarray(x)), 0, 255).astype(np.uint8)
                    parts["images"].append(stored)
                    parts["teacher"].append(predict(stored.astype(np.float32)))
                    parts["labels"].append(np.asarray(y, np.float32))
                    progress.advance(task, len(stored))
                save_npz(file, index=data.index[order], **{name: np.concatenate(rows) for name, rows in parts.items()})
            else:
                progress.advance(task, n)
            with np.load(file) as f:
                views[k * n:(k + 1) * n] = f["images"]
                targets[k * n:(k + 1) * n] = np.concatenate([f["teacher"], f["labels"]], 1)
    console.print(f"bank: {k_views} view(s) x {n} images, {views.nbytes / 1e9:.2f} GB in memory")
    return views, targets


def bank_dataset(views: np.ndarray, targets: np.ndarray, recipe: Recipe):
    """Training batches drawn from the bank, reshuffled every pass; no augmentation (it is in the views).
    Row numbers are shuffled and batches gathered from the arrays in place: the views are never copied
    into a TensorFlow constant (one over 2 GB cannot be serialised) nor into a shuffle buffer."""
    import tensorflow as tf

    def gather(rows):
        rows = np.sort(rows)
        return views[rows], targets[rows]

    def load(rows):
        x, y = tf.numpy_function(gather, [rows], [tf.uint8, tf.float32])
        x.set_shape([None, *views.shape[1:]])
        y.set_shape([None, targets.shape[1]])
        return tf.cast(x, tf.float32), y

    ds = tf.data.Dataset.range(len(views))
    ds = ds.shuffle(len(views), seed=recipe.train.seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(recipe.train.batch_size, drop_remainder=True).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------- split, start and cached targets

def check_student_split(split, ensemble_dir: Path, recipe: Recipe) -> None:
    """The student must hold out the rows its teacher's members held out: otherwise it trains on the
    validation images the comparison is scored on."""
    _compare_split(np.sort(split.val["val"].index), ensemble_dir, recipe)


def check_student_split_early(recipe: Recipe, ensemble_dir: Path) -> None:
    """check_student_split from the data file's labels alone, before train's set-up: a mismatched
    split otherwise first shows as leak warnings about the members' validation files."""
    rows = planned_val_index(recipe)
    if rows is not None:
        _compare_split(rows, ensemble_dir, recipe)


def planned_val_index(recipe: Recipe) -> np.ndarray | None:
    """The original rows train.load_split will hold out, read without the images (npz only)."""
    path = Path(recipe.data.train)
    if path.suffix != ".npz":
        return None
    check_npz(path, recipe.data.n_classes)
    with np.load(path, allow_pickle=False) as f:
        labels = f["labels"].reshape(-1).astype(np.int64)  # (N,) or (N, 1), as check_npz allows
        index = f["index"].astype(np.int64) if "index" in f.files else np.arange(len(labels))
    if recipe.data.limit:
        labels, index = labels[:recipe.data.limit], index[:recipe.data.limit]
    return np.sort(index[stratified_split(labels, recipe.data.val_fraction, recipe.data.split_seed)[1]])


def _compare_split(student_rows: np.ndarray, ensemble_dir: Path, recipe: Recipe) -> None:
    teacher_rows = ensemble_split(ensemble_dir)
    if teacher_rows is None or np.array_equal(student_rows, teacher_rows):
        return
    leaked = len(np.setdiff1d(teacher_rows, student_rows))
    raise CellfuseError(f"{recipe.path}: the student's validation split differs from its ensemble's members' "
                        f"(it holds out {len(student_rows)} rows, they held out {len(teacher_rows)}; {leaked} of "
                        f"theirs would be student training rows): {_split_fix(ensemble_dir, recipe)}")


SPLIT_KEYS = ("train", "val_fraction", "split_seed")


def _split_fix(ensemble_dir: Path, recipe: Recipe) -> str:
    """Both settings side by side and the --set that makes the student's match (from a member's recipe)."""
    student = {k: getattr(recipe.data, k) for k in SPLIT_KEYS}
    member = _member_data(ensemble_dir)
    if member is None:
        return ("the student has " + ", ".join(f"data.{k} = {v!r}" for k, v in student.items())
                + "; use the members' values")
    differ = [k for k in SPLIT_KEYS if not _same(k, student[k], member[k])] or list(SPLIT_KEYS)
    said = "; ".join(f"data.{k} = {student[k]!r} for the student, {member[k]!r} for the members" for k in differ)
    return f"{said}. Add `" + " ".join(f"--set data.{k}={_toml(member[k])}" for k in differ) + "`"


def _same(key: str, a, b) -> bool:
    return Path(a).resolve() == Path(b).resolve() if key == "train" else a == b


def _member_data(ensemble_dir: Path) -> dict | None:
    """data.train, val_fraction and split_seed of the first member whose run folder keeps its recipe."""
    for component in ensemble_components(ensemble_dir):
        recipe = resolve_member(ensemble_dir, component["member_file"]).parent / "recipe.toml"
        if recipe.is_file():
            try:
                data = read_toml(recipe).get("data", {})
            except CellfuseError:
                continue
            return {k: data.get(k, getattr(DataConfig, k)) for k in SPLIT_KEYS}
    return None


def _toml(value) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


def init_from_member(student, ensemble_dir: Path, name: str, console) -> str | None:
    """The student's backbone starts where a trained member's ended (its head starts fresh); returns the
    member's file. MATCHING_MEMBER: the most accurate member whose backbone is the student's, or whose first
    layers it is (a truncated Lite0 from a Lite0 member), if any."""
    member = None
    if name == MATCHING_MEMBER:
        name, member = _matching(student, ensemble_dir)
        if name is None:
            console.print("no member of the ensemble has the student's backbone (or begins with it): it starts from "
                          "\\[model] weights")
            return None
    file = member_file(ensemble_dir, name)
    if member is None:
        member = load_model(file)
    if "backbone" not in {layer.name for layer in member.layers}:
        raise CellfuseError(f"{file}: has no layer named 'backbone' (not a cellfuse classifier); "
                            "the student cannot start from it")
    n = copy_backbone(member, student, file)
    console.print(f"student backbone starts from member {name} ({file}, {n} layers)")
    return str(file.resolve())  # recorded in init.json: the same file from any working folder


def matching_member(student, ensemble_dir: Path) -> str | None:
    """The most accurate member alone (on the ensemble's steering data) that the student can start from."""
    return _matching(student, ensemble_dir)[0]


def _matching(student, ensemble_dir: Path):
    """(name, loaded model) of matching_member, or (None, None): the winner is loaded once."""
    for name in ranked_members(ensemble_dir):
        member = load_model(member_file(ensemble_dir, name))
        if backbone_starts_from(student, member):
            return name, member
    return None, None


def teacher_views(cfg) -> bool:
    """Does the teacher label with its TTA views? (load_ensemble's `views`)"""
    return cfg.mode == "cached" or cfg.teacher_tta


def teacher_probs(teacher, data: Dataset, run: Path, ensemble_dir: Path, name: str, console,
                  components: list[dict] | None = None) -> np.ndarray:
    """The teacher's probabilities on `data`, cached in the run (keyed by the ensemble file's hash); on a
    validation file the ensemble was built on, read from its predictions when `components` (the teacher's)
    are given."""
    cache = run / "checkpoint" / f"teacher_{name}_{teacher_key(ensemble_dir)}.npz"
    if cache.exists():
        with np.load(cache) as f:
            return f["probs"]
    probs = None if components is None else cached_predictions(ensemble_dir, data, components)
    if probs is None:
        with console.status(f"teacher predicting {len(data)} {name} images (once)"):
            probs = T.Predictor(teacher, 256)(data.images)
    save_npz(cache, probs=probs)
    return probs


def check_same_teacher(run: Path, ensemble_dir: Path, new: bool) -> None:
    """A student resumes, or is compared again, only with the ensemble it was distilled from: teacher.json,
    written when the run starts, holds that ensemble file's hash. (Runs from before it have none.)"""
    record, key = run / "teacher.json", teacher_key(ensemble_dir)
    if new:
        write_json(record, {"ensemble": str(ensemble_dir), "key": key})
    elif record.is_file():
        before = json.loads(record.read_text())
        if before.get("key") != key:
            raise CellfuseError(f"{run}: was distilled from {before.get('ensemble')} (ensemble file {before.get('key')}), "
                                f"and {ensemble_dir} holds another ensemble ({key}); --resume continues a student with "
                                "its own teacher: give that ensemble, or --force to distil it again from this one")


def teacher_key(ensemble_dir: Path) -> str:
    """What the teacher's cached outputs in a student's run are keyed by: its ensemble file's contents."""
    return content_key(resolve_model_file(ensemble_dir))[:16]


# ---------------------------------------------------------------- the comparison table

def compare(recipe: Recipe, run: Path, ensemble_dir: Path, console: Console, *, timing: bool = True) -> dict:
    """Student vs ensemble vs best member, each with the ensemble's views: accuracy per validation
    set, parameters, file size, and (with `timing`) img/s on this machine, taking turns. The ensemble and
    the best member are read from the predictions the ensemble was selected with where it holds them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    heaviest = heaviest_views(ensemble_dir)  # the student and the best member get them
    views, merge = heaviest["view_list"], heaviest["merge"]
    best = member_file(ensemble_dir, "best-member")
    models = {"student": (run / "best.keras", views, None),
              "ensemble": (resolve_model_file(ensemble_dir), None, ensemble_components(ensemble_dir)),
              "best member": (best, views, [{"member_file": str(best.resolve()), "view_list": views, "merge": merge,
                                             "weight": 1.0}])}
    split = T.load_split(recipe, Console(quiet=True))
    rows, predictors, correct, cached = {}, {}, {}, []
    columns = (TextColumn("comparing {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("", total=len(models) * len(split.val))
        for label, (path, tta, components) in models.items():
            model = load_model(path)
            rows[label] = {"params": int(model.count_params()), "bytes": path.stat().st_size, "img_per_s": None}
            viewed = wrap_with_tta(model, tta, merge) if tta and len(tta) > 1 else model
            predict = predictors[label] = T.Predictor(viewed)
            for name, data in split.val.items():
                progress.update(task, description=f"{label} on {name}")
                probs = None if components is None else cached_predictions(ensemble_dir, data, components)
                if probs is None:
                    probs = predict(data.images)
                else:
                    cached.append(f"{label} on {name}")
                correct[label, name] = probs.argmax(1) == data.labels
                rows[label][f"acc_{name}"] = float(correct[label, name].mean())
                progress.advance(task)
    if cached:
        console.print(f"from the predictions {ensemble_dir} was selected with: {', '.join(cached)}")
    if timing:  # timed as they predicted above, on functions already traced
        for label, speed in img_per_s(predictors, split.val["val"], console).items():
            rows[label]["img_per_s"] = speed
    student, ensemble = rows["student"], rows["ensemble"]
    started = json.loads((run / "init.json").read_text()) if (run / "init.json").exists() else {}
    result = {"student_run": str(run), "mode": recipe.distill.mode, "init": recipe.distill.init,
              "init_from": started.get("from"),  # the member file the backbone started from; None: [model] weights
              "views": heaviest["views"], "rows": rows, "from_ensemble_cache": cached,
              "size_ratio": ensemble["bytes"] / student["bytes"],
              "speed_ratio": student["img_per_s"] / ensemble["img_per_s"] if timing else None,
              "gap": {name: ensemble[f"acc_{name}"] - student[f"acc_{name}"] for name in split.val},
              # is a gap more than the draw of these images? (report.paired_comparison)
              "paired": {name: {other: report.paired_comparison(correct["student", name], correct[other, name])
                                for other in ("ensemble", "best member")} for name in split.val},
              "patience": patience(run, {name: ensemble[f"acc_{name}"] for name in split.val})}
    write_json(run / "distill.json", result)
    write_csv(run / "distill.csv", [{"model": label, **r} for label, r in rows.items()])
    console.print(_table(rows, list(split.val), heaviest["views"]))
    console.print(_paired_table(result["paired"]))
    if monitored_set(recipe):  # the one set whose figures above flatter the student
        console.print(f"[yellow]{monitored_set(recipe)} picked the student's checkpoint (train.monitor): its figures "
                      "there are chosen on, the other sets judge it; summary.json's `steered` has it cross-fitted[/]")
    console.print(f"student: {closing_line(result)}")
    return result


def closing_line(result: dict) -> str:
    """Reads like "21.4x smaller, 3.5x faster, 1.9 points behind on val": each ratio the way it points."""
    parts = [_times(result["size_ratio"], "smaller", "larger")]
    if result.get("speed_ratio") is not None:
        parts.append(_times(result["speed_ratio"], "faster", "slower"))
    for name, gap in result["gap"].items():
        points = round(100 * gap, 1)
        parts.append(f"level with it on {name}" if points == 0 else
                     f"{abs(points):.1f} points {'behind' if points > 0 else 'ahead'} on {name}")
    return ", ".join(parts)


def _times(ratio: float, more: str, less: str) -> str:
    return f"{ratio:.1f}x {more}" if ratio >= 1 else f"{1 / ratio:.1f}x {less}"


def patience(run: Path, ensemble_acc: dict[str, float]) -> dict:
    """The student's single-view accuracy per epoch on each validation set beside the ensemble's
    (with its views), as distill.json keeps it and patience.png draws it."""
    history = read_history(run)
    columns = {name: "val_accuracy" if name == "val" else f"{name}_accuracy" for name in ensemble_acc}
    curves = {"epoch": [int(row["epoch"]) for row in history],
              "student": {name: [row.get(col) for row in history] for name, col in columns.items()},
              "ensemble": ensemble_acc}
    if history:
        report.plot_patience(curves, run / "patience.png", title=f"{run.name}: student vs its ensemble")
    return curves


TIMING_S = 3.0  # seconds of prediction per model: ~10 s for the three, a small share of any distillation
TIMING_BATCH = 64


def img_per_s(predictors: dict, data: Dataset, console: Console, budget_s: float = TIMING_S,
              batch: int = TIMING_BATCH) -> dict[str, float]:
    """Each predictor's (a function of a batch) median speed over one-batch passes, taking turns until
    each has predicted for `budget_s` (at least two passes): a shared machine's speed drifts (here by up
    to 2x), so only passes made side by side compare fairly; the budget bounds the cost of any ensemble."""
    from rich.progress import BarColumn, Progress, TextColumn

    x = data.images[np.arange(batch) % len(data)].astype(np.float32)
    console.print(f"timing {', '.join(predictors)} on this machine: about {budget_s:.0f} s each after a "
                  "warm-up pass (--no-timing skips it)")
    speeds = {label: [] for label in predictors}
    spent = dict.fromkeys(predictors, 0.0)
    with Progress(TextColumn("timing"), BarColumn(), TextColumn("{task.description}"), console=console,
                  transient=True) as progress:
        task = progress.add_task("warm-up", total=budget_s * len(predictors))
        for predict in predictors.values():
            predict(x)  # a first pass is not throughput
        active = list(predictors)
        while active:
            for label in list(active):
                progress.update(task, description=label)
                started = time.perf_counter()
                predictors[label](x)
                seconds = time.perf_counter() - started
                progress.advance(task, min(seconds, max(budget_s - spent[label], 0)))
                spent[label] += seconds
                speeds[label].append(batch / seconds)
                if spent[label] >= budget_s and len(speeds[label]) >= 2:
                    active.remove(label)
    return {label: float(np.median(s)) for label, s in speeds.items()}


def _paired_table(paired: dict) -> Table:
    """The student against each model on the same images: points, images only one of the two got right,
    and the exact McNemar p (below 0.05: unlikely to be the draw of these images alone)."""
    table = Table(title="the student against each, image by image (exact McNemar test)",
                  caption=report.PAIRED_CAVEAT)
    for col in ("data", "against", "points", "only the student right", "only the other right", "p"):
        table.add_column(col, justify="left" if col in ("data", "against") else "right")
    for name, against in paired.items():
        for other, c in against.items():
            table.add_row(name, other, f"{100 * c['difference']:+.1f}", str(c["a_only"]), str(c["b_only"]),
                          f"{c['p']:.3f}")
    return table


def _table(rows: dict, val_names: list[str], views: str) -> Table:
    table = Table(title=f"student vs ensemble (student with the ensemble's views: {views})")
    for col in ["model", *[f"acc {n}" for n in val_names], "parameters", "file MB", "img/s"]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, r in rows.items():
        table.add_row(label, *[f"{r[f'acc_{n}']:.4f}" for n in val_names], f"{r['params']:,}",
                      f"{r['bytes'] / 1e6:.2f}", "-" if r["img_per_s"] is None else f"{r['img_per_s']:.0f}")
    return table
