"""The `cellfuse` command. Each command parses its options, calls one function, prints a summary.

Unlike the rest of the package, this module imports toolkit modules inside each command, not at
the top: `cellfuse --help` then stays instant and loads no TensorFlow.

One surface for every command, checked over the command tree by tests/test_cli.py: every option has
a help line and shows its default; a command that writes has --out and --force (--force replaces
only what cellfuse wrote); every command has --json (one JSON line, printed last); every docstring
ends with a "\\b" line and an "Example:" paragraph that runs as written from the checkout.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import json
import logging
import os
import shlex
import sys
import threading
import traceback
import warnings
from pathlib import Path

import click
from rich.console import Console

from toolkit import __version__
from toolkit.errors import ERROR_PREFIX, EXIT_INTERNAL, EXIT_USER, CellfuseError
from toolkit.tta import MERGES
from toolkit.tta import VIEW_SETS as VIEWS_BY_SET

# Commands that write nothing, so need no --out/--force (`recipes copy` writes only its PATH, with
# --force). Every other command writes.
READ_ONLY = {"evaluate", "grade", "runs", "recipes", "backbones"}
# Commands that continue an interrupted run with --resume: Ctrl-C prints that command line.
RESUMABLE = {"train", "distill", "sweep", "demo"}
EXIT_INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)
SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's limit, as recipes bound their seeds
VIEW_SETS = tuple(VIEWS_BY_SET)  # the set names --help lists (toolkit.tta defines them; it loads no numpy)


# ---------------------------------------------------------------- output that reads well in a log

class LogConsole(Console):
    """The console commands print to. On a terminal, rich as usual. Piped or written to a log file,
    a line is never wrapped nor a table cell cut (the width is unlimited; panels and rules, which fill
    the width, are sized to their text), and a progress bar, which rich draws only on a terminal,
    prints a plain line every PROGRESS_STEP of each task instead."""

    UNLIMITED = 100_000
    PROGRESS_STEP = 0.1  # a line per 10 %
    PROGRESS_AFTER_S = 5.0  # a task that ends sooner prints no progress line: short tasks stay quiet

    @property
    def size(self):
        from rich.console import ConsoleDimensions

        size = super().size
        return size if self.is_terminal else ConsoleDimensions(self.UNLIMITED, size.height)

    @size.setter
    def size(self, new_size):
        Console.size.fset(self, new_size)

    def print(self, *objects, **kwargs):
        live_just_ended, self._live_just_ended = getattr(self, "_live_just_ended", False), False
        if self.is_terminal or self.quiet:
            return super().print(*objects, **kwargs)
        if live_just_ended and not objects:  # rich's Progress.stop ends a log's progress with a blank line
            return None
        with self.capture() as captured:  # a table pads its rows to its width: a log needs no trailing blanks
            super().print(*(_fit_to_text(o) for o in objects), **kwargs)
        self.file.write("\n".join(line.rstrip() for line in captured.get().split("\n")))
        self.file.flush()

    def set_live(self, live) -> bool:
        top = super().set_live(live)
        if top and not self.is_terminal and not self.quiet:
            self._progress_lines = ProgressLines(self, live)
        return top

    def clear_live(self) -> None:
        lines = getattr(self, "_progress_lines", None)
        if lines is not None and len(self._live_stack) == 1:
            self._progress_lines = None
            lines.stop()
        self._live_just_ended = len(self._live_stack) == 1
        super().clear_live()


def _fit_to_text(renderable):
    """Renderables that fill the console's width, made as wide as their text instead."""
    import copy

    from rich.constrain import Constrain
    from rich.panel import Panel
    from rich.rule import Rule

    if isinstance(renderable, Panel) and renderable.expand:
        renderable = copy.copy(renderable)
        renderable.expand = False
    elif isinstance(renderable, Rule):
        renderable = Constrain(renderable, 80)
    return renderable


class ProgressLines:
    """While a live display runs on a console that is not a terminal, polls what it would show and
    prints a line whenever a row's fraction (an "n/m" or "n%" it shows) passes another step."""

    POLL_S = 0.5

    def __init__(self, console: LogConsole, live):
        import time

        self.console, self.live, self.started = console, live, time.monotonic()
        self.printed: dict[int, int] = {}  # task row -> steps printed
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.wait(self.POLL_S):
            self.report()

    def stop(self):
        self.done.set()
        self.thread.join()
        self.report()

    def report(self):
        import time

        if time.monotonic() - self.started < self.console.PROGRESS_AFTER_S:
            return
        for task, row in enumerate(self._rows()):
            fraction = _fraction(row)
            step = None if fraction is None else int(fraction / self.console.PROGRESS_STEP + 1e-9)
            if step is not None and step > self.printed.get(task, 0):
                self.printed[task] = step
                Console.print(self.console, row, soft_wrap=True, highlight=False, markup=False)

    def _rows(self) -> list[str]:
        """The live display as plain text, one row per task, bars left out."""
        import io
        import re

        plain = Console(width=200, color_system=None, file=io.StringIO())
        with plain.capture() as captured:
            plain.print(self.live.get_renderable())
        rows = (re.sub(r"[━╸╺╾╼─]+", " ", line) for line in captured.get().splitlines())
        return [" ".join(row.split()) for row in rows if row.strip()]


def _fraction(row: str) -> float | None:
    import re

    if m := re.search(r"\b(\d+)/(\d+)\b", row):
        done, total = int(m[1]), int(m[2])
        return done / total if total else None
    if m := re.search(r"(\d+(?:\.\d+)?)%", row):
        return float(m[1]) / 100
    return None


console = LogConsole(stderr=False)


# ---------------------------------------------------------------- one way to end

def is_out_of_memory(error: Exception) -> bool:
    # tf.errors.ResourceExhaustedError, named so that a command without TensorFlow never imports it
    return isinstance(error, MemoryError) or type(error).__name__ == "ResourceExhaustedError"


TRAINING_MEMORY = "lower train.batch_size or model.input_size (--set), or turn on train.mixed_precision on a GPU"
MEMORY_ADVICE = {  # what the failing command itself can lower
    "train": TRAINING_MEMORY, "sweep": TRAINING_MEMORY, "demo": TRAINING_MEMORY,
    "distill": TRAINING_MEMORY + "; the bank holds distill.bank_views views of every image: fewer use less",
    "evaluate": "give a smaller --batch-size", "predict": "give a smaller --batch-size",
    "inspect": "give a smaller --batch-size",
}


def out_of_memory_message(error: Exception, command: str | None = None) -> str:
    detail = (str(getattr(error, "message", error)).strip().splitlines() or [type(error).__name__])[0]
    advice = MEMORY_ADVICE.get(command, "close what else uses this machine's memory, or use one with more")
    return f"out of memory ({detail[:160]}); {advice}"


class Group(click.Group):
    """Ends every failure with one "Error: " line: status 2 for bad input (no traceback), 1 for a bug;
    Ctrl-C ends with status 130 and the command that resumes. Lists its commands untruncated."""

    group_class = type  # `cellfuse recipes` is such a group too

    def invoke(self, ctx):
        argv = [*getattr(ctx, "_protected_args", ()), *ctx.args]  # Click consumes them below
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            interrupted(argv)
        except CellfuseError as e:
            fail(str(e), EXIT_USER)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:  # anything else is a bug: its traceback goes into the report
            if is_out_of_memory(e):
                fail(out_of_memory_message(e, argv[0] if argv else None), EXIT_USER)
            traceback.print_exc()
            fail(f"internal failure ({type(e).__name__}: {e}); please report it with the traceback above",
                 EXIT_INTERNAL)
        finally:  # the command is over: its outputs are free for the next one (in-process callers too)
            from toolkit.runs import release_locks

            release_locks()


    def format_commands(self, ctx, formatter):
        """Each command's first sentence whole, where Click would cut it at the terminal's width."""
        rows = [(name, self.get_command(ctx, name).get_short_help_str(limit=1_000))
                for name in self.list_commands(ctx) if not self.get_command(ctx, name).hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def interrupted(argv: list[str]):
    """Ctrl-C: say how to continue (a resumable command's own line with --resume), exit 130."""
    message = "interrupted"
    if argv[:1] == ["demo"] and os.environ.get("MAKELEVEL"):  # under `make demo`, which sets Keras' cache
        values = {name: argv[argv.index(flag) + 1] for name, flag in (("OUT", "--out"), ("DATA", "--data"))
                  if flag in argv[:-1]}
        message += f"; to continue: make demo {' '.join(f'{k}={shlex.quote(v)}' for k, v in values.items())} RESUME=1"
    elif argv and argv[0] in RESUMABLE:
        again = [a for a in argv if a != "--force"] + ([] if "--resume" in argv else ["--resume"])
        message += f"; to continue: cellfuse {shlex.join(again)}"
    fail(message, EXIT_INTERRUPTED)


def fail(message: str, status: int):
    from rich.text import Text

    # Text, not markup: messages quote things like "[distill]" that rich would eat.
    Console(stderr=True, soft_wrap=True).print(Text.assemble((ERROR_PREFIX, "bold red"), message))
    sys.exit(status)


# ---------------------------------------------------------------- TensorFlow's start-up noise

def quiet_tensorflow(verbose: bool) -> None:
    """Hide TensorFlow's C++ log lines (oneDNN, CUDA stubs, a cuInit "error" on every CPU-only
    machine): they read like failures. Not with -v, nor when the user set TF_CPP_MIN_LOG_LEVEL."""
    if verbose:
        return
    quiet_python_warnings()
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # must be set before TensorFlow is imported
    if "tensorflow" not in sys.modules and _stderr_is_fd2():
        sys.meta_path.insert(0, _SilentImport("tensorflow"))


def quiet_python_warnings() -> None:
    """Hide what TensorFlow and Keras log or warn from Python (tf.function retracing, absl notes, Keras
    UserWarnings): advice to their developers, not to someone running a command. -v shows them.
    Set before TensorFlow is imported, which keeps a level it finds on its logger."""
    for name in ("tensorflow", "absl", "keras"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(tensorflow|keras|absl|tf_keras)(\.|$)")


def _stderr_is_fd2() -> bool:
    try:
        return sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a test runner's stream: nothing to silence
        return False


class _SilentImport(importlib.abc.MetaPathFinder):
    """The first import of `name` runs with file descriptor 2 on /dev/null: TensorFlow's libraries log
    before absl's logging is set up, where TF_CPP_MIN_LOG_LEVEL does not reach."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _SilentLoader(spec.loader)
        return spec


class _SilentLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, attr):
        return getattr(self.loader, attr)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with fd2_to_devnull():
            self.loader.exec_module(module)
        module.__spec__.loader = module.__loader__ = self.loader


@contextlib.contextmanager
def fd2_to_devnull():
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# ---------------------------------------------------------------- shared options

class ViewSpec(click.ParamType):
    """A TTA spec (`d4`, `d4+shifts`, `d4:geometric`), or several comma-separated; with `auto=True` also the
    word `auto` (export's choice from a student's distill comparison). Checked when parsed."""

    name = "views"

    def __init__(self, several: bool = False, auto: bool = False):
        self.several, self.auto = several, auto

    def get_metavar(self, param, ctx=None) -> str:
        return (("auto|" if self.auto else "") + f"[{'|'.join(VIEW_SETS)}][+...][:{'|'.join(MERGES)}]"
                + (",..." if self.several else ""))

    def convert(self, value, param, ctx):
        from toolkit.tta import parse_tta

        if self.auto and value == "auto":
            return value
        for spec in str(value).split(",") if self.several else [value]:
            try:
                parse_tta(spec.strip())
            except CellfuseError as e:
                self.fail(f"{e}{'; or auto' if self.auto else ''}", param, ctx)
        return value


class SeedList(click.ParamType):
    """Comma-separated distinct whole numbers: `2,3`."""

    name = "seeds"

    def get_metavar(self, param, ctx=None) -> str:
        return "S1,S2,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            seeds = tuple(int(part) for part in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r}: expected whole numbers joined by commas, e.g. 2,3", param, ctx)
        if len(set(seeds)) != len(seeds) or min(seeds) < 0 or max(seeds) >= 2**32:
            self.fail(f"{value!r}: the seeds must be distinct, from 0 to 2**32 - 1", param, ctx)
        return seeds


seeds_option = click.option(
    "--seeds", type=SeedList(), default=None,
    help="Run each recipe once per seed (train.seed, run named <name>-seed<S>) and end with each validation "
         "set's accuracy per seed, mean and spread: two seeds of one recipe differ by more than most levers.")


VIEWS_HELP = ("Test-time views: a set, or views joined with + (d4+shifts); :geometric or :logits "
              "merges them otherwise than by the mean.")


def print_json(obj) -> None:
    """The last line of standard output: one JSON object, for scripts."""
    from toolkit.runs import jsonable

    click.echo(json.dumps(obj, default=jsonable))


json_option = click.option("--json", "as_json", is_flag=True,
                           help="End with one JSON line holding the figures.")
force_option = click.option("--force", is_flag=True,
                            help="Replace an existing output (only what cellfuse itself wrote there).")
set_option = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                          help="Override a recipe key (repeatable), e.g. --set train.batch_size=32; "
                               "--set train.epochs=N sets the last stage's epochs.")
resume_option = click.option("--resume", is_flag=True, help="Continue an interrupted run from its checkpoint.")
runs_out_option = click.option("--out", type=click.Path(path_type=Path), default=Path("outputs/runs"),
                               help="Folder that receives the run folder <recipe name>/.")


COMPLETION = """\b
Shell completion (bash; zsh and fish alike, with zsh_source or fish_source):
  eval "$(_CELLFUSE_COMPLETE=bash_source cellfuse)"    # add this line to ~/.bashrc"""


@click.group(cls=Group, epilog=COMPLETION,
             context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, "-V", "--version", prog_name="cellfuse", help="Show the version and exit.")
@click.option("-v", "--verbose", is_flag=True,
              help="Show TensorFlow's own log lines and warnings (C++ and Python) too.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors and --json output (for scripts).")
def main(verbose, quiet):
    """cellfuse: clean -> split -> train -> ensemble -> distill -> export -> grade, for 96x96 cell images.

    Exit status: 0 done; 2 a problem with what you gave (command line, data file, recipe, an output
    that exists), explained on one "Error:" line; 1 an internal failure, after its traceback.

    \b
    Example:
      cellfuse clean ../shared/data/train.npz --out outputs/clean
    """
    if verbose and quiet:
        raise click.UsageError("-v/--verbose and -q/--quiet exclude each other")
    console.quiet = quiet
    quiet_tensorflow(verbose)


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output folder: clean.npz, report.json, removed.png, tsne.png.")
@click.option("--threshold", default=4, type=click.IntRange(0, 32),
              help="Max perceptual-hash Hamming distance (bits) between near duplicates.")
@click.option("--contamination", default=0.01, type=click.FloatRange(0, 0.5, max_open=True),
              help="Cap on the share of distinct pictures the outlier detector may remove.")
@click.option("--no-tsne", is_flag=True, help="Skip the t-SNE plot (the slowest part).")
@force_option
@json_option
def clean(data, out, threshold, contamination, no_tsne, force, as_json):
    """Remove duplicates, label conflicts and non-cell pictures from DATA; write DIR/clean.npz.

    \b
    Example:
      cellfuse clean ../shared/data/train.npz --out outputs/clean
    """
    from toolkit import precheck

    precheck.data_file(data)
    from toolkit.clean import clean_file

    summary = clean_file(data, out, threshold=threshold, contamination=contamination,
                         tsne=not no_tsne, force=force, console=console)
    if as_json:
        print_json(summary)


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Corrupted npz to write.")
@click.option("--severity", default=3, type=click.IntRange(1, 5),
              help="How strong the corruptions are, 1 (mild) to 5; 3 resembles the challenge's test.")
@click.option("--seed", default=0, type=click.IntRange(0, SEED_MAX), help="Seed of the corruptions drawn (same seed, same file).")
@click.option("--families", default="cellfuse", show_default=True,
              help="Comma list of corruptions, one drawn per image: cellfuse (the 2-4 family mix), own "
                   "(its six families), held-out (ImageNet-C families no preset trains on), all, or names "
                   "such as fog,snow (docs/commands.md lists them).")
@force_option
@json_option
def corrupt(data, out, severity, seed, families, force, as_json):
    """Write a corrupted copy of DATA (same labels), to validate robustness.

    \b
    Example:
      cellfuse corrupt outputs/clean/clean.npz --out outputs/clean/corrupt.npz --severity 3
    """
    from toolkit import precheck

    precheck.data_file(data)
    precheck.output_file(out, None, force, inputs=[data])
    from toolkit.corrupt import corrupt_file

    path = corrupt_file(data, out, severity=severity, seed=seed, families=families, force=force,
                        console=console)
    if as_json:
        print_json({"data": data, "out": path, "severity": severity, "seed": seed, "families": families})


@main.command(short_help="Write the validation split training will hold out, clean and corrupted.")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("outputs/clean"),
              help="Folder that receives val.npz, val_corrupt.npz and val_heldout.npz.")
@click.option("--val-fraction", default=0.15, help="As the recipes' data.val_fraction.")
@click.option("--seed", default=0, type=click.IntRange(0, SEED_MAX), help="As the recipes' data.split_seed.")
@click.option("--severity", default=3, type=click.IntRange(1, 5),
              help="Corruption strength of val_corrupt.npz and val_heldout.npz, as in `cellfuse corrupt`.")
@click.option("--families", "held_out", default="held-out",
              help="Corruption families of val_heldout.npz, as `cellfuse corrupt --families` takes them "
                   "(held-out: the ImageNet-C families no preset trains on); '' writes no such file.")
@force_option
@json_option
def split(data, out, val_fraction, seed, severity, held_out, force, as_json):
    """Write the validation split training will hold out: clean, corrupted, and corrupted by held-out families
    (val.npz, val_corrupt.npz, val_heldout.npz).

    \b
    Example:
      cellfuse split outputs/clean/clean.npz --out outputs/clean
    """
    from toolkit import precheck

    precheck.data_file(data)
    from toolkit.corrupt import write_val_files

    written = write_val_files(data, out, val_fraction, seed, severity, held_out=held_out, force=force)
    console.print("wrote " + ", ".join(str(p) for p in written.values()))
    if as_json:
        print_json(written)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("outputs/preview.png"),
              help="PNG to write.")
@set_option
@click.option("--images", default=6, type=click.IntRange(1), help="Distinct training images.")
@click.option("--repeats", default=6, type=click.IntRange(1), help="Augmented copies of each.")
@force_option
@json_option
def preview(recipe, out, overrides, images, repeats, force, as_json):
    """Plot training images through RECIPE's augmentation, so cells stay recognisable.

    \b
    Example:
      cellfuse preview recipes/cpu-mobilenet.toml --set augment.preset=heavy --out outputs/preview-heavy.png
    """
    from toolkit import precheck

    loaded = precheck.recipe(recipe, overrides)
    precheck.output_file(out, ".png", force)
    from toolkit.augment import preview_recipe

    path = preview_recipe(loaded, out, n_images=images, n_repeats=repeats)
    console.print(f"wrote {path}")
    if as_json:
        print_json({"out": path, "images": images, "repeats": repeats})


@main.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(path_type=Path))
@set_option
@runs_out_option
@resume_option
@click.option("--force", is_flag=True, help="Start over, replacing a run folder cellfuse wrote.")
@click.option("--parallel", default=1, type=click.IntRange(1), help="Recipes trained at once, each in its own process.")
@click.option("--from", "start_from", type=click.Path(path_type=Path), default=None,
              help="Start from a finished run's weights (train.init_from); its WiSE-FT blend is kept as wise.keras.")
@seeds_option
@json_option
def train(recipes, overrides, out, resume, force, parallel, start_from, seeds, as_json):
    """Fine-tune one backbone per RECIPE; write OUT/<recipe name>/.

    A corruption-tuned copy of a member: --from RUN with RUN's recipe under a new name, a short
    low-lr stage and data.corrupt_fraction (see docs/commands.md).

    \b
    Example:
      cellfuse train recipes/cpu-mobilenet.toml --set train.epochs=3 --set train.batch_size=32
    """
    from toolkit import precheck
    from toolkit.recipe import toml_string

    if start_from is not None:
        overrides = (*overrides, f"train.init_from={toml_string(str(precheck.model(start_from)))}")

    from toolkit.recipe import seeded

    jobs = seeded(recipes, overrides, seeds)
    precheck.runs_to_train(jobs, out, resume=resume, force=force)
    from toolkit.train import train_many

    results = train_many(jobs, resume=resume, force=force, parallel=parallel, console=console, runs_root=out)
    if seeds:
        from toolkit.report import seed_table

        console.print(seed_table(results, seeds))
    if as_json:
        print_json(results)


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--space", "space", type=click.Path(path_type=Path), required=True,
              help="Search-space TOML: recipe keys with a range, log range or choice (docs/commands.md, sweep).")
@click.option("--trials", default=20, show_default=True, type=click.IntRange(1),
              help="Trials in the whole sweep; a resumed sweep counts those already run.")
@click.option("--parallel", default=1, show_default=True, type=click.IntRange(1),
              help="Trials trained at once, each in its own process (and on its own GPU when there are GPUs).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a recipe key for every trial, as in train (repeatable).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              show_default="outputs/sweeps/<recipe name>", help="Sweep directory.")
@click.option("--resume", is_flag=True, help="Continue a killed sweep; finished trials are never re-run.")
@click.option("--force", is_flag=True, help="Start over, replacing a sweep directory cellfuse wrote.")
@json_option
def sweep(recipe, space, trials, parallel, overrides, out, resume, force, as_json):
    """Search RECIPE's hyper-parameters over SPACE with Optuna (TPE, Hyperband pruning).

    Every trial is an ordinary run directory under OUT/trials/; OUT gets sweep.csv, sweep.png and
    best.toml (the best trial's recipe, ready for `cellfuse train`).

    \b
    Example:
      cellfuse synth --out outputs/synth.npz
      cellfuse sweep recipes/tiny.toml --space recipes/spaces/tiny.toml --trials 4 --set data.train=outputs/synth.npz
    """
    from toolkit import precheck

    precheck.recipe(recipe, overrides, data=False)
    from toolkit.recipe import find_space

    find_space(space)  # a file, or a shipped space's name (spaces/tiny)
    from toolkit.sweep import run_sweep  # no TensorFlow until the space and data files check out

    result = run_sweep(recipe, space, overrides=overrides, out=out, trials=trials, parallel=parallel,
                       resume=resume, force=force, console=console)
    if as_json:
        print_json(result)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("data", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--tta", default="none", type=ViewSpec(), help=VIEWS_HELP)
@click.option("--against", type=click.Path(path_type=Path), default=None,
              help="A second model: the two set side by side on each DATA file, image by image (exact McNemar).")
@click.option("--against-tta", default=None, type=ViewSpec(), help="The second model's views; without it, --tta's (an ensemble's own only).")
@click.option("--batch-size", default=256, type=click.IntRange(1), help="Images predicted at once.")
@json_option
def evaluate(model, data, tta, against, against_tta, batch_size, as_json):
    """Metrics of MODEL (a .keras file, run or ensemble directory) on each DATA file.

    \b
    Example:
      cellfuse evaluate outputs/runs/cpu-mobilenet ../shared/data/test_shifted_sample.npz --tta d4
      cellfuse evaluate outputs/runs/student-cpu-lite0 ../shared/data/test_shifted_sample.npz --against outputs/runs/cpu-lite0 --against-tta d4
    """
    from toolkit import precheck

    precheck.model(model)
    if against is not None:
        precheck.model(against)
    elif against_tta is not None:
        raise click.UsageError("--against-tta needs --against")
    precheck.data_files(data)
    from toolkit.evaluate import evaluate_model

    results = evaluate_model(model, data, tta=tta, batch_size=batch_size, console=console, against=against,
                             against_tta=against_tta)
    if as_json:
        print_json(results)


@main.command(short_help="Class probabilities of a model for new images (npz, image files, folders), as a CSV.")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="INPUT...")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="CSV to write: source, row, class, then one probability column per class.")
@click.option("--tta", default="none", type=ViewSpec(), help=VIEWS_HELP)
@click.option("--batch-size", default=256, type=click.IntRange(1), help="Images predicted at once.")
@force_option
@json_option
def predict(model, inputs, out, tta, batch_size, force, as_json):
    """Class probabilities of MODEL (a .keras file, run, ensemble or student directory, or a zip made by
    `cellfuse export`) for every image of INPUT: npz files, image files, or folders of images (searched
    recursively). Images of any size are centre-cropped to a square and resized to 96x96 (Lanczos), as
    the challenge's were; unreadable files are reported and skipped.

    \b
    Example:
      cellfuse predict outputs/runs/cpu-mobilenet ../shared/data/test_shifted_sample.npz --out outputs/predictions.csv
    """
    from toolkit import precheck

    precheck.model_or_zip(model)
    for path in inputs:
        precheck.existing(path)
    precheck.output_file(out, ".csv", force, inputs=[model, *inputs])
    from toolkit.predict import predict_files

    summary = predict_files(model, inputs, out, tta=tta, batch_size=batch_size, force=force, console=console)
    if as_json:
        print_json(summary)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path),
                metavar="MODEL_OR_RUN... DATA")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for report.html, inspect.json and the figures.")
@click.option("--top", default=16, show_default=True, type=click.IntRange(1), help="Worst images shown.")
@click.option("--per-class", default=4, show_default=True, type=click.IntRange(0),
              help="Correctly classified examples shown per class.")
@click.option("--families", default="cellfuse,own,held-out", show_default=True,
              help="Robustness rows: corruptions as for `cellfuse corrupt --families`, each its own row; "
                   "empty skips the robustness grid.")
@click.option("--severities", default="1,2,3,4,5", show_default=True, help="Robustness columns (1..5).")
@click.option("--limit", default=400, show_default=True, type=click.IntRange(0),
              help="Images in the robustness grid, drawn at random (0 = all).")
@click.option("--seed", default=0, type=click.IntRange(0, SEED_MAX), show_default=True, help="Seed of the corruptions and the drawn images.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1), help="Prediction batch.")
@force_option
@json_option
def inspect(paths, out, top, per_class, families, severities, limit, seed, batch_size, force, as_json):
    """Top losses with Grad-CAM, confusions, calibration and robustness of each model on DATA.

    Several models are compared side by side, in the order given.

    Cost: the robustness grid corrupts --limit images once per family x severity and predicts them
    with each model: about 0.5 s per 100 images per cell on 2 CPU cores, plus each model's prediction
    (the defaults, 13 families x 5 severities x 400 images, take about 2-3 minutes with a small CNN).
    For a quick look: --families held-out --severities 3 --limit 200.

    \b
    Example:
      cellfuse inspect outputs/runs/cpu-mobilenet outputs/clean/val.npz --out outputs/inspect
    """
    from toolkit import precheck

    if len(paths) < 2:
        raise CellfuseError("give at least one model (file, run or ensemble directory) and then the DATA file")
    try:
        levels = [int(s) for s in severities.split(",") if s.strip()]
    except ValueError:
        raise CellfuseError(f"--severities takes a comma list of 1..5, got {severities!r}") from None
    precheck.models(paths[:-1])
    precheck.data_file(paths[-1])
    precheck.output_folder(out, force, inputs=paths, kind="inspect")
    from toolkit.interpret import inspect_models

    figures = inspect_models(paths[:-1], paths[-1], out, top=top, per_class=per_class, families=families,
                             severities=levels, limit=limit, seed=seed, batch_size=batch_size, force=force,
                             console=console)
    if as_json:
        print_json(figures)


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--val", "val_data", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Validation data (repeatable); the last one steers the selection: make it val_heldout.npz (corruptions no member trained on).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Ensemble folder: ensemble.keras, ensemble.json, metrics.json, predictions.npz.")
@click.option("--views", default="d4", type=ViewSpec(several=True),
              help="Candidate view specs, comma-separated; no views (none) is always a candidate.")
@click.option("--rounds", default=10, help="Greedy selection rounds.")
@click.option("--top", default=5, show_default=True, type=click.IntRange(1),
              help="A sweep directory among RUNS stands for its TOP best complete trials.")
@click.option("--snapshots", is_flag=True,
              help="Each run also offers its snapshot, SWA and WiSE-FT models (train.snapshots, train --from).")
@force_option
@json_option
def ensemble(runs, val_data, out, views, rounds, top, snapshots, force, as_json):
    """Combine trained RUNS by TTA-averaged soft voting, selected on validation data.

    \b
    Example:
      cellfuse ensemble outputs/runs/cpu-lite0 outputs/runs/cpu-mobilenet --val outputs/clean/val.npz --val outputs/clean/val_heldout.npz --out outputs/ensembles/lite
    """
    from toolkit import precheck
    from toolkit.sweep import expand_sweeps

    runs = expand_sweeps([precheck.existing(run) for run in runs], top)
    if snapshots:
        runs = [file for run in runs for file in (run, *snapshot_models(run))]
    precheck.models(runs)
    precheck.data_files(val_data)
    from toolkit.ensemble import build_ensemble

    result = build_ensemble(runs, val_data, out, views=views, rounds=rounds, force=force,
                            console=console)
    if as_json:
        print_json(result)


def snapshot_models(run: Path) -> list[Path]:
    """A run's snapshot_e<N>.keras files in epoch order, then swa.keras and wise.keras (none for a file)."""
    if not run.is_dir():
        return []
    snaps = sorted(run.glob("snapshot_e*.keras"), key=lambda f: int(f.stem.removeprefix("snapshot_e")))
    return snaps + [run / name for name in ("swa.keras", "wise.keras") if (run / name).is_file()]


@main.command()
@click.argument("ensemble_dir", type=click.Path(path_type=Path))
@click.argument("recipe", type=click.Path(path_type=Path))
@set_option
@runs_out_option
@resume_option
@click.option("--force", is_flag=True, help="Start over, replacing a run folder cellfuse wrote.")
@click.option("--no-timing", is_flag=True, help="Skip timing the student, ensemble and best member (about "
              "3 s each after a warm-up pass); the img/s column stays empty.")
@seeds_option
@json_option
def distill(ensemble_dir, recipe, overrides, out, resume, force, no_timing, seeds, as_json):
    """Distill ENSEMBLE_DIR into the compact student described by RECIPE; write OUT/<recipe name>/.

    \b
    Example:
      cellfuse distill outputs/ensembles/lite recipes/student-cpu.toml
    """
    from toolkit import precheck

    precheck.ensemble_folder(ensemble_dir)
    from toolkit.recipe import seeded

    jobs = seeded([recipe], overrides, seeds)
    precheck.student_init(precheck.runs_to_train(jobs, out, kind="student", resume=resume, force=force), ensemble_dir)
    from toolkit.distill import distill_recipe

    results = [distill_recipe(ensemble_dir, path, job_overrides, resume=resume, force=force, console=console,
                              runs_root=out, timing=not no_timing) for path, job_overrides in jobs]
    if seeds:
        from toolkit.report import seed_table

        summaries = [json.loads((Path(r["student_run"]) / "summary.json").read_text()) for r in results]
        console.print(seed_table(summaries, seeds))
    if as_json:
        print_json(results if seeds else results[0])


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Submission zip.")
@click.option("--tta", default="auto", show_default=True, type=ViewSpec(auto=True),
              help="Views the exported model averages. auto: a student's views if its distill comparison "
                   "found they gain on val_heldout for at most half a point on val, else none. " + VIEWS_HELP)
@click.option("--precision", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True, help="Weights stored in this precision.")
@force_option
@json_option
def export(run, out, tta, precision, force, as_json):
    """Package RUN's model as a challenge submission zip.

    \b
    Example:
      cellfuse export outputs/runs/student-cpu --out outputs/submission.zip
    """
    from toolkit import precheck

    precheck.model(run)
    precheck.output_file(out, ".zip", force, inputs=[run])
    from toolkit.export import export_submission

    result = export_submission(run, out, tta=tta, precision=precision, force=force, console=console)
    if as_json:
        print_json(result)


@main.command()
@click.argument("submission", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--timeout", default=600, type=click.IntRange(1, 10**6), help="Seconds before giving up.")
@json_option
def grade(submission, data, timeout, as_json):
    """Grade SUBMISSION.zip on DATA as the challenge grader would, in a clean subprocess.

    Not a sandbox: the submission's model.py runs as your user, with your files. The subprocess gets
    a minimal environment (no credentials) and a temporary HOME; grade submissions you did not write
    inside a container.

    \b
    Example:
      cellfuse grade outputs/submission.zip ../shared/data/test_shifted_sample.npz
    """
    from toolkit import precheck

    precheck.existing(submission)
    precheck.data_file(data)
    from toolkit.export import grade_submission

    result = grade_submission(submission, data, timeout=timeout, console=console)
    if as_json:
        print_json(result)


@main.command("runs", short_help="One table of every run, ensemble and student under FOLDER.")
@click.argument("folder", required=False, default=Path("outputs"), type=click.Path(path_type=Path))
@click.option("--markdown", is_flag=True, help="Print a GitHub Markdown table (the README's results are made so).")
@click.option("--columns", default=None, metavar="NAME,...",
              help="Only these columns, in this order (header names, e.g. name,val,val_heldout,params).")
@click.option("--intervals", is_flag=True,
              help="Each accuracy with its 95% interval: where another draw of as many images could put it.")
@json_option
def runs_table(folder, markdown, columns, intervals, as_json):
    """One table of every run, ensemble and student under FOLDER (default outputs): recipe, backbone,
    input size, epochs, time, parameters, accuracy on each validation file, and with D4 views where
    an ensemble or distill measured it. Reads only the files the stages wrote, so it takes a second;
    an unfinished run shows as running or stopped, an unreadable file is named in its row.

    \b
    Example:
      cellfuse runs outputs --markdown --columns name,val,val_heldout,params --intervals
    """
    from toolkit import precheck

    precheck.existing(folder)
    from toolkit.compare import as_json as table_json
    from toolkit.compare import show_runs

    rows = show_runs(folder, as_markdown=markdown, console=console, intervals=intervals,
                     columns=[c.strip() for c in columns.split(",") if c.strip()] if columns else None)
    if as_json:
        print_json(table_json(rows, folder))


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="npz to write.")
@click.option("--n", default=2000, help="Real (non-planted) images.")
@click.option("--seed", default=0, type=click.IntRange(0, SEED_MAX), help="Seed of the drawing (same seed, same file).")
@force_option
@json_option
def synth(out, n, seed, force, as_json):
    """Draw a synthetic blood-smear data set, contaminated like the challenge's.

    \b
    Example:
      cellfuse synth --out outputs/synth.npz --n 2000 --seed 0
    """
    from toolkit.synth import write_synthetic

    path = write_synthetic(out, n=n, seed=seed, force=force, console=console)
    if as_json:
        print_json({"out": path, "planted": path.with_suffix(".planted.json"), "n": n, "seed": seed})


@main.command(short_help="Every stage end to end on CPU, on synthetic data or on your own file.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("outputs/demo"),
              help="Folder that receives every stage's output.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Run on this file, with the recipes' full schedules, instead of synthetic data.")
@click.option("--resume", is_flag=True, help="Continue an interrupted demo in --out: finished stages are kept, "
              "the interrupted run continues from its checkpoint.")
@force_option
@json_option
def demo(out, data, resume, force, as_json):
    """The whole pipeline end to end on CPU: synth -> clean -> split -> train two members -> a
    corruption-tuned copy of each -> ensemble -> distill -> export -> grade.

    On synthetic data (2,000 images) the members (recipes/cpu-lite0.toml and cpu-mobilenet.toml) and the
    student (recipes/student-cpu-lite0.toml) train at 96 px, 4 epochs each (1 head-only, 3 all layers).
    With --data the recipes run their full schedules (17 and 10 epochs per member, 40 for the student):
    60-84 minutes on 2 cores for the real training file (6,990 images). A student more than a point behind
    its teacher on clean or held-out validation is followed by the next rung,
    recipes/student-cpu-lite0-whole.toml (about 30 minutes more), and the closer one ships. An
    interrupted demo continues with --resume (same --out and --data).

    \b
    Example:
      cellfuse demo --out outputs/demo
    """
    from toolkit import precheck

    if data is not None:
        precheck.data_file(data)
    from toolkit.pipeline import run_demo

    figures = run_demo(out, data=data, force=force, resume=resume, console=console)
    if as_json:
        print_json(figures)


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("outputs/bench"),
              help="Folder for the benchmark's runs and bench.json.")
@click.option("--quick", is_flag=True, help="Smaller sizes, for a smoke test.")
@force_option
@json_option
def bench(out, quick, force, as_json):
    """Measure clean, augmentation, training, prediction and quality; print each figure's command.

    \b
    Example:
      cellfuse bench --quick --out outputs/bench-quick
    """
    from toolkit.bench import run_bench

    figures = run_bench(out, quick=quick, force=force, console=console)
    if as_json:
        print_json(figures)


# ---------------------------------------------------------------- what ships with cellfuse

@main.group(invoke_without_command=True)
@json_option
@click.pass_context
def recipes(ctx, as_json):
    """List the recipes that ship with cellfuse; `recipes copy NAME PATH` writes one out to edit.

    Every command that takes a recipe file also takes a shipped recipe's name (cellfuse train tiny).
    CPU time: the whole schedule on the real training file on 2 CPU cores (docs/results.md).

    \b
    Example:
      cellfuse recipes --json
      cellfuse recipes copy cpu-mobilenet outputs/my-mobilenet.toml
    """
    if ctx.invoked_subcommand is not None:
        return
    from rich import box
    from rich.table import Table

    from toolkit.catalog import shipped_recipes

    rows = shipped_recipes()
    # Two tables, so each fits an 80-column terminal: the figures, then what each recipe is for.
    figures = Table(title="shipped recipes: cellfuse train NAME; cellfuse recipes copy NAME PATH to edit",
                    box=box.SIMPLE)
    for col in ("recipe", "backbone", "px", "epochs", "2-core CPU"):
        figures.add_column(col, justify="right" if col in ("px", "epochs") else "left", no_wrap=True)
    purposes = Table("recipe", "what it is for", box=box.SIMPLE)
    purposes.columns[0].no_wrap = True
    for r in rows:
        figures.add_row(r["name"], r["backbone"], str(r["input_size"]), str(r["epochs"]), r["cpu_time"])
        purposes.add_row(r["name"], r["purpose"])
    console.print(figures, purposes)
    if as_json:
        print_json({"recipes": rows})


@recipes.command("copy")
@click.argument("name")
@click.argument("path", type=click.Path(path_type=Path))
@force_option
@json_option
def recipes_copy(name, path, force, as_json):
    """Write the shipped recipe NAME to PATH, to edit, then run it as `cellfuse train PATH`.

    \b
    Example:
      cellfuse recipes copy tiny outputs/my-tiny.toml
    """
    from toolkit.catalog import copy_recipe

    written = copy_recipe(name, path, force=force)
    console.print(f"wrote {written}")
    if as_json:
        print_json({"recipe": name, "out": written})


@main.command(short_help="List the backbones a recipe may name, and whether their ImageNet weights are here.")
@json_option
def backbones(as_json):
    """List the backbones model.backbone may name: pretraining size, parameters (without the head),
    and whether ImageNet weights can be had on this machine now. Also: efficientnetv2-custom (no
    pretrained weights) and hub:<keras-hub preset>.

    \b
    Example:
      cellfuse backbones --json
    """
    from rich.table import Table

    from toolkit.catalog import backbone_rows

    rows = backbone_rows()
    table = Table(title="backbones (model.backbone in a recipe)")
    for col in ("backbone", "pretrained at", "parameters"):
        table.add_column(col, justify="left" if col == "backbone" else "right", no_wrap=True)
    table.add_column("ImageNet weights", overflow="fold")  # whole paths: where to put a file offline
    for r in rows:
        size, params = ("per preset",) * 2 if r["params"] is None else \
            (f"{r['default_size']} px", f"{r['params'] / 1e6:.2f} M")  # None: hub:<preset>
        if r["pretrained"] == "none":  # random weights only: no pretraining size to speak of
            size = "-"
        table.add_row(r["name"], size, params, str(r["pretrained"]))
    console.print(table)
    if as_json:
        print_json({"backbones": rows})
