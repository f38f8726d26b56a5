"""`make gpu-check` (python -m toolkit.gpucheck): one prepared run on a machine with a GPU, under 8 minutes.

    environment (TF build, CUDA/cuDNN, GPU name and memory)
    -> EfficientNetV2-S at 224 px, random weights: the toolkit's training img/s against a bare
       model.fit on cached tensors, for mixed precision off/on x XLA off/on
    -> an EfficientNet-Lite member and the pipeline's distill step, a few steps each
    -> a table and one JSON line (printed last).

Without a GPU it says so in one line and exits 1. `--dry-run` runs every step on the CPU at tiny
sizes (a tiny CNN instead of EfficientNetV2-S, timed with mixed precision and XLA both off, then both
on: each setting's code path once; the member row trains the tiny CNN too: tracing a Lite0 fit costs
a minute on 2 cores, and the CPU tests train every Lite recipe), so a test proves the script works
end to end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from toolkit.backbones import BACKBONES
from toolkit.data import load_dataset, one_hot, save_dataset
from toolkit.ensemble import build_ensemble
from toolkit.recipe import load_recipe, shipped_recipe, toml_string
from toolkit.runs import read_history

# toolkit.train and toolkit.distill load TensorFlow: imported inside the checks that use them, so
# importing this module (--help, an argument error) takes a fraction of a second.

@dataclasses.dataclass(frozen=True)
class Sizes:
    backbone: str
    member: str  # the backbone of the member row (the pipeline's member on a GPU)
    input_size: int
    batch: int
    steps: int  # training steps per timed epoch
    images: int  # synthetic training images
    epochs: int  # the last one is timed (the first includes tracing and XLA compilation)
    settings: tuple[tuple[bool, bool], ...]  # (mixed precision, XLA) pairs timed


EVERY_SETTING = ((False, False), (False, True), (True, False), (True, True))
GPU_SIZES = Sizes("efficientnetv2-s", "efficientnet-lite0", 224, 64, 40, 2048, 2, EVERY_SETTING)
# Both off, then both on: every branch of both settings at half the cost of the four (a test runs this).
DRY_SIZES = Sizes("tiny-cnn", "tiny-cnn", 0, 8, 1, 32, 1, ((False, False), (True, True)))


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m toolkit.gpucheck", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes")
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    console = Console()
    env = environment()
    if not env["gpus"] and not args.dry_run:
        print("gpu-check: no GPU visible to TensorFlow on this machine (--dry-run checks the script on the CPU)")
        return 1
    with tempfile.TemporaryDirectory(prefix="cellfuse-gpucheck-") as tmp:
        result = run_checks(Path(args.out or tmp), DRY_SIZES if args.dry_run else GPU_SIZES, env, console)
    result["dry_run"] = args.dry_run
    console.print(results_table(result))
    print(json.dumps(result))
    return 0 if all(r["status"] in ("ok", "not available") for r in result["rows"]) else 1


# ---------------------------------------------------------------- environment

def environment() -> dict:
    import tensorflow as tf

    build = tf.sysconfig.get_build_info()
    gpus = tf.config.list_physical_devices("GPU")
    return {"tensorflow": tf.__version__, "cuda": build.get("cuda_version"), "cudnn": build.get("cudnn_version"),
            "cuda_build": bool(build.get("is_cuda_build")),
            "gpus": [{**tf.config.experimental.get_device_details(g), "memory_mib": _gpu_memory(i)}
                     for i, g in enumerate(gpus)]}


def _gpu_memory(index: int) -> int | None:
    """Total memory from nvidia-smi (TensorFlow reports only what it has allocated)."""
    try:
        out = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
        return int(out.stdout.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------- the checks

def run_checks(work: Path, sizes: Sizes, env: dict, console: Console) -> dict:
    data = synthetic_data(work, sizes.images)
    rows = []
    for mixed, xla in sizes.settings:
        label = f"{sizes.backbone} {'mixed' if mixed else 'fp32'}{' xla' if xla else ''}"
        rows.append(_guarded(label, lambda m=mixed, x=xla: throughput(work, data, sizes, m, x), console))
    rows.append(_guarded(f"{sizes.member} member", lambda: member_run(work, data, sizes), console))
    rows.append(_guarded("distill step", lambda: distill_step(work, data, sizes), console))
    return {"environment": env, "sizes": sizes.__dict__, "rows": rows}


def _guarded(label: str, check, console: Console) -> dict:
    """One row: a failure is reported in the table, and the other rows still run."""
    console.rule(label)
    started = time.time()
    try:
        row = {"check": label, "status": "ok", **check()}
    except NotAvailable as e:
        row = {"check": label, "status": "not available", "note": str(e)}
    except Exception as e:  # noqa: BLE001 - the check exists to report whatever breaks
        row = {"check": label, "status": "failed", "note": f"{type(e).__name__}: {e}"[:300]}
    row["seconds"] = round(time.time() - started, 1)
    return row


class NotAvailable(Exception):
    pass


def synthetic_data(work: Path, n: int, name: str = "synthetic", seed: int = 0) -> Path:
    """Noise pictures in the challenge format: throughput does not depend on what they show."""

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
    return save_dataset(work / f"{name}.npz", images, np.arange(n) % 8)


def _recipe(data: Path, sizes: Sizes, name: str, *extra: str):

    return load_recipe(shipped_recipe("tiny"), [
        f'name="{name}"', f"data.train={toml_string(str(data))}", f'model.backbone="{sizes.backbone}"', 'model.weights="none"',
        f"model.input_size={sizes.input_size}", f"train.batch_size={sizes.batch}",
        f"train.steps_per_epoch={sizes.steps}", f"train.checkpoint_every={10 * sizes.steps}",
        f"train.stages=[{{epochs={sizes.epochs}, lr=1e-3, unfreeze=1.0}}]", 'augment.preset="light"', *extra])


def throughput(work: Path, data: Path, sizes: Sizes, mixed: bool, xla: bool) -> dict:
    """The toolkit's img/s (last epoch of `cellfuse train`) and a bare fit's on cached tensors."""
    from toolkit.train import train_recipe

    name = f"speed-{int(mixed)}{int(xla)}"
    recipe = _recipe(data, sizes, name, f'train.mixed_precision="{"on" if mixed else "off"}"',
                     f"train.xla={'true' if xla else 'false'}")
    train_recipe(recipe, runs_root=work / "runs", force=True, console=Console(quiet=True))
    toolkit = read_history(work / "runs" / name)[-1]["img_per_s"]
    bare = bare_fit(recipe, data, mixed, xla, sizes.epochs)
    return {"toolkit_img_per_s": round(toolkit, 1), "bare_img_per_s": round(bare, 1),
            "toolkit_vs_bare": round(toolkit / bare, 3)}


def bare_fit(recipe, data: Path, mixed: bool, xla: bool, epochs: int) -> float:
    """model.fit on tensors cached in memory, no augmentation or callbacks of ours: the ceiling."""
    import keras
    import tensorflow as tf

    from toolkit.train import build_model

    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    try:
        ds = load_dataset(data)
        model = build_model(recipe, ds.n_classes)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy", jit_compile=xla)
        batches = (tf.data.Dataset.from_tensor_slices((ds.images.astype(np.float32), one_hot(ds.labels, ds.n_classes)))
                   .batch(recipe.train.batch_size, drop_remainder=True).cache().repeat().prefetch(tf.data.AUTOTUNE))
        timer = _EpochTimer()
        model.fit(batches, epochs=epochs, steps_per_epoch=recipe.train.steps_per_epoch, callbacks=[timer], verbose=0)
        return recipe.train.steps_per_epoch * recipe.train.batch_size / timer.last
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _EpochTimer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.last = time.perf_counter() - self.started  # training steps only, as the toolkit counts

    return EpochTimer()


def member_run(work: Path, data: Path, sizes: Sizes) -> dict:
    """A member of the sizes' member backbone through `cellfuse train` (random weights: no download)."""
    from toolkit.train import train_recipe

    if sizes.member not in BACKBONES:
        raise NotAvailable(f"{sizes.member} is not in toolkit.backbones.BACKBONES")
    member = dataclasses.replace(sizes, backbone=sizes.member, input_size=sizes.input_size or 96)
    summary = train_recipe(_recipe(data, member, "member"), runs_root=work / "runs", force=True,
                           console=Console(quiet=True))
    return {"toolkit_img_per_s": summary["train_img_per_s"], "note": f"val acc {summary['metrics']['val']['accuracy']:.3f}"}


def distill_step(work: Path, data: Path, sizes: Sizes) -> dict:
    """The pipeline's distill step: a one-member ensemble of the fastest run above, then a student
    trained against it for a few steps in function-matching mode."""
    from toolkit.distill import distill_recipe

    runs = work / "runs"
    member = runs / "speed-11" if (runs / "speed-11" / "best.keras").exists() else runs / "speed-00"
    val_file = synthetic_data(work, 4 * sizes.batch, "val", seed=1)  # never the members' training file
    build_ensemble([member], [val_file], work / "ensemble", views="none", rounds=1, force=True,
                   console=Console(quiet=True))
    student = work / "student.toml"
    student.write_text(shipped_recipe("tiny").read_text() + "\n[distill]\nmode = \"function-matching\"\n")
    overrides = [f"data.train={toml_string(str(data))}", 'name="student"', f"train.steps_per_epoch={sizes.steps}",
                 f"train.batch_size={sizes.batch}", "train.stages=[{epochs=1, lr=1e-3, unfreeze=1.0}]"]
    result = distill_recipe(work / "ensemble", student, overrides, force=True, runs_root=runs,
                            console=Console(quiet=True))
    return {"note": f"student {result['rows']['student']['img_per_s']:.0f} img/s predicting"}


# ---------------------------------------------------------------- report

def results_table(result: dict) -> Table:
    env = result["environment"]
    gpus = ", ".join(f"{g.get('device_name', '?')} ({g.get('memory_mib') or '?'} MiB)" for g in env["gpus"]) or "none"
    table = Table(title=f"gpu-check: TF {env['tensorflow']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}; GPU: {gpus}"
                        + ("  [DRY RUN on CPU]" if result.get("dry_run") else ""))
    for col in ("check", "status", "toolkit img/s", "bare fit img/s", "toolkit/bare", "seconds", "note"):
        table.add_column(col, justify="left" if col in ("check", "status", "note") else "right")
    for r in result["rows"]:
        table.add_row(r["check"], r["status"], _num(r.get("toolkit_img_per_s")), _num(r.get("bare_img_per_s")),
                      _num(r.get("toolkit_vs_bare"), "{:.2f}"), _num(r.get("seconds")), r.get("note", ""))
    return table


def _num(value, fmt="{:.0f}") -> str:
    return "" if value is None else fmt.format(value)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
