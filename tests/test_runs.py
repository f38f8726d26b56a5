"""What cellfuse may replace: only what it wrote itself, never an input, never a user's file."""

import json

import pytest

from toolkit.errors import CellfuseError
from toolkit.runs import MANIFEST, check_new_file, fresh_dir, is_own, write_json


def test_fresh_dir_replaces_its_own_folder_only_with_force(tmp_path):
    out = fresh_dir(tmp_path / "out")
    write_json(out / "a.json", {"x": 1})
    write_json(out / "sub" / "b.json", {"y": 2})  # a subfolder cellfuse filled is its own too
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


def test_a_user_file_added_to_a_cellfuse_folder_blocks_force(tmp_path):
    out = fresh_dir(tmp_path / "out")
    write_json(out / "report.json", {})
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CellfuseError, match="notes.txt"):
        fresh_dir(out, force=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.json").exists()


def test_an_input_inside_the_output_is_refused_even_when_it_is_empty_otherwise(tmp_path):
    out = fresh_dir(tmp_path / "out")
    data = out / "mydata.npz"
    data.write_bytes(b"the user's data")
    with pytest.raises(CellfuseError, match="mydata.npz"):
        fresh_dir(out, force=True, inputs=[data])
    assert data.read_bytes() == b"the user's data"


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
    with pytest.raises(CellfuseError, match="also an input"):
        check_new_file(mine, ".json", force=True, inputs=[mine])
    assert json.loads((tmp_path / MANIFEST).read_text())["own"] == ["report.json"]


def test_a_user_file_deep_inside_a_cellfuse_folder_blocks_force(tmp_path):
    from toolkit.runs import record_own

    def train_run(out):  # as train.prepare_run_dir makes it: runs/ and the run recorded, the run its own
        record_own(out / "runs")
        record_own(out / "runs" / "tiny")
        return fresh_dir(out / "runs" / "tiny")

    out = fresh_dir(tmp_path / "demo")
    write_json(train_run(out) / "summary.json", {})
    fresh_dir(out, force=True)  # everything cellfuse's: replaced
    run = train_run(out)
    (run / "my_notes.txt").write_text("mine")
    with pytest.raises(CellfuseError, match="my_notes.txt"):
        fresh_dir(out, force=True)
    assert (run / "my_notes.txt").read_text() == "mine"
