"""No command loses or clobbers anything, under any name, path or --force.

Every writing command runs in process, from a sandbox holding a user's files next to a trained run, an
ensemble and a clean output, under each layout that has lost files before: --out holding the user's
files; --out equal to, containing or inside an input; --out a symbolic link to a user's folder; run
names `..`, `.`, `a/b` and absolute; each with and without --force. Every file of the sandbox is hashed
before and after: the command either wrote only new paths under its output (replacing, with --force,
only the cellfuse output it names) or exited 2 with one "Error:" line and left the sandbox as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_images

from toolkit.cli import main
from toolkit.data import save_dataset
from toolkit.runs import (
    MANIFEST,
    atomic_write_bytes,
    atomic_write_text,
    check_new_file,
    make_own_dir,
    release_locks,
)

# The smallest training cellfuse does: the tiny recipe, one epoch of one step.
TINY = ("--set data.train=d.npz --set train.steps_per_epoch=1 "
        "--set 'train.stages=[{epochs=1, lr=3e-3, unfreeze=1.0}]'")
STUDENT = TINY.replace("d.npz", "d.npz --set distill.bank_views=1", 1)
NO_TRAIN = "--set data.train=d.npz"  # where the command is refused before any training


def cellfuse(args: str | list[str]):
    """One command, in process, from the current folder."""
    argv = shlex.split(args) if isinstance(args, str) else args
    return CliRunner().invoke(main, argv, catch_exceptions=False)


def check_ran(result, args) -> None:
    assert result.exit_code == 0, f"cellfuse {args}\n{result.output}"


# ---------------------------------------------------------------- the sandbox

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """ONE of each cellfuse output, built once for the whole module: the user's data (d.npz), a clean
    output (clean/), a trained tiny run (runs/tiny/) and an ensemble of it (ens/)."""
    root = tmp_path_factory.mktemp("built")
    save_dataset(root / "d.npz", *make_images(64))
    save_dataset(root / "v.npz", *make_images(32, seed=1))  # validation images the run did not train on
    (root / MANIFEST).unlink()  # d.npz and v.npz stand for the user's data: cellfuse did not write them
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for args in ("clean d.npz --out clean --no-tsne",
                     f"train tiny {TINY} --out runs",
                     "ensemble runs/tiny --val v.npz --views none --rounds 1 --out ens"):
            check_ran(cellfuse(args), args)
    return root


@pytest.fixture
def sandbox(built, tmp_path, monkeypatch):
    """tmp_path/work, the current folder: copies of the built outputs (with their manifests), the
    user's data d.npz, a user's folder user/ holding notes.txt, link -> user, a student recipe and a
    sweep space.
    The hashed root is tmp_path, so `--out ..` stays inside it."""
    work = tmp_path / "work"
    shutil.copytree(built, work, symlinks=True)
    (work / "user").mkdir()
    (work / "user" / "notes.txt").write_text("the user's notes")
    (work / "link").symlink_to("user")
    tiny = (Path(__file__).parents[1] / "recipes" / "tiny.toml").read_text()
    (work / "student.toml").write_text(tiny + '\n[distill]\nmode = "bank"\n')
    shutil.copy(Path(__file__).parents[1] / "recipes" / "spaces" / "tiny.toml", work / "space.toml")
    monkeypatch.chdir(work)
    return work


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root: a file by its content's hash, a link by its target, a folder as such."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                found[rel] = "folder"
            else:
                found[rel] = hashlib.sha1(path.read_bytes()).hexdigest()
    return found


def manifests(root: Path, found: dict) -> dict[str, dict]:
    return {rel: json.loads((root / rel).read_text()) for rel, what in found.items()
            if Path(rel).name == MANIFEST and not what.startswith("link")}


def _grew(old: dict, new: dict) -> bool:
    """A manifest may gain the names of new outputs; it never loses one or changes its kind."""
    return new.get("kind") == old.get("kind") and set(old.get("own", [])) <= set(new.get("own", []))


def _under(rel: str, prefixes) -> bool:
    return any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in prefixes)


def check_nothing_lost(root: Path, before: dict, after: dict, result, args: str, *, writes=(), replaces=(),
                       old_manifests=None) -> None:
    """The property: exit 2 with one Error line and nothing touched, or exit 0 with only new paths
    under `writes` (and, with --force, the old output `replaces` replaced)."""
    output = result.output
    assert "Traceback" not in output, f"cellfuse {args}\n{output}"
    assert result.exit_code in (0, 2), f"cellfuse {args}: exit {result.exit_code}\n{output}"
    if result.exit_code == 2:
        errors = [line for line in output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, f"cellfuse {args}: wants one Error line\n{output}"
        assert after == before, f"cellfuse {args}: refused, yet changed {_diff(before, after)}\n{output}"
        return
    changed = {rel for rel in before if after.get(rel) != before[rel] and not _under(rel, replaces)}
    grown = manifests(root, {rel: after[rel] for rel in changed if rel in after})
    changed -= {rel for rel, new in grown.items() if rel in (old_manifests or {}) and _grew(old_manifests[rel], new)}
    assert not changed, f"cellfuse {args}: changed or deleted {sorted(changed)}\n{output}"
    strays = [rel for rel in after if rel not in before and not _under(rel, writes)]
    assert not strays, f"cellfuse {args}: wrote outside its output: {strays}\n{output}"


def _diff(before: dict, after: dict) -> list[str]:
    return sorted(f"{'-' if rel not in after else '+' if rel not in before else '~'}{rel}"
                  for rel in set(before) | set(after) if before.get(rel) != after.get(rel))


def run_checked(root: Path, args: str, *, writes=(), replaces=(), expect: int | None = None, says: str = ""):
    """Run one command under the property; `writes`/`replaces` are relative to the current folder."""
    work = Path.cwd().relative_to(root)
    before = snapshot(root)
    old_manifests = manifests(root, before)
    result = cellfuse(args)
    after = snapshot(root)
    check_nothing_lost(root, before, after, result, args, writes=[_real(root, work, w) for w in writes],
                       replaces=[str(work / r) for r in replaces], old_manifests=old_manifests)
    if expect is not None:
        assert result.exit_code == expect, f"cellfuse {args}: wanted exit {expect}\n{result.output}"
    if result.exit_code == 2:
        assert says in result.output.split("Error:", 1)[1], f"cellfuse {args}: the Error line should name {says!r}"
    return result


def _real(root: Path, work: Path, rel: str) -> str:
    """Where a path written through a link lands, relative to root."""
    return str((root / work / rel).resolve().relative_to(root.resolve()))


# ---------------------------------------------------------------- the layouts

def own_file(path: str, data: bytes = b"written by cellfuse", writer: str | None = None) -> None:
    """A file cellfuse wrote; as a command writing single files (`writer`) would record it, when named."""
    if writer:
        check_new_file(Path(path), None, False, writer=writer)
    atomic_write_bytes(path, data)
    release_locks()


def copy_of(name: str, path: Path) -> bytes:
    """The shipped recipe `name` as `recipes copy` writes it to `path`."""
    from toolkit.catalog import copied_text
    from toolkit.recipe import shipped_recipe

    return copied_text(shipped_recipe(name), path).encode()


def own_sweep_with_best_toml(work: Path) -> None:
    """sw1/: a sweep directory cellfuse made, holding its best.toml (a recipe a user trains from)."""
    make_own_dir(work / "sw1", "sweep")
    atomic_write_text(work / "sw1" / "sweep.json", "{}")  # the marker a sweep writes first
    atomic_write_text(work / "sw1" / "best.toml", (work / "student.toml").read_text())


def user_file_in_tb(work: Path) -> None:
    (work / "runs" / "tiny" / "tb" / "train" / "mine.txt").write_text("the user's")


def user_hidden_tmp_in_run(work: Path) -> None:
    (work / "runs" / "tiny" / ".x.tmp").write_text("the user's")


def own_data_in_run(work: Path) -> None:
    """runs/tiny/c.npz: a data file cellfuse wrote into the run (so --force could delete it)."""
    atomic_write_bytes(work / "runs" / "tiny" / "c.npz", (work / "d.npz").read_bytes())


def export_inside_run(work: Path) -> None:
    """runs/tiny/sub.zip: a submission exported into the run (`train --force` deleted it without a word)."""
    check_ran(cellfuse("export runs/tiny --out runs/tiny/sub.zip"), "export")


def ensemble_inside_run(work: Path) -> None:
    check_ran(cellfuse("ensemble runs/tiny --val v.npz --views none --rounds 1 --out runs/tiny/ens"), "ensemble")


def user_files(*names: str):
    def put(work: Path) -> None:
        for name in names:
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_bytes((work / "d.npz").read_bytes() if name.endswith(".npz") else b"the user's")
    put.__name__ = f"user_files({', '.join(names)})"
    return put


def link(name: str, target: str):
    def put(work: Path) -> None:
        (work / name).symlink_to(target)
    return put


@dataclass
class Case:
    name: str
    args: str
    setup: object = None  # a function of the sandbox folder
    forces: tuple = (False, True)
    expect: dict = field(default_factory=lambda: {False: 2, True: 2})  # exit status by --force
    writes: tuple = ()  # where new paths may appear when it succeeds
    replaces: tuple = ()  # the old cellfuse output --force may replace
    says: str | None = None  # in the Error line of a refusal (default: the --out), so it is refused for
    # the layout, not for some other mistake

    def refusal_names(self) -> str:
        if self.says is not None:
            return self.says
        argv = shlex.split(self.args)
        return argv[argv.index("--out") + 1] if "--out" in argv else argv[-1]


def ok(no_force: int, force: int) -> dict:
    return {False: no_force, True: force}


NAMES = {"dotdot": "..", "dot": ".", "slash": "a/b", "absolute": "{absolute}", "empty": "''"}

CASES = [
    # clean DATA --out DIR
    Case("clean-user-folder", "clean d.npz --out user --no-tsne"),
    Case("clean-out-is-input", "clean d.npz --out d.npz --no-tsne"),
    Case("clean-out-holds-input", "clean user/d2.npz --out user --no-tsne", user_files("user/d2.npz")),
    Case("clean-own-output-holds-input", "clean clean/clean.npz --out clean --no-tsne"),
    Case("clean-out-inside-input", "clean d.npz --out d.npz/sub --no-tsne"),
    Case("clean-out-dotdot", "clean d.npz --out .. --no-tsne"),
    Case("clean-symlink", "clean d.npz --out link --no-tsne"),
    Case("clean-own-output", "clean d.npz --out clean --no-tsne", expect=ok(2, 0), writes=("clean",),
         replaces=("clean",)),
    # corrupt DATA --out FILE
    Case("corrupt-user-file", "corrupt d.npz --out user/c.npz", user_files("user/c.npz")),
    Case("corrupt-out-is-input", "corrupt d.npz --out d.npz"),
    Case("corrupt-out-inside-input", "corrupt d.npz --out d.npz/c.npz"),
    Case("corrupt-over-a-run-s-model", "corrupt d.npz --out runs/tiny/best.keras"),
    Case("corrupt-symlinked-file", "corrupt d.npz --out c.npz", link("c.npz", "user/notes.txt")),
    Case("corrupt-into-symlinked-folder", "corrupt d.npz --out link/c.npz --families own", forces=(True,),
         expect=ok(0, 0), writes=("link/c.npz", f"link/{MANIFEST}")),
    Case("corrupt-own-file", "corrupt d.npz --out c.npz", lambda w: own_file(w / "c.npz", writer="corrupt"),
         expect=ok(2, 0), writes=("c.npz",), replaces=("c.npz",)),
    Case("corrupt-over-synth-s-file", "corrupt d.npz --out c.npz", lambda w: own_file(w / "c.npz", writer="synth")),
    Case("corrupt-over-clean-s-data", "corrupt d.npz --out clean/clean.npz"),
    # split DATA --out DIR
    Case("split-user-val", "split d.npz --out user", user_files("user/val.npz")),
    Case("split-out-is-input", "split d.npz --out d.npz"),
    Case("split-out-inside-input", "split d.npz --out d.npz/sub"),
    Case("split-into-own-output-holding-input", "split clean/clean.npz --out clean --families ''",
         forces=(False,), expect=ok(0, 0), writes=("clean",)),
    Case("split-over-corrupt-s-file", "split d.npz --out user --families ''",
         lambda w: own_file(w / "user" / "val.npz", writer="corrupt"), says="user/val.npz"),
    Case("split-symlink", "split d.npz --out link --families ''", forces=(True,), expect=ok(0, 0), writes=("user",)),
    # preview RECIPE --out PNG
    Case("preview-user-file", f"preview tiny {NO_TRAIN} --out user/p.png", user_files("user/p.png")),
    Case("preview-out-is-recipe", f"preview student.toml {NO_TRAIN} --out student.toml"),
    Case("preview-out-inside-input", f"preview tiny {NO_TRAIN} --out d.npz/p.png"),
    Case("preview-over-a-run-s-plot", f"preview tiny {NO_TRAIN} --out runs/tiny/curves.png"),
    Case("preview-symlinked-file", f"preview tiny {NO_TRAIN} --out p.png", link("p.png", "user/notes.txt")),
    # train RECIPE --out ROOT (the run is ROOT/<name>)
    Case("train-user-folder-named", f"train tiny {NO_TRAIN} --out . --set name=user"),
    Case("train-clean-output-named", f"train tiny {NO_TRAIN} --out . --set name=clean"),
    Case("train-ensemble-named", f"train tiny {NO_TRAIN} --out . --set name=ens"),
    Case("train-out-is-input", f"train tiny {NO_TRAIN} --out d.npz"),
    Case("train-out-inside-input", f"train tiny {NO_TRAIN} --out d.npz/runs"),
    Case("train-recipe-inside-run", f"train runs/tiny/recipe.toml {NO_TRAIN} --out runs"),
    Case("train-data-inside-run", "train tiny --set data.train=runs/tiny/c.npz --out runs", own_data_in_run),
    Case("train-user-file-in-tb", f"train tiny {NO_TRAIN} --out runs", user_file_in_tb),
    Case("train-user-hidden-tmp", f"train tiny {NO_TRAIN} --out runs", user_hidden_tmp_in_run),
    Case("train-export-inside-run", f"train tiny {NO_TRAIN} --out runs", export_inside_run, forces=(True,),
         says="sub.zip (`cellfuse export`), made from this run by another command"),
    Case("train-ensemble-inside-run", f"train tiny {NO_TRAIN} --out runs", ensemble_inside_run, forces=(True,),
         says="ens/ (an ensemble), made from this run by another command"),
    Case("train-symlink-named", f"train tiny {NO_TRAIN} --out . --set name=link"),
    Case("train-own-run", f"train tiny {TINY} --out runs", expect=ok(2, 0), writes=("runs/tiny",),
         replaces=("runs/tiny",)),
    Case("train-into-symlinked-user-folder", f"train tiny {TINY} --out link", forces=(True,), expect=ok(0, 0),
         writes=("user/tiny",)),
    *[Case(f"train-name-{key}", f"train tiny {NO_TRAIN} --out runs --set name={name}", says="name")
      for key, name in NAMES.items()],
    # distill ENSEMBLE RECIPE --out ROOT
    Case("distill-ensemble-named", f"distill ens student.toml {STUDENT} --out . --set name=ens"),
    Case("distill-run-named", f"distill ens student.toml {STUDENT} --out runs --set name=tiny"),
    Case("distill-user-folder-named", f"distill ens student.toml {STUDENT} --out . --set name=user"),
    Case("distill-symlink-named", f"distill ens student.toml {STUDENT} --out . --set name=link"),
    Case("distill-out-inside-input", f"distill ens student.toml {STUDENT} --out d.npz/runs"),
    *[Case(f"distill-name-{key}", f"distill ens student.toml {STUDENT} --out runs --set name={name}", says="name")
      for key, name in NAMES.items()],
    # ensemble RUN --val DATA --out DIR
    Case("ensemble-user-predictions", "ensemble runs/tiny --val v.npz --views none --out user",
         user_files("user/predictions.npz")),
    Case("ensemble-out-is-run", "ensemble runs/tiny --val v.npz --views none --out runs/tiny"),
    Case("ensemble-out-holds-run", "ensemble runs/tiny --val v.npz --views none --out runs"),
    Case("ensemble-own-output-holds-val", "ensemble runs/tiny --val ens/v.npz --views none --out ens",
         lambda w: own_file(w / "ens" / "v.npz", (w / "d.npz").read_bytes())),
    Case("ensemble-out-inside-input", "ensemble runs/tiny --val v.npz --views none --out v.npz/ens"),
    Case("ensemble-symlink", "ensemble runs/tiny --val v.npz --views none --out link"),
    Case("ensemble-own-output", "ensemble runs/tiny --val v.npz --views none --rounds 1 --out ens",
         expect=ok(2, 0), writes=("ens",), replaces=("ens",)),
    # export RUN --out ZIP
    Case("export-user-file", "export runs/tiny --out user/s.zip", user_files("user/s.zip")),
    Case("export-out-is-run", "export runs/tiny --out runs/tiny"),
    Case("export-out-inside-input", "export runs/tiny --out d.npz/s.zip"),
    Case("export-symlinked-file", "export runs/tiny --out s.zip", link("s.zip", "user/notes.txt")),
    Case("export-over-a-run-s-model", "export runs/tiny --out runs/tiny/best.keras"),
    Case("export-over-predict-s-file", "export runs/tiny --out s.zip", lambda w: own_file(w / "s.zip", writer="predict")),
    Case("export-into-run", "export runs/tiny --out runs/tiny/s.zip", forces=(False,), expect=ok(0, 0),
         writes=("runs/tiny/s.zip",)),
    # inspect MODEL DATA --out DIR
    Case("inspect-user-folder", "inspect runs/tiny d.npz --families '' --out user"),
    Case("inspect-out-is-run", "inspect runs/tiny d.npz --families '' --out runs/tiny"),
    Case("inspect-out-holds-input", "inspect runs/tiny d.npz --families '' --out ."),
    Case("inspect-out-inside-input", "inspect runs/tiny d.npz --families '' --out d.npz/inspect"),
    Case("inspect-symlink", "inspect runs/tiny d.npz --families '' --out link"),
    Case("inspect-clean-output", "inspect runs/tiny d.npz --families '' --out clean"),
    # sweep RECIPE --space SPACE --out DIR
    Case("sweep-own-output-holds-recipe", f"sweep sw1/best.toml --space space.toml --trials 1 {NO_TRAIN} --out sw1",
         own_sweep_with_best_toml, expect=ok(2, 2), says="sw1"),
    Case("sweep-user-folder", f"sweep tiny --space space.toml --trials 1 {NO_TRAIN} --out user"),
    Case("sweep-out-holds-data", f"sweep tiny --space space.toml --trials 1 {NO_TRAIN} --out ."),
    Case("sweep-out-inside-input", f"sweep tiny --space space.toml --trials 1 {NO_TRAIN} --out d.npz/sw"),
    Case("sweep-symlink", f"sweep tiny --space space.toml --trials 1 {NO_TRAIN} --out link"),
    Case("sweep-run-folder", f"sweep tiny --space space.toml --trials 1 {NO_TRAIN} --out runs/tiny"),
    *[Case(f"sweep-name-{key}", f"sweep tiny --space space.toml --trials 1 {NO_TRAIN} --set name={name}", says="name")
      for key, name in NAMES.items()],
    # synth --out FILE (and FILE.planted.json)
    Case("synth-user-sidecar", "synth --out user/d.npz --n 8", user_files("user/d.planted.json"),
         says="user/d.planted.json"),
    Case("synth-user-file", "synth --out d.npz --n 8"),
    Case("synth-out-inside-input", "synth --out d.npz/s.npz --n 8"),
    Case("synth-symlinked-file", "synth --out s.npz --n 8", link("s.npz", "user/notes.txt")),
    Case("synth-over-clean-s-data", "synth --out clean/clean.npz --n 8"),
    Case("synth-into-user-folder", "synth --out user/s.npz --n 8", forces=(True,), expect=ok(0, 0),
         writes=("user/s.npz", "user/s.planted.json", f"user/{MANIFEST}")),
    # predict MODEL INPUT --out CSV
    Case("predict-user-file", "predict runs/tiny d.npz --out user/p.csv", user_files("user/p.csv")),
    Case("predict-out-is-input", "predict runs/tiny d.npz --out d.npz"),
    Case("predict-out-inside-input", "predict runs/tiny d.npz --out d.npz/p.csv"),
    Case("predict-over-a-run-s-history", "predict runs/tiny d.npz --out runs/tiny/history.csv"),
    Case("predict-over-export-s-file", "predict runs/tiny d.npz --out p.csv",
         lambda w: own_file(w / "p.csv", writer="export")),
    Case("predict-symlinked-file", "predict runs/tiny d.npz --out p.csv", link("p.csv", "user/notes.txt")),
    # recipes copy NAME PATH
    Case("recipes-copy-user-file", "recipes copy tiny user/t.toml", user_files("user/t.toml")),
    Case("recipes-copy-over-recipe", "recipes copy tiny student.toml"),
    Case("recipes-copy-inside-file", "recipes copy tiny d.npz/t.toml"),
    Case("recipes-copy-symlinked-file", "recipes copy tiny t.toml", link("t.toml", "user/notes.txt")),
    Case("recipes-copy-own-file", "recipes copy tiny t.toml", lambda w: own_file(w / "t.toml", copy_of("cpu-mobilenet", w / "t.toml"),
                                                                        writer="recipes copy"),
         expect=ok(2, 0), writes=("t.toml",), replaces=("t.toml",)),
    Case("recipes-copy-edited-file", "recipes copy tiny t.toml",  # a copy the user edited is theirs
         lambda w: own_file(w / "t.toml", copy_of("cpu-mobilenet", w / "t.toml") + b"# mine\n", writer="recipes copy")),
    Case("recipes-copy-over-a-run-s-recipe", "recipes copy tiny runs/tiny/recipe.toml"),
    # demo and bench: refused in their output's preparation, before any work (a real run takes minutes)
    Case("demo-user-folder", "demo --out user"),
    Case("demo-out-holds-input", "demo --data d.npz --out ."),
    Case("demo-out-inside-input", "demo --out d.npz/demo"),
    Case("demo-symlink", "demo --out link"),
    Case("demo-run-folder", "demo --out runs/tiny"),
    Case("bench-user-folder", "bench --quick --out user"),
    Case("bench-out-inside-input", "bench --quick --out d.npz/bench"),
    Case("bench-symlink", "bench --quick --out link"),
]


def _params():
    for case in CASES:
        for force in case.forces:
            yield pytest.param(case, force, id=f"{case.name}{'-force' if force else ''}")


@pytest.mark.parametrize("case, force", list(_params()))
def test_no_command_loses_or_clobbers_anything(sandbox, case, force):
    if case.setup is not None:
        case.setup(sandbox)
    args = case.args.replace("{absolute}", str(sandbox.parent / "absolute"))  # a path inside what is hashed
    run_checked(sandbox.parent, args + (" --force" if force else ""), writes=case.writes,
                replaces=case.replaces if force else (), expect=case.expect[force], says=case.refusal_names())


# ---------------------------------------------------------------- the reproductions of issue 26

def test_train_never_deletes_a_clean_output_holding_its_data(sandbox):
    """`train --out vp --set name=clean`, vp/clean the clean output holding the training data."""
    (sandbox / "vp").mkdir()
    shutil.move(sandbox / "clean", sandbox / "vp" / "clean")
    for force in ("", " --force"):
        run_checked(sandbox.parent, f"train tiny {TINY} --set data.train=vp/clean/clean.npz --out vp "
                                    f"--set name=clean{force}", expect=2)
    assert (sandbox / "vp" / "clean" / "clean.npz").exists()


def test_train_never_replaces_a_user_s_recipe_in_a_folder_named_like_the_run(sandbox):
    """`train exp/tiny/recipe.toml --out exp`: the user's recipe.toml and env.json stay."""
    (sandbox / "exp" / "tiny").mkdir(parents=True)
    (sandbox / "exp" / "tiny" / "recipe.toml").write_text((sandbox / "student.toml").read_text())
    (sandbox / "exp" / "tiny" / "env.json").write_text("{}")
    for force in ("", " --force"):
        run_checked(sandbox.parent, f"train exp/tiny/recipe.toml {TINY} --out exp{force}", expect=2)


def test_distill_never_deletes_its_input_ensemble(sandbox):
    """`distill ens_victim student.toml --out . --set name=ens_victim`."""
    shutil.move(sandbox / "ens", sandbox / "ens_victim")
    for force in ("", " --force"):
        run_checked(sandbox.parent, f"distill ens_victim student.toml {STUDENT} --out . "
                                    f"--set name=ens_victim{force}", expect=2)
    assert (sandbox / "ens_victim" / "ensemble.keras").exists()


def test_a_run_named_dotdot_empties_nothing(sandbox):
    """`train --out par/runs --set name=..` emptied par/ (a finished run and the cleaned data)."""
    (sandbox / "par").mkdir()
    shutil.move(sandbox / "runs", sandbox / "par" / "runs")
    shutil.move(sandbox / "clean", sandbox / "par" / "clean")
    result = run_checked(sandbox.parent, f"train tiny {TINY} --out par/runs --set name=.. --force", expect=2)
    assert "name" in result.output


def test_a_refused_train_claims_nothing_so_a_later_force_deletes_nothing(sandbox):
    """A refused `train` into a user's folder wrote .cellfuse.json there (and in the folder above), and
    a later `clean --out . --force` then deleted the user's file."""
    (sandbox / "user" / "tiny").mkdir()  # a user's folder named like the run: refused
    run_checked(sandbox.parent, f"train tiny {TINY} --out user", expect=2)
    assert not list((sandbox / "user").rglob(MANIFEST))
    run_checked(sandbox.parent, "clean d.npz --out user --no-tsne --force", expect=2)
    assert (sandbox / "user" / "notes.txt").read_text() == "the user's notes"


def test_sweep_force_never_deletes_its_input_recipe(sandbox):
    """`sweep sw1/best.toml --out sw1 --force`, sw1 the sweep that wrote best.toml."""
    own_sweep_with_best_toml(sandbox)
    result = run_checked(sandbox.parent, f"sweep sw1/best.toml --space space.toml --trials 1 {NO_TRAIN} --out sw1 "
                                         "--force", expect=2)
    assert "is an input" in result.output
    assert (sandbox / "sw1" / "best.toml").exists()


def test_synth_never_overwrites_a_user_s_sidecar(sandbox):
    """`synth --out u/d.npz`, u/d.planted.json the user's."""
    (sandbox / "u").mkdir()
    (sandbox / "u" / "d.planted.json").write_text('{"mine": true}')
    for force in ("", " --force"):
        run_checked(sandbox.parent, f"synth --out u/d.npz --n 8{force}", expect=2)
    assert not (sandbox / "u" / "d.npz").exists()


def test_ensemble_never_adopts_a_user_s_predictions_as_its_cache(sandbox):
    """`ensemble RUN --val V --out u`, u holding only the user's predictions.npz."""
    (sandbox / "u").mkdir()
    shutil.copy(sandbox / "ens" / "predictions.npz", sandbox / "u" / "predictions.npz")
    for force in ("", " --force"):
        run_checked(sandbox.parent, f"ensemble runs/tiny --val v.npz --views none --out u{force}", expect=2)


@pytest.mark.parametrize("plant", [user_file_in_tb, user_hidden_tmp_in_run], ids=["in-tb", "hidden-tmp"])
def test_force_never_deletes_a_user_s_file_inside_a_run(sandbox, plant):
    """--force deleted user files in run/tb/ and hidden .*.tmp files that were not cellfuse's."""
    plant(sandbox)
    result = run_checked(sandbox.parent, f"train tiny {TINY} --out runs --force", expect=2)
    assert "cellfuse did not write" in result.output


def test_split_out_a_file_is_one_line(sandbox):
    """`split --out FILE` was a traceback."""
    for out in ("d.npz", "user/notes.txt", "d.npz/sub"):
        result = run_checked(sandbox.parent, f"split d.npz --out {out} --force", expect=2)
        assert "not a directory" in result.output


def test_a_symlinked_out_with_force_is_one_line_and_deletes_nothing(sandbox):
    """`--force` on a symbolic link to a folder was rmtree on the link, a traceback."""
    shutil.copytree(sandbox / "clean", sandbox / "user" / "clean")
    (sandbox / "cl").symlink_to("user/clean")
    result = run_checked(sandbox.parent, "clean d.npz --out cl --no-tsne --force", expect=2)
    assert "symbolic link" in result.output


# ---------------------------------------------------------------- --force on a file: only the same command's

def test_predict_force_never_replaces_a_run_s_history(sandbox):
    """`predict RUN DATA --out RUN/history.csv --force` replaced the run's history with predictions."""
    result = run_checked(sandbox.parent, "predict runs/tiny d.npz --out runs/tiny/history.csv --force", expect=2)
    assert "history.csv: belongs to a run output of `cellfuse train`" in result.output
    assert "`cellfuse predict` will not replace it" in result.output


def test_export_force_never_replaces_a_run_s_model(sandbox):
    """`export RUN --out RUN/best.keras --force`: the run's model stays (and no zip lands on it)."""
    before = (sandbox / "runs" / "tiny" / "best.keras").read_bytes()
    run_checked(sandbox.parent, "export runs/tiny --out runs/tiny/best.keras --force", expect=2)
    assert (sandbox / "runs" / "tiny" / "best.keras").read_bytes() == before


def test_a_command_may_force_over_its_own_earlier_output(sandbox):
    """The same command replaces what it wrote; another command may not."""
    run_checked(sandbox.parent, "predict runs/tiny d.npz --out user/p.csv", expect=0,
                writes=("user/p.csv", f"user/{MANIFEST}"))
    run_checked(sandbox.parent, "predict runs/tiny d.npz --out user/p.csv --force", expect=0,
                replaces=("user/p.csv",), writes=("user/p.csv",))
    manifest = json.loads((sandbox / "user" / MANIFEST).read_text())
    assert manifest["own"] == ["p.csv"] and manifest["writers"] == {"p.csv": "predict"}
    result = run_checked(sandbox.parent, "corrupt d.npz --out user/p.csv --force", expect=2)
    assert "`cellfuse predict`" in result.output


@pytest.mark.parametrize("command, out", [("predict runs/tiny d.npz", "p.csv"), ("corrupt d.npz", "c.npz")])
def test_a_file_the_user_replaced_at_cellfuse_s_name_is_theirs(sandbox, command, out):
    """`corrupt --out test.npz`, then `cp mine.npz test.npz`, then `corrupt --out test.npz --force`
    replaced the user's data: ownership was recorded by name only."""
    run_checked(sandbox.parent, f"{command} --out user/{out}", expect=0, writes=(f"user/{out}", f"user/{MANIFEST}"))
    shutil.copy(sandbox / "d.npz", sandbox / "user" / out)  # the user's own data, at cellfuse's name
    run_checked(sandbox.parent, f"{command} --out user/{out} --force", expect=2,
                says=f"{out}: has changed since cellfuse wrote it, so it is yours now")

