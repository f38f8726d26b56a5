"""Metrics, confusion matrices, curves and image grids: what a person looks at after every run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolkit.runs import MODEL_FILES, atomic_save_figure, resolve_model_file

# Floor before a log in numpy: the value of toolkit.layers.EPS, the floor inside models (a test keeps them
# equal). Not imported from there: layers.py loads Keras, which `cellfuse grade` scores without.
EPS = 1e-12


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def progress_bar(console, *, transient: bool = False):
    """A rich bar for a counted loop: description, bar, done of total, elapsed time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=transient)


def classification_metrics(labels: np.ndarray, probs: np.ndarray, class_names) -> dict:
    """Accuracy, macro-F1, one-vs-rest AUC, NLL, ECE and per-class precision/recall/F1."""
    from sklearn.metrics import (
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    n_classes = len(class_names)
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(1)
    present = np.unique(labels)
    try:
        auc = float(roc_auc_score(labels, probs[:, present] / probs[:, present].sum(1, keepdims=True),
                                  multi_class="ovr", labels=present)) if len(present) > 1 else float("nan")
    except ValueError:
        auc = float("nan")
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=range(n_classes), zero_division=0)
    correct = pred == labels
    return {
        "n": int(len(labels)),
        "accuracy": float(correct.mean()),
        "accuracy_ci95": accuracy_interval(int(correct.sum()), len(labels)),
        "macro_f1": float(f1_score(labels, pred, labels=present, average="macro", zero_division=0)),
        "auc_ovr": auc,
        "nll": nll(labels, probs),
        "ece": expected_calibration_error(labels, probs),
        "per_class": {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                             "support": int(s[i])} for i, name in enumerate(class_names)},
        "confusion": confusion_matrix(labels, pred, labels=range(n_classes)).tolist(),
    }


def accuracy_interval(correct: int, n: int, level: float = 0.95) -> list[float]:
    """Wilson score interval of an accuracy of `correct` out of `n` images: where another draw of as many
    images from the same distribution could put it. At 0.80 on 399 images it spans 0.76-0.84."""
    from scipy.stats import binomtest

    if n == 0:
        return [float("nan"), float("nan")]
    interval = binomtest(int(correct), int(n)).proportion_ci(level, method="wilson")
    return [float(interval.low), float(interval.high)]


# Printed under every paired table: McNemar's p knows the images, not the training run behind each model.
PAIRED_CAVEAT = ("p weighs the draw of these images only: a second training seed of one recipe can move a "
                 "model further (docs/results.md), so compare recipes over seeds")


def paired_comparison(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Exact McNemar test of two models scored on the same images. Only the images one model gets right
    and the other wrong count; `p` is the chance of a split at least this uneven between two equally
    accurate models. Far stronger than comparing two intervals: most images both get right."""
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same images: {a.shape} vs {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    p = binomtest(a_only, a_only + b_only).pvalue if a_only + b_only else 1.0
    return {"difference": float(a.mean() - b.mean()), "a_only": a_only, "b_only": b_only, "p": float(p)}


def two_folds(labels: np.ndarray, seed: int = 0):
    """(fit rows, score rows) twice, each image scored once: stratified when every class present has two
    images. Every cross-fitted figure (ensemble selection, a checkpoint picked on an extra set) uses these."""
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(labels)
    stratify = counts[counts > 0].min() >= 2
    return (StratifiedKFold if stratify else KFold)(2, shuffle=True, random_state=seed).split(labels, labels)


def nll(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs[np.arange(len(labels)), labels], EPS, 1.0)
    return float(-np.log(p).mean())


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Each confidence bin's |accuracy - confidence|, weighted by its share of the images (Guo et al. 2017)."""
    gaps = [row["n"] * abs(row["accuracy"] - row["confidence"])
            for row in reliability_bins(labels, probs, bins) if row["n"]]
    return float(sum(gaps) / max(len(labels), 1))


def reliability_bins(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> list[dict]:
    """Per confidence bin (lo, hi]: how many images, their mean confidence and their accuracy (None
    when empty): the reliability diagram, and what expected_calibration_error weighs."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        rows.append({"lo": float(lo), "hi": float(hi), "n": int(inside.sum()),
                     "confidence": float(conf[inside].mean()) if inside.any() else None,
                     "accuracy": float((pred[inside] == labels[inside]).mean()) if inside.any() else None})
    return rows


def plot_confusion(confusion, class_names, path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix with counts, so small classes are readable."""
    plt = pyplot()
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(cm)):
        for j in range(len(cm)):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(cm)), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(cm)), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion (colour: row-normalised; text: counts)")
    out = atomic_save_figure(fig, path)
    plt.close(fig)
    return out


def plot_curves(history: list[dict], path: str | Path, stages: list[int] | None = None) -> Path:
    """Loss and every accuracy/AUC column per epoch, training beside validation; with `stages` (each
    stage's epochs, as the recipe lists them) a dotted line where each later stage begins."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    keys = [k for k in history[0] if k not in ("epoch", "stage", "lr", "seconds", "img_per_s")]  # not 0..1
    groups = {"loss": [k for k in keys if k.endswith("loss")],
              "accuracy / AUC": [k for k in keys if not k.endswith("loss")]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [row["epoch"] for row in history]
    for ax, (title, cols) in zip(axes, groups.items(), strict=False):
        for col in cols:
            ax.plot(epochs, [row[col] for row in history], marker=".", label=col)
        _mark_stages(ax, stages or [], max(epochs))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if cols:
            ax.legend(fontsize=7)
    out = atomic_save_figure(fig, path)
    plt.close(fig)
    return out


def stage_starts(stages: list[int]) -> list[int]:
    """The first epoch (1-based) of each stage after the first."""
    return [int(e) + 1 for e in np.cumsum(stages)[:-1]]


def _mark_stages(ax, stages: list[int], last_epoch: float) -> None:
    for i, start in enumerate(stage_starts(stages), start=2):
        if start <= last_epoch:  # a run stopped early never reached the later stages
            ax.axvline(start - 0.5, color="grey", linestyle=":", linewidth=1)
            ax.text(start - 0.5, 1.0, f" stage {i}", transform=ax.get_xaxis_transform(), fontsize=7,
                    color="grey", va="top", ha="left")


def plot_patience(curves: dict, path: str | Path, title: str = "") -> Path:
    """A distilled student's accuracy per epoch on each validation set (solid) and its ensemble's
    (dashed, same colour): how far the student still is, and whether it is still closing the gap."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, values) in enumerate(curves["student"].items()):
        colour = f"C{i}"
        points = [(e, v) for e, v in zip(curves["epoch"], values, strict=True) if v not in (None, "")]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", color=colour, label=f"student on {name}")
        if name in curves["ensemble"]:
            ax.axhline(curves["ensemble"][name], color=colour, linestyle="--", label=f"ensemble on {name}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out = atomic_save_figure(fig, path)
    plt.close(fig)
    return out


def save_image_grid(images: np.ndarray, titles: list[str], path: str | Path, ncols: int = 8,
                    suptitle: str = "", cell: float = 1.3) -> Path:
    """A grid of uint8 images with a small title each."""
    plt = pyplot()
    n = max(len(images), 1)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * cell, nrows * (cell + 0.25)), squeeze=False,
                             layout="constrained")  # a title of one row kept clear of the suptitle
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow(np.clip(image, 0, 255).astype(np.uint8))
        ax.set_title(title, fontsize=6)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    out = atomic_save_figure(fig, path, dpi=100)
    plt.close(fig)
    return out


def model_names(paths) -> dict[str, Path]:
    """{name: model file} for models given as files or run/ensemble folders: how every table names
    a model. A folder's model (best.keras, ...) takes the folder's name, a run's snapshot, SWA or WiSE-FT
    model the folder's and its own (cpu-lite0-swa), any other file its stem; a name seen before gets -2, -3."""
    names: dict[str, Path] = {}
    for path in paths:
        file = resolve_model_file(path)
        name = file.parent.name if file.name in MODEL_FILES else file.stem
        if file.name not in MODEL_FILES and (file.parent / "recipe.toml").is_file():
            name = f"{file.parent.name}-{file.stem}"
        unique, i = name, 2
        while unique in names:
            unique, i = f"{name}-{i}", i + 1
        names[unique] = file
    return names


def seed_table(summaries: list[dict], seeds):
    """Each recipe's accuracy on each validation set at every seed, their mean and spread (max - min):
    a lever whose gain is below the spread has not been shown. `summaries`: runs named <name>-seed<S>
    (recipe.seeded), each with its summary's `metrics`; the set that picked a run's checkpoint shows
    its cross-fitted figure (train.monitor), the one not chosen on."""
    from rich.table import Table

    table = Table(title=f"over seeds {', '.join(map(str, seeds))}: accuracy of the best checkpoint")
    for col in ("recipe", "set", *(f"seed {s}" for s in seeds), "mean", "spread"):
        table.add_column(col, justify="left" if col in ("recipe", "set") else "right")
    by_name = {summary["name"]: _unsteered(summary) for summary in summaries if "metrics" in summary}  # not workers
    bases = dict.fromkeys(name.rpartition("-seed")[0] for name in by_name)
    for base in bases:
        runs = [by_name.get(f"{base}-seed{s}", {}) for s in seeds]
        for data_set in dict.fromkeys(k for metrics in runs for k in metrics):
            values = [metrics.get(data_set, {}).get("accuracy") for metrics in runs]
            known = [v for v in values if v is not None]
            table.add_row(base, data_set, *(_fmt(v) for v in values), _fmt(float(np.mean(known))),
                          _fmt(max(known) - min(known)))
    return table


def _unsteered(summary: dict) -> dict:
    """A run's metrics, the set that picked its checkpoint replaced by its cross-fitted accuracy."""
    metrics, steered = dict(summary["metrics"]), summary.get("steered")
    if steered:
        metrics[f"{steered['set']} (cross-fitted)"] = {"accuracy": steered["cross_fitted_accuracy"]}
        del metrics[steered["set"]]
    return metrics


HEADERS = {"accuracy_ci95": "accuracy 95% interval"}


def metrics_table(rows: dict[str, dict], title: str = "",
                  columns=("accuracy", "accuracy_ci95", "macro_f1", "auc_ovr", "nll", "ece")):
    """A rich table: one row per (model or data set), one column per metric."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("")
    for col in columns:
        table.add_column(HEADERS.get(col, col), justify="right")
    for name, metrics in rows.items():
        table.add_row(name, *[_fmt(metrics.get(col)) for col in columns])
    return table


def per_class_table(metrics: dict, title: str = ""):
    from rich.table import Table

    table = Table(title=title)
    for col in ("class", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, m in metrics["per_class"].items():
        table.add_row(name, _fmt(m["precision"]), _fmt(m["recall"]), _fmt(m["f1"]), str(m["support"]))
    return table


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):  # an interval
        return "-".join(f"{v:.3f}" for v in value)
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.4f}"
    return str(value)
