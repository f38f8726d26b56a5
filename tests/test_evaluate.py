"""`cellfuse evaluate` on model files, with TTA, on ensemble directories, and on bad input."""

import io
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_images
from rich.console import Console
from test_tta import tiny_model

from toolkit.cli import main
from toolkit.data import load_dataset, save_dataset
from toolkit.errors import CellfuseError
from toolkit.evaluate import evaluate_model, load_model
from toolkit.report import classification_metrics
from toolkit.tta import merge, predict_views


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    images, labels = make_images(128, seed=1)
    path = tmp_path_factory.mktemp("models") / "model.keras"
    tiny_model(0, images, labels, epochs=4).save(path)
    return path


def quiet():
    return Console(file=io.StringIO(), width=120)


def test_evaluate_cli_prints_the_metrics_and_ends_with_json(model_file, tiny_npz):
    result = CliRunner().invoke(main, ["evaluate", str(model_file), str(tiny_npz), "--json"])
    assert result.exit_code == 0, result.output
    assert "macro_f1" in result.output and "eosinophil" in result.output  # metrics and per-class tables
    metrics = json.loads(result.output.strip().splitlines()[-1])[str(tiny_npz)]
    images, labels = make_images(64)
    probs = load_model(model_file).predict(images.astype(np.float32), verbose=0)
    expected = classification_metrics(labels, probs, [str(i) for i in range(8)])
    for key in ("accuracy", "macro_f1", "auc_ovr", "nll", "ece"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-5)
    assert set(metrics["per_class"]) == {"basophil", "eosinophil", "erythroblast", "immature granulocyte",
                                         "lymphocyte", "monocyte", "neutrophil", "platelet"}


def test_evaluate_with_tta_scores_the_merged_views(model_file, tiny_npz):
    results = evaluate_model(model_file, [tiny_npz], tta="d4:geometric", console=quiet())
    images, labels = make_images(64)
    probs = merge(predict_views(load_model(model_file), images, "d4"), "geometric")
    assert results[str(tiny_npz)]["nll"] == pytest.approx(classification_metrics(labels, probs, range(8))["nll"])


def test_evaluate_against_a_second_model_sets_the_two_side_by_side_image_by_image(model_file, tiny_npz, tmp_path):
    other = tmp_path / "other.keras"
    tiny_model(seed=3).save(other)  # untrained: disagrees with the trained model on many images
    result = CliRunner().invoke(main, ["evaluate", str(model_file), str(tiny_npz), "--against", str(other),
                                       "--against-tta", "flips", "--json"])
    assert result.exit_code == 0, result.output
    paired = json.loads(result.output.strip().splitlines()[-1])[str(tiny_npz)]["against"]
    images, labels = make_images(64)
    mine = load_model(model_file).predict(images.astype(np.float32), verbose=0).argmax(1) == labels
    theirs = merge(predict_views(load_model(other), images, "flips"), "mean").argmax(1) == labels
    assert (paired["a_only"], paired["b_only"]) == (int((mine & ~theirs).sum()), int((theirs & ~mine).sum()))
    assert paired["difference"] == pytest.approx(mine.mean() - theirs.mean())
    assert paired["model"] == str(other) and paired["tta"] == "flips"
    said = " ".join(result.output.split())  # rich wraps the title
    assert "(TTA: none vs flips), image by image" in said  # each model's views
    assert "p weighs the draw of these images only" in said  # not the seed behind each model
    assert f"only {model_file.parent.name} right" in said and "only other right" in said  # as every table names them
    alone = CliRunner().invoke(main, ["evaluate", str(model_file), str(tiny_npz), "--against-tta", "d4"])
    assert alone.exit_code == 2 and "--against-tta needs --against" in alone.output
    missing = CliRunner().invoke(main, ["evaluate", str(model_file), str(tiny_npz), "--against", str(tmp_path / "no.keras")])
    assert missing.exit_code == 2 and "no.keras" in missing.output


def test_two_runs_of_one_name_are_told_apart_by_their_folders(model_file, tiny_npz, tmp_path):
    """`--against` the same run name in another output folder: each column names its folder, not name-2."""
    for demo in ("demo-a", "demo-b"):
        (tmp_path / demo / "runs" / "cpu-lite0").mkdir(parents=True)
        shutil.copy(model_file, tmp_path / demo / "runs" / "cpu-lite0" / "best.keras")
    runs = [tmp_path / demo / "runs" / "cpu-lite0" for demo in ("demo-a", "demo-b")]
    result = CliRunner().invoke(main, ["evaluate", str(runs[0]), str(tiny_npz), "--against", str(runs[1])])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "only cpu-lite0 (demo-a) right" in said and "only cpu-lite0 (demo-b) right" in said
    assert "cpu-lite0-2" not in said
    itself = CliRunner().invoke(main, ["evaluate", str(runs[0]), str(tiny_npz), "--against", str(runs[0])])
    assert itself.exit_code == 0, itself.output
    said = " ".join(itself.output.split())
    assert "only cpu-lite0 right" in said and "only cpu-lite0-2 right" in said
    shutil.copy(model_file, runs[0] / "student.keras")  # two files of one run: named by file
    files = CliRunner().invoke(main, ["evaluate", str(runs[0] / "best.keras"), str(tiny_npz),
                                      "--against", str(runs[0] / "student.keras")])
    assert files.exit_code == 0, files.output
    said = " ".join(files.output.split())
    assert "only cpu-lite0 (best.keras) right" in said and "only cpu-lite0 (student.keras) right" in said


def test_evaluate_an_ensemble_directory(model_file, tiny_npz, tmp_path, monkeypatch):
    from toolkit.ensemble import build_ensemble

    (tmp_path / "run").mkdir()
    tiny_model(seed=3).save(tmp_path / "run" / "best.keras")
    figures = build_ensemble([model_file, tmp_path / "run"], [tiny_npz], tmp_path / "ens", views="none",
                             rounds=3, console=quiet())
    ran = []
    monkeypatch.setattr("toolkit.evaluate.predict_views", lambda model, *a, **k: ran.append(model.name)
                        or predict_views(model, *a, **k))
    ensemble = load_model(tmp_path / "ens")
    other = tmp_path / "other.npz"
    save_dataset(other, *make_images(40, seed=7))
    results = evaluate_model(tmp_path / "ens", [tiny_npz, other], console=quiet())
    assert results[str(tiny_npz)]["accuracy"] == pytest.approx(figures["ensemble_accuracy"])
    assert results[str(tiny_npz)]["nll"] == pytest.approx(figures["rows"]["ensemble"][str(tiny_npz)]["nll"],
                                                          abs=1e-5)
    # on the file it was selected on, the ensemble is read from its cache; on any other, run
    assert [results[str(f)]["from_ensemble_cache"] for f in (tiny_npz, other)] == [True, False]
    assert ran == [ensemble.name]
    for path in (tiny_npz, other):
        data = load_dataset(path)
        probs = ensemble.predict(data.images.astype(np.float32), verbose=0)
        expected = classification_metrics(data.labels, probs, data.class_names)
        for key in ("accuracy", "nll"):
            assert results[str(path)][key] == pytest.approx(expected[key], abs=1e-4)
    ran.clear()
    # the validation file moved (or named from another working folder): matched by its contents, still read;
    # a copy with one label changed is other data, and runs
    moved = tmp_path / "elsewhere" / "val.npz"
    moved.parent.mkdir()
    tiny_npz.rename(moved)
    relabelled = tmp_path / "relabelled.npz"
    data = load_dataset(moved)
    save_dataset(relabelled, data.images, np.roll(data.labels, 1))
    results = evaluate_model(tmp_path / "ens", [moved, relabelled], console=quiet())
    assert [results[str(f)]["from_ensemble_cache"] for f in (moved, relabelled)] == [True, False]
    assert results[str(moved)]["accuracy"] == pytest.approx(figures["ensemble_accuracy"])
    assert ran == [ensemble.name]
    moved.rename(tiny_npz)
    ran.clear()
    # set against an ensemble, which carries its own views, a model's --tta is not stacked on them
    mine = evaluate_model(model_file, [tiny_npz], tta="flips", console=quiet())[str(tiny_npz)]["accuracy"]
    against = evaluate_model(model_file, [tiny_npz], tta="flips", against=tmp_path / "ens", console=quiet())
    paired = against[str(tiny_npz)]["against"]
    assert paired["tta"] == "none" and paired["from_ensemble_cache"]
    assert set(ran) == {load_model(model_file).name}  # the model with its flips ran; the ensemble was read
    assert paired["difference"] == pytest.approx(mine - figures["ensemble_accuracy"])  # the ensemble as it is
    chosen = evaluate_model(model_file, [tiny_npz], tta="flips", against=tmp_path / "ens", against_tta="flips",
                            console=quiet())
    assert chosen[str(tiny_npz)]["against"]["tta"] == "flips"  # asked for: given

    # ensemble.json edited by hand (or a member swapped back to an older version the cache also holds):
    # the cache no longer describes the saved model, which its first images show, so the model runs
    description = tmp_path / "ens" / "ensemble.json"
    edited = json.loads(description.read_text())
    edited["components"][0]["temperature"] *= 3
    description.write_text(json.dumps(edited))
    ran.clear()
    assert not evaluate_model(tmp_path / "ens", [tiny_npz], console=quiet())[str(tiny_npz)]["from_ensemble_cache"]
    assert ran == [ensemble.name]

    shutil.copyfile(model_file, tmp_path / "ens" / "ensemble.keras")  # replaced by hand: its cache no longer speaks for it
    replaced = evaluate_model(tmp_path / "ens", [tiny_npz], console=quiet())[str(tiny_npz)]
    assert not replaced["from_ensemble_cache"]
    assert replaced["accuracy"] == pytest.approx(evaluate_model(model_file, [tiny_npz], console=quiet())
                                                 [str(tiny_npz)]["accuracy"])


def test_an_ensemble_selected_on_a_folder_of_class_sub_folders_reads_it_from_its_cache(model_file, tmp_path):
    from PIL import Image

    from toolkit.data import CLASS_NAMES
    from toolkit.ensemble import build_ensemble

    images, labels = make_images(16, seed=5)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (tmp_path / "val" / CLASS_NAMES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "val" / CLASS_NAMES[label] / f"{i}.png")
    figures = build_ensemble([model_file], [tmp_path / "val"], tmp_path / "ens", views="none", rounds=1,
                             console=quiet())
    result = evaluate_model(tmp_path / "ens", [tmp_path / "val"], console=quiet())[str(tmp_path / "val")]
    assert result["from_ensemble_cache"] and result["accuracy"] == pytest.approx(figures["ensemble_accuracy"])


def test_evaluate_rejects_bad_input_in_one_line(model_file, tiny_npz, tmp_path):
    import keras

    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    inputs = keras.Input((96, 96, 3))
    five = keras.Model(inputs, keras.layers.Dense(5, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(inputs)))
    five.save(tmp_path / "five.keras")
    cases = [([str(tmp_path / "missing.keras"), str(tiny_npz)], "missing.keras"),
             ([str(broken), str(tiny_npz)], "broken.keras: not a readable .keras model"),
             ([str(tmp_path / "five.keras"), str(tiny_npz)], "5 classes"),
             ([str(model_file), str(tiny_npz), "--tta", "d9"], "d9"),
             ([str(model_file), str(tmp_path / "none.npz")], "none.npz")]
    for args, words in cases:
        result = CliRunner().invoke(main, ["evaluate", *args])
        assert result.exit_code == 2, result.output
        assert words in result.output and "Traceback" not in result.output
    with pytest.raises(CellfuseError, match="no model"):
        load_model(tmp_path)
