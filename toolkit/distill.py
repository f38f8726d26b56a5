"""`cellfuse distill`: train a compact student to match an ensemble.

Loss (Hinton et al. 2015): alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T),
where x_T = softmax(log(x) / T). Models output probabilities, and log-probabilities are valid logits
(softmax(log p) = p), so the loss is exact without exposing logits.

Two teacher modes:
- cached: the teacher's TTA-averaged probabilities on the un-augmented training images, computed
  once; the student then trains on augmented images against those fixed targets. Cheap.
- function-matching (Beyer et al. 2022): teacher and student see the same augmented (and mixed)
  view every step; the teacher runs on the fly through Keras' `keras.distillation.Distiller`. By
  default the teacher is the ensemble's members, temperatures and weights on that one view: its TTA
  views would multiply the per-step cost by their number (`[distill] teacher_tta = true` adds them).

`[distill] init` starts the student's backbone from a trained member's (e.g. the pretrained network
each member fine-tuned, already adapted to cells and to the augmentation), so distillation spends its
epochs on matching the ensemble rather than on relearning the domain.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from toolkit import train as T
from toolkit.data import Dataset, one_hot, save_npz
from toolkit.errors import CellfuseError
from toolkit.recipe import Recipe, load_recipe

EPS = 1e-7


# ---------------------------------------------------------------- the loss

def _kl_at_temperature(teacher_probs, student_probs, temperature):
    """T^2 * KL(softmax(log t / T) || softmax(log s / T)), per example."""
    from keras import ops

    t = ops.softmax(ops.log(teacher_probs + EPS) / temperature, axis=-1)
    log_s = ops.log_softmax(ops.log(student_probs + EPS) / temperature, axis=-1)
    return temperature**2 * ops.sum(t * (ops.log(t + EPS) - log_s), axis=-1)


def distillation_loss(teacher_probs, student_probs, labels, temperature: float, alpha: float):
    """Per-example loss; `labels` may be soft (mixup)."""
    from keras import ops

    ce = -ops.sum(labels * ops.log(student_probs + EPS), axis=-1)
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
        def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
            return keras.ops.mean(_kl_at_temperature(teacher_outputs, student_outputs, temperature))

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
        distiller = keras.distillation.Distiller(
            teacher=teacher, student=model, distillation_losses=_probability_kl(recipe.distill.temperature),
            student_loss_weight=recipe.distill.alpha)
        distiller(np.zeros((1, *model.input_shape[1:]), np.float32))  # built, so backups can restore it
        distiller.compile(optimizer=T.make_optimizer(recipe.train, stage, steps),
                          loss=keras.losses.CategoricalCrossentropy(),
                          metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                                   keras.metrics.AUC(name="auc")], jit_compile=recipe.train.xla)
        return distiller
    return compile_fn


# ---------------------------------------------------------------- entry point

def distill_recipe(ensemble_dir, recipe_path, overrides=(), *, resume=False, force=False, console=None,
                   runs_root=None) -> dict:
    console = console or Console()
    recipe = load_recipe(recipe_path, overrides)
    if recipe.distill is None:
        raise CellfuseError(f"{recipe_path}: a student recipe needs a [distill] section")
    if recipe.train.consistency:  # not wired into the teacher's loss yet: refused rather than ignored
        raise CellfuseError(f"{recipe_path}: train.consistency is not supported in distillation yet; "
                            "the AugMix views can still be used as augmentation (augment.augmix = true)")
    if recipe.train.class_weights != "none":  # the targets are the teacher's soft votes, not classes
        raise CellfuseError(f"{recipe_path}: train.class_weights = {recipe.train.class_weights!r} does not apply "
                            "to distillation (the student matches the teacher's probabilities, not labels "
                            "alone); remove it from the student recipe")
    from toolkit.ensemble import load_ensemble

    cfg = recipe.distill
    start = T.start_run(recipe, runs_root, resume=resume, force=force, console=console)  # train's set-up
    if start.complete is not None:
        return compare(recipe, start.run, Path(ensemble_dir), console)
    run, split, strategy, started = start.run, start.split, start.strategy, start.started
    check_student_split(split, Path(ensemble_dir), recipe_path)
    teacher = load_ensemble(ensemble_dir, views=cfg.mode == "cached" or cfg.teacher_tta)
    with strategy.scope():
        student = T.build_model(recipe, split.train.n_classes)
        if cfg.init:
            init_from_member(student, Path(ensemble_dir), cfg.init, console)
    T.check_initial_loss(student, split.val["val"], recipe, console)
    console.print(f"distillation: {cfg.mode}, T = {cfg.temperature}, alpha = {cfg.alpha}, teacher "
                  f"{'with' if cfg.mode == 'cached' or cfg.teacher_tta else 'without'} its TTA views; "
                  f"student {student.count_params():,} parameters")
    if cfg.mode == "cached":
        n = split.train.n_classes
        targets = {name: teacher_probs(teacher, data, run, Path(ensemble_dir), name, console)
                   for name, data in [("train", split.train), ("val", split.val["val"])]}
        train_ds = T.make_dataset(split.train, recipe, training=True,
                                  targets=np.concatenate([targets["train"], one_hot(split.train.labels, n)], 1))
        val_ds = T.make_dataset(split.val["val"], recipe, training=False,
                                targets=np.concatenate([targets["val"], one_hot(split.val["val"].labels, n)], 1))
        T.fit_stages(student, recipe, split, run, strategy, console, train_ds=train_ds, val_ds=val_ds,
                     compile_fn=_compile_cached(n))
    else:
        T.fit_stages(student, recipe, split, run, strategy, console, compile_fn=_compile_function_matching(teacher))
    T.finish_run(recipe, split, run, started, console)
    return compare(recipe, run, Path(ensemble_dir), console)


def check_student_split(split, ensemble_dir: Path, recipe_path) -> None:
    """The student must hold out the rows its teacher's members held out: otherwise it trains on the
    validation images the comparison is scored on."""
    from toolkit.ensemble import ensemble_split

    teacher_rows = ensemble_split(ensemble_dir)
    if teacher_rows is None:
        return
    student_rows = np.sort(split.val["val"].index)
    if not np.array_equal(student_rows, teacher_rows):
        leaked = len(np.setdiff1d(teacher_rows, student_rows))
        raise CellfuseError(f"{recipe_path}: the student's validation split differs from its ensemble's "
                            f"members' ({leaked} of their {len(teacher_rows)} validation rows would be "
                            "student training rows); use the members' data.train, data.val_fraction and "
                            "data.split_seed")


def init_from_member(student, ensemble_dir: Path, name: str, console) -> None:
    """The student's backbone starts where a trained member's ended (its head starts fresh)."""
    from toolkit.backbones import copy_backbone
    from toolkit.ensemble import member_file
    from toolkit.runs import load_model

    file = member_file(ensemble_dir, name)
    member = load_model(file)
    if "backbone" not in {layer.name for layer in member.layers}:
        raise CellfuseError(f"{file}: has no layer named 'backbone' (not a cellfuse classifier); "
                            "the student cannot start from it")
    n = copy_backbone(member, student, file)
    console.print(f"student backbone starts from member {name} ({file}, {n} layers)")


def teacher_probs(teacher, data: Dataset, run: Path, ensemble_dir: Path, name: str, console) -> np.ndarray:
    """The teacher's probabilities on `data`, cached in the run (keyed by the ensemble file's hash)."""
    from toolkit.runs import resolve_model_file

    key = hashlib.sha1(resolve_model_file(ensemble_dir).read_bytes()).hexdigest()[:16]
    cache = run / "checkpoint" / f"teacher_{name}_{key}.npz"
    if cache.exists():
        with np.load(cache) as f:
            return f["probs"]
    with console.status(f"teacher predicting {len(data)} {name} images (once)"):
        probs = teacher.predict(data.images.astype(np.float32), batch_size=256, verbose=0)
    save_npz(cache, probs=probs)
    return probs


# ---------------------------------------------------------------- the comparison table

def compare(recipe: Recipe, run: Path, ensemble_dir: Path, console: Console, n_timing: int = 512) -> dict:
    """Student vs ensemble vs best member, each with the ensemble's views: accuracy per validation
    set, parameters, file size, img/s on this machine (taking turns)."""
    from toolkit.ensemble import ensemble_components, member_file
    from toolkit.runs import load_model, resolve_model_file, write_csv, write_json
    from toolkit.tta import wrap_with_tta

    heaviest = ensemble_components(ensemble_dir)[0]  # the student and the best member get its views
    views, merge = heaviest["view_list"], heaviest["merge"]
    models = {"student": (run / "best.keras", views), "ensemble": (resolve_model_file(ensemble_dir), None),
              "best member": (member_file(ensemble_dir, "best-member"), views)}
    split = T.load_split(recipe, Console(quiet=True))
    rows, loaded = {}, {}
    for label, (path, tta) in models.items():
        model = load_model(path)
        rows[label] = {"params": int(model.count_params()), "bytes": path.stat().st_size}
        loaded[label] = wrap_with_tta(model, tta, merge) if tta and len(tta) > 1 else model
        for name, data in split.val.items():
            probs = loaded[label].predict(data.images.astype(np.float32), batch_size=256, verbose=0)
            rows[label][f"acc_{name}"] = float((probs.argmax(1) == data.labels).mean())
    for label, speed in _img_per_s(loaded, split.val["val"], n_timing).items():
        rows[label]["img_per_s"] = speed
    student, ensemble = rows["student"], rows["ensemble"]
    result = {"student_run": str(run), "mode": recipe.distill.mode, "init": recipe.distill.init,
              "views": heaviest["views"], "rows": rows,
              "size_ratio": ensemble["bytes"] / student["bytes"],
              "speed_ratio": student["img_per_s"] / ensemble["img_per_s"],
              "gap": {name: ensemble[f"acc_{name}"] - student[f"acc_{name}"] for name in split.val}}
    write_json(run / "distill.json", result)
    write_csv(run / "distill.csv", [{"model": label, **r} for label, r in rows.items()])
    console.print(_table(rows, list(split.val), heaviest["views"]))
    console.print(f"student: {result['size_ratio']:.1f}x smaller, {result['speed_ratio']:.1f}x faster; "
                  + ", ".join(f"{100 * g:+.1f} points behind on {n}" for n, g in result["gap"].items()))
    return result


def _img_per_s(models: dict, data: Dataset, n: int, rounds: int = 5) -> dict[str, float]:
    """Each model's best pass over `n` images, the models taking turns round by round: a shared
    machine's speed drifts (here by up to 2x), so only passes made side by side compare fairly."""
    x = data.images[np.arange(n) % len(data)].astype(np.float32)
    for model in models.values():
        model.predict(x[:256], batch_size=128, verbose=0)  # warm-up: tracing is not throughput
    best = dict.fromkeys(models, 0.0)
    for _ in range(rounds):
        for label, model in models.items():
            started = time.perf_counter()
            model.predict(x, batch_size=128, verbose=0)
            best[label] = max(best[label], n / (time.perf_counter() - started))
    return best


def _table(rows: dict, val_names: list[str], views: str) -> Table:
    table = Table(title=f"student vs ensemble (student with the ensemble's views: {views})")
    for col in ["model", *[f"acc {n}" for n in val_names], "parameters", "file MB", "img/s"]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, r in rows.items():
        table.add_row(label, *[f"{r[f'acc_{n}']:.4f}" for n in val_names], f"{r['params']:,}",
                      f"{r['bytes'] / 1e6:.2f}", f"{r['img_per_s']:.0f}")
    return table
