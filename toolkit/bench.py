"""`cellfuse bench`: honest, side-by-side figures, each with the command that reproduces it.

Every figure is a ratio of two things measured in the same run on the same machine:
clean time at 7k vs 50k images; each augmentation preset's img/s vs the training step's img/s;
the toolkit's training step vs a bare `model.fit` on cached tensors; student vs ensemble prediction
speed with the same TTA views; and the quality table (members, ensemble, student) on the corrupted
held-out sample after training the CPU recipes on the cleaned real training file.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from toolkit.augment import PRESETS, check_section, pipeline_throughput
from toolkit.backbones import build_classifier
from toolkit.clean import clean_arrays, clean_file
from toolkit.data import load_dataset
from toolkit.errors import CellfuseError
from toolkit.evaluate import evaluate_model
from toolkit.pipeline import STUDENT_LADDER, run_pipeline
from toolkit.recipe import load_recipe, shipped_recipe, toml_string
from toolkit.report import model_names
from toolkit.runs import fresh_dir, read_history, shared_dir, write_json

CPU_RECIPE = "cpu-mobilenetv3s"  # a shipped recipe (toolkit.catalog)


def run_bench(out: Path, *, quick: bool = False, force: bool = False, console: Console | None = None) -> dict:
    console = console or Console()
    data_dir = shared_dir() / "data"
    train, test = data_dir / "train.npz", data_dir / "test_shifted_sample.npz"
    if not train.exists():
        raise CellfuseError(f"{train}: the benchmark needs the real data (set CELLFUSE_SHARED)")
    out = fresh_dir(out, force, inputs=[train, test], kind="bench")
    figures = {"machine": machine()}
    figures["clean"] = bench_clean(train, out, quick, console)
    figures["train_step"] = bench_train_step(out / "clean" / "clean.npz", out, quick, console)
    figures["augment"] = bench_augment(out / "clean" / "clean.npz", figures["train_step"], quick, console)
    figures["pipeline"] = bench_pipeline(train, test, out, quick, console)
    write_json(out / "bench.json", figures)
    console.print(f"all figures: {out / 'bench.json'}")
    return figures


def machine() -> dict:
    import os

    import tensorflow as tf

    return {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "tensorflow": tf.__version__,
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")]}


def _show(console: Console, title: str, rows: list[tuple], command: str, columns: tuple) -> None:
    table = Table(title=title, caption=f"reproduce: {command}")
    for col in columns:
        table.add_column(col, justify="left" if col == columns[0] else "right")
    for row in rows:
        table.add_row(*[f"{v:,.1f}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)


# ---------------------------------------------------------------- clean at two sizes

def bench_clean(train: Path, out: Path, quick: bool, console: Console) -> dict:
    started = time.perf_counter()
    summary = clean_file(train, out / "clean", force=True, console=Console(quiet=True))
    real_s = time.perf_counter() - started
    data = load_dataset(train)
    started = time.perf_counter()
    clean_arrays(data.images, data.labels)
    small_s = time.perf_counter() - started
    n_big = 12_000 if quick else 50_000
    images, labels = tile_perturbed(data.images, data.labels, n_big, seed=0)
    started = time.perf_counter()
    clean_arrays(images, labels)
    big_s = time.perf_counter() - started
    result = {"n_real": len(data), "command_s": real_s, "real_s": small_s, "n_tiled": n_big, "tiled_s": big_s,
              "growth": (big_s / small_s) / (n_big / len(data)), "removed": summary}
    _show(console, f"clean: cost per image grows {result['growth']:.2f}x from 7k to {n_big // 1000}k images",
          [(f"{len(data):,} real images, whole command (plots, t-SNE, npz)", real_s, len(data) / real_s),
           (f"{len(data):,} real images, detectors only", small_s, len(data) / small_s),
           (f"{n_big:,} tiled + perturbed, detectors only", big_s, n_big / big_s)],
          f"cellfuse clean {train} --out DIR", ("input", "seconds", "img/s"))
    return result


# ---------------------------------------------------------------- training step

def bench_train_step(clean_npz: Path, out: Path, quick: bool, console: Console) -> dict:
    """The toolkit's step (tf.data + augmentation + callbacks) vs bare model.fit on cached tensors."""
    import keras

    # loads TensorFlow: the module stays light for what needs no model (tile_perturbed)
    from toolkit.train import train_recipe

    steps = 10 if quick else 30
    recipe = load_recipe(shipped_recipe(CPU_RECIPE), [f"data.train={toml_string(str(clean_npz))}", "data.extra_val=[]",
                                                f"train.steps_per_epoch={steps}",
                                                "train.stages=[{epochs=2, lr=1e-3, unfreeze=1.0}]"])
    summary = train_recipe(recipe, force=True, console=Console(quiet=True), runs_root=out / "step")
    toolkit_ips = read_history(summary["run"])[-1]["img_per_s"]  # second epoch: tracing excluded

    keras.mixed_precision.set_global_policy("float32")
    model = build_classifier(recipe.model, 8)
    model.compile("adamw", "categorical_crossentropy", metrics=["accuracy"])
    b = recipe.train.batch_size
    x = np.random.default_rng(0).uniform(0, 255, (b * steps, 96, 96, 3)).astype(np.float32)
    y = np.eye(8, dtype=np.float32)[np.arange(b * steps) % 8]
    model.fit(x[: b * 2], y[: b * 2], batch_size=b, epochs=1, verbose=0)  # trace once
    started = time.perf_counter()
    model.fit(x, y, batch_size=b, epochs=1, verbose=0)
    bare_ips = b * steps / (time.perf_counter() - started)
    result = {"recipe": recipe.name, "batch_size": b, "toolkit_img_per_s": toolkit_ips,
              "bare_fit_img_per_s": bare_ips, "ratio": toolkit_ips / bare_ips}
    _show(console, f"training step, {recipe.name} (batch {b})",
          [("cellfuse train (tf.data, augmentation, callbacks)", toolkit_ips),
           ("bare model.fit on cached tensors", bare_ips), ("ratio", toolkit_ips / bare_ips)],
          f"cellfuse train {CPU_RECIPE} --set train.steps_per_epoch={steps}", ("", "img/s"))
    return result


# ---------------------------------------------------------------- augmentation throughput

def bench_augment(clean_npz: Path, train_step: dict, quick: bool, console: Console) -> dict:
    data = load_dataset(clean_npz)
    rows, result = [], {}
    step = train_step["toolkit_img_per_s"]
    for preset in PRESETS:
        section = check_section({"preset": preset}, "bench")
        ips = pipeline_throughput(section, data.images[:2048], data.labels[:2048],
                                  n_batches=10 if quick else 30)
        result[preset] = ips
        rows.append((preset, ips, ips / step, "no" if ips > step else "YES: the GPU/CPU step would wait"))
    _show(console, f"augmentation pipeline vs the {train_step['recipe']} training step ({step:.0f} img/s)",
          rows, "cellfuse bench (toolkit.augment.pipeline_throughput)",
          ("preset", "img/s", "x step", "starves the step?"))
    return {"img_per_s": result, "train_step_img_per_s": step}


# ---------------------------------------------------------------- quality and prediction speed

def bench_pipeline(train: Path, test: Path, out: Path, quick: bool, console: Console) -> dict:
    """Train the CPU recipes on the cleaned real file, ensemble, distill; score all on the shifted sample."""
    extra = ("train.stages=[{epochs=1, lr=1e-3, unfreeze=0.0}, {epochs=1, lr=1e-3, unfreeze=1.0}]",
             "data.limit=2000") if quick else ()
    figures = run_pipeline(train, out / "pipeline", test, console, member_extra=extra,
                           student_extra=extra[1:] + (("train.stages=[{epochs=1, lr=1e-3, unfreeze=1.0}]",
                                                       "train.ema=false") if quick else ()), force=True,
                           students=STUDENT_LADDER[:1] if quick else None)  # a smoke test climbs no ladder
    members = model_names(v["run"] for k, v in figures.items() if k.startswith("train "))  # as ensemble names them
    models = {**members, "ensemble": out / "pipeline" / "ensemble", "student": figures["distill"]["student_run"]}
    quiet = Console(quiet=True)
    rows, quality = [], {}
    for name, path in models.items():
        metrics = evaluate_model(path, [test], console=quiet)[str(test)]
        quality[name] = {k: metrics[k] for k in ("accuracy", "macro_f1", "nll", "ece")}
        rows.append((name, f"{metrics['accuracy']:.4f}", f"{metrics['macro_f1']:.4f}", f"{metrics['nll']:.3f}"))
    _show(console, f"quality on {test.name} ({len(np.load(test)['labels'])} corrupted held-out images)", rows,
          "make bench (clean -> train recipes/cpu-*.toml -> ensemble -> distill)",
          ("model", "accuracy", "macro-F1", "NLL"))
    distill = figures["distill"]
    return {"quality": quality, "distill": distill, "ladder": figures["ladder"], "grade": figures["grade"],
            "stages": figures["stages"]}


# ---------------------------------------------------------------- benchmark data

def tile_perturbed(images: np.ndarray, labels: np.ndarray, n: int, seed: int = 0,
                   chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """`n` images by tiling the set (the benchmark's larger set). Every copy after the first tile
    gets a brightness shift, pixel noise and, half of them, a horizontal flip: copies are near
    duplicates or (flipped) new pictures, not byte-identical."""
    rng = np.random.default_rng(seed)
    m = len(images)
    source = np.concatenate([images, images[:, :, ::-1]])  # rows m.. are the mirror images
    flip = rng.random(n) < 0.5
    flip[:m] = False
    rows = np.arange(n) % m + m * flip
    noise = rng.integers(-3, 4, (256, *images.shape[1:]), dtype=np.int16)  # a bank: cheaper than fresh
    out = np.empty((n, *images.shape[1:]), np.uint8)
    out[:m] = images[:n]
    for a in range(m, n, chunk):
        x = source[rows[a:a + chunk]].astype(np.int16)
        x += noise[rng.integers(0, len(noise), len(x))]
        x += rng.integers(-8, 9, (len(x), 1, 1, 1), dtype=np.int16)
        out[a:a + len(x)] = np.clip(x, 0, 255, out=x)
    return out, np.asarray(labels).ravel()[rows % m]
