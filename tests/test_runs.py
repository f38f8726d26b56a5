"""What cellfuse may replace: only what it recorded when it wrote it, never an input, never a user's file."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from toolkit.errors import CellfuseError
from toolkit.runs import (
    MANIFEST,
    TMP_PREFIX,
    adopt_library_files,
    atomic_write_text,
    check_new_file,
    fresh_dir,
    is_being_written,
    is_own,
    load_weights,
    lock_output,
    make_own_dir,
    release_locks,
    remove_own,
    save_weights,
    write_csv,
    write_json,
    writer_of,
)


def test_fresh_dir_replaces_its_own_folder_only_with_force(tmp_path):
    out = fresh_dir(tmp_path / "out")
    write_json(out / "a.json", {"x": 1})
    write_json(out / "sub" / "b.json", {"y": 2})  # a subfolder cellfuse made is its own too
    with pytest.raises(CellfuseError, match="--force"):
        fresh_dir(out)
    fresh_dir(out, force=True)
    assert [p.name for p in out.iterdir()] == [MANIFEST]


def test_fresh_dir_refuses_a_folder_it_did_not_write_whatever_the_flags(tmp_path):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "data.npz").write_bytes(b"precious")
    for force in (False, True):
        with pytest.raises(CellfuseError, match="theirs"):
            fresh_dir(tmp_path / "theirs", force=force)
    assert (tmp_path / "theirs" / "data.npz").read_bytes() == b"precious"
    assert not (tmp_path / "theirs" / MANIFEST).exists()  # a refused command claims nothing


def test_a_folder_of_another_kind_is_never_replaced(tmp_path):
    clean = fresh_dir(tmp_path / "clean", kind="clean")
    write_json(clean / "report.json", {})
    with pytest.raises(CellfuseError, match="clean output, not a run"):
        fresh_dir(clean, force=True, kind="run")
    assert (clean / "report.json").exists()


def test_an_empty_user_folder_is_filled_and_emptied_but_never_deleted(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    write_json(fresh_dir(mine) / "a.json", {})
    remove_own(mine)
    assert mine.is_dir() and [p.name for p in mine.iterdir()] == [MANIFEST]


def test_a_user_file_added_to_a_cellfuse_folder_blocks_force(tmp_path):
    out = fresh_dir(tmp_path / "out")
    write_json(out / "report.json", {})
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CellfuseError, match="notes.txt"):
        fresh_dir(out, force=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.json").exists()


def test_hidden_temporary_files_are_cellfuse_s_only_when_named_as_it_names_them(tmp_path):
    out = fresh_dir(tmp_path / "out")
    (out / f"{TMP_PREFIX}a.json.x1.tmp").write_text("left by a crash")
    fresh_dir(out, force=True)  # its own leftover: gone
    (out / ".draft.tmp").write_text("the user's")
    with pytest.raises(CellfuseError, match=".draft.tmp"):
        fresh_dir(out, force=True)


def test_files_a_library_wrote_are_cellfuse_s_as_they_were_adopted(tmp_path):
    run = fresh_dir(tmp_path / "run", kind="run")
    tb = make_own_dir(run / "tb", "part")
    (tb / "train").mkdir()
    (tb / "train" / "events.out").write_bytes(b"tb")
    adopt_library_files(tb)
    (tb / "train" / "my_notes.txt").write_text("added later")  # never adopted
    with pytest.raises(CellfuseError, match="my_notes.txt"):
        fresh_dir(run, force=True, kind="run")
    (tb / "train" / "my_notes.txt").unlink()
    fresh_dir(run, force=True, kind="run")
    assert not tb.exists()


def test_an_input_inside_the_output_is_refused_even_when_it_is_empty_otherwise(tmp_path):
    out = fresh_dir(tmp_path / "out")
    data = out / "mydata.npz"
    data.write_bytes(b"the user's data")
    with pytest.raises(CellfuseError, match="mydata.npz"):
        fresh_dir(out, force=True, inputs=[data])
    assert data.read_bytes() == b"the user's data"


def test_a_symlinked_out_is_refused_not_followed(tmp_path):
    target = fresh_dir(tmp_path / "real")
    write_json(target / "a.json", {})
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(CellfuseError, match="symbolic link"):
        fresh_dir(tmp_path / "link", force=True)
    assert (target / "a.json").exists()


def test_check_new_file_replaces_only_files_cellfuse_wrote(tmp_path):
    mine = tmp_path / "report.json"
    write_json(mine, {"a": 1})
    assert is_own(mine)
    check_new_file(mine, ".json", force=True)  # its own: may be replaced
    with pytest.raises(CellfuseError, match="--force"):
        check_new_file(mine, ".json", force=False)
    theirs = tmp_path / "theirs.json"
    theirs.write_text("{}")
    with pytest.raises(CellfuseError, match="not written by cellfuse"):
        check_new_file(theirs, ".json", force=True)
    with pytest.raises(CellfuseError, match="not written by cellfuse"):  # the last guard, under every writer
        write_json(theirs, {})
    assert theirs.read_text() == "{}"
    with pytest.raises(CellfuseError, match="also an input"):
        check_new_file(mine, ".json", force=True, inputs=[mine])
    manifest = json.loads((tmp_path / MANIFEST).read_text())  # claims no folder, and names who wrote it
    assert manifest["own"] == ["report.json"] and manifest["writers"] == {"report.json": "(python)"}
    assert manifest["stamps"]["report.json"][0] == mine.stat().st_size  # in your folder: its size and time too
    with pytest.raises(CellfuseError, match="not a directory"):
        check_new_file(mine / "x.npz", ".npz", force=False)


def test_force_replaces_a_file_only_for_the_command_that_wrote_it(tmp_path):
    preds = check_new_file(tmp_path / "p.csv", ".csv", force=False, writer="predict")
    write_csv(preds, [{"a": 1}])
    assert writer_of(preds) == "predict"
    check_new_file(preds, ".csv", force=True, writer="predict")  # its own earlier output: replaceable
    with pytest.raises(CellfuseError, match=r"p.csv: was written by `cellfuse predict`.*choose another --out"):
        check_new_file(preds, ".csv", force=True, writer="export")
    run = make_own_dir(tmp_path / "run", "run")
    write_csv(run / "history.csv", [{"epoch": 1}])  # the folder's command's file: train's
    with pytest.raises(CellfuseError, match=r"history.csv: belongs to a run output of `cellfuse train`, so "
                                            r"`cellfuse predict` will not replace it"):
        check_new_file(run / "history.csv", ".csv", force=True, writer="predict")
    write_csv(run / "history.csv", [{"epoch": 2}])  # train itself still rewrites it every epoch
    assert "2" in (run / "history.csv").read_text()


def test_the_last_guard_refuses_a_write_over_another_command_s_file(tmp_path):
    """A write under check_new_file's claim never lands on a file the claim did not check."""
    run = make_own_dir(tmp_path / "run", "run")
    write_csv(run / "history.csv", [{"epoch": 1}])
    check_new_file(run / "p.csv", ".csv", force=False, writer="predict")
    write_csv(run / "p.csv", [{"a": 1}])
    release_locks()  # the command is over: its claims go with its locks
    with pytest.raises(CellfuseError, match="written by `cellfuse predict`"):
        write_csv(run / "p.csv", [{"epoch": 1}])  # the run's own writes never replace predict's file
    assert "a" in (run / "p.csv").read_text()


def test_files_recorded_before_writers_were_are_their_folder_s(tmp_path):
    """Manifests written by an older cellfuse have no writers: a run's files stay train's, and a lone
    file in a user's folder is nobody's to replace."""
    run = make_own_dir(tmp_path / "run", "run")
    (run / "history.csv").write_text("epoch\n1\n")
    (run / MANIFEST).write_text(json.dumps({"kind": "run", "own": ["history.csv"]}))
    with pytest.raises(CellfuseError, match="belongs to a run output"):
        check_new_file(run / "history.csv", ".csv", force=True, writer="predict")
    (tmp_path / "old.csv").write_text("source\n")
    (tmp_path / MANIFEST).write_text(json.dumps({"own": ["old.csv"]}))
    with pytest.raises(CellfuseError, match="old.csv: was recorded by an older cellfuse"):
        check_new_file(tmp_path / "old.csv", ".csv", force=True, writer="predict")
    assert (tmp_path / "old.csv").read_text() == "source\n"


def test_a_user_file_deep_inside_a_cellfuse_folder_blocks_force(tmp_path):
    out = fresh_dir(tmp_path / "demo", kind="demo")
    run = make_own_dir(out / "runs" / "tiny", "run")  # runs/ made on the way, inside a cellfuse folder
    write_json(run / "summary.json", {})
    fresh_dir(out, force=True, kind="demo")  # everything cellfuse's: replaced
    run = make_own_dir(out / "runs" / "tiny", "run")
    (run / "my_notes.txt").write_text("mine")
    with pytest.raises(CellfuseError, match="my_notes.txt"):
        fresh_dir(out, force=True, kind="demo")
    assert (run / "my_notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- one writer per output

HOLD = """
import sys, time
from toolkit.runs import lock_output
lock_output(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_s_lock_is_taken(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert is_being_written(out), "`cellfuse runs` sees the other process writing"
        with pytest.raises(CellfuseError, match=f"in use by another cellfuse command \\(PID {holder.pid}"):
            fresh_dir(out)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert not is_being_written(out), "a dead process writes nothing"
    deadline = time.time() + 10
    while True:  # the kernel drops a dead process's lock
        try:
            fresh_dir(out)
            break
        except CellfuseError:
            assert time.time() < deadline
            time.sleep(0.1)
    release_locks()


def test_locks_are_per_path_and_held_again_after_release(tmp_path):
    lock_output(tmp_path / "a")
    lock_output(tmp_path / "a")  # the same process: already held
    release_locks()
    probe = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(60)", ""), str(tmp_path / "a")],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr


# ---------------------------------------------------------------- checkpoints by name

def _dense_model(order):
    import keras

    inputs = keras.Input((3,))
    layers = {"first": keras.layers.Dense(3, name="first"), "second": keras.layers.Dense(3, name="second")}
    x = inputs
    for name in order:
        x = layers[name](x)
    return keras.Model(inputs, x)


def test_a_checkpoint_loads_by_layer_name_whatever_the_order(tmp_path):
    saved = _dense_model(["first", "second"])
    save_weights(saved, tmp_path / "w.weights.h5")
    swapped = _dense_model(["second", "first"])  # equal shapes: positions would load the wrong weights
    load_weights(swapped, tmp_path / "w.weights.h5")
    for name in ("first", "second"):
        for a, b in zip(saved.get_layer(name).get_weights(), swapped.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


def _unnamed_model():
    """Like ConvNeXt's top: a layer and a variable created without names, which Keras numbers
    process-wide, so every build names them differently."""
    import keras

    class Scale(keras.layers.Layer):
        def build(self, shape):
            self.gamma = self.add_weight(shape=shape[-1:], initializer="random_normal")

        def call(self, x):
            return x * self.gamma

    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.LayerNormalization()(Scale(name="scale")(inputs)))


def test_a_model_rebuilt_in_the_same_process_loads_its_own_checkpoint(tmp_path):
    saved, rebuilt = _unnamed_model(), _unnamed_model()
    assert [v.path for v in saved.weights] != [v.path for v in rebuilt.weights]  # what Keras does
    save_weights(saved, tmp_path / "w.weights.h5")
    load_weights(rebuilt, tmp_path / "w.weights.h5")
    for a, b in zip(saved.get_weights(), rebuilt.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    import keras

    save_weights(_dense_model(["first", "second"]), tmp_path / "w.weights.h5")
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, name="first")])
    with pytest.raises(CellfuseError, match="does not fit this model"):
        load_weights(other, tmp_path / "w.weights.h5")


def test_read_history_gives_floats_and_survives_a_damaged_file(tmp_path):
    from toolkit.runs import read_history

    assert read_history(tmp_path) == []  # before the first epoch
    (tmp_path / "history.csv").write_text("epoch,loss,note\n1,2.08,\n2,1.5,x\n")
    assert read_history(tmp_path) == [{"epoch": 1.0, "loss": 2.08}, {"epoch": 2.0, "loss": 1.5}]
    (tmp_path / "history.csv").write_bytes(b"\xff\xfe\x00bad")
    assert read_history(tmp_path) == []


def test_a_resumed_recipe_may_spell_its_files_differently_but_not_change_them(tmp_path, monkeypatch):
    """`demo --resume` from another spelling of --out writes the same files as absolute or relative paths."""
    from toolkit.runs import changed_keys

    monkeypatch.chdir(tmp_path)
    (tmp_path / "clean.npz").write_bytes(b"x")
    (tmp_path / "other.npz").write_bytes(b"y")
    old = {"data": {"train": "clean.npz", "extra_val": ["clean.npz", "other.npz"]}, "train": {"seed": 2}}
    same = {"data": {"train": str(tmp_path / "clean.npz"), "extra_val": [str(tmp_path / "clean.npz"), "./other.npz"]},
            "train": {"seed": 2}}
    assert changed_keys(old, same) == []
    moved = {"data": {"train": "other.npz", "extra_val": ["clean.npz"]}, "train": {"seed": 3}}
    assert changed_keys(old, moved) == ["data.extra_val: ['clean.npz', 'other.npz'] -> ['clean.npz']",
                                        "data.train: 'clean.npz' -> 'other.npz'", "train.seed: 2 -> 3"]
    assert changed_keys({"x": "missing.npz"}, {"x": str(tmp_path / "missing.npz")}) != []  # no file: by spelling


def test_a_damaged_recipe_snapshot_is_named_when_a_run_resumes(tmp_path):
    from toolkit.recipe import load_recipe
    from toolkit.runs import atomic_write_text, check_same_recipe

    run = make_own_dir(tmp_path / "tiny", "run")
    atomic_write_text(run / "recipe.toml", "this is [[ not toml")
    with pytest.raises(CellfuseError, match=r"tiny/recipe.toml: unreadable .*restore the file, or --force"):
        check_same_recipe(run, load_recipe("tiny"))


def test_a_place_that_takes_no_file_is_one_line_before_any_work(tmp_path, monkeypatch):
    """`export RUN --out /proc/x.zip` was a traceback from the first write, after TensorFlow loaded."""
    import tempfile

    from toolkit.runs import check_new_file, check_output_folder

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(CellfuseError, match=r"x.zip: cannot write into .* \(Permission denied\)"):
        check_new_file(tmp_path / "new" / "x.zip", ".zip", False)
    with pytest.raises(CellfuseError, match=r"out: cannot write into .* \(Permission denied\)"):
        check_output_folder(tmp_path / "out", False)
    monkeypatch.setattr(tempfile, "mkstemp", read_only)  # and if it turns read-only while the work runs
    with pytest.raises(CellfuseError, match=r"late.json: cannot write it \(Permission denied\)"):
        atomic_write_text(tmp_path / "late.json", "{}")
    release_locks()


def test_a_folder_of_yours_holding_cellfuse_s_files_is_named_as_such(tmp_path):
    """`ensemble --out SPLIT_FOLDER --force` said the folder "was not made by cellfuse", though `split`
    had written every file in it: the refusal was right, its reason wrong."""
    out = tmp_path / "split"
    write_json(out / "val.json", {})  # as `split` writes val.npz into a folder it does not own
    release_locks()
    with pytest.raises(CellfuseError, match=r"split: is a folder of yours holding files cellfuse wrote \(val.json\), "
                                            "not an output folder it made, so it will not be replaced"):
        fresh_dir(out, force=True, kind="ensemble")
    assert (out / "val.json").is_file()
    release_locks()


def test_remove_own_file_deletes_only_an_unchanged_file_of_the_named_writer(tmp_path):
    from toolkit.runs import remove_own_file

    mine = check_new_file(tmp_path / "v.npz", ".npz", False, writer="split")
    atomic_write_text(mine, "x")
    release_locks()
    assert not remove_own_file(mine, writer="corrupt") and mine.exists()
    (tmp_path / "theirs.txt").write_text("the user's")
    assert not remove_own_file(tmp_path / "theirs.txt") and (tmp_path / "theirs.txt").exists()
    assert remove_own_file(mine, writer="split") and not mine.exists()
