"""`cellfuse inspect`: what a model gets wrong, where it looks, and which corruptions break it.

For each model (anything `evaluate` accepts) on one labelled data file, into one folder:
- top_losses.png: the worst images beside their Grad-CAM maps (Selvaraju et al. 2017), and
  classes.png: correctly classified examples of every class with their maps;
- most_confused.png and a table of the confused pairs, confusion.png, per-class P/R/F1;
- reliability.png and ECE (Guo et al. 2017), before and after the model's temperatures;
- robustness.png: accuracy per corruption family x severity (ImageNet-C's protocol, Hendrycks &
  Dietterich 2019) on cellfuse's own families and on the held-out ones, the families the model's
  training augmentation contains marked, and a summary row per model;
- report.html (one self-contained page) and inspect.json (every figure).
With several models, figures of one model carry its name (`top_losses-NAME.png`) and the shared
ones (reliability, robustness) show the models side by side in the order given.

Grad-CAM runs on the output of the layer named `backbone` (toolkit.backbones.build_classifier's
spatial feature map), else on the last 4-D output in the model's chain of layers; the resizing
and normalisation layers before it are part of the differentiated path, and the map is resized to
the raw image. For an ensemble it is the heaviest member's map (the figure says so).
"""

from __future__ import annotations

import html
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.augment import DEFAULTS, PRESETS
from toolkit.compat import flatten_layers
from toolkit.corrupt import (
    HELD_OUT,
    SEVERITIES,
    contents,
    corrupt_images,
    layer_families,
    parse_families,
)
from toolkit.data import load_dataset
from toolkit.ensemble import ensemble_components, resolve_member
from toolkit.errors import CellfuseError
from toolkit.recipe import read_toml
from toolkit.report import (
    EPS,
    classification_metrics,
    expected_calibration_error,
    model_names,
    plot_confusion,
    progress_bar,
    pyplot,
    reliability_bins,
)
from toolkit.runs import (
    atomic_save_figure,
    atomic_write_text,
    check_compatible,
    fresh_dir,
    load_model,
    resolve_model_file,
    write_json,
)
from toolkit.tta import check_probabilities

DEFAULT_FAMILIES = "cellfuse,own,held-out"


@dataclass
class Subject:
    """One model under inspection and what inspect found out about it."""

    name: str
    path: Path
    model: object  # keras.Model: raw pixels in, probabilities out
    cam_model: object | None  # the model Grad-CAM differentiates (an ensemble's heaviest member)
    cam_note: str  # which model's map, or why there is none
    trained_families: set[str] | None  # fine-grained corruption families its augmentation holds
    augment_note: str
    figures: dict = field(default_factory=dict)


# ---------------------------------------------------------------- loading what to inspect


def load_subject(path, name: str, dataset) -> Subject:
    """Load a model, its Grad-CAM model and its training augmentation; refuse a mismatch in one line."""
    model = load_model(path)
    check_compatible(model, dataset, path)
    cam_model, cam_note = _cam_source(path, model)
    families, augment_note = training_families(path)
    return Subject(name, Path(path), model, cam_model, cam_note, families, augment_note)


def _ensemble_dir(path) -> Path | None:
    file = resolve_model_file(path)
    return file.parent if file.name == "ensemble.keras" and (file.parent / "ensemble.json").is_file() else None


def _cam_source(path, model):
    """(model to differentiate or None, a line saying which, or why there is no map)."""
    ensemble = _ensemble_dir(path)
    if ensemble is None:
        split = feature_layer(model)
        return (model, f"Grad-CAM on {split}") if split else (None, _no_map(model))
    heaviest = ensemble_components(ensemble)[0]
    member = load_model(resolve_member(ensemble, heaviest["member_file"]))
    split = feature_layer(member)
    if not split:
        return None, f"no Grad-CAM: the heaviest member {heaviest['member']}: {_no_map(member)}"
    return member, (f"Grad-CAM of the heaviest ensemble member, {heaviest['member']} "
                    f"(weight {heaviest['weight']:.2f}), on {split}")


def _no_map(model) -> str:
    return (f"no Grad-CAM: {model.name} has no spatial feature map in a plain chain of layers "
            "(no layer named 'backbone', no learned layer with a 4-D output)")


def training_families(path) -> tuple[set[str] | None, str]:
    """Corruption families the training augmentation of a run (or every ensemble member) contains."""
    ensemble = _ensemble_dir(path)
    if ensemble is not None:
        found = [training_families(resolve_member(ensemble, c["member_file"]))
                 for c in ensemble_components(ensemble)]
        if any(families is None for families, _ in found):
            return None, "training augmentation unknown for a member: " + "; ".join(n for _, n in found)
        return set().union(*(f for f, _ in found)), "union of the members' training augmentation"
    recipe = resolve_model_file(path).parent / "recipe.toml"
    if not recipe.is_file():
        return None, f"training augmentation unknown (no recipe.toml beside {resolve_model_file(path).name})"
    return _recipe_families(recipe)


def _recipe_families(recipe: Path) -> tuple[set[str] | None, str]:
    try:
        table = read_toml(recipe)
        section = table.get("augment", {})
        preset = section.get("preset", DEFAULTS["preset"])
        specs = section.get("layers") or PRESETS[preset]
        layers = [spec["layer"] for spec in specs] + (["AugMix"] if section.get("augmix") else [])
        families = set().union(*(layer_families(layer) for layer in layers)) if layers else set()
        corrupted = float(table.get("data", {}).get("corrupt_fraction", 0.0))  # a corruption-tuned copy
    except (ValueError, KeyError, TypeError, CellfuseError) as e:  # read_toml's errors name the file too
        why = str(e).splitlines()[0].removeprefix(f"{recipe}: ")
        return None, f"training augmentation unknown ({recipe}: {why})"
    what = "layers" if section.get("layers") else f"preset {preset!r}"
    what += " + AugMix" if section.get("augmix") else ""
    if corrupted > 0:  # those rows carried cellfuse's own mix: its families are not unseen
        families |= contents("cellfuse")
        what += f" + the cellfuse corruption mix on {corrupted:.0%} of the rows"
    return families, f"{what} ({recipe})"


# ---------------------------------------------------------------- predictions and calibration


def predict(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(n, C) probabilities in the batches `evaluate` uses without TTA. Unlike toolkit.tta.predict_views
    it reuses the model's own traced function: the robustness grid predicts dozens of times."""
    chunks = [np.asarray(model.predict_on_batch(np.asarray(images[i:i + batch_size], np.float32)))
              for i in range(0, len(images), batch_size)]
    probs = np.concatenate(chunks).astype(np.float64)
    check_probabilities(probs, f"model {model.name!r}")
    return probs


def temperature_layers(model) -> list:
    """By class name: a submission's model.py registers its own inlined copy of cellfuse's layers under the
    same name, and a model loaded after it is built from that copy."""
    return [layer for layer in flatten_layers(model)
            if type(layer).__name__ == "TemperatureScale"]


def untempered_probs(model, images: np.ndarray, batch_size: int) -> np.ndarray | None:
    """The model's probabilities with every temperature set to 1; None if it has none."""
    layers = temperature_layers(model)
    if not layers:
        return None
    saved = [layer.temperature for layer in layers]
    try:
        for layer in layers:
            layer.temperature = 1.0  # a Python float, read when the predict function is traced
        model.make_predict_function(force=True)
        return predict(model, images, batch_size)
    finally:
        for layer, t in zip(layers, saved, strict=True):
            layer.temperature = t
        model.make_predict_function(force=True)


# ---------------------------------------------------------------- Grad-CAM


def _chain(model) -> list:
    import keras

    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def feature_layer(model) -> str | None:
    """Name of the layer Grad-CAM reads: `backbone`, else the chain's last 4-D output that comes from
    a learned layer (resizing and rescaling the pixels make no feature map)."""
    chain = _chain(model)
    if any(layer.name == "backbone" for layer in chain):
        return "backbone"
    learned = next((i for i, layer in enumerate(chain) if layer.weights), len(chain))
    spatial = [layer.name for layer in chain[learned:-1] if len(_output_shape(layer)) == 4]
    return spatial[-1] if spatial else None


def _output_shape(layer) -> tuple:
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError):
        return ()


def gradcam(model, images: np.ndarray, classes: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """(n, H, W) class-activation maps in 0..1 at the raw images' size.

    Runs the model's layers in order: raw pixels through resizing and normalisation to the feature
    map A (watched), then on to the class score y_c: the pre-softmax logit when the model ends
    in a softmax layer, else log p_c. Map = ReLU(sum_k mean_ij(dy_c / dA_ijk) A_k), max-normalised.
    Refuses (CellfuseError) a model whose layers are not a plain chain.
    """
    import tensorflow as tf

    chain, name = _chain(model), feature_layer(model)
    if name is None:
        raise CellfuseError(_no_map(model))
    split = [layer.name for layer in chain].index(name) + 1
    maps = []
    for start in range(0, len(images), batch_size):
        batch = tf.convert_to_tensor(np.asarray(images[start:start + batch_size], np.float32))
        maps.append(_gradcam_batch(chain, split, batch, classes[start:start + batch_size], model))
    return np.concatenate(maps) if maps else np.zeros((0, *images.shape[1:3]), np.float32)


def _gradcam_batch(chain, split: int, batch, classes, model) -> np.ndarray:
    import tensorflow as tf

    x = batch
    for layer in chain[:split]:
        x = layer(x, training=False)
    last = chain[-1]
    softmax_last = _is_softmax(last)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = x
        for layer in chain[split:-1] if softmax_last else chain[split:]:
            y = layer(y, training=False)
        if not softmax_last:  # y holds probabilities
            _check_chain(y, model, batch)
            y = tf.math.log(tf.maximum(y, EPS))
        else:
            _check_chain(last(y, training=False), model, batch)
        score = tf.gather(y, classes, axis=1, batch_dims=1)
    grads = tape.gradient(score, x)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * x, axis=-1))[..., None]
    cam = tf.image.resize(cam, batch.shape[1:3], method="bilinear")[..., 0].numpy()
    return cam / np.maximum(cam.max(axis=(1, 2), keepdims=True), EPS)


def _is_softmax(layer) -> bool:
    import keras

    return isinstance(layer, keras.layers.Activation) and layer.get_config().get("activation") == "softmax"


def _check_chain(probs, model, batch) -> None:
    """Layer by layer must give the model's own output, else the model is not a plain chain."""
    expected = np.asarray(model(batch, training=False))
    if not np.allclose(np.asarray(probs), expected, atol=1e-4):
        raise CellfuseError(f"no Grad-CAM: {model.name}'s layers are not a plain chain "
                            "(running them in order does not give its output)")


def cam_mass(cam: np.ndarray, rows: slice, cols: slice) -> float:
    """Share of a map's total in a region (what the corner test measures)."""
    return float(cam[..., rows, cols].sum() / max(cam.sum(), EPS))


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    from matplotlib import colormaps

    heat = colormaps[CAM_COLORMAP](cam)[..., :3] * 255
    return np.clip((1 - alpha) * image + alpha * heat, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- errors, confusions


def top_losses(labels, probs, n: int) -> np.ndarray:
    """Rows of the n largest cross-entropy losses, worst first."""
    losses = -np.log(np.maximum(probs[np.arange(len(labels)), labels], EPS))
    return np.argsort(-losses, kind="stable")[:n]


def most_confused(labels, probs, class_names, n: int = 10, examples: int = 4) -> list[dict]:
    """Off-diagonal (true, predicted) pairs by count, with up to `examples` rows each (most confident first)."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != labels)
    pairs: dict[tuple[int, int], list[int]] = {}
    for row in wrong[np.argsort(-probs[wrong].max(1), kind="stable")]:
        pairs.setdefault((int(labels[row]), int(pred[row])), []).append(int(row))
    ranked = sorted(pairs.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:n]
    return [{"true": class_names[t], "predicted": class_names[p], "count": len(rows), "rows": rows[:examples]}
            for (t, p), rows in ranked]


def correct_examples(labels, probs, n_classes: int, per_class: int, seed: int = 0) -> dict[int, np.ndarray]:
    """Up to `per_class` correctly classified rows of every class, drawn at random (seeded)."""
    rng = np.random.default_rng(seed)
    correct = probs.argmax(1) == labels
    return {c: np.sort(rng.permutation(np.flatnonzero(correct & (labels == c)))[:per_class])
            for c in range(n_classes)}


# ---------------------------------------------------------------- robustness


def robustness_rows(n: int, limit: int, seed: int) -> np.ndarray:
    """The images the robustness grid uses: all, or `limit` drawn at random (sorted)."""
    if limit <= 0 or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def robustness_grid(subjects, images, labels, families, severities, *, seed: int, batch_size: int,
                    advance, timing: dict) -> dict[str, dict[str, dict[int, float]]]:
    """{model: {family: {severity: accuracy}}}; each corrupted copy is made once for every model.
    `timing` (a defaultdict(float)) adds up the seconds spent corrupting and predicting per model.

    Cell (f, s) = accuracy on corrupt_images(images, s, seed, families=f): the same copy
    `cellfuse corrupt DATA --families f --severity s --seed seed` writes.
    """
    grid: dict = {s.name: {f: {} for f in families} for s in subjects}
    for family in families:
        for severity in severities:
            started = time.perf_counter()
            corrupted = corrupt_images(images, severity, seed, families=family)
            timing["corrupting"] += time.perf_counter() - started
            for subject in subjects:
                started = time.perf_counter()
                probs = predict(subject.model, corrupted, batch_size)
                timing[subject.name] += time.perf_counter() - started
                grid[subject.name][family][severity] = float((probs.argmax(1) == labels).mean())
                advance()
    return grid


def robustness_summary(grid: dict, clean: float, trained_on: dict[str, bool | None]) -> dict:
    """Mean corrupted accuracy and relative drop from clean: over every family, over the held-out
    families, and over the families the training augmentation does not contain (unseen)."""
    def mean(names):
        values = [a for f in names for a in grid[f].values()]
        return float(np.mean(values)) if values else None

    def drop(acc):
        return None if acc is None or clean == 0 else float((clean - acc) / clean)

    groups = {"all": list(grid), "held_out": [f for f in grid if f in HELD_OUT],
              "own": [f for f in grid if f not in HELD_OUT],
              "unseen": [f for f in grid if trained_on.get(f) is False],
              "seen": [f for f in grid if trained_on.get(f)]}
    out = {"clean_accuracy": clean}
    for group, names in groups.items():
        out[f"{group}_accuracy"] = mean(names)
        out[f"{group}_relative_drop"] = drop(mean(names))
    return out


def trained_marks(families, trained: set[str] | None) -> dict[str, bool | None]:
    """Per family: does the training augmentation contain it? None when the augmentation is unknown."""
    return {f: None if trained is None else bool(contents(f) & trained) for f in families}


# ---------------------------------------------------------------- figures

def _save(fig, path: Path) -> Path:
    plt = pyplot()
    out = atomic_save_figure(fig, path, dpi=100)
    plt.close(fig)
    return out


def plot_pairs(images, cams, titles, path: Path, suptitle: str, ncols: int = 4) -> Path:
    """Each image beside its Grad-CAM overlay (image alone when cams is None), `ncols` pairs a row."""
    plt = pyplot()
    per = 1 if cams is None else 2
    n = max(len(images), 1)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols * per, figsize=(ncols * per * 1.5, nrows * 1.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, title) in enumerate(zip(images, titles, strict=True)):
        ax = axes[i // ncols, (i % ncols) * per]
        ax.imshow(image)
        ax.set_title(title, fontsize=6)
        if cams is not None:
            axes[i // ncols, (i % ncols) * per + 1].imshow(overlay(image, cams[i]))
    fig.suptitle(suptitle, fontsize=8)
    if cams is not None:
        _cam_colorbar(fig)
    return _save(fig, path)


def plot_class_grid(images, cams, rows_by_class, class_names, path: Path, suptitle: str) -> Path:
    """One row per class: its correctly classified examples, each beside its map."""
    plt = pyplot()
    per = 1 if cams is None else 2
    width = max([len(r) for r in rows_by_class.values()] + [1]) * per
    fig, axes = plt.subplots(len(class_names), width, figsize=(width * 1.2, len(class_names) * 1.3),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for c, rows in rows_by_class.items():
        axes[c, 0].set_title(class_names[c] if len(rows) else f"{class_names[c]}: none correctly classified",
                             fontsize=7, loc="left")
        for j, row in enumerate(rows):
            axes[c, j * per].imshow(images[row])
            if cams is not None:
                axes[c, j * per + 1].imshow(overlay(images[row], cams[row]))
    fig.suptitle(suptitle, fontsize=8)
    if cams is not None:
        _cam_colorbar(fig)
    return _save(fig, path)


CAM_COLORMAP = "jet"
CAM_LABEL = "Grad-CAM: share of the map's peak"


def _cam_colorbar(fig) -> None:
    """The overlays' colour scale, in its own axes right of the grid (each map is max-normalised)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cax = fig.add_axes((0.92, 0.2, 0.012, 0.6))
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), CAM_COLORMAP), cax=cax)
    bar.set_label(CAM_LABEL, fontsize=7)
    bar.ax.tick_params(labelsize=6)


def plot_confused(images, pairs, path: Path) -> Path:
    plt = pyplot()
    width = max([len(p["rows"]) for p in pairs] + [1])
    fig, axes = plt.subplots(max(len(pairs), 1), width, figsize=(width * 1.2 + 1.5, max(len(pairs), 1) * 1.3),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, pair in enumerate(pairs):
        axes[i, 0].set_title(f"{pair['true']} -> {pair['predicted']} ({pair['count']})", fontsize=7, loc="left")
        for j, row in enumerate(pair["rows"]):
            axes[i, j].imshow(images[row])
    fig.suptitle("most confused pairs: true -> predicted (count), most confident mistakes first", fontsize=8)
    return _save(fig, path)


def plot_reliability(curves: dict[str, dict[str, list[dict]]], path: Path) -> Path:
    """One panel per model: accuracy against confidence per bin, before/after temperature."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 4), squeeze=False)
    for ax, (name, by_kind) in zip(axes[0], curves.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
        for kind, bins in by_kind.items():
            used = [b for b in bins if b["n"]]
            ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], marker="o", ms=3, label=kind)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_robustness(grid, severities, marks, clean, path: Path) -> Path:
    """Heat map per model: families (own, then held-out) x severity, plus each family's mean."""
    plt = pyplot()
    names = list(grid)
    families = list(next(iter(grid.values())))
    fig, axes = plt.subplots(1, len(names), figsize=(1.0 * (len(severities) + 1) * len(names) + 2.5,
                                                     0.35 * len(families) + 1.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        table = np.array([[grid[name][f][s] for s in severities] + [np.mean(list(grid[name][f].values()))]
                          for f in families])
        ax.imshow(table, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for (i, j), value in np.ndenumerate(table):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(severities) + 1), [str(s) for s in severities] + ["mean"], fontsize=7)
        ax.set_yticks(range(len(families)), [_family_label(f, marks[name].get(f)) for f in families], fontsize=7)
        own = sum(f not in HELD_OUT for f in families)
        if 0 < own < len(families):
            ax.axhline(own - 0.5, color="black", lw=2)
        ax.set_title(f"{name}: clean {clean[name]:.3f}", fontsize=8)
        ax.set_xlabel("severity")
    fig.suptitle("accuracy per corruption family; * = in the training augmentation, "
                 "below the line = held-out families", fontsize=8)
    return _save(fig, path)


def _family_label(family: str, trained: bool | None) -> str:
    return f"{family}{' *' if trained else ''}{' ?' if trained is None else ''}"


# ---------------------------------------------------------------- the command


def inspect_models(models, data, out, *, top: int = 16, per_class: int = 4, families: str = DEFAULT_FAMILIES,
                   severities=(1, 2, 3, 4, 5), limit: int = 400, seed: int = 0, batch_size: int = 256,
                   force: bool = False, console=None) -> dict:
    """Inspect each model on DATA and write the figures, report.html and inspect.json into OUT."""
    from rich.console import Console

    console = console or Console()
    started = time.perf_counter()
    if not models:
        raise CellfuseError("give at least one model, run or ensemble directory to inspect")
    if top < 1 or per_class < 0 or batch_size < 1:
        raise CellfuseError("--top and --batch-size must be positive, --per-class not negative")
    severities = sorted(set(severities))
    if (families and not severities) or not set(severities) <= set(SEVERITIES):
        raise CellfuseError(f"severities must be among 1..5, got {severities}")
    family_names = parse_families(families) if families else ()
    dataset = load_dataset(data)
    names = list(model_names(models))  # as every table names models
    subjects = [load_subject(path, name, dataset) for path, name in zip(models, names, strict=True)]
    out = fresh_dir(out, force, inputs=[*models, data], kind="inspect")
    with progress_bar(console, transient=True) as progress:
        for subject in subjects:
            _inspect_one(subject, dataset, out, len(subjects) > 1, top, per_class, seed, batch_size, progress)
        robustness = _robustness(subjects, dataset, family_names, severities, limit, seed, batch_size, progress)
    figures = _assemble(subjects, dataset, robustness)
    _plot_shared(subjects, robustness, out, figures)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    write_json(out / "inspect.json", figures)
    write_report(figures, out)
    _print_summary(figures, console)
    console.print(f"wrote {out / 'report.html'}, {out / 'inspect.json'} and "
                  f"{len(figures['files'])} figures in {figures['seconds']:.0f} s")
    return figures


def _file(name: str, subject: Subject, several: bool) -> str:
    return f"{name}-{subject.name}.png" if several else f"{name}.png"


def _inspect_one(subject: Subject, dataset, out: Path, several: bool, top: int, per_class: int, seed: int,
                 batch_size: int, progress) -> None:
    """Predictions, calibration, worst images, correct examples, confusions and their figures."""
    labels, images, names = dataset.labels, dataset.images, dataset.class_names
    task = progress.add_task(f"{subject.name}: predicting", total=3)
    probs = predict(subject.model, images, batch_size)
    raw = untempered_probs(subject.model, images, batch_size)
    progress.advance(task)
    metrics = classification_metrics(labels, probs, names)
    worst = top_losses(labels, probs, top)
    examples = correct_examples(labels, probs, len(names), per_class, seed)
    confused = most_confused(labels, probs, names)
    _piped(progress, f"{subject.name}: predicted {len(images)} images; Grad-CAM next")
    progress.update(task, description=f"{subject.name}: Grad-CAM")
    cams, cam_note = _maps(subject, images, np.concatenate([worst, *examples.values()]).astype(int), probs)
    progress.advance(task)
    titles = [f"true {names[labels[r]]}\npred {names[probs[r].argmax()]} ({probs[r].max():.2f})" for r in worst]
    files = {
        "top_losses": plot_pairs(images[worst], None if cams is None else cams[worst], titles,
                                 out / _file("top_losses", subject, several),
                                 f"{subject.name}: the {len(worst)} largest losses. {cam_note}"),
        "classes": plot_class_grid(images, cams, examples, names, out / _file("classes", subject, several),
                                   f"{subject.name}: correctly classified examples. {cam_note}"),
        "most_confused": plot_confused(images, confused, out / _file("most_confused", subject, several)),
        "confusion": plot_confusion(metrics["confusion"], names, out / _file("confusion", subject, several),
                                    title=f"{subject.name} on {Path(dataset.path).name}"),
    }
    progress.advance(task)
    calibration = {"ece": metrics["ece"], "ece_before_temperature": None if raw is None else
                   expected_calibration_error(labels, raw), "temperatures": [
                       layer.temperature for layer in temperature_layers(subject.model)]}
    curves = {"as saved": reliability_bins(labels, probs)}
    if raw is not None:
        curves = {"temperature 1 (before)": reliability_bins(labels, raw), "with temperatures": curves["as saved"]}
    subject.figures = {
        "path": str(subject.path), "metrics": metrics, "calibration": calibration, "reliability": curves,
        "top_losses": [{"row": int(r), "index": int(dataset.index[r]), "true": names[labels[r]],
                        "predicted": names[probs[r].argmax()], "probability": float(probs[r].max()),
                        "true_probability": float(probs[r, labels[r]])} for r in worst],
        "most_confused": [{**p, "index": [int(dataset.index[r]) for r in p["rows"]]} for p in confused],
        "correct_examples": {names[c]: [int(dataset.index[r]) for r in rows] for c, rows in examples.items()},
        "gradcam": cam_note, "training_augmentation": subject.augment_note,
        "files": {k: v.name for k, v in files.items()},
    }


def _maps(subject: Subject, images, rows, probs):
    """Grad-CAM maps (n, H, W) for `rows` (others zero) for the predicted class, or None and why."""
    if subject.cam_model is None:
        return None, subject.cam_note
    cams = np.zeros(images.shape[:3], np.float32)
    rows = np.unique(rows)
    try:
        cams[rows] = gradcam(subject.cam_model, images[rows], probs[rows].argmax(1))
    except CellfuseError as e:
        return None, str(e)
    return cams, subject.cam_note + " (maps for the predicted class)"


def _robustness(subjects, dataset, families, severities, limit, seed, batch_size, progress) -> dict:
    rows = robustness_rows(len(dataset), limit, seed)
    images, labels = dataset.images[rows], dataset.labels[rows]
    task = progress.add_task("robustness: corrupting and predicting",
                             total=len(families) * len(severities) * len(subjects))
    clean = {s.name: float((predict(s.model, images, batch_size).argmax(1) == labels).mean()) for s in subjects}
    timing = defaultdict(float)
    grid = robustness_grid(subjects, images, labels, families, severities, seed=seed, batch_size=batch_size,
                           advance=_family_lines(progress, task, families, len(severities) * len(subjects),
                                                 len(rows)), timing=timing)
    marks = {s.name: trained_marks(families, s.trained_families) for s in subjects}
    summary = {s.name: robustness_summary(grid[s.name], clean[s.name], marks[s.name]) for s in subjects}
    return {"images": len(rows), "seed": seed, "families": list(families), "severities": list(severities),
            "clean_accuracy": clean, "accuracy": grid, "in_training_augmentation": marks, "summary": summary,
            "seconds": {k: round(v, 1) for k, v in timing.items()}}


def _family_lines(progress, task, families, cells_per_family: int, n_images: int):
    """The grid's `advance`: moves the bar and, when the output is not a terminal (where the bar is not
    drawn), prints a line as each family is done, so a piped or logged run shows it is alive."""
    started, done = time.perf_counter(), [0]

    def advance():
        progress.advance(task)
        done[0] += 1
        if done[0] % cells_per_family == 0:
            k = done[0] // cells_per_family
            _piped(progress, f"robustness: family {k}/{len(families)} ({families[k - 1]}) done on {n_images} "
                             f"images, {time.perf_counter() - started:.0f} s")
    return advance


def _piped(progress, text: str) -> None:
    if not progress.console.is_terminal:
        progress.console.print(text, soft_wrap=True)


def _assemble(subjects, dataset, robustness) -> dict:
    return {"data": dataset.path, "n": len(dataset), "models": {s.name: s.figures for s in subjects},
            "order": [s.name for s in subjects], "robustness": robustness, "files": {}}


def _plot_shared(subjects, robustness, out: Path, figures: dict) -> None:
    files = figures["files"]
    for s in subjects:
        files.update({f"{s.name}/{k}": v for k, v in s.figures["files"].items()})
    files["reliability"] = plot_reliability({s.name: s.figures["reliability"] for s in subjects},
                                            out / "reliability.png").name
    if robustness["families"]:
        files["robustness"] = plot_robustness(robustness["accuracy"], robustness["severities"],
                                              robustness["in_training_augmentation"],
                                              robustness["clean_accuracy"], out / "robustness.png").name


# ---------------------------------------------------------------- console and report


def _fmt(value, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


SUMMARY_COLUMNS = [("clean_accuracy", "clean", False), ("all_accuracy", "corrupted (all)", False),
                   ("all_relative_drop", "drop", True), ("held_out_accuracy", "held-out", False),
                   ("held_out_relative_drop", "held-out drop", True), ("unseen_accuracy", "unseen", False),
                   ("seen_accuracy", "seen in training", False)]


def summary_rows(figures) -> list[list[str]]:
    """One row per model, in the order given: accuracy, calibration, robustness summary."""
    rows = []
    for name in figures["order"]:
        m, rob = figures["models"][name], figures["robustness"]["summary"].get(name, {})
        cal = m["calibration"]
        rows.append([name, _fmt(m["metrics"]["accuracy"]), _fmt(m["metrics"]["macro_f1"]),
                     _fmt(cal["ece_before_temperature"]), _fmt(cal["ece"]),
                     *[_fmt(rob.get(key), pct) for key, _, pct in SUMMARY_COLUMNS]])
    return rows


SUMMARY_HEADER = ["model", "accuracy", "macro F1", "ECE before T", "ECE", *[h for _, h, _ in SUMMARY_COLUMNS]]


def robustness_table_rows(figures, name: str) -> list[list[str]]:
    rob = figures["robustness"]
    rows = []
    for family in rob["families"]:
        cells = rob["accuracy"][name][family]
        mark = rob["in_training_augmentation"][name][family]
        rows.append([_family_label(family, mark), *[_fmt(cells[s]) for s in rob["severities"]],
                     _fmt(float(np.mean(list(cells.values()))))])
    return rows


def _print_summary(figures, console) -> None:
    """A narrow table (the page and inspect.json hold every column) and each model's notes."""
    from rich.table import Table

    rob = figures["robustness"]
    table = Table(title=f"inspect on {Path(figures['data']).name}; corrupted: mean over "
                        f"{len(rob['families'])} families x {len(rob['severities'])} severities, "
                        f"{rob['images']} images")
    for col in ("model", "acc", "ECE", "clean", "corrupted", "drop", "held-out", "drop "):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name in figures["order"]:
        m, summary = figures["models"][name], rob["summary"].get(name, {})
        cal = m["calibration"]
        ece = _fmt(cal["ece"]) if cal["ece_before_temperature"] is None else \
            f"{_fmt(cal['ece_before_temperature'])}->{_fmt(cal['ece'])}"
        table.add_row(name, _fmt(m["metrics"]["accuracy"]), ece,
                      *[_fmt(summary.get(k), pct) for k, pct in (
                          ("clean_accuracy", False), ("all_accuracy", False), ("all_relative_drop", True),
                          ("held_out_accuracy", False), ("held_out_relative_drop", True))])
    console.print(table)
    for name in figures["order"]:
        console.print(f"{name}: {figures['models'][name]['gradcam']}; training augmentation: "
                      f"{figures['models'][name]['training_augmentation']}")


READING_GUIDE = """
<p>How to read this page.</p>
<ul>
<li><b>Summary</b>: one row per model, in the order given. <i>ECE</i> is the expected calibration error
(0 = confidence matches accuracy); <i>before T</i> is with the model's temperatures set to 1 (ensembles).
<i>corrupted (all)</i> is the mean accuracy over every corruption family and severity, <i>drop</i> its
relative loss from clean accuracy on the same images. <i>held-out</i> families are ImageNet-C corruptions no
augmentation preset and no <code>cellfuse corrupt</code> mix contains: the honest robustness figure.
<i>unseen</i> averages the families the model's own training augmentation does not contain.</li>
<li><b>Robustness</b>: accuracy per family (rows) and severity 1-5 (columns). <code>*</code> marks a family
the training augmentation contains (accuracy there is expected to hold up), <code>?</code> an unknown
augmentation. Families below the line are held out.</li>
<li><b>Top losses</b>: the images the model is most confidently wrong about (true class, predicted class and
its probability), each beside its Grad-CAM map: red is where the evidence for the predicted class lies. A map
on the background or the image border instead of the white cell points at a shortcut; a wrong label in the
data also shows up here first.</li>
<li><b>Correct examples</b>: a few correctly classified images of every class with their maps: does the model
look at the cell's nucleus and granules?</li>
<li><b>Most confused</b>: the (true, predicted) pairs with the most mistakes and examples of each.</li>
<li><b>Reliability</b>: accuracy against confidence per bin; points below the diagonal are over-confident.</li>
</ul>
"""


def _table_html(header, rows) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img_html(out: Path, file: str | None, alt: str) -> str:
    import base64

    if not file:
        return ""
    data = base64.b64encode((out / file).read_bytes()).decode()
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def write_report(figures: dict, out: Path) -> Path:
    """report.html: every table and figure of inspect.json on one page, images embedded."""
    files, rob = figures["files"], figures["robustness"]
    parts = [f"<h1>cellfuse inspect: {html.escape(Path(figures['data']).name)}</h1>", READING_GUIDE,
             "<h2>Summary</h2>", _table_html(SUMMARY_HEADER, summary_rows(figures)),
             "<h2>Robustness</h2>",
             f"<p>{rob['images']} images, corruption seed {rob['seed']}.</p>",
             _img_html(out, files.get("robustness"), "robustness heat map")]
    for name in figures["order"]:
        parts.append(f"<h3>{html.escape(name)}</h3>")
        parts.append(_table_html(["family", *map(str, rob["severities"]), "mean"], robustness_table_rows(figures, name)))
    parts += ["<h2>Reliability</h2>", _img_html(out, files.get("reliability"), "reliability diagram")]
    for name in figures["order"]:
        parts += _model_html(name, figures["models"][name], out)
    page = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>cellfuse inspect</title><style>"
            "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse;"
            "margin:8px 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}"
            "</style></head><body>" + "\n".join(parts) + "</body></html>\n")
    return atomic_write_text(out / "report.html", page)


def _model_html(name: str, m: dict, out: Path) -> list[str]:
    per_class = [[c, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), v["support"]]
                 for c, v in m["metrics"]["per_class"].items()]
    confused = [[p["true"], p["predicted"], p["count"]] for p in m["most_confused"]]
    files = m["files"]
    return [f"<h2>{html.escape(name)}</h2>",
            f"<p>{html.escape(m['path'])}. {html.escape(m['gradcam'])}. Training augmentation: "
            f"{html.escape(m['training_augmentation'])}.</p>",
            "<h3>Top losses</h3>", _img_html(out, files["top_losses"], f"{name} top losses"),
            "<h3>Correct examples per class</h3>", _img_html(out, files["classes"], f"{name} correct examples"),
            "<h3>Most confused</h3>", _table_html(["true", "predicted", "count"], confused),
            _img_html(out, files["most_confused"], f"{name} most confused"),
            "<h3>Confusion matrix and per-class scores</h3>", _img_html(out, files["confusion"], f"{name} confusion"),
            _table_html(["class", "precision", "recall", "F1", "support"], per_class)]
