"""`cellfuse evaluate`: the same metrics for any model file, run or ensemble directory, on any data."""

from __future__ import annotations

from pathlib import Path

from toolkit.data import load_dataset
from toolkit.ensemble import saved_model_predictions
from toolkit.errors import CellfuseError
from toolkit.report import (
    PAIRED_CAVEAT,
    classification_metrics,
    metrics_table,
    model_names,
    paired_comparison,
    per_class_table,
)
from toolkit.runs import (  # load_model also public here: evaluate.load_model
    check_compatible,
    load_model,
    resolve_model_file,
)
from toolkit.tta import merge, parse_tta, predict_views


def evaluate_model(model, data, *, tta: str = "none", batch_size: int = 256, console=None,
                   against=None, against_tta: str | None = None) -> dict:
    """Metrics of `model` on each data file (merged over the `tta` views); {data_path: metrics}. With
    `against` (another model, with `against_tta` views, else `tta`'s; an ensemble, which carries its
    own, none), each file's metrics also hold `against`: the two set side by side image by image
    (report.paired_comparison)."""
    from rich.console import Console
    from rich.progress import Progress

    console = console or Console()
    if against_tta is None:  # views on top of an ensemble's own would score another, 8x dearer model
        against_tta = "none" if against is not None and resolve_model_file(against).name == "ensemble.keras" else tta
    specs = {"model": parse_tta(tta)}  # a bad spec fails before the slow model load
    if against is not None:
        specs["against"] = parse_tta(against_tta)
    if batch_size < 1:
        raise CellfuseError(f"batch size must be positive, got {batch_size}")
    models = {"model": (model, load_model(model))}
    if against is not None:
        models["against"] = (against, load_model(against))
    datasets = [load_dataset(path) for path in data]
    results, correct = {}, {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("predicting", total=len(datasets) * sum(len(v) for v, _ in specs.values()))
        for dataset in datasets:
            read = set()  # the roles read from an ensemble's cache on this file
            for role, (path, keras_model) in models.items():
                check_compatible(keras_model, dataset, path)
                views, how = specs[role]
                probs = _from_ensemble_cache(path, keras_model, dataset, views)
                if probs is None:
                    probs = merge(predict_views(keras_model, dataset.images, views, batch_size,
                                                progress=lambda units: progress.advance(task, units)), how)
                else:
                    progress.advance(task, len(views))
                    read.add(role)
                correct[role] = probs.argmax(1) == dataset.labels
                if role == "model":
                    results[dataset.path] = {**classification_metrics(dataset.labels, probs, dataset.class_names),
                                             "from_ensemble_cache": "model" in read}
            if against is not None:
                results[dataset.path]["against"] = {"model": str(against), "tta": against_tta,
                                                    "from_ensemble_cache": "against" in read,
                                                    **paired_comparison(correct["model"], correct["against"])}
    title = f"{model} (TTA: {tta})"
    console.print(metrics_table({Path(p).name: m for p, m in results.items()}, title=title))
    cached = [Path(p).name for p, m in results.items()
              if m["from_ensemble_cache"] or m.get("against", {}).get("from_ensemble_cache")]
    if cached:
        console.print(f"the ensemble's predictions on {', '.join(cached)}: read from its cache, the saved model's own")
    for path, metrics in results.items():
        console.print(per_class_table(metrics, title=f"per class on {Path(path).name}"))
    if against is not None:
        console.print(_against_table(results, model, against, tta, against_tta))
    return results


def _against_table(results: dict, model, against, tta: str, against_tta: str):
    from rich.table import Table

    table = Table(title=f"{model} against {against} (TTA: {tta} vs {against_tta}), image by image "
                  "(exact McNemar test)", caption=PAIRED_CAVEAT)
    first, second = _two_names(model, against)
    for col in ("data", "points", f"only {first} right", f"only {second} right", "p"):
        table.add_column(col, justify="left" if col == "data" else "right")
    for path, metrics in results.items():
        c = metrics["against"]
        table.add_row(Path(path).name, f"{100 * c['difference']:+.1f}", str(c["a_only"]), str(c["b_only"]),
                      f"{c['p']:.3f}")
    return table


def _two_names(model, against) -> tuple[str, str]:
    """The two models as every table names them (report.model_names); two of one name by that name and
    the nearest part of their paths, as the user gave them, that tells them apart (the file, or a folder)."""
    (first,), (second,) = model_names([model]), model_names([against])
    if first != second:
        return first, second
    a, b = resolve_model_file(model).absolute(), resolve_model_file(against).absolute()
    if a.resolve() == b.resolve():  # one model set against itself
        return first, f"{second}-2"
    for x, y in zip(reversed(a.parts[1:]), reversed(b.parts[1:]), strict=False):
        if x != y:
            return f"{first} ({x})", f"{second} ({y})"
    return f"{first} ({a.parent})", f"{second} ({b.parent})"  # one folder inside the other


def _from_ensemble_cache(path, keras_model, dataset, views: list[str]):
    """An ensemble, as saved, on a validation file it was selected on: read from its cache
    (ensemble.saved_model_predictions), not minutes of its members' views on a CPU. None otherwise."""
    file = resolve_model_file(path)
    if file.name != "ensemble.keras" or views != ["id"]:
        return None
    return saved_model_predictions(file.parent, dataset, keras_model)
