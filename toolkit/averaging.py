"""Weights after the fit, as train.finish_run turns them into models: the inference model (float32,
no optimizer: what best.keras holds), the kept snapshots and their average (SWA), the WiSE-FT blend
of a run started from another's weights, and a digest that tells whether two processes ended alike.

Importing this module is instant; Keras loads when a model is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from toolkit.backbones import build_classifier
from toolkit.batches import Predictor, Split
from toolkit.data import Dataset
from toolkit.recipe import Recipe
from toolkit.runs import (
    assign_by_path,
    load_model,
    load_weights,
    save_model_atomic,
    weights_by_path,
)

WISE_ALPHAS = (0.25, 0.5, 0.75)  # weight of the fine-tuned model; 0 is the start, 1 the result


def inference_model(recipe: Recipe, n_classes: int, checkpoint: Path):
    """The trained weights in a fresh float32 model with no optimizer: what best.keras holds."""
    import keras

    keras.mixed_precision.set_global_policy("float32")
    model = build_classifier(dataclasses.replace(recipe.model, weights="none"), n_classes)
    load_weights(model, checkpoint)
    return model


def accuracy(predict: Predictor, data: Dataset) -> float:
    """Top-1 accuracy on `data`, to four decimals (as summary.json reports it)."""
    return round(float((predict(data.images).argmax(1) == data.labels).mean()), 4)


def save_snapshots(recipe: Recipe, split: Split, run: Path, best: str) -> dict:
    """snapshot_e<N>.keras for each kept epoch and swa.keras, their weights averaged (BatchNorm's
    moving statistics averaged too: an approximation of SWA's re-estimation), beside best.keras so
    that they share its validation split; -> {file name: accuracy on the validation split}. A copy of
    best.keras (weights digest `best`: the best epoch's snapshot) is not written, nor the average of one
    snapshot: the ensemble would score the same model twice."""
    files = sorted((run / "checkpoint").glob("snapshot_e*.weights.h5"),
                   key=lambda f: int(f.name.removeprefix("snapshot_e").removesuffix(".weights.h5")))
    if not files:
        return {}
    scores, total = {}, None
    model = inference_model(recipe, split.train.n_classes, files[0])
    predict = Predictor(model)  # one traced function for every set of weights

    def keep(name: str, weights: list) -> None:  # `weights`: what the model holds now
        if weights_digest(weights) != best:
            save_model_atomic(model, run / name)
            scores[name] = accuracy(predict, split.val["val"])

    for file in files:
        load_weights(model, file)
        weights = model.get_weights()
        total = weights if total is None else [t + w for t, w in zip(total, weights, strict=True)]
        keep(file.name.removesuffix(".weights.h5") + ".keras", weights)
    if len(files) > 1:  # the average of one snapshot is that snapshot
        average = [t / len(files) for t in total]
        model.set_weights(average)
        keep("swa.keras", average)
    return scores


def save_wise(recipe: Recipe, split: Split, run: Path, model, predict: Predictor) -> dict:
    """wise.keras: the start's and the result's weights blended (WiSE-FT), the blend chosen on the
    held-out families (val_heldout among data.extra_val) when given, else on the validation split:
    corruption-tuned weights must not be chosen on the corruptions they were tuned on."""
    start = weights_by_path(load_model(recipe.train.init_from, compile=False))
    tuned = weights_by_path(model)
    steer = "val_heldout" if "val_heldout" in split.val else "val"

    def blend(alpha: float) -> None:
        assign_by_path(model, {k: (1 - alpha) * start[k] + alpha * w for k, w in tuned.items()}, run)

    scores = {}
    for alpha in WISE_ALPHAS:
        blend(alpha)
        scores[alpha] = accuracy(predict, split.val[steer])
    alpha = max(scores, key=scores.get)
    blend(alpha)
    save_model_atomic(model, run / "wise.keras")
    assign_by_path(model, tuned, run)
    return {"alpha": alpha, "chosen_on": steer, "accuracy": scores}


def weights_digest(weights: list) -> str:
    digest = hashlib.sha1()
    for w in weights:
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()
