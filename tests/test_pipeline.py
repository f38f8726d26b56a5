"""The whole pipeline end to end through the CLI's functions, on tiny synthetic data and recipes."""

import json
from pathlib import Path

from rich.console import Console

from toolkit.pipeline import (
    CLOSE_POINTS,
    CLOSER_BY,
    climb,
    points_behind,
    run_pipeline,
)
from toolkit.synth import write_synthetic

ROOT = Path(__file__).parents[1]


def test_synth_to_graded_submission(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_synthetic(tmp_path / "synth.npz", n=300, seed=3, console=Console(quiet=True))
    members = []
    for name in ("a",):  # one member: its tuned copy and WiSE blend make three candidates
        path = tmp_path / f"{name}.toml"
        path.write_text((ROOT / "recipes" / "tiny.toml").read_text().replace('name = "tiny"', f'name = "{name}"'))
        members.append(path)
    students = []
    for name in ("student", "student-big"):
        path = tmp_path / f"{name}.toml"
        path.write_text((ROOT / "recipes" / "tiny.toml").read_text().replace('name = "tiny"', f'name = "{name}"')
                        + '\n[distill]\nmode = "cached"\n')
        students.append(path)
    # no rung is ever close enough: the ladder distils both and ships the closest (by a margin)
    monkeypatch.setattr("toolkit.pipeline.CLOSE_POINTS", -100.0)
    console = Console(record=True, width=160)
    figures = run_pipeline(data, tmp_path / "out", None, console, members=members, students=students)
    out = tmp_path / "out"
    planted = json.loads(Path(str(data).replace(".npz", ".planted.json")).read_text())["planted"]
    assert figures["clean"]["repeated_noncell"] == len(planted["repeated_noncell"])
    assert figures["clean"]["exact_duplicate"] >= len(planted["exact_duplicate"]) - 2
    for path in ("clean/clean.npz", "clean/val_corrupt.npz", "runs/a/best.keras",
                 "runs/a-tuned/best.keras", "runs/a-tuned/wise.keras",
                 "ensemble/ensemble.keras", "runs/student/best.keras", "runs/student-big/distill.json",
                 "submission.zip"):
        assert (out / path).exists(), path
    # both rungs distilled and recorded with how far behind their teacher they ended
    behind = {name: points_behind(json.loads((out / "runs" / name / "distill.json").read_text()))
              for name in ("student", "student-big")}
    assert figures["ladder"] == [{"student_run": str(out / "runs" / name), "points_behind": behind[name]}
                                 for name in ("student", "student-big")]
    # the larger rung ships only when closer by more than CLOSER_BY
    shipped = out / "runs" / ("student-big" if round(behind["student"] - behind["student-big"], 1) > CLOSER_BY
                              else "student")
    assert figures["distill"]["student_run"] == str(shipped)
    # the graded zip predicts exactly what the student run does, with the views the pipeline chose for
    # it, on the graded (corrupted validation) file
    import numpy as np

    from toolkit.evaluate import evaluate_model
    from toolkit.export import submission_views

    graded_file = out / "clean" / "val_corrupt.npz"
    tta = figures["export"]["tta"]
    assert tta == submission_views(json.loads((shipped / "metrics.json").read_text()), figures["distill"])
    student_metrics = evaluate_model(shipped, [graded_file], tta=tta, console=Console(quiet=True))
    assert figures["grade"]["accuracy"] == student_metrics[str(graded_file)]["accuracy"]
    # the split files hold the rows every member held out (tiny.toml's 25%, not split's default 15%)
    ensemble = json.loads((out / "ensemble" / "ensemble.json").read_text())
    assert ensemble["val_index"] == sorted(np.load(out / "clean" / "val.npz")["index"].tolist())
    text = " ".join(console.export_text().split())  # as printed, but for where rich wrapped its lines
    # each member's corruption-tuned copy starts from it and trains on corrupted images (the ensemble's candidates)
    tuned = json.loads((out / "runs" / "a-tuned" / "summary.json").read_text())
    ensemble_members = json.loads((out / "ensemble" / "metrics.json").read_text())["members"]
    assert {"a", "a-tuned", "a-tuned-wise"} == set(ensemble_members)
    copy = (out / "runs" / "a-tuned" / "recipe.toml").read_text()
    assert "corrupt_fraction = 0.5" in copy and str(out / "runs" / "a" / "best.keras") in copy
    assert tuned["wise"] is not None
    for stage in ("clean", "train a.toml", "tune a", "ensemble", "distill student.toml", "distill student-big.toml",
                  "export", "grade", f"student: {shipped.name}, ", "distilled 2 of 2"):
        assert stage in text

    # interrupted during the last rung: resuming keeps every finished stage and distils only that rung
    import shutil

    kept = {f: (out / f).stat().st_mtime_ns for f in ("clean/report.json", "clean/val_heldout.npz",
                                                      "runs/a/summary.json", "runs/a-tuned/wise.keras",
                                                      "ensemble/metrics.json", "runs/student/summary.json")}
    shutil.rmtree(out / "runs" / "student-big")
    console = Console(record=True, width=160)
    resumed = run_pipeline(data, out, None, console, members=members, students=students, force=True, resume=True)
    assert {f: (out / f).stat().st_mtime_ns for f in kept} == kept
    assert (out / "runs" / "student-big" / "summary.json").is_file()
    assert [r["student_run"] for r in resumed["ladder"]] == [r["student_run"] for r in figures["ladder"]]
    assert resumed["ensemble"] == figures["ensemble"] and resumed["clean"] == figures["clean"]
    text = " ".join(console.export_text().split())
    assert text.count("(kept from before)") == 2 and text.count("already complete") == 3  # a, a-tuned, 1 student


def test_the_ladder_ships_the_first_rung_within_a_point_else_the_closest():
    """Rungs are distilled smallest first until one is within CLOSE_POINTS of its teacher on clean and
    held-out validation (rounded as distill prints); the cellfuse-mix gap does not count. With none
    within, a larger rung ships only when closer by more than CLOSER_BY."""
    assert (CLOSE_POINTS, CLOSER_BY) == (1.0, 0.5)

    def rung(name, val, heldout, corrupt=0.0):
        return {"student_run": name, "gap": {"val": val, "val_corrupt": corrupt, "val_heldout": heldout}}

    def run(*rungs):
        asked = []

        def distill_rung(r):
            asked.append(r["student_run"])
            return r
        shipped, tried, failed = climb(rungs, distill_rung)
        assert failed == []
        assert [r["student_run"] for r in tried] == asked  # every distilled rung's figures, in order
        return shipped["student_run"], asked

    close, far, farther = rung("small", 0.004, 0.0100, corrupt=0.09), rung("mid", 0.013, 0.021), rung("big", 0.012, 0.025)
    assert points_behind(close) == 1.0 and points_behind(far) == 2.1  # 0.0100 rounds to 1.0: within
    assert run(close, far) == ("small", ["small"])  # within at once: the larger rung is never trained
    assert run(far, close) == ("small", ["mid", "small"])
    assert run(far, farther) == ("mid", ["mid", "big"])  # none within: the closest
    assert run(farther, far) == ("big", ["big", "mid"])  # the larger rung is only 0.4 closer: the smaller ships
    assert run(far, rung("level", 0.021, -0.01)) == ("mid", ["mid", "level"])  # a tie: the smaller rung
    assert run(rung("a", 0.026, 0.0), far) == ("a", ["a", "mid"])  # 0.5 closer is not enough
    assert run(rung("a", 0.027, 0.0), far) == ("mid", ["a", "mid"])  # 0.6 closer is
    assert run(rung("a", 0.04, 0.0), far, farther) == ("mid", ["a", "mid", "big"])  # the closest of three
    # 9 of 899 images (1.001 points) prints as 1.0 and counts as within; 10 of 899 does not
    assert run(rung("a", 9 / 899, 0.0), far) == ("a", ["a"])
    assert run(rung("a", 10 / 899, 0.0), far)[1] == ["a", "mid"]


def test_a_failed_rung_is_skipped_but_a_failed_first_rung_stops_the_pipeline():
    import pytest

    from toolkit.errors import CellfuseError

    def distill_rung(r):
        if r["student_run"].startswith("broken"):
            raise CellfuseError(f"{r['student_run']}: no weights here")
        return r

    small, mid = ({"student_run": name, "gap": {"val": 0.02, "val_heldout": gap}} for name, gap in
                  (("small", 0.03), ("mid", 0.024)))
    broken = {"student_run": "broken"}
    shipped, tried, failed = climb([small, broken, mid], distill_rung)
    assert (shipped, tried, failed) == (mid, [small, mid], [(broken, "broken: no weights here")])  # the closer
    with pytest.raises(CellfuseError, match="broken: no weights"):
        climb([broken, small], distill_rung)
    with pytest.raises(CellfuseError, match="compared no val_heldout"):  # never judged on fewer sets
        points_behind({"student_run": "s", "gap": {"val": 0.0}})


def test_runs_named_alike_are_refused_before_training():
    """A member named like another member's tuned copy, or two student rungs (or a rung and a member)
    of one name, would share a run folder."""
    import pytest

    from toolkit.errors import CellfuseError
    from toolkit.pipeline import STUDENT_LADDER, check_run_names

    check_run_names(["cpu-lite0", "cpu-mobilenet"], list(STUDENT_LADDER))
    for members, students, taken in ((["a", "a-tuned"], [], "a-tuned"), (["a", "b", "a"], [], "a, a-tuned"),
                                     (["a"], ["s", "s"], "s"), (["a"], ["a-tuned"], "a-tuned")):
        with pytest.raises(CellfuseError, match=f"one folder \\({taken};"):
            check_run_names(members, students)


def test_a_demo_resumes_only_its_own_folder_on_its_own_data(tmp_path):
    import numpy as np
    import pytest

    from toolkit.errors import CellfuseError
    from toolkit.pipeline import demo_folder
    from toolkit.runs import write_json

    data = tmp_path / "train.npz"
    np.savez(data, images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.zeros((2, 1)))
    out = demo_folder(tmp_path / "demo", data, 100, force=False, resume=True)  # nothing to resume: a new demo
    write_json(out / "progress.json", {"stage": "done"})  # a stage's output (cellfuse's own)
    assert demo_folder(out, data, 100, force=False, resume=True) == out
    assert (out / "progress.json").exists()  # kept
    with pytest.raises(CellfuseError, match="began on .*train.npz.*--resume continues a demo on its own data"):
        demo_folder(out, None, 100, force=False, resume=True)
    np.savez(data, images=np.ones((2, 4, 4, 3), np.uint8), labels=np.zeros((2, 1)))  # same name, new content
    with pytest.raises(CellfuseError, match="its own data"):
        demo_folder(out, data, 100, force=False, resume=True)
    assert demo_folder(out, data, 100, force=True, resume=True) == out  # --force starts over
    assert not (out / "progress.json").exists()
    (out / "demo.json").unlink()  # cut off right after the folder was made: nothing there to resume but that
    assert demo_folder(out, data, 100, force=False, resume=True) == out and (out / "demo.json").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    with pytest.raises(CellfuseError, match="not made by cellfuse"):
        demo_folder(mine, data, 100, force=True, resume=True)
    assert (mine / "notes.txt").read_text() == "the user's"
    with pytest.raises(CellfuseError, match="is an input, and it lies inside the output"):
        demo_folder(tmp_path, data, 100, force=True, resume=True)
    inside = out / "train.npz"  # a demo resumed on a file under its own folder would replace it
    inside.write_bytes(data.read_bytes())
    with pytest.raises(CellfuseError, match="is an input, and it lies inside the output"):
        demo_folder(out, inside, 100, force=True, resume=True)


def test_split_writes_the_held_out_rows_clean_and_corrupted(tiny_npz, tmp_path):
    import numpy as np
    from click.testing import CliRunner

    from toolkit.cli import main
    from toolkit.data import load_dataset, stratified_split

    result = CliRunner().invoke(main, ["split", str(tiny_npz), "--out", str(tmp_path / "v"), "--val-fraction", "0.25"])
    assert result.exit_code == 0, result.output
    full = load_dataset(tiny_npz)
    _, rows = stratified_split(full.labels, 0.25, 0)
    val, corrupt = load_dataset(tmp_path / "v" / "val.npz"), load_dataset(tmp_path / "v" / "val_corrupt.npz")
    np.testing.assert_array_equal(val.index, rows)
    np.testing.assert_array_equal(val.images, full.images[rows])
    np.testing.assert_array_equal(corrupt.labels, val.labels)
    assert np.abs(corrupt.images.astype(int) - val.images).mean() > 5
    # and a copy corrupted by the held-out families (none of them in any preset or in val_corrupt's mix)
    from toolkit.corrupt import corrupt_images

    held = load_dataset(tmp_path / "v" / "val_heldout.npz")
    np.testing.assert_array_equal(held.index, rows)
    np.testing.assert_array_equal(held.images, corrupt_images(val.images, 3, 2, families="held-out"))


def test_split_never_overwrites_without_force_and_never_its_input(tiny_npz, tmp_path):
    from click.testing import CliRunner

    from toolkit.cli import main

    out = tmp_path / "v"
    args = ["split", str(tiny_npz), "--out", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    before = (out / "val.npz").read_bytes()
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "--force" in result.output and (out / "val.npz").read_bytes() == before
    # its own input is never an output, whatever the flags
    own_input = out / "val.npz"
    result = CliRunner().invoke(main, ["split", str(own_input), "--out", str(out), "--force", "--val-fraction", "0.5"])
    assert result.exit_code != 0 and "input" in result.output and own_input.read_bytes() == before
    # a new split without held-out families takes away the old one's val_heldout.npz, which no longer matches
    assert (out / "val_heldout.npz").is_file()
    result = CliRunner().invoke(main, [*args, "--force", "--seed", "1", "--families", ""])
    assert result.exit_code == 0 and not (out / "val_heldout.npz").exists()


def test_demo_refuses_data_inside_its_output_folder(tmp_path):
    """`cellfuse demo --out DIR --data DIR/mydata.npz --force` once deleted the user's data."""
    from click.testing import CliRunner

    from toolkit.cli import main

    out = tmp_path / "demo"
    out.mkdir()
    data = out / "mydata.npz"
    data.write_bytes(b"the user's only copy")
    (out / "other.txt").write_text("also theirs")
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--data", str(data), "--force"])
    assert result.exit_code != 0 and "mydata.npz" in result.output
    assert data.read_bytes() == b"the user's only copy" and (out / "other.txt").exists()
