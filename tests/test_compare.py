"""`cellfuse runs`: the table read from the files train, ensemble and distill write (written here
directly, with their real field names, so no test trains anything)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from toolkit.cli import main
from toolkit.compare import collect, markdown, read_run
from toolkit.runs import lock_output, release_locks

ROOT = Path(__file__).parents[1]
HOUR_AGO = 3600


def write_run(run: Path, *, backbone="mobilenet-0.25", input_size=0, stages=(1, 9), epochs_done=10,
              summary=True, accuracy=(0.91, 0.65), params=1_010_000, distill=False, argv=None,
              init_from="") -> Path:
    """A run folder as toolkit.train writes it: recipe.toml and env.json first, history.csv per epoch,
    summary.json last (and, for a student, distill.json after it)."""
    run.mkdir(parents=True)
    stage_text = ", ".join(f"{{epochs = {e}, lr = 0.001, unfreeze = 1.0}}" for e in stages)
    (run / "recipe.toml").write_text(f'name = "{run.name}"\n\n[data]\nval_fraction = 0.15\n\n[model]\n'
                                     f'backbone = "{backbone}"\ninput_size = {input_size}\n\n'
                                     f"[train]\nstages = [{stage_text}]\n"
                                     + (f'init_from = "{init_from}"\n' if init_from else "")
                                     + ('\n[distill]\nmode = "cached"\n' if distill else ""))
    (run / "env.json").write_text(json.dumps({"cellfuse": "0.1.0", "argv": argv or ["cellfuse", "demo"]}))
    rows = "".join(f"{e},{30 + e}.5,52.0,0.001,0.5,1.2,0.6,1.1,0.9\n" for e in range(1, epochs_done + 1))
    (run / "history.csv").write_text("epoch,seconds,img_per_s,lr,accuracy,loss,val_accuracy,val_loss,val_auc\n" + rows)
    if summary:
        metrics = {name: {"accuracy": acc, "macro_f1": acc - 0.02, "auc_ovr": 0.98, "nll": 0.3, "ece": 0.02}
                   for name, acc in zip(("val", "val_corrupt"), accuracy, strict=True)}
        (run / "summary.json").write_text(json.dumps({
            "name": run.name, "run": str(run), "params": params, "final_weights_sha1": "0" * 40, "best_epoch": 9,
            "monitor": "val_auc", "best_value": 0.98, "seconds": 414.2, "train_img_per_s": 52.0,
            "metrics": metrics}, indent=2))
    return run


def write_ensemble(out: Path, clean: str, members: dict[str, float], d4: dict[str, tuple], selected: list[str],
                   accuracy=(0.95, 0.694)) -> Path:
    """ensemble.json and metrics.json as toolkit.ensemble.build_ensemble writes them; members relative."""
    out.mkdir(parents=True)
    files = {m: f"../runs/{m}/best.keras" for m in members}
    val_files = [f"{clean}/val.npz", f"{clean}/val_corrupt.npz"]
    rows = {}
    for m, acc in members.items():
        rows[f"{m} as saved"] = {f: {"accuracy": acc, "nll": 0.3, "ece": 0.02} for f in val_files}
        rows[f"{m} d4"] = {"temperature": 1.1, "weight": 0.5,
                           **{f: {"accuracy": a, "nll": 0.3, "ece": 0.02} for f, a in zip(val_files, d4[m], strict=True)}}
    components = [{"member": m, "views": "d4", "view_list": ["id", "rot90"], "merge": "mean",
                   "member_file": files[m], "temperature": 1.1, "weight": 1 / len(selected)} for m in selected]
    (out / "ensemble.json").write_text(json.dumps({
        "members": selected, "weights": [c["weight"] for c in components], "temperatures": [1.1] * len(selected),
        "views": ["d4"] * len(selected), "components": components, "steering_data": val_files[1], "rounds": 10,
        "single_view_temperatures": {m: 1.0 for m in members}, "val_index": [1, 3]}))
    (out / "metrics.json").write_text(json.dumps({
        "out": str(out), "steering_data": val_files[1], "members": files, "selected": components,
        "best_member": selected[0], "cross_fitted": {"best_single_accuracy": 0.692, "ensemble_accuracy": 0.682},
        "rows": rows, "ensemble_metrics": {f: {"n": 20, "accuracy": a, "macro_f1": a, "per_class": {}}
                                           for f, a in zip(val_files, accuracy, strict=True)}}))
    return out


def write_distill(run: Path, views="d4", accuracy=(0.93, 0.66)) -> None:
    rows = {label: {"params": 290_000, "bytes": 1_200_000, "acc_val": accuracy[0], "acc_val_corrupt": accuracy[1],
                    "img_per_s": 900.0} for label in ("student", "ensemble", "best member")}
    (run / "distill.json").write_text(json.dumps({"student_run": str(run), "mode": "cached", "init": "",
                                                  "views": views, "rows": rows, "size_ratio": 21.4}))


@pytest.fixture
def outputs(tmp_path):
    """A demo-shaped folder: two members, their ensemble, a student."""
    out = tmp_path / "outputs"
    write_run(out / "runs" / "cpu-mobilenet", argv=["cellfuse", "train", "recipes/cpu-mobilenet.toml"])
    write_run(out / "runs" / "cpu-lite0", backbone="efficientnet-lite0", input_size=160, stages=(1, 8), epochs_done=9,
              accuracy=(0.933, 0.673), params=5_260_000)
    write_ensemble(out / "ensemble", f"{out}/clean", {"cpu-mobilenet": 0.911, "cpu-lite0": 0.933},
                   d4={"cpu-mobilenet": (0.922, 0.649), "cpu-lite0": (0.95, 0.692)},
                   selected=["cpu-lite0", "cpu-mobilenet"])
    student = write_run(out / "runs" / "student-cpu", backbone="efficientnetv2-b0", stages=(1, 39),
                        epochs_done=40, accuracy=(0.92, 0.64), params=290_000, distill=True)
    write_distill(student)
    return out


def by_path(rows):
    return {r.path: r for r in rows}


def test_every_run_ensemble_and_student_is_a_row(outputs):
    rows = collect(outputs)
    assert [(r.path, r.kind, r.state) for r in rows] == [
        ("runs/cpu-lite0", "run", "complete"), ("runs/cpu-mobilenet", "run", "complete"),
        ("ensemble", "ensemble", "complete"), ("runs/student-cpu", "student", "complete")]
    mobilenet, lite0, ensemble, student = (by_path(rows)[p] for p in
                                           ("runs/cpu-mobilenet", "runs/cpu-lite0", "ensemble", "runs/student-cpu"))
    assert (mobilenet.recipe, mobilenet.backbone, mobilenet.epochs, mobilenet.params, mobilenet.seconds) == \
        ("recipes/cpu-mobilenet.toml", "mobilenet-0.25", "10", 1_010_000, 414.2)
    assert lite0.recipe == "cpu-lite0"  # no recipe file on the command line (the demo): the recipe's name
    tuned = write_run(outputs / "runs" / "tuned", argv=["cellfuse", "train", f"{outputs}/runs/cpu-mobilenet/recipe.toml",
                                                         "--from", f"{outputs}/runs/cpu-mobilenet"],
                      init_from=f"{outputs}/runs/cpu-mobilenet/best.keras")
    assert read_run(tuned, "runs/tuned").recipe == "from cpu-mobilenet"  # its start, not a path into another run
    blend = write_run(outputs / "runs" / "blend", init_from=f"{outputs}/runs/tuned/wise.keras")  # the demo: no argv
    assert read_run(blend, "runs/blend").recipe == "from tuned/wise.keras"
    # resumed with the run's own recipe snapshot, as the resume hint says: the file as given, not "from tuned"
    resumed = write_run(outputs / "runs" / "resumed", argv=["cellfuse", "train", "runs/resumed/recipe.toml", "--resume"])
    assert read_run(resumed, "runs/resumed").recipe == "runs/resumed/recipe.toml"
    # as set, else the backbone's own size (mobilenet: 128), or the data's 96 where that is over twice as large
    assert (lite0.input_size, mobilenet.input_size, student.input_size) == ("160", "128", "96")
    assert mobilenet.accuracy == {"val": 0.91, "val_corrupt": 0.65}
    assert mobilenet.d4 == {"val": 0.922, "val_corrupt": 0.649}  # measured by the ensemble
    assert student.d4 == {"val": 0.93, "val_corrupt": 0.66}  # measured by distill with the ensemble's views
    assert (ensemble.recipe, ensemble.backbone, ensemble.params) == \
        ("cpu-lite0 + cpu-mobilenet", "efficientnet-lite0 + mobilenet-0.25", 5_260_000 + 1_010_000)
    assert ensemble.accuracy == {"val": 0.95, "val_corrupt": 0.694}
    assert "0.682" in ensemble.note and "val_corrupt" in ensemble.note


def test_an_ensemble_of_runs_elsewhere_still_names_their_backbones(outputs):
    ensemble = collect(outputs / "ensemble")[0]
    assert ensemble.backbone == "efficientnet-lite0 + mobilenet-0.25" and ensemble.params == 6_270_000


def test_only_d4_views_fill_the_d4_columns(tmp_path):
    write_distill(write_run(tmp_path / "student", distill=True), views="d4+shifts")
    (row,) = collect(tmp_path)
    assert row.kind == "student" and row.d4 == {}


def test_unfinished_and_broken_folders_are_rows_not_crashes(tmp_path):
    argv = ["/usr/bin/cellfuse", "train", "recipes/cpu-lite0.toml", "--set", "train.batch_size=32"]
    stopped = write_run(tmp_path / "runs" / "stopped", summary=False, epochs_done=3, argv=argv)
    _age(stopped, HOUR_AGO)
    write_run(tmp_path / "runs" / "running", summary=False, epochs_done=2)
    broken = write_run(tmp_path / "runs" / "broken")
    (broken / "summary.json").write_text('{"name": "broken", "params": ')  # cut off mid-write by hand
    pruned = write_run(tmp_path / "sweep" / "trials" / "t003", summary=False, epochs_done=2)
    (pruned / "stopped.json").write_text(json.dumps({"state": "pruned", "epoch": 2, "epochs_planned": 10,
                                                     "why": "behind the other trials at epoch 2"}))
    predicting = tmp_path / "ensembles" / "half"
    predicting.mkdir(parents=True)
    (predicting / ".cellfuse.json").write_text('{"own": ["predictions.npz"]}')
    (predicting / "predictions.npz").write_bytes(b"")
    failed = tmp_path / "ensembles" / "failed"  # written a moment ago by a command that has since failed
    shutil.copytree(predicting, failed)
    lock_output(tmp_path / "runs" / "running")  # as the commands writing them hold them
    lock_output(predicting)
    rows = by_path(collect(tmp_path))
    release_locks()
    assert rows["runs/stopped"].state == "stopped" and rows["runs/stopped"].epochs == "3/10"
    assert rows["runs/stopped"].seconds == pytest.approx(31.5 + 32.5 + 33.5)  # the epochs it finished
    assert "cellfuse train recipes/cpu-lite0.toml --set train.batch_size=32 --resume" in rows["runs/stopped"].note
    assert rows["runs/running"].state == "running"
    assert rows["runs/broken"].state == "unreadable" and "summary.json: not valid JSON" in rows["runs/broken"].note
    assert (rows["sweep/trials/t003"].state, rows["sweep/trials/t003"].note) == \
        ("pruned", "behind the other trials at epoch 2")
    assert rows["ensembles/half"].kind == "ensemble" and rows["ensembles/half"].state == "running"
    assert rows["ensembles/failed"].state == "stopped", "a failure a minute ago is not a command running"
    assert by_path(collect(tmp_path))["runs/running"].state == "stopped", "its command has ended"


def test_a_student_whose_comparison_did_not_finish_is_not_complete(tmp_path):
    student = write_run(tmp_path / "student", distill=True)
    _age(student, HOUR_AGO)
    (row,) = collect(tmp_path)
    assert (row.kind, row.state) == ("student", "stopped") and "distill.json" in row.note


def test_checkpoints_and_tensorboard_logs_are_not_searched(tmp_path):
    run = write_run(tmp_path / "run")
    write_run(run / "checkpoint" / "not-a-run")
    write_run(run / "tb" / "not-a-run-either")
    assert [r.path for r in collect(tmp_path)] == ["run"]
    (run / "ens").mkdir()  # but an ensemble built inside a run is found (it was missed)
    (run / "ens" / "ensemble.json").write_text("{}")
    assert [(r.path, r.kind) for r in collect(tmp_path)] == [("run", "run"), ("run/ens", "ensemble")]


def test_markdown_table(outputs):
    lines = markdown(collect(outputs)).splitlines()
    assert lines[0] == ("| name | kind | state | recipe | backbone | input | epochs | time | params | val | "
                        "val_corrupt | val d4 | val_corrupt d4 | note |")
    assert lines[1] == "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    assert lines[3] == ("| runs/cpu-mobilenet | run | complete | recipes/cpu-mobilenet.toml | mobilenet-0.25 | 128 | 10 "
                        "| 6.9 min | 1.01 M | 0.910 | 0.650 | 0.922 | 0.649 |  |")
    assert len(lines) == 2 + 4 and all(line.count(" | ") == 13 for line in lines)


def test_command_prints_every_cell_whole_when_piped(outputs):
    long_name = "cpu-mobilenet-" + "x" * 150
    write_run(outputs / "runs" / long_name)
    result = CliRunner().invoke(main, ["runs", str(outputs)])  # not a terminal
    assert result.exit_code == 0, result.output
    assert long_name in result.output and "2-fold cross-fitted 0.682 on val_corrupt, where it was selected" in result.output
    assert "…" not in result.output


def test_command_markdown_then_json_last(outputs):
    result = CliRunner().invoke(main, ["runs", str(outputs), "--markdown", "--json"])
    assert result.exit_code == 0, result.output
    *table, last = result.output.strip().splitlines()
    assert table[0].startswith("| name | kind |") and len(table) == 6
    figures = json.loads(last)
    assert [r["path"] for r in figures["rows"]] == ["runs/cpu-lite0", "runs/cpu-mobilenet", "ensemble",
                                                    "runs/student-cpu"]
    assert figures["rows"][1]["d4"] == {"val": 0.922, "val_corrupt": 0.649}


def test_an_empty_folder_says_so_and_a_missing_one_is_an_error(tmp_path):
    result = CliRunner().invoke(main, ["runs", str(tmp_path), "--json"])
    assert result.exit_code == 0 and "no runs, ensembles or students under" in result.output
    assert len(result.output.strip().splitlines()) == 2  # the message, unwrapped, then the JSON line
    assert json.loads(result.output.strip().splitlines()[-1])["rows"] == []
    result = CliRunner().invoke(main, ["runs", str(tmp_path / "nope")])
    assert result.exit_code == 2 and f"{tmp_path / 'nope'}: does not exist" in result.output


def test_runs_never_imports_tensorflow(outputs):
    code = ("import sys; from click.testing import CliRunner; from toolkit.cli import main; "
            f"r = CliRunner().invoke(main, ['runs', {str(outputs)!r}, '--json']); "
            "print(r.exit_code, 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.split() == ["0", "False", "False"], out.stderr


def _age(folder: Path, seconds: float) -> None:
    """Make a folder look untouched for `seconds` (its files and checkpoint backups too)."""
    then = os.path.getmtime(folder) - seconds
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (then, then))


def test_files_of_an_unexpected_shape_are_reported_in_their_row(outputs):
    (outputs / "ensemble" / "metrics.json").write_text(json.dumps({"members": ["not", "a", "mapping"]}))
    (outputs / "runs" / "cpu-lite0" / "recipe.toml").write_text("name = \n")
    rows = by_path(collect(outputs))
    assert rows["ensemble"].state == "unreadable" and "unexpected content" in rows["ensemble"].note
    assert rows["runs/cpu-lite0"].state == "unreadable" and "recipe.toml: not valid TOML" in rows["runs/cpu-lite0"].note
    assert str(outputs) not in rows["runs/cpu-lite0"].note  # the row names the folder; the note, the file
    assert rows["runs/cpu-mobilenet"].state == "complete"


def test_columns_pick_and_order_the_table_and_name_the_choices(outputs):
    result = CliRunner().invoke(main, ["runs", str(outputs), "--markdown", "--columns", "val_corrupt, name,params"])
    assert result.exit_code == 0, result.output
    header, align, *rows = result.output.strip().splitlines()
    assert header == "| val_corrupt | name | params |" and align == "| ---: | --- | ---: |"
    assert any(row.startswith("| 0.650 | ") and row.endswith("| 1.01 M |") for row in rows), rows
    result = CliRunner().invoke(main, ["runs", str(outputs), "--columns", "name,acc"])
    assert result.exit_code == 2 and "no column 'acc' here" in result.output and "val_corrupt" in result.output
    result = CliRunner().invoke(main, ["runs", str(outputs), "--columns", "name,val,name"])
    assert result.exit_code == 2 and "'name' named twice" in result.output


def _wilson(correct: int, n: int, z: float = 1.959964) -> str:
    """The 95% Wilson interval by its closed form, as the table prints it."""
    p = correct / n
    centre, half = p + z * z / (2 * n), z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return f"({(centre - half) / (1 + z * z / n):.3f}-{(centre + half) / (1 + z * z / n):.3f})"


def test_intervals_come_from_the_image_counts_each_stage_recorded(outputs):
    summary = outputs / "runs" / "cpu-mobilenet" / "summary.json"  # a new run records n in its summary
    record = json.loads(summary.read_text())
    record["metrics"]["val"]["n"], record["metrics"]["val_corrupt"]["n"] = 100, 400
    summary.write_text(json.dumps(record))
    (outputs / "runs" / "cpu-lite0" / "metrics.json").write_text(json.dumps(  # an older one in metrics.json only
        {"val": {"n": 1000, "accuracy": 0.933}, "val_corrupt": {"n": 1000, "accuracy": 0.673}}))
    result = CliRunner().invoke(main, ["runs", str(outputs), "--markdown", "--intervals",
                                       "--columns", "name,val,val_corrupt d4"])
    assert result.exit_code == 0, result.output
    rows = {line.split(" | ")[0].removeprefix("| "): line.split(" | ")[1:] for line in result.output.splitlines()[2:]}
    assert rows["runs/cpu-mobilenet"] == [f"0.910 {_wilson(91, 100)}", f"0.649 {_wilson(13, 20)} |"]
    assert rows["runs/cpu-lite0"][0] == f"0.933 {_wilson(933, 1000)}"
    assert rows["ensemble"][0] == f"0.950 {_wilson(19, 20)}"  # the ensemble's own count: 20 images
    # the d4 figures were measured by the ensemble, on its 20 images, not the runs' 400 or 1000
    assert rows["runs/cpu-lite0"][1] == f"0.692 {_wilson(14, 20)} |"
    assert rows["runs/student-cpu"] == ["0.920", "0.660 |"]  # no count recorded: no interval invented
    (outputs / "runs" / "cpu-lite0" / "metrics.json").write_text("{")  # the intervals' fallback, broken
    (row,) = [r for r in collect(outputs) if r.path == "runs/cpu-lite0"]
    assert row.state == "complete" and row.n == {} and row.accuracy == {"val": 0.933, "val_corrupt": 0.673}
    plain = CliRunner().invoke(main, ["runs", str(outputs), "--markdown", "--columns", "name,val"])
    assert "(" not in plain.output and "0.910" in plain.output
    record["metrics"]["val"]["accuracy"] = 1.5  # hand-edited: shown as written, with no interval to invent
    summary.write_text(json.dumps(record))
    edited = CliRunner().invoke(main, ["runs", str(outputs), "--markdown", "--intervals", "--columns", "name,val"])
    assert edited.exit_code == 0 and "| runs/cpu-mobilenet | 1.500 |" in edited.output, edited.output
