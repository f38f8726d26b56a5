"""`cellfuse sweep`: hyper-parameter search over one recipe, with Optuna.

    recipe + space file -> study (DIR/study.journal: survives a kill, shared by parallel workers)
        -> trials, each an ordinary run directory DIR/trials/<recipe>-tNNN trained by toolkit.train
        -> sweep.csv, sweep.png, best.toml (the best trial's recipe, ready for `cellfuse train`)

Data and recipe are checked before the first trial; the console gets one line per trial (each
trial's training output goes to DIR/logs/trialNNN.log) and ends with the best trial and best.toml.
A sweep none of whose trials finished exits with an error.

Optuna's TPE sampler proposes the values; a Hyperband pruner stops a trial whose per-epoch objective
falls behind the others at the same epoch; a trial whose loss diverges stops at once. A stopped
trial's run directory holds stopped.json saying why (and no best.keras: it never finished).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import numpy as np
from rich.console import Console

from toolkit import report
from toolkit.batches import Predictor, load_split
from toolkit.compat import trial_id
from toolkit.data import check_dataset, load_dataset
from toolkit.errors import CellfuseError
from toolkit.procs import run_all, spawn
from toolkit.recipe import (
    Recipe,
    as_dict,
    build_recipe,
    find_space,
    get_key,
    key_segments,
    read_recipe,
    read_toml,
    set_key,
)
from toolkit.runs import (
    OUTPUTS,
    atomic_save_figure,
    atomic_write_text,
    folder_kind,
    fresh_dir,
    lock_output,
    make_own_dir,
    record_own,
    write_csv,
    write_json,
)

SWEEPS = OUTPUTS / "sweeps"
MARKER = "sweep.json"  # written first: marks a directory as a sweep cellfuse owns
METRICS = {"accuracy": "maximize", "macro_f1": "maximize", "auc_ovr": "maximize",
           "nll": "minimize", "ece": "minimize"}
PRUNERS = ("hyperband", "median", "none")
SPACE_FILE_KEYS = {"objective", "pruner", "seed", "space"}
KINDS = ("range", "log", "choice")
# Keys a trial may not change: every trial must be scored on the same validation images.
FIXED_SECTIONS = ("data", "name")
# An epoch whose mean training loss is this many times the untrained model's ln(n_classes) diverged.
DIVERGED_LOSS = 3.0


# ---------------------------------------------------------------- the search space

@dataclass(frozen=True)
class Param:
    key: str  # a recipe key, e.g. "train.stages[1].lr"
    kind: str  # range | log | choice
    values: tuple  # (low, high), or the choices
    integer: bool = False  # the recipe key is an int: suggest ints


@dataclass(frozen=True)
class Space:
    path: str
    params: tuple[Param, ...]
    objective: str  # "<validation set>.<metric>", a key pair of the run's metrics.json
    pruner: str = "hyperband"
    seed: int = 0

    @property
    def direction(self) -> str:
        return METRICS[self.objective.partition(".")[2]]


def raw_recipe(path: Path, overrides=()) -> dict:
    """The recipe file as parsed TOML with `--set` overrides applied, every key and value checked."""
    raw, origin = read_recipe(path, overrides)
    build_recipe(copy.deepcopy(raw), Path(path), origin)  # the recipe's own messages, blaming file or --set
    return raw


def parse_space(doc: dict, where: str, raw: dict, recipe_path: str) -> Space:
    """A space file's table -> Space; every key is tried on the recipe, so errors come before training."""
    unknown = set(doc) - SPACE_FILE_KEYS
    if unknown:
        raise CellfuseError(f"{where}: unknown key(s) {sorted(unknown)}; known: {', '.join(sorted(SPACE_FILE_KEYS))}")
    table = doc.get("space")
    if not isinstance(table, dict) or not table:
        raise CellfuseError(f'{where}: needs a [space] table, e.g. "train.label_smoothing" = {{ range = [0.0, 0.2] }}')
    base = build_recipe(copy.deepcopy(raw), Path(recipe_path))
    resolved = as_dict(base)
    params = tuple(_param(where, key, spec, raw, recipe_path, resolved) for key, spec in table.items())
    objective = doc.get("objective", default_objective(base))
    _check_objective(where, objective, base)
    pruner = doc.get("pruner", "hyperband")
    if pruner not in PRUNERS:
        raise CellfuseError(f"{where}: pruner = {pruner!r}; choose one of {list(PRUNERS)}")
    seed = doc.get("seed", 0)
    if type(seed) is not int:
        raise CellfuseError(f"{where}: seed must be an integer, got {seed!r}")
    return Space(where, params, objective, pruner, seed)


def _param(where: str, key: str, spec, raw: dict, recipe_path: str, resolved: dict) -> Param:
    section = key_segments(key, f'{where}: "{key}"')[0][0]
    if section in FIXED_SECTIONS:
        raise CellfuseError(f'{where}: "{key}": a sweep may not change [{section}] (the data and its '
                            "validation split must be the same for every trial, or their scores are incomparable)")
    current = get_key(resolved, key, f'{where}: "{key}"')
    kinds = set(spec) & set(KINDS) if isinstance(spec, dict) else set()
    if len(kinds) != 1 or set(spec) - kinds:
        raise CellfuseError(f'{where}: "{key}" must be one of {{ range = [low, high] }}, '
                            "{ log = [low, high] } or { choice = [a, b, ...] }")
    kind = kinds.pop()
    values = spec[kind]
    _check_values(where, key, kind, values)
    integer = kind != "choice" and _is_int(current) and all(_is_int(v) for v in values)
    for value in values:  # the recipe's strict checking decides what each key accepts
        try:
            trial_recipe(raw, recipe_path, {key: value})
        except CellfuseError as e:
            reason = str(e).removeprefix(f"{Path(recipe_path)}: ")
            raise CellfuseError(f'{where}: "{key}" = {value!r} does not fit the recipe: {reason}') from None
    return Param(key, kind, tuple(values), integer)


def _check_values(where: str, key: str, kind: str, values) -> None:
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise CellfuseError(f'{where}: "{key}": choice needs a non-empty list')
        if not all(isinstance(v, (str, int, float, bool)) for v in values):
            raise CellfuseError(f'{where}: "{key}": choices must be strings, numbers or booleans')
        return
    if (not isinstance(values, list) or len(values) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise CellfuseError(f'{where}: "{key}": {kind} needs two numbers [low, high], got {values!r}')
    if not values[0] < values[1]:
        raise CellfuseError(f'{where}: "{key}": empty range {values} (low must be below high)')
    if kind == "log" and values[0] <= 0:
        raise CellfuseError(f'{where}: "{key}": a log range must be above 0, got {values}')


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def default_objective(recipe: Recipe) -> str:
    """Accuracy on the corrupted validation file when the recipe has one: the robustness we ship for."""
    stems = {Path(p).stem for p in recipe.data.extra_val}
    return "val_corrupt.accuracy" if "val_corrupt" in stems else "val.accuracy"


def _check_objective(where: str, objective, recipe: Recipe) -> None:
    sets = ["val", *(Path(p).stem for p in recipe.data.extra_val)]
    name, _, metric = str(objective).partition(".")
    if name not in sets or metric not in METRICS:
        raise CellfuseError(f"{where}: objective = {objective!r}; expected <set>.<metric> with set one of "
                            f"{sets} (the recipe's validation sets) and metric one of {list(METRICS)}")


def trial_recipe(raw: dict, recipe_path: str, values: dict, name: str | None = None) -> Recipe:
    """The base recipe with one trial's values (and run name), checked like any recipe."""
    raw = copy.deepcopy(raw)
    for key, value in values.items():
        set_key(raw, key, value, f'"{key}"')
    if name:
        raw["name"] = name
    return build_recipe(raw, Path(recipe_path))


# ---------------------------------------------------------------- the sweep directory and study

@dataclass
class Sweep:
    """Everything a trial needs, in any process: saved as DIR/sweep.json."""
    out: Path
    recipe_path: str
    raw: dict  # the recipe as parsed, with --set applied
    space_doc: dict
    space_path: str

    @cached_property
    def space(self) -> Space:
        return parse_space(self.space_doc, self.space_path, self.raw, self.recipe_path)

    @cached_property
    def base(self) -> Recipe:
        return build_recipe(copy.deepcopy(self.raw), Path(self.recipe_path))

    def record(self) -> dict:
        return {"written_by": "cellfuse sweep", "recipe": self.recipe_path, "raw": self.raw,
                "space_file": self.space_path, "space": self.space_doc,
                "objective": self.space.objective, "direction": self.space.direction}

    @classmethod
    def load(cls, out: Path) -> Sweep:
        rec = json.loads((Path(out) / MARKER).read_text())
        return cls(Path(out), rec["recipe"], rec["raw"], rec["space"], rec["space_file"])


def prepare_sweep_dir(sweep: Sweep, resume: bool, force: bool, inputs=()) -> None:
    """A new sweep directory, or the same sweep's when resuming; --force only replaces a sweep's,
    and never one holding an input (`inputs`: the recipe, the space, the data)."""
    out, marker = sweep.out, sweep.out / MARKER
    if resume and marker.exists() and folder_kind(out) == "sweep":
        lock_output(out)
        old = json.loads(marker.read_text())
        if (old["raw"], old["space"]) != (sweep.raw, sweep.space_doc):
            raise CellfuseError(f"{out}: the recipe, its --set overrides or the space changed since this "
                                "sweep started; resume needs the same ones (or --force to start over)")
        return
    if folder_kind(out) == "sweep" and not force:
        raise CellfuseError(f"{out}: already exists; --resume to continue it, --force to start over")
    fresh_dir(out, force, inputs=[sweep.recipe_path, sweep.space_path, *inputs], kind="sweep")
    for name in ("study.journal", "study.journal.lock"):  # Optuna writes them for the sweep
        record_own(out / name)
    make_own_dir(out / "trials", "runs")
    make_own_dir(out / "logs", "logs")
    write_json(marker, sweep.record())


def open_study(sweep: Sweep):
    """The study in DIR/study.journal: Optuna's file journal is safe for several processes at once."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = sweep.space
    storage = JournalStorage(JournalFileBackend(str(sweep.out / "study.journal")))
    study = optuna.create_study(storage=storage, study_name="sweep", direction=space.direction,
                                pruner=make_pruner(space.pruner, total_epochs(sweep.base)), load_if_exists=True)
    # a resumed sweep must not redraw the values its first trials drew from the same seed
    study.sampler = optuna.samplers.TPESampler(seed=space.seed + len(study.trials))
    return study


def make_pruner(name: str, max_epochs: int):
    import optuna

    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, max_epochs), reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    return optuna.pruners.NopPruner()


def total_epochs(recipe: Recipe) -> int:
    return sum(stage.epochs for stage in recipe.train.stages)


def suggest(trial, space: Space) -> dict:
    """Ask the sampler for one value per parameter (an enqueued trial gets its fixed values back)."""
    values = {}
    for p in space.params:
        if p.kind == "choice":
            values[p.key] = trial.suggest_categorical(p.key, list(p.values))
        elif p.integer:
            values[p.key] = trial.suggest_int(p.key, p.values[0], p.values[1], log=p.kind == "log")
        else:
            values[p.key] = trial.suggest_float(p.key, p.values[0], p.values[1], log=p.kind == "log")
    return values


def run_number(trial) -> int:
    """A trial re-run after a kill keeps its run directory (and number) through `resume_of`."""
    return int(trial.user_attrs.get("resume_of", trial.number))


def requeue_interrupted(study) -> int:
    """Trials left RUNNING by a killed sweep: failed, and queued again to continue their run directory."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study.enqueue_trial(t.params, user_attrs={"resume_of": run_number(t)})
        study.tell(t.number, state=TrialState.FAIL)
    return len(stale)


def trials_to_ask(study, n_trials: int) -> int:
    """Queued trials plus new ones up to `n_trials` runs in all: finished ones are never run again."""
    from optuna.trial import TrialState

    runs = {run_number(t) for t in study.get_trials(deepcopy=False)}
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return len(waiting) + max(0, n_trials - len(runs))


# ---------------------------------------------------------------- one trial

class TrialStopped(Exception):
    """Raised from inside fit: the pruner said stop, or the loss diverged."""

    def __init__(self, state: str, epoch: int, why: str):
        super().__init__(why)
        self.state, self.epoch, self.why = state, epoch, why


class TrialReporter:
    """Reports the objective to Optuna after every epoch; stops the trial when pruned or diverged.

    Runs after cellfuse's own callbacks (history.csv and the best checkpoint are written first),
    so a stopped run directory still shows every epoch it trained. A Keras callback through
    make_reporter, so that importing this module (and checking a sweep's inputs) loads no TensorFlow.
    """

    def __init__(self, trial, recipe: Recipe, run: Path, objective: str):
        super().__init__()
        self.trial, self.recipe, self.run = trial, recipe, run
        self.set_name, _, self.metric = objective.partition(".")
        self.limit = DIVERGED_LOSS * math.log(recipe.data.n_classes)
        self.data, self.offset = None, 0

    def on_train_begin(self, logs=None):
        self.offset = self._stage_offset()
        self.predict = Predictor(self.model, 256)  # one per stage's fit: traced once, not every epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            raise TrialStopped("diverged", self._epoch, f"loss became {loss} at step {batch + 1}")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = self.offset + epoch + 1

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        loss = logs.get("loss", 0.0)
        if not np.isfinite(loss) or loss > self.limit:
            raise TrialStopped("diverged", self._epoch, f"mean training loss {loss:.3g} > "
                               f"{DIVERGED_LOSS:g} x ln({self.recipe.data.n_classes}) (the untrained loss)")
        value = self._objective(logs)
        if np.isfinite(value):
            self.trial.report(float(value), self._epoch)
        if self.trial.should_prune():
            raise TrialStopped("pruned", self._epoch, f"{self.set_name}.{self.metric} = {value:.4f} after "
                               f"epoch {self._epoch} is behind the other trials")

    def _objective(self, logs: dict) -> float:
        """The objective as it stands: from Keras' logs when they carry it, else measured here."""
        from_logs = {"accuracy": "val_accuracy", "auc_ovr": "val_auc"}.get(self.metric)
        if self.set_name == "val" and from_logs in logs:
            return float(logs[from_logs])
        data = self._data()
        probs = self.predict(data.images)
        return float(report.classification_metrics(data.labels, probs, data.class_names)[self.metric])

    def _data(self):
        """The objective's validation set: an extra_val file, or the split (rebuilt the way train makes it)."""
        if self.data is None:
            files = {Path(p).stem: p for p in self.recipe.data.extra_val}
            self.data = (load_dataset(files[self.set_name], n_classes=self.recipe.data.n_classes)
                         if self.set_name in files else load_split(self.recipe, Console(quiet=True)).val["val"])
        return self.data

    def _stage_offset(self) -> int:
        """Epochs before the stage now fitting: train marks each finished stage with checkpoint/stage<i>.weights.h5."""
        return sum(s.epochs for i, s in enumerate(self.recipe.train.stages)
                   if (self.run / "checkpoint" / f"stage{i}.weights.h5").exists())


def make_reporter(trial, recipe: Recipe, run: Path, objective: str):
    return _keras_callback(TrialReporter)(trial, recipe, run, objective)


@cache
def _keras_callback(cls: type) -> type:
    import keras

    return type(cls.__name__, (cls, keras.callbacks.Callback), {})


def run_trial(sweep: Sweep, study, trial, console: Console) -> None:
    """Train one trial's recipe into DIR/trials/<name>, then tell the study how it ended."""
    from optuna.trial import TrialState

    # toolkit.train loads Keras: imported here, so that checking a sweep's inputs stays instant
    from toolkit.train import train_recipe

    number = run_number(trial)
    recipe = trial_recipe(sweep.raw, sweep.recipe_path, trial.params, name=f"{sweep.base.name}-t{number:03d}")
    run = sweep.out / "trials" / recipe.name
    trial.set_user_attr("run", recipe.name)
    trial.set_user_attr("epochs_planned", total_epochs(recipe))
    console.rule(f"trial {number}: " + ", ".join(f"{k} = {_show(v)}" for k, v in trial.params.items()))
    reporter = make_reporter(trial, recipe, run, sweep.space.objective)
    started = time.time()
    try:
        train_recipe(recipe, resume="resume_of" in trial.user_attrs, runs_root=run.parent, console=console,
                     extra_callbacks=[reporter])
    except TrialStopped as stop:
        _record_stop(run, recipe, trial, stop, started, console)
        study.tell(trial, state=TrialState.PRUNED)
        return
    except Exception as e:  # one failed trial (say an input size a backbone refuses) must not end the sweep
        trial.set_user_attr("error", str(e).splitlines()[0] if str(e) else type(e).__name__)
        trial.set_user_attr("seconds", round(time.time() - started, 1))
        console.print(f"[red]trial {number} failed:[/] {e}")
        if not isinstance(e, CellfuseError):  # a bug, or TensorFlow failing: the traceback, for a report
            console.print(traceback.format_exc(), markup=False)
        study.tell(trial, state=TrialState.FAIL)
        return
    value = read_objective(run, sweep.space.objective)
    trial.set_user_attr("epochs", _epochs_done(run))
    trial.set_user_attr("seconds", round(time.time() - started, 1))
    study.tell(trial, value)


def _record_stop(run: Path, recipe: Recipe, trial, stop: TrialStopped, started: float, console: Console) -> None:
    record = {"state": stop.state, "epoch": stop.epoch, "epochs_planned": total_epochs(recipe),
              "why": stop.why, "note": "stopped early by cellfuse sweep: no best.keras, not an ensemble member"}
    write_json(run / "stopped.json", record)
    trial.set_user_attr("stopped", stop.state)
    trial.set_user_attr("why", stop.why)
    trial.set_user_attr("epochs", stop.epoch)
    trial.set_user_attr("seconds", round(time.time() - started, 1))
    console.print(f"[yellow]{run.name} {stop.state} at epoch {stop.epoch}:[/] {stop.why}")


def read_objective(run: Path, objective: str) -> float:
    name, _, metric = objective.partition(".")
    return float(json.loads((run / "metrics.json").read_text())[name][metric])


def _epochs_done(run: Path) -> int:
    path = run / "history.csv"
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    return max((int(r["epoch"]) for r in rows), default=0)


# ---------------------------------------------------------------- the whole sweep

def run_sweep(recipe_path, space_path, *, overrides=(), out=None, trials=20, parallel=1, resume=False,
              force=False, console=None) -> dict:
    """Run (or resume) a sweep of `trials` trials, `parallel` at a time; write its outputs after each.

    The console gets one line per trial (its training output goes to DIR/logs/), then the best trial
    and its best.toml. Raises CellfuseError when no trial finished: all of them failed."""
    console = console or Console()
    raw = raw_recipe(Path(recipe_path), overrides)
    space_path = find_space(space_path)  # a file, or a shipped space's name (spaces/tiny)
    space_doc = read_toml(space_path, "space")
    parse_space(space_doc, str(space_path), raw, str(recipe_path))  # all errors before any directory
    base = build_recipe(copy.deepcopy(raw), Path(recipe_path))
    check_data_files(base)  # a missing or broken data file is one line now, not a failure per trial
    sweep = Sweep(Path(out or SWEEPS / base.name), str(recipe_path), raw, space_doc, str(space_path))
    prepare_sweep_dir(sweep, resume, force, inputs=[base.data.train, *base.data.extra_val])
    study = open_study(sweep)
    log = TrialLog(sweep, console)
    log.start(study, trials, requeued=requeue_interrupted(study))
    asks = trials_to_ask(study, trials)
    started = time.time()
    if parallel > 1:
        _run_parallel(sweep, study, asks, parallel, log)
    else:
        for _ in range(asks):
            trial = study.ask()
            suggest(trial, sweep.space)
            with _log_path(sweep, trial).open("w") as trial_log:
                run_trial(sweep, study, trial, Console(file=trial_log, width=120, soft_wrap=True))
            _clear_session()
            write_outputs(sweep, study)
            log.finished(study, trial)
    write_outputs(sweep, study)
    summary = summarize(sweep, study, time.time() - started)
    log.end(summary)
    refuse_all_failed(sweep, study)
    return summary


def check_data_files(recipe: Recipe) -> None:
    """The training file and every extra validation file exist and hold a data set: checked from their
    headers, so a typo fails in a second, not once per trial."""
    for path in (recipe.data.train, *recipe.data.extra_val):
        check_dataset(path, n_classes=recipe.data.n_classes)


def refuse_all_failed(sweep: Sweep, study) -> None:
    """A sweep none of whose trials finished is a failure, not a result (stopped trials did finish)."""
    rows = trial_rows(sweep, study)
    if rows and all(r["state"] == "failed" for r in rows):
        raise CellfuseError(f"{sweep.out}: no trial finished: all {len(rows)} failed, the first with "
                            f"{rows[0]['note'] or 'no message'!r}; each trial's output is in {sweep.out / 'logs'}")


def _log_path(sweep: Sweep, trial) -> Path:
    return record_own(sweep.out / "logs" / f"trial{trial.number:03d}.log")


def _clear_session() -> None:
    """One process trains many models: free the last one's graph (when a trial got as far as Keras)."""
    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()


def _run_parallel(sweep: Sweep, study, asks: int, parallel: int, log: TrialLog) -> None:
    """One worker process per trial, `parallel` at a time (toolkit.procs), each on the least busy GPU."""
    from optuna.trial import TrialState

    def ask():  # a trial is asked for only when a slot is free
        trial = study.ask()
        suggest(trial, sweep.space)
        return trial

    def start(trial, gpu, share_gpu):
        # optuna keeps no public trial id; the number is only unique within a study, the id across the storage
        cmd = [sys.executable, "-m", "toolkit.sweep", str(sweep.out), str(trial_id(trial)), str(os.getpid())]
        return spawn(cmd, _log_path(sweep, trial), gpu=gpu, share_gpu=share_gpu)

    def finished(trial, proc):
        if trial.number in {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}:
            trial.set_user_attr("error", f"its worker exited with {proc.returncode}; see {_log_path(sweep, trial)}")
            study.tell(trial.number, state=TrialState.FAIL)
        write_outputs(sweep, study)
        log.finished(study, trial)

    run_all((ask() for _ in range(asks)), parallel, start, finished, poll=1.0)


def _worker(out: str, trial_id: str, parent: str) -> None:
    """`python -m toolkit.sweep DIR TRIAL_ID PARENT_PID`: train one trial the parent asked for."""
    import optuna

    _exit_with_parent(int(parent))
    sweep = Sweep.load(Path(out))
    study = open_study(sweep)
    run_trial(sweep, study, optuna.trial.Trial(study, int(trial_id)), Console(width=120))


def _exit_with_parent(parent: int) -> None:
    """A killed sweep must not leave workers training on: they would race its resume."""
    def watch():
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


# ---------------------------------------------------------------- outputs

def trial_rows(sweep: Sweep, study) -> list[dict]:
    """One row per run directory (its latest trial), in run order: what sweep.csv holds."""
    latest = {}
    for t in study.get_trials(deepcopy=False):
        latest[run_number(t)] = t  # trials come in number order: a resumed run's last try wins
    rows = []
    for number, t in sorted(latest.items()):
        row = {"trial": number, "run": t.user_attrs.get("run", "")}
        row.update({p.key: t.params.get(p.key, "") for p in sweep.space.params})
        row.update({"objective": t.value if t.value is not None else "",
                    "epochs": t.user_attrs.get("epochs", ""), "epochs_planned": t.user_attrs.get("epochs_planned", ""),
                    "state": _state(t), "seconds": t.user_attrs.get("seconds", ""),
                    "note": t.user_attrs.get("why", t.user_attrs.get("error", ""))})
        rows.append(row)
    return rows


def _state(trial) -> str:
    name = trial.state.name.lower()
    if name == "pruned":
        return trial.user_attrs.get("stopped", "pruned")
    return {"fail": "failed"}.get(name, name)


def write_outputs(sweep: Sweep, study) -> None:
    """sweep.csv, sweep.png and best.toml as they stand."""
    rows = trial_rows(sweep, study)
    write_csv(sweep.out / "sweep.csv", rows)
    if any(r["objective"] != "" for r in rows):
        plot_sweep(rows, sweep.space, sweep.out / "sweep.png")
        write_best_recipe(sweep, rows)


def best_row(rows: list[dict], direction: str) -> dict | None:
    done = [r for r in rows if r["state"] == "complete" and r["objective"] != ""]
    if not done:
        return None
    pick = max if direction == "maximize" else min
    return pick(done, key=lambda r: float(r["objective"]))


def write_best_recipe(sweep: Sweep, rows: list[dict]) -> Path | None:
    """The best trial's recipe as run, headed by the command that trains it."""
    best = best_row(rows, sweep.space.direction)
    if best is None:
        return None
    text = (sweep.out / "trials" / best["run"] / "recipe.toml").read_text()
    path = sweep.out / "best.toml"
    head = (f"# cellfuse train {path}\n# The best of {len(rows)} trial(s) of {sweep.recipe_path} "
            f"(sweep {sweep.out}): {sweep.space.objective} = {float(best['objective']):.4f}, "
            f"trial {best['trial']}.\n")
    return atomic_write_text(path, head + text)


def plot_sweep(rows: list[dict], space: Space, path: Path) -> Path:
    """The objective against each parameter (stopped trials hollow), and the best so far by trial."""
    plt = report.pyplot()
    done = [r for r in rows if r["objective"] != ""]
    n = len(space.params) + 1
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.2), squeeze=False, layout="constrained")
    for ax, p in zip(axes[0], space.params, strict=False):
        xs = [r[p.key] for r in done]
        if p.kind == "choice":
            labels = [str(v) for v in p.values]
            xs = [labels.index(str(x)) for x in xs]
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        elif p.kind == "log":
            ax.set_xscale("log")
            ticks = np.geomspace(p.values[0], p.values[1], 3)  # a range under a decade has no major tick
            ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks])
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
            ax.set_xlim(p.values[0] / 1.1, p.values[1] * 1.1)  # the whole searched range
        ax.scatter(xs, [float(r["objective"]) for r in done], color="tab:blue")
        ax.set_xlabel(p.key)
        ax.set_ylabel(space.objective)
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    pick = np.maximum if space.direction == "maximize" else np.minimum
    ax.step([r["trial"] for r in done], pick.accumulate([float(r["objective"]) for r in done]), where="post",
            color="tab:green", label="best so far")
    ax.scatter([r["trial"] for r in done], [float(r["objective"]) for r in done], color="tab:blue", s=12)
    ax.set_xlabel("trial")
    ax.set_ylabel(space.objective)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out = atomic_save_figure(fig, path)
    plt.close(fig)
    return out


class TrialLog:
    """The sweep's console: a header, one line per trial as it ends, then the best trial and best.toml.

    Plain lines, never wrapped or truncated, so a piped or logged sweep reads the same."""

    def __init__(self, sweep: Sweep, console: Console):
        self.sweep, self.console = sweep, console
        self.columns = ["trial", *(p.key for p in sweep.space.params), sweep.space.objective]

    def start(self, study, trials: int, requeued: int = 0) -> None:
        space = self.sweep.space
        self._print(f"sweep of {self.sweep.recipe_path}: {trials} trial(s) over {len(space.params)} "
                    f"parameter(s), {space.objective} ({space.direction}); each trial's output in "
                    f"{self.sweep.out / 'logs'}")
        if requeued:
            self._print(f"resuming {requeued} interrupted trial(s) from their checkpoints")
        self._print(self._cells([*self.columns, "state"]))
        for row in trial_rows(self.sweep, study):  # a resumed sweep lists what it already has
            if row["state"] not in ("running", "waiting"):
                self._row(row)

    def finished(self, study, trial) -> None:
        number = run_number(trial)
        self._row(next(r for r in trial_rows(self.sweep, study) if r["trial"] == number))

    def end(self, summary: dict) -> None:
        best = summary["best"]
        if best is None:
            self._print(f"best: none, no trial completed (see {self.sweep.out / 'sweep.csv'})")
            return
        self._print(f"best: trial {best['trial']}, {summary['objective']} = {best['value']:.4f}; "
                    f"its recipe: {best['recipe']} (cellfuse train {best['recipe']})")

    def _row(self, r: dict) -> None:
        state = r["state"]
        if r["epochs"] != "":
            state += f" {r['epochs']}/{r['epochs_planned']} epochs"
        if r["seconds"] != "":
            state += f", {r['seconds']} s"
        if r["note"]:
            state += f": {r['note']}"
        values = [str(r["trial"]), *(_show(r[p.key]) for p in self.sweep.space.params), _show(r["objective"]) or "-"]
        self._print(self._cells([*values, state]))

    def _cells(self, cells: list[str]) -> str:
        """Right-aligned under the column names; the last cell (the state) as it comes."""
        widths = [max(len(c), 6) for c in self.columns]
        return "  ".join([*(c.rjust(w) for c, w in zip(cells, widths, strict=False)), cells[-1]])

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summarize(sweep: Sweep, study, seconds: float) -> dict:
    rows = trial_rows(sweep, study)
    best = best_row(rows, sweep.space.direction)
    states = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1
    return {"out": str(sweep.out), "objective": sweep.space.objective, "direction": sweep.space.direction,
            "trials": len(rows), "states": states, "seconds": round(seconds, 1),
            "best": None if best is None else {
                "trial": best["trial"], "run": str(sweep.out / "trials" / best["run"]),
                "value": float(best["objective"]), "recipe": str(sweep.out / "best.toml"),
                "params": {p.key: best[p.key] for p in sweep.space.params}}}


# ---------------------------------------------------------------- sweeps as ensemble members

def is_sweep_dir(path) -> bool:
    return (Path(path) / MARKER).is_file()


def top_trials(sweep_dir, k: int) -> list[Path]:
    """The run directories of a sweep's k best complete trials, best first."""
    sweep_dir = Path(sweep_dir)
    info = json.loads((sweep_dir / MARKER).read_text())
    path = sweep_dir / "sweep.csv"
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    done = [r for r in rows if r["state"] == "complete" and r["objective"] != ""]
    if not done:
        raise CellfuseError(f"{sweep_dir}: no complete trial yet (see {path})")
    done.sort(key=lambda r: float(r["objective"]), reverse=info["direction"] == "maximize")
    return [sweep_dir / "trials" / r["run"] for r in done[:k]]


def expand_sweeps(paths, top: int) -> list[Path]:
    """Each sweep directory among `paths` replaced by its `top` best trials; other paths kept."""
    out = []
    for path in paths:
        out += top_trials(path, top) if is_sweep_dir(path) else [Path(path)]
    return out


if __name__ == "__main__":
    _worker(*sys.argv[1:])
