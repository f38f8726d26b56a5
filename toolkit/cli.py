"""The `cellfuse` command. Each command parses its options, calls one function, prints a summary.

Heavy modules (TensorFlow) are imported inside commands so `cellfuse --help` stays instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console

from toolkit import __version__
from toolkit.errors import CellfuseError

console = Console(stderr=False)


class Group(click.Group):
    """Turns CellfuseError into one red line and exit status 2: no traceback for bad input."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CellfuseError as e:
            from rich.text import Text

            # Text, not markup: messages quote things like "[distill]" that rich would eat.
            Console(stderr=True, soft_wrap=True).print(Text.assemble(("error: ", "bold red"), str(e)))
            sys.exit(2)


def print_json(obj) -> None:
    """The last line of standard output: one JSON object, for scripts."""
    from toolkit.runs import _jsonable

    click.echo(json.dumps(obj, default=_jsonable))


json_option = click.option("--json", "as_json", is_flag=True,
                           help="End with one JSON line holding the figures.")
force_option = click.option("--force", is_flag=True, help="Replace the output if it exists.")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cellfuse")
def main():
    """cellfuse: clean -> train -> ensemble -> distill -> export, for 96x96 cell images."""


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--threshold", default=None, type=int,
              help="Max phash Hamming distance for near duplicates (default: clean.DEFAULT_THRESHOLD).")
@click.option("--contamination", default=None, type=float,
              help="Expected fraction of odd single pictures for the outlier detector.")
@click.option("--no-tsne", is_flag=True, help="Skip the t-SNE plot (the slowest part).")
@force_option
@json_option
def clean(data, out, threshold, contamination, no_tsne, force, as_json):
    """Remove duplicates, label conflicts and non-cell pictures from DATA; write DIR/clean.npz."""
    from toolkit.clean import clean_file

    summary = clean_file(data, out, threshold=threshold, contamination=contamination,
                         tsne=not no_tsne, force=force, console=console)
    if as_json:
        print_json(summary)


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Corrupted npz to write.")
@click.option("--severity", default=3, show_default=True, type=click.IntRange(1, 5))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--families", default="cellfuse", show_default=True,
              help="Comma list of corruptions, one drawn per image: cellfuse (the 2-4 family mix), own "
                   "(its six families), held-out (ImageNet-C families no preset trains on), all, or names "
                   "such as fog,snow (README lists them).")
@force_option
def corrupt(data, out, severity, seed, families, force):
    """Write a corrupted copy of DATA (same labels), to validate robustness."""
    from toolkit.corrupt import corrupt_file

    corrupt_file(data, out, severity=severity, seed=seed, families=families, force=force, console=console)


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("outputs/clean"), show_default=True)
@click.option("--val-fraction", default=0.15, show_default=True, help="As the recipes' data.val_fraction.")
@click.option("--seed", default=0, show_default=True, help="As the recipes' data.split_seed.")
@click.option("--severity", default=3, show_default=True, type=click.IntRange(1, 5))
def split(data, out, val_fraction, seed, severity):
    """Write the validation split training will hold out, clean and corrupted (val.npz, val_corrupt.npz)."""
    from toolkit.pipeline import write_val_files

    for path in write_val_files(data, out, val_fraction, seed, severity):
        console.print(f"wrote {path}")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("outputs/preview.png"),
              show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE")
@click.option("--images", default=6, show_default=True, help="Distinct training images.")
@click.option("--repeats", default=6, show_default=True, help="Augmented copies of each.")
def preview(recipe, out, overrides, images, repeats):
    """Plot training images through RECIPE's augmentation, so cells stay recognisable."""
    from toolkit.augment import preview_recipe
    from toolkit.recipe import load_recipe

    path = preview_recipe(load_recipe(recipe, overrides), out, n_images=images, n_repeats=repeats)
    console.print(f"wrote {path}")


@main.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe key, e.g. --set train.epochs=3 (repeatable).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint.")
@click.option("--force", is_flag=True, help="Start over, replacing an existing run directory.")
@click.option("--parallel", default=1, show_default=True, help="Recipes trained at once.")
@json_option
def train(recipes, overrides, resume, force, parallel, as_json):
    """Fine-tune one backbone per RECIPE; write outputs/runs/<name>/."""
    from toolkit.train import train_many

    results = train_many(recipes, overrides, resume=resume, force=force, parallel=parallel,
                         console=console)
    if as_json:
        print_json(results)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("data", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--tta", default="none", show_default=True, help="Test-time views (see README).")
@click.option("--batch-size", default=256, show_default=True)
@json_option
def evaluate(model, data, tta, batch_size, as_json):
    """Metrics of MODEL (a .keras file, run or ensemble directory) on each DATA file."""
    from toolkit.evaluate import evaluate_model

    results = evaluate_model(model, data, tta=tta, batch_size=batch_size, console=console)
    if as_json:
        print_json(results)


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--val", "val_data", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Validation data (repeatable); the last one steers the selection.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--views", default="d4", show_default=True, help="Candidate TTA view sets, comma-separated.")
@click.option("--rounds", default=10, show_default=True, help="Greedy selection rounds.")
@force_option
@json_option
def ensemble(runs, val_data, out, views, rounds, force, as_json):
    """Combine trained RUNS by TTA-averaged soft voting, selected on validation data."""
    from toolkit.ensemble import build_ensemble

    result = build_ensemble(runs, val_data, out, views=views, rounds=rounds, force=force,
                            console=console)
    if as_json:
        print_json(result)


@main.command()
@click.argument("ensemble_dir", type=click.Path(path_type=Path))
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE")
@click.option("--resume", is_flag=True)
@click.option("--force", is_flag=True)
@json_option
def distill(ensemble_dir, recipe, overrides, resume, force, as_json):
    """Distill ENSEMBLE_DIR into the compact student described by RECIPE."""
    from toolkit.distill import distill_recipe

    result = distill_recipe(ensemble_dir, recipe, overrides, resume=resume, force=force,
                            console=console)
    if as_json:
        print_json(result)


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Submission zip.")
@click.option("--tta", default="none", show_default=True, help="Views model.py averages.")
@click.option("--precision", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True, help="Weights stored in this precision.")
@force_option
@json_option
def export(run, out, tta, precision, force, as_json):
    """Package RUN's model as a challenge submission zip."""
    from toolkit.export import export_submission

    result = export_submission(run, out, tta=tta, precision=precision, force=force, console=console)
    if as_json:
        print_json(result)


@main.command()
@click.argument("submission", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--timeout", default=600, show_default=True, help="Seconds before giving up.")
@json_option
def grade(submission, data, timeout, as_json):
    """Grade SUBMISSION.zip on DATA as the challenge grader would, in a clean subprocess."""
    from toolkit.export import grade_submission

    result = grade_submission(submission, data, timeout=timeout, console=console)
    if as_json:
        print_json(result)


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="npz to write.")
@click.option("--n", default=2000, show_default=True, help="Real (non-planted) images.")
@click.option("--seed", default=0, show_default=True)
@force_option
def synth(out, n, seed, force):
    """Draw a synthetic blood-smear data set, contaminated like the challenge's."""
    from toolkit.synth import write_synthetic

    write_synthetic(out, n=n, seed=seed, force=force, console=console)


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("outputs/demo"), show_default=True)
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Run on this file instead of synthetic data.")
@force_option
def demo(out, data, force):
    """The whole pipeline end to end: synth -> clean -> train x2 -> ensemble -> distill -> export -> grade."""
    from toolkit.pipeline import run_demo

    run_demo(out, data=data, force=force, console=console)


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("outputs/bench"), show_default=True)
@click.option("--quick", is_flag=True, help="Smaller sizes, for a smoke test.")
@json_option
def bench(out, quick, as_json):
    """Measure clean, augmentation, training, prediction and quality; print each figure's command."""
    from toolkit.bench import run_bench

    figures = run_bench(out, quick=quick, console=console)
    if as_json:
        print_json(figures)
