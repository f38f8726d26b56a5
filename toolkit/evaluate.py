"""`cellfuse evaluate`: the same metrics for any model file, run or ensemble directory, on any data."""

from __future__ import annotations

from pathlib import Path

from toolkit.data import load_dataset
from toolkit.errors import CellfuseError
from toolkit.report import classification_metrics, metrics_table, per_class_table
from toolkit.runs import load_model  # also public here: evaluate.load_model
from toolkit.tta import merge, parse_tta, predict_views


def evaluate_model(model, data, *, tta: str = "none", batch_size: int = 256, console=None) -> dict:
    """Metrics of `model` on each data file (merged over the `tta` views); {data_path: metrics}."""
    from rich.console import Console
    from rich.progress import Progress

    console = console or Console()
    views, how = parse_tta(tta)  # a bad spec fails before the slow model load
    if batch_size < 1:
        raise CellfuseError(f"batch size must be positive, got {batch_size}")
    keras_model = load_model(model)
    datasets = [load_dataset(path) for path in data]
    results = {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("predicting", total=len(datasets) * len(views))
        for dataset in datasets:
            check_compatible(keras_model, dataset, model)
            probs = merge(predict_views(keras_model, dataset.images, views, batch_size,
                                        progress=lambda units: progress.advance(task, units)), how)
            results[dataset.path] = classification_metrics(dataset.labels, probs, dataset.class_names)
    title = f"{model} (TTA: {tta})"
    console.print(metrics_table({Path(p).name: m for p, m in results.items()}, title=title))
    for path, metrics in results.items():
        console.print(per_class_table(metrics, title=f"per class on {Path(path).name}"))
    return results


def check_compatible(keras_model, dataset, model_path) -> None:
    """Refuse, in one line naming both files, a model whose input shape or class count differs from the data's."""
    want = tuple(keras_model.input_shape[1:])
    if want != tuple(dataset.images.shape[1:]):
        raise CellfuseError(f"{model_path}: takes images of shape {want}, but {dataset.path} holds "
                            f"{tuple(dataset.images.shape[1:])}")
    classes = keras_model.output_shape[-1]
    if classes != dataset.n_classes:
        raise CellfuseError(f"{model_path}: predicts {classes} classes, but {dataset.path} has "
                            f"{dataset.n_classes}")
