"""`cellfuse inspect`: Grad-CAM finds the evidence, robustness cells match evaluate, the page is self-contained."""

import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_images
from rich.console import Console
from test_tta import tiny_model

from toolkit.cli import main
from toolkit.corrupt import corrupt_file
from toolkit.data import save_dataset
from toolkit.evaluate import evaluate_model
from toolkit.interpret import cam_mass, gradcam, inspect_models


def quiet():
    return Console(file=io.StringIO(), width=140)


def corner_images(n: int, seed: int = 0):
    """Noise everywhere; the class (0..2) is only the colour of a patch in the top-left corner."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = rng.integers(90, 170, (n, 96, 96, 3)).astype(np.uint8)
    colours = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230]], np.uint8)
    images[:, 4:24, 4:24] = colours[labels][:, None, None]
    return images, labels


def test_gradcam_puts_its_mass_on_the_corner_that_decides_the_class():
    """A tiny-cnn from build_classifier (resizing-free, rescaling inside) trained a few dozen steps."""
    import keras

    from toolkit.backbones import build_classifier
    from toolkit.recipe import ModelConfig

    keras.utils.set_random_seed(0)
    images, labels = corner_images(192)
    model = build_classifier(ModelConfig(backbone="tiny-cnn", weights="none", head="linear", dropout=0.0), 3)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(images.astype(np.float32), labels, batch_size=32, epochs=6, verbose=0)
    test_images, test_labels = corner_images(24, seed=1)
    assert (model.predict(test_images.astype(np.float32), verbose=0).argmax(1) == test_labels).mean() > 0.9
    cams = gradcam(model, test_images, test_labels)
    assert cams.shape == (24, 96, 96) and cams.min() >= 0 and cams.max() <= 1
    corner = cam_mass(cams, slice(0, 48), slice(0, 48))  # the top-left quarter of the image
    assert corner > 0.6, corner


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs: `cnn` (a recipe with the heavy preset beside it) and `flat` (no spatial map)."""
    import keras

    root = tmp_path_factory.mktemp("runs")
    images, labels = make_images(128, seed=1)
    (root / "cnn").mkdir()
    tiny_model(0, images, labels, epochs=4).save(root / "cnn" / "best.keras")
    (root / "cnn" / "recipe.toml").write_text('name = "cnn"\n[augment]\npreset = "heavy"\n')
    inputs = keras.Input((96, 96, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    flat = keras.Model(inputs, keras.layers.Dense(8, activation="softmax")(pooled), name="flat")
    flat.save(root / "flat.keras")
    return root


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def test_inspect_writes_every_figure_a_self_contained_page_and_json(runs, tiny_npz, tmp_path):
    out = tmp_path / "inspect"
    args = ["inspect", str(runs / "cnn"), str(tiny_npz), "--out", str(out), "--top", "6",
            "--families", "blur,fog", "--severities", "2,4", "--limit", "0", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    for name in ("top_losses", "classes", "most_confused", "confusion", "reliability", "robustness"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    assert json.loads((out / "inspect.json").read_text())["order"] == ["cnn"]
    cnn = figures["models"]["cnn"]
    assert len(cnn["top_losses"]) == 6 and "Grad-CAM on conv2d" in cnn["gradcam"]
    losses = [-np.log(t["true_probability"]) for t in cnn["top_losses"]]
    assert losses == sorted(losses, reverse=True)
    rob = figures["robustness"]
    assert rob["in_training_augmentation"]["cnn"] == {"blur": True, "fog": False}  # heavy blurs, never fogs
    assert rob["summary"]["cnn"]["unseen_accuracy"] == pytest.approx(np.mean(list(rob["accuracy"]["cnn"]["fog"].values())))

    page = Page()
    page.feed((out / "report.html").read_text())
    assert len(page.images) == 6 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert "How to read this page." in "".join(page.text)

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "already exists" in again.output


def test_each_robustness_cell_is_evaluate_on_the_corrupted_copy(runs, tiny_npz, tmp_path):
    piped = quiet()  # not a terminal: no bar is drawn, so progress comes as lines
    figures = inspect_models([runs / "cnn"], tiny_npz, tmp_path / "inspect", families="fog,noise",
                             severities=[3], limit=0, seed=4, top=2, per_class=0, console=piped)
    said = piped.file.getvalue()
    assert "cnn: predicted 64 images; Grad-CAM next" in said
    assert said.index("family 1/2 (fog) done on 64 images") < said.index("family 2/2 (noise) done") < said.index("wrote")
    for family in ("fog", "noise"):
        copy = corrupt_file(tiny_npz, tmp_path / f"{family}.npz", severity=3, seed=4, families=family)
        evaluated = evaluate_model(runs / "cnn", [copy], console=quiet())[str(copy)]["accuracy"]
        assert figures["robustness"]["accuracy"]["cnn"][family][3] == pytest.approx(evaluated)
    clean = evaluate_model(runs / "cnn", [tiny_npz], console=quiet())[str(tiny_npz)]["accuracy"]
    assert figures["robustness"]["clean_accuracy"]["cnn"] == pytest.approx(clean)


def test_two_models_keep_the_order_given_and_a_model_without_a_map_gets_the_rest(runs, tiny_npz, tmp_path):
    out = tmp_path / "both"
    figures = inspect_models([runs / "flat.keras", runs / "cnn"], tiny_npz, out, families="occlusion",
                             severities=[5], top=4, per_class=1, console=quiet())
    assert figures["order"] == ["flat", "cnn"]
    assert list(figures["robustness"]["summary"]) == ["flat", "cnn"]
    assert figures["models"]["flat"]["gradcam"].startswith("no Grad-CAM: flat has no spatial feature map")
    assert figures["models"]["flat"]["training_augmentation"].startswith("training augmentation unknown")
    assert figures["robustness"]["in_training_augmentation"]["flat"] == {"occlusion": None}
    for name in ("top_losses-flat", "top_losses-cnn", "confusion-flat", "classes-cnn", "robustness"):
        assert (out / f"{name}.png").is_file(), name
    text = (out / "report.html").read_text()
    assert text.index("<h2>flat</h2>") < text.index("<h2>cnn</h2>")


def test_an_ensemble_shows_its_heaviest_members_map_and_ece_before_its_temperatures(runs, tiny_npz, tmp_path):
    from toolkit.ensemble import build_ensemble, ensemble_components

    build_ensemble([runs / "cnn", runs / "flat.keras"], [tiny_npz], tmp_path / "ens", views="none", rounds=3,
                   console=quiet())
    figures = inspect_models([tmp_path / "ens"], tiny_npz, tmp_path / "inspect", families="", top=2,
                             per_class=1, console=quiet())
    ens = figures["models"]["ens"]
    components = ensemble_components(tmp_path / "ens")
    members = {c["member"] for c in components}
    if components[0]["member"] == "cnn":
        assert ens["gradcam"].startswith(f"Grad-CAM of the heaviest ensemble member, cnn (weight "
                                         f"{components[0]['weight']:.2f})")
    else:
        assert ens["gradcam"].startswith("no Grad-CAM: the heaviest member flat")
    assert ens["calibration"]["ece_before_temperature"] is not None
    # the temperatures are back in place afterwards: the figures are the model's own
    assert ens["calibration"]["ece"] == pytest.approx(
        evaluate_model(tmp_path / "ens", [tiny_npz], console=quiet())[str(tiny_npz)]["ece"], abs=1e-5)
    assert len(ens["calibration"]["temperatures"]) == len(components)
    assert ens["training_augmentation"].startswith("training augmentation unknown" if "flat" in members
                                                   else "union of the members")


def test_bad_input_is_one_line(runs, tiny_npz, tmp_path):
    unlabeled = tmp_path / "unlabeled.npz"
    np.savez(unlabeled, images=make_images(4)[0])
    small = save_dataset(tmp_path / "small.npz", np.zeros((4, 64, 64, 3), np.uint8), np.zeros(4, int))
    cases = [([str(tmp_path / "missing"), str(tiny_npz)], "missing"),
             ([str(runs / "cnn"), str(unlabeled)], "labels"),
             ([str(runs / "cnn"), str(small)], "shape"),
             ([str(tiny_npz)], "at least one model"),
             ([str(runs / "cnn"), str(tiny_npz), "--families", "smog"], "smog"),
             ([str(runs / "cnn"), str(tiny_npz), "--severities", "0,9"], "severities")]
    for args, words in cases:
        result = CliRunner().invoke(main, ["inspect", *args, "--out", str(tmp_path / "x")])
        assert result.exit_code == 2, (args, result.output)
        assert words in result.output and "Traceback" not in result.output
