"""`cellfuse runs`: one table of every run, ensemble and student under a folder, read from their files.

Reads JSON, CSV and TOML only (never TensorFlow), so it answers in well under a second. What each
folder is, is told by the files cellfuse writes there:

- a run holds recipe.toml (written first) and, once complete, summary.json (written last);
- a student is a run whose recipe has a [distill] section; distill.json (written after its summary)
  holds its accuracy with its ensemble's views;
- an ensemble holds ensemble.json (or, while it predicts, only its predictions.npz cache);
- a sweep's stopped trial holds stopped.json saying why.

Accuracy is per validation file, named by its stem: "val" is a run's own split (`cellfuse split` writes
the same rows as val.npz), then each extra validation file. An ensemble's accuracy is its saved model's,
TTA views included. The "d4" columns are a run's or student's accuracy with the eight D4 views averaged,
where an ensemble (its "<member> d4" rows) or a distillation measured it. With --intervals each accuracy
carries its 95% Wilson interval, from the number of images the stage recorded for that file.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from toolkit.catalog import input_size
from toolkit.ensemble import CACHE as ENSEMBLE_CACHE
from toolkit.errors import CellfuseError
from toolkit.recipe import read_toml
from toolkit.runs import MODEL_FILES, is_being_written, read_history

KINDS = ("run", "ensemble", "student")
SKIP = {"checkpoint", "tb", "logs", "__pycache__"}  # folders cellfuse fills with many files, never runs
MAX_DEPTH = 8
WRAPPED = ("recipe", "backbone", "note")  # the columns a narrow terminal may wrap
RUNNING_WINDOW_S = 20 * 60  # an unfinished run that wrote nothing for this long has stopped


@dataclass
class Row:
    path: str  # relative to the folder searched
    kind: str  # run | ensemble | student
    state: str  # complete | running | stopped | unreadable, or a sweep's stopped.json state (pruned, ...)
    recipe: str = ""
    backbone: str = ""
    input_size: str = ""
    epochs: str = ""  # done, or done/planned when they differ
    seconds: float | None = None
    params: int | None = None
    accuracy: dict[str, float] = field(default_factory=dict)  # by validation file stem
    d4: dict[str, float] = field(default_factory=dict)  # the same with D4 views, where measured
    n: dict[str, int] = field(default_factory=dict)  # images in each validation file, where recorded
    d4_n: dict[str, int] = field(default_factory=dict)  # the same for the files the d4 figures were measured on
    note: str = ""


# ---------------------------------------------------------------- finding folders

def find_folders(root: Path) -> list[tuple[str, Path]]:
    """(kind guess, folder) for every run-like or ensemble folder under `root` (root included), and in
    them (an ensemble built inside a run); checkpoints, TensorBoard logs and hidden folders are not searched."""
    found, stack = [], [(Path(root), 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        names = {e.name for e in entries}
        kind = _kind_of(names)
        if kind:
            found.append((kind, folder))
        if depth < MAX_DEPTH:
            stack += [(Path(e.path), depth + 1) for e in entries
                      if e.is_dir(follow_symlinks=False) and not e.name.startswith(".") and e.name not in SKIP]
    return sorted(found, key=lambda item: str(item[1]))


def _kind_of(names: set[str]) -> str | None:
    if "ensemble.json" in names or (ENSEMBLE_CACHE in names and ".cellfuse.json" in names):
        return "ensemble"
    if "summary.json" in names or "recipe.toml" in names:
        return "run"
    return None


# ---------------------------------------------------------------- reading a folder

class Unreadable(Exception):
    """A file cellfuse wrote that cannot be parsed: reported in its row, never a crash."""


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise Unreadable(f"{path.name}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise Unreadable(f"{path.name}: not a JSON object")
    return value


def _read_recipe(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return read_toml(path)
    except CellfuseError as e:  # the row names the folder: its note names the file alone
        raise Unreadable(str(e).replace(str(path), path.name, 1)) from None


def _last_write(folder: Path) -> float:
    """When the folder (or its checkpoint backups, written every few steps) last changed."""
    times = [folder.stat().st_mtime]
    for sub in (folder, folder / "checkpoint"):
        try:
            times += [e.stat().st_mtime for e in os.scandir(sub)]
        except OSError:
            pass
    return max(times)


def _unfinished_state(folder: Path) -> str:
    """Running while a command holds the folder's output lock; else stopped (failed, killed, interrupted),
    or, from another machine sharing the folder, running while it wrote in the last RUNNING_WINDOW_S."""
    if is_being_written(folder):
        return "running"
    recently_elsewhere = _written_elsewhere(folder) and time.time() - _last_write(folder) < RUNNING_WINDOW_S
    return "running" if recently_elsewhere else "stopped"


def _written_elsewhere(folder: Path) -> bool:
    """A run another machine writes (its env.json names another host): its lock is not visible here."""
    try:
        host = (_read_json(folder / "env.json") or {}).get("host")
    except Unreadable:
        return False
    return bool(host) and host != platform.node()


def read_run(folder: Path, rel: str) -> Row:
    """A run or student folder as one row; an unreadable file marks the row instead of failing."""
    try:
        recipe = _read_recipe(folder / "recipe.toml")
    except Unreadable as e:
        return Row(rel, "run", "unreadable", note=str(e))
    row = Row(rel, "student" if _is_student(folder, recipe) else "run", "complete", **_recipe_columns(recipe, folder))
    history = read_history(folder)
    row.epochs = _epochs(len(history), recipe)
    try:
        summary, distill = _read_json(folder / "summary.json"), _read_json(folder / "distill.json")
        stopped, env = _read_json(folder / "stopped.json"), _read_json(folder / "env.json") or {}
    except Unreadable as e:
        row.state, row.note = "unreadable", str(e)
        return row
    row.recipe = _started_from(recipe) or _recipe_file(env) or row.recipe
    if summary is not None:
        row.seconds, row.params = _float(summary.get("seconds")), _int(summary.get("params"))
        row.accuracy = _accuracies(summary.get("metrics"))
        row.n = _image_counts(folder, summary)
    if distill is not None:  # measured on the student's own validation files
        row.d4, row.d4_n = _distill_d4(distill), row.n
    _set_state(row, folder, summary, distill, stopped, env, history)
    return row


def _accuracies(metrics) -> dict[str, float]:
    """{name: accuracy} from {name: {"accuracy": ..., ...}}, keyed by file stem (names may be paths)."""
    if not isinstance(metrics, dict):
        return {}
    return {Path(name).stem: m["accuracy"] for name, m in metrics.items()
            if isinstance(m, dict) and isinstance(m.get("accuracy"), (int, float))}


def _image_counts(folder: Path, summary: dict) -> dict[str, int]:
    """Images per validation file: summary.json's record, or metrics.json's for runs older than it."""
    counts = _counts(summary.get("metrics"))
    if counts:
        return counts
    try:
        return _counts(_read_json(folder / "metrics.json"))
    except Unreadable:  # only the intervals need it: the row stays whole
        return {}


def _counts(metrics) -> dict[str, int]:
    """{name: images} from the same shape: the `n` that train, distill and ensemble record."""
    if not isinstance(metrics, dict):
        return {}
    return {Path(name).stem: m["n"] for name, m in metrics.items() if isinstance(m, dict) and _int(m.get("n"))}


def _is_student(folder: Path, recipe: dict) -> bool:
    try:  # the kind cellfuse recorded in the folder's manifest, where it records one
        recorded = _read_json(folder / ".cellfuse.json") or {}
    except Unreadable:
        recorded = {}
    return "distill" in recipe or (folder / "distill.json").is_file() or recorded.get("kind") == "student"


def _set_state(row: Row, folder: Path, summary, distill, stopped, env: dict, history: list[dict]) -> None:
    if stopped is not None:  # a sweep stopped this trial on purpose
        row.state, row.note = str(stopped.get("state", "stopped")), str(stopped.get("why", ""))
    elif summary is None:
        row.state = _unfinished_state(folder)
        row.seconds = sum(r.get("seconds", 0.0) for r in history) or None
        if row.state == "stopped":
            row.note = "no summary.json: interrupted or failed" + _resume_hint(env)
    elif row.kind == "student" and distill is None:
        row.state = _unfinished_state(folder)
        row.note = "trained; its comparison with the ensemble (distill.json) did not finish"


def _recipe_columns(recipe: dict, folder: Path) -> dict:
    model = recipe.get("model") or {}
    backbone = str(model.get("backbone", ""))
    return {"recipe": str(recipe.get("name", folder.name)), "backbone": backbone,
            "input_size": str(input_size(backbone, model.get("input_size", 0)) or "?") if backbone else ""}


def _epochs(done: int, recipe: dict) -> str:
    stages = (recipe.get("train") or {}).get("stages") or []
    planned = sum(s.get("epochs", 1) for s in stages if isinstance(s, dict))
    return str(done) if not planned or done == planned else f"{done}/{planned}"


def _started_from(recipe: dict) -> str:
    """A copy started from another run's weights (`train --from RUN`, train.init_from) by that run's
    name, "from cpu-mobilenet", and the file when it is not the run's best.keras."""
    init = (recipe.get("train") or {}).get("init_from")
    if not isinstance(init, str) or not init:
        return ""
    file = Path(init)
    return f"from {file.parent.name}" if file.name == "best.keras" else f"from {file.parent.name}/{file.name}"


def _recipe_file(env: dict) -> str:
    """The recipe file named on the command line that made the run, if any, as given."""
    argv = env.get("argv") or []
    return next((a for a in argv[1:] if isinstance(a, str) and a.endswith(".toml")), "")


def _resume_hint(env: dict) -> str:
    argv = [a for a in env.get("argv") or [] if isinstance(a, str)]
    command = next((i for i, a in enumerate(argv) if a in ("train", "distill")), None)
    if command is None:
        return ""
    args = argv[command:] + ([] if "--resume" in argv else ["--resume"])
    return "; continue it with `cellfuse " + " ".join(args) + "`"


def _distill_d4(distill: dict) -> dict[str, float]:
    """The student's accuracy with its ensemble's views, when those views are D4."""
    student = (distill.get("rows") or {}).get("student") or {}
    if distill.get("views") != "d4":
        return {}
    return {key.removeprefix("acc_"): value for key, value in student.items() if key.startswith("acc_")}


def read_ensemble(folder: Path, rel: str, runs: dict[Path, Row]) -> tuple[Row, dict[Path, dict]]:
    """An ensemble folder as one row, and the D4 accuracies it measured for its members' runs (on its
    own validation files, whose image counts are the row's `n`)."""
    try:
        spec, metrics = _read_json(folder / "ensemble.json"), _read_json(folder / "metrics.json")
    except Unreadable as e:
        return Row(rel, "ensemble", "unreadable", note=str(e)), {}
    if spec is None or metrics is None:
        state = _unfinished_state(folder)
        note = "" if state == "running" else "no ensemble.json/metrics.json: interrupted or failed"
        return Row(rel, "ensemble", state, note=note), {}
    member_runs = {name: _member_run(folder, file) for name, file in (metrics.get("members") or {}).items()}
    selected = list(dict.fromkeys(c.get("member") for c in spec.get("components") or []))
    chosen = [_known_run(member_runs.get(m), runs) for m in selected]
    row = Row(rel, "ensemble", "complete", recipe=" + ".join(map(str, selected)),
              backbone=_joined(r.backbone for r in chosen if r), input_size=_joined(r.input_size for r in chosen if r),
              params=_total_params(chosen),
              accuracy=_accuracies(metrics.get("ensemble_metrics")), n=_counts(metrics.get("ensemble_metrics")),
              note=_cross_fitted_note(metrics))
    return row, _member_d4(metrics.get("rows") or {}, member_runs)


def _known_run(folder: Path | None, runs: dict[Path, Row]) -> Row | None:
    """A member's run row: found in the search, or read where the ensemble names it (outside the folder)."""
    if folder is None:
        return None
    if folder not in runs and folder.is_dir():
        runs[folder] = read_run(folder, str(folder))
    return runs.get(folder)


def _member_run(ensemble: Path, recorded: str) -> Path:
    """The run folder of a member file named relative to the ensemble (or absolute, older files)."""
    file = Path(recorded) if Path(recorded).is_absolute() else ensemble / recorded
    return (file.parent if file.name in MODEL_FILES else file).resolve()


def _member_d4(rows: dict, member_runs: dict[str, Path]) -> dict[Path, dict]:
    return {run: _accuracies(rows[f"{name} d4"]) for name, run in member_runs.items() if f"{name} d4" in rows}


def _joined(values) -> str:
    return " + ".join(dict.fromkeys(v for v in values if v))


def _total_params(chosen: list) -> int | None:
    """The selected members' parameters together, when every member's run is known."""
    if not chosen or any(r is None or r.params is None for r in chosen):
        return None
    return sum(r.params for r in chosen)


def _cross_fitted_note(metrics: dict) -> str:
    fitted = (metrics.get("cross_fitted") or {}).get("ensemble_accuracy")
    steer = metrics.get("steering_data")
    if fitted is None or not steer:
        return ""
    return f"2-fold cross-fitted {fitted:.3f} on {Path(steer).stem}, where it was selected"


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# ---------------------------------------------------------------- the table

def collect(root) -> list[Row]:
    """Every run, ensemble and student under `root`: runs first, then ensembles, then students."""
    root = Path(root)
    if not root.exists():
        raise CellfuseError(f"{root}: does not exist")
    if not root.is_dir():
        raise CellfuseError(f"{root}: is not a directory")
    folders = find_folders(root)
    runs = {folder.resolve(): _guarded(read_run, folder, root) for kind, folder in folders if kind == "run"}
    ensembles, known = [], dict(runs)  # `known` also gets members found outside `root`
    for folder in (folder for kind, folder in folders if kind == "ensemble"):
        row, measured = _guarded(read_ensemble, folder, root, known)
        ensembles.append(row)
        for run, accuracy in measured.items():
            if run in runs:  # the first measurement of a file stays, with the count of its images
                runs[run].d4 = {**accuracy, **runs[run].d4}
                runs[run].d4_n = {**{n: row.n[n] for n in accuracy if n in row.n}, **runs[run].d4_n}
    rows = [*runs.values(), *ensembles]
    return sorted(rows, key=lambda r: (KINDS.index(r.kind), r.path))


def _guarded(read, folder: Path, root: Path, *args):
    """read(folder, ...), or an "unreadable" row when a file has another shape (hand-edited, say)."""
    try:
        return read(folder, _relative(folder, root), *args)
    except (AttributeError, TypeError, KeyError, ValueError) as e:
        kind = "ensemble" if read is read_ensemble else "run"
        row = Row(_relative(folder, root), kind, "unreadable", note=f"unexpected content ({type(e).__name__}: {e})")
        return (row, {}) if read is read_ensemble else row


def _relative(folder: Path, root: Path) -> str:
    rel = folder.relative_to(root).as_posix()
    return root.as_posix() if rel == "." else rel


def validation_names(rows: list[Row]) -> list[str]:
    """Every validation file stem seen, "val" first, then in order of appearance."""
    names = dict.fromkeys(["val"])
    for row in rows:
        names.update(dict.fromkeys([*row.accuracy, *row.d4]))
    return [n for n in names if any(n in r.accuracy or n in r.d4 for r in rows)]


def table_columns(rows: list[Row], columns=None, intervals: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and text cells, shared by the terminal table and the Markdown one; COLUMNS picks and
    orders them by header name (`cellfuse runs --columns`); INTERVALS adds each accuracy's 95% interval."""
    names = validation_names(rows)
    d4_names = [n for n in names if any(n in r.d4 for r in rows)]
    header = ["name", "kind", "state", "recipe", "backbone", "input", "epochs", "time", "params",
              *names, *[f"{n} d4" for n in d4_names], "note"]
    cells = [[r.path, r.kind, r.state, r.recipe, r.backbone, r.input_size, r.epochs, _duration(r.seconds),
              _params(r.params), *[_acc(r.accuracy.get(n), r.n.get(n), intervals) for n in names],
              *[_acc(r.d4.get(n), r.d4_n.get(n), intervals) for n in d4_names],
              r.note] for r in rows]
    if not columns:
        return header, cells
    unknown = [c for c in columns if c not in header]
    if unknown:
        raise CellfuseError(f"--columns: no column {', '.join(map(repr, unknown))} here; "
                            f"the columns are {', '.join(header)}")
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise CellfuseError(f"--columns: {', '.join(map(repr, repeated))} named twice")
    keep = [header.index(c) for c in columns]
    return [header[i] for i in keep], [[line[i] for i in keep] for line in cells]


def _numeric(i: int, header: list[str]) -> bool:
    """Input size, epochs, time, parameters and the accuracies: right-aligned."""
    return header[i] not in TEXT_COLUMNS


def _acc(value, n: int | None = None, interval: bool = False) -> str:
    """0.972, or with its interval 0.972 (0.959-0.981) where the file's image count is known."""
    if value is None:
        return ""
    if not (interval and n and 0 <= value <= 1):  # a hand-edited figure out of range gets no interval
        return f"{value:.3f}"
    from toolkit.report import accuracy_interval

    lo, hi = accuracy_interval(round(value * n), n)
    return f"{value:.3f} ({lo:.3f}-{hi:.3f})"


def _params(value) -> str:
    if value is None:
        return ""
    return f"{value / 1e6:.2f} M" if value >= 1e5 else f"{value / 1e3:.1f} k"


def _duration(seconds) -> str:
    if seconds is None:
        return ""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


TEXT_COLUMNS = ("name", "kind", "state", "recipe", "backbone", "note")


def markdown(rows: list[Row], columns=None, intervals: bool = False) -> str:
    """A GitHub Markdown table (numbers right-aligned), for the README's results."""
    header, cells = table_columns(rows, columns, intervals)
    align = ["---:" if _numeric(i, header) else "---" for i in range(len(header))]
    lines = [header, align, *cells]
    return "\n".join("| " + " | ".join(_cell(c) for c in line) + " |" for line in lines)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")  # one line, and a | that does not end the cell


def rich_table(rows: list[Row], root, columns=None, intervals: bool = False) -> Table:
    header, cells = table_columns(rows, columns, intervals)
    table = Table(title=f"runs under {root}", caption="accuracy per validation file; an ensemble's includes "
                  "its TTA views; d4: with the 8 D4 views averaged, where measured"
                  + ("; in brackets its 95% interval" if intervals else ""))
    for i, name in enumerate(header):
        # a narrow terminal wraps (folds, never cuts) the words, and leaves every figure whole
        table.add_column(name, justify="right" if _numeric(i, header) else "left",
                         no_wrap=name not in WRAPPED, overflow="fold")
    for line in cells:
        table.add_row(*line)
    return table


def as_json(rows: list[Row], root) -> dict:
    return {"dir": str(root), "rows": [asdict(r) for r in rows]}


def show_runs(root, *, as_markdown: bool = False, columns=None, intervals: bool = False, console=None) -> list[Row]:
    """Print the table (rich, or Markdown); piped output is never wrapped nor truncated."""
    import click

    console = console or Console()
    rows = collect(root)
    if not rows:
        console.print(f"no runs, ensembles or students under {root} (cellfuse looks for the recipe.toml, "
                      "summary.json and ensemble.json that train, distill and ensemble write)", soft_wrap=True)
        return rows
    if as_markdown:
        if not console.quiet:
            click.echo(markdown(rows, columns, intervals))
        return rows
    out = console if console.is_terminal else Console(width=100_000, quiet=console.quiet, no_color=True)
    out.print(rich_table(rows, root, columns, intervals))
    return rows
