"""Recipe parsing: every shipped recipe loads; unknown keys, bad types and bad choices are errors."""

import dataclasses
from pathlib import Path

import pytest

from toolkit.errors import CellfuseError
from toolkit.recipe import Stage, load_recipe, monitored_set

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


def test_the_monitor_may_name_an_extra_validation_set_and_only_one_the_recipe_reads(tmp_path):
    path = write(tmp_path, "[train]\nmonitor = \"val_heldout_accuracy\"\n")
    with pytest.raises(CellfuseError, match=r"r.toml: train.monitor = 'val_heldout_accuracy'; choose one of "
                                            r"\['val_auc', 'val_accuracy'\] \(an extra validation set"):
        load_recipe(path)
    with pytest.raises(CellfuseError, match=r"--set train.monitor=.*'val_heldout_accuracy'\]"):
        load_recipe(path, ['data.extra_val=["x/val_heldout.npz"]', 'train.monitor="val_held_accuracy"'])
    recipe = load_recipe(path, ['data.extra_val=["x/val_corrupt.npz", "x/val_heldout.npz"]'])
    assert monitored_set(recipe) == "val_heldout"
    assert monitored_set(load_recipe(path, ['data.extra_val=["val_heldout.npz"]', 'train.monitor="val_accuracy"'])) is None
    # an extra file named like a split metric does not make that metric a set's: the split's val_auc picks
    assert monitored_set(load_recipe(path, ['data.extra_val=["x/val_auc.npz"]', 'train.monitor="val_auc"'])) is None


def test_missing_recipe(tmp_path):
    with pytest.raises(CellfuseError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_snapshot_round_trips_to_an_equal_recipe(tmp_path, path):
    """The recipe.toml a run writes loads back to the very recipe it ran (what --resume compares)."""
    recipe = load_recipe(path, ['data.extra_val=["a.npz", "b \\"q\\".npz"]', "train.stages[0].lr=1.5e-05"])
    snapshot = write(tmp_path, recipe.to_toml())
    assert dataclasses.replace(load_recipe(snapshot), path=recipe.path) == recipe


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
    assert weights in ("imagenet", "none") and "shared:" not in path.read_text(), \
        f'{path.name}: weights {weights!r}; a shipped recipe names "imagenet" (Keras\' cache) or "none"'


@pytest.mark.parametrize("override, message", [
    ("train.stages[1].epochs=-1", "train.stages[1].epochs = -1: must be >= 1"),
    ("train.stages=[{epochs = 0}, {epochs = 0}]", "train.stages[0].epochs = 0: must be >= 1"),
    ("train.stages=[]", "train.stages = []: needs at least one stage"),
    ("train.batch_size=0", "train.batch_size = 0: must be >= 1"),
    ("model.dropout=2.0", "model.dropout = 2.0: must be in [0, 1)"),
    ("model.dropout=1", "model.dropout = 1.0: must be in [0, 1)"),
    ("train.stages[0].lr=0", "train.stages[0].lr = 0.0: must be > 0"),
    ("train.stages[0].lr=inf", "train.stages[0].lr must be a finite number, got inf"),
    ("train.stages[0].lr=nan", "train.stages[0].lr must be a finite number, got nan"),
    ("train.weight_decay=-1e-4", "train.weight_decay = -0.0001: must be >= 0"),
    ("train.label_smoothing=1.0", "train.label_smoothing = 1.0: must be in [0, 1)"),
    ("data.val_fraction=0", "data.val_fraction = 0.0: must be in (0, 1)"),
    ("data.val_fraction=1", "data.val_fraction = 1.0: must be in (0, 1)"),
    ("data.n_classes=1", "data.n_classes = 1: must be >= 2"),
    ("data.limit=-5", "data.limit = -5: must be >= 0"),
    ("model.input_size=16", "model.input_size = 16: must be 0 or in [32, 1024]"),
    ("model.input_size=100000", "model.input_size = 100000: must be 0 or in [32, 1024]"),
    ("model.bn_momentum=1.0", "model.bn_momentum = 1.0: must be in [0, 1)"),
    ("model.width=0", "model.width = 0.0: must be > 0"),
    ("train.steps_per_epoch=-1", "train.steps_per_epoch = -1: must be >= 0"),
    ("train.checkpoint_every=0", "train.checkpoint_every = 0: must be >= 1"),
    ("train.warmup_epochs=-0.5", "train.warmup_epochs = -0.5: must be >= 0"),
    ("train.early_stopping=-1", "train.early_stopping = -1: must be >= 0"),
    ("train.seed=-1", "train.seed = -1: must be in [0, 4294967295]"),
    ("distill.temperature=0", "distill.temperature = 0.0: must be > 0"),
    ("distill.alpha=1.5", "distill.alpha = 1.5: must be in [0, 1]"),
    ("distill.bank_views=0", "distill.bank_views = 0: must be >= 1"),
])
def test_bad_numbers_are_refused_naming_the_set_and_key(override, message):
    with pytest.raises(CellfuseError) as e:
        load_recipe(RECIPES[0].parent / "tiny.toml", [override])
    assert str(e.value).startswith(f"--set {override}: ") and message in str(e.value)


def test_bad_numbers_in_the_file_name_the_file(tmp_path):
    path = write(tmp_path, "[train]\nstages = [{epochs = 2}, {epochs = -1}]\n")
    with pytest.raises(CellfuseError, match=r"^\S*r\.toml: train\.stages\[1\]\.epochs = -1: must be >= 1$"):
        load_recipe(path)
    with pytest.raises(CellfuseError, match=r"r\.toml: train\.batch_size = 0: must be >= 1"):
        load_recipe(write(tmp_path, "[train]\nbatch_size = 0\n"))


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/abs", "", ".hidden", "a\\\\b", "sp ace", "../../x"])
def test_a_run_name_is_one_plain_folder_name(tmp_path, name):
    with pytest.raises(CellfuseError, match="must be one plain folder name") as e:
        load_recipe(write(tmp_path, ""), [f'name="{name}"'])
    assert str(e.value).startswith("--set name=")
    with pytest.raises(CellfuseError, match=r"r\.toml: name = .*must be one plain folder name"):
        load_recipe(write(tmp_path, f'name = "{name}"\n'))


def test_plain_names_are_kept(tmp_path):
    assert load_recipe(write(tmp_path, ""), ["name=run-1.v2_b"]).name == "run-1.v2_b"
    assert load_recipe(write(tmp_path, ""), ["name=2024"]).name == "2024"  # a number, as --set parses it
    for name in ("2024-01-01", "1e3", "true", "nan"):  # TOML would read a date, a float, a bool
        assert load_recipe(write(tmp_path, ""), [f"name={name}"]).name == name
    assert load_recipe(write(tmp_path, ""), ["data.train=2024-01-01"]).data.train == "2024-01-01"  # a path too


def test_unknown_set_key_blames_the_set_and_suggests(tmp_path):
    path = write(tmp_path, "[train]\nbatch_size = 8\n")
    with pytest.raises(CellfuseError) as e:
        load_recipe(path, ["train.epocs=3"])
    message = str(e.value)
    assert message.startswith("--set train.epocs=3: unknown key(s) ['epocs'] in [train]")
    assert "did you mean 'epochs'?" in message
    assert "epochs (--set only: the last stage's epochs)" in message.partition("known: ")[2]
    with pytest.raises(CellfuseError, match=r"^--set trian\.epochs=3: unknown section.*did you mean 'train'"):
        load_recipe(path, ["trian.epochs=3"])
    with pytest.raises(CellfuseError, match=r"^--set batch_size=3: expected section.key=value; "
                                            r"did you mean train.batch_size\?"):
        load_recipe(path, ["batch_size=3"])


def test_unknown_file_keys_blame_the_file_and_suggest(tmp_path):
    with pytest.raises(CellfuseError, match=r"r\.toml: unknown section\(s\) \['trian'\] \(did you mean 'train'\?\)"):
        load_recipe(write(tmp_path, "[trian]\n"))
    with pytest.raises(CellfuseError, match=r"r\.toml: unknown key\(s\) \['dropuot'\] in \[model\] "
                                            r"\(did you mean 'dropout'\?\)"):
        load_recipe(write(tmp_path, "[model]\ndropuot = 0.2\n"), ["model.dropout=0.1"])
    with pytest.raises(CellfuseError, match=r"r\.toml: unknown key\(s\) \['prest'\] in \[augment\] "
                                            r"\(did you mean 'preset'\?\)"):
        load_recipe(write(tmp_path, "[augment]\nprest = \"light\"\n"))


def test_set_reaches_list_entries(tmp_path):
    two_stages = write(tmp_path, "[train]\nstages = [{epochs = 1, lr = 1e-3, unfreeze = 0}, {epochs = 9}]\n")
    recipe = load_recipe(two_stages, ["train.stages[1].lr=1e-4"])
    assert recipe.train.stages == (Stage(1, 1e-3, 0.0), Stage(9, 1e-4))
    with pytest.raises(CellfuseError, match=r"^--set train.stages\[2\].lr=1: train.stages has 2 entries"):
        load_recipe(two_stages, ["train.stages[2].lr=1"])
    with pytest.raises(CellfuseError, match=r"^--set train.stages\[1\].lrr=1: unknown key\(s\) \['lrr'\] "
                                            r"in \[train.stages\[1\]\] \(did you mean 'lr'\?\)"):
        load_recipe(two_stages, ["train.stages[1].lrr=1"])
    with pytest.raises(CellfuseError, match="not a recipe key like"):
        load_recipe(two_stages, ["train.stages[x].lr=1"])
    # a recipe leaving the stages to their default gets the default list, one entry changed
    assert load_recipe(write(tmp_path, ""), ["train.stages[0].lr=0.5"]).train.stages == (Stage(1, 0.5),)


@pytest.mark.parametrize("path", ["runs/back\\bslash", "runs/uni\\u0041", 'runs/q"uote', "runs/tab\there",
                                  "runs/émoji😀", "runs/del\x7f"])
def test_a_path_code_passes_as_set_reaches_the_recipe_unchanged(tmp_path, path):
    from toolkit.recipe import toml_string

    recipe = load_recipe(write(tmp_path, ""), [f"data.train={toml_string(path)}", f"train.init_from={toml_string(path)}"])
    assert recipe.data.train == path and recipe.train.init_from == path
