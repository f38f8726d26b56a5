"""`cellfuse predict`: probabilities on npz files, folders of images of any size, and submission zips."""

import csv
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_images
from PIL import Image
from rich.console import Console
from test_tta import tiny_model

from toolkit.cli import main
from toolkit.data import CLASS_NAMES, save_dataset, save_npz, to_model_input
from toolkit.errors import CellfuseError
from toolkit.predict import predict_files
from toolkit.tta import merge, predict_views

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A briefly trained model saved in a run directory, and the loaded model itself."""
    images, labels = make_images(128, seed=1)
    run = tmp_path_factory.mktemp("run")
    trained = tiny_model(0, images, labels, epochs=3)
    trained.save(run / "best.keras")
    return run, trained


def quiet():
    return Console(file=io.StringIO(), width=200)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def probabilities(rows) -> np.ndarray:
    return np.array([[float(row[name]) for name in CLASS_NAMES] for row in rows])


def test_npz_rows_hold_every_class_probability_and_the_argmax(model, tmp_path):
    run, trained = model
    images, labels = make_images(20, seed=2)
    data = save_dataset(tmp_path / "new.npz", images, labels)
    out = tmp_path / "predictions.csv"
    result = CliRunner().invoke(main, ["predict", str(run), str(data), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["predicted"] == 20 and summary["skipped"] == 0
    rows = read_csv(out)
    assert [(r["source"], r["row"]) for r in rows] == [(str(data), str(i)) for i in range(20)]
    probs = probabilities(rows)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    np.testing.assert_allclose(probs, trained.predict(images.astype(np.float32), verbose=0), atol=1e-5)
    assert [r["class"] for r in rows] == [CLASS_NAMES[i] for i in probs.argmax(1)]
    assert sum(summary["counts"].values()) == 20
    # new images come without labels
    unlabelled = save_npz(tmp_path / "unlabelled.npz", images=images[:5])
    result = CliRunner().invoke(main, ["predict", str(run), str(unlabelled), "--out", str(tmp_path / "u.csv")])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(probabilities(read_csv(tmp_path / "u.csv")), probs[:5], atol=1e-5)


def write_folder(folder: Path) -> np.ndarray:
    """Images of several sizes and modes in nested folders, one damaged and one truncated file, a text file."""
    images, _ = make_images(3, seed=3)
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(images[0]).save(folder / "a.png")  # already the model's input: read unchanged
    Image.fromarray(images[1]).resize((200, 160)).convert("RGBA").save(folder / "sub" / "b.png")
    Image.fromarray(images[2]).convert("L").resize((50, 50)).save(folder / "sub" / "c.jpg")
    (folder / "broken.png").write_bytes(b"not an image at all")
    (folder / "truncated.png").write_bytes((folder / "a.png").read_bytes()[:300])
    (folder / "notes.txt").write_text("not an image suffix: ignored")
    return images[0]


def test_a_folder_of_images_of_any_size_with_unreadable_files_skipped(model, tmp_path):
    run, trained = model
    exact = write_folder(tmp_path / "cells")
    console = quiet()
    named_twice = [tmp_path / "cells", tmp_path / "cells" / "sub" / "b.png"]  # a folder and a file in it
    summary = predict_files(run / "best.keras", named_twice, tmp_path / "p.csv", console=console)
    assert summary["predicted"] == 3 and summary["skipped"] == 2, "each image once, however often named"
    printed = console.file.getvalue()
    assert "broken.png" in printed and "truncated.png" in printed and "skipped 2" in printed
    rows = read_csv(tmp_path / "p.csv")
    assert [Path(r["source"]).name for r in rows] == ["a.png", "b.png", "c.jpg"]
    assert all(r["row"] == "" for r in rows)
    probs = probabilities(rows)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    assert [r["class"] for r in rows] == [CLASS_NAMES[i] for i in probs.argmax(1)]
    np.testing.assert_allclose(probs[0], trained.predict(exact[None].astype(np.float32), verbose=0)[0],
                               atol=1e-5)


def test_images_enlarged_more_than_twice_are_named_with_their_size(model, tmp_path):
    """A 1x1 or 40x40 image becomes a 96x96 input all the same: predicted, but said, since the resize
    invented what the model reads; 48 px and larger pass quietly."""
    run, _ = model
    images, _ = make_images(4, seed=4)
    for name, side in (("dot.png", 1), ("small.png", 40), ("half.png", 48), ("full.png", 96)):
        Image.fromarray(images[0]).resize((side, side)).save(tmp_path / name)
    Image.fromarray(images[1]).resize((300, 30)).save(tmp_path / "strip.png")  # its short side counts
    console = quiet()
    summary = predict_files(run / "best.keras", [tmp_path], tmp_path / "p.csv", console=console, force=True)
    assert summary["predicted"] == 5 and summary["upscaled"] == 3
    assert sorted(Path(f.split(":")[0]).name for f in summary["upscaled_files"]) == ["dot.png", "small.png", "strip.png"]
    printed = " ".join(console.file.getvalue().split())
    assert "dot.png: 1x1" in printed and "small.png: 40x40" in printed and "strip.png: 300x30" in printed
    assert "3 image(s) smaller than 48 px on a side were enlarged" in printed and "half.png" not in printed


def test_images_are_centre_cropped_to_a_square_then_resized_with_lanczos(tmp_path):
    wide = np.zeros((100, 300, 3), dtype=np.uint8)
    wide[:, :100] = wide[:, 200:] = (255, 0, 0)  # red side bands, cropped away
    wide[:, 100:200] = (0, 255, 0)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    pixels = to_model_input(tmp_path / "wide.png")
    assert pixels.shape == (96, 96, 3) and pixels.dtype == np.uint8
    assert (pixels == (0, 255, 0)).all()
    Image.fromarray(wide).convert("L").save(tmp_path / "grey.png")
    grey = to_model_input(tmp_path / "grey.png")
    square = Image.open(tmp_path / "grey.png").convert("RGB").crop((100, 0, 200, 100))
    np.testing.assert_array_equal(grey, np.asarray(square.resize((96, 96), Image.LANCZOS)))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_16_bit_and_float_greyscale_are_scaled_not_clipped_to_white(tmp_path):
    """A 16-bit PNG came out all 255: Pillow's convert("RGB") clips wide modes instead of scaling them."""
    ramp = np.tile(np.linspace(0, 1, 96), (96, 1))
    eight = Image.fromarray(np.rint(ramp * 255).astype(np.uint8))
    Image.fromarray(np.rint(ramp * 65535).astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(ramp.astype(np.float32), "F").save(tmp_path / "f01.tif")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I"), "the file is 16-bit, as a microscope writes it"
    for name in ("g16.png", "f01.tif"):
        pixels = to_model_input(tmp_path / name)
        assert np.abs(pixels[..., 0].astype(int) - np.asarray(eight)).max() <= 1, name
    Image.fromarray((ramp * 1000).astype(np.float32), "F").save(tmp_path / "f1000.tif")
    with pytest.raises(CellfuseError, match="f1000.tif: F image with values from 0 to 1000; save it as an 8- or 16-bit"):
        to_model_input(tmp_path / "f1000.tif")


def test_a_submission_zip_and_tta_give_the_models_probabilities(model, tmp_path):
    from toolkit.export import export_submission

    run, trained = model
    images, labels = make_images(12, seed=4)
    data = save_dataset(tmp_path / "new.npz", images, labels)
    export_submission(run, tmp_path / "sub.zip", console=quiet())
    predict_files(tmp_path / "sub.zip", [data], tmp_path / "zip.csv", tta="flips:geometric", console=quiet())
    expected = merge(predict_views(trained, images, "flips"), "geometric")
    np.testing.assert_allclose(probabilities(read_csv(tmp_path / "zip.csv")), expected, atol=1e-5)


ERRORS_BEFORE_TENSORFLOW = """
import json, sys
from click.testing import CliRunner
from toolkit.cli import main
results = []
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(main, args)
    results.append((result.exit_code, result.output, "tensorflow" in sys.modules))
print(json.dumps(results))
"""


def test_user_errors_are_reported_before_tensorflow_is_imported(model, tmp_path):
    run, _ = model
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken.csv").write_text("mine\n")
    (tmp_path / "x.npy").write_bytes(b"")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    write_folder(tmp_path / "cells")
    with zipfile.ZipFile(tmp_path / "no_model.zip", "w") as archive:
        archive.writestr("model.py", "")
    with zipfile.ZipFile(tmp_path / "cut.zip", "w") as archive:  # its model.keras cut in half
        keras_bytes = (run / "best.keras").read_bytes()
        archive.writestr("model.keras", keras_bytes[: len(keras_bytes) // 2])
    out = str(tmp_path / "p.csv")
    cases = {"missing.npz: does not exist": [str(run), str(tmp_path / "missing.npz"), "--out", out],
             "nothing: does not exist": [str(tmp_path / "nothing"), str(tmp_path / "cells"), "--out", out],
             "no images found": [str(run), str(tmp_path / "empty"), "--out", out],
             "expected a .csv": [str(run), str(tmp_path / "cells"), "--out", str(tmp_path / "p.txt")],
             "already exists": [str(run), str(tmp_path / "cells"), "--out", str(tmp_path / "taken.csv")],
             "x.npy: not an .npz": [str(run), str(tmp_path / "x.npy"), "--out", out],
             "bad.npz: not a readable .npz": [str(run), str(tmp_path / "bad.npz"), "--out", out],
             "no_model.zip: holds no model.keras": [str(tmp_path / "no_model.zip"), str(tmp_path / "cells"), "--out", out],
             "cut.zip (its model.keras): not a readable .keras model": [str(tmp_path / "cut.zip"), str(tmp_path / "cells"),
                                                                        "--out", out]}
    child = subprocess.run([sys.executable, "-c", ERRORS_BEFORE_TENSORFLOW,
                            json.dumps([["predict", *args] for args in cases.values()])],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert child.returncode == 0, child.stderr
    for words, (status, output, tensorflow) in zip(cases, json.loads(child.stdout), strict=True):
        assert status == 2 and output.startswith("Error: ") and words in output, (words, output)
        assert not tensorflow, f"TensorFlow was imported before the error {output!r}"
