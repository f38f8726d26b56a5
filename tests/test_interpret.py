"""What `cellfuse inspect` reads beside a model without loading it: the training augmentation of its run."""

from conftest import stand_in_model

from toolkit.interpret import training_families


def _run(tmp_path, recipe: str):
    run = tmp_path / "cpu-lite0"
    run.mkdir()
    stand_in_model(run / "best.keras")
    (run / "recipe.toml").write_text(recipe)
    return run


def test_a_runs_augmentation_is_read_from_its_recipe(tmp_path):
    run = _run(tmp_path, '[augment]\npreset = "none"\naugmix = true\n')
    families, note = training_families(run)
    assert families and note == f"preset 'none' + AugMix ({run / 'recipe.toml'})"


def test_a_corruption_tuned_copy_has_seen_the_cellfuse_mix(tmp_path):
    from toolkit.corrupt import HELD_OUT, contents

    run = _run(tmp_path, '[data]\ncorrupt_fraction = 0.5\n\n[augment]\npreset = "none"\n')
    families, note = training_families(run)
    assert families == contents("cellfuse") and not families & set().union(*map(contents, HELD_OUT))
    assert note == f"preset 'none' + the cellfuse corruption mix on 50% of the rows ({run / 'recipe.toml'})"
    (tmp_path / "b").mkdir()
    plain, _ = training_families(_run(tmp_path / "b", '[augment]\npreset = "none"\n'))
    assert plain == set()


def test_an_unreadable_recipe_is_named_once_in_the_note(tmp_path):
    run = _run(tmp_path, "[augment\n")
    families, note = training_families(run)
    recipe = run / "recipe.toml"
    assert families is None and note.startswith(f"training augmentation unknown ({recipe}: not valid TOML")
    assert note.count(str(recipe)) == 1
