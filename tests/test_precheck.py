"""Bad input is refused before TensorFlow is imported: one "Error:" line, status 2, in a second.

Every case runs in one fresh interpreter in which importing tensorflow or keras fails and is
recorded, so a check that comes too late shows as a recorded import (and an internal failure),
whatever the machine's speed. One case with good input shows that the trap does catch the import.
"""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import stand_in_model

from toolkit.recipe import load_recipe
from toolkit.runs import atomic_write_text, make_own_dir, release_locks

ROOT = Path(__file__).parents[1]

# Runs in the fresh interpreter: cases (argument lists) on stdin, one result per case on stdout.
TRAPPED = r"""
import importlib.abc, json, sys

imported = []


class Trap(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("tensorflow", "keras"):
            imported.append(name)
            raise ImportError(f"{name} imported before the inputs were checked")


sys.meta_path.insert(0, Trap())
from click.testing import CliRunner
from toolkit.cli import main

results = []
for args in json.load(sys.stdin):
    imported.clear()
    result = CliRunner().invoke(main, args)
    results.append({"status": result.exit_code, "output": result.output, "imported": list(imported)})
print(json.dumps(results))
"""


def run_trapped(cases: list[list[str]]) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", TRAPPED], input=json.dumps(cases), capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def places(tmp_path, tiny_npz):
    """Files and folders the cases name: good and bad data, a stand-in model, folders of each kind."""
    bad_labels = tmp_path / "labels9.npz"
    np.savez(bad_labels, images=np.zeros((2, 96, 96, 3), np.uint8), labels=np.array([0, 9]))
    (tmp_path / "bad.npz").write_text("not a zip")
    stand_in_model(tmp_path / "m.keras")
    (tmp_path / "damaged.keras").write_bytes(b"8 bytes!")
    with zipfile.ZipFile(tmp_path / "hollow.keras", "w") as archive:  # a zip, but not one Keras wrote
        archive.writestr("notes.txt", "x")
    flipped = stand_in_model(tmp_path / "flipped.keras")  # a Keras-shaped zip whose weights fail their checksum
    with zipfile.ZipFile(flipped, "w") as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("model.weights.h5", b"WEIGHTS" * 20)
    flipped.write_bytes(flipped.read_bytes().replace(b"WEIGHTSWEIGHTS", b"WEIGHTSWEIGHTs", 1))
    (tmp_path / "sub.zip").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "user" / "tiny").mkdir(parents=True)  # the user's folder where a run would go
    (tmp_path / "user" / "notes.txt").write_text("mine")
    (tmp_path / "ens").mkdir()
    stand_in_model(tmp_path / "ens" / "ensemble.keras")
    (tmp_path / "ens" / "ensemble.json").write_text("{}")
    (tmp_path / "ens" / "metrics.json").write_text(json.dumps({"members": {"m0": "m0.keras"}}))
    (tmp_path / "taken.csv").write_text("x")
    shutil.copy(ROOT / "recipes" / "tiny.toml", tmp_path / "copy.toml")  # a user's copy, its name unchanged
    make_own_dir(tmp_path / "runs", "runs")
    make_own_dir(tmp_path / "runs" / "tiny", "run")  # an earlier run of recipes/tiny.toml
    atomic_write_text(tmp_path / "runs" / "tiny" / "recipe.toml", load_recipe("tiny", [f"data.train={tiny_npz}"]).to_toml())
    release_locks()
    return {"T": tmp_path, "good": tiny_npz, "bad": tmp_path / "bad.npz", "labels9": bad_labels,
            "model": tmp_path / "m.keras", "missing": tmp_path / "missing", "empty": tmp_path / "empty"}


def cases(p) -> list[tuple[list, str]]:
    """(arguments, what the one error line says)."""
    T, good, bad, model, missing = p["T"], p["good"], p["bad"], p["model"], p["missing"]
    on = ["--set", f"data.train={good}"]
    return [
        (["train", "recipes/nope.toml"], "does not exist"),
        (["train", "tiny", "--set", "train.epocs=3"], "did you mean 'epochs'"),
        (["train", "tiny", "--set", f"data.train={missing}.npz", "--out", T / "r"], "missing.npz: does not exist"),
        (["train", "tiny", "--set", f"data.train={bad}", "--out", T / "r"], "not a readable .npz"),
        (["train", "tiny", "--set", "data.train=", "--out", T / "r"], "an empty path (data.train of "),
        (["train", "tiny", "--set", f"data.train={p['labels9']}", "--out", T / "r"], "labels"),
        (["train", "tiny", *on, "--set", "model.backbone=resnet5O", "--out", T / "r"], "unknown backbone"),
        (["train", "tiny", *on, "--out", T / "runs"], "already exists; --resume to continue it"),
        (["train", "tiny", *on, "--out", T / "runs", "--resume", "--set", "train.batch_size=5"],
         "the recipe changed since this run started (train.batch_size: "),
        (["train", "tiny", *on, "--set", "model.weights=imagnet", "--out", T / "r"], "did you mean 'imagenet'?"),
        (["train", "tiny", *on, "--set", f"train.init_from={missing}", "--out", T / "r"],
         "does not exist (train.init_from of"),
        (["train", "tiny", *on, "--from", T / "damaged.keras", "--out", T / "r"], "not a readable .keras model"),
        (["train", T / "copy.toml", "tiny", *on, "--out", T / "r"], "both name their run 'tiny'"),
        (["train", "tiny", *on, "--out", T / "user", "--force"], "a folder cellfuse did not make"),
        (["distill", missing, "recipes/student-cpu.toml"], "missing: does not exist"),
        (["distill", p["empty"], "recipes/student-cpu.toml"], "no ensemble.keras"),
        (["distill", T / "ens", "recipes/student-cpu.toml", "--set", f"data.train={missing}", "--out", T / "r"],
         "missing: does not exist"),
        (["distill", T / "ens", "recipes/student-cpu.toml", *on, "--set", "data.extra_val=[]", "--set", "distill.init=m1",
          "--out", T / "r"],
         "no member named 'm1'; members are m0"),
        (["evaluate", missing, good], "missing: does not exist"),
        (["evaluate", p["empty"], good], "no model in this directory"),
        (["evaluate", model, missing], "missing: does not exist"),
        (["evaluate", T / "damaged.keras", good], "damaged.keras: not a readable .keras model"),
        (["evaluate", T / "hollow.keras", good], "the archive lacks config.json, model.weights.h5"),
        (["export", T / "flipped.keras", "--out", T / "s.zip"], "model.weights.h5 inside it is damaged"),
        (["evaluate", model, bad], "not a readable .npz"),
        (["predict", missing, good, "--out", T / "p.csv"], "missing: does not exist"),
        (["predict", model, missing, "--out", T / "p.csv"], "missing: does not exist"),
        (["predict", model, good, "--out", T / "taken.csv"], "already exists; pass --force"),
        (["export", missing, "--out", T / "s.zip"], "missing: does not exist"),
        (["export", model, "--out", T / "s.txt"], "expected a .zip"),
        (["inspect", model, missing, "--out", T / "i"], "missing: does not exist"),
        (["inspect", missing, good, "--out", T / "i"], "missing: does not exist"),
        (["inspect", model, good, "--out", T / "user"], "not made by cellfuse"),
        (["ensemble", missing, "--val", good, "--out", T / "e"], "missing: does not exist"),
        (["ensemble", model, "--val", missing, "--out", T / "e"], "missing: does not exist"),
        (["clean", missing, "--out", T / "c"], "missing: does not exist"),
        (["corrupt", missing, "--out", T / "c.npz"], "missing: does not exist"),
        (["split", p["labels9"], "--out", T / "s"], "labels"),
        (["preview", "tiny", "--set", f"data.train={missing}", "--out", T / "p.png"], "does not exist"),
        (["sweep", "tiny", *on, "--space", missing], "missing: does not exist"),
        (["sweep", "tiny", *on, "--space", "tny"], "did you mean 'spaces/tiny'?"),
        (["sweep", "tiny", "--set", f"data.train={missing}", "--space", "recipes/spaces/tiny.toml"],
         "does not exist"),
        (["grade", missing, good], "missing: does not exist"),
        (["grade", T / "runs" / "tiny", good], "tiny: is a folder; grade takes a submission zip (make one with "
                                                "`cellfuse export"),
        (["grade", T / "sub.zip", bad], "not a readable .npz"),
        (["runs", missing], "missing: does not exist"),
        (["demo", "--data", missing, "--out", T / "d"], "missing: does not exist"),
    ]


def test_bad_input_is_refused_before_tensorflow_is_imported(places):
    table = cases(places)
    good_train = ["train", "tiny", "--set", f"data.train={places['good']}", "--out", str(places["T"] / "ok")]
    results = run_trapped([[str(a) for a in args] for args, _ in table] + [good_train])
    *refused, control = results
    assert control["imported"], "the trap caught no import: a test of nothing"
    for (args, says), got in zip(table, refused, strict=True):
        lines = got["output"].strip().splitlines()
        where = f"cellfuse {' '.join(map(str, args))}: {got['output']}"
        assert not got["imported"], f"imported {got['imported'][0]} first; {where}"
        assert got["status"] == 2 and len(lines) == 1 and lines[0].startswith("Error: "), where
        assert says in lines[0], where
