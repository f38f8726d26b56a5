"""Recipe parsing: every shipped recipe loads; unknown keys, bad types and bad choices are errors."""

from pathlib import Path

import pytest

from toolkit.errors import CellfuseError
from toolkit.recipe import Stage, load_recipe

RECIPES = sorted(Path(__file__).parents[1].glob("recipes/*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_loads_and_opens_with_its_command(path):
    recipe = load_recipe(path)
    assert recipe.name
    assert path.read_text().startswith("# cellfuse "), "a recipe opens with the command that runs it"
    from toolkit.backbones import backbone_spec

    backbone_spec(recipe.model.backbone)  # raises for an unregistered name


def write(tmp_path, text):
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_defaults_and_stages(tmp_path):
    recipe = load_recipe(write(tmp_path, """
[model]
backbone = "tiny-cnn"
[train]
stages = [{epochs = 2, lr = 1e-3, unfreeze = 0}, {epochs = 3, lr = 1e-4}]
"""))
    assert recipe.name == "r"
    assert recipe.train.stages == (Stage(2, 1e-3, 0.0), Stage(3, 1e-4, 1.0))
    assert recipe.train.monitor == "val_auc" and recipe.train.class_weights == "none"
    assert recipe.train.freeze_batchnorm is False
    assert recipe.distill is None


def test_overrides_are_typed(tmp_path):
    path = write(tmp_path, "[model]\nbackbone = \"tiny-cnn\"\n")
    recipe = load_recipe(path, ["train.batch_size=8", "train.lr_unused=1"][:1] + ["model.dropout=0.5",
                                "data.extra_val=[\"a.npz\"]", "name=other", "train.ema=true"])
    assert recipe.train.batch_size == 8 and recipe.model.dropout == 0.5
    assert recipe.data.extra_val == ("a.npz",) and recipe.name == "other" and recipe.train.ema is True
    with pytest.raises(CellfuseError, match="batch_size must be int"):
        load_recipe(path, ["train.batch_size=big"])


@pytest.mark.parametrize("text, message", [
    ("[train]\nbatchsize = 3\n", r"unknown key\(s\) \['batchsize'\] in \[train\]"),
    ("[trian]\n", r"unknown section"),
    ("[train]\nmonitor = \"val_loss\"\n", r"train.monitor = 'val_loss'; choose one of"),
    ("[train]\nbatch_size = 1.5\n", r"train.batch_size must be int"),
    ("[train]\nstages = [{epochs = 1, lrate = 1}]\n", r"unknown key\(s\) \['lrate'\]"),
    ("[train\n", r"not valid TOML"),
])
def test_bad_recipes_name_the_file_and_key(tmp_path, text, message):
    with pytest.raises(CellfuseError, match=message) as e:
        load_recipe(write(tmp_path, text))
    assert "r.toml" in str(e.value)


def test_missing_recipe(tmp_path):
    with pytest.raises(CellfuseError, match="no such recipe"):
        load_recipe(tmp_path / "nope.toml")


def test_snapshot_round_trips(tmp_path):
    recipe = load_recipe(RECIPES[0])
    again = load_recipe(write(tmp_path, recipe.to_toml()))
    assert again.to_toml() == recipe.to_toml()


def test_epochs_shortcut_sets_the_last_stage_only(tmp_path):
    two_stages = write(tmp_path, "[train]\nstages = [{epochs = 1, lr = 1e-3, unfreeze = 0}, {epochs = 9}]\n")
    recipe = load_recipe(two_stages, ["train.epochs=3"])
    assert recipe.train.stages == (Stage(1, 1e-3, 0.0), Stage(3))
    assert load_recipe(write(tmp_path, ""), ["train.epochs=4"]).train.stages == (Stage(4),)
    # later overrides win, in order, like every other --set
    stages = load_recipe(two_stages, ["train.epochs=3", "train.stages=[{epochs = 2}]"]).train.stages
    assert stages == (Stage(2),)
    for bad in ("train.epochs=0", "train.epochs=2.5", "train.epochs=many"):
        with pytest.raises(CellfuseError, match="whole number of epochs"):
            load_recipe(two_stages, [bad])


def test_epochs_in_a_recipe_file_points_at_stages(tmp_path):
    with pytest.raises(CellfuseError, match=r"unknown key\(s\) \['epochs'\].*--set train.epochs=N"):
        load_recipe(write(tmp_path, "[train]\nepochs = 3\n"))


@pytest.mark.parametrize("value", ["False", "TRUE", "yes", "1"])
def test_bool_override_asks_for_true_or_false(tmp_path, value):
    with pytest.raises(CellfuseError, match=rf"train.ema must be true or false .*got '?{value}'?"):
        load_recipe(write(tmp_path, ""), [f"train.ema={value}"])


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_name_weights_that_work_from_any_folder(path):
    weights = load_recipe(path).model.weights
    assert weights in ("imagenet", "none") or weights.startswith("shared:"), \
        f"{path.name}: weights {weights!r} is a path relative to wherever cellfuse runs; use shared:<path>"
