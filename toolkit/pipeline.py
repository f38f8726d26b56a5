"""The whole pipeline in one call: data -> clean -> validation files -> train -> corruption-tuned copies
-> ensemble -> distill -> export -> grade. `make demo` runs it on synthetic data; `cellfuse bench` on the real data.

Each stage is the same function its command calls, so the demo exercises exactly what users run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.rule import Rule
from rich.table import Table

from toolkit.clean import clean_file
from toolkit.corrupt import corrupt_file, write_val_files
from toolkit.ensemble import build_ensemble, content_key
from toolkit.errors import CellfuseError
from toolkit.export import export_submission, grade_submission
from toolkit.recipe import find_recipe, load_recipe, shipped_recipe, toml_string
from toolkit.runs import (
    MANIFEST,
    folder_kind,
    fresh_dir,
    lock_output,
    read_finished_json,
    refuse_inputs_inside,
    resolve_model_file,
    write_json,
)
from toolkit.synth import write_synthetic

# Two different ImageNet backbones: the pair the ensemble's selection kept on the real data (Lite0 with
# D4 views and the MobileNet; Lite1 got no weight), README Results.
MEMBER_RECIPES = ("cpu-lite0", "cpu-mobilenet")  # shipped recipes (toolkit.catalog)
# The student ladder, smallest first. How close a rung gets depends on the teacher: Lite0's first five stages
# were within a point of single-candidate teachers on clean and held-out validation, and 1.3 / 2.1 behind a
# six-candidate one, where the whole Lite0 born-again was 1.0 / 1.0 behind (MobileNet 0.25, a lower rung, was
# 1.6-1.8 behind): docs/results.md. So the pipeline climbs: it distils rung after rung and ships the first
# within CLOSE_POINTS of its teacher on JUDGED_ON (each with the ensemble's views), else the closest. With
# none within, a larger rung must be closer by more than CLOSER_BY points (5 or more of 899 validation images):
# a 1-image gain is not worth a 5x larger submission.
STUDENT_LADDER = ("student-cpu-lite0", "student-cpu-lite0-whole")
CLOSE_POINTS = 1.0
CLOSER_BY = 0.5
JUDGED_ON = ("val", "val_heldout")
# Each member's corruption-tuned copy (`train --from`: one epoch at a low rate, half the images corrupted by
# cellfuse's mix) and its WiSE-FT blend join the ensemble's candidates: on the real file +1.1 held-out and
# +1.8 shifted for -0.3 clean beside the member's D4 views (docs/results.md).
TUNED_COPY = ("data.corrupt_fraction=0.5", "train.stages=[{epochs=1, lr=1e-4, unfreeze=1.0}]")


@dataclass
class Stage:
    name: str
    produced: str
    where: str
    seconds: float


@dataclass
class Pipeline:
    out: Path
    console: Console
    stages: list[Stage] = field(default_factory=list)

    def step(self, name: str):
        self.console.print(Rule(f"[bold]{name}"))
        self._name, self._started = name, time.time()

    def done(self, produced: str, where) -> None:
        self.stages.append(Stage(self._name, produced, str(where), time.time() - self._started))

    def table(self) -> Table:
        table = Table(title=f"cellfuse pipeline: {self.out}")
        for col in ("stage", "produced", "where", "seconds"):
            table.add_column(col, justify="right" if col == "seconds" else "left")
        for s in self.stages:
            table.add_row(s.name, s.produced, s.where, f"{s.seconds:.0f}")
        table.add_row("total", "", "", f"{sum(s.seconds for s in self.stages):.0f}")
        return table


def finished(folder: Path, last: str, kind: str, resume: bool) -> dict | None:
    """On resume, what a stage cellfuse finished there wrote last (its `last` JSON file), else None:
    the stage runs again, replacing only its own unfinished output."""
    return read_finished_json(folder / last) if resume and folder_kind(folder) == kind else None


def member_overrides(clean_npz: Path, extra_val: list[Path], extra: tuple[str, ...] = ()) -> list[str]:
    extra_val = ", ".join(toml_string(str(p)) for p in extra_val)
    return [f"data.train={toml_string(str(clean_npz))}", f"data.extra_val=[{extra_val}]", *extra]


def tuned_name(member: str) -> str:
    return f"{member}-tuned"


def tuned_copy(run: Path):
    """The recipe of a member's corruption-tuned copy: the member's own, started from its weights."""
    return load_recipe(run / "recipe.toml", [f"name={toml_string(tuned_name(run.name))}",
                                             f"train.init_from={toml_string(str(resolve_model_file(run)))}",
                                             *TUNED_COPY])


def check_run_names(members: list[str], students: list[str] = ()) -> None:
    """Every member, its corruption-tuned copy and every student rung get their own run folder: refused
    before any training, rather than one run replacing another trained minutes earlier."""
    runs = [*members, *map(tuned_name, members), *students]
    taken = sorted({name for name in runs if runs.count(name) > 1})
    if taken:
        raise CellfuseError(f"the recipes' names give two runs one folder ({', '.join(taken)}; each member "
                            f"also makes NAME-tuned): rename one with name = \"...\"")


def common_split(recipes) -> tuple[float, int]:
    """The validation fraction and seed every member shares (the split files are written with them)."""
    splits = {(r.data.val_fraction, r.data.split_seed) for r in recipes}
    if len(splits) > 1:
        raise CellfuseError("the member recipes hold out different validation splits "
                            f"({', '.join(f'{r.name}: {r.data.val_fraction}/{r.data.split_seed}' for r in recipes)}); "
                            "an ensemble needs one data.val_fraction and data.split_seed")
    return splits.pop()


def points_behind(distilled: dict) -> float:
    """The student's largest gap to its teacher on JUDGED_ON, in points as distill prints them (one decimal)."""
    gaps = distilled["gap"]
    missing = [name for name in JUDGED_ON if name not in gaps]
    if missing:  # the pipeline always passes them; a judge on fewer sets would pass students it should not
        raise CellfuseError(f"{distilled['student_run']}: distill compared no {' or '.join(missing)} with the "
                            f"teacher, and the ladder judges a student on {' and '.join(JUDGED_ON)}")
    return max(round(100 * gaps[name], 1) for name in JUDGED_ON)


def shipped_rung(tried: list[dict]) -> dict:
    """The first rung within CLOSE_POINTS of its teacher; with none within, the smallest that is no more
    than CLOSER_BY points farther than the closest (`tried` is smallest first)."""
    within = [d for d in tried if points_behind(d) <= CLOSE_POINTS]
    if within:
        return within[0]
    closest = min(map(points_behind, tried))
    return next(d for d in tried if round(points_behind(d) - closest, 1) <= CLOSER_BY)


def climb(rungs, distill_rung) -> tuple[dict, list[dict], list[tuple]]:
    """Distil rung after rung (`distill_rung(rung)` returns distill's figures) until one is within
    CLOSE_POINTS of its teacher; returns the shipped rung's figures (`shipped_rung`), every distilled
    rung's, and (rung, error) for each rung that failed. A rung
    that fails after one succeeded (a larger backbone's weights out of reach, say) does not throw away
    the student already made: the climb goes on without it. The first rung's error is the pipeline's."""
    tried, failed = [], []
    for rung in rungs:
        try:
            tried.append(distill_rung(rung))
        except CellfuseError as error:
            if not tried:
                raise
            failed.append((rung, str(error)))
            continue
        if points_behind(tried[-1]) <= CLOSE_POINTS:
            break
    return shipped_rung(tried), tried, failed


def run_pipeline(data: Path, out: Path, test: Path | None, console: Console, *, member_extra=(),
                 student_extra=(), force=False, resume=False, members=None, students=None) -> dict:
    """Everything after the data exists. Returns each stage's main figures. With `resume`, every stage
    cellfuse finished under `out` is kept, and interrupted runs continue from their checkpoints."""
    # these load TensorFlow (~10 s): run_demo refuses a missing --data before paying for it
    from toolkit.distill import closing_line, distill_recipe
    from toolkit.train import train_recipe

    p = Pipeline(out, console)
    figures = {}
    p.step("clean")
    report = finished(out / "clean", "report.json", "clean", resume)
    figures["clean"] = report["counts"] if report else clean_file(data, out / "clean", force=force, console=console)
    p.done(f"{figures['clean'].get('kept', '?')} images kept" + (" (kept from before)" if report else ""),
           out / "clean" / "clean.npz")
    clean_npz = out / "clean" / "clean.npz"

    member_paths = ([find_recipe(recipe) for recipe in members] if members
                    else [shipped_recipe(name) for name in MEMBER_RECIPES])
    val, val_corrupt, val_heldout = (out / "clean" / f"{name}.npz" for name in ("val", "val_corrupt", "val_heldout"))
    recipes = [load_recipe(path, member_overrides(clean_npz, [val_corrupt, val_heldout], member_extra))
               for path in member_paths]
    fraction, seed = common_split(recipes)
    ladder = [find_recipe(s) for s in students] if students else [shipped_recipe(s) for s in STUDENT_LADDER]
    student_overrides = member_overrides(clean_npz, [val_corrupt, val_heldout], student_extra)
    check_run_names([recipe.name for recipe in recipes], [load_recipe(path, student_overrides).name for path in ladder])

    p.step("validation files")
    if not (resume and val_heldout.is_file()):  # written last
        write_val_files(clean_npz, out / "clean", fraction, seed, force=force)  # + val_heldout.npz
    p.done(f"clean + corrupted validation split ({fraction:.0%}, seed {seed})", val_corrupt)

    runs = []
    for path, recipe in zip(member_paths, recipes, strict=True):
        p.step(f"train {path.name}")
        summary = train_recipe(recipe, resume=resume, force=force, console=console, runs_root=out / "runs")
        figures[f"train {recipe.name}"] = summary
        runs.append(Path(summary["run"]))
        p.done(f"val acc {summary['metrics']['val']['accuracy']:.3f}", summary["run"])

    candidates = list(runs)
    for run in runs:
        p.step(f"tune {run.name}")
        summary = train_recipe(tuned_copy(run), resume=resume, force=force, console=console, runs_root=out / "runs")
        figures[f"tune {run.name}"] = summary
        candidates += [Path(summary["run"]), Path(summary["run"]) / "wise.keras"]
        p.done(f"val acc {summary['metrics']['val']['accuracy']:.3f}", summary["run"])

    p.step("ensemble")
    # steered by the held-out families (the last file): corruptions no member trained on
    built = finished(out / "ensemble", "metrics.json", "ensemble", resume)
    figures["ensemble"] = ({k: v for k, v in built.items() if k != "ensemble_metrics"} if built else
                           build_ensemble(candidates, [val, val_corrupt, val_heldout], out / "ensemble", force=force,
                                          console=console))
    p.done("selected members, views, temperatures" + (" (kept from before)" if built else ""),
           out / "ensemble" / "ensemble.json")

    def distill_rung(path: Path) -> dict:
        p.step(f"distill {path.name}")
        distilled = distill_recipe(out / "ensemble", path, student_overrides, resume=resume, force=force,
                                   console=console, runs_root=out / "runs")
        p.done(closing_line(distilled), distilled["student_run"])
        return distilled

    figures["distill"], tried, failed = climb(ladder, distill_rung)
    figures["ladder"] = [{"student_run": d["student_run"], "points_behind": points_behind(d)} for d in tried]
    figures["ladder"] += [{"recipe": str(path), "error": error} for path, error in failed]
    for path, error in failed:
        console.print(f"[yellow]warning:[/] the ladder's rung {path.name} failed, so it was skipped: {error}")
    student_run = Path(figures["distill"]["student_run"])
    if len(ladder) > 1:
        console.print(f"student: {student_run.name}, {points_behind(figures['distill']):.1f} points behind its "
                      f"teacher at most on {' and '.join(JUDGED_ON)} (the ladder ships the first within "
                      f"{CLOSE_POINTS:g} point, else the closest, a larger rung only when closer by over "
                      f"{CLOSER_BY:g}; distilled {len(tried)} of {len(ladder)})")

    p.step("export")
    figures["export"] = export_submission(student_run, out / "submission.zip", tta="auto", force=True, console=console)
    p.done(f"{figures['export']['bytes'] / 1e6:.2f} MB zip, views {figures['export']['tta']}", out / "submission.zip")

    p.step("grade")
    graded = test or val_corrupt
    figures["grade"] = grade_submission(out / "submission.zip", graded, console=console)
    p.done(f"accuracy {figures['grade']['accuracy']:.3f} on {Path(graded).name}", graded)
    console.print(p.table())
    figures["stages"] = [s.__dict__ for s in p.stages]
    return figures


def demo_folder(out: Path, data: Path | None, n: int, *, force: bool, resume: bool) -> Path:
    """The demo's folder, locked: on resume the demo cellfuse began there on the same data (demo.json),
    else a new one (`force` replaces only a folder cellfuse made, never one holding the data)."""
    began = {"data": str(Path(data).resolve()), "sha1": content_key(data)} if data is not None else {"synthetic": n}
    if resume and folder_kind(out) == "demo":
        lock_output(out)
        refuse_inputs_inside(out, [data])
        before = read_finished_json(out / "demo.json")
        if before is None and not [f for f in out.iterdir() if f.name != MANIFEST]:
            before = began  # cut off before demo.json was written: nothing else is there yet
        if before == began:
            write_json(out / "demo.json", began)
            return out
        if not force:
            raise CellfuseError(f"{out}: this demo began on {before or 'something unrecorded'}, not on {began}; "
                                "--resume continues a demo on its own data only (--force starts over)")
    out = fresh_dir(out, force, inputs=[data], kind="demo")
    write_json(out / "demo.json", began)
    return out


def run_demo(out: Path, *, data: Path | None = None, force: bool = False, resume: bool = False,
             console: Console | None = None, n: int = 2000) -> dict:
    """Synthetic data (or the user's file) through every stage, on CPU, in minutes. With `resume`, an
    interrupted demo continues: finished stages are kept, the interrupted one resumes."""
    console = console or Console()
    if data is not None and not Path(data).exists():
        raise CellfuseError(f"{data}: does not exist")
    out = demo_folder(out, data, n, force=force, resume=resume)
    started = time.time()
    if data is None:
        console.print(Rule("[bold]synthesise"))
        files = {"synth": out / "synth.npz", "heldout": out / "heldout.npz", "test": out / "heldout_corrupt.npz"}
        if not (resume and files["test"].is_file()):  # written last, each atomically, from fixed seeds
            write_synthetic(files["synth"], n=n, seed=0, force=True, console=console)
            write_synthetic(files["heldout"], n=400, seed=1, force=True, console=console)
            corrupt_file(files["heldout"], files["test"], severity=3, seed=1, force=True, console=console)
        data, test = files["synth"], files["test"]
        # The demo's data is easy: a few epochs of the CPU recipes at the data's own 96 px are plenty.
        member_extra = ("train.stages=[{epochs=1, lr=1e-3, unfreeze=0.0}, {epochs=3, lr=1e-3, unfreeze=1.0}]",
                        "model.input_size=96")
        # Keras' weight average (momentum 0.99, no warm-up) still holds a third of the initial weights
        # after 100 steps: a schedule this short needs it off. Four epochs want four bank views.
        student_extra = ("train.stages=[{epochs=1, lr=2e-3, unfreeze=0.0}, {epochs=3, lr=2e-3, unfreeze=1.0}]",
                         "train.ema=false", "distill.bank_views=4", "model.input_size=96")
    else:
        data, test, member_extra, student_extra = Path(data), None, (), ()
    figures = run_pipeline(data, out, test, console, member_extra=member_extra,
                           student_extra=student_extra, force=True, resume=resume)
    console.print(f"demo finished in {time.time() - started:.0f} s; everything is under {out}")
    return figures
