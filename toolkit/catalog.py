"""The recipes that ship with cellfuse, and the backbone registry, as `cellfuse recipes` and
`cellfuse backbones` list them; `cellfuse recipes copy` writes one out to edit.

Finding a recipe by name (find_recipe, shipped_recipe) lives in toolkit.recipe, which loads recipes.
Nothing here imports TensorFlow: listing parses the recipes' TOML and reads the tables below.
"""

from __future__ import annotations

import re
from pathlib import Path

from toolkit.backbones import BACKBONES, HUB, find_backbone, pretrained_status
from toolkit.errors import CellfuseError
from toolkit.recipe import ModelConfig, read_toml, shipped_dir, shipped_names, shipped_recipe
from toolkit.runs import atomic_write_text, check_new_file, is_own

# Wall time of each recipe's whole schedule on the real training file (5,091 training images) on
# a 2-core CPU, as measured in docs/results.md (whole command); "GPU" for recipes sized for a GPU.
# A shipped recipe missing here fails tests/test_catalog.py: measure it, or say it is not measured.
MEASURED_CPU_TIME = {
    "cpu-mobilenet": "4.0 min",
    "cpu-mobilenet-112": "5.1 min",
    "cpu-mobilenet-160": "6.5 min",
    "cpu-lite0": "28 min",
    "cpu-lite1": "24.7 min",
    "cpu-lite2": "not measured",
    "cpu-mobilenetv3s": "not measured",
    "student-cpu": "32.5 min",
    "student-cpu-effv2": "46.2 min",
    "student-cpu-lite0": "39.1 min",
    "student-cpu-lite0-whole": "31.5 min",
    "tiny": "seconds",
    "quick": "about 1 min",
    "gpu-convnext-base": "GPU",
    "gpu-densenet121": "GPU",
    "gpu-efficientnetv2-m": "GPU",
    "gpu-efficientnetv2-s": "GPU",
    "gpu-resnet50v2": "GPU",
    "student-effv2b0": "GPU",
}

# Parameters of each registered backbone without its top (what `model.get_layer("backbone")` counts;
# no weight depends on the input size). Counted once by building each with weights=None, because
# building them all takes minutes on 2 cores and a listing should be instant; tests/test_catalog.py
# checks the table covers the registry and re-counts the cheap ones.
BACKBONE_PARAMS = {
    "convnext-base": 87_566_464,
    "convnext-small": 49_454_688,
    "convnext-tiny": 27_820_128,
    "densenet121": 7_037_504,
    "efficientnet-lite0": 3_413_024,
    "efficientnet-lite0-s4": 262_176,
    "efficientnet-lite0-s5": 716_928,
    "efficientnet-lite1": 4_189_344,
    "efficientnet-lite2": 4_869_168,
    "efficientnetv2-b0": 5_919_312,
    "efficientnetv2-b1": 6_931_124,
    "efficientnetv2-b2": 8_769_374,
    "efficientnetv2-b3": 12_930_622,
    "efficientnetv2-custom": 5_919_312,  # at width = depth = 1 (model.width, model.depth scale it)
    "efficientnetv2-l": 117_746_848,
    "efficientnetv2-m": 53_150_388,
    "efficientnetv2-s": 20_331_360,
    "mobilenet-0.25": 218_544,
    "mobilenet-1.0": 3_228_864,
    "mobilenetv3-large": 2_996_352,
    "mobilenetv3-small": 939_120,
    "resnet50v2": 23_564_800,
    "tiny-cnn": 47_152,
}


# ---------------------------------------------------------------- listing

def shipped_recipes() -> list[dict]:
    """One row per shipped recipe: what `cellfuse recipes` shows."""
    return [recipe_row(shipped_dir() / f"{name}.toml") for name in shipped_names()]


def recipe_row(path: Path) -> dict:
    text, raw = path.read_text(), read_toml(path)
    model, train = raw.get("model", {}), raw.get("train", {})
    backbone = model.get("backbone", ModelConfig.backbone)
    stages = train.get("stages", [{}])
    return {"name": raw.get("name", path.stem), "backbone": backbone,
            "input_size": input_size(backbone, model.get("input_size", 0)),
            "epochs": sum(stage.get("epochs", 1) for stage in stages),
            "purpose": purpose(text), "cpu_time": MEASURED_CPU_TIME.get(path.stem, "not measured"),
            "file": str(path)}


def input_size(backbone: str, size: int) -> int | None:
    """The side the backbone sees: the recipe's, else the one build_classifier picks (its pretraining
    size, or the data's 96 px when that is more than twice 96); None for an unknown backbone without one."""
    spec = find_backbone(backbone)
    return spec.input_size(size) if spec else size or None


def purpose(text: str) -> str:
    """A recipe says what it is for in the first sentence of its opening comment, after the command line."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return re.split(r"(?<=[.!?])\s+(?=[A-Z`(])", " ".join(lines[1:]))[0]


def backbone_rows() -> list[dict]:
    """One row per registered backbone: pretraining and minimum sizes, parameters, and whether its
    pretrained weights can be had on this machine right now. The hub: row comes last, its size and
    parameters None: they are each preset's own."""
    rows = [{"name": name, "default_size": spec.default_size, "min_size": spec.min_size,
             "params": BACKBONE_PARAMS[name], "pretrained": pretrained_status(name)}
            for name, spec in sorted(BACKBONES.items()) if name != HUB]
    return [*rows, {"name": f"{HUB}<preset>", "default_size": None, "min_size": BACKBONES[HUB].min_size,
                    "params": None, "pretrained": pretrained_status(HUB)}]


# ---------------------------------------------------------------- copying one out to edit

def copy_recipe(name: str, path: str | Path, force: bool = False) -> Path:
    """Write the shipped recipe `name` to `path`, its opening command naming the new file."""
    source, path = shipped_recipe(name), Path(path)
    if force and path.is_file() and is_own(path) and not unedited_copy(path):
        raise CellfuseError(f"{path}: edited since `cellfuse recipes copy` wrote it, so --force will not replace "
                            "your edits; choose another name or remove it yourself")
    out = check_new_file(path, ".toml", force, writer="recipes copy")  # the CLI's name, from Python too
    return atomic_write_text(out, copied_text(source, path))


def shipped_as(source: Path) -> str:
    """How a shipped recipe's opening command names it (recipes/tiny.toml)."""
    return f"recipes/{source.relative_to(shipped_dir()).as_posix()}"


def copied_text(source: Path, path: Path) -> str:
    """A shipped recipe as `recipes copy` writes it to `path`: its opening command names the copy."""
    first, _, rest = source.read_text().partition("\n")
    return f"{first.replace(shipped_as(source), str(path))}\n{rest}"


def unedited_copy(path: Path) -> bool:
    """`path` holds a shipped recipe (or space) as `recipes copy` wrote it: the shipped text, its opening
    command naming the copy by whatever path it was given then."""
    first, _, body = path.read_text(errors="replace").partition("\n")
    for source in shipped_dir().rglob("*.toml"):
        shipped_first, _, shipped_body = source.read_text().partition("\n")
        before, _, after = shipped_first.partition(shipped_as(source))
        named = first[len(before):len(first) - len(after)]  # the copy's path, as it was given
        if body == shipped_body and first.startswith(before) and first.endswith(after) and named.split() == [named]:
            return True
    return False
