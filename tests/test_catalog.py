"""The shipped recipes (found through the installed package, by name or path) and the backbone table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from toolkit import catalog
from toolkit.backbones import BACKBONES, HUB
from toolkit.cli import main
from toolkit.errors import CellfuseError
from toolkit.recipe import find_recipe, load_recipe, shipped_dir, shipped_file, shipped_names

ROOT = Path(__file__).parents[1]
CHECKOUT_RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.toml"))


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


# ---------------------------------------------------------------- shipped recipes

def test_the_installed_recipes_are_the_checkouts():
    """The package data is the checkout's recipes/ (an editable install maps one onto the other)."""
    assert shipped_names() == CHECKOUT_RECIPES
    assert shipped_file("spaces/tiny") is not None


def test_every_shipped_recipe_is_listed_with_its_figures():
    rows = {row["name"]: row for row in catalog.shipped_recipes()}
    assert sorted(rows) == CHECKOUT_RECIPES
    assert set(catalog.MEASURED_CPU_TIME) == set(CHECKOUT_RECIPES), "say how long each recipe takes, or 'GPU'"
    for name, row in rows.items():
        recipe = load_recipe(catalog.shipped_recipe(name))
        assert row["backbone"] == recipe.model.backbone
        assert row["epochs"] == sum(stage.epochs for stage in recipe.train.stages)
        assert row["input_size"] == (recipe.model.input_size or 96)
        assert row["purpose"].endswith(".") and not row["purpose"].startswith("cellfuse "), row
        assert (row["cpu_time"] == "GPU") == (name.startswith("gpu-") or name == "student-effv2b0")


def test_purpose_is_the_first_sentence_after_the_command():
    text = "# cellfuse train x.toml\n# For tests: tiny. More\n# here.\nname = \"x\"\n# not this\n"
    assert catalog.purpose(text) == "For tests: tiny."


def test_listing_imports_no_tensorflow():
    code = "import sys, toolkit.catalog as c; c.shipped_recipes(); print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_find_recipe_takes_a_path_or_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = shipped_dir() / "tiny.toml"
    assert find_recipe("tiny") == find_recipe("tiny.toml") == shipped
    assert find_recipe("spaces/tiny") == shipped_dir() / "spaces" / "tiny.toml"
    (tmp_path / "tiny.toml").write_text("name = \"mine\"\n")
    assert find_recipe("tiny.toml") == Path("tiny.toml"), "a file that exists wins over the name"
    (tmp_path / "cpu-mobilenet").mkdir()  # a run folder where the user stands
    assert find_recipe("cpu-mobilenet") == shipped_dir() / "cpu-mobilenet.toml", "a folder never hides a recipe"
    (tmp_path / "cpu-mobilenett").mkdir()
    with pytest.raises(CellfuseError, match="cpu-mobilenett: is a folder, not a recipe file .did you mean"):
        find_recipe("cpu-mobilenett")


@pytest.mark.parametrize("arg, hint", [
    ("tinyy", "did you mean the shipped recipe 'tiny'?"),
    ("recipes/cpu-mobilenet.toml", "did you mean the shipped recipe 'cpu-mobilenet'?"),
    ("zzz.toml", "lists them"),
    ("../pyproject", "lists them"),
])
def test_an_unknown_recipe_is_one_line_with_a_suggestion(arg, hint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CellfuseError, match="does not exist, and no shipped recipe has that name") as error:
        find_recipe(arg)
    assert str(error.value).startswith(f"{arg}: ") and hint in str(error.value)


def test_copy_writes_the_recipe_to_edit_and_refuses_to_clobber(tmp_path):
    out = tmp_path / "mine.toml"
    catalog.copy_recipe("tiny", out)
    shipped = (shipped_dir() / "tiny.toml").read_text()
    first, _, rest = out.read_text().partition("\n")
    assert first == f"# cellfuse train {out} --set data.train=DATA.npz" and rest == shipped.partition("\n")[2]
    assert load_recipe(out).name == "tiny"
    with pytest.raises(CellfuseError, match="already exists; pass --force"):
        catalog.copy_recipe("cpu-mobilenet", out)
    catalog.copy_recipe("cpu-mobilenet", out, force=True)  # cellfuse wrote it: --force may replace it
    assert load_recipe(out).name == "cpu-mobilenet"
    text = out.read_text()
    first, _, rest = text.partition("\n")
    for edited in (text + "# my change\n", f"{first} # my note on line one\n{rest}"):  # the user's now
        out.write_text(edited)
        with pytest.raises(CellfuseError, match="edited since `cellfuse recipes copy` wrote it"):
            catalog.copy_recipe("tiny", out, force=True)
        assert out.read_text() == edited
    users = tmp_path / "users.toml"
    users.write_text("name = \"keep\"\n")
    with pytest.raises(CellfuseError, match="not written by cellfuse"):
        catalog.copy_recipe("tiny", users, force=True)
    assert users.read_text() == "name = \"keep\"\n"
    with pytest.raises(CellfuseError, match="expected a .toml"):
        catalog.copy_recipe("tiny", tmp_path / "mine.txt")


def test_a_recipe_copy_inside_a_cellfuse_folder_is_never_deleted_with_it(tmp_path):
    from toolkit.runs import fresh_dir, make_own_dir

    folder = make_own_dir(tmp_path / "cleaned", "clean")
    catalog.copy_recipe("tiny", folder / "mine.toml")
    with pytest.raises(CellfuseError, match="holds mine.toml, which cellfuse did not write, or wrote for you to edit"):
        fresh_dir(folder, force=True, kind="clean")
    assert (folder / "mine.toml").is_file()


# ---------------------------------------------------------------- backbones

def test_the_parameter_table_covers_the_registry():
    assert set(catalog.BACKBONE_PARAMS) == set(BACKBONES) - {HUB}, "count the new backbone's parameters"


@pytest.mark.parametrize("name", ["tiny-cnn", "mobilenet-0.25", "mobilenetv3-small", "efficientnetv2-custom"])
def test_parameter_counts_match_a_build(name):
    """The cheap ones, re-counted (the big ones take minutes to build on 2 cores)."""
    import keras

    keras.backend.clear_session()
    assert BACKBONES[name].build((32, 32, 3), None).count_params() == catalog.BACKBONE_PARAMS[name]


# ---------------------------------------------------------------- the commands

def test_recipes_command_lists_and_copies(tmp_path):
    listed = CliRunner().invoke(main, ["recipes", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [r["name"] for r in last_json(listed.output)["recipes"]] == CHECKOUT_RECIPES
    table = listed.output.split("{")[0]
    assert "student-cpu-effv2" in table, "the table comes before the JSON"
    padded = [line for line in table.splitlines() if line != line.rstrip()]
    assert not padded, f"piped, a table's rows keep no trailing blanks: {padded[:2]}"
    out = tmp_path / "mine.toml"
    copied = CliRunner().invoke(main, ["recipes", "copy", "tiny", str(out), "--json"])
    assert copied.exit_code == 0 and last_json(copied.output)["out"] == str(out) and out.is_file()
    again = CliRunner().invoke(main, ["recipes", "copy", "tiny", str(out)])
    assert again.exit_code == 2 and again.output.startswith("Error: ") and "--force" in again.output
    unknown = CliRunner().invoke(main, ["recipes", "copy", "tinyy", str(tmp_path / "x.toml")])
    assert unknown.exit_code == 2 and "did you mean the shipped recipe 'tiny'?" in unknown.output


def test_recipes_copy_follows_the_command_surface():
    """tests/test_cli.py checks the top-level commands; the subcommand keeps the same rules."""
    copy = main.commands["recipes"].commands["copy"]
    options = {opt for p in copy.params for opt in p.opts}
    assert {"--force", "--json"} <= options
    assert all(p.help for p in copy.params if p.opts[0].startswith("--"))
    assert copy.help.rstrip().splitlines()[-1].strip().startswith("cellfuse recipes copy ")


def test_backbones_command_lists_the_registry():
    result = CliRunner().invoke(main, ["backbones", "--json"])
    assert result.exit_code == 0, result.output
    *rows, hub = last_json(result.output)["backbones"]
    assert {r["name"] for r in rows} == set(BACKBONES) - {HUB}
    assert all(r["params"] == catalog.BACKBONE_PARAMS[r["name"]] and r["pretrained"] for r in rows)
    assert hub["name"] == "hub:<preset>" and hub["params"] is None  # a preset's size and parameters are its own
    assert hub["pretrained"].startswith("keras-hub preset") and "hub:<preset>" in result.output
    table = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.output.splitlines()
             if line.count("│") > 3}
    assert table["efficientnet-lite0"] == "224 px" and table["tiny-cnn"] == "-"  # random weights: no pretraining size
